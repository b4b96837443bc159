"""Serving is isolated from evolution: generations train in a separate, lower-priority process that
meets the server through the store, pauses when serving is busy, and can die without harming it."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from munet import metrics
from tests.conftest import register_digits, wait_until


def _wait(cond, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _background_generation(app, task: str, **kw):
    out: dict = {}

    def run() -> None:
        out["report"] = app.evolution.run(task, **kw)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture
def evolving(make_app):
    app = make_app()
    register_digits(app, "digits", max_examples=400)
    app.start_scheduler()
    return app


def test_a_generation_trains_and_promotes_in_a_niced_child_process(evolving):
    app = evolving
    app.store.update_path("digits", 1, score=0.0)  # any candidate now wins
    before = metrics.GENERATIONS.labels("digits")._value.get()
    report = app.evolution.run("digits", candidates=1)
    pid = app.evolution.worker.pid
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    assert report.error == "" and report.promoted, report.summary()
    # the worker published to the store; the server follows it and swaps the version in, its sessions
    # from the ONNX files the worker exported
    stored = app.store.get_task("digits").current_version
    assert stored == report.promoted_version
    wait_until(lambda: app.core.runtime.get("digits").version == stored, what="the server to follow the store")
    assert app.core.predict_sync("digits", np.zeros((2, 8, 8), np.uint8))[1].shape == (2, 10)
    # metrics of the generation are recorded where they are scraped: in the server
    assert metrics.GENERATIONS.labels("digits")._value.get() == before + 1
    # the worker lives on, keeping its state (offspring counts, cached prefixes) between generations
    assert app.evolution.run("digits", candidates=1).generation == 2
    assert app.evolution.worker.pid == pid


def test_the_worker_pauses_while_serving_is_busy(evolving):
    app = evolving
    load = {"queued": 10_000}
    app.evolution.load_signal = lambda: load["queued"]
    t, out = _background_generation(app, "digits", candidates=1)
    _wait(lambda: app.evolution.worker.paused, what="the worker to pause")  # its own report, not ours
    time.sleep(1.0)
    assert app.evolution.candidates_done == 0 and app.evolution.running
    load["queued"] = 0
    t.join(120)
    assert not t.is_alive() and out["report"].error == "" and len(out["report"].candidates) == 1
    assert not app.evolution.worker.paused


def test_a_worker_killed_mid_generation_harms_nothing_and_is_replaced(evolving):
    app = evolving
    served = app.core.runtime.get("digits").version
    t, out = _background_generation(app, "digits", candidates=4, budget_s=60.0)
    _wait(lambda: app.evolution.worker.pid is not None and app.evolution.running, what="the generation")
    time.sleep(1.0)
    os.kill(app.evolution.worker.pid, signal.SIGKILL)
    t.join(60)
    assert "exited" in out["report"].error or "lost" in out["report"].error, out["report"].summary()
    assert app.core.runtime.get("digits").version == served  # still serving, unchanged
    assert app.core.predict_sync("digits", np.zeros((1, 8, 8), np.uint8))[1].shape == (1, 10)
    assert app.evolution.run("digits", candidates=1).error == ""  # a new worker took over


def test_shutdown_stops_the_worker_even_mid_generation(evolving):
    app = evolving
    t, _ = _background_generation(app, "digits", candidates=8, budget_s=60.0)
    _wait(lambda: app.evolution.worker.pid is not None and app.evolution.candidates_total, what="the generation")
    pid = app.evolution.worker.pid
    t0 = time.monotonic()
    app.evolution.shutdown()
    t.join(30)
    assert not t.is_alive() and time.monotonic() - t0 < 20
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
