"""`munet bench serve`'s load: long-lived client processes, each keeping requests in flight on loopback,
over gRPC (bytes in, bytes out: no client-side protobuf work) or JSON over HTTP, bounded by a duration
and a request count, optionally at a steady rate.

Spawned processes import this module: its top-level imports stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import BenchError

PREDICT_METHOD = "/munet.v1.Munet/Predict"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _client_main(idx: int, cmd_q: Any, res_q: Any, stop_ev: Any, parent_pid: int) -> None:
    """A client process: runs load commands until told to stop, its parent dies, or 15 idle minutes."""
    idle_since = time.monotonic()
    while True:
        try:
            cmd = cmd_q.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent_pid or time.monotonic() - idle_since > 900:
                return
            continue
        if cmd is None:
            return
        try:
            res = asyncio.run(_client_run(cmd, stop_ev, idx))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            res = {"fatal": f"{type(e).__name__}: {e}"}
        res_q.put((idx, cmd["id"], res))
        idle_since = time.monotonic()


async def _client_run(cmd: dict, stop_ev: Any, idx: int) -> dict:
    proto = cmd["proto"]
    payloads: list[bytes] = cmd["payloads"]
    inflight = max(1, int(cmd["inflight"]))
    timeout = float(cmd["timeout"])
    parse_version = bool(cmd.get("parse_version"))
    expect = int(cmd["images"])
    if proto == "grpc":
        import grpc

        from munet.v1 import munet_pb2 as pb

        channel = grpc.aio.insecure_channel(cmd["target"], options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        call = channel.unary_unary(PREDICT_METHOD)  # bytes in, bytes out: no client-side protobuf work

        async def one(payload: bytes) -> bytes:
            return await call(payload, timeout=timeout)

        def check(body: bytes) -> int:
            r = pb.PredictResponse.FromString(body)
            if len(r.predictions) != expect:
                raise BenchError(f"expected {expect} predictions, got {len(r.predictions)}")
            return int(r.path_version)

        def error_code(e: BaseException) -> str:
            return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__

        async def close() -> None:
            await channel.close()
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight),
                                        timeout=aiohttp.ClientTimeout(total=timeout))
        url = cmd["target"]

        class HttpStatusError(Exception):
            def __init__(self, status: int, body: bytes):
                super().__init__(f"HTTP {status}: {body[:200]!r}")
                self.status = status

        async def one(payload: bytes) -> bytes:
            async with session.post(url, data=payload, headers={"content-type": "application/json"}) as r:
                body = await r.read()
                if r.status != 200:
                    raise HttpStatusError(r.status, body)
                return body

        def check(body: bytes) -> int:
            out = json.loads(body)
            if len(out) != expect:
                raise BenchError(f"expected {expect} outputs, got {len(out)}")
            return -1

        def error_code(e: BaseException) -> str:
            return f"HTTP_{e.status}" if isinstance(e, HttpStatusError) else type(e).__name__

        async def close() -> None:
            await session.close()

    starts: list[float] = []
    ends: list[float] = []
    oks: list[bool] = []
    versions: list[int] = []
    errors: dict[str, int] = {}
    first_error = ""
    try:
        # warm-up (connections, server caches); one response is checked in full
        for i in range(max(1, int(cmd["warmup"]))):
            body = await one(payloads[(idx + i) % len(payloads)])
            if i == 0:
                check(body)
        start_at, duration = float(cmd["start_at"]), float(cmd["duration"])
        deadline = start_at + duration
        max_requests = int(cmd["max_requests"])
        parent_pid = int(cmd["parent_pid"])
        rate = float(cmd.get("rate") or 0.0)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        sent = 0
        slot = 0

        async def worker(j: int) -> None:
            nonlocal sent, slot, first_error
            k = idx * inflight + j  # each coroutine walks the payloads (tasks) from its own offset
            mine = 0
            while True:
                if os.getppid() != parent_pid:
                    return
                # every coroutine completes at least one request, so a row is measured even when one
                # request outlasts the window (batch-64 JSON of 96 px images to the BentoML baseline)
                if mine and (sent >= max_requests or time.monotonic() >= deadline or stop_ev.is_set()):
                    return
                mine += 1
                if rate > 0:
                    due = start_at + slot / rate
                    slot += 1
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if time.monotonic() >= deadline or stop_ev.is_set():
                        return
                sent += 1
                t0 = time.monotonic()
                ok, version = True, -1
                try:
                    body = await one(payloads[k % len(payloads)])
                    if parse_version:
                        version = check(body)
                except Exception as e:  # noqa: BLE001 - counted, the load goes on
                    ok = False
                    code = error_code(e)
                    errors[code] = errors.get(code, 0) + 1
                    first_error = first_error or f"{code}: {str(e)[:300]}"
                starts.append(t0)
                ends.append(time.monotonic())
                oks.append(ok)
                versions.append(version)
                k += 1

        await asyncio.gather(*(worker(j) for j in range(inflight)))
    finally:
        await close()
    return {"start": np.array(starts), "end": np.array(ends), "ok": np.array(oks, bool),
            "version": np.array(versions, np.int64), "errors": errors, "first_error": first_error}


class ClientPool:
    """Long-lived client processes (spawned once: starting Python and grpc costs ~1 s each)."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.stop_ev = ctx.Event()
        self.cmd_qs = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_client_main, args=(i, q, self.res_q, self.stop_ev, os.getpid()),
                                  name=f"munet-bench-client-{i}", daemon=True)
                      for i, q in enumerate(self.cmd_qs)]
        self._next_id = 0
        for p in self.procs:
            p.start()

    def run(self, n: int, payloads: list[bytes], *, proto: str, target: str, images: int, inflight: int,
            duration: float, warmup: int, timeout: float, max_requests: int = 10_000_000, rate: float = 0.0,
            parse_version: bool = False, start_delay: float | None = None,
            during: Callable[[float], None] | None = None) -> tuple[float, dict]:
        """Run one load pattern on the first `n` clients; returns (window start, merged results).

        `during(start_at)` runs in this process while the clients load the server (the promotion);
        the clients stop at the end of `duration` or when it returns and sets the stop event.
        """
        if n > len(self.procs):
            raise BenchError(f"{n} client processes asked for, {len(self.procs)} started")
        for p in self.procs[:n]:
            if not p.is_alive():
                raise BenchError(f"client process {p.name} died (exit code {p.exitcode})")
        self._next_id += 1
        cid = self._next_id
        self.stop_ev.clear()
        # the window starts once every client had time to warm up
        delay = start_delay if start_delay is not None else 0.5 + 0.02 * warmup * (images / 8 + 1)
        start_at = time.monotonic() + delay
        cmd = {"id": cid, "proto": proto, "target": target, "payloads": payloads, "images": images,
               "inflight": inflight, "duration": duration, "warmup": warmup, "timeout": timeout,
               "max_requests": max_requests, "rate": rate / n if rate else 0.0, "parse_version": parse_version,
               "start_at": start_at, "parent_pid": os.getpid()}
        for q in self.cmd_qs[:n]:
            q.put(cmd)
        try:
            if during is not None:
                during(start_at)
        finally:
            if during is not None:
                self.stop_ev.set()
            got: dict[int, dict] = {}
            limit = time.monotonic() + max(0.0, start_at - time.monotonic()) + duration + timeout + 60
            while len(got) < n:
                try:
                    idx, rid, res = self.res_q.get(timeout=1.0)
                except queue.Empty:
                    missing = sorted(set(range(n)) - set(got))
                    dead = [i for i in missing if not self.procs[i].is_alive()]
                    if dead or time.monotonic() > limit:
                        raise BenchError(f"client processes {missing} gave no result"
                                         + (f" ({dead} died)" if dead else "")) from None
                    continue
                if rid == cid:
                    got[idx] = res
            self.stop_ev.clear()
        fatal = [f"client {i}: {r['fatal']}" for i, r in sorted(got.items()) if "fatal" in r]
        if fatal:
            raise BenchError("; ".join(fatal))
        merged = {
            "start": np.concatenate([r["start"] for r in got.values()]),
            "end": np.concatenate([r["end"] for r in got.values()]),
            "ok": np.concatenate([r["ok"] for r in got.values()]),
            "version": np.concatenate([r["version"] for r in got.values()]),
            "errors": {},
            "first_error": next((r["first_error"] for r in got.values() if r["first_error"]), ""),
        }
        for r in got.values():
            for k, v in r["errors"].items():
                merged["errors"][k] = merged["errors"].get(k, 0) + v
        return start_at, merged

    def close(self) -> None:
        for q in self.cmd_qs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        for q in [*self.cmd_qs, self.res_q]:
            with contextlib.suppress(Exception):
                q.close()
                q.join_thread()

