"""Every munet.v1 call and its HTTP twin give the same answers and the same errors.

The table of operations (munet/service/semantics.py) names each call's gRPC method, HTTP route, access
and defaults; the REST app is built from it. Here each row runs over both transports against one
`munet serve` (conftest's `munet_serve`): an HTTP answer, read into the gRPC message with the servicer's
own `to_message`, must equal the gRPC answer, and an HTTP error must carry the gRPC status's name, its
message and the status's HTTP twin (NOT_FOUND 404, INVALID_ARGUMENT 400, FAILED_PRECONDITION 412, ...).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.openapi.utils import get_openapi
from PIL import Image
from serve_fixture import ADMIN, Served

from munet.client import add_requests
from munet.data.builtin import load_builtin
from munet.errors import MunetError
from munet.service.auth import grpc_need, http_need
from munet.service.grpc_server import task_spec, to_message
from munet.service.rest import create_app
from munet.service.rest_models import RegisterRequest
from munet.service.semantics import OPERATIONS, default
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

HTTP_STATUS = {cls.code: cls.http_status for cls in MunetError.__subclasses__()}

# ---- the table itself (no server) ---------------------------------------------------------------


def test_the_table_has_every_rpc_and_the_rest_app_every_route_of_it():
    assert set(OPERATIONS) == set(pb.DESCRIPTOR.services_by_name["Munet"].methods_by_name)
    app = create_app(lambda: None, lambda: None)
    # the paths BentoML merges into /docs.json, read the way it reads them
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes == {(op.method, op.path) for op in OPERATIONS.values()}


def test_access_comes_from_the_table_on_both_transports():
    for op in OPERATIONS.values():
        assert grpc_need(f"/munet.v1.Munet/{op.rpc}") == op.access, op.rpc
        assert http_need(op.method, op.path.replace("{name}", "t")) == op.access, op.http
    assert http_need("GET", "/tasks") == "read" and http_need("POST", "/tasks") == "admin"
    assert http_need("PUT", "/tasks/t") == "admin"  # a wrong method on a write's route: the strictest, not open
    assert http_need("HEAD", "/tasks/t") == "read"
    for path in ("/", "/docs", "/docs.json", "/metrics", "/readyz", "/livez", "/v2"):
        assert http_need("GET", path) == "open", path


def test_a_fraction_left_out_is_the_default_and_a_zero_is_zero_on_both_transports():
    for name in ("validation_fraction", "test_fraction"):
        assert default("RegisterTask", name) == 0.1
        # gRPC: unset (as every client built from the released proto sends a 0) -> the default ...
        released_zero = pb.TaskSpec.FromString(pb.TaskSpec(name="t").SerializeToString())
        assert getattr(task_spec(released_zero), name) == getattr(RegisterRequest(name="t"), name) == 0.1
        # ... and a 0 that is sent is 0, as over HTTP
        sent_zero = pb.TaskSpec.FromString(pb.TaskSpec(name="t", **{name: 0.0}).SerializeToString())
        assert sent_zero.HasField(name)
        assert getattr(task_spec(sent_zero), name) == getattr(RegisterRequest(name="t", **{name: 0}), name) == 0.0


# ---- both transports against one server ---------------------------------------------------------


class Twins:
    """Calls a munet_serve over gRPC (raw stubs: the answer is the message) and over HTTP."""

    def __init__(self, served: Served):
        self.s = served
        self.channel = grpc.insecure_channel(served.target)
        self.stub = pb_grpc.MunetStub(self.channel)

    def grpc(self, method: str, request: Any, timeout: float = 300) -> tuple[str, Any]:
        """(status name, the answer or the error's details)."""
        try:
            return "OK", getattr(self.stub, method)(request, timeout=timeout,
                                                    metadata=[("authorization", f"Bearer {ADMIN}")])
        except grpc.RpcError as e:
            return e.code().name, e.details()

    def http(self, rpc: str, name: str = "", body: dict | None = None, **kw: Any) -> tuple[int, Any]:
        op = OPERATIONS[rpc]
        return self.s.call(op.method, op.path.replace("{name}", name), body, **kw)

    def same(self, g: tuple[str, Any], h: tuple[int, Any], message: type, adapt: Callable = lambda d: d) -> Any:
        """Both answered, with the same message; returns it."""
        assert g[0] == "OK", g
        assert h[0] in (200, 201), h
        assert to_message(message, adapt(h[1])) == g[1]
        return g[1]

    def same_error(self, g: tuple[str, Any], h: tuple[int, Any], code: str) -> None:
        """Both failed with `code`, the same message and the code's HTTP status."""
        assert g[0] == code, g
        assert h == (HTTP_STATUS[code], {"code": code, "message": g[1]}), (h, g)


@pytest.fixture(scope="module")
def twins(munet_serve):
    t = Twins(munet_serve)
    yield t
    t.channel.close()


def _npz(x: np.ndarray, y: np.ndarray, **extra: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, **extra)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pair(twins):
    """Two tasks from one .npz of the import directory, registered the same way, `sem-g` over gRPC and
    `sem-h` over HTTP, both with test_fraction 0 (sent) and the default validation_fraction (left out)."""
    ds = load_builtin("uci_digits", max_examples=150, seed=2)
    imports = twins.s.home / "imports"
    imports.mkdir(exist_ok=True)
    (imports / "sem.npz").write_bytes(_npz(ds.x, ds.y, label_names=np.array(ds.labels)))
    spec = pb.TaskSpec(name="sem-g", npz_file="sem.npz", seed=3, test_fraction=0.0)
    g = twins.grpc("RegisterTask", iter([pb.RegisterTaskRequest(spec=spec),
                                         pb.RegisterTaskRequest(end=pb.UploadEnd())]))
    h = twins.http("RegisterTask", body={"name": "sem-h", "npz_file": "sem.npz", "seed": 3, "test_fraction": 0})
    assert g[0] == "OK" and h[0] == 201, (g, h)
    return g[1], h[1]


def _register(twins: Twins, spec: dict) -> tuple[tuple[str, Any], tuple[int, Any]]:
    g = twins.grpc("RegisterTask", iter([pb.RegisterTaskRequest(spec=pb.TaskSpec(**spec)),
                                         pb.RegisterTaskRequest(end=pb.UploadEnd())]))
    return g, twins.http("RegisterTask", body=spec)


def predict(t: Twins, pair) -> None:
    ds = load_builtin("uci_digits", max_examples=20, seed=7)
    png = io.BytesIO()
    Image.fromarray(ds.x[0]).save(png, format="PNG")
    h, w, c = ds.x[1].shape
    body = {"task": "sem-h", "images": [base64.b64encode(png.getvalue()).decode()], "arrays": [ds.x[1].tolist()]}
    images = [pb.Image(encoded=png.getvalue()),
              pb.Image(raw=pb.RawImage(data=ds.x[1].tobytes(), height=h, width=w, channels=c))]

    def answer(d: dict) -> dict:
        return {**d, "predictions": [{"top": p} for p in d["predictions"]]}

    for params in ({"top_k": 3}, {"top_k": 0}, {}, {"version": 1}):  # top_k 0 (and absent) means 1
        g = t.grpc("Predict", pb.PredictRequest(task="sem-h", images=images, **params))
        t.same(g, t.http("Predict", body={**body, **params}), pb.PredictResponse, answer)
    assert len(g[1].predictions[0].top) == 1
    for code, request, json_body in (
            ("NOT_FOUND", {"task": "nope", "images": images}, {**body, "task": "nope"}),
            ("INVALID_ARGUMENT", {"task": "sem-h"}, {"task": "sem-h"}),
            ("INVALID_ARGUMENT", {"task": "sem-h", "images": [pb.Image(encoded=b"not an image")]},
             {"task": "sem-h", "images": [base64.b64encode(b"not an image").decode()]}),
            ("NOT_FOUND", {"task": "sem-h", "images": images, "version": 99}, {**body, "version": 99})):
        t.same_error(t.grpc("Predict", pb.PredictRequest(**request)), t.http("Predict", body=json_body), code)


def register_task(t: Twins, pair) -> None:
    g, h = pair
    got = to_message(pb.Task, h)
    for f in ("labels", "state", "current_version", "train_examples", "validation_examples", "test_examples",
              "source", "root", "image_size", "policy", "evolution", "pending_versions"):
        assert getattr(got, f) == getattr(g, f), f
    assert g.test_examples == 0 < g.validation_examples  # 0 sent is 0; left out is the default
    # validation_fraction 0 means none on both transports, so both refuse the task alike
    spec = {"name": "sem-x", "npz_file": "sem.npz", "validation_fraction": 0.0}
    t.same_error(*_register(t, spec), "INVALID_ARGUMENT")
    # 0.75, not 0.7: the proto's float32 holds it exactly, so both messages quote the same number
    t.same_error(*_register(t, {**spec, "validation_fraction": 0.75}), "INVALID_ARGUMENT")
    t.same_error(*_register(t, {"name": "sem-x", "builtin": "no_such_set"}), "INVALID_ARGUMENT")
    t.same_error(*_register(t, {"name": "sem-x", "npz_file": "missing.npz"}), "NOT_FOUND")
    g_dup = t.grpc("RegisterTask", iter([pb.RegisterTaskRequest(spec=pb.TaskSpec(name="sem-h", npz_file="sem.npz")),
                                         pb.RegisterTaskRequest(end=pb.UploadEnd())]))
    t.same_error(g_dup, t.http("RegisterTask", body={"name": "sem-h", "npz_file": "sem.npz"}), "ALREADY_EXISTS")


def add_examples(t: Twins, pair) -> None:
    size = pair[0].image_size  # at the task's size, so both uploads store the very same pixels
    x = np.random.default_rng(0).integers(0, 256, (12, size, size, 3), dtype=np.uint8)
    y = np.arange(12) % 10
    g = t.grpc("AddExamples", add_requests("sem-g", x, y))
    h = t.http("AddExamples", "sem-h", files=[("file", _npz(x, y))])
    t.same(g, h, pb.AddExamplesResponse, lambda d: {**d, "task": "sem-g"})
    t.same_error(t.grpc("AddExamples", add_requests("nope", x, y)),
                 t.http("AddExamples", "nope", files=[("file", _npz(x, y))]), "NOT_FOUND")
    t.same_error(t.grpc("AddExamples", add_requests("sem-g", x[:1], [99])),
                 t.http("AddExamples", "sem-g", files=[("file", _npz(x[:1], np.array([99])))]), "INVALID_ARGUMENT")


def list_tasks(t: Twins, pair) -> None:
    t.same(t.grpc("ListTasks", pb.ListTasksRequest()), t.http("ListTasks"), pb.ListTasksResponse,
           lambda tasks: {"tasks": tasks})


def get_task(t: Twins, pair) -> None:
    for name in ("sem-g", "sem-h", "digits-demo"):
        t.same(t.grpc("GetTask", pb.GetTaskRequest(name=name)), t.http("GetTask", name), pb.Task)
    t.same_error(t.grpc("GetTask", pb.GetTaskRequest(name="nope")), t.http("GetTask", "nope"), "NOT_FOUND")


def list_versions(t: Twins, pair) -> None:
    t.same(t.grpc("ListVersions", pb.ListVersionsRequest(task="sem-h")), t.http("ListVersions", "sem-h"),
           pb.ListVersionsResponse)
    t.same_error(t.grpc("ListVersions", pb.ListVersionsRequest(task="nope")), t.http("ListVersions", "nope"),
                 "NOT_FOUND")


def rollback(t: Twins, pair) -> None:
    # version 0: the version served before the current one; a new task has none
    t.same_error(t.grpc("Rollback", pb.RollbackRequest(task="sem-g")), t.http("Rollback", "sem-g"),
                 "FAILED_PRECONDITION")
    t.same_error(t.grpc("Rollback", pb.RollbackRequest(task="sem-g", version=99)),
                 t.http("Rollback", "sem-g", {"version": 99}), "NOT_FOUND")
    g = t.grpc("Rollback", pb.RollbackRequest(task="sem-g", version=1))  # policy left out: frozen
    t.same(g, t.http("Rollback", "sem-g", {"version": 1}), pb.Task)
    assert g[1].policy == pb.POLICY_FROZEN
    g = t.grpc("Rollback", pb.RollbackRequest(task="sem-g", version=1, policy=pb.POLICY_AUTO))
    t.same(g, t.http("Rollback", "sem-g", {"version": 1, "policy": "auto"}), pb.Task)


def set_task_policy(t: Twins, pair) -> None:
    settings = {"candidates_per_generation": 2, "candidate_budget_seconds": 3.0, "scale_base": 0.9}
    g = t.grpc("SetTaskPolicy", pb.SetTaskPolicyRequest(task="sem-g", policy=pb.POLICY_APPROVE,
                                                        evolution=pb.EvolutionSettings(**settings)))
    t.same(g, t.http("SetTaskPolicy", "sem-g", {"policy": "approve", "evolution": settings}), pb.Task)
    # nothing named: nothing changes
    t.same(t.grpc("SetTaskPolicy", pb.SetTaskPolicyRequest(task="sem-g")), t.http("SetTaskPolicy", "sem-g", {}),
           pb.Task)
    assert g[1].policy == pb.POLICY_APPROVE and g[1].evolution.candidates_per_generation == 2
    bad = {"scale_base": 1.5}  # score = accuracy * scale_base ** size: a base above 1 rewards size
    t.same_error(t.grpc("SetTaskPolicy", pb.SetTaskPolicyRequest(task="sem-g", evolution=pb.EvolutionSettings(**bad))),
                 t.http("SetTaskPolicy", "sem-g", {"evolution": bad}), "INVALID_ARGUMENT")
    t.same_error(t.grpc("SetTaskPolicy", pb.SetTaskPolicyRequest(task="nope")), t.http("SetTaskPolicy", "nope", {}),
                 "NOT_FOUND")


def promote(t: Twins, pair) -> None:
    t.same(t.grpc("Promote", pb.PromoteRequest(task="sem-g", version=1)), t.http("Promote", "sem-g", {"version": 1}),
           pb.Task)  # the serving version: nothing to do, the task as it is
    t.same_error(t.grpc("Promote", pb.PromoteRequest(task="sem-g")), t.http("Promote", "sem-g", {"version": 0}),
                 "INVALID_ARGUMENT")
    t.same_error(t.grpc("Promote", pb.PromoteRequest(task="sem-g", version=99)),
                 t.http("Promote", "sem-g", {"version": 99}), "NOT_FOUND")


def reject(t: Twins, pair) -> None:
    t.same_error(t.grpc("Reject", pb.RejectRequest(task="sem-g", version=1)), t.http("Reject", "sem-g", {"version": 1}),
                 "FAILED_PRECONDITION")  # the serving version
    t.same_error(t.grpc("Reject", pb.RejectRequest(task="sem-g")), t.http("Reject", "sem-g", {"version": 0}),
                 "INVALID_ARGUMENT")
    t.same_error(t.grpc("Reject", pb.RejectRequest(task="nope", version=2)), t.http("Reject", "nope", {"version": 2}),
                 "NOT_FOUND")


def trigger_evolution(t: Twins, pair) -> None:
    t.same_error(t.grpc("TriggerEvolution", pb.TriggerEvolutionRequest(task="nope")),
                 t.http("TriggerEvolution", body={"task": "nope"}), "NOT_FOUND")
    t.same_error(t.grpc("TriggerEvolution", pb.TriggerEvolutionRequest(task="sem-g", candidates=10**6)),
                 t.http("TriggerEvolution", body={"task": "sem-g", "candidates": 10**6}), "INVALID_ARGUMENT")
    assert t.http("SetTaskPolicy", "sem-h", {"policy": "frozen"})[0] == 200
    t.same_error(t.grpc("TriggerEvolution", pb.TriggerEvolutionRequest(task="sem-h")),
                 t.http("TriggerEvolution", body={"task": "sem-h"}), "FAILED_PRECONDITION")
    # one real generation over HTTP: it answers with the report of the generation it ran
    status, out = t.http("TriggerEvolution", body={"task": "sem-g", "candidates": 1, "budget_seconds": 1,
                                                   "wait": True})
    assert status == 200, out
    report = to_message(pb.EvolutionStatus, out).triggered
    assert report.task == "sem-g" and report.generation >= 1 and report.candidates == 1, out


def get_evolution_status(t: Twins, pair) -> None:
    t.same(t.grpc("GetEvolutionStatus", pb.GetEvolutionStatusRequest()), t.http("GetEvolutionStatus"),
           pb.EvolutionStatus)


def watch_task(t: Twins, pair) -> None:
    status, events = t.http("WatchTask", query={"task": "sem-g"})
    assert status == 200 and [e["kind"] for e in events][:1] == ["registered"], events
    stream = t.stub.WatchTask(pb.WatchTaskRequest(task="sem-g", since_id=1), timeout=60,
                              metadata=[("authorization", f"Bearer {ADMIN}")])
    streamed = [next(stream) for _ in events]  # the stored ones first, then it waits for more
    stream.cancel()
    assert streamed == [to_message(pb.TaskEvent, {**e, "detail_json": json.dumps(e["detail"], sort_keys=True)})
                        for e in events]
    status, later = t.http("WatchTask", query={"task": "sem-g", "after_id": events[0]["id"]})
    assert status == 200 and later == events[1:]  # after_id is since_id - 1
    g = grpc_error(lambda: next(t.stub.WatchTask(pb.WatchTaskRequest(task="nope"), timeout=30,
                                                 metadata=[("authorization", f"Bearer {ADMIN}")])))
    t.same_error(g, t.http("WatchTask", query={"task": "nope"}), "NOT_FOUND")


def delete_task(t: Twins, pair) -> None:
    g = t.grpc("DeleteTask", pb.DeleteTaskRequest(name="sem-g"))
    t.same(g, t.http("DeleteTask", "sem-h"), pb.DeleteTaskResponse, lambda d: {"name": "sem-g"})
    t.same_error(t.grpc("DeleteTask", pb.DeleteTaskRequest(name="sem-g")), t.http("DeleteTask", "sem-g"), "NOT_FOUND")


def grpc_error(fn: Callable) -> tuple[str, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    raise AssertionError("the call did not fail")


SCENARIOS = {"Predict": predict, "RegisterTask": register_task, "AddExamples": add_examples, "ListTasks": list_tasks,
             "GetTask": get_task, "ListVersions": list_versions, "Rollback": rollback,
             "SetTaskPolicy": set_task_policy, "Promote": promote, "Reject": reject,
             "TriggerEvolution": trigger_evolution, "GetEvolutionStatus": get_evolution_status,
             "WatchTask": watch_task, "DeleteTask": delete_task}


# every row of the table, in the table's order, with the deletion of the twin tasks last
@pytest.mark.slow
@pytest.mark.parametrize("rpc", sorted(OPERATIONS, key=lambda rpc: rpc == "DeleteTask"))
def test_grpc_and_http_give_the_same_answers_and_errors(twins, pair, rpc):
    SCENARIOS[rpc](twins, pair)
