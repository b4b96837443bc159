"""Deadlines and gRPC's own retry policy in both clients, against a tiny in-test grpc.aio server whose
handlers fail on purpose: an idempotent call (Predict) that fails UNAVAILABLE once is answered on the
second attempt; a write (Promote, RegisterTask) that fails UNAVAILABLE is sent once; RESOURCE_EXHAUSTED
is never retried; a retried call still ends at its deadline."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import grpc.aio
import numpy as np
import pytest

from munet.aio_client import AsyncMunetClient
from munet.client import IDEMPOTENT_METHODS, SERVICE_CONFIG, MunetClient, MunetClientError, channel_options
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc


class FlakyMunet(pb_grpc.MunetServicer):
    """Predict fails UNAVAILABLE on every odd call and answers on every even one; the writes always fail
    UNAVAILABLE; ListTasks is overloaded (RESOURCE_EXHAUSTED); GetTask is slower than any deadline here."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []

    async def Predict(self, request, context):
        self.calls["Predict"] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls["Predict"] % 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.PredictResponse(task=request.task, path_version=3, predictions=[
            pb.Prediction(top=[pb.LabelScore(label="seven", index=7, probability=0.9)]) for _ in request.images])

    async def Promote(self, request, context):
        self.calls["Promote"] += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    async def RegisterTask(self, request_iterator, context):
        self.calls["RegisterTask"] += 1
        async for _ in request_iterator:
            pass
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    async def ListTasks(self, request, context):
        self.calls["ListTasks"] += 1
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")

    async def GetTask(self, request, context):
        self.calls["GetTask"] += 1
        await asyncio.sleep(5)
        return pb.Task(name=request.name)

    async def WatchTask(self, request, context):
        # two events, then nothing: the watch lasts until the caller stops or its deadline
        self.calls["WatchTask"] += 1
        for i in (1, 2):
            yield pb.TaskEvent(id=i, task=request.task, kind=pb.TASK_EVENT_KIND_PROMOTED, version=i,
                               detail_json='{"by": "test"}')
        await asyncio.sleep(30)


class FlakyServer:
    """FlakyMunet on a loopback port, served by grpc.aio on an event loop of its own (a thread), so
    the synchronous client and an asyncio client in the test's own loop can both call it."""

    def __init__(self) -> None:
        self.servicer = FlakyMunet()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._run(self._start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_MunetServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer()
    try:
        yield server
    finally:
        server.close()


IMAGE = np.zeros((8, 8), np.uint8)


def test_the_service_config_retries_idempotent_calls_only_on_unavailable():
    options = dict(channel_options())
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    assert config == SERVICE_CONFIG
    [method] = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method["name"]}
    assert names == set(IDEMPOTENT_METHODS) == {
        ("munet.v1.Munet", m) for m in ("Predict", "ListTasks", "GetTask", "ListVersions", "GetEvolutionStatus")
    } | {("grpc.health.v1.Health", "Check")}
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 3 <= policy["maxAttempts"] <= 5
    # every method the proto declares that is not listed changes state or streams
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["Munet"].methods}
    assert declared - {m for _, m in IDEMPOTENT_METHODS} == {
        "RegisterTask", "AddExamples", "DeleteTask", "Rollback", "SetTaskPolicy", "Promote", "Reject",
        "TriggerEvolution", "WatchTask"}


