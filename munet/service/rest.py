"""The HTTP API: a FastAPI app mounted on the BentoML service (BentoML serves its docs at `/` and merges
this app's schema into `/docs.json`). Reads are GET, writes POST / PATCH / DELETE; each route is a row
of the table of operations (`semantics.py`), the twin of a munet.v1 gRPC call with the same defaults,
answers and errors. Like the gRPC servicer, handlers only translate: every rule lives in the core.

Errors are `{"code": ..., "message": ...}` (the code a gRPC status name) with the matching HTTP status,
FastAPI's own (an unreadable body, a wrong type, a wrong method) included.

Predict and RegisterTask take JSON or multipart/form-data (files and fields), chosen by Content-Type;
Predict's JSON carries image files (base64), pixel lists or one raw tensor with its dtype.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import math
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args, get_origin

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse

from munet import metrics
from munet.errors import Cancelled, FailedPrecondition, InvalidArgument, MunetError
from munet.service.auth import error_body
from munet.service.core import Core, ImageInput, TaskSpec
from munet.service.grpc_server import Evolution
from munet.service.rest_models import (
    Deleted,
    Error,
    EvolutionStatus,
    EvolveRequest,
    ExamplesAdded,
    ExamplesUpload,
    PolicyRequest,
    PredictRequest,
    PredictResponse,
    PredictUpload,
    PromoteRequest,
    RegisterRequest,
    RegisterUpload,
    RejectRequest,
    RollbackRequest,
    Task,
    TaskEvent,
    Tensor,
    Versions,
)
from munet.service.semantics import OPERATIONS, default, require_version, rule

M = TypeVar("M", bound=BaseModel)
JSON, MULTIPART = "application/json", "multipart/form-data"

# ---- errors -------------------------------------------------------------------------------------

# HTTP status -> the gRPC status name an error body carries; the core's errors bring their own code
_CODES = {cls.http_status: cls.code for cls in MunetError.__subclasses__()} | {
    405: "UNIMPLEMENTED",  # a route's wrong method: gRPC's name for a method the server does not have
    413: "INVALID_ARGUMENT",  # a body over max_http_body_bytes (auth.send_error's 413 says the same)
}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _code(status: int) -> str:
    return _CODES.get(status) or ("INVALID_ARGUMENT" if status < 500 else "INTERNAL")


def explain(errors: list[Any]) -> str:
    """pydantic's errors as one line that names each field: "top_k: Input should be a valid integer"."""
    parts = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":  # FastAPI's loc is ("body", <offset>): no field to name
            parts.append(f"the body is not valid JSON: {(e.get('ctx') or {}).get('error', e['msg'])}")
            continue
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.get("loc", ())
                      if p not in ("body", "query", "path")).lstrip(".")
        parts.append(f"{loc or 'the body'}: {e['msg']}")
    return "; ".join(parts) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")


async def _munet_error(request: Request, e: MunetError) -> JSONResponse:
    return _error(e.http_status, e.code, e.message)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error(400, "INVALID_ARGUMENT", explain(list(e.errors())))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    if isinstance(e.__cause__, MunetError):
        # FastAPI turns whatever interrupted reading the body into "error parsing the body" (400): the
        # cause (over the body limit: 413) says what really happened
        return await _munet_error(request, e.__cause__)
    message = str(e.detail)
    if e.status_code == 405:
        message = f"{request.method} {request.url.path} is not allowed; use {(e.headers or {}).get('Allow', '')}"
    return _error(e.status_code, _code(e.status_code), message, e.headers)


_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": Error, "description": Error.__doc__}}

# ---- request bodies -----------------------------------------------------------------------------


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as e:
        raise InvalidArgument(explain(e.errors(include_url=False))) from None


def _is(annotation: Any, kind: type) -> bool:
    """Whether a field's type is `kind`, a list of it, or optional."""
    return any(a is kind or (isinstance(a, type) and issubclass(a, kind))
               for a in (annotation, *get_args(annotation)))


async def read_body(request: Request, json_model: type[BaseModel] | None, form_model: type[BaseModel] | None,
                    synonyms: dict[str, str] | None = None) -> BaseModel:
    """The request body as `json_model` (application/json) or `form_model` (multipart/form-data: a field
    typed bytes takes uploaded files, a list field repeated parts, a nested model a JSON object)."""
    media = _media(request)
    accepted = [m for m, model in ((JSON, json_model), (MULTIPART, form_model)) if model is not None]
    try:
        if media == JSON and json_model is not None:
            return _validate(json_model, await request.body())
        if media == MULTIPART and form_model is not None:
            try:
                form = await request.form()
            except HTTPException as e:  # Starlette's multipart parser: a malformed body
                raise InvalidArgument(f"the multipart body is not readable: {e.detail}") from None
            try:
                return _validate(form_model, await _form_fields(form_model, form.multi_items(), synonyms or {}))
            finally:
                await form.close()
    except ClientDisconnect:
        raise Cancelled("the client went away while sending the request") from None
    raise InvalidArgument(f"the body's Content-Type is {media or 'missing'}; this route takes "
                          f"{' or '.join(accepted)}")


