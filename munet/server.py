"""The process we ship: a BentoML service that owns the core, serves HTTP on :3000 and, from its
startup hook, the gRPC server and the evolution scheduler on the same core objects. It composes
transport, core and evolution, so it lives outside `service/` (transport, batching, ONNX Runtime).

BentoML 1.4 serves no gRPC for new-style services (bentoml/BentoML#4634), so gRPC is our own
`grpc.aio` server on uvicorn's event loop. With several HTTP workers, only worker 1 runs gRPC and
the scheduler; the others serve HTTP and follow the store's current versions.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException

from munet import metrics
from munet.app import App, setup_logging
from munet.config import Config
from munet.errors import InvalidArgument, MunetError
from munet.lifecycle import die_with_parent
from munet.service.auth import HTTPAuthMiddleware, Tokens, send_error
from munet.service.core import UNSPECIFIED, Examples, ImageInput, TaskSpec
from munet.service.oip_http import create_app as create_oip_app

log = logging.getLogger("munet.http")
CONFIG = Config.from_env()


def _http_error(e: MunetError) -> BentoMLException:
    return BentoMLException(f"{e.code}: {e.message}", error_code=HTTPStatus(e.http_status))


def _images(images: list[str] | None, arrays: list[Any] | None) -> list[ImageInput]:
    out = []
    for i, s in enumerate(images or []):
        try:
            out.append(ImageInput(encoded=base64.b64decode(s, validate=True)))
        except (ValueError, TypeError):
            raise InvalidArgument(f"images[{i}] is not valid base64") from None
    for i, a in enumerate(arrays or []):
        try:
            arr = np.asarray(a)
        except ValueError:
            raise InvalidArgument(f"arrays[{i}] is not a rectangular array") from None
        if arr.ndim not in (2, 3) or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
            raise InvalidArgument(f"arrays[{i}] must be an (H, W) or (H, W, C) array of numbers")
        if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
            # the Python client's rule: rank 3 is one image, never a batch of grayscale ones
            raise InvalidArgument(f"arrays[{i}] has shape {list(arr.shape)}: an (H, W, C) image has C = 1, 3 or 4 "
                                  "channels; send a batch as one (H, W) or (H, W, C) array per image")
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"arrays[{i}] holds NaN or infinity")
        if arr.min() < 0 or arr.max() > 255:
            raise InvalidArgument(f"arrays[{i}] has values outside 0..255")
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
            # 0.5 would silently become 0: pixels are 0..255 integers (scale [0, 1] floats first)
            raise InvalidArgument(f"arrays[{i}] holds fractional values; pixels are integers in 0..255")
        arr = arr.astype(np.uint8)
        c = 1 if arr.ndim == 2 else arr.shape[2]
        out.append(ImageInput(raw=arr.tobytes(), height=arr.shape[0], width=arr.shape[1], channels=c))
    return out


@bentoml.service(name="munet", workers=CONFIG.http_workers, traffic={"timeout": 900})
class MunetService:
    def __init__(self) -> None:
        setup_logging()
        die_with_parent()
        self.app = App.build(Config.from_env())
        self.core = self.app.core
        idx = bentoml.server_context.worker_index
        self.primary = idx is None or idx == 1
        self._follow: asyncio.Task | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        if self.primary:
            await asyncio.to_thread(self.app.start)
            await self.app.start_grpc()
            self.app.start_scheduler()
        else:
            # a follower never cleans up: what looks unfinished may be another worker's registration
            await asyncio.to_thread(self.core.restore, False)
        # every worker, gRPC's included, follows what the others register, delete and promote
        self._follow = asyncio.get_running_loop().create_task(self._follow_store())

    async def _follow_store(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await asyncio.to_thread(self.core.sync_from_store)
            except Exception:
                log.exception("following the store failed")

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
        await self.app.stop()

    async def _call(self, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except MunetError as e:
            raise _http_error(e) from None

    @bentoml.api
    async def predict(self, task: str, images: list[str] | None = None, arrays: list[Any] | None = None,
                      top_k: int = 1, version: int = 0) -> dict:
        """Classify images: `images` are base64 PNG/JPEG files, `arrays` are (H, W[, C]) uint8 pixel lists;
        `version`: a kept path version to answer with (0 = current)."""
        t0 = time.perf_counter()
        code = "OK"
        timing: dict[str, float] = {}
        try:
            path, preds = await self._call(lambda: self.core.predict(task, _images(images, arrays), top_k,
                                                                         version=version, timing=timing))
        except BentoMLException as e:
            code = e.message.split(":", 1)[0]
            raise
        finally:
            total = time.perf_counter() - t0
            label = task if self.core.runtime.get(task) is not None else "unknown"
            metrics.REQUESTS.labels(label, "http", code).inc()
            metrics.LATENCY.labels(label, "http").observe(total)
            metrics.observe_split("http", total, timing)
        return {"task": task, "path_version": path.version,
                "predictions": [[{"label": lbl, "index": i, "probability": p} for lbl, i, p in pr.top]
                                for pr in preds]}

    @bentoml.api
    async def register(self, name: str, builtin: str | None = None, npz_file: str | None = None,
                       labels: list[str] | None = None, max_examples: int = 0, seed: int = 0,
                       validation_fraction: float = 0.1, test_fraction: float = 0.1, root: str = "",
                       policy: str = "auto", evolution: dict | None = None) -> dict:
        """Create a task from a built-in data set or an .npz file in the server's import directory.
        `policy`: auto, approve or frozen; `evolution`: candidates_per_generation, candidate_budget_s,
        scale_base (the server's when absent)."""
        spec = TaskSpec(name=name, labels=labels or [], builtin=builtin, npz_file=npz_file,
                        max_examples=max_examples, seed=seed, validation_fraction=validation_fraction,
                        test_fraction=test_fraction, root=root, policy=policy, evolution=evolution or {})
        return await self._call(asyncio.to_thread, self._register, spec, None)

    @bentoml.api
    async def register_upload(self, name: str, file: Path, labels: list[str] | None = None,
                              max_examples: int = 0, seed: int = 0, validation_fraction: float = 0.1,
                              test_fraction: float = 0.1, root: str = "", policy: str = "auto") -> dict:
        """Create a task from an uploaded .npz (multipart `file`: x, y[, label_names, split])."""
        spec = TaskSpec(name=name, labels=labels or [], max_examples=max_examples, seed=seed,
                        validation_fraction=validation_fraction, test_fraction=test_fraction, root=root,
                        policy=policy)
        return await self._call(asyncio.to_thread, self._register, spec, Path(file))

    def _register(self, spec: TaskSpec, file: Path | None) -> dict:
        uploaded = []
        if file is not None:
            ex, names = self.core.read_npz(file.read_bytes(), "uploaded file", self.core.new_task_size(spec),
                                           self.core.config.max_npz_bytes)
            uploaded.append(ex)
            spec.labels = spec.labels or names
        self.core.register_task(spec, uploaded)
        return self.core.task_view(spec.name)

    @bentoml.api
    async def add_examples(self, task: str, file: Path) -> dict:
        """Add labelled examples from an uploaded .npz (x, y, optional split) to a live task."""
        def work() -> dict:
            ex, _ = self.core.read_npz(Path(file).read_bytes(), "uploaded file",
                                       self.core.store.get_task(task).image_size, self.core.config.max_npz_bytes)
            split = np.where(ex.split == UNSPECIFIED, UNSPECIFIED, ex.split).astype(np.int8)
            counts = self.core.add_examples(task, Examples(ex.x, ex.y, split))
            total = self.core.store.example_counts(task)
            return {"task": task, "added": len(ex.y), **counts, "total_examples": sum(total.values())}

        return await self._call(asyncio.to_thread, work)

    @bentoml.api
    async def tasks(self) -> list[dict]:
        return await self._call(asyncio.to_thread, self.core.list_task_views)

    @bentoml.api
    async def task(self, name: str) -> dict:
        return await self._call(asyncio.to_thread, self.core.task_view, name)

    @bentoml.api
    async def delete(self, name: str) -> dict:
        await self._call(asyncio.to_thread, self.core.delete_task, name)
        return {"name": name}

    @bentoml.api
    async def versions(self, task: str) -> dict:
        current, versions = await self._call(asyncio.to_thread, self.core.list_versions, task)
        return {"task": task, "current_version": current, "versions": versions}

    @bentoml.api
    async def rollback(self, task: str, version: int = 0, policy: str = "") -> dict:
        """Serve an earlier version; the task is frozen unless `policy` is auto or approve."""
        return await self._call(asyncio.to_thread, self.core.rollback, task, version, policy)

    @bentoml.api
    async def set_policy(self, task: str, policy: str = "", evolution: dict | None = None) -> dict:
        """A task's promotion policy (auto, approve, frozen; "" unchanged) and evolution settings
        (candidates_per_generation, candidate_budget_s, scale_base; 0 = the server's)."""
        return await self._call(asyncio.to_thread, self.core.set_policy, task, policy, evolution)

    @bentoml.api
    async def promote(self, task: str, version: int) -> dict:
        """Serve `version` (the pending one under policy approve)."""
        return await self._call(asyncio.to_thread, self.core.promote, task, version)

    @bentoml.api
    async def reject(self, task: str, version: int, reason: str = "") -> dict:
        return await self._call(asyncio.to_thread, self.core.reject, task, version, reason)

    @bentoml.api
    async def evolve(self, task: str = "", candidates: int = 0, budget_seconds: float = 0.0,
                     wait: bool = False) -> dict:
        if self.app.evolution is None or not self.primary:
            raise BentoMLException("FAILED_PRECONDITION: evolution runs on worker 1 only and must be enabled",
                                   error_code=HTTPStatus.PRECONDITION_FAILED)
        return await self._call(self.app.evolution.trigger, task or None, candidates, budget_seconds, wait)

    @bentoml.api
    async def events(self, task: str = "", after_id: int = 0, limit: int = 1000) -> list[dict]:
        """Stored task events after `after_id`, oldest first (gRPC WatchTask streams them)."""
        return await self._call(asyncio.to_thread, self.core.store.events, after_id, task, max(1, min(limit, 10000)))

    @bentoml.api
    async def evolution_status(self) -> dict:
        if self.app.evolution is None:
            return {"running": False, "scheduler_enabled": False}
        return await self._call(self.app.evolution.status)


class RetryAfterMiddleware:
    """429 answers say when to come back (RFC 9110 Retry-After): the queue drains within a second."""

    def __init__(self, app, seconds: int = 1):
        self.app = app
        self.header = (b"retry-after", str(seconds).encode())

    async def __call__(self, scope, receive, send):
        async def send_with_retry_after(message):
            if message.get("type") == "http.response.start" and message.get("status") == 429:
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_retry_after if scope.get("type") == "http" else send)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: by its Content-Length before reading, or as it streams in."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, 413, "INVALID_ARGUMENT", f"the request body has {int(declared)} bytes; the "
                                 f"limit (max_http_body_bytes) is {self.limit}", path=scope.get("path", ""))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise InvalidArgument(f"the request body passed the limit (max_http_body_bytes) of {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


class ClientErrorsAsOneLine(logging.Filter):
    """BentoML logs every exception raised by an API, 4xx included, as an ERROR with a traceback; a
    client's mistake is one INFO line (the access log has its status too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(exc, "error_code", None), "value", 500)
        if isinstance(exc, BentoMLException) and status < 500:
            record.msg, record.args = f"client error ({status}) on %s [%s]: %s", (*record.args[:2], exc)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsAsOneLine())
# the Open Inference Protocol's /v2 routes, on the worker's own core. Mounted at "/" (its routes start
# with /v2; BentoML's mount only takes requests one of them matches): a mount at "/v2" would not
# match GET /v2 itself (server metadata), which Starlette would redirect to /v2/ instead.
MunetService.mount_asgi_app(create_oip_app(lambda: bentoml.get_current_service().core,
                                           max_body=CONFIG.max_http_body_bytes), path="/", name="oip")
MunetService.add_asgi_middleware(RetryAfterMiddleware)
MunetService.add_asgi_middleware(BodyLimitMiddleware, limit=CONFIG.max_http_body_bytes)
_TOKENS = Tokens.from_config(CONFIG)
if _TOKENS.admin or _TOKENS.predict:
    # in front of every route, before a body is read: refused uploads cost nothing
    MunetService.add_asgi_middleware(HTTPAuthMiddleware, tokens=_TOKENS)
