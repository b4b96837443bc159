"""The munet.v1 proto: committed stubs match the .proto (run `make protos` after editing it), released
fields keep their number, type and name (tests/test_buf.py runs `buf breaking` too; this check needs
only protoc), and every string the core uses has its enum value, both ways through the edge."""

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from munet import client
from munet.errors import InvalidArgument
from munet.models.store import EVENT_KINDS, POLICIES
from munet.service import grpc_server
from munet.v1 import munet_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PROTO = "munet/v1/munet.proto"

# every value the core puts in a view: store.POLICIES and EVENT_KINDS, task and path statuses, outcomes
TASK_STATUSES = ("creating", "serving")
PATH_STATUSES = ("current", "retired", "candidate", "pending", "rejected", "failed")
OUTCOMES = ("promoted", "pending", "failed", "superseded")
CORE_STRINGS = [(pb.Policy, POLICIES), (pb.TaskEventKind, EVENT_KINDS), (pb.TaskStatus, TASK_STATUSES),
                (pb.PathStatus, PATH_STATUSES), (pb.GenerationOutcome, OUTCOMES)]


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "protos" / PROTO)],
        check=True,
    )
    for name in ("munet_pb2.py", "munet_pb2.pyi", "munet_pb2_grpc.py"):
        generated = (tmp_path / "munet/v1" / name).read_text()
        committed = (ROOT / "munet/v1" / name).read_text()
        assert generated == committed, f"munet/v1/{name} is stale: run `make protos`"


def _descriptor(include: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(include), f"--descriptor_set_out={out}",
                    str(include / PROTO)], check=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _oneof(f: descriptor_pb2.FieldDescriptorProto) -> int | None:
    # a proto3 `optional` field sits in a synthetic oneof of its own: presence, not a oneof on the wire
    return f.oneof_index if f.HasField("oneof_index") and not f.proto3_optional else None


def test_released_fields_keep_their_number_type_and_name(tmp_path):
    """What the released API (protos/released, commit 0fccac4) put on the wire stays: every service and
    method with its types, every message field's number, type and name, every enum value."""
    old = _descriptor(ROOT / "protos/released", tmp_path / "old.pb")
    new = _descriptor(ROOT / "protos", tmp_path / "new.pb")
    assert old.package == new.package
    new_services = {s.name: {m.name: m for m in s.method} for s in new.service}
    for s in old.service:
        for m in s.method:
            n = new_services[s.name][m.name]
            assert (n.input_type, n.output_type, n.client_streaming, n.server_streaming) == \
                (m.input_type, m.output_type, m.client_streaming, m.server_streaming), f"{s.name}.{m.name}"
    new_messages = {m.name: {f.number: f for f in m.field} for m in new.message_type}
    for m in old.message_type:
        for f in m.field:
            n = new_messages[m.name].get(f.number)
            assert n is not None, f"{m.name}.{f.name} (field {f.number}) was removed"
            assert (n.name, n.type, n.type_name, n.label, _oneof(n)) == \
                (f.name, f.type, f.type_name, f.label, _oneof(f)), f"{m.name}.{f.name} (field {f.number}) changed"
    new_enums = {e.name: {v.name: v.number for v in e.value} for e in new.enum_type}
    for e in old.enum_type:
        assert {v.name: v.number for v in e.value}.items() <= new_enums[e.name].items(), e.name


def test_superseded_string_fields_are_deprecated_beside_their_typed_twins():
    for message, twins in ((pb.Task, {"status": "state", "created_at": "created_time"}),
                           (pb.PathVersion, {"status": "state", "created_at": "created_time"}),
                           (pb.GenerationReport, {"started_at": "started_time"})):
        fields = message.DESCRIPTOR.fields_by_name
        for old, new in twins.items():
            assert fields[old].GetOptions().deprecated, f"{message.__name__}.{old}"
            assert fields[new].enum_type is not None or fields[new].message_type.full_name == \
                "google.protobuf.Timestamp", f"{message.__name__}.{new}"


@pytest.mark.parametrize(("enum", "names"), CORE_STRINGS, ids=[e.DESCRIPTOR.name for e, _ in CORE_STRINGS])
def test_every_core_string_has_its_enum_value_both_ways(enum, names):
    d = enum.DESCRIPTOR
    for name in names:
        number = grpc_server.enum_value(d, name)
        assert number != 0, f"{name!r} has no {d.name} value"
        assert grpc_server.enum_name(d, number) == name
        assert client._enum_name(enum, number) == name
    # and no enum value the core never produces (other than X_UNSPECIFIED)
    assert {grpc_server.enum_name(d, v.number) for v in d.values if v.number} == set(names)
    assert grpc_server.enum_value(d, "") == 0 and client._enum_name(enum, 0) == ""


