"""The Open Inference Protocol (KServe v2), as Triton and KServe clients speak it, on munet's core.

A model is a task; its versions are the task's kept path versions ("3"; "" = the current one). A
model has one input, `images`: a UINT8 tensor [N, H, W, C] (C = 1, 3 or 4) or [N, H, W] of pixels of
any size, or a BYTES tensor [N] (or [N, 1]) of encoded images (PNG, JPEG, ...); and one output,
`probabilities`: FP32 [N, classes], every class's probability, the same numbers munet.v1 Predict
returns. With Triton's classification extension (the output parameter `classification` = k) that
output is instead BYTES [N, k] of "<probability>:<index>:<label>" strings, best first.

This module holds the protocol-neutral part (tensors -> ImageInput, probabilities -> tensors,
metadata) and the gRPC servicer `inference.GRPCInferenceService`; `munet.service.oip_http` serves
the same over HTTP. Every rule (admission, decoding, batching, versions) stays in the core. Beyond
KServe's six calls, Triton's model-repository index lists the models (the tasks).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from typing import Any

import grpc
import numpy as np

from munet import metrics
from munet.errors import FailedPrecondition, InvalidArgument, MunetError, NotFound
from munet.inference import grpc_predict_v2_pb2 as pb
from munet.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from munet.service.core import Core, ImageInput
from munet.service.grpc_calls import guarded
from munet.service.runtime import ServedPath

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
SERVER_NAME = "munet"
PLATFORM = "munet_onnx_path"  # a chain of ONNX Runtime sessions, one per module of the task's path
INPUT = "images"
OUTPUT = "probabilities"
EXTENSIONS = ("classification", "binary_tensor_data")
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def server_version() -> str:
    try:
        return _metadata.version("munet-serve")
    except _metadata.PackageNotFoundError:
        return "unknown"


# ---- protocol-neutral types -----------------------------------------------------------------------


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the top-k classes as BYTES strings instead of the probabilities
    binary: bool | None = None  # HTTP only: this output as binary data after the JSON header


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # float32 for FP32; an object array of bytes for BYTES
    binary: bool | None = field(default=None, repr=False)

    def raw(self) -> bytes:
        """The tensor's elements as the protocol's raw contents (little-endian, row-major)."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.data.ravel())
        return np.ascontiguousarray(self.data, dtype="<f4").tobytes()


# ---- parameters and versions --------------------------------------------------------------------


def parse_version(version: str) -> int:
    """A model version string -> the core's version number (0 = the task's current path)."""
    v = (version or "").strip()
    if not v:
        return 0
    if not (v.isascii() and v.isdigit()) or not 1 <= int(v) < 2**31:
        raise InvalidArgument(f"model version {version!r} is not a version of this server: versions are the "
                              "task's path versions, positive integers (\"3\"), or empty for the current one")
    return int(v)


