"""The ONNX Runtime serving graph: parity with torch, shared sessions, grouped batches, restart."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from conftest import register_digits

from munet.data.images import to_model_input
from munet.models.export import torch_chain_outputs
from munet.models.vit import Chain
from munet.service.core import ImageInput
from munet.service.runtime import run_grouped


def _images(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_onnx_path_matches_torch_within_1e_4(make_app):
    app = make_app()
    register_digits(app, "parity")
    rec = app.store.get_path("parity")
    x = to_model_input(_images(16))
    onnx_out = app.core.runtime.get("parity").run(x)
    with torch.no_grad():
        torch_out = Chain([app.store.load_module(m) for m in rec.modules])(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == (16, 10)
    assert np.max(np.abs(onnx_out - torch_out)) <= 1e-4
    assert np.allclose(torch_chain_outputs(app.store, rec.modules, x), torch_out)


def test_modules_shared_by_tasks_are_loaded_once(make_app):
    app = make_app()
    for i in range(3):
        register_digits(app, f"t{i}", max_examples=300, seed=i)
    paths = [app.store.get_path(f"t{i}") for i in range(3)]
    trunk = paths[0].modules[:-1]
    assert all(p.modules[:-1] == trunk for p in paths), "all three start on the root trunk"
    loaded = app.core.runtime.pool.loaded()
    assert len(loaded) == len(trunk) + 3  # one session per trunk module, plus one head per task
    live = [app.core.runtime.get(f"t{i}") for i in range(3)]
    for depth in range(len(trunk)):
        assert len({id(p.sessions[depth]) for p in live}) == 1


def test_mixed_task_batches_share_the_trunk_and_match_separate_runs(make_app):
    app = make_app()
    register_digits(app, "a", max_examples=300, seed=1)
    register_digits(app, "b", builtin="animal_shapes", max_examples=300)
    pa, pb = app.core.runtime.get("a"), app.core.runtime.get("b")
    xa, xb = to_model_input(_images(5, 1)), to_model_input(_images(3, 2))
    grouped = run_grouped([(pa, xa), (pb, xb), (pa, xa[:1])])
    # alone, a path runs on its joined session; in company, as the chain: the same bits either way
    assert np.array_equal(grouped[0], pa.run(xa))
    assert np.array_equal(grouped[1], pb.run(xb))
    assert np.array_equal(grouped[2], pa.run(xa[:1]))


def test_concurrent_requests_are_micro_batched(make_app):
    app = make_app(max_batch_size=64, max_delay_ms=20.0)
    register_digits(app, "batched", max_examples=300)
    sizes: list[int] = []
    app.core.batcher.on_batch = lambda images, tasks: sizes.append(images)
    im = _images(1)[0]

    async def main():
        reqs = [app.core.predict("batched", [ImageInput(raw=im.tobytes(), height=32, width=32, channels=3)])
                for _ in range(24)]
        return await asyncio.gather(*reqs)

    results = asyncio.run(main())
    assert len(results) == 24
    assert max(sizes) > 1, sizes  # requests were merged
    assert sum(sizes) == 24
    first = results[0][1][0].top[0]
    assert all(r[1][0].top[0] == first for r in results)  # same image, same answer in any batch


def test_restart_restores_every_task_with_identical_outputs(make_app, tmp_path):
    home = tmp_path / "restart"
    app = make_app(home=home)
    register_digits(app, "one", max_examples=300)
    register_digits(app, "two", builtin="animal_shapes", max_examples=300)
    x = _images(6)
    before = {t: (app.core.runtime.get(t).version, app.core.predict_sync(t, x)[1]) for t in ("one", "two")}
    app.close()
    again = make_app(home=home)
    for t, (version, out) in before.items():
        assert again.core.runtime.get(t).version == version
        assert np.array_equal(again.core.predict_sync(t, x)[1], out)


def test_a_half_registered_task_is_removed_at_start(make_app, tmp_path):
    home = tmp_path / "crash"
    app = make_app(home=home)
    app.store.create_task("orphan", ["a", "b"], {"kind": "upload"})  # as if the process died here
    app.close()
    again = make_app(home=home)
    assert [t.name for t in again.store.list_tasks()] == []


def test_device_bound_chains_give_the_same_outputs(make_app):
    """The I/O-binding path a CUDA server takes (outputs stay on the device between sessions), run
    here with ONNX Runtime's CPU device so the binding code itself is exercised without a GPU."""
    import dataclasses

    app = make_app()
    register_digits(app, "a", max_examples=300, seed=1)
    register_digits(app, "b", builtin="animal_shapes", max_examples=300)
    pa, pb = app.core.runtime.get("a"), app.core.runtime.get("b")
    ba, bb = dataclasses.replace(pa, device="cpu"), dataclasses.replace(pb, device="cpu")
    xa, xb = to_model_input(_images(5, 1)), to_model_input(_images(3, 2))
    assert np.array_equal(ba.run(xa), pa.run(xa))
    grouped = run_grouped([(ba, xa), (bb, xb), (ba, xa[:1])])
    assert all(isinstance(g, np.ndarray) for g in grouped)
    assert np.allclose(grouped[0], pa.run(xa), atol=1e-5) and np.allclose(grouped[1], pb.run(xb), atol=1e-5)
    assert np.allclose(grouped[2], pa.run(xa[:1]), atol=1e-5)


_POOL_PROBE = r'''
import sys
import numpy as np, onnxruntime as ort, torch
from munet.models.export import export_module
from munet.models.vit import Block, BlockConfig
from munet.ort_threads import session_options, shared
from munet.service.runtime import SessionPool

model = export_module(Block(BlockConfig(16, 2, 32, 8)).eval())
pool = SessionPool(None, ["CPUExecutionProvider"], intra_op_threads=2, shared_threads=sys.argv[1] == "on")
x = np.ones((1, 5, 16), np.float32)
a = ort.InferenceSession(model, pool._options(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
b = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
try:  # a session with a pool of its own, as ORT's defaults make it
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    own = "ok"
except Exception:
    own = "refused"
print(shared(), pool._options().use_per_session_threads, bool(np.array_equal(a, b)), own)
'''


def test_sessions_share_one_thread_pool_unless_configured_off():
    """The shared pool is the process's: probed in fresh processes. Once it exists ONNX Runtime refuses a
    session with a pool of its own, which is why every session comes from `session_options`."""
    import subprocess
    import sys

    def probe(mode: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _POOL_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1].split()  # ORT prints its refusal above

    assert probe("on") == ["True", "False", "True", "refused"]
    assert probe("off") == ["False", "True", "True", "ok"]
