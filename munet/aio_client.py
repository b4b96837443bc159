"""An asyncio client for the munet.v1.Munet gRPC API, on `grpc.aio`.

    async with AsyncMunetClient("localhost:50051") as c:
        result = await c.predict("digits", ["three.png"], top_k=3)
        print(result.predictions[0][0].label)
        async for event in c.watch_task("digits", timeout=60):
            print(event.kind, event.version)

The same methods, options, results and errors as `munet.client.MunetClient` (this module reuses its
request builders and result conversions): plain dataclasses back, `MunetClientError` (the gRPC status
code's name) for anything refused; the same rule for image arrays (rank 2 or 3 is one image, rank 4 a
batch); a deadline on every call (`timeout`, `long_timeout` for the calls that train, `watch_task`
only when given one) and gRPC's own retries, on UNAVAILABLE, for the idempotent calls only. Create it
inside a running event loop, and use it from that loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from munet.client import (
    DEFAULT_TARGET,
    AddExamplesResult,
    EvolutionStatus,
    ImageLike,
    MunetClientError,
    PredictResult,
    Task,
    TaskEvent,
    Versions,
    _added,
    _event,
    _evolution,
    _health_status,
    _policy,
    _predict_result,
    _rpc_error,
    _task,
    _versions,
    add_requests,
    channel_credentials,
    channel_options,
    register_requests,
    set_policy_request,
    to_images,
)
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncMunetClient:
    """Asynchronous client. `timeout` bounds ordinary calls; `long_timeout` bounds the ones that train
    (RegisterTask, Rollback, Promote, TriggerEvolution with wait). Idempotent calls (Predict, ListTasks,
    GetTask, ListVersions, GetEvolutionStatus, health) are retried on UNAVAILABLE within their deadline."""

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
            self._channel = grpc.aio.secure_channel(target, creds, options=channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options())
        # the token rides in each call's metadata (grpc.aio's interceptors would do the same, less plainly)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.MunetStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (for scripts that start the server themselves)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise MunetClientError("UNAVAILABLE", f"no server at {self.target} after {timeout:.0f} s") from None

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await rpc(request, timeout=timeout if timeout is not None else self.timeout,
                             metadata=self._metadata)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise _rpc_error(e) from None

    # ---- predict ----------------------------------------------------------------------------

    async def predict(self, task: str, images: ImageLike | Iterable[ImageLike], top_k: int = 1,
                      timeout: float | None = None, version: int = 0) -> PredictResult:
        """Classify images with the task's current path, or with the kept path `version` (0 = current)."""
        req = pb.PredictRequest(task=task, images=to_images(images), top_k=top_k, version=version)
        return _predict_result(await self._call(self._stub.Predict, req, timeout))

    # ---- tasks ------------------------------------------------------------------------------

    async def register_task(self, name: str, labels: Sequence[str] | None = None, builtin: str | None = None,
                            npz_file: str | None = None,
                            examples: tuple[np.ndarray, Sequence[int]] | tuple[np.ndarray, Sequence[int], Any]
                            | None = None,
                            max_examples: int = 0, seed: int = 0, chunk: int = 256,
                            validation_fraction: float | None = None, test_fraction: float | None = None,
                            timeout: float | None = None, root: str = "",
                            policy: str = "auto") -> Task:
        """Create a task (see `MunetClient.register_task`): the spec, then the examples streamed in
        `chunk`-image messages, then the UploadEnd that commits them; waits while the server trains."""
        messages = register_requests(name, labels, builtin, npz_file, examples, max_examples, seed, chunk,
                                     validation_fraction, test_fraction, root, policy)
        return _task(await self._call(self._stub.RegisterTask, messages,
                                      timeout if timeout is not None else self.long_timeout))

    async def add_examples(self, task: str, x: np.ndarray, y: Sequence[int] | np.ndarray,
                           split: Sequence[int] | np.ndarray | None = None, chunk: int = 256,
                           timeout: float | None = None) -> AddExamplesResult:
        """Add labelled examples to a task: x an (N, H, W[, C]) array or a list of images, y (N,) labels,
        `split` (N,) codes (0 train, 1 validation, 2 test, -1 the server's choice)."""
        return _added(await self._call(self._stub.AddExamples, add_requests(task, x, y, split, chunk), timeout))

    async def list_tasks(self, timeout: float | None = None) -> list[Task]:
        return [_task(t) for t in (await self._call(self._stub.ListTasks, pb.ListTasksRequest(), timeout)).tasks]

    async def get_task(self, name: str, timeout: float | None = None) -> Task:
        return _task(await self._call(self._stub.GetTask, pb.GetTaskRequest(name=name), timeout))

    async def delete_task(self, name: str, timeout: float | None = None) -> str:
        return (await self._call(self._stub.DeleteTask, pb.DeleteTaskRequest(name=name), timeout)).name

    # ---- versions and evolution -------------------------------------------------------------

    async def list_versions(self, task: str, timeout: float | None = None) -> Versions:
        return _versions(await self._call(self._stub.ListVersions, pb.ListVersionsRequest(task=task), timeout))

    async def rollback(self, task: str, version: int = 0, policy: str = "", timeout: float | None = None) -> Task:
        """Serve an earlier version again (0: the one before the current). The task is then frozen,
        unless `policy` is "auto" or "approve"; the returned Task says which."""
        req = pb.RollbackRequest(task=task, version=version, policy=_policy(policy))
        return _task(await self._call(self._stub.Rollback, req,
                                      timeout if timeout is not None else self.long_timeout))

    async def set_task_policy(self, task: str, policy: str = "", candidates_per_generation: int | None = None,
                              candidate_budget_seconds: float | None = None, scale_base: float | None = None,
                              timeout: float | None = None) -> Task:
        """Set a task's promotion policy ("auto", "approve", "frozen"; "" keeps it) and, when any is
        given, its evolution settings (each None or 0 = the server's default)."""
        req = set_policy_request(task, policy, candidates_per_generation, candidate_budget_seconds, scale_base)
        return _task(await self._call(self._stub.SetTaskPolicy, req, timeout))

    async def watch_task(self, task: str = "", since_id: int = 0,
                         timeout: float | None = None) -> AsyncIterator[TaskEvent]:
        """Events as they happen to `task` (or every task), as an async iterator (`async for`).
        `since_id` first replays the stored events from that id on (1: all kept; 0: none). The one
        call without a default deadline (a watch is meant to last): it ends when the task is deleted,
        when the caller stops iterating (break, or `aclose()` on the iterator; the call is cancelled
        then), or at `timeout` seconds with MunetClientError("DEADLINE_EXCEEDED"). It is not retried:
        resume after an error with `since_id` = the last event's id + 1."""
        call = self._stub.WatchTask(pb.WatchTaskRequest(task=task, since_id=since_id), timeout=timeout,
                                    metadata=self._metadata)
        try:
            async for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise _rpc_error(e) from None
        finally:
            call.cancel()

    async def promote(self, task: str, version: int, timeout: float | None = None) -> Task:
        """Serve `version` now: under policy "approve", the pending version an operator accepts."""
        return _task(await self._call(self._stub.Promote, pb.PromoteRequest(task=task, version=version),
                                      timeout if timeout is not None else self.long_timeout))

    async def reject(self, task: str, version: int, reason: str = "", timeout: float | None = None) -> Task:
        """Refuse a pending version: it is never served by evolution, and pruned first."""
        return _task(await self._call(self._stub.Reject,
                                      pb.RejectRequest(task=task, version=version, reason=reason), timeout))

    async def trigger_evolution(self, task: str = "", candidates: int = 0, budget_seconds: float = 0.0,
                                wait: bool = False, timeout: float | None = None) -> EvolutionStatus:
        req = pb.TriggerEvolutionRequest(task=task, candidates=candidates, budget_seconds=budget_seconds,
                                         wait=wait)
        if timeout is None and wait:
            timeout = self.long_timeout
        return _evolution(await self._call(self._stub.TriggerEvolution, req, timeout))

    async def evolution_status(self, timeout: float | None = None) -> EvolutionStatus:
        return _evolution(await self._call(self._stub.GetEvolutionStatus, pb.GetEvolutionStatusRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ... ("" is the whole server)."""
        return _health_status(await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                               timeout))


__all__ = ["AsyncMunetClient"]
