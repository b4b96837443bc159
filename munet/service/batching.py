"""Server-side micro-batching across requests and tasks, with bounded, fair admission.

Requests wait in one queue per task. The collector takes the first, then keeps taking, one request
per task in turn (round robin), until the batch holds `max_batch_size` images or `max_delay_ms`
passed since the first arrived, and hands the batch to one inference thread. While that thread is
busy, the next batch fills: under load batches grow by themselves, and a lone request waits at most
`max_delay_ms`. A batch may mix tasks and path versions; `run_grouped` shares the modules their
paths have in common.

Admission is bounded: a request reserves its images before it is decoded, and is refused at once
(RESOURCE_EXHAUSTED / 429) when the server already holds `max_queue_images`, or its task holds
`max_task_queue_images`: a flood costs the server a refusal, not memory, and one hot task cannot
take the whole queue; round robin then keeps the others' latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from munet.errors import ResourceExhausted
from munet.service.runtime import ServedPath, run_grouped


@dataclass
class _Request:
    path: ServedPath
    x: np.ndarray
    future: asyncio.Future
    post: Callable[[np.ndarray], Any] | None = None  # runs on the inference thread, off the event loop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # its batch entered ONNX Runtime
    finished: float = 0.0  # ... and came out


def _run_batch(batch: list[_Request]) -> list[Any]:
    t0 = time.perf_counter()
    outs = run_grouped([(r.path, r.x) for r in batch])
    t1 = time.perf_counter()
    for r in batch:
        r.started, r.finished = t0, t1
    return [r.post(y) if r.post is not None else y for r, y in zip(batch, outs, strict=True)]


def _deliver(batch: list[_Request], outs: list[Any] | None, error: Exception | None,
             done: asyncio.Future) -> None:
    """On the loop: answer a batch's requests (or fail them all), then let the collector go on."""
    for i, r in enumerate(batch):
        if r.future.done():
            continue
        if error is not None:
            r.future.set_exception(error)
        else:
            r.future.set_result(outs[i])  # type: ignore[index]
    if not done.done():
        done.set_result(error is None)


