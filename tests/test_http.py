"""The process we ship (`munet serve`): BentoML HTTP and gRPC on the same core, same answers, same errors."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from munet.client import MunetClient
from munet.data.builtin import load_builtin

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADMIN = "admin-" + uuid.uuid4().hex  # the shipped process runs protected, as on a network


def _post(port: int, route: str, payload: dict, token: str | None = None) -> tuple[int, object]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{route}", data=json.dumps(payload).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _post_file(port: int, route: str, fields: dict, file_bytes: bytes, token: str | None = ADMIN
               ) -> tuple[int, object]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for k, v in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'
               f"Content-Type: application/octet-stream\r\n\r\n".encode())
    body.write(file_bytes + f"\r\n--{boundary}--\r\n".encode())
    headers = {"content-type": f"multipart/form-data; boundary={boundary}",
               **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{route}", data=body.getvalue(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("http-home")
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "MUNET_HOME": str(home), "MUNET_HTTP_PORT": str(http_port),
           "MUNET_GRPC_PORT": str(grpc_port), "MUNET_HOST": "127.0.0.1", "MUNET_SCHEDULER_ENABLED": "0",
           "MUNET_DEMO_TASK": "1", "MUNET_ADMIN_TOKEN": ADMIN, "BENTOML_HOME": str(home / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen([sys.executable, "-m", "munet.cli", "serve"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "wb"))
    try:
        deadline = time.monotonic() + 180
        with MunetClient(f"127.0.0.1:{grpc_port}") as c:
            while time.monotonic() < deadline:
                assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
                with contextlib.suppress(Exception):  # not up yet
                    if any(t.name == "digits-demo" for t in c.list_tasks()):
                        break
                time.sleep(1)
            else:
                pytest.fail("server did not come up: " + (home / "serve.log").read_text()[-3000:])
        yield http_port, grpc_port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_http_and_grpc_give_the_same_answers_from_one_process(server):
    http_port, grpc_port = server
    ds = load_builtin("uci_digits", max_examples=40, seed=5)
    png = io.BytesIO()
    Image.fromarray(ds.x[0]).save(png, format="PNG")
    status, body = _post(http_port, "predict", {"task": "digits-demo", "top_k": 3,
                                                "images": [base64.b64encode(png.getvalue()).decode()],
                                                "arrays": [ds.x[1].tolist()]})
    assert status == 200, body
    with MunetClient(f"127.0.0.1:{grpc_port}") as c:
        g = c.predict("digits-demo", [png.getvalue(), ds.x[1]], top_k=3)
    assert body["path_version"] == g.version == 1
    for http_pred, grpc_pred in zip(body["predictions"], g.predictions, strict=True):
        assert [p["label"] for p in http_pred] == [s.label for s in grpc_pred]
        assert np.allclose([p["probability"] for p in http_pred], [s.probability for s in grpc_pred], atol=1e-6)


def test_http_errors_match_the_grpc_codes(server):
    http_port, _ = server
    assert _post(http_port, "predict", {"task": "nope", "arrays": [[[0, 1], [2, 3]]]})[0] == 404
    assert _post(http_port, "predict", {"task": "digits-demo", "images": ["***"]})[0] == 400
    assert _post(http_port, "predict", {"task": "digits-demo"})[0] == 400  # empty batch
    assert _post(http_port, "task", {"name": "nope"})[0] == 404
    status, body = _post(http_port, "predict", {"task": "digits-demo", "arrays": [[[0, 1], [2, 3]]]})
    assert status == 200, body  # still serving


def test_register_an_uploaded_npz_over_http(server):
    http_port, grpc_port = server
    ds = load_builtin("animal_shapes", max_examples=300, seed=1)
    buf = io.BytesIO()
    np.savez(buf, x=ds.x, y=ds.y, label_names=np.array(ds.labels))
    status, body = _post_file(http_port, "register_upload", {"name": "animals-http"}, buf.getvalue())
    assert status == 200, body
    assert body["current_version"] == 1 and body["labels"] == ds.labels
    status, dup = _post_file(http_port, "register_upload", {"name": "animals-http"}, buf.getvalue())
    assert status == 409, dup
    status, tasks = _post(http_port, "tasks", {})
    assert {t["name"] for t in tasks} >= {"digits-demo", "animals-http"}
    with MunetClient(f"127.0.0.1:{grpc_port}") as c:
        assert c.get_task("animals-http").current_version == 1
        before = c.get_task("animals-http")
    # management needs the admin token: none -> 401, a wrong one -> 403, and nothing is stored
    assert _post_file(http_port, "add_examples", {"task": "animals-http"}, buf.getvalue(), token=None)[0] == 401
    assert _post_file(http_port, "add_examples", {"task": "animals-http"}, buf.getvalue(), token="guess")[0] == 403
    more = io.BytesIO()
    np.savez(more, x=255 - ds.x[:20], y=ds.y[:20])  # corrections in a new style
    status, added = _post_file(http_port, "add_examples", {"task": "animals-http"}, more.getvalue())
    assert status == 200 and added["added"] == 20, added
    assert added["train"] + added["validation"] == 20 and added["test"] == 0
    with MunetClient(f"127.0.0.1:{grpc_port}") as c:
        after = c.get_task("animals-http")
    assert after.train_examples + after.validation_examples == before.train_examples + before.validation_examples + 20


def test_management_needs_the_admin_token_on_both_protocols(server):
    from munet.client import MunetClientError

    http_port, grpc_port = server
    assert _post(http_port, "delete", {"name": "digits-demo"})[0] == 401
    status, body = _post(http_port, "delete", {"name": "digits-demo"}, token="not-it")
    assert status == 403 and body["code"] == "PERMISSION_DENIED"
    assert _post(http_port, "tasks", {})[0] == 200  # reads are open (no predict token configured)
    with MunetClient(f"127.0.0.1:{grpc_port}") as c:
        with pytest.raises(MunetClientError) as e:
            c.delete_task("digits-demo")
        assert e.value.code == "UNAUTHENTICATED"
        assert c.health() == "SERVING"
        assert c.predict("digits-demo", [np.zeros((8, 8), np.uint8)]).version >= 1
    with MunetClient(f"127.0.0.1:{grpc_port}", token="wrong") as c, pytest.raises(MunetClientError) as e:
        c.trigger_evolution("digits-demo")
    assert e.value.code == "PERMISSION_DENIED"
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as r:
        assert r.status == 200  # scrapers need no token
    assert any(t.name == "digits-demo" for t in MunetClient(f"127.0.0.1:{grpc_port}").list_tasks())