def as_int(value: Any, what: str) -> int:
    """A request parameter that must be an integer (JSON number, proto int64/uint64 or decimal string)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer, got a boolean")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InvalidArgument(f"{what} must be an integer, got {value!r}")


def check_request_parameters(params: dict[str, Any]) -> float | None:
    """Refuse what this server cannot honour; returns the request's `timeout` in seconds, if any.

    Triton's `timeout` parameter is in microseconds. Sequence (stateful) parameters are refused:
    these models are stateless. Parameters nobody here knows are ignored, as Triton does."""
    for key in ("sequence_id", "correlation_id"):
        if params.get(key) not in (None, 0, "", False):
            raise InvalidArgument(f"parameter {key!r}: munet models are stateless; sequence batching is not supported")
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise InvalidArgument("shared memory is not supported by this server; send the tensor in the request")
    if params.get("timeout") is not None:
        us = as_int(params["timeout"], "parameter 'timeout' (microseconds)")
        if us <= 0:
            raise InvalidArgument("parameter 'timeout' (microseconds) must be positive")
        return us / 1e6
    return None


def check_tensor_parameters(params: dict[str, Any], what: str) -> None:
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise InvalidArgument(f"{what}: shared memory is not supported by this server; send the data in the "
                                  "request")


def requested_output(name: str, params: dict[str, Any]) -> RequestedOutput:
    check_tensor_parameters(params, f"output {name!r}")
    k = 0
    if params.get("classification") is not None:
        k = as_int(params["classification"], f"output {name!r}: parameter 'classification'")
        if k < 0:
            raise InvalidArgument(f"output {name!r}: parameter 'classification' must be a positive class count")
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidArgument(f"output {name!r}: parameter 'binary_data' must be true or false")
    return RequestedOutput(name, k, binary)


# ---- tensors -> images --------------------------------------------------------------------------


def _shape(shape: Sequence[Any]) -> list[int]:
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise InvalidArgument(f"input {INPUT!r}: shape {list(shape)} must be a list of non-negative integers")
        out.append(int(d))
    return out


def _check_input(name: str, datatype: str, shape: list[int], task: str) -> None:
    if name != INPUT:
        raise InvalidArgument(f"unexpected inference input {name!r} for model {task!r}: its input is {INPUT!r} "
                              "(UINT8 [N, H, W, C] pixels or BYTES [N] encoded images)")
    if datatype == "UINT8":
        if len(shape) not in (3, 4):
            raise InvalidArgument(f"input {INPUT!r}: a UINT8 tensor must be [N, H, W, C] (C = 1, 3 or 4) or "
                                  f"[N, H, W]; got shape {shape}")
        if len(shape) == 4 and shape[3] not in (1, 3, 4):
            raise InvalidArgument(f"input {INPUT!r}: images have 1, 3 or 4 channels; got shape {shape}")
        if 0 in shape[1:]:
            raise InvalidArgument(f"input {INPUT!r}: an image needs a height and a width above 0; got shape {shape}")
    elif datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidArgument(f"input {INPUT!r}: a BYTES tensor of encoded images must be [N] or [N, 1]; "
                                  f"got shape {shape}")
    else:
        raise InvalidArgument(f"input {INPUT!r}: datatype {datatype!r} is not accepted: send UINT8 pixels "
                              "[N, H, W, C] or BYTES encoded images [N]")
    if shape[0] < 1:
        raise InvalidArgument(f"input {INPUT!r}: the request has no images (shape {shape})")


def pixel_images(shape: list[int], data: bytes | bytearray | memoryview) -> list[ImageInput]:
    """A UINT8 [N, H, W(, C)] tensor's row-major bytes -> one raw ImageInput per image (no copy)."""
    n, h, w = shape[:3]
    c = shape[3] if len(shape) == 4 else 1
    need = math.prod(shape)
    if len(data) != need:
        raise InvalidArgument(f"input {INPUT!r}: shape {shape} holds {need} UINT8 elements; got {len(data)} bytes")
    mv = memoryview(data)
    step = h * w * c
    return [ImageInput(raw=mv[i * step:(i + 1) * step], height=h, width=w, channels=c) for i in range(n)]


def uint8_from_values(values: Any, shape: list[int]) -> bytes:
    """Typed contents (proto uint_contents, or JSON data, flat or nested) of a UINT8 tensor -> bytes."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidArgument(f"input {INPUT!r}: data is not a rectangular array of numbers") from None
    integral = np.issubdtype(arr.dtype, np.integer) or (  # (numpy's bool is not an integer type)
        np.issubdtype(arr.dtype, np.floating) and bool(np.isfinite(arr).all()) and np.array_equal(arr, np.round(arr)))
    if arr.size and not integral:
        raise InvalidArgument(f"input {INPUT!r}: UINT8 data must be integers 0..255")
    if arr.size != math.prod(shape):
        raise InvalidArgument(f"input {INPUT!r}: shape {shape} holds {math.prod(shape)} elements; the data has "
                              f"{arr.size}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InvalidArgument(f"input {INPUT!r}: UINT8 data has values outside 0..255")
    return arr.astype(np.uint8).tobytes()


def serialize_bytes(items: Sequence[bytes] | np.ndarray) -> bytes:
    """BYTES elements as Triton lays them out in raw contents: each a 4-byte little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def deserialize_bytes(data: bytes | bytearray | memoryview, count: int) -> list[memoryview]:
    """Raw BYTES contents -> exactly `count` elements, or INVALID_ARGUMENT saying what is wrong."""
    mv = memoryview(data)
    out: list[memoryview] = []
    off, end = 0, len(mv)
    while off < end:
        if len(out) == count:
            raise InvalidArgument(f"input {INPUT!r}: the BYTES data holds more than the {count} elements its shape "
                                  f"says ({end - off} bytes left over)")
        if off + 4 > end:
            raise InvalidArgument(f"input {INPUT!r}: BYTES data ends inside an element's 4-byte length (each element "
                                  "is a little-endian uint32 length followed by that many bytes)")
        (length,) = struct.unpack_from("<I", mv, off)
        off += 4
        if off + length > end:
            raise InvalidArgument(f"input {INPUT!r}: BYTES element {len(out)} says {length} bytes; only "
                                  f"{end - off} remain")
        out.append(mv[off:off + length])
        off += length
    if len(out) != count:
        raise InvalidArgument(f"input {INPUT!r}: shape says {count} BYTES elements; the data holds {len(out)}")
    return out


def encoded_images(elements: Sequence[bytes | memoryview]) -> list[ImageInput]:
    return [ImageInput(encoded=e) for e in elements]


