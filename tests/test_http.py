"""The process we ship (`munet serve`): its HTTP API (rest.py, mounted on BentoML) beside gRPC on the same
core: Predict's three input forms, the error body and statuses, uploads, tokens, the docs and the Open
Inference Protocol on the same port. Call-by-call twins of every gRPC method: tests/test_semantics.py."""

from __future__ import annotations

import base64
import io
import urllib.request

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serve_fixture import ADMIN

from munet.client import MunetClient, MunetClientError
from munet.data.builtin import load_builtin

pytestmark = pytest.mark.slow


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _tensor(x: np.ndarray) -> dict:
    """The JSON of a raw tensor: its dtype, shape and little-endian bytes."""
    return {"dtype": str(x.dtype), "shape": list(x.shape), "data": _b64(x.astype(x.dtype.newbyteorder("<")).tobytes())}


def _top(body: dict) -> list[list[tuple[str, float]]]:
    return [[(p["label"], p["probability"]) for p in pred] for pred in body["predictions"]]


def test_predict_takes_json_files_pixel_lists_tensors_and_multipart_alike(munet_serve):
    s = munet_serve
    ds = load_builtin("uci_digits", max_examples=40, seed=5)
    x = ds.x[:3]  # (3, 32, 32, 3) uint8
    with MunetClient(s.target) as c:
        g = c.predict("digits-demo", [x[0], x[1], x[2]], top_k=3)
    expected = [[(p.label, p.probability) for p in pred] for pred in g.predictions]
    png = [_png(im) for im in x]
    bodies = {
        "files": {"images": [_b64(p) for p in png]},
        "arrays": {"arrays": [im.tolist() for im in x]},
        "arrays of float pixels": {"arrays": [im.astype(float).tolist() for im in x]},
        "a uint8 batch tensor": {"tensor": _tensor(x)},  # (N, H, W, C)
        "mixed": {"images": [_b64(png[0])], "arrays": [x[1].tolist()], "tensor": _tensor(x[2].astype(np.float32))},
    }
    for what, body in bodies.items():
        status, out = s.call("POST", "/predict", {"task": "digits-demo", "top_k": 3, **body}, token=None)
        assert status == 200, (what, out)
        assert out["task"] == "digits-demo" and out["path_version"] == g.version == 1, what
        for got, want in zip(_top(out), expected, strict=True):
            assert [lbl for lbl, _ in got] == [lbl for lbl, _ in want], what
            assert np.allclose([p for _, p in got], [p for _, p in want], atol=1e-6), what
    # multipart/form-data: one part per image file (`files`, or `file`), the parameters as fields
    status, out = s.call("POST", "/predict", fields={"task": "digits-demo", "top_k": "3"},
                         files=[("files", png[0]), ("file", png[1]), ("files", png[2])], token=None)
    assert status == 200, out
    assert [[lbl for lbl, _ in p] for p in _top(out)] == [[lbl for lbl, _ in p] for p in expected]


