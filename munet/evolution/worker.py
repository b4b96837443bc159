"""Generations in a separate, lower-priority process, so training never stalls Predict.

In the serving process, training competes with request handling for the GIL and the cores: torch's
Python-side work, ONNX export and parity checks each hold the interpreter for milliseconds at a
time (measured: Predict p99 2.4x its idle value during a generation, with training on one thread).
The worker is a child process (`python -m munet.evolution.worker`: forking a process that runs gRPC
threads is unsafe), niced below the server, that keeps its Evolver (prefix cache, offspring counts) between
generations. The two processes meet through the store, as the rest of munet does, plus a pipe:

    server -> worker   ("config", Config) first, then ("run", task, candidates, budget_s)
                       | ("busy", bool) | ("stop",) | ("exit",)
    worker -> server   ("progress", done, total) | ("paused", bool)
                       | ("report", GenerationReport) | ("stopped",) | ("not_found" | "frozen" | "failed", msg)

The worker publishes its winners itself (evolution/promotion.py: export, parity, the pointer flip in
the store with the generation's Expectation); the server, like every serving process, follows the
store and loads what changed. Load-shedding still works across the boundary: the server sends
"busy" when its queue passes `pause_queue_depth` and the worker's training loop pauses between steps
until it hears otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from munet.config import Config
from munet.errors import NotFound
from munet.evolution.generation import Frozen, GenerationReport, Stopped

log = logging.getLogger("munet.evolution.worker")  # also when run as __main__

_POLL_S = 0.02  # how often the server refreshes the busy flag while a generation runs


class WorkerFailed(RuntimeError):
    """The worker died or could not run the generation."""


class EvolutionWorker:
    """Server side: starts the worker on first use, runs generations in it.

    Not thread-safe by itself: the scheduler runs one generation at a time (its run lock)."""

    def __init__(self, config: Config):
        self.config = config
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # close() may write while a generation's thread does
        self.paused = False  # the worker's own word: its training loop is waiting for serving load to drop

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _ensure_started(self) -> tuple[subprocess.Popen, Connection]:
        if self._proc is not None and self._conn is not None and self._proc.poll() is None:
            return self._proc, self._conn
        self._discard()
        # a plain subprocess, not multiprocessing's spawn: spawn re-imports the parent's __main__,
        # which breaks any embedding script without a main guard
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "munet.evolution.worker", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        self._send(conn, ("config", self.config))
        self._proc, self._conn = proc, conn
        log.info("evolution worker started (pid %d, nice +%d)", proc.pid, self.config.evolution_nice)
        return proc, conn

    def _send(self, conn: Connection, msg: tuple) -> None:
        with self._send_lock:
            conn.send(msg)

    def _discard(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def run_generation(self, task: str, n_candidates: int | None, budget_s: float | None,
                       progress: Callable[[int, int], None] | None,
                       should_pause: Callable[[], bool]) -> GenerationReport:
        """Run one generation in the worker; `should_pause` raises Stopped on shutdown."""
        with self._lock:
            proc, conn = self._ensure_started()
            busy = False
            try:
                self._send(conn, ("run", task, n_candidates, budget_s))
                while True:
                    try:
                        now = should_pause()
                    except Stopped:
                        self._send(conn, ("stop",))  # the worker stops at its next training step
                        raise
                    if now != busy:
                        busy = now
                        self._send(conn, ("busy", busy))
                    if not conn.poll(_POLL_S):
                        if proc.poll() is not None:
                            self._discard()
                            raise WorkerFailed(f"the evolution worker exited (code {proc.returncode}) "
                                               "during the generation")
                        continue
                    msg = conn.recv()
                    kind = msg[0]
                    if kind == "progress":
                        if progress:
                            progress(msg[1], msg[2])
                    elif kind == "paused":
                        self.paused = msg[1]
                    elif kind == "report":
                        return msg[1]
                    elif kind == "stopped":
                        raise Stopped()
                    elif kind == "not_found":
                        raise NotFound(msg[1])
                    elif kind == "frozen":
                        raise Frozen(msg[1])
                    else:
                        raise WorkerFailed(msg[1])
            except (EOFError, OSError) as e:
                self._discard()
                raise WorkerFailed(f"lost the evolution worker: {e}") from None
            finally:
                self.paused = False
                if busy and self._conn is conn:
                    with contextlib.suppress(OSError):
                        self._send(conn, ("busy", False))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: at its next training step if a generation runs, else at once."""
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(conn, ("stop",))
            self._send(conn, ("exit",))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the evolution worker did not stop in %.0f s; killing it", timeout)
        if self._lock.acquire(timeout=timeout):
            try:
                self._discard()
            finally:
                self._lock.release()
        else:
            with contextlib.suppress(OSError):
                proc.kill()


# ---- the worker process ---------------------------------------------------------------------------


class _Inbox:
    """The worker's side of the socket: one reader thread applies control messages at once ("busy",
    "stop") and queues the rest (runs) for the generation's thread."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.busy = False
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="munet-evolution-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.stop.set()
                self.queue.put(("exit",))  # the server is gone
                return
            if msg[0] == "busy":
                self.busy = bool(msg[1])
            elif msg[0] == "stop":
                self.stop.set()
            else:
                self.queue.put(msg)

    def get(self) -> tuple:
        return self.queue.get()


def worker_main(fd: int) -> None:
    from munet.lifecycle import die_with_parent, setup_logging

    setup_logging()
    die_with_parent()
    conn = Connection(fd)
    kind, config = conn.recv()
    assert kind == "config", kind
    lower_priority(config)
    from munet.evolution.generation import Evolver
    from munet.models.store import open_store

    inbox = _Inbox(conn)
    store = open_store(config)  # the same backend as its server: the config came from it

    paused = [False]

    def should_pause() -> bool:
        if inbox.stop.is_set():
            raise Stopped()
        if inbox.busy != paused[0]:
            paused[0] = inbox.busy
            conn.send(("paused", paused[0]))
        return paused[0]

    evolver = Evolver(config, store, should_pause=should_pause)
    try:
        while True:
            msg = inbox.get()
            if msg[0] == "exit":
                return
            _, task, n, budget = msg
            paused[0] = False
            try:
                report = evolver.run_generation(task, n, budget,
                                                progress=lambda d, t: conn.send(("progress", d, t)))
                conn.send(("report", report))
            except Stopped:
                with contextlib.suppress(OSError):
                    conn.send(("stopped",))
                return
            except Frozen as e:
                conn.send(("frozen", e.message))
            except NotFound as e:
                conn.send(("not_found", e.message))
            except Exception as e:  # noqa: BLE001 - the server records it as the generation's error
                log.exception("generation for %s failed in the worker", task)
                conn.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        store.close()


def lower_priority(config: Config) -> None:
    """Below serving on the CPU, for this thread and every thread it starts later (torch, ONNX Runtime).

    Niceness alone is not enough: measured with nice +10, Predict p99 during a generation was 5x its
    idle value, because the kernel lets a running niced task finish its slice before a waking server
    thread gets the core, and ONNX Runtime's intra-op threads wait for each other at every operator.
    SCHED_IDLE tasks are preempted as soon as a normal task wakes up."""
    try:
        os.nice(config.evolution_nice)
    except OSError as e:
        log.warning("could not lower the evolution worker's priority: %s", e)
    if config.evolution_sched_idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:
            log.warning("could not give the evolution worker the idle scheduling class: %s", e)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