def images_from_tensor(task: str, name: str, datatype: str, shape: Sequence[Any], *, raw: Any = None,
                       values: Any = None) -> list[ImageInput]:
    """One input tensor -> the images it carries. `raw`: the tensor's raw contents (gRPC
    raw_input_contents, HTTP binary data); `values`: typed contents (a list, or JSON data)."""
    dims = _shape(shape)
    _check_input(name, datatype, dims, task)
    if (raw is None) == (values is None):
        raise InvalidArgument(f"input {INPUT!r} carries no data" if raw is None else
                              f"input {INPUT!r} carries both raw and typed contents; send one")
    if datatype == "UINT8":
        return pixel_images(dims, raw if raw is not None else uint8_from_values(values, dims))
    count = dims[0]
    if raw is not None:
        return encoded_images(deserialize_bytes(raw, count))
    if len(values) != count:
        raise InvalidArgument(f"input {INPUT!r}: shape {dims} says {count} BYTES elements; got {len(values)}")
    return encoded_images(values)


# ---- probabilities -> outputs -------------------------------------------------------------------


def classification_strings(probs: np.ndarray, labels: Sequence[str], k: int) -> np.ndarray:
    """Triton's classification extension: the top k of each row as b"<value>:<index>:<label>", best first."""
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = np.empty((probs.shape[0], k), dtype=object)
    for i in range(probs.shape[0]):
        for j, c in enumerate(order[i]):
            out[i, j] = f"{float(probs[i, c]):f}:{int(c)}:{labels[c]}".encode()
    return out


def check_outputs(task: str, outputs: Sequence[RequestedOutput]) -> None:
    seen = set()
    for o in outputs:
        if o.name != OUTPUT:
            raise InvalidArgument(f"unexpected inference output {o.name!r} for model {task!r}: its output is "
                                  f"{OUTPUT!r}")
        if o.name in seen:
            raise InvalidArgument(f"output {o.name!r} is requested twice")
        seen.add(o.name)


def make_outputs(path: ServedPath, probs: np.ndarray, outputs: Sequence[RequestedOutput]) -> list[OutputTensor]:
    """The requested outputs (none named: all of them) from the (N, classes) probabilities."""
    out = []
    for o in outputs or [RequestedOutput(OUTPUT)]:
        if o.classification:
            data = classification_strings(probs, path.labels, o.classification)
            out.append(OutputTensor(o.name, "BYTES", list(data.shape), data, o.binary))
        else:
            out.append(OutputTensor(o.name, "FP32", list(probs.shape), probs.astype(np.float32, copy=False),
                                    o.binary))
    return out


async def infer(core: Core, task: str, version: str, images: list[ImageInput], outputs: Sequence[RequestedOutput],
                timeout: float | None, timing: dict[str, float] | None = None
                ) -> tuple[ServedPath, list[OutputTensor]]:
    check_outputs(task, outputs)
    path, probs = await core.probabilities(task, images, timeout=timeout, version=parse_version(version),
                                           timing=timing)
    return path, make_outputs(path, probs, outputs)


# ---- metadata -----------------------------------------------------------------------------------


def kept_versions(core: Core, task: str) -> list[int]:
    """The versions that can answer (every stored version but the failed ones). Blocking (SQLite)."""
    return [v.version for v in core.store.list_versions(task) if v.status != "failed"]


def resolve(core: Core, task: str, version: str) -> tuple[ServedPath, list[int], int]:
    path = core.served(task)  # NOT_FOUND (or FAILED_PRECONDITION while it registers) before any query
    versions = kept_versions(core, task)
    v = parse_version(version)
    if v and v not in versions:
        stored = {r.version: r for r in core.store.list_versions(task)}
        if v in stored:
            raise FailedPrecondition(f"model {task!r} version {v} failed its checks and cannot serve")
        raise NotFound(f"model {task!r} has no version {v}; its versions are {', '.join(map(str, versions))}")
    return path, versions, v


def model_metadata(core: Core, task: str, version: str = "") -> dict:
    """KServe's model metadata of a task. Blocking (SQLite): call it in a thread."""
    path, versions, _ = resolve(core, task, version)
    return {
        "name": task,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        # pixels of any size; UINT8 [N, H, W] (grayscale) and C = 1 or 4, and BYTES [N] of encoded
        # images under the same name, are accepted too (KServe's metadata cannot say "or")
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(path.labels)]}],
    }


def model_ready(core: Core, task: str, version: str = "") -> bool:
    """Whether the task (at `version`) can answer now; never raises for an unknown model or version."""
    try:
        resolve(core, task, version)
    except MunetError:
        return False
    return True


