"""A typed, synchronous client for the munet.v1.Munet gRPC API.

    with MunetClient("localhost:50051") as c:
        c.register_task("digits", builtin="uci_digits", max_examples=600)
        result = c.predict("digits", ["three.png"], top_k=3)
        print(result.predictions[0][0].label)

Every method returns plain dataclasses, never protos, and raises `MunetClientError` (with the gRPC
status code's name) for anything the server refuses. `munet.aio_client.AsyncMunetClient` has the same
methods on `grpc.aio`.

Images: a path, encoded bytes, or a numpy array. An array of rank 2 is one grayscale image (H, W),
rank 3 one image (H, W, C) with C = 1, 3 or 4, rank 4 a batch (N, H, W, C); send a grayscale batch as
(N, H, W, 1) (`x[..., None]`) or as a list of (H, W) arrays. Anything else is a ValueError.

Deadlines and retries: every call has a deadline (`timeout`, or `long_timeout` for the calls that
train; `watch_task` only when given one). The idempotent calls (Predict, ListTasks, GetTask,
ListVersions, GetEvolutionStatus, health Check) are retried by gRPC's own retry policy (the channel's
service config, `SERVICE_CONFIG`) when they fail UNAVAILABLE, up to 4 attempts with exponential
backoff, all within the call's deadline; the calls that change state are never retried, and neither
is RESOURCE_EXHAUSTED (the server is overloaded: retrying at once would only add load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The calls that are safe to send twice: gRPC retries them (on UNAVAILABLE only: a server restarting,
# a connection refused or dropped) within the call's deadline. Writes (RegisterTask, AddExamples,
# DeleteTask, Rollback, SetTaskPolicy, Promote, Reject, TriggerEvolution) and the WatchTask stream
# are not retried: a write the server applied but whose answer was lost must not be applied twice.
IDEMPOTENT_METHODS = (("munet.v1.Munet", "Predict"), ("munet.v1.Munet", "ListTasks"),
                      ("munet.v1.Munet", "GetTask"), ("munet.v1.Munet", "ListVersions"),
                      ("munet.v1.Munet", "GetEvolutionStatus"), ("grpc.health.v1.Health", "Check"))
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = {"methodConfig": [{"name": [{"service": s, "method": m} for s, m in IDEMPOTENT_METHODS],
                                    "retryPolicy": RETRY_POLICY}]}

# core/npz split codes (0 train, 1 validation, 2 test, -1 let the server choose) -> proto Split
_SPLITS = {-1: pb.SPLIT_UNSPECIFIED, 0: pb.SPLIT_TRAIN, 1: pb.SPLIT_VALIDATION, 2: pb.SPLIT_TEST}
_POLICIES = ("auto", "approve", "frozen")

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray
T = TypeVar("T")


class MunetClientError(Exception):
    """The server (or the channel) refused a call; `code` is the gRPC status code's name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---- results ------------------------------------------------------------------------------------


class LabelScore(NamedTuple):
    label: str
    index: int
    probability: float


@dataclass
class PredictResult:
    task: str
    version: int
    predictions: list[list[LabelScore]]  # per image, best first


@dataclass
class ModuleInfo:
    id: str
    kind: str
    params: int
    shared_by: int
    frozen: bool


@dataclass
class PathVersion:
    version: int
    modules: list[ModuleInfo]
    validation_accuracy: float
    test_accuracy: float
    score: float
    params: int
    accounted_params: int
    added_params: int
    parents: list[int]
    parent_task: str
    mutations: list[str]
    hyperparameters: dict
    training_seconds: float
    created_at: str  # RFC 3339 (from created_time)
    status: str  # current, retired, candidate, pending, rejected, failed (from the PathStatus enum)
    training_steps: int = 0
    training_examples: int = 0
    decision: str = ""  # why evolution promoted it or not, or who did
    note: str = ""  # why it failed, was rejected or is pending


