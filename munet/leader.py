"""Which server process leads evolution: the holder of the store's "evolution" lease.

Every server serves (each follows the store); exactly one also runs the scheduler and the evolution
worker. The lease is a row in the store, renewed every third of `leader_lease_s`; a leader that dies
(or stalls past its lease) is replaced by the next server that tries within one lease length. The
store's transaction makes sure two servers never both hold it; a leader that finds it lost the lease
stops evolving at once (its worker is stopped; a flip it was about to make is checked against the
generation's Expectation in the store, so a stale leader cannot overwrite a newer version).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from munet import metrics
from munet.models.store import Store

log = logging.getLogger(__name__)

LEASE = "evolution"


class Leadership:
    def __init__(self, store: Store, lease_s: float, on_gain: Callable[[], None], on_loss: Callable[[], None],
                 info: dict | None = None):
        self.store = store
        self.lease_s = lease_s
        self.on_gain, self.on_loss = on_gain, on_loss
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), **(info or {})}
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def current(self) -> dict | None:
        """The lease as stored: holder, info (host, pid, addresses), seconds left; None when free."""
        return self.store.lease(LEASE)

    def try_once(self) -> bool:
        """Take or renew the lease; start or stop leading accordingly. Returns whether we lead."""
        with self._lock:
            try:
                ok = self.store.acquire_lease(LEASE, self.holder, self.lease_s, self.info)
            except Exception as e:  # noqa: BLE001 - a store we cannot reach: we cannot know we still lead
                log.error("could not renew the evolution lease: %s", e)
                ok = False
            if ok and not self.leading:
                self.leading = True
                metrics.LEADER.set(1)
                log.info("this server (%s) now leads evolution", self.holder)
                self.on_gain()
            elif not ok and self.leading:
                self.leading = False
                metrics.LEADER.set(0)
                log.warning("this server (%s) lost the evolution lease; stopping evolution", self.holder)
                self.on_loss()
            return ok

    def start(self) -> None:
        """Try now, then keep trying (as a follower) or renewing (as the leader) in the background."""
        self.try_once()

        def loop() -> None:
            while not self._stop.wait(self.lease_s / 3):
                self.try_once()

        self._thread = threading.Thread(target=loop, name="munet-leadership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop evolving and hand the lease back at once, so another server need not wait it out."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_s)
        with self._lock:
            if self.leading:
                self.leading = False
                metrics.LEADER.set(0)
                self.on_loss()
            try:  # held or not (App.start may have taken it before the loop ran): a no-op if not ours
                self.store.release_lease(LEASE, self.holder)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the evolution lease: %s", e)