def test_policies_in_requests():
    assert grpc_server.policy_name(pb.POLICY_UNSPECIFIED) == ""  # each call's documented default
    assert [grpc_server.policy_name(p) for p in (pb.POLICY_AUTO, pb.POLICY_APPROVE, pb.POLICY_FROZEN)] == \
        ["auto", "approve", "frozen"]
    with pytest.raises(InvalidArgument):
        grpc_server.policy_name(7)
    assert grpc_server.task_spec(pb.TaskSpec(name="x")).policy == "auto"
    assert grpc_server.task_spec(pb.TaskSpec(name="x", policy=pb.POLICY_FROZEN)).policy == "frozen"
    assert client._policy("approve") == pb.POLICY_APPROVE and client._policy("") == pb.POLICY_UNSPECIFIED
    with pytest.raises(client.MunetClientError) as e:
        client._policy("sometimes")
    assert e.value.code == "INVALID_ARGUMENT"


def _path_view(version: int, status: str) -> dict:
    return {"version": version, "modules": [], "status": status, "created_at": "2026-11-27T23:28:03+00:00",
            "hyperparameters": {"lr": 0.01}, "decision": "", "note": ""}


def test_views_become_enums_and_timestamps_and_the_client_reads_them_back():
    view = {"name": "digits", "labels": ["a", "b"], "status": "serving", "current_version": 2,
            "path": _path_view(2, "current"), "lineage": [_path_view(1, "retired"), _path_view(2, "current")],
            "created_at": "2026-11-27T23:28:03+00:00", "policy": "approve", "pending_versions": [3],
            "source": "uci_digits", "root": "vit_tiny", "image_size": 32, "shadow": None,
            "evolution": {"candidates_per_generation": 2, "candidate_budget_seconds": 0.0, "scale_base": 0.0}}
    m = grpc_server.to_message(pb.Task, view)
    assert m.state == pb.TASK_STATUS_SERVING and m.status == "serving"  # both, for released clients
    assert m.policy == pb.POLICY_APPROVE
    assert m.created_at == "2026-11-27T23:28:03+00:00" and m.created_time.seconds == 1_795_822_083
    assert m.path.state == pb.PATH_STATUS_CURRENT and m.path.status == "current" and m.path.HasField("created_time")
    assert [p.state for p in m.lineage] == [pb.PATH_STATUS_RETIRED, pb.PATH_STATUS_CURRENT]
    t = client._task(pb.Task.FromString(m.SerializeToString()))
    assert (t.status, t.policy, t.created_at, t.path.status, t.path.created_at) == \
        ("serving", "approve", "2026-11-27T23:28:03+00:00", "current", "2026-11-27T23:28:03+00:00")

    # a released server sends only the strings; the client reads the Timestamp when only it is set
    old = pb.Task(name="digits", status="serving", created_at="2026-01-01T00:00:00+00:00")
    t = client._task(old)
    assert (t.status, t.created_at, t.policy) == ("serving", "2026-01-01T00:00:00+00:00", "auto")
    m.ClearField("created_at")
    assert client._task(m).created_at == "2026-11-27T23:28:03+00:00"


def test_reports_and_events():
    report = {"task": "digits", "generation": 3, "candidates": 2, "outcome": "", "error": "",
              "started_at": "2026-11-27T23:28:03Z", "seconds": 1.5}
    m = grpc_server.to_message(pb.GenerationReport, report)
    assert m.outcome == pb.GENERATION_OUTCOME_UNSPECIFIED and m.started_time.seconds == 1_795_822_083
    assert client._report(m).outcome == "" and client._report(m).started_at == "2026-11-27T23:28:03Z"  # as sent
    m.ClearField("started_at")  # a server that fills only the Timestamp: the same instant
    assert client._report(m).started_at == "2026-11-27T23:28:03+00:00"
    m = grpc_server.to_message(pb.GenerationReport, {**report, "outcome": "pending", "pending_version": 4})
    assert m.outcome == pb.GENERATION_OUTCOME_PENDING and client._report(m).outcome == "pending"
    status = grpc_server.to_message(pb.EvolutionStatus, {"running": False, "recent": [report]})
    assert status.recent[0].started_time.seconds == 1_795_822_083

    event = {"id": 7, "task": "digits", "kind": "rolled_back", "version": 1, "detail": {"previous": 2},
             "at": "2026-11-27T23:28:03+00:00", "detail_json": "{}"}
    m = grpc_server.to_message(pb.TaskEvent, event)
    assert m.kind == pb.TASK_EVENT_KIND_ROLLED_BACK and m.at.seconds == 1_795_822_083
    assert grpc_server.to_message(pb.TaskEvent, {**event, "at": "not a time"}).HasField("at") is False


def test_reflection_serves_the_proto_with_its_timestamp_import():
    """grpcurl and other reflection clients resolve munet.v1 with google/protobuf/timestamp.proto."""
    from concurrent import futures

    import grpc
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    reflection.enable_server_reflection((grpc_server.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            task = pool.FindMessageTypeByName("munet.v1.Task")
            assert task.fields_by_name["created_time"].message_type.full_name == "google.protobuf.Timestamp"
            assert task.fields_by_name["state"].enum_type.full_name == "munet.v1.TaskStatus"
    finally:
        server.stop(None)
