"""The gRPC transport: `munet.v1.Munet` on grpc.aio, plus the standard health and reflection services.

Handlers only translate between protos and core types and map errors to status codes; every rule
lives in `munet.service.core.Core`. Blocking core calls (SQLite, training, ONNX export) run in worker
threads so one slow registration never stalls Predict on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from munet import metrics
from munet.config import Config
from munet.errors import FailedPrecondition, InvalidArgument, MunetError
from munet.service import oip
from munet.service.auth import GrpcAuthInterceptor, Tokens
from munet.service.core import UNSPECIFIED, Core, Examples, ImageInput, TaskSpec
from munet.service.grpc_calls import guarded
from munet.service.semantics import default, require_version
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Munet"].full_name  # "munet.v1.Munet"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# proto Split -> core split code; an enum value this table lacks is a client error, not a default
_SPLITS = {pb.SPLIT_UNSPECIFIED: UNSPECIFIED, pb.SPLIT_TRAIN: 0, pb.SPLIT_VALIDATION: 1, pb.SPLIT_TEST: 2}

_M = TypeVar("_M", bound=Message)


class Evolution(Protocol):
    """What the servicer needs from the evolution engine (munet.evolution), which it never imports."""

    def trigger(self, task: str | None, candidates: int, budget_s: float, wait: bool) -> Any: ...

    def status(self) -> dict: ...


# ---- dict -> proto ------------------------------------------------------------------------------


# Typed fields beside the released string fields they supersede (which stay, deprecated, and are
# still filled): each reads the same view key as its string twin.
_VIEW_KEYS = {"state": "status", "created_time": "created_at", "started_time": "started_at"}
_TIMESTAMP = "google.protobuf.Timestamp"


def enum_value(enum: _descriptor.EnumDescriptor, name: str) -> int:
    """A core string -> its enum value by the proto's naming rule: "auto" -> POLICY_AUTO,
    "generation_started" -> TASK_EVENT_KIND_GENERATION_STARTED; "" -> 0 (X_UNSPECIFIED).

    A string the enum lacks (a core value the proto has not caught up with) is logged and sent as 0;
    tests/test_protos.py checks that every value the core uses has its enum value."""
    if not name:
        return 0
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")  # "POLICY_"
    value = enum.values_by_name.get(prefix + name.upper())
    if value is None:
        log.warning("%r has no %s value; sending %s", name, enum.full_name, enum.values_by_number[0].name)
        return 0
    return value.number


def enum_name(enum: _descriptor.EnumDescriptor, number: int) -> str:
    """The inverse of `enum_value`: POLICY_AUTO -> "auto", 0 -> ""; a number the enum lacks -> ValueError."""
    if number == 0:
        return ""
    value = enum.values_by_number.get(number)
    if value is None:
        raise ValueError(f"unknown {enum.name} value {number}")
    return value.name.removeprefix(enum.values_by_number[0].name.removesuffix("UNSPECIFIED")).lower()


def policy_name(number: int) -> str:
    """A request's Policy -> the core's name ("auto", "approve", "frozen"); POLICY_UNSPECIFIED -> "",
    which each core call reads as its documented default (RegisterTask auto, SetTaskPolicy unchanged,
    Rollback frozen)."""
    try:
        return enum_name(pb.Policy.DESCRIPTOR, number)
    except ValueError:
        raise InvalidArgument(f"unknown policy value {number}; use POLICY_AUTO, POLICY_APPROVE or "
                              "POLICY_FROZEN (or POLICY_UNSPECIFIED for the call's default)") from None


def timestamp(value: str | datetime) -> Timestamp | None:
    """An RFC 3339 string (or a datetime; naive ones are UTC) -> Timestamp; None when it is empty or
    unreadable (the deprecated string field beside it still carries the text)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            if value:
                log.warning("not an RFC 3339 time: %r", value[:64])
            return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo is not None else value.replace(tzinfo=UTC))
    return ts


def _scalar(field: _descriptor.FieldDescriptor, value: Any) -> Any:
    t = field.type
    if t == field.TYPE_STRING:
        return value.isoformat() if isinstance(value, datetime) else str(value)
    if t == field.TYPE_ENUM and isinstance(value, str):
        return enum_value(field.enum_type, value)
    if t == field.TYPE_BOOL:
        return bool(value)
    if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return float(value)
    if t == field.TYPE_BYTES:
        return bytes(value)
    return int(value)


