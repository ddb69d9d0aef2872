"""The input JSONL, read lazily: a pre-scan refuses duplicate ids, then lines stream one by one.

A line that cannot be served (not JSON, no prompt, a bad override) becomes a `BadLine` that is
recorded in the output with its reason; only a missing file and duplicate ids stop the job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, Iterator, Optional, Union

from eyas.core import SamplingParams
from eyas.errors import InvalidRequestError
from eyas.prompts import parse_prompt_line

Key = Union[str, int]  # a line's id, or its line number when it has no usable id


@dataclass(frozen=True)
class WorkItem:
    """One servable line, as sent to a replica."""

    id: str
    line: int
    where: str  # "in.jsonl line 7", for error messages
    prompt: Optional[str]
    messages: Optional[list]
    params: SamplingParams
    chat: bool = False

    @property
    def key(self) -> Key:
        return self.id


@dataclass(frozen=True)
class BadLine:
    """A line recorded as an error without reaching any replica."""

    id: Optional[str]
    line: int
    error: str

    @property
    def key(self) -> Key:
        return self.id if self.id is not None else self.line


@dataclass(frozen=True)
class InputScan:
    lines: int  # non-blank lines
    keys: frozenset  # their keys (ids, or line numbers for lines without a usable id)

    def count_done(self, done: AbstractSet[Key]) -> int:
        return len(self.keys & done)


def line_id(obj: Any) -> Optional[str]:
    """The id of a parsed line when it has a usable one (the rule of eyas.prompts)."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("id")
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _load(line: str) -> tuple[Any, Optional[str]]:
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"


def scan_input(path: str | Path) -> InputScan:
    """Check the file exists and that no id repeats; count the lines. Keeps only the keys in memory."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("input", f"file not found: {path}")
    seen: dict[Key, int] = {}
    count = 0
    for n, line in _numbered_lines(path):
        count += 1
        obj, _ = _load(line)
        rid = line_id(obj)
        if rid in seen:
            raise InvalidRequestError(f"{path.name} line {n}", f"duplicate id {rid!r} (first on line {seen[rid]}); "
                                      "ids must be unique, nothing was run")
        seen[rid if rid is not None else n] = n
    if count == 0:
        raise InvalidRequestError("input", f"{path} holds no lines")
    return InputScan(lines=count, keys=frozenset(seen))


def read_lines(path: str | Path, base: SamplingParams, chat: bool = False) -> Iterator[Union[WorkItem, BadLine]]:
    """Yield each non-blank line as a WorkItem, or a BadLine with its reason. Lazy: O(1) memory."""
    path = Path(path)
    for n, line in _numbered_lines(path):
        where = f"{path.name} line {n}"
        obj, err = _load(line)
        if err is not None:
            yield BadLine(None, n, f"{where}: {err}")
            continue
        try:
            spec = parse_prompt_line(obj, where)
            params = spec.params(base)
        except InvalidRequestError as e:
            yield BadLine(line_id(obj), n, str(e))
            continue
        except (TypeError, ValueError) as e:  # an override of the wrong type that slipped through
            yield BadLine(line_id(obj), n, f"{where}: {e}")
            continue
        yield WorkItem(spec.id, n, where, spec.prompt, spec.messages, params, chat)
