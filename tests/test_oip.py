"""The Open Inference Protocol (KServe v2) as users meet it: Triton's own client, tritonclient (grpc and
http), against a running `munet serve`, getting what munet.v1 Predict answers. Plus the conversions,
the auth classes and the committed stubs, without a server."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from munet.client import MunetClient
from munet.errors import InvalidArgument
from munet.service import oip, oip_http
from munet.service.auth import grpc_need, http_need

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "oip-test-token"
TASK = "digits"
LABELS = 10


def auth() -> dict[str, str]:
    # a fresh dict per call: tritonclient.http writes Inference-Header-Content-Length into the headers
    # it is given, which would then go, stale, with the next request
    return {"authorization": f"Bearer {TOKEN}"}


# ---- without a server ---------------------------------------------------------------------------


def test_committed_inference_stubs_match_the_proto(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos/inference/generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path in gen.generate(tmp_path):
        committed = ROOT / "munet/inference" / path.name
        assert path.read_text() == committed.read_text(), f"munet/inference/{path.name} is stale: run `make protos`"


def test_our_stubs_and_tritonclients_live_in_one_process():
    # both define inference.ModelInferRequest & co; ours are in a pool of their own, and the bytes agree
    from tritonclient.grpc import service_pb2 as triton_pb

    from munet.inference import grpc_predict_v2_pb2 as pb

    assert oip.SERVICE_NAME == "inference.GRPCInferenceService"
    ours = pb.ModelInferRequest(model_name="m", model_version="2", id="x")
    ours.inputs.add(name="images", datatype="UINT8", shape=[1, 2, 2, 3])
    ours.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    ours.raw_input_contents.append(bytes(12))
    theirs = triton_pb.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.outputs[0].parameters["classification"].int64_param == 3
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == ours


def test_oip_calls_are_classified_for_auth():
    assert grpc_need("/inference.GRPCInferenceService/ModelInfer") == "read"
    assert grpc_need("/inference.GRPCInferenceService/ModelMetadata") == "read"
    assert grpc_need("/inference.GRPCInferenceService/RepositoryIndex") == "read"
    for name in ("ServerLive", "ServerReady", "ServerMetadata"):
        assert grpc_need(f"/inference.GRPCInferenceService/{name}") == "open"
    for path in ("/v2/models/t/infer", "/v2/models/t/versions/2/infer", "/v2/models/t", "/v2/models/t/ready",
                 "/v2/repository/index", "/v2/anything-else"):
        assert http_need("POST", path) == "read", path
    for path in ("/v2", "/v2/", "/v2/health/live", "/v2/health/ready"):
        assert http_need("GET", path) == "open", path


def _bad(fn, *args, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as e:
        fn(*args, **kwargs)
    return e.value.message


def test_tensors_become_images_or_clear_errors():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    ims = oip.images_from_tensor("t", "images", "UINT8", [2, 3, 4, 3], raw=x.tobytes())
    assert [(bytes(i.raw), i.height, i.width, i.channels) for i in ims] == [(a.tobytes(), 3, 4, 3) for a in x]
    ims = oip.images_from_tensor("t", "images", "UINT8", [2, 3, 4], values=x[..., 0].tolist())  # nested JSON
    assert [i.channels for i in ims] == [1, 1] and bytes(ims[1].raw) == x[1, ..., 0].tobytes()
    blobs = [b"png-1", b"", b"jpeg-three"]
    raw = oip.serialize_bytes(blobs)
    assert [bytes(e) for e in oip.deserialize_bytes(raw, 3)] == blobs
    assert [bytes(i.encoded) for i in oip.images_from_tensor("t", "images", "BYTES", [3, 1], raw=raw)] == blobs

    assert "[N, H, W, C]" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [2, 3], raw=b"123456")
    assert "1, 3 or 4 channels" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, 2, 2, 2], raw=bytes(8))
    assert "holds 36" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, 3, 4, 3], raw=bytes(35))
    assert "FP32" in _bad(oip.images_from_tensor, "t", "images", "FP32", [1, 2, 2, 3], raw=bytes(48))
    assert "unexpected inference input 'x'" in _bad(oip.images_from_tensor, "t", "x", "UINT8", [1, 1, 1], raw=b"1")
    assert "no images" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [0, 2, 2, 3], raw=b"")
    assert "non-negative" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, -2, 2], raw=b"")
    assert "outside 0..255" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, 1, 2], values=[[1, 256]])
    assert "integers" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, 1, 2], values=[0.5, 1])
    assert "rectangular" in _bad(oip.images_from_tensor, "t", "images", "UINT8", [1, 1, 2], values=[[1], [1, 2]])
    assert "more than the 2" in _bad(oip.deserialize_bytes, raw, 2)
    assert "4-byte length" in _bad(oip.deserialize_bytes, raw + b"\x01", 4)
    assert "only" in _bad(oip.deserialize_bytes, raw[:-1], 3)
    assert "holds 3" in _bad(oip.deserialize_bytes, raw, 4)
    assert "[N] or [N, 1]" in _bad(oip.images_from_tensor, "t", "images", "BYTES", [3, 2], raw=raw)


def test_versions_parameters_and_classification_strings():
    assert oip.parse_version("") == 0 and oip.parse_version("12") == 12
    for v in ("0", "-1", "v2", "1.5", "latest"):
        assert "versions are the task's path versions" in _bad(oip.parse_version, v)
    assert oip.check_request_parameters({"timeout": 2_500_000, "priority": 1, "custom": "x"}) == 2.5
    assert "stateless" in _bad(oip.check_request_parameters, {"sequence_id": 7})
    assert "shared memory" in _bad(oip.requested_output, "probabilities", {"shared_memory_region": "r"})
    assert oip.requested_output("probabilities", {"classification": 3, "binary_data": True}) == \
        oip.RequestedOutput("probabilities", 3, True)
    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], np.float32)
    s = oip.classification_strings(p, ["a", "b", "c"], 2)
    assert s.tolist() == [[b"0.600000:1:b", b"0.300000:2:c"], [b"0.500000:0:a", b"0.250000:1:b"]]
    assert oip.classification_strings(p, ["a", "b", "c"], 10).shape == (2, 3)  # at most every class


def test_http_bodies_headers_and_compression():
    head = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 2], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 2}}]}).encode()
    header, tail = oip_http.split_body(head + b"\x07\x09", str(len(head)))
    assert bytes(oip_http.http_images("t", header, tail)[0].raw) == b"\x07\x09"
    assert "no input claims" in _bad(oip_http.http_images, "t", *oip_http.split_body(head + b"123", str(len(head))))
    assert "body has" in _bad(oip_http.split_body, head, str(len(head) + 1))
    assert "not valid JSON" in _bad(oip_http.split_body, b"{nope", None)
    png = base64.b64encode(b"\x89PNG...").decode()
    header = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [png]}]}
    assert bytes(oip_http.http_images("t", header, memoryview(b""))[0].encoded) == b"\x89PNG..."
    header["inputs"][0]["data"] = ["not base64!"]
    assert "base64" in _bad(oip_http.http_images, "t", header, memoryview(b""))
    assert oip_http.decompress(gzip.compress(b"abc"), "gzip") == b"abc"
    assert "inflates past" in _bad(oip_http.decompress, gzip.compress(bytes(10_000)), "gzip", 1000)
    assert "truncated" in _bad(oip_http.decompress, gzip.compress(b"abc" * 100)[:-12], "gzip")
    assert "not supported" in _bad(oip_http.decompress, b"x", "br")
    outputs, binary = oip_http.http_outputs({"outputs": [{"name": "probabilities", "parameters": {
        "classification": 2, "binary_data": False}}], "parameters": {"binary_data_output": True}})
    assert outputs == [oip.RequestedOutput("probabilities", 2, False)] and binary


# ---- against a running server -------------------------------------------------------------------


def _add_perturbed_version(home: Path, task: str) -> int:
    """A second, different path version of `task` (v1 with a perturbed head), kept but not current:
    what evolution leaves behind, made deterministically (the server loads it on request)."""
    import torch

    from munet.models.store import PathRecord, Store

    store = Store(home)
    try:
        v1 = store.get_path(task, 1)
        head = store.load_module(v1.modules[-1])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        mid = store.put_module(head, parent=v1.modules[-1])
        rec = PathRecord(task, 0, [*v1.modules[:-1], mid], hparams=dict(v1.hparams),
                         lineage={"parents": [1], "parent_task": task, "mutations": ["test: perturbed head"]},
                         status="candidate")
        return store.add_path_version(rec).version
    finally:
        store.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from test_lifecycle import Server  # the real `munet serve` process, as the lifecycle tests start it

    home = tmp_path_factory.mktemp("oip-home")
    s = Server(home, MUNET_PREDICT_TOKEN=TOKEN)
    try:
        s.wait_up()
        with MunetClient(s.target, token=TOKEN, long_timeout=300.0) as c:
            c.register_task(TASK, builtin="uci_digits", max_examples=200, seed=0)
        assert _add_perturbed_version(home, TASK) == 2
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def gclient(server) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(server.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hclient(server) -> Iterator[thttp.InferenceServerClient]:
    c = thttp.InferenceServerClient(f"127.0.0.1:{server.http}")
    yield c
    c.close()


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:3] * 15).astype(np.uint8)  # (3, 8, 8) grayscale, values 0..240


RGB = np.random.default_rng(0).integers(0, 256, (4, 20, 28, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _munet(server, images, version: int = 0) -> tuple[np.ndarray, int]:
    """munet.v1 Predict's probabilities for every class, as an (N, classes) array."""
    with MunetClient(server.target, token=TOKEN) as c:
        r = c.predict(TASK, images, top_k=LABELS, version=version)
    out = np.full((len(r.predictions), LABELS), np.nan, np.float32)
    for i, scores in enumerate(r.predictions):
        for s in scores:
            out[i, s.index] = s.probability
    assert not np.isnan(out).any()
    return out, r.version


