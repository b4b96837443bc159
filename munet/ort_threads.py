"""ONNX Runtime's threads for every session this process makes: one shared pool, or a pool each.

A server runs every session on one process-wide intra-op pool (`shared_thread_pool`), whose workers
spin briefly for the next operator instead of sleeping. With a pool per session spinning must be
off (the idle sessions of a chain spin against the busy one: 2.5x slower on 2 cores, and training
starves), so each of the ~60 parallel operators of a MobileNetV2 pass wakes its workers from sleep.
`munet bench thread-pool` (README, serving), one 96 px image in a tight loop: 1.67 ms on a path's
joined session and 2.16 ms on its chain of 20 sessions with a pool each; 1.13 and 1.63 ms shared.
The price: under light traffic a worker spins through the gaps (1.06 CPU-seconds per second at 50
images/s against 0.23), which `shared_thread_pool=false` gives back to training.

Once the shared pool exists, ONNX Runtime refuses any session of the process that asks for a pool of
its own, so every session is made from `session_options`.
"""

from __future__ import annotations

import logging
import threading

import onnxruntime as ort

log = logging.getLogger(__name__)

_pool: dict[str, int] = {}  # "threads": the shared pool's size (0: ORT's default); -1: it cannot be made
_lock = threading.Lock()


def shared_thread_pool(threads: int = 0) -> bool:
    """Make the process's shared intra-op pool (once); False where this ONNX Runtime cannot.

    The pool is the process's: the size first asked for is the one every later session gets."""
    with _lock:
        if "threads" not in _pool:
            try:
                from onnxruntime.capi import _pybind_state  # the Python binding's only door to global pools

                _pybind_state.set_global_thread_pool_sizes(int(threads), 1)
                _pool["threads"] = int(threads)
                log.info("ONNX Runtime sessions share one intra-op thread pool (%s threads)", threads or "default")
            except Exception as e:  # noqa: BLE001 - another build: sessions keep a pool each
                log.warning("ONNX Runtime's shared thread pool is unavailable (%s); each session gets its own", e)
                _pool["threads"] = -1
        elif _pool["threads"] >= 0 and _pool["threads"] != int(threads):
            log.warning("this process's shared ONNX Runtime pool has %s threads; %s asked for now is ignored",
                        _pool["threads"] or "default", threads or "default")
        return _pool["threads"] >= 0


def shared() -> bool:
    """Whether this process's sessions run on the shared pool."""
    return _pool.get("threads", -1) >= 0


def session_options(threads: int = 0) -> ort.SessionOptions:
    """What every session of this process starts from: the shared pool when the process has one,
    else `threads` of its own (0: ORT's default) that sleep between operators."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if shared():
        so.use_per_session_threads = False
        return so
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so
