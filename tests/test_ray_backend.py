"""evolution_backend=ray on a local Ray instance: candidates train as Ray tasks, in Ray's worker
processes, and the generation goes on as with the local backend; failures stay the candidate's."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from conftest import evolve, fast_config, register_digits

from munet.app import App
from munet.config import Config, ConfigError
from munet.evolution import ray_backend
from munet.evolution.generation import Evolver
from munet.models.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    """A server whose evolution trains on a Ray instance it starts on this machine (ray_address local),
    with one registered task; Ray is stopped after the module."""
    home = tmp_path_factory.mktemp("ray") / "home"
    app = App.build(fast_config(home, evolution_backend="ray", ray_address="local"))
    app.start()
    register_digits(app, "digits")
    yield app
    app.close()
    ray_backend.disconnect()


def _record(monkeypatch, evolver: Evolver, corrupt: int | None = None) -> list:
    """The trainer's outcomes as they come back; with `corrupt`, that job gets a learning rate that
    is not a number, so its training raises (inside Ray, when it trains there)."""
    seen = []
    train = evolver.trainer.train

    def recording(jobs, settings, done, should_pause=None):
        if corrupt is not None:
            jobs[corrupt].hparams = {**jobs[corrupt].hparams, "opt_lr": "not a number"}
        return train(jobs, settings, lambda i, out: (seen.append((i, out)), done(i, out)), should_pause)

    monkeypatch.setattr(evolver.trainer, "train", recording)
    return seen


def test_ray_trains_what_local_trains_and_a_candidate_that_raises_fails_alone(ray_app, tmp_path, monkeypatch):
    # the same store twice: one generation on Ray, the same generation (same seed, same draws) locally;
    # in both, the second candidate's training raises (a learning rate that is not a number)
    local_home = tmp_path / "local"
    shutil.copytree(ray_app.config.home, local_home)
    local_store = Store(local_home)
    for store in (ray_app.store, local_store):  # any candidate beats the incumbent: a promotion follows
        store.update_path("digits", store.get_path("digits").version, score=0.0)
    local_evolver = Evolver(fast_config(local_home), local_store)
    seen = {"ray": _record(monkeypatch, ray_app.evolution.evolver, corrupt=1),
            "local": _record(monkeypatch, local_evolver, corrupt=1)}

    on_ray = evolve(ray_app, "digits")
    local = local_evolver.run_generation("digits")
    local_modules = local_store.get_path("digits").modules
    local_store.close()

    # trained in Ray's worker processes, not in this one; the failure too, and it says where
    assert len(seen["ray"]) == len(on_ray.candidates) == 2
    for _, out in seen["ray"]:
        assert out.worker.startswith("ray pid ") and int(out.worker.split()[2]) != os.getpid()
    assert all(out.worker == f"local pid {os.getpid()}" for _, out in seen["local"])
    # the candidate that raised failed alone, as that candidate's error, not the generation's
    trained, failed = on_ray.candidates
    assert failed.error.startswith("ValueError") and "not a number" in failed.error
    assert not failed.survived and failed.version is None and failed.score == 0.0
    assert trained.error == "" and trained.steps == ray_app.config.candidate_max_steps
    assert on_ray.error == "" and on_ray.promoted and on_ray.best_score == trained.score
    # Ray changes where candidates train, not what they become
    def summary(r):
        return [(c.mutations, c.steps, c.validation_accuracy, c.score, c.survived, c.error) for c in r.candidates]

    assert summary(on_ray) == summary(local)
    assert (on_ray.promoted, on_ray.promoted_version, on_ray.best_score) == \
        (local.promoted, local.promoted_version, local.best_score)
    # the leader published the weights trained on Ray: the served version's modules are stored, load,
    # and are those local training made (module ids are content hashes of the weights)
    current = ray_app.store.get_path("digits")
    assert current.version == on_ray.promoted_version
    assert current.modules == local_modules
    for m in current.modules:
        assert ray_app.store.load_module(m) is not None
    assert ray_app.core.runtime.get("digits").version == on_ray.promoted_version


def test_ray_tasks_wait_while_serving_is_busy(ray_app, monkeypatch):
    evolver = ray_app.evolution.evolver
    pause_s, finished = 6.0, []
    train = evolver.trainer.train

    def timed(jobs, settings, done, should_pause=None):
        t0 = time.monotonic()
        busy_until = t0 + pause_s  # serving is busy for the first seconds of the training phase

        def record(i, out):
            finished.append((time.monotonic() - t0, out))
            done(i, out)

        return train(jobs, settings, record, lambda: should_pause() or time.monotonic() < busy_until)

    monkeypatch.setattr(evolver.trainer, "train", timed)
    report = evolve(ray_app, "digits")
    assert len(finished) == len(report.candidates) == 2
    for at, out in finished:  # none trained before serving calmed down (paused time is not training time)
        assert out.error == "" and at - out.result.seconds >= pause_s, (at, out.result.seconds)


def test_an_unreachable_ray_cluster_is_one_clear_error(ray_app):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    evolver = Evolver(ray_app.config.replace(ray_address=f"127.0.0.1:{port}"), ray_app.store)
    with pytest.raises(ray_backend.RayUnavailable, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        evolver.run_generation("digits")
    with pytest.raises(ray_backend.RayUnavailable, match="not host:port"):
        ray_backend.probe("no-port-here")


def test_a_listener_that_is_not_a_ray_head_is_refused_quickly(monkeypatch):
    monkeypatch.setattr(ray_backend, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as s:  # accepts connections (the kernel's backlog) and never speaks gRPC
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ray_backend.RayUnavailable, match="not a Ray head"):
            ray_backend.probe(f"127.0.0.1:{s.getsockname()[1]}")


def test_an_unknown_backend_is_refused_when_read_and_when_evolution_is_built(tmp_path):
    with pytest.raises(ConfigError, match="evolution_backend = 'spark' .from MUNET_EVOLUTION_BACKEND."):
        Config.from_env(env={"MUNET_EVOLUTION_BACKEND": "spark"})
    store = Store(tmp_path)  # a Config built directly is not validated: the trainer's choice refuses it too
    try:
        with pytest.raises(ConfigError, match="evolution_backend 'spark'"):
            Evolver(Config(home=tmp_path, evolution_backend="spark"), store)
    finally:
        store.close()
