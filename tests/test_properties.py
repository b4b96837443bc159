"""Property-based tests (hypothesis) over the request messages: whatever a client sends, the answer is
a result or a clear status, never an internal error, the server stays healthy, and nothing stored
changes unless the call was valid."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_fixtures import LoopThread, server_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from munet.app import App
from munet.client import MunetClient
from munet.service.core import TaskSpec
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = App.build(server_config(tmp_path_factory.mktemp("props"), max_image_pixels=1 << 20))
    app.start()
    app.core.register_task(TaskSpec(name="digits", builtin="uci_digits", max_examples=200))
    loop = LoopThread()
    port = loop.run(app.start_grpc("127.0.0.1:0"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield app, pb_grpc.MunetStub(channel), f"127.0.0.1:{port}"
    channel.close()
    loop.run(app.stop())
    loop.close()


def _stored(app) -> tuple:
    tasks = tuple((t.name, t.current_version, t.uid) for t in app.store.list_tasks())
    return tasks, tuple(tuple(sorted(app.store.example_counts(t[0]).items())) for t in tasks)


raw_images = st.builds(
    lambda data, h, w, c: pb.Image(raw=pb.RawImage(data=data, height=h, width=w, channels=c)),
    st.binary(max_size=300), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 6))
encoded_images = st.builds(lambda b: pb.Image(encoded=b), st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8L"])
    .flatmap(lambda head: st.binary(max_size=100).map(lambda tail: head + tail))))
images = st.one_of(raw_images, encoded_images, st.just(pb.Image()))
task_names = st.one_of(st.just("digits"), st.text(max_size=80))


def _answer(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@FUZZ
@given(task=task_names, imgs=st.lists(images, max_size=5), top_k=st.integers(0, 2**32 - 1))
def test_any_predict_gets_a_result_or_a_clear_status(server, task, imgs, top_k):
    app, stub, _ = server
    before = _stored(app)
    code = _answer(lambda: stub.Predict(pb.PredictRequest(task=task, images=imgs, top_k=top_k), timeout=30))
    assert code == grpc.StatusCode.OK or code in CLEAR, code
    assert _stored(app) == before


labelled = st.builds(lambda im, label, split: pb.LabelledImage(image=im, label=label, split=split),
                     images, st.integers(0, 2**32 - 1), st.integers(0, 5))


@FUZZ
@given(task=task_names, batches=st.lists(st.lists(labelled, max_size=4), max_size=3), end=st.booleans(),
       count=st.integers(0, 20))
def test_any_upload_is_taken_whole_or_refused_whole(server, task, batches, end, count):
    app, stub, _ = server
    before = _stored(app)
    msgs = [pb.AddExamplesRequest(task=task if i == 0 else "", examples=pb.ExampleBatch(examples=b))
            for i, b in enumerate(batches)] or [pb.AddExamplesRequest(task=task)]
    if end:
        msgs[-1].end.CopyFrom(pb.UploadEnd(examples=count))
    code = _answer(lambda: stub.AddExamples(iter(msgs), timeout=30))
    assert code == grpc.StatusCode.OK or code in CLEAR, code
    if code != grpc.StatusCode.OK:
        assert _stored(app) == before  # a refused upload leaves no trace


@settings(FUZZ, max_examples=60)  # each is a RegisterTask round trip; `munet bench fuzz` sends 600 requests
@given(name=st.text(max_size=100), labels=st.lists(st.text(max_size=30), max_size=4),
       builtin=st.sampled_from(["", "no_such_set", "uci_digits"]), npz=st.text(max_size=60),
       vf=st.floats(allow_nan=True), tf=st.floats(allow_nan=True), root=st.sampled_from(["", "nope", "vit_tiny"]))
def test_bad_registrations_are_refused_and_leave_nothing(server, name, labels, builtin, npz, vf, tf, root):
    app, stub, _ = server
    spec = pb.TaskSpec(name=name, labels=labels, validation_fraction=vf, test_fraction=tf, root=root)
    if builtin:
        spec.builtin = builtin
    elif npz:
        spec.npz_file = npz
    # always at least one fault: an unusable fraction (a valid spec would register, which is slow)
    if 0.0 <= vf < 0.5 and 0.0 <= tf < 0.5:
        spec.validation_fraction = 0.75
    before = _stored(app)
    code = _answer(lambda: stub.RegisterTask(iter([pb.RegisterTaskRequest(spec=spec),
                                                   pb.RegisterTaskRequest(end=pb.UploadEnd())]), timeout=60))
    assert code in CLEAR, code
    assert _stored(app) == before


def test_the_server_is_healthy_after_the_fuzzing(server):
    app, _, target = server
    with MunetClient(target) as c:
        assert c.health() == "SERVING"
        assert c.predict("digits", [np.zeros((8, 8), np.uint8)]).version == 1