def test_sync_client_retries_predict_and_not_writes(flaky: FlakyServer):
    with MunetClient(flaky.target, timeout=10, token="s3cret") as c:
        r = c.predict("digits", [IMAGE, IMAGE])
        assert (r.version, [p[0].label for p in r.predictions]) == (3, ["seven", "seven"])
        assert flaky.servicer.calls["Predict"] == 2  # failed UNAVAILABLE once, answered on the retry
        # the token rides on every attempt
        assert [m.get("authorization") for m in flaky.servicer.metadata] == ["Bearer s3cret"] * 2

        with pytest.raises(MunetClientError) as e:
            c.promote("digits", 2)
        assert e.value.code == "UNAVAILABLE" and flaky.servicer.calls["Promote"] == 1
        with pytest.raises(MunetClientError) as e:
            c.register_task("t", labels=["a", "b"], examples=(np.zeros((2, 8, 8), np.uint8), [0, 1]))
        assert e.value.code == "UNAVAILABLE" and flaky.servicer.calls["RegisterTask"] == 1
        with pytest.raises(MunetClientError) as e:
            c.list_tasks()
        assert e.value.code == "RESOURCE_EXHAUSTED" and flaky.servicer.calls["ListTasks"] == 1

        t0 = time.monotonic()
        with pytest.raises(MunetClientError) as e:
            c.get_task("digits", timeout=0.5)
        assert e.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 3
        assert flaky.servicer.calls["GetTask"] == 1  # a deadline is not retried


def test_async_client_retries_predict_and_not_writes(flaky: FlakyServer):
    async def main() -> None:
        async with AsyncMunetClient(flaky.target, timeout=10, token="s3cret") as c:
            await c.wait_ready(10)
            r = await c.predict("digits", IMAGE)
            assert (r.version, [p[0].label for p in r.predictions]) == (3, ["seven"])
            assert flaky.servicer.calls["Predict"] == 2
            assert [m.get("authorization") for m in flaky.servicer.metadata] == ["Bearer s3cret"] * 2

            with pytest.raises(MunetClientError) as e:
                await c.promote("digits", 2)
            assert e.value.code == "UNAVAILABLE" and flaky.servicer.calls["Promote"] == 1
            with pytest.raises(MunetClientError) as e:
                await c.register_task("t", labels=["a", "b"], examples=(np.zeros((2, 8, 8), np.uint8), [0, 1]))
            assert e.value.code == "UNAVAILABLE" and flaky.servicer.calls["RegisterTask"] == 1
            with pytest.raises(MunetClientError) as e:
                await c.list_tasks()
            assert e.value.code == "RESOURCE_EXHAUSTED" and flaky.servicer.calls["ListTasks"] == 1

            t0 = time.monotonic()
            with pytest.raises(MunetClientError) as e:
                await c.get_task("digits", timeout=0.5)
            assert e.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 3

    asyncio.run(main())


def test_an_unreachable_server_is_unavailable_at_the_deadline():
    # nothing listens there: each attempt fails UNAVAILABLE at once, and the retries give up in well
    # under the deadline (4 attempts, backoff from 0.1 s)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MunetClient(f"127.0.0.1:{port}", timeout=20) as c:
        t0 = time.monotonic()
        with pytest.raises(MunetClientError) as e:
            c.predict("digits", IMAGE)
        assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 15


def test_watch_task_lasts_until_the_caller_stops_or_its_deadline(flaky: FlakyServer):
    with MunetClient(flaky.target, timeout=0.2) as c:  # the clients' timeout does not bound a watch
        events = []
        for e in c.watch_task("digits"):
            events.append((e.id, e.kind, e.version, e.detail))
            if len(events) == 2:
                break
        assert events == [(1, "promoted", 1, {"by": "test"}), (2, "promoted", 2, {"by": "test"})]
        t0 = time.monotonic()
        with pytest.raises(MunetClientError) as e:
            list(c.watch_task("digits", timeout=0.5))
        assert e.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 3

    async def main() -> None:
        async with AsyncMunetClient(flaky.target, timeout=0.2) as c:
            events = []
            async for e in c.watch_task("digits"):
                events.append((e.id, e.kind, e.version))
                if len(events) == 2:
                    break
            assert events == [(1, "promoted", 1), (2, "promoted", 2)]
            with pytest.raises(MunetClientError) as e:
                async for _ in c.watch_task("digits", timeout=0.5):
                    pass
            assert e.value.code == "DEADLINE_EXCEEDED"

    asyncio.run(main())
    assert flaky.servicer.calls["WatchTask"] == 4  # one call each, never retried
