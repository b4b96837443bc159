"""End-to-end tests of the gRPC API over a real loopback channel: the client, the servicer, the core."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from prometheus_client import REGISTRY

from munet.cli import main as cli_main
from munet.client import MunetClient, MunetClientError
from munet.data.builtin import load_builtin
from munet.service.grpc_server import create_grpc_server, stop_grpc_server
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # imported for real by pytest_plugins (an earlier import would skip assert rewriting)
    from grpc_fixtures import Served

pytestmark = pytest.mark.slow
# the `served` fixture: one real server for the whole module
pytest_plugins = ["grpc_fixtures"]

DIGITS_MAX = 600


def _row_keys(x: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in x.reshape(len(x), -1)]


@pytest.fixture(scope="module")
def digits(served: Served) -> dict:
    """The uci_digits task, and images of the data set that its 600-example sample left out."""
    task = served.client.register_task("digits", builtin="uci_digits", max_examples=DIGITS_MAX, seed=0)
    full = load_builtin("uci_digits")
    used = set(_row_keys(load_builtin("uci_digits", max_examples=DIGITS_MAX, seed=0).x))
    held_out = np.array([i for i, k in enumerate(_row_keys(full.x)) if k not in used])
    return {"task": task, "x": full.x[held_out], "y": full.y[held_out]}


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.MunetStub]:
    # a raw stub, for requests the typed client would never build
    with grpc.insecure_channel(served.target) as channel:
        yield pb_grpc.MunetStub(channel)


def _code(call, *args, **kwargs) -> str:
    with pytest.raises(MunetClientError) as e:
        call(*args, **kwargs)
    return e.value.code


def _raw_code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=30)
    return e.value.code(), e.value.details()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _requests(task: str, code: str) -> float:
    return REGISTRY.get_sample_value("munet_requests_total", {"task": task, "protocol": "grpc", "code": code}) or 0.0


# ---- standard services --------------------------------------------------------------------------


def test_health_reports_serving_for_server_and_munet_service(served: Served) -> None:
    assert served.client.health("") == "SERVING"
    assert served.client.health("munet.v1.Munet") == "SERVING"
    assert _code(served.client.health, "no.such.Service") == "NOT_FOUND"


def test_reflection_lists_and_describes_the_munet_service(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"munet.v1.Munet", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("munet.v1.Munet")
        methods = {m.name for s in fd.service if s.name == "Munet" for m in s.method}
        assert {"Predict", "RegisterTask", "AddExamples", "Rollback"} <= methods


def test_a_second_server_on_the_same_port_fails_instead_of_sharing_it(served: Served) -> None:
    async def bind() -> None:
        create_grpc_server(served.app.core, None, served.app.config, served.target)

    with pytest.raises(OSError, match="cannot bind"):
        served.loop.run(bind())


# ---- registration and prediction ----------------------------------------------------------------


def test_builtin_task_predicts_held_out_images(served: Served, digits: dict) -> None:
    task = digits["task"]
    assert task.name == "digits" and task.labels == [str(d) for d in range(10)]
    assert task.train_examples + task.validation_examples + task.test_examples == DIGITS_MAX
    assert task.path is not None and task.current_version == task.path.version >= 1

    x, y = digits["x"][:200], digits["y"][:200]
    assert len(x) == 200
    ok_before = _requests("digits", "OK")
    # half as raw pixel arrays, half as PNG files: both wire forms must land on the same model input
    raw = served.client.predict("digits", [im for im in x[:100]], top_k=3)
    enc = served.client.predict("digits", [_png(im) for im in x[100:]], top_k=3)
    assert raw.version == enc.version == task.current_version
    preds = [p for r in (raw, enc) for p in r.predictions]
    assert all(len(p) == 3 and p[0].probability >= p[1].probability >= p[2].probability for p in preds)
    assert all(p[0].label == str(p[0].index) for p in preds)
    # the wire changes nothing: the same answers as the core's own run on the same pixels
    _, logits = served.app.core.predict_sync("digits", x)
    assert [p[0].index for p in preds] == logits.argmax(axis=1).tolist()
    accuracy = float(np.mean([p[0].index == label for p, label in zip(preds, y, strict=True)]))
    assert accuracy > 0.5, (accuracy, task.path.validation_accuracy)
    assert _requests("digits", "OK") == ok_before + 2


def test_uploaded_examples_register_a_task(served: Served) -> None:
    data = load_builtin("uci_digits", max_examples=300, seed=7)
    gray = data.x[:, :, :, 0]  # streamed as (32, 32) gray images, expanded to RGB by the server
    split = np.full(300, -1)
    split[:60], split[60:100] = 1, 2
    task = served.client.register_task("uploaded", labels=[f"d{i}" for i in range(10)],
                                       examples=(gray, data.y, split), chunk=64, seed=3)
    assert task.source == "upload" and task.labels[3] == "d3"
    assert task.train_examples + task.validation_examples + task.test_examples == 300
    assert task.validation_examples >= 60 and task.test_examples >= 40
    r = served.client.predict("uploaded", list(gray[:5]))  # five (H, W) images; a bare (5, H, W) is refused
    assert r.version == task.current_version and len(r.predictions) == 5
    assert r.predictions[0][0].label.startswith("d")


def test_npz_in_the_import_dir_registers_a_task(served: Served) -> None:
    data = load_builtin("uci_digits", max_examples=400, seed=1)
    keep = data.y < 3
    path = served.app.config.imports / "three.npz"
    np.savez(path, x=data.x[keep], y=data.y[keep], label_names=np.array(["zero", "one", "two"]))
    task = served.client.register_task("three", npz_file="three.npz")
    assert task.source == "three.npz" and task.labels == ["zero", "one", "two"]
    assert task.train_examples + task.validation_examples + task.test_examples == int(keep.sum())
    assert {p.label for ps in served.client.predict("three", data.x[keep][:8]).predictions for p in ps} <= \
        {"zero", "one", "two"}


def test_list_and_get_describe_tasks(served: Served, digits: dict) -> None:
    names = {t.name for t in served.client.list_tasks()}
    assert "digits" in names
    t = served.client.get_task("digits")
    assert t.status and t.created_at and t.source == "uci_digits"
    p = t.path
    assert p is not None and p.status == "current" and p.version == t.current_version
    assert 0.0 <= p.validation_accuracy <= 1.0 and p.score > 0
    assert p.modules[0].kind == "embed" and p.modules[-1].kind == "head"
    assert p.params == sum(m.params for m in p.modules) > 0
    assert 0 < p.accounted_params <= p.params
    assert isinstance(p.hyperparameters, dict) and p.hyperparameters
    assert t.lineage and t.lineage[-1].version == t.current_version

    v = served.client.list_versions("digits")
    assert v.task == "digits" and v.current_version == t.current_version
    # registered and not evolved yet (the module's generation test comes later): nothing older to roll back to
    assert [x.version for x in v.versions] == [t.current_version]
    assert _code(served.client.rollback, "digits") == "FAILED_PRECONDITION"
    assert _code(served.client.rollback, "digits", 99) == "NOT_FOUND"
    assert _code(served.client.list_versions, "nope") == "NOT_FOUND"


def test_add_examples_to_a_live_task(served: Served, digits: dict) -> None:
    before = served.client.get_task("digits")
    total = before.train_examples + before.validation_examples + before.test_examples
    r = served.client.add_examples("digits", digits["x"][200:230], digits["y"][200:230], chunk=8)
    assert r.task == "digits" and r.added == 30 and r.train + r.validation + r.test == 30
    assert r.total_examples == total + 30
    assert _code(served.client.add_examples, "digits", digits["x"][:2], [1, 10]) == "INVALID_ARGUMENT"
    assert _code(served.client.add_examples, "nope", digits["x"][:2], [1, 2]) == "NOT_FOUND"


def test_delete_task_removes_it(served: Served, digits: dict) -> None:
    data = load_builtin("uci_digits", max_examples=120, seed=5)
    keep = data.y < 2
    served.client.register_task("doomed", labels=["a", "b"], examples=(data.x[keep], data.y[keep]))
    assert served.client.delete_task("doomed") == "doomed"
    assert "doomed" not in {t.name for t in served.client.list_tasks()}
    assert _code(served.client.get_task, "doomed") == "NOT_FOUND"
    assert _code(served.client.predict, "doomed", data.x[:1]) == "NOT_FOUND"
    assert _code(served.client.delete_task, "doomed") == "NOT_FOUND"
    # the other tasks' paths (which share the root's modules) still serve
    assert served.client.predict("digits", digits["x"][:2]).version >= 1


# ---- bad inputs ---------------------------------------------------------------------------------


def test_bad_predict_requests_get_precise_codes(served: Served, digits: dict, stub) -> None:
    unknown_before = _requests("unknown", "NOT_FOUND")
    assert _code(served.client.predict, "no-such-task", digits["x"][:1]) == "NOT_FOUND"
    assert _requests("unknown", "NOT_FOUND") == unknown_before + 1

    code, details = _raw_code(stub.Predict, pb.PredictRequest(
        task="digits", images=[pb.Image(encoded=_png(digits["x"][0])), pb.Image(encoded=b"not an image")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in details
    raw = pb.RawImage(data=bytes(10), height=4, width=4, channels=1)
    assert _raw_code(stub.Predict, pb.PredictRequest(task="digits", images=[pb.Image(raw=raw)]))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _raw_code(stub.Predict, pb.PredictRequest(task="digits"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _raw_code(stub.Predict, pb.PredictRequest(task="digits", images=[pb.Image()]))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_bad_registrations_get_precise_codes(served: Served, digits: dict, stub) -> None:
    c = served.client
    x, y = digits["x"][:40], digits["y"][:40]
    assert _code(c.register_task, "digits", builtin="uci_digits", max_examples=100) == "ALREADY_EXISTS"
    assert _code(c.register_task, "escape", npz_file="../x.npz") == "INVALID_ARGUMENT"
    assert _code(c.register_task, "missing", npz_file="missing.npz") == "NOT_FOUND"
    assert _code(c.register_task, "Bad Name!", labels=[str(i) for i in range(10)], examples=(x, y)) == \
        "INVALID_ARGUMENT"
    assert _code(c.register_task, "labels", labels=["a", "b"], examples=(x, y)) == "INVALID_ARGUMENT"
    assert _code(c.register_task, "nosource") == "INVALID_ARGUMENT"
    assert _code(c.register_task, "unknown-set", builtin="imagenet") == "INVALID_ARGUMENT"
    assert _code(c.register_task, "frac", builtin="uci_digits", validation_fraction=0.7) == "INVALID_ARGUMENT"

    examples = pb.ExampleBatch(examples=[pb.LabelledImage(image=pb.Image(encoded=_png(x[0])), label=1)])
    code, details = _raw_code(stub.RegisterTask, iter([pb.RegisterTaskRequest(examples=examples)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec" in details
    assert _raw_code(stub.RegisterTask, iter([]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    two_specs = [pb.RegisterTaskRequest(spec=pb.TaskSpec(name="twice", builtin="uci_digits"))] * 2
    assert _raw_code(stub.RegisterTask, iter(two_specs))[0] == grpc.StatusCode.INVALID_ARGUMENT

    # more examples than the server takes per task: refused while streaming
    big = np.zeros((1600, 8, 8), np.uint8)
    code = _code(c.register_task, "huge", labels=["a", "b"], examples=(big, np.arange(1600) % 2), chunk=400)
    assert code == "INVALID_ARGUMENT"

    assert {t.name for t in c.list_tasks()}.isdisjoint({"escape", "labels", "huge", "twice", "frac"})


def test_server_keeps_answering_after_bad_inputs(served: Served, digits: dict, stub) -> None:
    for _ in range(3):
        _raw_code(stub.Predict, pb.PredictRequest(task="digits", images=[pb.Image(encoded=b"\x89PNG broken")]))
        _raw_code(stub.RegisterTask, iter([pb.RegisterTaskRequest()]))
    assert served.client.health() == "SERVING"
    r = served.client.predict("digits", digits["x"][:20])
    accuracy = np.mean([p[0].index == t for p, t in zip(r.predictions, digits["y"][:20], strict=True)])
    assert accuracy > 0.5


# ---- evolution ---------------------------------------------------------------------------------


class RecordingEvolution:
    """Stands in for the evolution engine to check how the servicer translates its calls and dicts."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def trigger(self, task: str | None, candidates: int, budget_s: float, wait: bool) -> dict:
        self.calls.append((task, candidates, budget_s, wait))
        await asyncio.sleep(0)
        return {"running": True, "current_task": task or "digits", "candidates_done": 0, "candidates_total": 3,
                "generations": 4, "scheduler_enabled": False, "interval_seconds": 60.0, "recent": []}

    def status(self) -> dict:
        return {"running": False, "generations": 5, "paused_for_load": True, "unknown_key": "ignored",
                "recent": [{"task": "digits", "generation": 5, "candidates": 3, "best_score": 0.91,
                            "incumbent_score": 0.9, "promoted": True, "promoted_version": 2, "error": None,
                            "started_at": "2025-01-01T00:00:00+00:00", "seconds": 12.5}]}


