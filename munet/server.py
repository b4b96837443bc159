"""The process we ship: a BentoML service that owns the core, serves HTTP on :3000 and, from its
startup hook, the gRPC server and the evolution scheduler on the same core objects. It composes
transport, core and evolution, so it lives outside `service/` (transport, batching, ONNX Runtime).

BentoML 1.4 serves no gRPC for new-style services (bentoml/BentoML#4634), so gRPC is our own
`grpc.aio` server on uvicorn's event loop. With several HTTP workers, only worker 1 runs gRPC and
the scheduler; the others serve HTTP and follow the store's current versions.
"""

from __future__ import annotations

import asyncio
import logging

import bentoml

from munet.app import App
from munet.config import Config
from munet.errors import InvalidArgument
from munet.lifecycle import die_with_parent, setup_logging
from munet.service.auth import HTTPAuthMiddleware, Tokens, send_error
from munet.service.oip_http import create_app as create_oip_app
from munet.service.rest import create_app as create_rest_app

log = logging.getLogger("munet.http")
CONFIG = Config.from_env()


@bentoml.service(name="munet", workers=CONFIG.http_workers, traffic={"timeout": 900})
class MunetService:
    def __init__(self) -> None:
        setup_logging()
        die_with_parent()
        self.app = App.build(Config.from_env())
        self.core = self.app.core
        idx = bentoml.server_context.worker_index
        self.primary = idx is None or idx == 1

    @bentoml.on_startup
    async def start(self) -> None:
        if self.primary:
            # serves, follows the store, and runs for the evolution lease (only its holder evolves)
            await asyncio.to_thread(self.app.start)
            await self.app.start_grpc()
            self.app.start_scheduler()
        else:
            # another HTTP worker of this server: never cleans up (what looks unfinished may be another
            # worker's registration) and never evolves; it serves what the store says
            await asyncio.to_thread(self.core.restore, False)
            self.app.follow()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.app.stop()


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


class BodyTooLarge(InvalidArgument):
    """A body that passed max_http_body_bytes as it streamed in: INVALID_ARGUMENT, with HTTP's 413."""

    http_status = 413


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
                raise BodyTooLarge(f"the request body passed the limit (max_http_body_bytes) of {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


# the Open Inference Protocol's /v2 routes, on the worker's own core. Mounted at "/" (its routes start
# with /v2; BentoML's mount only takes requests one of them matches): a mount at "/v2" would not
# match GET /v2 itself (server metadata), which Starlette would redirect to /v2/ instead.
MunetService.mount_asgi_app(create_oip_app(lambda: bentoml.get_current_service().core,
                                           max_body=CONFIG.max_http_body_bytes), path="/", name="oip")
# the munet API's routes (rest.py), mounted the same way beside it: neither has a route the other matches
MunetService.mount_asgi_app(create_rest_app(lambda: bentoml.get_current_service().core,
                                            lambda: bentoml.get_current_service().app.evolution),
                            path="/", name="api")
MunetService.add_asgi_middleware(RetryAfterMiddleware)
MunetService.add_asgi_middleware(BodyLimitMiddleware, limit=CONFIG.max_http_body_bytes)
_TOKENS = Tokens.from_config(CONFIG)
if _TOKENS.admin or _TOKENS.predict:
    # in front of every route, before a body is read: refused uploads cost nothing
    MunetService.add_asgi_middleware(HTTPAuthMiddleware, tokens=_TOKENS)
