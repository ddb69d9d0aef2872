"""ReplicaCore: one LLMEngine driven by its own step thread, fed by submit(), drained by poll().

The same object serves in-process (local executor) and inside a Ray actor. submit() and poll()
may be called from other threads; only the step thread touches the engine.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Optional

from eyas.batch.inputs import WorkItem
from eyas.batch.results import item_error_record
from eyas.config import EngineConfig
from eyas.errors import EyasError, InvalidRequestError

log = logging.getLogger("eyas.batch")


class ReplicaFailed(EyasError):
    """The replica's engine raised while stepping; its in-flight lines must go elsewhere."""


class ReplicaCore:
    def __init__(self, config: EngineConfig, notify: Optional[threading.Event] = None, engine=None):
        if engine is None:
            from eyas.engine import create_engine

            engine = create_engine(config)
        self.engine = engine
        self.notify = notify
        self._inbox: queue.SimpleQueue[WorkItem] = queue.SimpleQueue()
        self._done: list[dict] = []
        self._cond = threading.Condition()
        self._error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eyas-batch-replica", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers
    def submit(self, items: list[WorkItem]) -> int:
        for it in items:
            self._inbox.put(it)
        return len(items)

    def poll(self, timeout: float = 1.0) -> list[dict]:
        """Finished result records since the last poll; waits up to `timeout` for at least one."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or self._error is not None, timeout)
            if self._error is not None:
                raise ReplicaFailed(self._error)
            out, self._done = self._done, []
        return out

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # --------------------------------------------------------- step thread
    def _publish(self, records: list[dict]) -> None:
        with self._cond:
            self._done.extend(records)
            self._cond.notify_all()
        if self.notify is not None:
            self.notify.set()

    def _admit(self, block: bool) -> None:
        rejected = []
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            try:
                self.engine.add_request(item.id, item.prompt, item.params, messages=item.messages, chat=item.chat)
            except InvalidRequestError as e:
                rejected.append(item_error_record(item, str(e)))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
        if rejected:
            self._publish(rejected)

    def _loop(self) -> None:
        # a pause after every step: lets tests stop or kill a job reliably mid-way
        pause = float(os.environ.get("EYAS_BATCH_STEP_PAUSE_S", "0"))
        try:
            while not self._stop.is_set():
                self._admit(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    finished = [o.to_dict() for o in self.engine.step() if o.finished]
                    if finished:
                        self._publish(finished)
                    if pause:
                        time.sleep(pause)
        except Exception as e:  # the engine is in an unknown state: fail the replica, not the lines
            log.exception("replica step failed")
            with self._cond:
                self._error = f"{type(e).__name__}: {e}"
                self._cond.notify_all()
            if self.notify is not None:
                self.notify.set()