@dataclass
class Task:
    name: str
    labels: list[str]
    status: str  # creating or serving (from the TaskStatus enum)
    current_version: int
    path: PathVersion | None
    train_examples: int
    validation_examples: int
    test_examples: int
    source: str
    created_at: str  # RFC 3339 (from created_time)
    lineage: list[PathVersion] = field(default_factory=list)
    root: str = ""  # the root its paths grew from
    image_size: int = 0  # pixels per side its images are resized to
    policy: str = "auto"  # promotion policy: auto, approve, frozen
    evolution: dict = field(default_factory=dict)  # the task's own evolution settings (absent: the server's)
    pending_versions: list[int] = field(default_factory=list)  # waiting for promote() or reject()
    # the pending version's shadow evaluation: version, requests, images, agreement, dropped,
    # labelled_examples, accuracy, incumbent_accuracy (None when nothing is pending)
    shadow: dict | None = None


@dataclass
class Versions:
    task: str
    current_version: int
    versions: list[PathVersion]


@dataclass
class AddExamplesResult:
    task: str
    added: int
    train: int
    validation: int
    test: int
    total_examples: int


@dataclass
class GenerationReport:
    task: str
    generation: int
    candidates: int
    best_score: float
    incumbent_score: float
    promoted: bool
    promoted_version: int
    error: str
    started_at: str  # RFC 3339 (from started_time)
    seconds: float
    examples_processed: int = 0
    pending_version: int = 0
    outcome: str = ""  # promoted, pending, failed, superseded ("" = nothing beat the incumbent)


@dataclass
class TaskEvent:
    id: int  # pass the last one seen plus one as since_id to resume watching
    task: str
    kind: str  # registered, deleted, generation_started, generation_finished, pending, promoted, ...
    version: int
    detail: dict
    at: str  # RFC 3339


@dataclass
class EvolutionStatus:
    running: bool
    current_task: str
    candidates_done: int
    candidates_total: int
    paused_for_load: bool
    generations: int
    recent: list[GenerationReport]
    scheduler_enabled: bool
    interval_seconds: float
    triggered: GenerationReport | None = None  # the generation a waiting TriggerEvolution ran
    leading: bool = False  # this server holds the store's evolution lease
    leader: str = ""  # else the leading server's gRPC address ("" while none leads)


# ---- proto -> results: the proto's enums and Timestamps become the plain strings the server's core
# uses ("auto", "pending", "generation_started"; RFC 3339 times), so results compare with strings.


def _enum_name(enum: Any, number: int) -> str:
    """POLICY_AUTO -> "auto", TASK_EVENT_KIND_ROLLED_BACK -> "rolled_back"; X_UNSPECIFIED (0) and
    values this client does not know (a newer server's) -> ""."""
    d = enum.DESCRIPTOR
    value = d.values_by_number.get(number)
    if not number or value is None:
        return ""
    return value.name.removeprefix(d.values_by_number[0].name.removesuffix("UNSPECIFIED")).lower()


def _time(m: Any, typed: str, text: str = "") -> str:
    """A time as RFC 3339 text: the released string field `text` when the server filled it (the
    server's own text, as its HTTP API gives it), else the Timestamp field `typed` (the same instant)."""
    if text and getattr(m, text):
        return getattr(m, text)
    return getattr(m, typed).ToDatetime(tzinfo=UTC).isoformat() if m.HasField(typed) else ""


def _policy(policy: str | int) -> int:
    """"auto", "approve", "frozen" (or a Policy value) -> Policy; "" -> POLICY_UNSPECIFIED (the call's
    default). Anything else is refused here as the server would refuse it."""
    if isinstance(policy, int):
        return policy
    if not policy:
        return pb.POLICY_UNSPECIFIED
    if policy not in _POLICIES:
        raise MunetClientError("INVALID_ARGUMENT", f"policy must be one of {', '.join(_POLICIES)}; got {policy!r}")
    return pb.Policy.Value("POLICY_" + policy.upper())


