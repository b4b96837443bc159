"""Shadow evaluation: a pending version answers a sample of live requests next to the served one,
off the request's critical path, and is scored on the labels that arrive while it waits.

What an operator sees before approving (GetTask.shadow, `munet_shadow_*` metrics): how often the
pending version agrees with the served one on live traffic, and the accuracy of both on the
examples labelled since the pending version was staged (AddExamples: corrections of live answers),
which neither version trained or was selected on.

Never on the critical path: the request's answer is computed and returned as usual; a sampled
request's model input is handed to one background thread through a small bounded queue, and dropped
(counted) when that thread is behind. Stats live in this process; they restart when the pending
version changes or the server restarts.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass

import numpy as np

from munet import metrics
from munet.service.runtime import ServedPath

log = logging.getLogger(__name__)


@dataclass
class ShadowStats:
    version: int
    requests: int = 0  # live requests it also answered
    images: int = 0
    agreements: int = 0  # images where its top-1 equals the served version's
    dropped: int = 0  # sampled requests skipped because the shadow thread was behind
    labelled: int = 0  # examples labelled since it was staged
    shadow_correct: int = 0
    incumbent_correct: int = 0

    def view(self) -> dict:
        return {"version": self.version, "requests": self.requests, "images": self.images,
                "agreement": self.agreements / self.images if self.images else 0.0, "dropped": self.dropped,
                "labelled_examples": self.labelled,
                "accuracy": self.shadow_correct / self.labelled if self.labelled else 0.0,
                "incumbent_accuracy": self.incumbent_correct / self.labelled if self.labelled else 0.0}


class Shadows:
    """task -> the version running in shadow (its ServedPath) and its stats."""

    def __init__(self, rate: float, max_queue: int = 8, seed: int = 0):
        self.rate = rate
        self._paths: dict[str, ServedPath] = {}
        self._stats: dict[str, ShadowStats] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._rng = random.Random(seed)
        self._thread: threading.Thread | None = None

    def set(self, path: ServedPath) -> None:
        with self._lock:
            old = self._paths.get(path.task)
            self._paths[path.task] = path
            if old is None or old.version != path.version:
                self._stats[path.task] = ShadowStats(path.version)
        log.info("task %s: v%d runs in shadow on %.0f%% of requests", path.task, path.version, 100 * self.rate)

    def clear(self, task: str, version: int | None = None) -> None:
        with self._lock:
            p = self._paths.get(task)
            if p is not None and (version is None or p.version == version):
                del self._paths[task]
                self._stats.pop(task, None)

    def get(self, task: str) -> ServedPath | None:
        return self._paths.get(task)

    def stats(self, task: str) -> dict | None:
        with self._lock:
            s = self._stats.get(task)
            return s.view() if s is not None else None

    # ---- live traffic -----------------------------------------------------------------------

    def maybe_sample(self, task: str, x: np.ndarray, served_logits: np.ndarray) -> None:
        """On the inference thread, after the answer is computed: hand a sample to the shadow thread."""
        shadow = self._paths.get(task)
        if shadow is None or self.rate <= 0 or self._rng.random() >= self.rate:
            return
        self._start()
        try:
            self._queue.put_nowait(("live", shadow, x, served_logits.argmax(1)))
        except queue.Full:
            with self._lock:
                if (s := self._stats.get(task)) is not None and s.version == shadow.version:
                    s.dropped += 1
            metrics.SHADOW_DROPPED.labels(task).inc()

    def labelled(self, task: str, current: ServedPath | None, x: np.ndarray, y: np.ndarray) -> None:
        """New labelled examples (model input `x`): score the shadow and the served version on them."""
        shadow = self._paths.get(task)
        if shadow is None or current is None or not len(y):
            return
        self._start()
        try:
            self._queue.put(("labels", shadow, x, y, current), timeout=5.0)  # rare and worth waiting for
        except queue.Full:
            log.warning("shadow evaluation of %d new labels of %s skipped: the shadow thread is behind", len(y), task)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="munet-shadow", daemon=True)
                    self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item[0] == "live":
                    _, shadow, x, served_top = item
                    agree = int((shadow.run(x).argmax(1) == served_top).sum())
                    with self._lock:
                        s = self._stats.get(shadow.task)
                        if s is None or s.version != shadow.version:
                            continue
                        s.requests += 1
                        s.images += len(x)
                        s.agreements += agree
                    metrics.SHADOW_IMAGES.labels(shadow.task).inc(len(x))
                    metrics.SHADOW_AGREEMENTS.labels(shadow.task).inc(agree)
                else:
                    _, shadow, x, y, current = item
                    right = [0, 0]
                    for i in range(0, len(y), 64):
                        xb, yb = x[i:i + 64], y[i:i + 64]
                        right[0] += int((shadow.run(xb).argmax(1) == yb).sum())
                        right[1] += int((current.run(xb).argmax(1) == yb).sum())
                    with self._lock:
                        s = self._stats.get(shadow.task)
                        if s is None or s.version != shadow.version:
                            continue
                        s.labelled += len(y)
                        s.shadow_correct += right[0]
                        s.incumbent_correct += right[1]
                    metrics.SHADOW_LABELLED.labels(shadow.task).inc(len(y))
                    metrics.SHADOW_CORRECT.labels(shadow.task, "shadow").inc(right[0])
                    metrics.SHADOW_CORRECT.labels(shadow.task, "incumbent").inc(right[1])
            except Exception:  # noqa: BLE001 - a shadow failure must never reach serving
                log.exception("shadow evaluation failed")