def _extra_server(served: Served, evolution: object | None) -> tuple[grpc.aio.Server, int]:
    async def start() -> tuple[grpc.aio.Server, int]:
        server, port = create_grpc_server(served.app.core, evolution, served.app.config, "127.0.0.1:0")
        await server.start()
        return server, port

    return served.loop.run(start())


def test_evolution_rpcs_refuse_when_evolution_is_disabled(served: Served) -> None:
    server, port = _extra_server(served, None)
    try:
        with MunetClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(MunetClientError, match="evolution is disabled") as e:
                c.trigger_evolution("digits")
            assert e.value.code == "FAILED_PRECONDITION"
            assert _code(c.evolution_status) == "FAILED_PRECONDITION"
            assert c.list_tasks() is not None  # the rest of the API is unaffected
    finally:
        served.loop.run(stop_grpc_server(server, grace=1.0))


def test_evolution_calls_and_reports_are_translated(served: Served) -> None:
    evo = RecordingEvolution()
    server, port = _extra_server(served, evo)
    try:
        with MunetClient(f"127.0.0.1:{port}") as c:
            s = c.trigger_evolution("", candidates=3, budget_seconds=2.5, wait=True)
            assert evo.calls == [(None, 3, 2.5, True)]
            assert s.running and s.current_task == "digits" and s.candidates_total == 3 and s.generations == 4
            st = c.evolution_status()
            assert not st.running and st.paused_for_load and st.generations == 5
            (r,) = st.recent
            assert (r.task, r.promoted, r.promoted_version, r.error, r.seconds) == ("digits", True, 2, "", 12.5)
            assert r.best_score == pytest.approx(0.91)
            # graceful shutdown: health turns NOT_SERVING while the server still answers
            served.loop.run(server.munet_health.shutting_down())
            assert c.health("") == c.health("munet.v1.Munet") == "NOT_SERVING"
    finally:
        served.loop.run(stop_grpc_server(server, grace=1.0))