def to_message(cls: type[_M], d: dict) -> _M:
    """Fill a message from a core view dict whose keys are the message's field names.

    Keys the message lacks are ignored and None leaves a field unset, so a view may carry extras.
    `hyperparameters` (a dict) becomes `hyperparameters_json`. Enum fields take the core's strings
    ("auto" -> POLICY_AUTO, see `enum_value`), Timestamp fields RFC 3339 strings or datetimes, and
    the typed twins of released string fields (`state`, `created_time`, `started_time`) read the
    same key as their twin (`status`, `created_at`, `started_at`).
    """
    msg = cls()
    if "hyperparameters" in d and "hyperparameters_json" in cls.DESCRIPTOR.fields_by_name:
        d = {**d, "hyperparameters_json": json.dumps(d["hyperparameters"] or {}, sort_keys=True)}
    for f in cls.DESCRIPTOR.fields:
        v = d.get(f.name)
        if v is None and f.name in _VIEW_KEYS:
            v = d.get(_VIEW_KEYS[f.name])
        if v is None:
            continue
        repeated = f.is_repeated
        if f.message_type is not None and f.message_type.full_name == _TIMESTAMP and not repeated:
            ts = timestamp(v)
            if ts is not None:
                getattr(msg, f.name).CopyFrom(ts)
        elif f.message_type is not None:
            sub = getattr(pb, f.message_type.name)
            if repeated:
                getattr(msg, f.name).extend(to_message(sub, x) for x in v)
            else:
                getattr(msg, f.name).CopyFrom(to_message(sub, v))
        elif repeated:
            getattr(msg, f.name).extend(_scalar(f, x) for x in v)
        else:
            setattr(msg, f.name, _scalar(f, v))
    return msg


# ---- proto -> core ------------------------------------------------------------------------------


def image_input(im: pb.Image) -> ImageInput:
    kind = im.WhichOneof("data")
    if kind == "encoded":
        return ImageInput(encoded=im.encoded)
    if kind == "raw":
        r = im.raw
        return ImageInput(raw=r.data, height=r.height, width=r.width, channels=r.channels)
    return ImageInput()  # the core rejects it with the image's index in the message


def _fraction(s: pb.TaskSpec, name: str) -> float:
    # the fractions have presence: unset is the default, and a 0 that was sent means 0 (as over HTTP)
    return getattr(s, name) if s.HasField(name) else default("RegisterTask", name)


def task_spec(s: pb.TaskSpec) -> TaskSpec:
    source = s.WhichOneof("source")
    return TaskSpec(
        name=s.name, labels=list(s.labels),
        builtin=s.builtin if source == "builtin" else None,
        npz_file=s.npz_file if source == "npz_file" else None,
        max_examples=s.max_examples,
        validation_fraction=_fraction(s, "validation_fraction"),
        test_fraction=_fraction(s, "test_fraction"),
        seed=s.seed,
        root=s.root,
        policy=policy_name(s.policy) or "auto",
        evolution=evolution_settings(s.evolution) if s.HasField("evolution") else {},
    )


def evolution_settings(m: pb.EvolutionSettings) -> dict:
    """The proto's settings -> the store's names (Config fields)."""
    return {"candidates_per_generation": m.candidates_per_generation, "candidate_budget_s": m.candidate_budget_seconds,
            "scale_base": m.scale_base}


def decode_batch(core: Core, batch: pb.ExampleBatch, index: int, size: int) -> Examples:
    """One streamed ExampleBatch -> Examples at the task's input size (CPU-bound: run it in a thread)."""
    n = len(batch.examples)
    split = np.empty(n, np.int8)
    for i, ex in enumerate(batch.examples):
        code = _SPLITS.get(ex.split)
        if code is None:
            raise InvalidArgument(f"batch {index}, example {i}: unknown split value {ex.split}")
        split[i] = code
    y = np.fromiter((ex.label for ex in batch.examples), np.int64, n)
    # core.decode caps images per call at the Predict limit; an upload batch may legitimately be larger
    step = max(1, core.config.max_request_images)
    parts = []
    for start in range(0, n, step):
        inputs = [image_input(ex.image) for ex in batch.examples[start:start + step]]
        try:
            parts.append(core.decode(inputs, size))
        except InvalidArgument as e:
            raise InvalidArgument(f"batch {index} (from example {start}): {e.message}") from None
    return Examples(np.concatenate(parts), y, split)