class MicroBatcher:
    def __init__(self, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 on_batch: Callable[[int, int], None] | None = None, max_queue_images: int = 1024,
                 max_task_queue_images: int = 0):
        self.max_batch_size = max(1, max_batch_size)
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.on_batch = on_batch  # (images, tasks) per executed batch, for metrics
        self.max_queue_images = max(1, max_queue_images)
        # default: half the queue, and never less than a batch
        self.max_task_queue_images = max_task_queue_images or max(self.max_batch_size, self.max_queue_images // 2)
        self._queues: dict[str, deque[_Request]] = {}
        self._turns: deque[str] = deque()  # tasks with waiting requests, in the order they are served
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one inference thread, fed batches through a queue and answering with one loop callback per
        # batch (run_in_executor chains three futures and several callbacks per batch: profiled on
        # a single image's path)
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending_images = 0
        self._pending_by_task: dict[str, int] = {}
        self._last_batch_requests = 0

    @property
    def queue_depth(self) -> int:
        """Images admitted and not answered yet (decoding, waiting or running): the load signal
        evolution backs off on."""
        return self._pending_images

    def start(self) -> None:
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="munet-batcher")
        if self._thread is None:
            self._thread = threading.Thread(target=self._infer, name="munet-infer", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._thread is not None:
            self._batches.put(None)  # the batch running finishes; none is waiting (the collector is gone)
            self._thread = None

    def _infer(self) -> None:
        """The inference thread: runs one batch at a time and hands the answers back to the loop."""
        while True:
            item = self._batches.get()
            if item is None:
                return
            loop, batch, done = item
            try:
                outs, error = _run_batch(batch), None
            except Exception as e:  # noqa: BLE001 - the error belongs to the requests, not the thread
                outs, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed while the batch ran
                loop.call_soon_threadsafe(_deliver, batch, outs, error, done)

    # ---- admission ------------------------------------------------------------------------------

    def reserve(self, task: str, n: int) -> None:
        """Admit `n` images of `task` or refuse at once; every reserve is matched by a `release`."""
        if self._pending_images + n > self.max_queue_images:
            raise ResourceExhausted(f"the server is at capacity: {self._pending_images} images queued, "
                                    f"{n} more would pass max_queue_images={self.max_queue_images}; retry shortly")
        held = self._pending_by_task.get(task, 0)
        if held + n > self.max_task_queue_images:
            raise ResourceExhausted(f"task {task!r} has {held} images queued, {n} more would pass its share "
                                    f"max_task_queue_images={self.max_task_queue_images}; retry shortly")
        self._pending_images += n
        self._pending_by_task[task] = held + n

    def release(self, task: str, n: int) -> None:
        self._pending_images -= n
        left = self._pending_by_task.get(task, 0) - n
        if left > 0:
            self._pending_by_task[task] = left
        else:
            self._pending_by_task.pop(task, None)

    # ---- the queue ------------------------------------------------------------------------------

    def _put(self, req: _Request) -> None:
        q = self._queues.setdefault(req.path.task, deque())
        if not q:
            self._turns.append(req.path.task)
        q.append(req)
        assert self._arrived is not None
        self._arrived.set()

    def _take(self) -> _Request | None:
        """The next request in round-robin order over the tasks that have one waiting."""
        if not self._turns:
            return None
        task = self._turns.popleft()
        q = self._queues[task]
        req = q.popleft()
        if q:
            self._turns.append(task)  # its next request waits for the other tasks' turns
        else:
            del self._queues[task]
        return req

    async def _next(self) -> _Request:
        assert self._arrived is not None
        while True:
            req = self._take()
            if req is not None:
                return req
            self._arrived.clear()
            await self._arrived.wait()

    async def submit(self, path: ServedPath, x: np.ndarray, post: Callable[[np.ndarray], Any] | None = None,
                     reserved: bool = False, timing: dict[str, float] | None = None) -> Any:
        """The path's output for `x`, passed through `post` (on the inference thread) when given.

        `reserved`: the caller already reserved `len(x)` images for `path.task` (and this call
        releases them); otherwise they are reserved here (ResourceExhausted when full).
        `timing` receives "queue" (waiting for a batch to start) and "compute" (inside ONNX Runtime)
        in seconds, Triton's split of a request's time."""
        if self._task is None:
            self.start()
        if not reserved:
            self.reserve(path.task, len(x))
        try:
            loop = asyncio.get_running_loop()
            # large requests are split so one client cannot monopolise a batch beyond the limit
            if len(x) > self.max_batch_size:
                parts = []
                for i in range(0, len(x), self.max_batch_size):
                    part = _Request(path, x[i:i + self.max_batch_size], loop.create_future())
                    self._put(part)
                    parts.append(part)
                y = np.concatenate(await asyncio.gather(*(r.future for r in parts)))
                if timing is not None:
                    timing["queue"] = parts[0].started - parts[0].enqueued
                    timing["compute"] = sum(r.finished - r.started for r in parts)
                return post(y) if post is not None else y
            req = _Request(path, x, loop.create_future(), post)
            self._put(req)
            out = await req.future
            if timing is not None:
                timing["queue"], timing["compute"] = req.started - req.enqueued, req.finished - req.started
            return out
        finally:
            self.release(path.task, len(x))

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        carry: _Request | None = None
        while True:
            first = carry or await self._next()
            carry = None
            batch, n = [first], len(first.x)
            # wait for company only under load: a lone request on an idle server runs at once
            busy = self._last_batch_requests > 1 or bool(self._turns)
            deadline = first.enqueued + (self.max_delay if busy else 0.0)
            while n < self.max_batch_size:
                req = self._take()
                if req is None:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
                    continue
                if n + len(req.x) > self.max_batch_size:
                    carry = req
                    break
                batch.append(req)
                n += len(req.x)
            live = [r for r in batch if not r.future.cancelled()]
            if not live:
                continue
            done = loop.create_future()
            self._batches.put((loop, live, done))
            # the next batch fills while this one runs; its requests are answered by `_deliver`
            if not await done:
                continue
            self._last_batch_requests = len(live)
            if self.on_batch:
                self.on_batch(n, len({r.path.task for r in live}))
