"""The fixed prompt set, turned into token ids of an exact length.

Prompts come from data/prompts/eval.jsonl, then data/prompts/train.jsonl (in file order), found
next to the installed package or under the current directory; a few built-in prompts stand in
when neither is there. Request i of a run always gets prompt i, so every mode sees the same ids.

Each prompt becomes exactly `length` ids: the chat template around the last message, whose
content tokens are repeated (or cut) to fill the room between the template's prefix and its
generation prompt. When the template alone does not fit, the content ids alone are repeated/cut.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("eyas")

PROMPT_FILES = ("eval.jsonl", "train.jsonl")
FALLBACK_PROMPTS = (
    "Explain why the sky appears blue during the day and red at sunset.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the differences between Python lists, tuples, sets and dictionaries.",
    "Plan a three day trip to a city you have never visited, without a car.",
)
_PLACEHOLDER = "@@EYAS_BENCH_CONTENT@@"
_SEPARATOR = "\n\n"


def prompt_set_dir() -> Optional[Path]:
    """data/prompts of the source tree (editable install) or of the current directory."""
    import eyas

    for root in (Path(eyas.__file__).resolve().parents[1], Path.cwd()):
        folder = root / "data" / "prompts"
        if (folder / PROMPT_FILES[0]).is_file():
            return folder
    return None


def load_conversations(count: int) -> list[list[dict]]:
    """`count` conversations (lists of {role, content}), cycling the prompt set if it is short."""
    from eyas.prompts import read_prompt_file

    folder = prompt_set_dir()
    convs: list[list[dict]] = []
    if folder is not None:
        for name in PROMPT_FILES:
            if len(convs) >= count or not (folder / name).is_file():
                continue
            for spec in read_prompt_file(folder / name):
                convs.append(spec.messages if spec.messages is not None
                             else [{"role": "user", "content": spec.prompt}])
    if not convs:
        log.warning("bench: prompt set data/prompts not found; using %d built-in prompts", len(FALLBACK_PROMPTS))
        convs = [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS]
    return [convs[i % len(convs)] for i in range(count)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _fill(ids: list[int], n: int) -> list[int]:
    """Repeat `ids` cyclically, cut to n: [a, b, c], 5 -> [a, b, c, a, b]."""
    return list(itertools.islice(itertools.cycle(ids), n))


def _template_parts(tokenizer, messages: list[dict]) -> Optional[tuple[list[int], list[int]]]:
    """(prefix ids, suffix ids) around the last message's content, or None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marked = messages[:-1] + [{"role": messages[-1]["role"], "content": _PLACEHOLDER}]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    if text.count(_PLACEHOLDER) != 1:
        return None
    before, after = text.split(_PLACEHOLDER)
    return _encode(tokenizer, before), _encode(tokenizer, after)


def fixed_length_ids(tokenizer, messages: list[dict], length: int) -> list[int]:
    """Exactly `length` token ids for one conversation (see the module docstring)."""
    content = _encode(tokenizer, messages[-1]["content"])
    body = content + _encode(tokenizer, _SEPARATOR)
    for candidate in (messages, messages[-1:]):  # whole conversation, else the last turn alone
        parts = _template_parts(tokenizer, candidate)
        if parts is None:
            break
        prefix, suffix = parts
        room = length - len(prefix) - len(suffix)
        if room >= len(content) or (room >= 1 and candidate is not messages):
            return prefix + _fill(body, room) + suffix
    return _fill(body, length)


def build_prompt_ids(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` ids each, in the prompt set's order."""
    return [fixed_length_ids(tokenizer, conv, length) for conv in load_conversations(count)]