def _path(m: pb.PathVersion) -> PathVersion:
    return PathVersion(
        version=m.version,
        modules=[ModuleInfo(x.id, x.kind, x.params, x.shared_by, x.frozen) for x in m.modules],
        validation_accuracy=m.validation_accuracy, test_accuracy=m.test_accuracy, score=m.score,
        params=m.params, accounted_params=m.accounted_params, added_params=m.added_params,
        parents=list(m.parents), parent_task=m.parent_task, mutations=list(m.mutations),
        hyperparameters=json.loads(m.hyperparameters_json) if m.hyperparameters_json else {},
        training_seconds=m.training_seconds, created_at=_time(m, "created_time", "created_at"),
        status=_enum_name(pb.PathStatus, m.state) or m.status,
        training_steps=m.training_steps, training_examples=m.training_examples, decision=m.decision, note=m.note,
    )


def _task(m: pb.Task) -> Task:
    return Task(
        name=m.name, labels=list(m.labels), status=_enum_name(pb.TaskStatus, m.state) or m.status,
        current_version=m.current_version,
        path=_path(m.path) if m.HasField("path") else None, train_examples=m.train_examples,
        validation_examples=m.validation_examples, test_examples=m.test_examples, source=m.source,
        created_at=_time(m, "created_time", "created_at"), lineage=[_path(p) for p in m.lineage], root=m.root,
        image_size=m.image_size, policy=_enum_name(pb.Policy, m.policy) or "auto",
        pending_versions=list(m.pending_versions),
        shadow={f.name: getattr(m.shadow, f.name) for f in m.shadow.DESCRIPTOR.fields}
        if m.HasField("shadow") else None,
        evolution={k: v for k, v in (("candidates_per_generation", m.evolution.candidates_per_generation),
                                     ("candidate_budget_seconds", m.evolution.candidate_budget_seconds),
                                     ("scale_base", m.evolution.scale_base)) if v},
    )


def _evolution(m: pb.EvolutionStatus) -> EvolutionStatus:
    return EvolutionStatus(
        running=m.running, current_task=m.current_task, candidates_done=m.candidates_done,
        candidates_total=m.candidates_total, paused_for_load=m.paused_for_load, generations=m.generations,
        recent=[_report(r) for r in m.recent],
        scheduler_enabled=m.scheduler_enabled, interval_seconds=m.interval_seconds,
        triggered=_report(m.triggered) if m.HasField("triggered") else None,
        leading=m.leading, leader=m.leader,
    )


def _report(r: pb.GenerationReport) -> GenerationReport:
    return GenerationReport(r.task, r.generation, r.candidates, r.best_score, r.incumbent_score, r.promoted,
                            r.promoted_version, r.error, _time(r, "started_time", "started_at"), r.seconds,
                            r.examples_processed, r.pending_version, _enum_name(pb.GenerationOutcome, r.outcome))


def _predict_result(resp: pb.PredictResponse) -> PredictResult:
    return PredictResult(resp.task, resp.path_version,
                         [[LabelScore(s.label, s.index, s.probability) for s in p.top] for p in resp.predictions])


def _added(r: pb.AddExamplesResponse) -> AddExamplesResult:
    return AddExamplesResult(r.task, r.added, r.train, r.validation, r.test, r.total_examples)


def _versions(r: pb.ListVersionsResponse) -> Versions:
    return Versions(r.task, r.current_version, [_path(v) for v in r.versions])


def _event(m: pb.TaskEvent) -> TaskEvent:
    return TaskEvent(m.id, m.task, _enum_name(pb.TaskEventKind, m.kind), m.version,
                     json.loads(m.detail_json or "{}"), _time(m, "at"))


