"""What every gRPC handler of ours does around its work: core errors become their status codes,
anything unexpected becomes INTERNAL (logged, never a crash), and one access line is written."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from munet.errors import MunetError

log = logging.getLogger("munet.grpc")
access = logging.getLogger("munet.access")


def status_of(e: MunetError) -> grpc.StatusCode:
    return grpc.StatusCode.__members__.get(e.code, grpc.StatusCode.INTERNAL)


def guarded(prefix: str = "", subject: str = "task") -> Callable[[Callable[..., Awaitable[Any]]],
                                                                  Callable[..., Awaitable[Any]]]:
    """Decorate a servicer method (whose servicer has `.core`); the access line names the call as
    `prefix + method` and the request's `subject` ("task": task or name; "model": model_name)."""

    def decorate(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            try:
                return await method(self, request, context)
            except MunetError as e:
                code = e.code
                await context.abort(status_of(e), e.message)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                code = "INTERNAL"
                log.exception("%s failed", method.__name__)
                # the client gets the exception type and text, not the traceback (that is in the log)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: "
                                                              f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                if self.core.config.access_log:
                    access_line(prefix + method.__name__, request, subject, code, t0, context)

        return wrapper

    return decorate


def access_line(method: str, request: Any, subject: str, code: str, t0: float,
                context: grpc.aio.ServicerContext) -> None:
    """One line per call, as the HTTP side logs; an error class is a status here, never a traceback."""
    if hasattr(request, "__aiter__"):  # a client stream: its first message is not read here
        who = ""
    elif subject == "model":
        who = getattr(request, "model_name", "") or getattr(request, "name", "")
    else:
        who = getattr(request, "task", "") or getattr(request, "name", "")
    access.info("grpc %s %s=%s %s %.1fms peer=%s", method, subject, str(who)[:64] or "-", code,
                1000 * (time.perf_counter() - t0), context.peer())