def _ginput(x: np.ndarray, datatype: str = "UINT8", name: str = "images") -> tgrpc.InferInput:
    inp = tgrpc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _hinput(x: np.ndarray, datatype: str = "UINT8", binary: bool = True) -> thttp.InferInput:
    inp = thttp.InferInput("images", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _status(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    return e.value.status(), e.value.message()


@pytest.mark.slow
def test_grpc_lists_tasks_reads_metadata_and_health(gclient):
    assert gclient.is_server_live() and gclient.is_server_ready()  # open, like grpc.health
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "munet" and "classification" in meta["extensions"]
    index = gclient.get_model_repository_index(headers=auth(), as_json=True)
    assert [(m["name"], m["version"], m["state"]) for m in index["models"]] == [(TASK, "1", "READY")]
    m = gclient.get_model_metadata(TASK, headers=auth(), as_json=True)
    assert m["name"] == TASK and m["versions"] == ["1", "2"] and m["platform"] == oip.PLATFORM
    assert m["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "-1", "-1", "3"]}]
    assert m["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", str(LABELS)]}]
    assert gclient.get_model_metadata(TASK, "2", headers=auth()).name == TASK
    assert gclient.is_model_ready(TASK, headers=auth()) and gclient.is_model_ready(TASK, "2", headers=auth())
    assert not gclient.is_model_ready("no-such-task", headers=auth())
    assert not gclient.is_model_ready(TASK, "99", headers=auth())
    assert _status(gclient.get_model_metadata, "no-such-task", headers=auth())[0] == "StatusCode.NOT_FOUND"
    assert _status(gclient.get_model_metadata, TASK, "99", headers=auth())[0] == "StatusCode.NOT_FOUND"
    assert _status(gclient.get_model_metadata, TASK, "two", headers=auth())[0] == "StatusCode.INVALID_ARGUMENT"
    # model calls need the predict token, as munet.v1 Predict does
    assert _status(gclient.get_model_metadata, TASK)[0] == "StatusCode.UNAUTHENTICATED"
    assert _status(gclient.infer, TASK, [_ginput(RGB)])[0] == "StatusCode.UNAUTHENTICATED"


@pytest.mark.slow
def test_grpc_infer_gives_munet_predict_probabilities(server, gclient):
    want, version = _munet(server, list(RGB))
    r = gclient.infer(TASK, [_ginput(RGB)], headers=auth(), request_id="req-7")
    got = r.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (len(RGB), LABELS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    resp = r.get_response()
    assert (resp.model_name, resp.model_version, resp.id) == (TASK, str(version), "req-7")
    # grayscale [N, H, W] and RGBA [N, H, W, 4]
    gray = _digits()
    np.testing.assert_allclose(gclient.infer(TASK, [_ginput(gray)], headers=auth()).as_numpy("probabilities"),
                               _munet(server, list(gray))[0], rtol=0, atol=1e-6)
    rgba = np.concatenate([RGB, np.full(RGB.shape[:3] + (1,), 200, np.uint8)], axis=3)
    np.testing.assert_allclose(gclient.infer(TASK, [_ginput(rgba)], headers=auth()).as_numpy("probabilities"),
                               _munet(server, list(rgba))[0], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_grpc_version_bytes_and_classification(server, gclient):
    v1, _ = _munet(server, list(RGB), version=1)
    v2, version = _munet(server, list(RGB), version=2)
    assert version == 2 and not np.allclose(v1, v2, atol=1e-3)  # a genuinely different path
    r = gclient.infer(TASK, [_ginput(RGB)], model_version="2", headers=auth())
    np.testing.assert_allclose(r.as_numpy("probabilities"), v2, rtol=0, atol=1e-6)
    assert r.get_response().model_version == "2"
    np.testing.assert_allclose(gclient.infer(TASK, [_ginput(RGB)], model_version="1", headers=auth())
                               .as_numpy("probabilities"), v1, rtol=0, atol=1e-6)

    pngs = [_png(a) for a in RGB]
    want, _ = _munet(server, pngs)
    got = gclient.infer(TASK, [_ginput(np.array(pngs, dtype=np.object_), "BYTES")], headers=auth())
    np.testing.assert_allclose(got.as_numpy("probabilities"), want, rtol=0, atol=1e-6)

    out = tgrpc.InferRequestedOutput("probabilities", class_count=3)
    top = gclient.infer(TASK, [_ginput(RGB)], outputs=[out], headers=auth()).as_numpy("probabilities")
    assert top.shape == (len(RGB), 3)
    current, _ = _munet(server, list(RGB))
    with MunetClient(server.target, token=TOKEN) as c:
        labels = c.get_task(TASK).labels
    for row, strings in zip(current, top, strict=True):  # Triton's "<value>:<index>:<label>", best first
        parsed = [s.decode().split(":", 2) for s in strings]
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-row, kind="stable")[:3])
        assert all(label == labels[int(i)] and abs(float(p) - row[int(i)]) < 1e-6 for p, i, label in parsed)


@pytest.mark.slow
def test_grpc_refuses_bad_requests_clearly(gclient):
    def code(*args, **kwargs) -> tuple[str, str]:
        return _status(gclient.infer, *args, headers=auth(), **kwargs)

    assert code("no-such-task", [_ginput(RGB)])[0] == "StatusCode.NOT_FOUND"
    assert code(TASK, [_ginput(RGB)], model_version="99")[0] == "StatusCode.NOT_FOUND"
    assert code(TASK, [_ginput(RGB)], model_version="latest")[0] == "StatusCode.INVALID_ARGUMENT"
    status, message = code(TASK, [_ginput(RGB[:, :, :, :2])])
    assert status == "StatusCode.INVALID_ARGUMENT" and "channels" in message
    status, message = code(TASK, [_ginput(RGB.reshape(4, -1))])
    assert status == "StatusCode.INVALID_ARGUMENT" and "[N, H, W, C]" in message
    status, message = code(TASK, [_ginput(RGB.astype(np.float32), "FP32")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "FP32" in message
    status, message = code(TASK, [_ginput(RGB, name="pixels")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "'images'" in message
    status, message = code(TASK, [_ginput(np.array([b"not an image"], dtype=np.object_), "BYTES")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "image 0" in message
    status, message = code(TASK, [_ginput(RGB)], outputs=[tgrpc.InferRequestedOutput("logits")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "'logits'" in message
    bad = _ginput(RGB)
    bad.set_shape([4, 20, 28, 4])  # the shape says more bytes than were sent
    assert code(TASK, [bad])[0] == "StatusCode.INVALID_ARGUMENT"
    assert code(TASK, [_ginput(RGB)], sequence_id=3)[0] == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.slow
def test_http_lists_tasks_reads_metadata_and_health(server, hclient):
    assert hclient.is_server_live() and hclient.is_server_ready()
    meta = hclient.get_server_metadata()
    assert meta["name"] == "munet" and "classification" in meta["extensions"]
    assert hclient.get_model_repository_index(headers=auth()) == [{"name": TASK, "version": "1", "state": "READY"}]
    m = hclient.get_model_metadata(TASK, headers=auth())
    assert m == {"name": TASK, "versions": ["1", "2"], "platform": oip.PLATFORM,
                 "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
                 "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, LABELS]}]}
    assert hclient.get_model_metadata(TASK, "2", headers=auth())["versions"] == ["1", "2"]
    assert hclient.is_model_ready(TASK, headers=auth()) and hclient.is_model_ready(TASK, "2", headers=auth())
    assert not hclient.is_model_ready("no-such-task", headers=auth())
    assert _status(hclient.get_model_metadata, "no-such-task", headers=auth())[0] == "404"
    assert _status(hclient.get_model_metadata, TASK, "two", headers=auth())[0] == "400"
    status, message = _status(hclient.get_model_metadata, TASK)  # no token: KServe's {"error": ...} too
    assert status == "401" and "bearer token" in message
    # the plain protocol, as curl users see it
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/nope", headers=auth())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404 and "nope" in json.loads(e.value.read())["error"]
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/{TASK}/infer", headers=auth())
    with pytest.raises(urllib.error.HTTPError) as e:  # GET, not POST
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and json.loads(e.value.read())["error"]


@pytest.mark.slow
def test_http_infer_binary_and_json_give_munet_predict_probabilities(server, hclient):
    want, version = _munet(server, list(RGB))
    r = hclient.infer(TASK, [_hinput(RGB)], headers=auth(), request_id="h-1")  # tritonclient's defaults: binary
    np.testing.assert_allclose(r.as_numpy("probabilities"), want, rtol=0, atol=1e-6)
    resp = r.get_response()
    assert (resp["model_name"], resp["model_version"], resp["id"]) == (TASK, str(version), "h-1")
    # JSON in, JSON out
    out = thttp.InferRequestedOutput("probabilities", binary_data=False)
    r = hclient.infer(TASK, [_hinput(RGB, binary=False)], outputs=[out], headers=auth())
    assert "data" in r.get_output("probabilities")
    np.testing.assert_allclose(r.as_numpy("probabilities"), want, rtol=0, atol=1e-6)
    # a compressed request, grayscale, and version 2
    gray = _digits()
    r = hclient.infer(TASK, [_hinput(gray)], headers=auth(), request_compression_algorithm="gzip")
    np.testing.assert_allclose(r.as_numpy("probabilities"), _munet(server, list(gray))[0], rtol=0, atol=1e-6)
    r = hclient.infer(TASK, [_hinput(RGB)], model_version="2", headers=auth())
    np.testing.assert_allclose(r.as_numpy("probabilities"), _munet(server, list(RGB), version=2)[0],
                               rtol=0, atol=1e-6)
    assert r.get_response()["model_version"] == "2"


@pytest.mark.slow
def test_http_bytes_classification_and_errors(server, hclient):
    pngs = [_png(a) for a in RGB]
    want, _ = _munet(server, pngs)
    r = hclient.infer(TASK, [_hinput(np.array(pngs, dtype=np.object_), "BYTES")], headers=auth())
    np.testing.assert_allclose(r.as_numpy("probabilities"), want, rtol=0, atol=1e-6)
    for binary in (True, False):
        out = thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)
        top = hclient.infer(TASK, [_hinput(RGB)], outputs=[out], headers=auth()).as_numpy("probabilities")
        assert top.shape == (len(RGB), 2)
        first = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in top[:, 0]]
        assert [int(i) for _, i, _ in first] == list(np.argmax(want, axis=1))
    # base64 encoded images in plain JSON, as curl users send them
    body = {"inputs": [{"name": "images", "shape": [len(pngs)], "datatype": "BYTES",
                        "data": [base64.b64encode(p).decode() for p in pngs]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/{TASK}/infer",
                                 data=json.dumps(body).encode(), headers={**auth(), "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"]),
                               want, rtol=0, atol=1e-6)

    assert _status(hclient.infer, "no-such-task", [_hinput(RGB)], headers=auth())[0] == "404"
    assert _status(hclient.infer, TASK, [_hinput(RGB)], model_version="99", headers=auth())[0] == "404"
    status, message = _status(hclient.infer, TASK, [_hinput(RGB.reshape(4, -1))], headers=auth())
    assert status == "400" and "[N, H, W, C]" in message
    status, message = _status(hclient.infer, TASK, [_hinput(RGB.astype(np.float32), "FP32")], headers=auth())
    assert status == "400" and "FP32" in message
    status, message = _status(hclient.infer, TASK, [_hinput(RGB)], headers=auth(),
                              outputs=[thttp.InferRequestedOutput("logits")])
    assert status == "400" and "'logits'" in message
    assert _status(hclient.infer, TASK, [_hinput(RGB)])[0] == "401"


@pytest.mark.slow
def test_oip_requests_are_counted_by_protocol(server, gclient, hclient):
    gclient.infer(TASK, [_ginput(RGB)], headers=auth())
    hclient.infer(TASK, [_hinput(RGB)], headers=auth())
    text = server.metrics()
    for protocol in ("oip-grpc", "oip-http"):
        ok = [line for line in text.splitlines() if line.startswith("munet_requests_total")
              and f'protocol="{protocol}"' in line and f'task="{TASK}"' in line and 'code="OK"' in line]
        assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1, protocol
        assert re.search(rf'munet_request_latency_seconds_count{{[^}}]*protocol="{protocol}"', text), protocol
        # and Triton's split of the server's time, as for munet.v1
        for part in ("queue", "compute", "overhead"):
            m = re.search(rf'munet_request_{part}_seconds_count{{[^}}]*protocol="{protocol}"[^}}]*}} (\S+)', text)
            assert m and float(m.group(1)) >= 1, (part, protocol)
