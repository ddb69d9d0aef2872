"""Prompt files: JSONL, one request per line, `prompt` or `messages`, optional overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from eyas.core import SamplingParams
from eyas.errors import InvalidRequestError

OVERRIDE_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


@dataclass(frozen=True)
class PromptSpec:
    id: str
    prompt: Optional[str] = None
    messages: Optional[list] = None
    overrides: dict = dataclasses.field(default_factory=dict)

    def params(self, base: SamplingParams) -> SamplingParams:
        return dataclasses.replace(base, **self.overrides) if self.overrides else base

    def request(self) -> dict:
        """What LLM.generate takes for this line: {"prompt": text} or {"messages": [...]}."""
        return {"prompt": self.prompt} if self.prompt is not None else {"messages": self.messages}


def parse_prompt_line(obj: Any, where: str) -> PromptSpec:
    if not isinstance(obj, dict):
        raise InvalidRequestError(where, "expected a JSON object")
    if "id" not in obj or obj["id"] is None or isinstance(obj["id"], (dict, list)):
        raise InvalidRequestError(where, "missing or invalid 'id' (a string or integer)")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise InvalidRequestError(where, "needs exactly one of 'prompt' or 'messages'")
    if has_p and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise InvalidRequestError(where, "'prompt' must be a non-empty string")
    if has_m and (not isinstance(obj["messages"], list) or not obj["messages"]):
        raise InvalidRequestError(where, "'messages' must be a non-empty list")
    overrides = {k: obj[k] for k in OVERRIDE_KEYS if k in obj}
    if "stop" in overrides and isinstance(overrides["stop"], str):
        overrides["stop"] = (overrides["stop"],)
    unknown = set(obj) - {"id", "prompt", "messages"} - set(OVERRIDE_KEYS)
    if unknown:
        raise InvalidRequestError(where, f"unknown keys {sorted(unknown)}; overrides are {list(OVERRIDE_KEYS)}")
    try:
        SamplingParams(**overrides)
    except InvalidRequestError as e:
        raise InvalidRequestError(where, f"{e.field}: {e.message}") from None
    except TypeError as e:
        raise InvalidRequestError(where, str(e)) from None
    return PromptSpec(str(obj["id"]), obj.get("prompt"), obj.get("messages"), overrides)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Parse and validate a whole JSONL file; duplicate ids are refused before any work."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("prompts", f"file not found: {path}")
    specs: list[PromptSpec] = []
    seen: dict[str, int] = {}
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(where, f"not valid JSON ({e.msg})") from None
            spec = parse_prompt_line(obj, where)
            if spec.id in seen:
                raise InvalidRequestError(where, f"duplicate id {spec.id!r} (first on line {seen[spec.id]})")
            seen[spec.id] = n
            specs.append(spec)
    if not specs:
        raise InvalidRequestError("prompts", f"{path} holds no prompts")
    return specs
