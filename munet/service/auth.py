"""Bearer tokens for the two classes of calls, on gRPC metadata and HTTP headers alike.

- management (RegisterTask, AddExamples, DeleteTask, TriggerEvolution, Rollback, SetTaskPolicy,
  Promote, Reject and their HTTP twins: the writes, POST / PATCH / DELETE) needs the admin token when
  one is configured (`MUNET_ADMIN_TOKEN`, or a file named by `MUNET_ADMIN_TOKEN_FILE`);
- Predict and the read-only calls (HTTP: POST /predict and the GET routes) need the predict token when
  one is configured (`MUNET_PREDICT_TOKEN`); the admin token is accepted there too;
- health, reflection, metrics and the docs stay open (probes and scrapers carry no secrets).

Which call is which comes from the table of operations, `munet.service.semantics.OPERATIONS`.

No credentials: UNAUTHENTICATED / 401. Wrong credentials: PERMISSION_DENIED / 403. Tokens are
compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Literal

import grpc

from munet.config import Config
from munet.errors import PermissionDenied, Unauthenticated
from munet.service.semantics import OPERATIONS, http_access

Need = Literal["admin", "read", "open"]

ADMIN_RPCS = {op.rpc for op in OPERATIONS.values() if op.access == "admin"}


# The Open Inference Protocol (KServe v2): its server health and metadata are open like grpc.health;
# everything about a model (metadata, readiness, inference) is a predict-class call.
OIP_SERVICE = "inference.GRPCInferenceService"
OIP_OPEN_RPCS = {"ServerLive", "ServerReady", "ServerMetadata"}
OIP_OPEN_ROUTES = {"/v2", "/v2/health/live", "/v2/health/ready"}


def grpc_need(method: str) -> Need:
    """`/munet.v1.Munet/Predict` -> read; health and reflection are open."""
    service, _, name = method.lstrip("/").partition("/")
    if service == OIP_SERVICE:
        return "open" if name in OIP_OPEN_RPCS else "read"
    if not service.startswith("munet."):
        return "open"
    return "admin" if name in ADMIN_RPCS else "read"


def is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def http_need(method: str, path: str) -> Need:
    """`POST /tasks` -> admin, `GET /tasks` -> read; docs, metrics and health are open."""
    access = http_access(method.upper(), path)
    if access is not None:
        return access
    path = "/" + path.strip("/")
    if is_oip_path(path):  # anything under /v2 but its health and server metadata
        return "open" if path in OIP_OPEN_ROUTES else "read"
    return "open"


@dataclass(frozen=True)
class Tokens:
    admin: str = ""
    predict: str = ""

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        admin = config.admin_token
        if not admin and config.admin_token_file is not None:
            try:
                admin = config.admin_token_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"cannot read admin_token_file {config.admin_token_file}: {e}") from None
            if not admin:
                raise ValueError(f"admin_token_file {config.admin_token_file} is empty")
        return cls(admin, config.predict_token)

    @property
    def protected(self) -> bool:
        return bool(self.admin)

    def check(self, authorization: str | None, need: Need) -> None:
        """Raise unless `authorization` ("Bearer <token>") may make a call of class `need`."""
        if need == "open":
            return
        if need == "admin":
            if not self.admin:
                return  # management is not protected on this server
            accepted = [self.admin]
        else:
            if not self.predict:
                return
            accepted = [self.predict, *([self.admin] if self.admin else [])]
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"this call needs a bearer token ({'admin' if need == 'admin' else 'predict'} "
                                  "token): send 'authorization: Bearer <token>'")
        token = token.strip().encode()
        ok = False
        for t in accepted:
            ok |= hmac.compare_digest(token, t.encode())  # no early exit: the time says nothing
        if not ok:
            raise PermissionDenied("the bearer token is not valid for this call")


def error_body(code: str, message: str) -> dict[str, str]:
    """The body of every HTTP error of the munet API (the REST routes' and this middleware's): the gRPC
    status name and the message."""
    return {"code": code, "message": message}


async def send_error(send, status: int, code: str, message: str, headers: list | None = None,
                     path: str = "") -> None:
    """An ASGI JSON error answer, `error_body`, sent before the app runs; under /v2 (the Open Inference
    Protocol) KServe's {"error": ...}, which Triton's and KServe's clients read."""
    body = json.dumps({"error": message} if is_oip_path(path) else error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class HTTPAuthMiddleware:
    """ASGI middleware in front of the BentoML app: refuses a request before its body is read."""

    def __init__(self, app, tokens: Tokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("method") != "OPTIONS":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                self.tokens.check(headers.get("authorization"), http_need(scope.get("method", ""),
                                                                          scope.get("path", "")))
            except (Unauthenticated, PermissionDenied) as e:
                # read (and drop) what the client is still sending: closing on a client mid-upload
                # makes it see a broken pipe instead of this answer
                more = True
                while more:
                    message = await receive()
                    more = message.get("type") == "http.request" and message.get("more_body", False)
                extra = [(b"www-authenticate", b"Bearer")] if isinstance(e, Unauthenticated) else []
                await send_error(send, e.http_status, e.code, e.message, extra, path=scope.get("path", ""))
                return
        await self.app(scope, receive, send)


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: a call without the right token ends before its handler runs."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        need = grpc_need(details.method)
        if handler is None or need == "open":
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.tokens.check(metadata.get("authorization"), need)
        except (Unauthenticated, PermissionDenied) as e:
            status, message = grpc.StatusCode[e.code], e.message

            async def deny(request_or_iterator, context):
                await context.abort(status, message)

            kind = ("stream" if handler.request_streaming else "unary") + "_" + \
                   ("stream" if handler.response_streaming else "unary")
            make = getattr(grpc, f"{kind}_rpc_method_handler")
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        return handler
