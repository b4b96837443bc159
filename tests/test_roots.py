"""Roots as plug-ins: the ImageNet MobileNetV2 from its package, timm/torchvision checkpoint imports,
ONNX parity per module and per path, and the store's record of roots (with its schema migration)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import onnxruntime as ort
import pytest
import torch

from munet.cli import main as cli_main
from munet.models import mobilenet
from munet.models.export import export_module
from munet.models.roots import (
    BUILTIN_ROOTS,
    _timm_vit_reference,
    available_roots,
    ensure_root,
    import_root,
    load_saved_root,
    mobilenet_weights_path,
    read_state_dict,
    stored_roots,
)
from munet.models.store import SCHEMA_VERSION, Store
from munet.models.vit import Chain
from munet.ort_threads import session_options


@pytest.fixture(scope="module")
def mbv2():
    modules, info = BUILTIN_ROOTS["mobilenet_v2_imagenet"].load()
    return modules, info


def _onnx(module) -> ort.InferenceSession:
    return ort.InferenceSession(export_module(module), session_options(), providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def test_imagenet_weights_load_into_our_torchvision_layout_with_every_key():
    state = read_state_dict(mobilenet_weights_path())
    net = mobilenet.MobileNetV2()
    result = net.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in net.parameters()) == 3_504_872


def test_cut_mobilenet_runs_the_original_forward_pass(mbv2):
    modules, info = mbv2
    kinds = [m.kind for m in modules]
    assert kinds == ["conv_stem", *["inverted_residual"] * 17, "conv_1x1", "pool_head"]
    net = mobilenet.mobilenet_v2_from_state_dict(read_state_dict(mobilenet_weights_path()))
    x = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(mobilenet.IMAGENET_MEAN), torch.tensor(mobilenet.IMAGENET_STD)
    norm = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(Chain(modules)(x), net(norm), atol=1e-5)


@pytest.mark.parametrize("size", [64, 96, 160])
def test_mobilenet_onnx_parity_per_module_and_per_path(mbv2, size):
    modules, _ = mbv2
    x = np.random.default_rng(size).random((2, 3, size, size), dtype=np.float32)
    t, o = torch.from_numpy(x), x
    worst = 0.0
    for m in modules:
        with torch.no_grad():
            t_next = m(t)
        got = _onnx(m).run(None, {"x": t.numpy()})[0]  # each module alone, on the torch input
        worst = max(worst, _rel(got, t_next.numpy()))
        o = _onnx(m).run(None, {"x": o})[0]  # and the ONNX chain, as the server runs it
        t = t_next
    assert worst <= 1e-4
    assert _rel(o, t.numpy()) <= 1e-4
    assert o.shape == (2, 1000)


def _timm_state(depth=2, dim=48, heads=3, patch=8, image=32, classes=7, seed=0) -> dict[str, torch.Tensor]:
    """A randomly initialised ViT with timm's key names (what `timm.create_model(...).state_dict()` holds)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    n = (image // patch) ** 2
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, n + 1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
          "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim),
          "head.weight": r(classes, dim), "head.bias": r(classes)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(4 * dim, dim),
                   p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def test_timm_vit_import_matches_timms_forward_through_onnx(tmp_path):
    state = _timm_state()
    ckpt = tmp_path / "vit.pth"
    torch.save(state, ckpt)
    info = import_root(tmp_path / "home", "tiny-timm", ckpt, "timm-vit", heads=3)
    assert info["family"] == "vit" and info["image_size"] == 32 and info["parity_relative_error"] <= 1e-4
    modules, _ = load_saved_root(tmp_path / "home" / "roots" / "tiny-timm")
    assert [m.kind for m in modules] == ["embed", "block", "block", "head"]
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    y = x
    for m in modules:
        y = _onnx(m).run(None, {"x": y})[0]
    with torch.no_grad():
        ref = _timm_vit_reference(state, torch.from_numpy(x), 3, 1e-6, (0.5,) * 3, (0.5,) * 3).numpy()
    assert _rel(y, ref) <= 1e-4
    assert "tiny-timm" in available_roots(tmp_path / "home")