async def _form_fields(model: type[BaseModel], items: list[tuple[str, Any]], synonyms: dict[str, str]) -> dict:
    values: dict[str, list[Any]] = {}
    for key, value in items:
        key = synonyms.get(key, key)
        field = model.model_fields.get(key)
        wants_file = field is not None and _is(field.annotation, bytes)
        if isinstance(value, UploadFile) != wants_file and field is not None:
            raise InvalidArgument(f"{key} must be {'an uploaded file' if wants_file else 'a text field, not a file'}")
        values.setdefault(key, []).append(await value.read() if isinstance(value, UploadFile) else value)
    data: dict[str, Any] = {}
    for key, vs in values.items():
        field = model.model_fields.get(key)
        if field is not None and get_origin(field.annotation) is list:
            data[key] = vs
        elif len(vs) > 1:
            raise InvalidArgument(f"{key} is given {len(vs)} times; it takes one value")
        elif field is not None and _is(field.annotation, BaseModel):
            try:
                data[key] = json.loads(vs[0])
            except ValueError:
                raise InvalidArgument(f"{key} must be a JSON object") from None
        else:
            data[key] = vs[0]  # pydantic reads "3" as 3 for an int field; an unknown key is refused there
    return data


def _schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its nested models written in place: a request body documented
    through openapi_extra is not among the components FastAPI collects from the routes."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _bodies(**models: type[BaseModel]) -> dict:
    """openapi_extra documenting a body read by `read_body`: one schema per media type."""
    media = {"json": JSON, "multipart": MULTIPART}
    return {"requestBody": {"required": True, "content": {media[k]: {"schema": _schema(m)} for k, m in models.items()}}}


# ---- images -------------------------------------------------------------------------------------


def pixels(arr: np.ndarray, what: str, batch: str = "one (H, W) or (H, W, C) array per image") -> ImageInput:
    """One (H, W) or (H, W, C) array of 0..255 pixel values -> raw uint8 pixels; anything else is refused
    with a message naming `what` (never rounded, clipped or wrapped into range). `batch`: how the input
    it came from carries several images."""
    if arr.ndim not in (2, 3) or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise InvalidArgument(f"{what} must be an (H, W) or (H, W, C) array of numbers")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        # the Python client's rule: rank 3 is one image, never a batch of grayscale ones
        raise InvalidArgument(f"{what} has shape {list(arr.shape)}: an (H, W, C) image has C = 1, 3 or 4 "
                              f"channels; send a batch as {batch}")
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{what} holds NaN or infinity")
    if arr.min() < 0 or arr.max() > 255:
        raise InvalidArgument(f"{what} has values outside 0..255")
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        # 0.5 would silently become 0: pixels are 0..255 integers (scale [0, 1] floats first)
        raise InvalidArgument(f"{what} holds fractional values; pixels are integers in 0..255")
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    c = 1 if arr.ndim == 2 else arr.shape[2]
    return ImageInput(raw=arr.tobytes(), height=arr.shape[0], width=arr.shape[1], channels=c)