def repository_index(core: Core, ready_only: bool = False) -> list[dict]:
    """Triton's model-repository index: one entry per task, at its current version. Blocking (SQLite)."""
    out = []
    for t in core.store.list_tasks():
        p = core.runtime.get(t.name)
        if p is not None:
            out.append({"name": t.name, "version": str(p.version), "state": "READY", "reason": ""})
        elif not ready_only:
            registering = t.current_version is None
            out.append({"name": t.name, "version": "" if registering else str(t.current_version),
                        "state": "LOADING" if registering else "UNAVAILABLE",
                        "reason": "the task is being registered" if registering else "not loaded in this process yet"})
    return out


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def metric_task(core: Core, task: str) -> str:
    # only served names become label values (client strings would make the label set unbounded)
    if not task:
        return "-"
    return task if core.runtime.get(task) is not None else "unknown"


def observe(core: Core, task: str, protocol: str, code: str, t0: float, timing: dict[str, float] | None = None) -> None:
    """A request's count and latency, and (when it reached ONNX Runtime) its queue/compute/overhead split."""
    metrics.observe_request(metric_task(core, task), protocol, code, time.perf_counter() - t0, timing)


# ---- gRPC ---------------------------------------------------------------------------------------


def param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def param_dict(params: Any) -> dict[str, Any]:
    return {k: param_value(v) for k, v in params.items()}


def grpc_images(request: pb.ModelInferRequest) -> list[ImageInput]:
    if len(request.inputs) != 1:
        raise InvalidArgument(f"model {request.model_name!r} takes one input, {INPUT!r}; the request has "
                              f"{len(request.inputs)}")
    inp = request.inputs[0]
    check_tensor_parameters(param_dict(inp.parameters), f"input {inp.name!r}")
    typed = inp.contents.ByteSize() > 0
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if typed:
            raise InvalidArgument(f"input {inp.name!r} has both raw_input_contents and typed contents; send one")
        return images_from_tensor(request.model_name, inp.name, inp.datatype, inp.shape,
                                  raw=memoryview(request.raw_input_contents[0]))
    values: Any = None
    if typed:
        field_name = {"UINT8": "uint_contents", "BYTES": "bytes_contents"}.get(inp.datatype)
        if field_name is not None:  # (another datatype is refused below, by images_from_tensor)
            if [f.name for f, _ in inp.contents.ListFields()] != [field_name]:
                raise InvalidArgument(f"input {inp.name!r}: {inp.datatype} typed contents go in "
                                      f"contents.{field_name} (and nowhere else)")
            values = (np.asarray(inp.contents.uint_contents, dtype=np.int64) if inp.datatype == "UINT8"
                      else list(inp.contents.bytes_contents))
    return images_from_tensor(request.model_name, inp.name, inp.datatype, inp.shape, values=values)


_rpc = guarded("inference.", "model")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on the core (the same one munet.v1.Munet serves)."""

    def __init__(self, core: Core):
        self.core = core

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        # this server starts gRPC only after restoring every task: started is ready
        return pb.ServerReadyResponse(ready=True)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        ready = await asyncio.to_thread(model_ready, self.core, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        m = await asyncio.to_thread(model_metadata, self.core, request.name, request.version)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"],
                                        inputs=[T(**t) for t in m["inputs"]], outputs=[T(**t) for t in m["outputs"]])

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        code = "INTERNAL"
        timing: dict[str, float] = {}
        try:
            self.core.served(request.model_name)  # an unknown model is NOT_FOUND whatever its inputs
            timeout = check_request_parameters(param_dict(request.parameters))
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = remaining if timeout is None else min(timeout, remaining)
            outputs = [requested_output(o.name, param_dict(o.parameters)) for o in request.outputs]
            images = grpc_images(request)
            path, tensors = await infer(self.core, request.model_name, request.model_version, images, outputs,
                                        timeout, timing)
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version=str(path.version),
                                         id=request.id)
            for t in tensors:
                resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
                resp.raw_output_contents.append(t.raw())
            code = "OK"
            return resp
        except MunetError as e:
            code = e.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            observe(self.core, request.model_name, "oip-grpc", code, t0, timing)


    @_rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        models = await asyncio.to_thread(repository_index, self.core, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])


def add_to_server(core: Core, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)


__all__ = [
    "INPUT", "OUTPUT", "PLATFORM", "SERVICE_NAME", "InferenceServicer", "OutputTensor", "RequestedOutput",
    "add_to_server", "check_request_parameters", "classification_strings", "deserialize_bytes",
    "images_from_tensor", "infer", "make_outputs", "model_metadata", "model_ready", "parse_version",
    "repository_index", "requested_output", "resolve", "serialize_bytes", "server_metadata",
]
