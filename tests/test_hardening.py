"""Serving under bad input: images decode off the event loop, pixel limits hold before decoding,
and the work of a request whose deadline passed stops."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from grpc_fixtures import LoopThread, server_config
from PIL import Image

from munet.app import App
from munet.client import MunetClient, MunetClientError
from munet.data import images as imglib
from munet.service.core import TaskSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = App.build(server_config(tmp_path_factory.mktemp("hardening"), max_image_pixels=1_000_000))
    app.start()
    app.core.register_task(TaskSpec(name="digits", builtin="uci_digits", max_examples=300))
    app.start_scheduler()
    loop = LoopThread()
    port = loop.run(app.start_grpc("127.0.0.1:0"))
    client = MunetClient(f"127.0.0.1:{port}", timeout=30.0)
    client.wait_ready(10.0)
    yield app, client
    client.close()
    loop.run(app.stop())
    loop.close()


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (0, 0, 0, 0)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(server):
    _, client = server
    bomb = _png(2000, 2000)  # a few hundred bytes that claim 4 million pixels
    assert len(bomb) < 2000
    with pytest.raises(MunetClientError) as e:
        client.predict("digits", [bomb])
    assert e.value.code == "INVALID_ARGUMENT" and "max_image_pixels" in e.value.message


def test_decoding_runs_off_the_event_loop_and_health_answers_meanwhile(server, monkeypatch):
    _, client = server
    started, release, threads = threading.Event(), threading.Event(), []
    real = imglib.decode_image

    def slow_decode(data, size=32, max_pixels=imglib.MAX_PIXELS):
        threads.append(threading.current_thread().name)
        started.set()
        release.wait(20)
        return real(data, size, max_pixels)

    monkeypatch.setattr(imglib, "decode_image", slow_decode)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.predict("digits", [_png(20, 20)])))
    worker.start()
    assert started.wait(20)
    # the image is being decoded right now; the server still answers health checks
    assert client.health() == "SERVING"
    assert worker.is_alive()
    release.set()
    worker.join(20)
    assert len(result["r"].predictions) == 1
    assert threads and all(t.startswith("munet-decode") for t in threads)


def test_work_for_a_request_past_its_deadline_stops(server, monkeypatch):
    _, client = server
    calls = []
    real = imglib.decode_image

    def slow_decode(data, size=32, max_pixels=imglib.MAX_PIXELS):
        calls.append(1)
        time.sleep(0.25)
        return real(data, size, max_pixels)

    monkeypatch.setattr(imglib, "decode_image", slow_decode)
    with pytest.raises(MunetClientError) as e:
        client.predict("digits", [_png(20, 20)] * 20, timeout=0.6)
    assert e.value.code == "DEADLINE_EXCEEDED"
    time.sleep(4.5)  # had decoding gone on, all 20 images (5 s) would be decoded by now
    assert len(calls) < 10, len(calls)  # the server stopped at the deadline
    assert client.predict("digits", [np.zeros((8, 8), np.uint8)]).predictions  # and serves on



@pytest.mark.parametrize("kwargs, limit", [({"candidates": 2**32 - 1}, "max_candidates_per_generation"),
                                          ({"budget_seconds": float("nan")}, "max_candidate_budget_s"),
                                          ({"budget_seconds": 1e9}, "max_candidate_budget_s")])
def test_evolution_requests_beyond_the_limits_are_refused(server, kwargs, limit):
    _, client = server
    with pytest.raises(MunetClientError) as e:
        client.trigger_evolution("digits", **kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and limit in e.value.message


def test_the_example_cap_holds_per_task_across_uploads(server):
    app, client = server
    cap = app.config.max_examples_per_task
    held = sum(app.store.example_counts("digits").values())
    x = np.random.default_rng(0).integers(0, 256, (cap - held + 1, 8, 8), dtype=np.uint8)
    with pytest.raises(MunetClientError) as e:
        client.add_examples("digits", x, np.zeros(len(x), np.int64))
    assert e.value.code == "INVALID_ARGUMENT" and "max_examples_per_task" in e.value.message
    assert sum(app.store.example_counts("digits").values()) == held  # nothing of it was stored
    client.add_examples("digits", x[:5], np.zeros(5, np.int64))  # within the cap: taken
    assert sum(app.store.example_counts("digits").values()) == held + 5


def test_negative_max_examples_is_an_error_not_a_silent_cut(server):
    app, _ = server
    from munet.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="max_examples"):
        app.core.register_task(TaskSpec(name="neg", builtin="uci_digits", max_examples=-5))
    assert "neg" not in {t.name for t in app.store.list_tasks()}


def test_a_flood_is_refused_at_once_and_other_tasks_keep_their_turn(make_app, monkeypatch):
    import asyncio

    from conftest import register_digits

    from munet.errors import ResourceExhausted
    from munet.service import batching
    from munet.service.core import ImageInput

    app = make_app(max_queue_images=6, max_task_queue_images=4, max_batch_size=2, max_request_images=4)
    register_digits(app, "hot", max_examples=200)
    register_digits(app, "cold", max_examples=200, seed=1)
    batches, release = [], threading.Event()
    real = batching.run_grouped

    def blocking(items):
        batches.append(sorted(p.task for p, _ in items))
        release.wait(20)  # the first batch holds the inference thread while the queue fills
        return real(items)

    monkeypatch.setattr(batching, "run_grouped", blocking)
    img = [ImageInput(raw=bytes(64), height=8, width=8, channels=1)]
    core = app.core

    async def scenario():
        hot = [asyncio.create_task(core.predict("hot", img)) for _ in range(4)]
        await asyncio.sleep(0.2)
        with pytest.raises(ResourceExhausted, match="max_task_queue_images"):
            await core.predict("hot", img)  # its share is full: refused without waiting
        cold = [asyncio.create_task(core.predict("cold", img)) for _ in range(2)]
        await asyncio.sleep(0.2)
        with pytest.raises(ResourceExhausted, match="max_queue_images"):
            await core.predict("cold", img)  # the whole queue is full
        assert core.batcher.queue_depth == 6
        release.set()
        await asyncio.gather(*hot, *cold)
        assert core.batcher.queue_depth == 0

    asyncio.run(scenario())
    # round robin: after the blocked first batch, the cold task's request rides in the very next one
    # instead of waiting behind the hot task's backlog (first in, first out would serve it last)
    assert set(batches[0]) == {"hot"} and "cold" in batches[1], batches


def test_429_answers_carry_retry_after():
    import asyncio

    from munet.server import RetryAfterMiddleware

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 429, "headers": []})

    async def send(message):
        sent.append(message)

    asyncio.run(RetryAfterMiddleware(app)({"type": "http"}, None, send))
    assert (b"retry-after", b"1") in sent[0]["headers"]


def _raw_stub(client):
    from munet.v1 import munet_pb2_grpc as pb_grpc

    return pb_grpc.MunetStub(client._raw_channel)


def _batch(n: int, label: int = 0):
    from munet.v1 import munet_pb2 as pb

    b = pb.ExampleBatch()
    for i in range(n):
        b.examples.add(image=pb.Image(raw=pb.RawImage(data=bytes([i % 256]) * 64, height=8, width=8, channels=1)),
                       label=label if i % 2 else 1 - label)
    return b


def test_an_upload_without_its_end_message_stores_nothing(server):
    import grpc

    from munet.v1 import munet_pb2 as pb

    app, client = server
    stub = _raw_stub(client)
    spec = pb.TaskSpec(name="half-done", labels=["a", "b"])
    with pytest.raises(grpc.RpcError) as e:  # the stream just stops, as a cancelled one does in grpc.aio
        stub.RegisterTask(iter([pb.RegisterTaskRequest(spec=spec), pb.RegisterTaskRequest(examples=_batch(40))]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UploadEnd" in e.value.details()
    assert "half-done" not in {t.name for t in app.store.list_tasks()}
    held = sum(app.store.example_counts("digits").values())
    with pytest.raises(grpc.RpcError) as e:
        stub.AddExamples(iter([pb.AddExamplesRequest(task="digits", examples=_batch(10))]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:  # an end that miscounts is no commit either
        stub.AddExamples(iter([pb.AddExamplesRequest(task="digits", examples=_batch(10),
                                                     end=pb.UploadEnd(examples=11))]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "11" in e.value.details()
    assert sum(app.store.example_counts("digits").values()) == held
    # the same uploads with their end message commit, and the name is free for the retry
    reply = stub.AddExamples(iter([pb.AddExamplesRequest(task="digits", examples=_batch(10),
                                                         end=pb.UploadEnd(examples=10))]))
    assert reply.added == 10
    client.register_task("half-done", labels=["a", "b"], examples=(np.zeros((40, 8, 8), np.uint8), [0, 1] * 20))
    assert "half-done" in {t.name for t in app.store.list_tasks()}


def test_a_client_that_cancels_mid_upload_leaves_no_trace(server):
    from munet.v1 import munet_pb2 as pb

    app, client = server
    stub = _raw_stub(client)
    sent, stall = threading.Event(), threading.Event()

    def requests():
        yield pb.RegisterTaskRequest(spec=pb.TaskSpec(name="cancelled", labels=["a", "b"]))
        yield pb.RegisterTaskRequest(examples=_batch(40))
        sent.set()
        stall.wait(20)  # the client goes away here

    call = stub.RegisterTask.future(requests())
    assert sent.wait(20)
    time.sleep(0.3)
    call.cancel()
    stall.set()
    time.sleep(1.0)
    assert "cancelled" not in {t.name for t in app.store.list_tasks()}
    assert client.health() == "SERVING"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_bad_npz_files_are_invalid_arguments_not_internal_errors(server):
    import zipfile

    from munet.errors import InvalidArgument

    app, _ = server
    read = app.core.read_npz
    pickled = _npz(x=np.array([object()] * 3, dtype=object), y=np.zeros(3, np.int64))
    for bad, why in ((b"not a zip", "readable"), (pickled, "plain arrays"), (_npz(x=np.zeros((2, 8, 8))), "'y'")):
        with pytest.raises(InvalidArgument, match=why):
            read(bad)
    bomb = io.BytesIO()  # a small file that declares a huge member
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\0" * (3 << 20))
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(InvalidArgument, match="max_npz_bytes"):
        read(bomb.getvalue(), max_bytes=1 << 20)


@pytest.mark.parametrize("name", ["a\0b.npz", "x" * 300 + ".npz", "../secret.npz", "/etc/passwd", "sub/dir.npz",
                                  "outside.npz"])
def test_npz_names_never_reach_outside_the_import_directory(server, tmp_path, name):
    app, client = server
    (tmp_path / "secret.npz").write_bytes(_npz(x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2))
    imports = app.config.imports
    imports.mkdir(parents=True, exist_ok=True)
    link = imports / "outside.npz"
    if not link.exists():
        link.symlink_to(tmp_path / "secret.npz")  # a symlink inside that points out
    with pytest.raises(MunetClientError) as e:
        client.register_task("sneaky", npz_file=name)
    assert e.value.code == "INVALID_ARGUMENT", e.value
    assert "sneaky" not in {t.name for t in app.store.list_tasks()}


def test_http_arrays_with_nan_or_fractions_are_refused():
    from munet.errors import InvalidArgument
    from munet.service.rest import image_inputs

    with pytest.raises(InvalidArgument, match="NaN"):
        image_inputs(None, [[[float("nan"), 1.0], [2.0, 3.0]]])
    with pytest.raises(InvalidArgument, match="fractional"):
        image_inputs(None, [[[0.5, 0.25], [0.0, 1.0]]])
    assert len(image_inputs(None, [[[0.0, 1.0], [2.0, 255.0]]])) == 1


def test_an_oversized_http_body_gets_413_before_it_is_read():
    import asyncio

    from munet.server import BodyLimitMiddleware

    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(1)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"201000000")]}
    asyncio.run(BodyLimitMiddleware(app, 1000)(scope, None, send))
    assert sent[0]["status"] == 413 and not reached


def test_every_grpc_call_leaves_one_access_line(server, caplog):
    import logging

    _, client = server
    with caplog.at_level(logging.INFO, logger="munet.access"):
        with pytest.raises(MunetClientError):
            client.predict("no-such-task", [np.zeros((8, 8), np.uint8)])
        client.predict("digits", [np.zeros((8, 8), np.uint8)])
    lines = [r.getMessage() for r in caplog.records if r.name == "munet.access"]
    assert any("Predict task=no-such-task NOT_FOUND" in m for m in lines), lines
    assert any("Predict task=digits OK" in m for m in lines), lines
    assert not any(r.exc_info for r in caplog.records)  # a client's error is a line, not a traceback