def tensor_images(t: Tensor) -> list[ImageInput]:
    """A raw tensor -> its images: rank 2 one grey image, rank 3 one (H, W, C) image, rank 4 a batch."""
    if len(t.shape) not in (2, 3, 4) or any(d < 1 for d in t.shape):
        raise InvalidArgument(f"tensor.shape {t.shape}: give (H, W), (H, W, C) or a batch (N, H, W, C), each "
                              "dimension at least 1")
    try:
        data = base64.b64decode(t.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("tensor.data is not valid base64") from None
    dtype = np.dtype(t.dtype).newbyteorder("<")
    need = math.prod(t.shape) * dtype.itemsize
    if len(data) != need:
        raise InvalidArgument(f"tensor.data has {len(data)} bytes; shape {t.shape} of {t.dtype} needs {need}")
    arr = np.frombuffer(data, dtype).reshape(t.shape)
    if arr.ndim == 4:
        if arr.shape[3] not in (1, 3, 4):
            raise InvalidArgument(f"tensor.shape {t.shape}: a batch is (N, H, W, C) with C = 1, 3 or 4")
        return [pixels(a, f"tensor[{i}]") for i, a in enumerate(arr)]
    return [pixels(arr, "tensor", batch="a rank-4 tensor (N, H, W, C), grey images with C = 1")]


def image_inputs(images: list[str] | None = None, arrays: list[Any] | None = None,
                 tensor: Tensor | None = None) -> list[ImageInput]:
    """Predict's JSON images, in order: the base64 files, the pixel lists, then the tensor's images."""
    out = []
    for i, s in enumerate(images or []):
        try:
            out.append(ImageInput(encoded=base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError, TypeError):
            raise InvalidArgument(f"images[{i}] is not valid base64") from None
    for i, a in enumerate(arrays or []):
        try:
            arr = np.asarray(a)
        except (ValueError, TypeError, OverflowError):
            raise InvalidArgument(f"arrays[{i}] is not a rectangular array") from None
        out.append(pixels(arr, f"arrays[{i}]"))
    if tensor is not None:
        out.extend(tensor_images(tensor))
    return out


# ---- routes -------------------------------------------------------------------------------------

router = APIRouter()


def route(rpc: str, **kwargs: Any) -> Callable:
    """The route of `rpc`'s row of the table: its method, path and summary."""
    op = OPERATIONS[rpc]
    return router.api_route(op.path, methods=[op.method], name=rpc, operation_id=rpc, summary=op.summary,
                            responses=_ERRORS, **kwargs)


def _core(request: Request) -> Core:
    # resolved per request: under BentoML the service, and so its core, exists once the worker started
    return request.app.state.core()


def _evolution(request: Request) -> Evolution:
    evolution = request.app.state.evolution()
    if evolution is None:
        raise FailedPrecondition("evolution is disabled on this server")
    return evolution


CoreDep = Annotated[Core, Depends(_core)]
EvolutionDep = Annotated[Evolution, Depends(_evolution)]


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@route("Predict", openapi_extra=_bodies(json=PredictRequest, multipart=PredictUpload))
async def predict(request: Request, core: CoreDep) -> PredictResponse:
    t0 = time.perf_counter()
    task, code = "", "INTERNAL"
    timing: dict[str, float] = {}
    try:
        req = await read_body(request, PredictRequest, PredictUpload, synonyms={"file": "files"})
        task = req.task
        if isinstance(req, PredictUpload):
            inputs = [ImageInput(encoded=f) for f in req.files]
        else:
            assert isinstance(req, PredictRequest)
            inputs = image_inputs(req.images, req.arrays, req.tensor)
        path, preds = await core.predict(req.task, inputs, req.top_k, version=req.version, timing=timing)
        code = "OK"
    except MunetError as e:
        code = e.code
        raise
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    finally:
        # the same series as gRPC's Predict ("http" for "grpc"); only served names become label values
        total = time.perf_counter() - t0
        label = task if task and core.runtime.get(task) is not None else "unknown"
        metrics.observe_request(label, "http", code, total, timing)
    return {"task": req.task, "path_version": path.version,  # type: ignore[return-value]
            "predictions": [[{"label": lbl, "index": i, "probability": p} for lbl, i, p in pr.top] for pr in preds]}


@route("RegisterTask", status_code=201, openapi_extra=_bodies(json=RegisterRequest, multipart=RegisterUpload))
async def register_task(request: Request, core: CoreDep) -> Task:
    req = await read_body(request, RegisterRequest, RegisterUpload)
    assert isinstance(req, RegisterRequest)
    spec = TaskSpec(name=req.name, labels=list(req.labels), builtin=req.builtin, npz_file=req.npz_file,
                    max_examples=req.max_examples, seed=req.seed, validation_fraction=req.validation_fraction,
                    test_fraction=req.test_fraction, root=req.root, policy=req.policy or "auto",
                    evolution=req.evolution.store_settings() if req.evolution is not None else {})

    def work() -> dict:
        uploaded = []
        if isinstance(req, RegisterUpload):
            ex, names = core.read_npz(req.file, "uploaded file", core.new_task_size(spec), core.config.max_npz_bytes)
            uploaded.append(ex)
            spec.labels = spec.labels or names
        core.register_task(spec, uploaded)
        return core.task_view(spec.name)

    return await asyncio.to_thread(work)  # type: ignore[return-value]


@route("AddExamples", openapi_extra=_bodies(multipart=ExamplesUpload))
async def add_examples(name: str, request: Request, core: CoreDep) -> ExamplesAdded:
    req = await read_body(request, None, ExamplesUpload)
    assert isinstance(req, ExamplesUpload)

    def work() -> dict:
        ex, _ = core.read_npz(req.file, "uploaded file", core.store.get_task(name).image_size,
                              core.config.max_npz_bytes)
        counts = core.add_examples(name, ex)
        total = core.store.example_counts(name)
        return {"task": name, "added": len(ex.y), "train": counts.get("train", 0),
                "validation": counts.get("validation", 0), "test": counts.get("test", 0),
                "total_examples": sum(total.values())}

    return await asyncio.to_thread(work)  # type: ignore[return-value]


@route("ListTasks")
async def list_tasks(core: CoreDep) -> list[Task]:
    return await asyncio.to_thread(core.list_task_views)  # type: ignore[return-value]


@route("GetTask")
async def get_task(name: str, core: CoreDep) -> Task:
    return await asyncio.to_thread(core.task_view, name)  # type: ignore[return-value]


@route("DeleteTask")
async def delete_task(name: str, core: CoreDep) -> Deleted:
    await asyncio.to_thread(core.delete_task, name)
    return Deleted(name=name)


@route("ListVersions")
async def list_versions(name: str, core: CoreDep) -> Versions:
    current, versions = await asyncio.to_thread(core.list_versions, name)
    return {"task": name, "current_version": current, "versions": versions}  # type: ignore[return-value]


@route("Rollback")
async def rollback(name: str, core: CoreDep, body: RollbackRequest = RollbackRequest()) -> Task:
    # rollback exports and parity-checks the old version: seconds, so off the event loop
    return await asyncio.to_thread(core.rollback, name, body.version, body.policy)  # type: ignore[return-value]


@route("SetTaskPolicy")
async def set_task_policy(name: str, core: CoreDep, body: PolicyRequest = PolicyRequest()) -> Task:
    settings = body.evolution.store_settings() if body.evolution is not None else None
    return await asyncio.to_thread(core.set_policy, name, body.policy, settings)  # type: ignore[return-value]


@route("Promote")
async def promote(name: str, body: PromoteRequest, core: CoreDep) -> Task:
    require_version("Promote", body.version)
    return await asyncio.to_thread(core.promote, name, body.version)  # type: ignore[return-value]


@route("Reject")
async def reject(name: str, body: RejectRequest, core: CoreDep) -> Task:
    require_version("Reject", body.version)
    return await asyncio.to_thread(core.reject, name, body.version, body.reason)  # type: ignore[return-value]


@route("TriggerEvolution")
async def trigger_evolution(evolution: EvolutionDep, core: CoreDep,
                            body: EvolveRequest = EvolveRequest()) -> EvolutionStatus:
    result = await _maybe_await(evolution.trigger(body.task or None, body.candidates, body.budget_seconds, body.wait))
    if body.wait:
        # the generation published to the store; answer once this server serves what it published
        await asyncio.to_thread(core.sync_from_store)
    return result


@route("GetEvolutionStatus")
async def evolution_status(evolution: EvolutionDep) -> EvolutionStatus:
    return await _maybe_await(evolution.status())


@route("WatchTask")
async def events(core: CoreDep,
                 task: Annotated[str, Query(description=rule("WatchTask", "task"))] = default("WatchTask", "task"),
                 after_id: Annotated[int, Query(ge=0, description=rule("WatchTask", "after_id"))]
                 = default("WatchTask", "after_id"),
                 limit: Annotated[int, Query(ge=1, le=10000, description=rule("WatchTask", "limit"))]
                 = default("WatchTask", "limit")) -> list[TaskEvent]:
    def work() -> list[dict]:
        if task:
            core.store.get_task(task)  # NOT_FOUND for a task that does not exist, as WatchTask
        return core.store.events(after_id, task, limit)

    return await asyncio.to_thread(work)  # type: ignore[return-value]


def create_app(get_core: Callable[[], Core], get_evolution: Callable[[], Evolution | None]) -> FastAPI:
    """The HTTP API on the core (and evolution) the getters return when a request comes."""
    # BentoML serves the docs UI at / and, at /docs.json, its schema with this app's paths merged in
    # (the service's name and version are its own: this app's title and version are not shown)
    app = FastAPI(title="munet", summary="munet-serve's HTTP API (the twin of munet.v1)",
                  docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={MunetError: _munet_error, RequestValidationError: _validation_error,
                                      HTTPException: _http_error})
    app.state.core = get_core
    app.state.evolution = get_evolution
    app.include_router(router)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> RedirectResponse:
        return RedirectResponse("/")

    return app


__all__ = ["create_app", "explain", "image_inputs", "pixels", "read_body", "tensor_images"]
