"""Servers follow the store: two apps on one store stand for two server processes (each has its own
connection, runtime and follower thread)."""

from __future__ import annotations

import numpy as np

from munet import metrics
from tests.conftest import evolve, register_digits, wait_until


def _x() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)


def test_a_version_published_elsewhere_is_followed_and_a_failed_load_keeps_the_old_one(make_app, tmp_path,
                                                                                    monkeypatch):
    home = tmp_path / "store"
    leader = make_app(home=home, evolution_process=False)
    register_digits(leader, "t", max_examples=300)
    follower = make_app(home=home, evolution_process=False)
    assert follower.core.runtime.get("t").version == 1  # served from the store at start

    # the follower cannot load the next version: it keeps serving v1, says so, and retries later
    real_prepare = follower.core.runtime.prepare

    def broken(rec, *a, **kw):
        if rec.version > 1:
            raise OSError("disk on fire")
        return real_prepare(rec, *a, **kw)

    monkeypatch.setattr(follower.core.runtime, "prepare", broken)
    monkeypatch.setattr(follower.core, "LOAD_RETRY_S", 0.5)
    failures = metrics.FOLLOW_FAILURES.labels("t")._value.get()
    leader.store.update_path("t", 1, score=0.0)  # any candidate now wins
    report = evolve(leader, "t", n_candidates=1)
    assert report.promoted, report.error
    wait_until(lambda: metrics.FOLLOW_FAILURES.labels("t")._value.get() > failures, what="the failed load")
    assert follower.core.runtime.get("t").version == 1
    _, out = follower.core.predict_sync("t", _x())  # still answering, with v1
    assert out.shape == (3, 10)
    events = [e for e in follower.store.events(task="t") if e["kind"] == "failed"]
    assert events and events[-1]["detail"]["stage"] == "load" and "disk on fire" in events[-1]["detail"]["error"]

    monkeypatch.setattr(follower.core.runtime, "prepare", real_prepare)  # the disk recovers
    wait_until(lambda: follower.core.runtime.get("t").version == report.promoted_version, what="the retry")
    _, a = leader.core.predict_sync("t", _x())
    _, b = follower.core.predict_sync("t", _x())
    assert np.array_equal(a, b)  # the same version answers bit-identically on both

    # a deletion through one server stops the other serving the task
    follower.core.delete_task("t")
    wait_until(lambda: leader.core.runtime.get("t") is None, what="the leader to drop the deleted task")


def test_a_task_deleted_while_a_server_loads_it_is_not_a_failed_load(make_app, monkeypatch):
    app = make_app(evolution_process=False)
    register_digits(app, "brief", max_examples=300)
    core = app.core
    seen = app.store.get_task("brief")
    failures = metrics.FOLLOW_FAILURES.labels("brief")._value.get()
    core.delete_task("brief")
    core._follow_version(seen)  # the sync read the task before the deletion, loads after it
    assert metrics.FOLLOW_FAILURES.labels("brief")._value.get() == failures
    assert not any(e["kind"] == "failed" for e in app.store.events(task="brief"))
    assert ("brief", seen.current_version) not in core._load_failures
    # a sync that meets the deletion half-way drops the task and reports nothing
    monkeypatch.setattr(app.store, "list_tasks", lambda: [seen])
    core.sync_from_store()
    assert core.runtime.get("brief") is None


def test_only_one_app_leads_and_a_clean_stop_hands_the_lease_over_at_once(make_app, tmp_path):
    home = tmp_path / "store"
    first = make_app(home=home, leader_lease_s=30.0)
    first.start_scheduler()
    second = make_app(home=home, leader_lease_s=30.0)
    second.start_scheduler()
    assert first.evolution.leading and not second.evolution.leading
    assert first.store.lease("evolution")["holder"] == first.leadership.holder
    first.close()  # releases the lease: no need to wait 30 s for it to expire
    assert second.leadership.try_once() and second.evolution.leading
