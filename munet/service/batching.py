"""Server-side micro-batching across requests and tasks.

Requests wait in one queue. The collector takes the first, then keeps taking until the batch holds
`max_batch_size` images or `max_delay_ms` passed since the first arrived, and hands the batch to one
inference thread. While that thread is busy, the next batch fills: under load batches grow by
themselves, and a lone request waits at most `max_delay_ms`. A batch may mix tasks and path
versions; `run_grouped` shares the modules their paths have in common.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from munet.service.runtime import ServedPath, run_grouped


@dataclass
class _Request:
    path: ServedPath
    x: np.ndarray
    future: asyncio.Future
    post: Callable[[np.ndarray], Any] | None = None  # runs on the inference thread, off the event loop
    enqueued: float = field(default_factory=time.perf_counter)


def _run_batch(batch: list[_Request]) -> list[Any]:
    outs = run_grouped([(r.path, r.x) for r in batch])
    return [r.post(y) if r.post is not None else y for r, y in zip(batch, outs, strict=True)]


class MicroBatcher:
    def __init__(self, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 on_batch: Callable[[int, int], None] | None = None):
        self.max_batch_size = max(1, max_batch_size)
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.on_batch = on_batch  # (images, tasks) per executed batch, for metrics
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="munet-infer")
        self._pending_images = 0
        self._last_batch_requests = 0

    @property
    def queue_depth(self) -> int:
        """Images waiting or running: the load signal evolution backs off on."""
        return self._pending_images

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="munet-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, path: ServedPath, x: np.ndarray, post: Callable[[np.ndarray], Any] | None = None) -> Any:
        """The path's output for `x`, passed through `post` (on the inference thread) when given."""
        if self._task is None:
            self.start()
        assert self._queue is not None
        fut = asyncio.get_running_loop().create_future()
        self._pending_images += len(x)
        # large requests are split so one client cannot monopolise a batch beyond the limit
        if len(x) > self.max_batch_size:
            parts = [x[i:i + self.max_batch_size] for i in range(0, len(x), self.max_batch_size)]
            futs = []
            for p in parts:
                f = asyncio.get_running_loop().create_future()
                self._queue.put_nowait(_Request(path, p, f))
                futs.append(f)
            try:
                outs = await asyncio.gather(*futs)
            finally:
                self._pending_images -= len(x)
            y = np.concatenate(outs)
            return post(y) if post is not None else y
        self._queue.put_nowait(_Request(path, x, fut, post))
        try:
            return await fut
        finally:
            self._pending_images -= len(x)

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Request | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            batch, n = [first], len(first.x)
            # wait for company only under load: a lone request on an idle server runs at once
            busy = self._last_batch_requests > 1 or not self._queue.empty()
            deadline = first.enqueued + (self.max_delay if busy else 0.0)
            while n < self.max_batch_size:
                try:
                    req = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        req = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if n + len(req.x) > self.max_batch_size:
                    carry = req
                    break
                batch.append(req)
                n += len(req.x)
            live = [r for r in batch if not r.future.cancelled()]
            if not live:
                continue
            try:
                outs = await loop.run_in_executor(self._executor, _run_batch, live)
            except Exception as e:  # noqa: BLE001 - the error belongs to the requests, not the loop
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            self._last_batch_requests = len(live)
            if self.on_batch:
                self.on_batch(n, len({r.path.task for r in live}))
            for r, y in zip(live, outs, strict=True):
                if not r.future.done():
                    r.future.set_result(y)