# ---- servicer -----------------------------------------------------------------------------------


# errors to statuses and the access line, shared with the Open Inference Protocol's servicer
_rpc = guarded()


def _check_upload_end(end: list[pb.UploadEnd], parts: list[Examples]) -> None:
    """An upload commits only when its stream closed with an UploadEnd that counts what arrived: in
    grpc.aio a cancelled client stream ends like a finished one, so the end of the stream says nothing."""
    if not end:
        raise InvalidArgument("the upload stream ended without its UploadEnd message (a cancelled or failed "
                              "client?); nothing was stored. Send UploadEnd(examples=N) last to commit")
    received = sum(len(p.y) for p in parts)
    if end[0].examples != received:
        raise InvalidArgument(f"UploadEnd says {end[0].examples} examples were sent, {received} arrived; "
                              "nothing was stored")


async def _first_message(request_iterator: AsyncIterator[_M], empty: str) -> tuple[AsyncIterator[_M], _M]:
    """The rest of a client stream and its first message; an empty stream is the client's error."""
    stream = aiter(request_iterator)
    try:
        return stream, await anext(stream)
    except StopAsyncIteration:
        raise InvalidArgument(empty) from None


class MunetServicer(pb_grpc.MunetServicer):
    def __init__(self, core: Core, evolution: Evolution | None = None):
        self.core = core
        self.evolution = evolution

    # ---- predict ----------------------------------------------------------------------------

    def _metric_task(self, task: str) -> str:
        # only names the server serves become label values: arbitrary client strings would make
        # the metric's label set (and Prometheus' memory) unbounded
        if not task:
            return "-"
        return task if self.core.runtime.get(task) is not None else "unknown"

    @_rpc
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        t0 = time.perf_counter()
        code = "INTERNAL"
        timing: dict[str, float] = {}
        try:
            path, preds = await self.core.predict(request.task, [image_input(im) for im in request.images],
                                                  request.top_k, timeout=context.time_remaining(),
                                                  version=request.version, timing=timing)
            resp = pb.PredictResponse(task=request.task, path_version=path.version)
            for p in preds:
                resp.predictions.add().top.extend(
                    pb.LabelScore(label=label, index=index, probability=prob) for label, index, prob in p.top)
            code = "OK"
            return resp
        except MunetError as e:
            code = e.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            total = time.perf_counter() - t0
            metrics.observe_request(self._metric_task(request.task), "grpc", code, total, timing)

    # ---- tasks ------------------------------------------------------------------------------

    async def _decode_stream(self, batches: AsyncIterator[pb.ExampleBatch], size: int) -> list[Examples]:
        """Decode streamed ExampleBatch messages, refusing more examples than a task may hold."""
        limit = self.core.config.max_examples_per_task
        parts: list[Examples] = []
        seen = 0
        index = 0
        async for batch in batches:
            index += 1
            if not batch.examples:
                continue
            seen += len(batch.examples)
            # checked per message so an oversized upload is refused before it is all in memory
            if seen > limit:
                raise InvalidArgument(f"more than {limit} examples streamed; this server takes at most "
                                      f"{limit} per task")
            parts.append(await asyncio.to_thread(decode_batch, self.core, batch, index - 1, size))
        return parts

    @_rpc
    async def RegisterTask(self, request_iterator: AsyncIterator[pb.RegisterTaskRequest],
                           context: grpc.aio.ServicerContext) -> pb.Task:
        stream, first = await _first_message(request_iterator,
                                             "the RegisterTask stream is empty; its first message must carry the spec")
        if first.WhichOneof("item") != "spec":
            raise InvalidArgument("the first RegisterTask message must carry the spec, not examples")
        spec = task_spec(first.spec)

        end: list[pb.UploadEnd] = []

        async def batches() -> AsyncIterator[pb.ExampleBatch]:
            async for req in stream:
                if end:
                    raise InvalidArgument("no RegisterTask message may follow the UploadEnd message")
                item = req.WhichOneof("item")
                if item == "spec":
                    raise InvalidArgument("only the first RegisterTask message may carry a spec")
                if item == "end":
                    end.append(req.end)
                elif req.HasField("examples"):
                    yield req.examples

        parts = await self._decode_stream(batches(), self.core.new_task_size(spec))
        _check_upload_end(end, parts)  # a stream that just stopped registers nothing
        rec = await asyncio.to_thread(self.core.register_task, spec, parts)
        return to_message(pb.Task, await asyncio.to_thread(self.core.task_view, rec.name))

    @_rpc
    async def AddExamples(self, request_iterator: AsyncIterator[pb.AddExamplesRequest],
                          context: grpc.aio.ServicerContext) -> pb.AddExamplesResponse:
        stream, first = await _first_message(request_iterator, "the AddExamples stream is empty")
        task = first.task
        if not task:
            raise InvalidArgument("the first AddExamples message must name the task")
        # NOT_FOUND before the client streams (and we decode) the whole upload
        t = await asyncio.to_thread(self.core.store.get_task, task)

        end: list[pb.UploadEnd] = []

        async def batches() -> AsyncIterator[pb.ExampleBatch]:
            req = first
            while True:
                if end:
                    raise InvalidArgument("no AddExamples message may follow the one carrying UploadEnd")
                if req.HasField("end"):
                    end.append(req.end)
                yield req.examples
                try:
                    req = await anext(stream)
                except StopAsyncIteration:
                    return

        parts = await self._decode_stream(batches(), t.image_size)
        _check_upload_end(end, parts)  # a stream that just stopped adds nothing
        # one core call for the whole stream: the examples are stored as one batch, or not at all
        examples = Examples.concat(parts, t.image_size)
        counts = await asyncio.to_thread(self.core.add_examples, task, examples)
        totals = await asyncio.to_thread(self.core.store.example_counts, task)
        return pb.AddExamplesResponse(
            task=task, added=len(examples.y), train=counts.get("train", 0),
            validation=counts.get("validation", 0), test=counts.get("test", 0),
            total_examples=sum(totals.values()))

    @_rpc
    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext
                        ) -> pb.ListTasksResponse:
        views = await asyncio.to_thread(self.core.list_task_views)
        return pb.ListTasksResponse(tasks=[to_message(pb.Task, v) for v in views])

    @_rpc
    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        return to_message(pb.Task, await asyncio.to_thread(self.core.task_view, request.name))

    @_rpc
    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DeleteTaskResponse:
        await asyncio.to_thread(self.core.delete_task, request.name)
        return pb.DeleteTaskResponse(name=request.name)

    # ---- versions ---------------------------------------------------------------------------

    @_rpc
    async def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListVersionsResponse:
        current, versions = await asyncio.to_thread(self.core.list_versions, request.task)
        return pb.ListVersionsResponse(task=request.task, current_version=current,
                                       versions=[to_message(pb.PathVersion, v) for v in versions])

    @_rpc
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        # rollback exports and parity-checks the old version: seconds, so off the event loop
        return to_message(pb.Task, await asyncio.to_thread(self.core.rollback, request.task, request.version,
                                                           policy_name(request.policy)))

    @_rpc
    async def SetTaskPolicy(self, request: pb.SetTaskPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        settings = evolution_settings(request.evolution) if request.HasField("evolution") else None
        return to_message(pb.Task, await asyncio.to_thread(self.core.set_policy, request.task,
                                                           policy_name(request.policy), settings))

    @_rpc
    async def WatchTask(self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext) -> None:
        store = self.core.store
        if request.task:
            store.get_task(request.task)  # NOT_FOUND for a task that does not exist
        after = request.since_id - 1 if request.since_id else await asyncio.to_thread(store.last_event_id)
        while True:
            events = await asyncio.to_thread(store.events, after, request.task)
            for e in events:
                await context.write(to_message(pb.TaskEvent,
                                               {**e, "detail_json": json.dumps(e["detail"], sort_keys=True)}))
                after = e["id"]
            if request.task and any(e["kind"] == "deleted" for e in events):
                return  # the task is gone; a new one of that name is another task
            # the store is the meeting point of every process that changes tasks: poll it
            await asyncio.sleep(WATCH_POLL_S)

    @_rpc
    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        require_version("Promote", request.version)
        return to_message(pb.Task, await asyncio.to_thread(self.core.promote, request.task, request.version))

    @_rpc
    async def Reject(self, request: pb.RejectRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        require_version("Reject", request.version)
        return to_message(pb.Task, await asyncio.to_thread(self.core.reject, request.task, request.version,
                                                           request.reason))

    # ---- evolution --------------------------------------------------------------------------

    def _require_evolution(self) -> Evolution:
        if self.evolution is None:
            raise FailedPrecondition("evolution is disabled on this server")
        return self.evolution

    @_rpc
    async def TriggerEvolution(self, request: pb.TriggerEvolutionRequest, context: grpc.aio.ServicerContext
                               ) -> pb.EvolutionStatus:
        evo = self._require_evolution()
        # a coroutine trigger is awaited here; a plain one must return quickly (or return an
        # awaitable for the wait), because it runs on the event loop that serves Predict
        result = evo.trigger(request.task or None, request.candidates, request.budget_seconds, request.wait)
        if inspect.isawaitable(result):
            result = await result
        if request.wait:
            # the generation published to the store; answer once this server serves what it published
            await asyncio.to_thread(self.core.sync_from_store)
        return to_message(pb.EvolutionStatus, result)

    @_rpc
    async def GetEvolutionStatus(self, request: pb.GetEvolutionStatusRequest,
                                 context: grpc.aio.ServicerContext) -> pb.EvolutionStatus:
        result = self._require_evolution().status()
        if inspect.isawaitable(result):
            result = await result
        return to_message(pb.EvolutionStatus, result)


# ---- server -------------------------------------------------------------------------------------


class Health(health_aio.HealthServicer):
    """grpc.health.v1 with the Munet service SERVING from the start, and a graceful-shutdown switch."""

    def __init__(self, services: tuple[str, ...] = ("", SERVICE_NAME)):
        super().__init__()
        # the server is built outside any coroutine, and the base class's `set` is one; before the
        # server starts nobody can be watching, so writing the status table directly is the same
        for s in services:
            self._server_status[s] = health_pb2.HealthCheckResponse.SERVING

    async def shutting_down(self) -> None:
        """Report NOT_SERVING for every service from now on (load balancers stop sending work)."""
        await self.enter_graceful_shutdown()


WATCH_POLL_S = 0.2


def create_grpc_server(core: Core, evolution: Evolution | None, config: Config,
                       address: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Build (not start) the gRPC server; returns it and the bound port (an ephemeral one for port 0).

    The health servicer is reachable as `server.munet_health` (see `stop_grpc_server`).
    """
    tokens = Tokens.from_config(config)
    # no tokens, no interceptor: it would cost every call a coroutine hop for nothing
    interceptors = [GrpcAuthInterceptor(tokens)] if tokens.admin or tokens.predict else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # without this a second server on the same port would silently share its traffic
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_MunetServicer_to_server(MunetServicer(core, evolution), server)
    oip.add_to_server(core, server)  # inference.GRPCInferenceService (KServe v2) on the same port and core
    health = Health(("", SERVICE_NAME, oip.SERVICE_NAME))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = address or f"{config.host}:{config.grpc_port}"
    try:
        creds = server_credentials(config)
        port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the gRPC server to {address} (is another server using the port?): {e}") \
            from None
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address} (is another server using the port?)")
    server.munet_health = health  # type: ignore[attr-defined]
    log.info("gRPC server bound to %s (port %d)", address, port)
    return server, port


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS from the configured PEM files (mutual TLS when a client CA is given); None: plaintext."""
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both tls_cert and tls_key")
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


async def stop_grpc_server(server: grpc.aio.Server, grace: float | None = 5.0) -> None:
    """Graceful stop: health goes NOT_SERVING first, then in-flight RPCs get `grace` seconds."""
    health: Health | None = getattr(server, "munet_health", None)
    if health is not None:
        await health.shutting_down()
    await server.stop(grace)


__all__ = ["SERVICE_NAME", "Health", "MunetServicer", "create_grpc_server", "decode_batch", "enum_name",
           "enum_value", "image_input", "policy_name", "stop_grpc_server", "task_spec", "timestamp", "to_message"]