def _health_status(r: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _rpc_error(e: grpc.RpcError) -> MunetClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return MunetClientError(code.name if code else "UNKNOWN", details or "")


# ---- images -------------------------------------------------------------------------------------


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    # the same conversion the server applies to .npz files, so an upload and a file agree
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.size and \
            0.0 <= float(arr.min()) and float(arr.max()) <= 1.0:
        return np.rint(arr * 255.0).astype(np.uint8)
    raise ValueError(f"image arrays must be uint8 or float in [0, 1]; got {arr.dtype}")


_BATCH_HINT = ("send a batch as an (N, H, W, C) array (a grayscale batch as (N, H, W, 1), e.g. x[..., None]) "
               "or as a list of images")


def raw_image(arr: np.ndarray) -> pb.Image:
    """One (H, W) or (H, W, C) array (C = 1, 3 or 4) as a RawImage (row-major HWC uint8)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        h, w, c = *arr.shape, 1
    elif arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        h, w, c = arr.shape
    elif arr.ndim == 3:
        raise ValueError(f"an array of shape {arr.shape} is not an image: a rank-3 array is one (H, W, C) image "
                         f"with C = 1, 3 or 4 channels; {_BATCH_HINT}")
    else:
        raise ValueError(f"an image array must be (H, W) or (H, W, C); got shape {arr.shape}")
    arr = _as_uint8(arr)
    return pb.Image(raw=pb.RawImage(data=np.ascontiguousarray(arr).tobytes(), height=h, width=w, channels=c))


def to_image(item: ImageLike) -> pb.Image:
    """A file path, encoded bytes (PNG, JPEG, ...) or a pixel array -> Image."""
    if isinstance(item, np.ndarray):
        return raw_image(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(item))
    if isinstance(item, (str, os.PathLike)):
        return pb.Image(encoded=Path(item).read_bytes())
    raise TypeError(f"cannot send {type(item).__name__} as an image; give a path, bytes or a numpy array")


def to_images(images: ImageLike | Iterable[ImageLike]) -> list[pb.Image]:
    """One image or many. A bare array of rank 2 is one grayscale image (H, W), of rank 3 one image
    (H, W, C) with C = 1, 3 or 4, of rank 4 a batch (N, H, W, C); anything else is a ValueError. A grayscale
    batch is (N, H, W, 1) or a list of (H, W) arrays. A list or other iterable holds one image per item."""
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [raw_image(images)]
        if images.ndim == 4:
            if images.shape[3] not in (1, 3, 4):
                raise ValueError(f"a batch of shape {images.shape} is not (N, H, W, C) with C = 1, 3 or 4 channels")
            return [raw_image(a) for a in images]
        raise ValueError(f"an image array must be one (H, W) or (H, W, C) image or an (N, H, W, C) batch; got "
                         f"shape {images.shape}; {_BATCH_HINT}")
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [to_image(images)]
    return [to_image(i) for i in images]


def check_examples(x: np.ndarray, y: Sequence[int] | np.ndarray, split: Sequence[int] | np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate labelled images up front: an error raised while a stream is being sent would only
    reach the caller as a cancelled call."""
    y = np.asarray(y)
    if isinstance(x, (list, tuple)):
        # images of different sizes and formats: file paths, encoded bytes or arrays, one per label
        if len(x) != len(y) or y.ndim != 1:
            raise ValueError(f"{len(x)} images but labels of shape {y.shape}")
    else:
        x = np.asarray(x)
        if x.ndim not in (3, 4) or len(x) != len(y) or y.ndim != 1:
            raise ValueError(f"x must be (N, H, W) or (N, H, W, C) and y (N,); got {x.shape} and {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels y must be integers, got {y.dtype}")
    if (y < 0).any():
        raise ValueError("labels must be non-negative indices into the task's labels")
    s = np.full(len(y), -1) if split is None else np.asarray(split)
    if s.shape != y.shape:
        raise ValueError(f"split must be (N,) like y; got {s.shape}")
    if not np.isin(s, list(_SPLITS)).all():
        raise ValueError("split codes must be 0 (train), 1 (validation), 2 (test) or -1 (server's choice)")
    return (x if isinstance(x, (list, tuple)) else _as_uint8(x)), y, s


def example_batches(x: np.ndarray, y: Sequence[int] | np.ndarray, split: Sequence[int] | np.ndarray | None,
                    chunk: int) -> Iterator[pb.ExampleBatch]:
    """Labelled images as ExampleBatch messages of at most `chunk` images, built as they are sent."""
    x, y, s = check_examples(x, y, split)
    chunk = max(1, int(chunk))

    def gen() -> Iterator[pb.ExampleBatch]:
        for start in range(0, len(y), chunk):
            batch = pb.ExampleBatch()
            for i in range(start, min(start + chunk, len(y))):
                image = raw_image(x[i]) if isinstance(x, np.ndarray) else to_image(x[i])
                batch.examples.add(image=image, label=int(y[i]), split=_SPLITS[int(s[i])])
            yield batch

    return gen()


def register_requests(name: str, labels: Sequence[str] | None = None, builtin: str | None = None,
                      npz_file: str | None = None, examples: tuple | None = None, max_examples: int = 0,
                      seed: int = 0, chunk: int = 256, validation_fraction: float | None = None,
                      test_fraction: float | None = None, root: str = "", policy: str = "auto"
                      ) -> Iterator[pb.RegisterTaskRequest]:
    """RegisterTask's request stream: the spec, the examples in `chunk`-image batches, then the UploadEnd
    that commits them. The spec and the examples are checked now, before anything is sent. A fraction
    left None is not sent (the server's default, 0.1); 0 is sent and means none."""
    spec = pb.TaskSpec(name=name, labels=list(labels or []), max_examples=max_examples, seed=seed,
                       validation_fraction=validation_fraction, test_fraction=test_fraction, root=root,
                       policy=_policy(policy))
    if builtin:
        spec.builtin = builtin
    if npz_file:
        spec.npz_file = npz_file
    batches: Iterator[pb.ExampleBatch] = iter(())
    if examples is not None:
        x, y, *rest = examples
        batches = example_batches(x, y, rest[0] if rest else None, chunk)

    def messages() -> Iterator[pb.RegisterTaskRequest]:
        yield pb.RegisterTaskRequest(spec=spec)
        sent = 0
        for b in batches:
            sent += len(b.examples)
            yield pb.RegisterTaskRequest(examples=b)
        yield pb.RegisterTaskRequest(end=pb.UploadEnd(examples=sent))  # commit: all was sent

    return messages()


def add_requests(task: str, x: np.ndarray, y: Sequence[int] | np.ndarray,
                 split: Sequence[int] | np.ndarray | None = None, chunk: int = 256) -> Iterator[pb.AddExamplesRequest]:
    """AddExamples' request stream (the examples checked now), ending in the UploadEnd that commits them."""
    batches = example_batches(x, y, split, chunk)

    def messages() -> Iterator[pb.AddExamplesRequest]:
        first, sent = True, 0
        for b in batches:
            sent += len(b.examples)
            yield pb.AddExamplesRequest(task=task if first else "", examples=b)
            first = False
        # commit: all was sent (the first message when there were no examples, naming the task,
        # so the server says what is wrong)
        yield pb.AddExamplesRequest(task=task if first else "", end=pb.UploadEnd(examples=sent))

    return messages()


def set_policy_request(task: str, policy: str = "", candidates_per_generation: int | None = None,
                       candidate_budget_seconds: float | None = None,
                       scale_base: float | None = None) -> pb.SetTaskPolicyRequest:
    req = pb.SetTaskPolicyRequest(task=task, policy=_policy(policy))
    if any(v is not None for v in (candidates_per_generation, candidate_budget_seconds, scale_base)):
        req.evolution.CopyFrom(pb.EvolutionSettings(
            candidates_per_generation=candidates_per_generation or 0,
            candidate_budget_seconds=candidate_budget_seconds or 0.0, scale_base=scale_base or 0.0))
    return req


# ---- client -------------------------------------------------------------------------------------


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = [*(d.metadata or ()), self.header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def channel_options() -> list[tuple[str, Any]]:
    """The channel options both clients use: 64 MiB messages, and gRPC's retries (`SERVICE_CONFIG`) with
    a retry buffer as large as a message, so that a large Predict is retried too (gRPC does not retry a
    call whose request outgrew the buffer, 256 KiB by default)."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES)]


def channel_credentials(tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
                        tls_key: str | os.PathLike | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (None: a plaintext channel). `tls_ca` "" or "system": the system's roots."""
    if tls_ca is None and tls_cert is None:
        return None

    def read(p):
        return Path(p).read_bytes() if p not in (None, "", "system") else None

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


class MunetClient:
    """Synchronous client. `timeout` bounds ordinary calls; `long_timeout` bounds the ones that train
    (RegisterTask, Rollback, Promote, TriggerEvolution with wait). Idempotent calls are retried on
    UNAVAILABLE within their deadline (see the module's docstring)."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float = 30.0, long_timeout: float = 1800.0,
                 token: str | None = None, tls_ca: str | os.PathLike | None = None,
                 tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None):
        """`token`: sent as `authorization: Bearer <token>` on every call. `tls_ca`: a PEM CA bundle
        to trust (TLS; "" or "system" for the system's roots); `tls_cert`/`tls_key`: a client
        certificate for servers that require one (mutual TLS)."""
        self.target = target
        self.timeout = timeout
        self.long_timeout = long_timeout
        creds = channel_credentials(tls_ca, tls_cert, tls_key)
        if creds is not None:
            channel = grpc.secure_channel(target, creds, options=channel_options())
        else:
            channel = grpc.insecure_channel(target, options=channel_options())
        self._raw_channel = channel
        if token:
            channel = grpc.intercept_channel(channel, _Bearer(token))
        self._channel = channel
        self._stub = pb_grpc.MunetStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._raw_channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (for scripts that start the server themselves)."""
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise MunetClientError("UNAVAILABLE", f"no server at {self.target} after {timeout:.0f} s") from None

    def _call(self, rpc: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return rpc(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    # ---- predict ----------------------------------------------------------------------------

    def predict(self, task: str, images: ImageLike | Iterable[ImageLike], top_k: int = 1,
                timeout: float | None = None, version: int = 0) -> PredictResult:
        """Classify images with the task's current path, or with the kept path `version` (0 = current)."""
        req = pb.PredictRequest(task=task, images=to_images(images), top_k=top_k, version=version)
        return _predict_result(self._call(self._stub.Predict, req, timeout))

    # ---- tasks ------------------------------------------------------------------------------

    def register_task(self, name: str, labels: Sequence[str] | None = None, builtin: str | None = None,
                      npz_file: str | None = None,
                      examples: tuple[np.ndarray, Sequence[int]] | tuple[np.ndarray, Sequence[int], Any] | None = None,
                      max_examples: int = 0, seed: int = 0, chunk: int = 256,
                      validation_fraction: float | None = None, test_fraction: float | None = None,
                      timeout: float | None = None, root: str = "",
                      policy: str = "auto") -> Task:
        """Create a task from a built-in data set, a file in the server's import directory and/or
        uploaded `(x, y[, split])` examples (streamed in `chunk`-image messages; x an (N, H, W[, C])
        array or a list of image files, encoded bytes or arrays of any sizes). Blocks while the
        server trains the task's first path. `root` picks the root to grow from (default: the server's);
        `policy` is its promotion policy (auto, approve, frozen)."""
        messages = register_requests(name, labels, builtin, npz_file, examples, max_examples, seed, chunk,
                                     validation_fraction, test_fraction, root, policy)
        return _task(self._call(self._stub.RegisterTask, messages,
                                timeout if timeout is not None else self.long_timeout))

    def add_examples(self, task: str, x: np.ndarray, y: Sequence[int] | np.ndarray,
                     split: Sequence[int] | np.ndarray | None = None, chunk: int = 256,
                     timeout: float | None = None) -> AddExamplesResult:
        """Add labelled examples to a task: x an (N, H, W[, C]) array or a list of images, y (N,) labels,
        `split` (N,) codes (0 train, 1 validation, 2 test, -1 the server's choice)."""
        return _added(self._call(self._stub.AddExamples, add_requests(task, x, y, split, chunk), timeout))

    def list_tasks(self, timeout: float | None = None) -> list[Task]:
        return [_task(t) for t in self._call(self._stub.ListTasks, pb.ListTasksRequest(), timeout).tasks]

    def get_task(self, name: str, timeout: float | None = None) -> Task:
        return _task(self._call(self._stub.GetTask, pb.GetTaskRequest(name=name), timeout))

    def delete_task(self, name: str, timeout: float | None = None) -> str:
        return self._call(self._stub.DeleteTask, pb.DeleteTaskRequest(name=name), timeout).name

    # ---- versions and evolution -------------------------------------------------------------

    def list_versions(self, task: str, timeout: float | None = None) -> Versions:
        return _versions(self._call(self._stub.ListVersions, pb.ListVersionsRequest(task=task), timeout))

    def rollback(self, task: str, version: int = 0, policy: str = "", timeout: float | None = None) -> Task:
        """Serve an earlier version again (0: the one before the current). The task is then frozen,
        unless `policy` is "auto" or "approve"; the returned Task says which."""
        req = pb.RollbackRequest(task=task, version=version, policy=_policy(policy))
        return _task(self._call(self._stub.Rollback, req, timeout if timeout is not None else self.long_timeout))

    def set_task_policy(self, task: str, policy: str = "", candidates_per_generation: int | None = None,
                        candidate_budget_seconds: float | None = None, scale_base: float | None = None,
                        timeout: float | None = None) -> Task:
        """Set a task's promotion policy ("auto", "approve", "frozen"; "" keeps it) and, when any is
        given, its evolution settings (each None or 0 = the server's default)."""
        req = set_policy_request(task, policy, candidates_per_generation, candidate_budget_seconds, scale_base)
        return _task(self._call(self._stub.SetTaskPolicy, req, timeout))

    def watch_task(self, task: str = "", since_id: int = 0, timeout: float | None = None) -> Iterator[TaskEvent]:
        """Events as they happen to `task` (or every task): generations, pending versions, promotions,
        rollbacks, failures. `since_id` first replays the stored events from that id on (1: all kept;
        0: none). The one call without a default deadline (a watch is meant to last): it ends when the
        task is deleted, when the caller stops iterating (or closes the generator), or at `timeout`
        seconds with MunetClientError("DEADLINE_EXCEEDED"). It is not retried: resume after an error
        with `since_id` = the last event's id + 1."""
        call = self._stub.WatchTask(pb.WatchTaskRequest(task=task, since_id=since_id), timeout=timeout)
        try:
            for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise _rpc_error(e) from None
        finally:
            call.cancel()

    def promote(self, task: str, version: int, timeout: float | None = None) -> Task:
        """Serve `version` now: under policy "approve", the pending version an operator accepts."""
        return _task(self._call(self._stub.Promote, pb.PromoteRequest(task=task, version=version),
                                timeout if timeout is not None else self.long_timeout))

    def reject(self, task: str, version: int, reason: str = "", timeout: float | None = None) -> Task:
        """Refuse a pending version: it is never served by evolution, and pruned first."""
        return _task(self._call(self._stub.Reject, pb.RejectRequest(task=task, version=version, reason=reason),
                                timeout))

    def trigger_evolution(self, task: str = "", candidates: int = 0, budget_seconds: float = 0.0,
                          wait: bool = False, timeout: float | None = None) -> EvolutionStatus:
        req = pb.TriggerEvolutionRequest(task=task, candidates=candidates, budget_seconds=budget_seconds,
                                         wait=wait)
        if timeout is None and wait:
            timeout = self.long_timeout
        return _evolution(self._call(self._stub.TriggerEvolution, req, timeout))

    def evolution_status(self, timeout: float | None = None) -> EvolutionStatus:
        return _evolution(self._call(self._stub.GetEvolutionStatus, pb.GetEvolutionStatusRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ... ("" is the whole server)."""
        return _health_status(self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout))


__all__ = ["DEFAULT_TARGET", "SERVICE_CONFIG", "AddExamplesResult", "EvolutionStatus", "GenerationReport", "LabelScore",
           "ModuleInfo", "MunetClient", "MunetClientError", "PathVersion", "PredictResult", "Task", "TaskEvent",
           "Versions", "channel_credentials", "channel_options", "check_examples", "example_batches", "raw_image",
           "to_image", "to_images"]