# ---- the command line, against the same server (the last tests: a generation may change versions) -


def _cli(served: Served, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["--target", served.target, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_lists_gets_and_predicts(served: Served, digits: dict, tmp_path, capsys) -> None:
    rc, out, _ = _cli(served, capsys, "tasks", "list")
    assert rc == 0 and out.splitlines()[0].startswith("NAME") and "digits" in out
    rc, out, _ = _cli(served, capsys, "tasks", "get", "digits", "--json")
    assert rc == 0 and json.loads(out)["labels"] == [str(d) for d in range(10)]
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(_png(digits["x"][i]))
    rc, out, _ = _cli(served, capsys, "predict", "--task", "digits", "--top-k", "2", *map(str, files))
    assert rc == 0 and out.startswith("task digits, version") and len(out.splitlines()) == 4
    rc, out, err = _cli(served, capsys, "tasks", "get", "nope")
    assert rc == 3 and out == "" and err.startswith("error: NOT_FOUND: ")  # exit codes by error class
    rc, _, err = _cli(served, capsys, "predict", "--task", "digits", str(tmp_path / "missing.png"))
    assert rc == 4 and "no such file" in err


def test_a_triggered_generation_runs_and_is_reported(served: Served, digits: dict, capsys) -> None:
    c = served.client
    before = c.evolution_status()
    assert not before.running and not before.scheduler_enabled
    assert _code(c.trigger_evolution, "no-such-task") == "NOT_FOUND"
    # any candidate now beats the incumbent: its stored score drops to 0, marked as the score of the
    # current examples (examples were added since registration: it would be rescored otherwise)
    store = served.app.store
    cur = store.get_path("digits")
    store.update_path("digits", cur.version, score=0.0,
                      lineage={**cur.lineage, "examples_version": store.examples_version("digits")})
    # `evolve --wait` triggers without waiting and polls GetEvolutionStatus until the generation ends
    rc, out, err = _cli(served, capsys, "evolve", "--task", "digits", "--candidates", "1", "--budget", "1",
                        "--wait")
    assert rc == 0, err
    after = c.evolution_status()
    assert not after.running and after.generations == before.generations + 1
    report = after.recent[-1]
    assert report.task == "digits" and report.error == "" and report.candidates == 1
    assert "digits" in out
    t = c.get_task("digits")
    assert report.promoted, report
    assert t.current_version == report.promoted_version
    versions = c.list_versions("digits").versions
    assert len(versions) >= 2
    back = c.rollback("digits")
    assert back.current_version < report.promoted_version
    assert c.predict("digits", digits["x"][:1]).version == back.current_version
