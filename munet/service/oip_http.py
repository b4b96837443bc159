"""The Open Inference Protocol's HTTP/REST routes (KServe v2), a small Starlette app mounted on the
BentoML service (see `munet.service.oip` for what a model, its input and its output are here):

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          liveness, readiness
    GET  /v2/models/{task}[/versions/{v}]           model metadata
    GET  /v2/models/{task}[/versions/{v}]/ready     200 when ready, 4xx when not
    POST /v2/models/{task}[/versions/{v}]/infer     inference
    POST /v2/repository/index                       the models (Triton's extension): every task

Inference requests are JSON (`data` flat or nested; BYTES elements as base64 strings), or JSON
followed by binary tensor data (the binary-data extension: header `Inference-Header-Content-Length`,
each such input with the parameter `binary_data_size`), as tritonclient.http sends by default.
Outputs are JSON unless the request asks for binary (`binary_data` on an output, or
`binary_data_output` on the request). Errors are `{"error": "<message>"}` with the status of the
core's error (404 unknown model or version, 400 invalid input, 429 overloaded, ...).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from munet.errors import InvalidArgument, MunetError
from munet.service import oip
from munet.service.core import Core, ImageInput

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
MAX_DECOMPRESSED = 256 << 20  # a compressed body may not inflate past this (max_http_body_bytes by default)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _munet_error(e: MunetError) -> JSONResponse:
    return error(e.http_status, e.message)


# ---- request parsing ----------------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None, limit: int = MAX_DECOMPRESSED) -> bytes:
    """The body as sent with Content-Encoding gzip or deflate (tritonclient's request compression)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidArgument(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"the {encoding} request body could not be decompressed: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise InvalidArgument(f"the request body inflates past {limit} bytes")
    if not d.eof:
        raise InvalidArgument(f"the {encoding} request body is truncated")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON inference header and the binary data after it."""
    if header_length is None:
        json_part, tail = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise InvalidArgument(f"Inference-Header-Content-Length is {n}; the body has {len(body)} bytes")
        json_part, tail = body[:n], memoryview(body)[n:]
    try:
        header = json.loads(json_part)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise InvalidArgument(f"the inference request is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise InvalidArgument("the inference request must be a JSON object")
    return header, tail


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _b64(item: Any, i: int) -> bytes:
    if not isinstance(item, str):
        raise InvalidArgument(f"input {oip.INPUT!r}: BYTES element {i} must be a base64 string in JSON")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"input {oip.INPUT!r}: BYTES element {i} is not base64; in JSON, encoded images are "
                              "base64 strings (or send them as binary data)") from None


def _flatten(data: Any) -> list:
    out: list = []
    stack = [data]
    while stack:  # iterative: a deeply nested body must not exhaust the recursion limit
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def http_images(task: str, header: dict, tail: memoryview) -> list[ImageInput]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        n = len(inputs) if isinstance(inputs, list) else 0
        raise InvalidArgument(f"model {task!r} takes one input, {oip.INPUT!r}: `inputs` must be a list of one tensor "
                              f"object (got {n})")
    t = inputs[0]
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise InvalidArgument("an input tensor needs `name` (string), `datatype` (string) and `shape` (list)")
    params = _dict(t.get("parameters"), f"input {name!r}: parameters")
    oip.check_tensor_parameters(params, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        size = oip.as_int(size, f"input {name!r}: parameter 'binary_data_size'")
        if "data" in t:
            raise InvalidArgument(f"input {name!r} has both `data` and binary data; send one")
        if not 0 <= size <= len(tail):
            raise InvalidArgument(f"input {name!r}: binary_data_size is {size}; {len(tail)} bytes follow the JSON")
        if size != len(tail):
            raise InvalidArgument(f"{len(tail) - size} bytes of binary data follow the JSON that no input claims")
        return oip.images_from_tensor(task, name, datatype, shape, raw=tail[:size])
    if len(tail):
        raise InvalidArgument(f"{len(tail)} bytes of binary data follow the JSON but no input has binary_data_size")
    if "data" not in t:
        raise InvalidArgument(f"input {name!r} has no `data` (and no binary_data_size)")
    data = t["data"]
    if datatype == "BYTES":
        items = _flatten(data) if isinstance(data, list) else [data]
        return oip.images_from_tensor(task, name, datatype, shape, values=[_b64(x, i) for i, x in enumerate(items)])
    return oip.images_from_tensor(task, name, datatype, shape, values=data)


def http_outputs(header: dict) -> tuple[list[oip.RequestedOutput], bool]:
    """The requested outputs, and whether outputs not asking otherwise are binary."""
    params = _dict(header.get("parameters"), "parameters")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("`outputs` must be a list")
    out = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidArgument("a requested output must be an object with a `name`")
        out.append(oip.requested_output(o["name"], _dict(o.get("parameters"), f"output {o['name']!r}: parameters")))
    return out, default_binary


# ---- response -----------------------------------------------------------------------------------


def infer_response(task: str, version: int, request_id: Any, tensors: list[oip.OutputTensor],
                   default_binary: bool) -> Response:
    outputs, blobs = [], []
    for t in tensors:
        d: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary if t.binary is not None else default_binary:
            raw = t.raw()
            d["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.datatype == "BYTES":
            d["data"] = [b.decode() for b in t.data.ravel()]
        else:
            d["data"] = t.data.ravel().tolist()
        outputs.append(d)
    body: dict[str, Any] = {"model_name": task, "model_version": str(version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = outputs
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


# ---- app ----------------------------------------------------------------------------------------


def create_app(get_core: Callable[[], Core], max_body: int = MAX_DECOMPRESSED) -> Starlette:
    """The /v2 routes on the core `get_core()` returns (resolved per request: under BentoML the service
    instance, and so its core, exists only once the worker has started). A compressed request body
    may inflate to `max_body` bytes."""

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(oip.server_metadata())

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        try:
            return JSONResponse(await asyncio.to_thread(oip.model_metadata, get_core(), p["task"],
                                                        p.get("version", "")))
        except MunetError as e:
            return _munet_error(e)

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        core = get_core()
        try:
            await asyncio.to_thread(oip.resolve, core, p["task"], p.get("version", ""))
        except MunetError as e:
            return _munet_error(e)  # 404 unknown, 400/412 not servable: any 4xx is "not ready"
        return JSONResponse({"name": p["task"], "ready": True})

    async def repository_index(request: Request) -> Response:
        try:
            body = await request.body()
            params = json.loads(body) if body.strip() else {}
            if not isinstance(params, dict) or not isinstance(params.get("ready", False), bool):
                raise InvalidArgument('the repository index request is a JSON object, {"ready": true|false}')
            models = await asyncio.to_thread(oip.repository_index, get_core(), params.get("ready", False))
        except (ValueError, RecursionError) as e:
            return error(400, f"the repository index request is not valid JSON: {str(e)[:200]}")
        except MunetError as e:
            return _munet_error(e)
        return JSONResponse([{k: v for k, v in m.items() if v or k != "reason"} for m in models])

    async def infer(request: Request) -> Response:
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        core = get_core()
        task, version = request.path_params["task"], request.path_params.get("version", "")
        code = "INTERNAL"
        try:
            body = await request.body()  # all of it, even to refuse it: a client mid-upload would see a broken pipe
            core.served(task)  # an unknown model is 404 whatever its body
            body = decompress(body, request.headers.get("content-encoding"), max_body)
            header, tail = split_body(body, request.headers.get(HEADER_LENGTH))
            request_id = header.get("id")
            if request_id is not None and not isinstance(request_id, str):
                raise InvalidArgument("`id` must be a string")
            timeout = oip.check_request_parameters(_dict(header.get("parameters"), "parameters"))
            outputs, default_binary = http_outputs(header)
            images = http_images(task, header, tail)
            path, tensors = await oip.infer(core, task, version, images, outputs, timeout, timing)
            code = "OK"
            return infer_response(task, path.version, request_id, tensors, default_binary)
        except MunetError as e:
            code = e.code
            return _munet_error(e)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            log.exception("OIP infer on %s failed", task)
            return error(500, f"internal error: {type(e).__name__}: {str(e)[:200]}")
        finally:
            oip.observe(core, task, "oip-http", code, t0, timing)

    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{task}", model_metadata, methods=["GET"]),
        Route("/v2/models/{task}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{task}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{task}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{task}/infer", infer, methods=["POST"]),
        Route("/v2/models/{task}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
    ]
    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own refusals (405 for a wrong method, ...) in KServe's error shape too
        status = getattr(exc, "status_code", 500)
        return error(status, str(getattr(exc, "detail", "")) or f"HTTP {status}")

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


__all__ = ["create_app", "decompress", "http_images", "http_outputs", "infer_response", "split_body"]