def test_checkpoints_of_another_layout_are_refused_and_leave_nothing(tmp_path):
    ckpt = tmp_path / "vit.pth"
    torch.save(_timm_state(), ckpt)
    with pytest.raises(ValueError, match="not a torchvision MobileNetV2"):
        import_root(tmp_path / "home", "wrong", ckpt, "torchvision-mobilenet_v2")
    with pytest.raises(ValueError, match="not divisible"):
        import_root(tmp_path / "home", "wrong", ckpt, "timm-vit", heads=5)
    scaled = {**_timm_state(), "blocks.0.ls1.gamma": torch.ones(48)}
    torch.save(scaled, ckpt)
    with pytest.raises(ValueError, match="layer scale"):
        import_root(tmp_path / "home", "wrong", ckpt, "timm-vit")
    assert not (tmp_path / "home" / "roots" / "wrong").exists()


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_state_dict(bad)


def test_cli_imports_a_torchvision_mobilenet_finetuned_elsewhere(tmp_path, capsys):
    state = read_state_dict(mobilenet_weights_path())
    state["classifier.1.weight"] = state["classifier.1.weight"][:5].clone()  # a 5-class fine-tune
    state["classifier.1.bias"] = state["classifier.1.bias"][:5].clone()
    ckpt = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state}, ckpt)
    home = tmp_path / "home"
    assert cli_main(["roots", "import", "my-mbv2", str(ckpt), "--format", "torchvision-mobilenet_v2",
                     "--home", str(home), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mobilenet_v2" and info["params"] == 3_504_872 - 995 * 1281
    assert cli_main(["roots", "list", "--home", str(home), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"mobilenet_v2_imagenet", "vit_tiny", "my-mbv2"} <= set(listed)
    assert listed["mobilenet_v2_imagenet"]["default"] and listed["mobilenet_v2_imagenet"]["installed"]
    store = Store(home)
    try:
        ids = ensure_root(store, "my-mbv2")
        assert stored_roots(store)["my-mbv2"]["modules"] == ids
        assert store.load_module(ids[-1]).cfg.num_classes == 5
    finally:
        store.close()


def test_a_first_release_store_is_migrated_and_keeps_serving(make_app, tmp_path):
    from conftest import register_digits

    home = tmp_path / "old"
    app = make_app(home=home)
    register_digits(app, "kept", max_examples=300)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    before = app.core.predict_sync("kept", x)[1]
    root_ids = stored_roots(app.store)["vit_tiny"]["modules"]
    app.close()
    # rewrite the database as the first release left it: no root columns, the root under meta
    # `root_modules`, no schema version
    db = sqlite3.connect(home / "munet.db")
    db.execute("ALTER TABLE tasks DROP COLUMN root")
    db.execute("ALTER TABLE tasks DROP COLUMN image_size")
    db.execute("DELETE FROM meta")
    db.execute("INSERT INTO meta(key, value) VALUES ('root_modules', ?)", (json.dumps(root_ids),))
    db.execute("PRAGMA user_version=0")
    db.commit()
    db.close()
    app2 = make_app(home=home, root="")  # the store's own root, as `make run` on an upgraded install
    assert app2.store.schema_version == SCHEMA_VERSION
    t = app2.store.get_task("kept")
    assert (t.root, t.image_size) == ("vit_tiny", 32)
    assert app2.core.root == "vit_tiny"  # new tasks keep growing from the root the store was made with
    assert np.array_equal(app2.core.predict_sync("kept", x)[1], before)


def test_a_store_from_a_newer_release_is_refused(tmp_path):
    Store(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / "munet.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="upgrade munet-serve"):
        Store(tmp_path / "s")
