"""The output JSONL: appended and flushed line by line, so a killed job loses no finished line.

On open, an existing output is read back (streaming) to learn which lines are done; a torn last
line (a write cut by a kill) is truncated away, so its line is simply served again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from eyas.batch.inputs import BadLine, Key, WorkItem
from eyas.core import RequestOutput
from eyas.errors import EyasError


def error_record(id: Optional[str], line: int, error: str) -> dict:
    """An output line for an input line that could not be served (Results contract + `line`)."""
    rec = RequestOutput(id=id, text="", token_ids=[], finished=True, finish_reason="error",
                        prompt_tokens=0, error=error).to_dict()
    rec["line"] = line
    return rec


def bad_line_record(bad: BadLine) -> dict:
    return error_record(bad.id, bad.line, bad.error)


def item_error_record(item: WorkItem, error: str) -> dict:
    return error_record(item.id, item.line, f"{item.where}: {error}")


def record_key(rec: dict) -> Key:
    return rec["id"] if rec.get("id") is not None else int(rec["line"])


class ResultWriter:
    """Append-only JSONL writer that knows the keys already written (by this or an earlier run)."""

    def __init__(self, path: str | Path, lock: bool = False):
        self.path = Path(path)
        self.done: set[Key] = set()
        self.truncated_bytes = 0
        self._fd: Optional[int] = None  # opened on the first write: refusing a job creates no file
        self._lock_fd: Optional[int] = None
        self._closed = False
        if lock:
            self._lock()
        try:
            if self.path.exists():
                self._recover()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """One writer per output: a second `eyas batch` on the same output (say, a resubmission while
        the stopped job still runs) is refused instead of writing ids twice. Released on exit."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EyasError(f"another eyas batch is writing {self.path}; wait for it to end (or stop it) "
                            "and rerun") from None
        except OSError:  # a filesystem without locks: go on unguarded
            pass
        self._lock_fd = fd

    def _recover(self) -> None:
        good_end = 0  # byte offset just past the last complete, parseable line
        bad: Optional[tuple[int, str]] = None
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if bad is not None:  # a bad line followed by more lines: not a torn tail
                    raise EyasError(f"output {self.path} line {bad[0]} is not a result line ({bad[1]}); "
                                    "fix or move the file before resuming")
                if not raw.endswith(b"\n"):
                    bad = (n, "no newline")
                    continue
                if not raw.strip():
                    good_end += len(raw)
                    continue
                try:
                    rec = json.loads(raw)
                    key = record_key(rec)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    bad = (n, str(e) or type(e).__name__)
                    continue
                self.done.add(key)
                good_end += len(raw)
        size = self.path.stat().st_size
        self.truncated_bytes = size - good_end  # a torn tail, dropped by open()
        self._good_end = good_end

    def open(self) -> None:
        """Truncate a torn tail and open for appending (idempotent)."""
        if self._closed:
            raise EyasError("result writer is closed")
        if self._fd is None:
            if self.truncated_bytes:
                os.truncate(self.path, self._good_end)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, rec: dict) -> None:
        self.open()
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.done.add(record_key(rec))

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