def test_bad_input_gets_400_with_a_code_and_a_message_and_harms_nothing(munet_serve):
    s = munet_serve
    logged = len((s.home / "serve.log").read_text())
    x = np.arange(64, dtype=np.uint8).reshape(8, 8)
    cases = {
        "images[0] is not valid base64": {"images": ["***"]},
        "the request has no images": {},
        "arrays[0] holds fractional values": {"arrays": [(x + 0.5).tolist()]},  # never truncated to x
        "arrays[0] holds NaN": {"arrays": [[[float("nan"), 1.0], [2.0, 3.0]]]},
        "arrays[0] has values outside 0..255": {"arrays": [[[0, 256], [1, 2]]]},
        "arrays[0] is not a rectangular array": {"arrays": [[[1, 2], [3]]]},
        "tensor holds fractional values": {"tensor": _tensor(x.astype(np.float32) / 255)},
        "tensor.data has 63 bytes; shape [8, 8] of uint8 needs 64":
            {"tensor": {"dtype": "uint8", "shape": [8, 8], "data": _b64(x.tobytes()[:63])}},
        "tensor has shape [6, 8, 8]: an (H, W, C) image has C = 1, 3 or 4 channels; send a batch as a rank-4 tensor":
            {"tensor": _tensor(np.zeros((6, 8, 8), np.uint8))},
        "tensor.dtype: Input should be 'uint8'": {"tensor": {"dtype": "object", "shape": [1, 1], "data": ""}},
        "imagez: Extra inputs are not permitted": {"imagez": []},
        "top_k: Input should be a valid integer": {"top_k": "x", "arrays": [x.tolist()]},
        "version: Input should be greater than or equal to 0": {"version": -1, "arrays": [x.tolist()]},
    }
    for message, body in cases.items():
        status, out = s.call("POST", "/predict", {"task": "digits-demo", **body})
        assert status == 400 and out["code"] == "INVALID_ARGUMENT", (message, out)
        assert message in out["message"], (message, out)
    for raw, ctype, message in ((b"{not json", "application/json", "the body is not valid JSON"),
                                (b"task=x", "application/x-www-form-urlencoded",
                                 "application/json or multipart/form-data")):
        status, out = s.call("POST", "/predict", raw=raw, headers={"content-type": ctype})
        assert status == 400 and out["code"] == "INVALID_ARGUMENT" and message in out["message"], out
    status, out = s.call("POST", "/predict", fields={"task": "digits-demo", "files": "not a file"})
    assert (status, out["message"]) == (400, "files must be an uploaded file"), out
    assert s.call("POST", "/predict", {"task": "nope", "arrays": [x.tolist()]}) == \
        (404, {"code": "NOT_FOUND", "message": "task 'nope' does not exist"})
    assert s.call("GET", "/tasks/nope")[0] == 404
    status, out = s.call("GET", "/predict")  # reads are GET, writes POST: a wrong method is 405, named
    assert (status, out["code"]) == (405, "UNIMPLEMENTED") and "use POST" in out["message"], out
    status, out = s.call("POST", "/tasks/digits-demo/promote", {})
    assert (status, out) == (400, {"code": "INVALID_ARGUMENT", "message": "version: Field required"})
    status, out = s.call("GET", "/events", query={"limit": 0})
    assert status == 400 and out["message"].startswith("limit: "), out
    status, out = s.call("POST", "/predict", {"task": "digits-demo", "arrays": [x.tolist()]})
    assert status == 200, out  # still serving
    log = (s.home / "serve.log").read_text()[logged:]
    assert "Traceback" not in log and "INVALID_ARGUMENT" not in log  # a client's mistake is an access line


def test_http_predict_is_counted_like_grpc(munet_serve):
    s = munet_serve

    def count(code: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/metrics", timeout=30) as r:
            text = r.read().decode()
        want = {"task": "digits-demo", "protocol": "http", "code": code}
        return sum(x.value for f in text_string_to_metric_families(text) if f.name == "munet_requests"
                   for x in f.samples if x.name == "munet_requests_total" and x.labels == want)

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    x = np.zeros((8, 8), np.uint8)
    assert s.call("POST", "/predict", {"task": "digits-demo", "arrays": [x.tolist()]})[0] == 200
    assert s.call("POST", "/predict", {"task": "digits-demo", "arrays": [(x + 0.5).tolist()]})[0] == 400
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)


def test_register_an_uploaded_npz_and_add_examples_over_http(munet_serve):
    s = munet_serve
    ds = load_builtin("animal_shapes", max_examples=300, seed=1)
    buf = io.BytesIO()
    np.savez(buf, x=ds.x, y=ds.y, label_names=np.array(ds.labels))
    status, body = s.call("POST", "/tasks", fields={"name": "animals-http", "policy": "approve"},
                          files=[("file", buf.getvalue())])
    assert status == 201, body
    assert body["current_version"] == 1 and body["labels"] == ds.labels and body["policy"] == "approve"
    status, dup = s.call("POST", "/tasks", fields={"name": "animals-http"}, files=[("file", buf.getvalue())])
    assert (status, dup["code"]) == (409, "ALREADY_EXISTS"), dup
    status, tasks = s.call("GET", "/tasks", token=None)
    assert status == 200 and {t["name"] for t in tasks} >= {"digits-demo", "animals-http"}
    with MunetClient(s.target) as c:
        before = c.get_task("animals-http")
    assert before.current_version == 1
    # management needs the admin token: none -> 401, a wrong one -> 403, and nothing is stored
    more = io.BytesIO()
    np.savez(more, x=255 - ds.x[:20], y=ds.y[:20])  # corrections in a new style
    route = "/tasks/animals-http/examples"
    assert s.call("POST", route, files=[("file", more.getvalue())], token=None)[0] == 401
    assert s.call("POST", route, files=[("file", more.getvalue())], token="guess")[0] == 403
    status, added = s.call("POST", route, files=[("file", more.getvalue())])
    assert status == 200 and added["added"] == 20, added
    assert added["train"] + added["validation"] == 20 and added["test"] == 0
    with MunetClient(s.target) as c:
        after = c.get_task("animals-http")
    assert after.train_examples + after.validation_examples == before.train_examples + before.validation_examples + 20
    assert after.test_examples == before.test_examples
    status, out = s.call("POST", route, files=[("file", b"PK\x03\x04 not a zip")])
    assert status == 400 and out["message"].startswith("uploaded file is not a readable .npz file"), out


