"""The model's own thread: takes requests from a queue, batches them continuously, hands events back.

HTTP handlers (on the server's event loop) submit a ``Job`` and read its events from an asyncio queue;
the worker owns the model and is the only thread that touches it. Each loop admits waiting jobs while
the batch has room, drops cancelled ones and decodes one token for all, so a new request waits at
most one prefill + one step for a free slot and never for another request to finish.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.batch import DecodeBatch
from ..core.request import Request, StreamEvent

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A request plus the channel its events go back on (``None`` after the last event)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def deliver(self, item: StreamEvent | Exception | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class BusyError(Exception):
    """The queue is full; the client should retry later (HTTP 503)."""


class Worker:
    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 decoder: Any = None) -> None:
        self.batch = DecodeBatch(model, prefill_chunk, decoder)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mamba-moe-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def load(self) -> int:
        return self.inbox.qsize() + len(self.batch)

    def submit(self, job: Job) -> None:
        if self.load >= self.max_queue:
            raise BusyError(f"server busy: {self.load} requests queued or running (limit {self.max_queue})")
        self.inbox.put(job)

    # ---- the thread --------------------------------------------------------------------------------
    def _admit(self) -> list[Job]:
        new: list[Job] = []
        room = self.max_batch - len(self.batch)
        while len(new) < room:
            try:
                job = self.inbox.get(timeout=0.05) if not new and not len(self.batch) else self.inbox.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                job.deliver(None)
                continue
            new.append(job)
        return new

    def _dispatch(self, events: list[StreamEvent]) -> None:
        for event in events:
            job = self.jobs.get(event.request_id)
            if job is None:
                continue
            job.deliver(event)
            if event.finish_reason is not None:
                job.deliver(None)
                del self.jobs[event.request_id]

    def _fail_all(self, err: Exception) -> None:
        log.exception("generation failed; failing %d requests", len(self.jobs))
        for job in self.jobs.values():
            job.deliver(err)
            job.deliver(None)
        self.jobs.clear()
        self.batch.rows, self.batch.cache = [], None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                new = self._admit()
                if new:
                    for job in new:
                        self.jobs[job.request.request_id] = job
                    self._dispatch(self.batch.add([job.request for job in new]))
                cancelled = {rid for rid, job in self.jobs.items() if job.cancelled.is_set()}
                if cancelled:
                    self._dispatch(self.batch.cancel(cancelled))
                self._dispatch(self.batch.step())
            except Exception as err:  # keep serving: one bad batch must not kill the server
                self._fail_all(err)
            time.sleep(0)  # hand the GIL to the HTTP thread between steps, so new requests get in
