"""Operators in control: promotion policies (auto, approve, frozen), Promote and Reject, rollbacks
that stay, a promotion margin, per-task evolution settings, and Predict by version."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
from grpc_fixtures import LoopThread, server_config

from munet import metrics
from munet.app import App
from munet.client import MunetClient, MunetClientError
from munet.data import images as imglib
from munet.data.splits import TRAIN
from munet.evolution.scoring import paired_margin, selection_bias_se
from munet.models.store import SCHEMA_VERSION, Store
from munet.service.core import Examples
from tests.conftest import evolve, register_digits

pytestmark = pytest.mark.slow

X = np.random.default_rng(7).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)  # six grayscale images


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = App.build(server_config(tmp_path_factory.mktemp("policies"), max_loaded_versions=2, shadow_rate=1.0))
    app.start()
    app.start_scheduler()
    loop = LoopThread()
    port = loop.run(app.start_grpc("127.0.0.1:0"))
    client = MunetClient(f"127.0.0.1:{port}", timeout=60.0, long_timeout=300.0)
    client.wait_ready(10.0)
    yield app, client
    client.close()
    loop.run(app.stop())
    loop.close()


def _code(fn) -> str:
    with pytest.raises(MunetClientError) as e:
        fn()
    return e.value.code


def _force(app: App, task: str) -> None:
    """Any candidate now beats the incumbent: its stored score drops to zero (scores are stored facts)."""
    app.store.update_path(task, app.store.get_task(task).current_version, score=0.0)


def _probs(c: MunetClient, task: str, version: int = 0) -> tuple[int, list]:
    r = c.predict(task, X, top_k=10, version=version)
    return r.version, [[(s.index, s.probability) for s in p] for p in r.predictions]


def test_a_frozen_task_is_never_evolved(server):
    app, c = server
    c.register_task("icy", builtin="uci_digits", max_examples=300, policy="frozen")
    assert c.get_task("icy").policy == "frozen"
    for _ in range(3):
        _force(app, "icy")
        assert _code(lambda: c.trigger_evolution("icy", wait=True)) == "FAILED_PRECONDITION"
        assert app.evolution.run("icy") is None  # what the periodic job would do if it picked it
        assert "icy" not in [app.evolution.pick_task() for _ in range(5)]
    assert [v.version for v in c.list_versions("icy").versions] == [1]
    t = c.set_task_policy("icy", "auto")
    assert t.policy == "auto"
    _force(app, "icy")
    assert c.trigger_evolution("icy", wait=True).triggered.promoted


def test_approve_keeps_the_winner_pending_until_an_operator_decides(server):
    app, c = server
    c.register_task("careful", builtin="uci_digits", max_examples=300, policy="approve")
    before = _probs(c, "careful")
    _force(app, "careful")
    rep = c.trigger_evolution("careful", wait=True).triggered
    assert rep.outcome == "pending" and not rep.promoted and rep.pending_version > 1, rep
    pending = rep.pending_version
    t = c.get_task("careful")
    assert t.current_version == 1 and t.pending_versions == [pending]
    assert _probs(c, "careful") == before  # still served by v1
    # the pending version was exported, checked and loaded: Predict can ask for it before approving
    assert app.core.runtime.cached_version("careful", pending, tuple(app.store.get_path("careful", pending).modules))
    v_new, answer = _probs(c, "careful", version=pending)
    assert v_new == pending
    status = {v.version: v for v in c.list_versions("careful").versions}[pending]
    assert status.status == "pending" and "margin" in status.decision, status
    t = c.promote("careful", pending)
    assert t.current_version == pending and t.pending_versions == []
    assert _probs(c, "careful") == (pending, answer)  # what it answered while pending, bit for bit
    # the next winner waits too; rejected, it can never serve
    _force(app, "careful")
    second = c.trigger_evolution("careful", wait=True).triggered.pending_version
    assert second > pending
    t = c.reject("careful", second, reason="not on my watch")
    assert t.current_version == pending and t.pending_versions == []
    v = {v.version: v for v in c.list_versions("careful").versions}[second]
    assert v.status == "rejected" and "not on my watch" in v.note
    assert _code(lambda: c.predict("careful", X, version=second)) == "FAILED_PRECONDITION"
    assert _code(lambda: c.promote("careful", second)) == "FAILED_PRECONDITION"
    assert _code(lambda: c.reject("careful", pending)) == "FAILED_PRECONDITION"  # it is serving


def test_a_rollback_freezes_the_task_unless_told_otherwise(server):
    app, c = server
    c.register_task("undo", builtin="uci_digits", max_examples=300)
    _force(app, "undo")
    assert c.trigger_evolution("undo", wait=True).triggered.promoted
    t = c.rollback("undo")
    assert t.current_version == 1 and t.policy == "frozen"
    _force(app, "undo")
    assert _code(lambda: c.trigger_evolution("undo", wait=True)) == "FAILED_PRECONDITION"
    assert c.get_task("undo").current_version == 1  # nothing undid it
    t = c.rollback("undo", version=1, policy="auto")
    assert t.policy == "auto"
    assert _code(lambda: c.rollback("undo", policy="sometimes")) == "INVALID_ARGUMENT"


def test_any_kept_version_answers_bit_identically_to_when_it_was_current(server):
    app, c = server
    c.register_task("history", builtin="uci_digits", max_examples=300)
    v1 = _probs(c, "history")
    answers = {1: v1}
    for _ in range(2):
        _force(app, "history")
        rep = c.trigger_evolution("history", wait=True).triggered
        assert rep.promoted
        answers[rep.promoted_version] = _probs(c, "history")
    loads = metrics.VERSION_LOADS.labels("history")._value.get()
    for version, answer in answers.items():
        assert _probs(c, "history", version=version) == answer
    assert _probs(c, "history", version=1) == v1  # now from the LRU
    assert metrics.VERSION_LOADS.labels("history")._value.get() == loads + len(answers) - 1  # current: no load
    assert len(app.core.runtime._versions) <= app.config.max_loaded_versions
    assert _code(lambda: c.predict("history", X, version=99)) == "NOT_FOUND"
    assert _code(lambda: c.predict("nobody", X, version=1)) == "NOT_FOUND"


def test_task_evolution_settings_override_the_servers(server):
    app, c = server
    c.register_task("tuned", builtin="uci_digits", max_examples=300)
    t = c.set_task_policy("tuned", candidates_per_generation=2, candidate_budget_seconds=1.5)
    assert t.policy == "auto" and t.evolution == {"candidates_per_generation": 2, "candidate_budget_seconds": 1.5}
    assert c.trigger_evolution("tuned", wait=True).triggered.candidates == 2  # the server's default is 1
    assert c.trigger_evolution("tuned", candidates=1, wait=True).triggered.candidates == 1  # the call's wins
    t = c.set_task_policy("tuned", candidates_per_generation=0, candidate_budget_seconds=0)
    assert t.evolution == {}
    assert _code(lambda: c.set_task_policy("tuned", scale_base=1.5)) == "INVALID_ARGUMENT"
    assert _code(lambda: c.set_task_policy("tuned", candidates_per_generation=10**6)) == "INVALID_ARGUMENT"
    assert _code(lambda: c.set_task_policy("tuned", "sometimes")) == "INVALID_ARGUMENT"
    assert _code(lambda: c.set_task_policy("nobody", "frozen")) == "NOT_FOUND"
    assert _code(lambda: c.register_task("bad", builtin="uci_digits", policy="sometimes")) == "INVALID_ARGUMENT"
    assert "bad" not in [t.name for t in c.list_tasks()]


def test_a_margin_keeps_noise_from_swapping_versions(make_app):
    app = make_app(promotion_min_margin=2.0, evolution_process=False)  # no score can clear it
    register_digits(app, "steady", max_examples=300)
    app.store.update_path("steady", 1, score=0.0)
    report = evolve(app, "steady", n_candidates=2)
    assert not report.promoted and report.outcome == "" and app.store.get_task("steady").current_version == 1
    kept = [v for v in app.store.list_versions("steady") if v.version > 1]
    assert kept and all("not promoted" in v.lineage["decision"] for v in kept)
    assert any("margin 2.0000" in v.lineage["decision"] for v in kept)
    # the default margin: one standard error of the paired difference of the two accuracies
    y = np.array([0, 1, 2, 3] * 25)
    inc = y.copy()
    cand = y.copy()
    inc[:10] = 9  # the incumbent is wrong on 10 images, the candidate on 4 others: 6 points better
    cand[50:54] = 9
    d = (cand == y).astype(float) - (inc == y)
    se = np.sqrt((np.sum(d * d) - np.sum(d) ** 2 / len(y)) / len(y)) / np.sqrt(len(y))
    m = paired_margin(inc, cand, y, 1.0, 0.0)
    assert m == pytest.approx(se) and 0.0 < m < 0.06  # so this candidate clears it
    assert paired_margin(y, y, y, 1.0, 0.0) == pytest.approx(0.01)  # identical answers: one image's worth
    assert paired_margin(inc, cand, y, 1.0, 0.5) == 0.5  # and never below the floor


def test_the_margin_is_the_winners_curse_of_the_candidates_compared(make_app):
    # E[max of k standard normals]: what choosing the best of k adds to validation noise
    assert selection_bias_se(1) == 0.0 and selection_bias_se(0) == 0.0
    assert selection_bias_se(2) == pytest.approx(1 / np.sqrt(np.pi), abs=1e-4)  # exact for two
    assert selection_bias_se(4) == pytest.approx(1.0294, abs=1e-3)  # the server's default: one SE
    draws = np.random.default_rng(0).standard_normal((200_000, 8)).max(axis=1).mean()
    assert selection_bias_se(8) == pytest.approx(draws, abs=0.01)
    # a lone candidate was chosen from nothing: only the floor stands between it and promotion
    app = make_app(promotion_min_margin=0.0123, evolution_process=False)
    register_digits(app, "lone", max_examples=300)
    app.store.update_path("lone", 1, score=0.0)
    report = evolve(app, "lone", n_candidates=1)
    assert report.promoted
    assert "+ margin 0.0123" in app.store.get_path("lone", report.promoted_version).lineage["decision"]


def test_a_store_of_schema_2_opens_with_every_task_on_auto(tmp_path):
    store = Store(tmp_path)
    store.create_task("old", ["a", "b"], {"kind": "builtin"}, policy="frozen")
    store.close()
    db = sqlite3.connect(tmp_path / "munet.db")
    db.execute("ALTER TABLE tasks DROP COLUMN policy")
    db.execute("ALTER TABLE tasks DROP COLUMN evolution")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.schema_version == SCHEMA_VERSION
    t = store.get_task("old")
    assert t.policy == "auto" and t.evolution == {}
    store.close()


def test_watch_task_streams_what_happens_to_a_task(server):
    app, c = server
    c.register_task("watched", builtin="uci_digits", max_examples=300, policy="approve")
    seen = []

    def watch() -> None:
        for e in c.watch_task("watched", since_id=1, timeout=120):  # replays from the first kept event
            seen.append(e)
            if e.kind == "rolled_back":
                break

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    _force(app, "watched")
    pending = c.trigger_evolution("watched", wait=True).triggered.pending_version
    c.promote("watched", pending)
    c.rollback("watched", policy="approve")
    t.join(30)
    assert not t.is_alive()
    assert [e.kind for e in seen] == ["registered", "generation_started", "pending", "generation_finished",
                                      "promoted", "rolled_back"]
    assert seen[2].version == pending and seen[2].detail["by"] == "evolution"
    assert seen[4].detail["by"] == "operator" and seen[5].version == 1 and seen[5].detail["policy"] == "approve"
    assert seen[3].detail["outcome"] == "pending"
    assert [e.id for e in seen] == sorted(e.id for e in seen)
    # a watcher of a deleted task is told, and its stream ends
    ends = []
    w = threading.Thread(target=lambda: ends.extend(c.watch_task("watched", since_id=seen[-1].id + 1, timeout=60)),
                         daemon=True)
    w.start()
    c.delete_task("watched")
    w.join(30)
    assert not w.is_alive() and [e.kind for e in ends] == ["deleted"]
    assert _code(lambda: list(c.watch_task("nobody", timeout=5))) == "NOT_FOUND"


def _until(cond, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return v


def test_a_pending_version_runs_in_shadow_on_live_requests_and_new_labels(server):
    app, c = server
    c.register_task("shadowed", builtin="uci_digits", max_examples=300, policy="approve")
    assert c.get_task("shadowed").shadow is None
    _force(app, "shadowed")
    pending = c.trigger_evolution("shadowed", wait=True).triggered.pending_version
    served = [c.predict("shadowed", X).predictions for _ in range(5)]
    assert all(p == served[0] for p in served)  # answered by v1 as before, whatever the shadow does
    st = _until(lambda: (s := c.get_task("shadowed").shadow) and s["images"] >= 5 * len(X) and s)
    assert st["version"] == pending and st["requests"] >= 5 and 0.0 <= st["agreement"] <= 1.0
    # what the shadow's agreement should be, computed here from both versions' own answers
    mine = np.mean([a[0].index == b[0].index for a, b in zip(c.predict("shadowed", X, version=pending).predictions,
                                                              served[0], strict=True)])
    assert st["agreement"] == pytest.approx(mine)
    # labels that arrive while it is pending score both versions
    ys = [p[0].index for p in c.predict("shadowed", X).predictions]  # the incumbent is right on all of them
    c.add_examples("shadowed", X, ys)
    st = _until(lambda: (s := c.get_task("shadowed").shadow) and s["labelled_examples"] == len(X) and s)
    assert st["incumbent_accuracy"] == 1.0 and st["accuracy"] == pytest.approx(mine)
    c.promote("shadowed", pending)
    assert c.get_task("shadowed").shadow is None


def test_auto_does_not_promote_a_winner_that_is_worse_on_labels_that_arrived_meanwhile(make_app):
    app = make_app(evolution_process=False)
    register_digits(app, "fresh", max_examples=300)
    app.store.update_path("fresh", 1, score=0.0)  # any candidate wins on validation
    noise = np.random.default_rng(3).integers(0, 256, (60, 8, 8), dtype=np.uint8)
    _, logits = app.core.predict_sync("fresh", noise)
    done = []

    def label_during_training() -> bool:
        if not done:  # corrections arrive while the candidate trains: the incumbent is right on all
            done.append(True)
            x = imglib.batch_to_rgb(noise, app.store.get_task("fresh").image_size)
            app.core.add_examples("fresh", Examples(x, logits.argmax(1), np.full(len(x), TRAIN, np.int8)))
        return False

    app.evolution.evolver.should_pause = label_during_training
    report = evolve(app, "fresh", n_candidates=1)
    assert done and not report.promoted and "labelled during the generation" in report.error, report
    assert app.store.get_task("fresh").current_version == 1