def test_management_needs_the_admin_token_on_both_protocols(munet_serve):
    s = munet_serve
    status, body = s.call("DELETE", "/tasks/digits-demo", token=None)
    assert (status, body["code"]) == (401, "UNAUTHENTICATED"), body
    status, body = s.call("DELETE", "/tasks/digits-demo", token="not-it")
    assert (status, body["code"]) == (403, "PERMISSION_DENIED"), body
    assert s.call("GET", "/tasks/digits-demo", token=None)[0] == 200  # reads are open (no predict token)
    assert s.call("PATCH", "/tasks/digits-demo/policy", {"policy": "frozen"}, token=None)[0] == 401
    with MunetClient(s.target) as c:
        with pytest.raises(MunetClientError) as e:
            c.delete_task("digits-demo")
        assert e.value.code == "UNAUTHENTICATED"
        assert c.health() == "SERVING"
        assert c.predict("digits-demo", [np.zeros((8, 8), np.uint8)]).version >= 1
    with MunetClient(s.target, token="wrong") as c, pytest.raises(MunetClientError) as e:
        c.trigger_evolution("digits-demo")
    assert e.value.code == "PERMISSION_DENIED"
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/metrics", timeout=30) as r:
        assert r.status == 200  # scrapers need no token
    with MunetClient(s.target, token=ADMIN) as c:
        assert c.get_task("digits-demo").policy == "auto"  # nothing changed


def test_docs_schema_and_the_open_inference_protocol_share_the_port(munet_serve):
    s = munet_serve
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/docs", timeout=30) as r:
        assert r.url.endswith(f":{s.http}/") and b"<html" in r.read().lower()  # /docs leads to BentoML's UI
    status, spec = s.call("GET", "/docs.json", token=None)
    assert status == 200
    paths = spec["paths"]
    assert set(paths["/tasks"]) == {"get", "post"} and set(paths["/tasks/{name}"]) == {"get", "delete"}
    assert set(paths["/predict"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert paths["/tasks/{name}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/Task"}
    assert {"Task", "PathVersion", "Error", "EvolutionStatus"} <= set(spec["components"]["schemas"])
    status, meta = s.call("GET", "/v2", token=None)  # the Open Inference Protocol, mounted beside it
    assert status == 200 and meta["name"] == "munet", meta
    status, model = s.call("GET", "/v2/models/digits-demo", token=None)
    assert status == 200 and model["name"] == "digits-demo", model


def test_a_body_that_streams_past_the_limit_gets_413_on_every_route():
    """Without a Content-Length the limit is met while the body streams in: whether the route's body is
    read by FastAPI (rollback) or by content type (predict), the answer is 413 and the error body."""
    import asyncio
    import json

    from munet.server import BodyLimitMiddleware
    from munet.service.rest import create_app

    app = BodyLimitMiddleware(create_app(lambda: None, lambda: None), limit=100)

    async def call(path: str) -> tuple[int, dict]:
        chunks = [b'{"version": 1, "policy": "' + b"x" * 60, b"x" * 60 + b'"}']
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "scheme": "http", "root_path": "",
                 "server": ("test", 80), "client": ("test", 1), "http_version": "1.1", "app": None}
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    for path in ("/tasks/t/rollback", "/predict"):
        status, body = asyncio.run(call(path))
        assert status == 413 and body["code"] == "INVALID_ARGUMENT", (path, body)
        assert "max_http_body_bytes" in body["message"], (path, body)
