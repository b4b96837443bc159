"""The default root end to end over gRPC: a task registered from PNG and JPEG files of different sizes
is stored and served at 96 px on the ImageNet MobileNetV2, beats the small ViT root on held-out images,
takes more examples and evolves; the CLI registers a folder of class subfolders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from grpc_fixtures import LoopThread, server_config
from PIL import Image

from munet.app import App
from munet.cli import main as cli_main
from munet.client import MunetClient
from munet.data.builtin import load_builtin

pytestmark = pytest.mark.slow

GROUPS = ["Animals & Nature", "Food & Drink", "Travel & Places"]


@pytest.fixture(scope="module")
def photos():
    """Emoji of three groups as image files of many sizes and both formats, like a user's folder."""
    ds = load_builtin("emoji_noto", size=96)
    rng = np.random.default_rng(0)
    files, labels = [], []
    for label, group in enumerate(GROUPS):
        idx = np.flatnonzero(ds.y == ds.labels.index(group))
        idx = rng.permutation(idx)[:70]
        for j, i in enumerate(idx):
            w, h = int(rng.integers(48, 220)), int(rng.integers(48, 220))
            img = Image.fromarray(ds.x[i]).resize((w, h), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            if j % 2:
                img.save(buf, "JPEG", quality=90)
            else:
                img.save(buf, "PNG")
            files.append(buf.getvalue())
            labels.append(label)
    labels = np.array(labels)
    order = rng.permutation(len(labels))
    files = [files[i] for i in order]
    labels = labels[order]
    held = np.arange(len(labels)) % 5 == 0  # 20% never uploaded: the held-out images
    return files, labels, held


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = App.build(server_config(tmp_path_factory.mktemp("imagenet-home"), root="mobilenet_v2_imagenet",
                                  candidate_max_steps=20, evolution_max_train=300, evolution_max_validation=100))
    app.start()
    app.start_scheduler()
    loop = LoopThread()
    port = loop.run(app.start_grpc("127.0.0.1:0"))
    client = MunetClient(f"127.0.0.1:{port}", timeout=60.0, long_timeout=600.0)
    client.wait_ready(10.0)
    yield app, client, f"127.0.0.1:{port}"
    client.close()
    loop.run(app.stop())
    loop.close()


def _accuracy(client, task, files, labels) -> float:
    r = client.predict(task, files)
    return float(np.mean([p[0].index == y for p, y in zip(r.predictions, labels, strict=True)]))


def test_photos_of_any_size_register_on_the_imagenet_root_and_beat_the_small_vit(server, photos):
    app, client, _ = server
    files, labels, held = photos
    train_files = [f for f, h in zip(files, held, strict=True) if not h]
    t = client.register_task("photos", labels=GROUPS, examples=(train_files, labels[~held]))
    assert (t.root, t.image_size) == ("mobilenet_v2_imagenet", 96)
    stored, _ = app.store.load_examples("photos", 0)
    assert stored.shape[1:] == (96, 96, 3)
    small = client.register_task("photos-vit", labels=GROUPS, examples=(train_files, labels[~held]), root="vit_tiny")
    assert (small.root, small.image_size) == ("vit_tiny", 32)
    test_files = [f for f, h in zip(files, held, strict=True) if h]
    acc_imagenet = _accuracy(client, "photos", test_files, labels[held])
    acc_vit = _accuracy(client, "photos-vit", test_files, labels[held])
    assert acc_imagenet >= 0.6, acc_imagenet  # chance is 1/3
    assert acc_imagenet > acc_vit + 0.1, (acc_imagenet, acc_vit)


def test_predict_and_add_examples_take_any_size_at_the_tasks_resolution(server, photos):
    app, client, _ = server
    files, labels, _ = photos
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (333, 517, 3), dtype=np.uint8)).save(big, "JPEG")
    gray = np.random.default_rng(2).integers(0, 256, (20, 70), dtype=np.uint8)
    r = client.predict("photos", [big.getvalue(), files[0], gray], top_k=3)  # JPEG, PNG and raw gray pixels
    assert len(r.predictions) == 3 and all(len(p) == 3 for p in r.predictions)
    before = app.store.example_counts("photos")
    res = client.add_examples("photos", files[:6], labels[:6])
    assert res.added == 6
    after = app.store.example_counts("photos")
    assert sum(after.values()) == sum(before.values()) + 6
    x, _ = app.store.load_examples("photos", 0)
    assert x.shape[1:] == (96, 96, 3)


def test_a_generation_on_the_imagenet_root_trains_and_serves_throughout(server):
    app, client, _ = server
    before = client.get_task("photos").current_version
    rep = client.trigger_evolution("photos", candidates=2, wait=True).triggered
    assert rep is not None and rep.candidates == 2 and not rep.error
    after = client.get_task("photos")
    assert after.current_version >= before
    assert client.predict("photos", [np.zeros((40, 50, 3), np.uint8)]).version == after.current_version


def test_cli_registers_a_folder_of_class_subfolders(server, photos, tmp_path, capsys):
    _, client, target = server
    files, labels, _ = photos
    for i, (data, y) in enumerate(zip(files[:60], labels[:60], strict=True)):
        d = tmp_path / "folder" / GROUPS[y].split(" ")[0].lower()
        d.mkdir(parents=True, exist_ok=True)
        suffix = "jpg" if data.startswith(b"\xff\xd8") else "png"
        (d / f"{i}.{suffix}").write_bytes(data)
    assert cli_main(["tasks", "register", "folder", "--from", str(tmp_path / "folder"), "--target", target]) == 0
    t = client.get_task("folder")
    assert t.labels == ["animals", "food", "travel"] and t.image_size == 96
    assert t.train_examples + t.validation_examples + t.test_examples == 60
