"""A path's joined session (munet/service/merged.py): it runs a batch of one path alone, and answers
bit for bit as the chain of sessions does, so a request's answer never depends on its batch."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import register_digits

import munet.service.runtime as runtime_mod
from munet.data.images import to_model_input
from munet.models.export import export_module
from munet.ort_threads import session_options
from munet.service.merged import NotJoinable, join_modules
from munet.service.runtime import run_grouped


def _images(n, seed=0, size=32):
    return to_model_input(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _count_runs(monkeypatch) -> list:
    calls: list = []
    real = runtime_mod.run_session

    def counted(session, x, device):
        calls.append(session)
        return real(session, x, device)

    monkeypatch.setattr(runtime_mod, "run_session", counted)
    return calls


def test_a_batch_of_one_path_runs_on_its_joined_session_with_the_chains_answers(make_app, monkeypatch):
    app = make_app()
    register_digits(app, "a", max_examples=300, seed=1)
    register_digits(app, "b", builtin="animal_shapes", max_examples=300)
    pa, pb = app.core.runtime.get("a"), app.core.runtime.get("b")
    assert pa.merged is not None and pa.merged_max_batch == 8
    assert len(pa.module_ids) > 2
    xa, xb = _images(5, 1), _images(3, 2)
    chain_a, chain_b = pa.run_chain(xa), pb.run_chain(xb)
    calls = _count_runs(monkeypatch)
    alone = run_grouped([(pa, xa[:2]), (pa, xa[2:])])  # two requests of one path: one joined run
    assert calls == [pa.merged]
    assert np.array_equal(np.concatenate(alone), chain_a)
    calls.clear()
    mixed = run_grouped([(pa, xa), (pb, xb)])  # two paths: the chain, trunk shared
    assert pa.merged not in calls and len(calls) > len(pa.module_ids)
    # the same request's answer, alone or in company, is the same to the last bit
    assert np.array_equal(mixed[0], np.concatenate(alone)) and np.array_equal(mixed[1], chain_b)
    calls.clear()
    big = _images(9, 3)  # past merged_max_batch: the chain
    assert np.array_equal(pa.run(big), pa.run_chain(big)) and pa.merged not in calls


def test_joined_sessions_can_be_turned_off_and_are_counted(make_app):
    from prometheus_client import REGISTRY

    app = make_app(merged_max_batch=0)
    register_digits(app, "a", max_examples=300)
    assert app.core.runtime.get("a").merged is None
    assert app.core.runtime.pool.joined_loaded() == 0
    assert REGISTRY.get_sample_value("munet_joined_sessions") == 0
    app.close()  # the gauge is the process's: one server at a time sets it
    on = make_app()
    register_digits(on, "b", max_examples=300)
    assert on.core.runtime.pool.joined_loaded() == 1
    assert REGISTRY.get_sample_value("munet_joined_sessions") == 1


def test_a_joined_session_that_answers_differently_is_not_used(make_app, monkeypatch, caplog):
    app = make_app()
    register_digits(app, "a", max_examples=300, seed=1)
    register_digits(app, "b", builtin="animal_shapes", max_examples=300)
    pool = app.core.runtime.pool
    other = app.core.runtime.get("b").module_ids
    wrong = pool.joined(other)  # same input and output shapes, other weights
    monkeypatch.setattr(pool, "joined", lambda ids: wrong)
    rec = app.store.get_path("a")
    with caplog.at_level(logging.WARNING, logger="munet.service.runtime"):
        served = app.core.runtime.prepare(rec, app.store.get_task("a").labels, 32)
    assert served.merged is None
    assert "differ from the chain" in caplog.text
    x = _images(2)
    assert np.array_equal(served.run(x), app.core.runtime.get("a").run(x))


def test_the_imagenet_roots_blocks_join_bit_identically():
    """MobileNetV2: ONNX Runtime fuses a residual Add into the previous block's last Conv when the
    graphs are joined without barriers (answers then differ by ~4e-6); with them they are equal."""
    from munet.models.roots import _load_mobilenet_imagenet

    modules, _ = _load_mobilenet_imagenet()
    models = [onnx.load_from_string(export_module(m)) for m in modules[:6]]
    so = session_options()  # the test process's shared pool, where an App made it
    chain = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for m in models]
    joined = ort.InferenceSession(join_modules(models), so, providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, 3, 96, 96), dtype=np.float32)
        y = x
        for s in chain:
            y = s.run(None, {"x": y})[0]
        assert np.array_equal(joined.run(None, {"x": x})[0], y)


def test_graphs_that_cannot_be_joined_are_refused():
    from munet.models.roots import _load_vit_tiny

    modules, _ = _load_vit_tiny()
    models = [onnx.load_from_string(export_module(m)) for m in modules[:2]]
    with pytest.raises(NotJoinable, match="one module"):
        join_modules(models[:1])
    models[1].opset_import[0].version -= 1
    with pytest.raises(NotJoinable, match="opset"):
        join_modules(models)


def test_a_path_whose_joined_session_fails_to_build_serves_as_the_chain(make_app, monkeypatch, caplog):
    app = make_app()
    register_digits(app, "a", max_examples=300)

    def broken(ids):
        raise RuntimeError("no memory for another session")

    monkeypatch.setattr(app.core.runtime.pool, "joined", broken)
    with caplog.at_level(logging.INFO, logger="munet.service.runtime"):
        served = app.core.runtime.prepare(app.store.get_path("a"), app.store.get_task("a").labels, 32)
    assert served.merged is None and "no memory for another session" in caplog.text
    x = _images(3)
    assert np.array_equal(served.run(x), app.core.runtime.get("a").run_chain(x))
