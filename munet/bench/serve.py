"""`munet bench serve`: what serving costs, measured in one run on one path with the same inputs.

    munet bench serve            # ~3-5 minutes; writes bench-results/serve-<date>.json and .md
    munet bench serve --quick    # < 60 s smoke run with short measurement windows

Rows (throughput in images/s, client-side p50/p99 latency in ms):

1. raw ONNX Runtime in this process, the limit: the served path's own chain of sessions
   (`Runtime.prepare` -> `ServedPath.run`, the server's session options), and the same path exported
   as ONE merged ONNX model; batch 1 and batch 64.
2. munet-serve over gRPC (`munet serve`, the shipped BentoML process with our gRPC server): unary
   batch 1 from one sequential client, unary batch 64, and N single-image requests in flight from
   separate client processes (server-side micro-batching).
3. a plain BentoML service (`munet.bench.bentoml_baseline`) serving the merged model with adaptive
   batching, JSON requests, the same three load patterns.
4. ten tasks sharing the root trunk (each its own head), mixed single-image load, and the server's
   RSS with one task vs ten.
5. a promotion under steady load: the incumbent's stored score is set to 0 so any candidate wins,
   TriggerEvolution(wait) runs while clients keep a steady rate; failed requests and the longest
   gap between successful responses are reported.

Load comes from separate client processes (multiprocessing, spawn) on loopback, each bounded by a
duration and a request count. Every process this bench starts is stopped in `finally` blocks.
Top-level imports stay light: the client processes import this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PREDICT_METHOD = "/munet.v1.Munet/Predict"
TASK_PREFIX = "bench-t"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark cannot run (a server that did not start, a client that failed); reported, exit 1."""


# ---- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    duration_s: float = 8.0  # measurement window per row
    warmup: int = 5  # requests (or runs) per client before the window
    client_procs: int = 2  # processes generating concurrent load
    inflight: int = 8  # requests each of them keeps in flight (procs x inflight = concurrency)
    tasks: int = 10
    max_examples: int = 300  # per registered task (uci_digits)
    big_batch: int = 64
    promotion_rate: float = 100.0  # requests/s, all clients together, during the promotion
    promotion_budget_s: float = 4.0  # seconds of training for the one candidate
    promotion_pre_s: float = 6.0  # steady load before the trigger: the "evolution idle" latencies
    promotion_post_s: float = 2.0  # and after the promotion returned
    restart_memory: bool = True  # also restart the server on its 10-task store and measure RSS once more
    request_timeout_s: float = 30.0
    root: str = "mobilenet_v2_imagenet"  # the root every task grows from (`munet roots list`)
    out_dir: str | None = "bench-results"  # None: write nothing
    keep: bool = False  # keep the temporary folder (store, logs, merged model)
    server_env: dict[str, str] = field(default_factory=dict)  # extra MUNET_* for the munet server
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        values = {"duration_s": 1.0, "warmup": 3, "max_examples": 120, "promotion_rate": 60.0,
                  "promotion_budget_s": 1.0, "promotion_pre_s": 0.7, "promotion_post_s": 0.7,
                  "restart_memory": False, "quick": True}
        values.update(overrides)
        return cls(**values)

    @property
    def concurrency(self) -> int:
        return self.client_procs * self.inflight


# ---- small helpers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(msg: str) -> None:
    print(f"[bench serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime as ort

    return {"nproc": os.cpu_count(), "cpu_model": cpu or platform.processor(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average_at_start": list(os.getloadavg())}


# ---- server processes ---------------------------------------------------------------------------


class ServerProcess:
    """A BentoML server (arbiter + spawned workers) in its own session, stopped for sure on `stop`.

    BentoML's arbiter spawns each worker as a fresh interpreter in its own session, so killing the
    arbiter's process group would not reach them: the workers are found (and remembered) as the
    arbiter's descendants and stopped by pid.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._known: dict[int, Any] = {}  # pid -> psutil.Process

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def descendants(self) -> list[Any]:
        import psutil

        if self.proc is None:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return kids

    def worker(self) -> Any:
        """The BentoML worker process (the one that holds the model), or None while it starts."""
        for k in self.descendants():
            with contextlib.suppress(Exception):  # it may just have exited
                if any("_bentoml_impl.worker" in a for a in k.cmdline()):
                    return k
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with status {self.proc.returncode if self.proc else '?'}"
                                 f" while starting; log:\n{self.log_tail()}")
            with contextlib.suppress(Exception):  # not up yet
                if check():
                    self.descendants()
                    return
            time.sleep(0.25)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, grace: float = 15.0) -> None:
        import psutil

        if self.proc is None:
            return
        self.descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)  # the arbiter stops its workers gracefully
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        left = []
        for p in self._known.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():
                    left.append(p)
        if left:
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, still = psutil.wait_procs(left, timeout=5)
            for p in still:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(still, timeout=5)
        with contextlib.suppress(Exception):
            self._log.close()
        self.proc = None


def _http_ok(url: str, data: bytes | None = None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if r.status != 200:
            raise BenchError(f"{url}: HTTP {r.status}")
        return r.read()


def scrape_metrics(http_port: int) -> dict[str, Any]:
    """The munet server's Prometheus metrics that describe batching, sessions and providers."""
    try:
        text = _http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=5.0).decode()
    except Exception:  # noqa: BLE001 - metrics are context, not results
        return {}
    out: dict[str, Any] = {"providers": set()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        for key in ("munet_batch_size_sum", "munet_batch_size_count", "munet_batch_tasks_sum",
                    "munet_batch_tasks_count", "munet_module_sessions"):
            if name == key or name.startswith(key + "{"):
                out[key] = out.get(key, 0.0) + v
        if name.startswith("munet_module_loaded{") and 'provider="' in name:
            out["providers"].add(name.split('provider="', 1)[1].split('"', 1)[0])
        for part in SPLIT_PARTS:
            base = f"munet_request_{part}_seconds"
            if name.startswith(base + "_sum"):
                out[f"{part}_sum"] = out.get(f"{part}_sum", 0.0) + v
            elif name.startswith(base + "_count"):
                out[f"{part}_count"] = out.get(f"{part}_count", 0.0) + v
            elif name.startswith(base + "_bucket{") and 'le="' in name:
                le = float(name.split('le="', 1)[1].split('"', 1)[0])
                buckets = out.setdefault(f"{part}_buckets", {})
                buckets[le] = buckets.get(le, 0.0) + v
    out["providers"] = sorted(out["providers"])
    return out


SPLIT_PARTS = ("queue", "compute", "overhead", "decode")


def _split_stats(before: dict, after: dict) -> dict[str, float]:
    """Per-request queue / compute / overhead (ms) of the requests between two scrapes: the mean, and
    the median read off the histogram's buckets (linear within a bucket)."""
    out: dict[str, float] = {}
    for part in SPLIT_PARTS:
        n = after.get(f"{part}_count", 0.0) - before.get(f"{part}_count", 0.0)
        if n <= 0:
            continue
        out[f"{part}_ms_mean"] = (after.get(f"{part}_sum", 0.0) - before.get(f"{part}_sum", 0.0)) / n * 1000.0
        a, b = after.get(f"{part}_buckets", {}), before.get(f"{part}_buckets", {})
        edges = sorted(a)
        lo, below = 0.0, 0.0
        for le in edges:
            cum = a[le] - b.get(le, 0.0)
            if cum >= n / 2:
                hi = le if math.isfinite(le) else lo * 2 or 1.0
                frac = (n / 2 - below) / max(cum - below, 1e-9)
                out[f"{part}_ms_p50"] = (lo + (hi - lo) * frac) * 1000.0
                break
            lo, below = le, cum
    return out


def _batch_stats(before: dict, after: dict) -> dict[str, float]:
    out = {}
    n = after.get("munet_batch_size_count", 0) - before.get("munet_batch_size_count", 0)
    if n > 0:
        out["server_batches"] = int(n)
        out["server_mean_batch"] = (after.get("munet_batch_size_sum", 0)
                                    - before.get("munet_batch_size_sum", 0)) / n
        out["server_mean_tasks_per_batch"] = (after.get("munet_batch_tasks_sum", 0)
                                              - before.get("munet_batch_tasks_sum", 0)) / n
    return out


def _rss(proc: Any) -> dict[str, int]:
    if proc is None:
        return {}
    out = {"rss": int(proc.memory_info().rss)}
    with contextlib.suppress(Exception):
        out["uss"] = int(proc.memory_full_info().uss)
    return out


# ---- load-generating client processes -----------------------------------------------------------


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


# ---- rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    name: str
    batch: int
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int
    ref_raw: str = ""  # key of the raw-ORT row this row is compared with
    ref_bentoml: str = ""  # key of the BentoML row with the same load pattern
    vs_raw: float | None = None
    vs_bentoml: float | None = None
    extra: dict = field(default_factory=dict)


def row_from_clients(key: str, name: str, batch: int, concurrency: int, start_at: float, res: dict,
                     **kw: Any) -> Row:
    ok = res["ok"]
    lat = (res["end"] - res["start"])[ok] * 1000.0
    n_ok = int(ok.sum())
    # from the first request sent (a client still warming up at `start_at` would otherwise count as idle)
    first = float(res["start"].min()) if len(ok) else start_at
    span = float(res["end"][ok].max() - first) if n_ok else float("nan")
    extra = dict(kw.pop("extra", {}))
    if first - start_at > 0.05:
        extra["late_start_s"] = round(first - start_at, 3)
    if res["errors"]:
        extra["errors"] = res["errors"]
        extra["first_error"] = res["first_error"]
    return Row(key, name, batch, concurrency, n_ok * batch / span if n_ok and span > 0 else 0.0,
               _pct(lat, 50), _pct(lat, 99), len(ok), int((~ok).sum()), extra=extra, **kw)


def measure_inproc(key: str, name: str, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                   duration: float, warmup: int) -> Row:
    for _ in range(max(1, warmup)):
        run(x)
    lat = []
    t_start = time.perf_counter()
    deadline = t_start + duration
    while time.perf_counter() < deadline or len(lat) < 5:
        t0 = time.perf_counter()
        run(x)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_start
    a = np.array(lat) * 1000.0
    return Row(key, name, len(x), 1, len(lat) * len(x) / elapsed, _pct(a, 50), _pct(a, 99), len(lat), 0)


# ---- the run ------------------------------------------------------------------------------------


def _root_env(settings: Settings) -> dict[str, str]:
    from munet.models.roots import RootUnavailable, get_root_spec

    try:
        spec = get_root_spec(settings.root)
        spec.load()  # fails now, with the reason, if its weights are not installed
    except RootUnavailable as e:
        raise BenchError(str(e)) from None
    return {"MUNET_ROOT": settings.root}


def export_merged(store: Any, module_ids: list[str], path: Path, size: int) -> float:
    """The path's modules as ONE ONNX model (`Chain`, dynamic batch), exported as `export_module` does.

    Returns the largest absolute difference to torch on a few random inputs.
    """
    import warnings

    import onnxruntime as ort
    import torch

    from munet.models.export import INPUT, OPSET, OUTPUT
    from munet.models.vit import Chain

    chain = Chain([store.load_module(m).eval() for m in module_ids]).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(chain, (torch.rand(2, 3, size, size),), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=OPSET,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    x = np.random.default_rng(3).random((5, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        ref = chain(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT: x})[0]
    return float(np.abs(ref - got).max())


def _grpc_payloads(tasks: list[str], images: np.ndarray) -> list[bytes]:
    from munet.client import raw_image
    from munet.v1 import munet_pb2 as pb

    return [pb.PredictRequest(task=t, images=[raw_image(im) for im in images], top_k=1).SerializeToString()
            for t in tasks]


def _json_payload(images: np.ndarray) -> bytes:
    return json.dumps({"x": images.tolist()}, separators=(",", ":")).encode()


def run_bench(settings: Settings) -> dict:
    """Run every phase; returns the results dict (rows, targets, promotion, memory, machine).

    The client processes are spawned: a script calling this needs the `if __name__ == "__main__":`
    guard, as with any multiprocessing code.
    """
    from munet.client import MunetClient

    t_begin = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="munet-bench-serve-"))
    home = tmp / "home"
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "tmp": str(tmp)}
    rows: dict[str, Row] = {}
    servers: list[ServerProcess] = []
    pool: ClientPool | None = None
    store = None
    client = None
    ok = False
    s = settings
    try:
        grpc_port, http_port = _free_port(), _free_port()
        env = {**os.environ, **_root_env(s), **{k: str(v) for k, v in s.server_env.items()},
               "MUNET_HOME": str(home), "MUNET_HOST": "127.0.0.1", "MUNET_GRPC_PORT": str(grpc_port),
               "MUNET_HTTP_PORT": str(http_port), "MUNET_DEMO_TASK": "false", "MUNET_SCHEDULER_ENABLED": "false",
               "MUNET_IMPORT_DIR": str(tmp / "imports"),
               "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
        munet = ServerProcess("munet server", [sys.executable, "-m", "munet.cli", "serve"], env,
                              tmp / "munet-server.log")
        servers.append(munet)
        _log(f"starting munet serve (gRPC {grpc_port}, HTTP {http_port}) on store {home}")
        munet.start()
        pool = ClientPool(max(1, s.client_procs))  # spawns while the server starts
        target = f"127.0.0.1:{grpc_port}"
        client = MunetClient(target, timeout=30.0, long_timeout=600.0)
        munet.wait_ready(lambda: client.health(timeout=1.0) == "SERVING", timeout=180)
        results["rss_server_0_tasks"] = _rss(munet.worker())

        from munet.config import Config

        cfg = Config.from_env(env={k: v for k, v in env.items() if k.startswith("MUNET_")})
        results["server_config"] = {k: str(v) for k, v in asdict(cfg).items()}
        tasks = [f"{TASK_PREFIX}{i}" for i in range(max(1, s.tasks))]
        t0 = time.monotonic()
        client.register_task(tasks[0], builtin="uci_digits", max_examples=s.max_examples, seed=0)
        _log(f"registered {tasks[0]} in {time.monotonic() - t0:.1f} s")

        # the same inputs everywhere: 64 seeded random images, uint8 HWC at the task's input size (so
        # every row measures the model and transport, not a resize only the server would do)
        size = client.get_task(tasks[0]).image_size
        results["image_size"] = size
        images = np.random.default_rng(0).integers(0, 256, (s.big_batch, size, size, 3), dtype=np.uint8)
        one = images[:1]

        # ---- 1. raw ONNX Runtime in this process ------------------------------------------
        from munet.data.images import to_model_input
        from munet.models.store import Store
        from munet.service.runtime import Runtime

        store = Store(home)
        rec = store.get_path(tasks[0])
        labels = store.get_task(tasks[0]).labels
        runtime = Runtime(store, cfg.providers, cfg.intra_op_threads)
        served = runtime.prepare(rec, labels, size)
        x1, x64 = to_model_input(one), to_model_input(images)
        merged_path = tmp / "merged.onnx"
        parity = export_merged(store, list(rec.modules), merged_path, size)
        import onnxruntime as ort

        merged = ort.InferenceSession(str(merged_path), sess_options=runtime.pool._options(),
                                      providers=runtime.pool.providers)
        results["providers"] = {"raw_chain": sorted({p for sess in served.sessions for p in sess.get_providers()[:1]}),
                                "raw_merged": merged.get_providers()[:1]}
        results["path"] = {"task": tasks[0], "version": rec.version, "modules": list(rec.modules),
                           "merged_parity_max_abs": parity}
        _log(f"raw ORT: path of {len(rec.modules)} sessions and one merged model (parity {parity:.1e})")

        def merged_run(x: np.ndarray, sess: Any = merged) -> np.ndarray:
            return sess.run(None, {"x": x})[0]

        for key, name, fn, x in (("raw_chain_b1", "raw ORT, path's session chain", served.run, x1),
                                 ("raw_chain_b64", "raw ORT, path's session chain", served.run, x64),
                                 ("raw_merged_b1", "raw ORT, merged single model", merged_run, x1),
                                 ("raw_merged_b64", "raw ORT, merged single model", merged_run, x64)):
            rows[key] = measure_inproc(key, name, fn, x, s.duration_s, s.warmup)
        merged = served = merged_run = None  # free the sessions before the servers run
        runtime.pool.release(set())

        # ---- 2. munet-serve over gRPC, one task --------------------------------------------
        p1 = _grpc_payloads([tasks[0]], one)
        p64 = _grpc_payloads([tasks[0]], images)
        common = {"proto": "grpc", "target": target, "duration": s.duration_s, "warmup": s.warmup,
                      "timeout": s.request_timeout_s}

        def grpc_row(key: str, name: str, n: int, payloads: list[bytes], batch: int, inflight: int,
                     ref_raw: str, ref_bentoml: str) -> Row:
            before = scrape_metrics(http_port)
            start_at, res = pool.run(n, payloads, images=batch, inflight=inflight, **common)
            after = scrape_metrics(http_port)
            stats = {**_batch_stats(before, after), **_split_stats(before, after)}
            return row_from_clients(key, name, batch, n * inflight, start_at, res, ref_raw=ref_raw,
                                    ref_bentoml=ref_bentoml, extra=stats)

        rows["grpc_b1"] = grpc_row("grpc_b1", "munet gRPC unary, 1 sequential client", 1, p1, 1, 1,
                                   "raw_chain_b1", "bento_b1")
        rows["grpc_b64"] = grpc_row("grpc_b64", "munet gRPC unary, 1 sequential client", 1, p64, s.big_batch, 1,
                                    "raw_chain_b64", "bento_b64")
        rows["grpc_conc"] = grpc_row("grpc_conc", f"munet gRPC, {s.client_procs} procs x {s.inflight} in flight, "
                                     "1 task", s.client_procs, p1, 1, s.inflight, "raw_chain_b64", "bento_conc")
        _log("gRPC single-task rows done")
        metrics_1 = scrape_metrics(http_port)
        results["providers"]["munet_server"] = metrics_1.get("providers", [])
        results["rss_server_1_task"] = _rss(munet.worker())
        results["sessions_1_task"] = metrics_1.get("munet_module_sessions")

        # ---- 3 (start) + 4 (register): the baseline starts while nine more tasks register --------
        bento_port = _free_port()
        benv = {**os.environ, "MUNET_BASELINE_ONNX": str(merged_path), "MUNET_BASELINE_SIZE": str(size),
                "MUNET_BASELINE_INTRA_OP": str(cfg.intra_op_threads),
                "MUNET_BASELINE_PROVIDERS": ",".join(runtime.pool.providers),
                "BENTOML_HOME": str(tmp / "bentoml-baseline"), "BENTOML_DO_NOT_TRACK": "True"}
        baseline = ServerProcess("BentoML baseline", [sys.executable, "-m", "bentoml", "serve",
                                                      "munet.bench.bentoml_baseline:Baseline", "--host", "127.0.0.1",
                                                      "--port", str(bento_port)], benv, tmp / "baseline.log")
        servers.append(baseline)
        baseline.start()
        t0 = time.monotonic()
        for i, t in enumerate(tasks[1:], start=1):
            client.register_task(t, builtin="uci_digits", max_examples=s.max_examples, seed=i)
        _log(f"registered {len(tasks) - 1} more tasks in {time.monotonic() - t0:.1f} s")
        paths = {t.name: [m.id for m in t.path.modules] for t in client.list_tasks() if t.name in tasks}
        trunks = {tuple(m[:-1]) for m in paths.values()}
        heads = {m[-1] for m in paths.values()}
        results["tasks"] = {"count": len(paths), "distinct_trunks": len(trunks), "distinct_heads": len(heads),
                            "modules_per_path": len(paths[tasks[0]])}

        base_url = f"http://127.0.0.1:{bento_port}"
        baseline.wait_ready(lambda: bool(_http_ok(base_url + "/readyz")), timeout=120)
        info = json.loads(_http_ok(base_url + "/info", b"{}", timeout=10))
        results["providers"]["bentoml_baseline"] = info.get("providers", [])[:1]
        results["baseline"] = info

        # ---- 3. the BentoML baseline ----------------------------------------------------------
        j1, j64 = [_json_payload(one)], [_json_payload(images)]
        hcommon = {"proto": "http", "target": base_url + "/predict", "duration": s.duration_s, "warmup": s.warmup,
                       "timeout": s.request_timeout_s}
        for key, name, n, payloads, batch, inflight, ref in (
                ("bento_b1", "BentoML baseline, 1 sequential client", 1, j1, 1, 1, "raw_merged_b1"),
                ("bento_b64", "BentoML baseline, 1 sequential client", 1, j64, s.big_batch, 1, "raw_merged_b64"),
                ("bento_conc", f"BentoML baseline, {s.client_procs} procs x {s.inflight} in flight", s.client_procs,
                 j1, 1, s.inflight, "raw_merged_b64")):
            start_at, res = pool.run(n, payloads, images=batch, inflight=inflight, **hcommon)
            rows[key] = row_from_clients(key, name, batch, n * inflight, start_at, res, ref_raw=ref)
        results["rss_baseline"] = _rss(baseline.worker())
        baseline.stop()
        _log("BentoML baseline rows done")

        # ---- 4. ten tasks, mixed -----------------------------------------------------------------
        # one task again first, now that ten are registered: the like-for-like comparison for the mixed
        # row (the server process has changed since the first single-task row: registrations, baseline)
        rows["grpc_conc_10"] = grpc_row("grpc_conc_10", f"munet gRPC, {s.client_procs} procs x {s.inflight} in "
                                        f"flight, 1 of {len(tasks)} tasks", s.client_procs, p1, 1, s.inflight,
                                        "raw_chain_b64", "bento_conc")
        pmix = _grpc_payloads(tasks, one)
        rows["grpc_mixed"] = grpc_row("grpc_mixed", f"munet gRPC, {s.client_procs} procs x {s.inflight} in flight, "
                                      f"{len(tasks)} tasks mixed", s.client_procs, pmix, 1, s.inflight,
                                      "raw_chain_b64", "bento_conc")
        metrics_10 = scrape_metrics(http_port)
        results["rss_server_10_tasks"] = _rss(munet.worker())
        results["sessions_10_tasks"] = metrics_10.get("munet_module_sessions")
        _log("mixed-task row done")

        # ---- 5. a promotion under steady load ------------------------------------------------------
        results["promotion"] = promotion_under_load(s, pool, client, store, tasks[0], target, p1)
        _log("promotion done")

        # ---- memory without registration residue: the same store served after a restart ------------
        if s.restart_memory:
            client.close()
            munet.stop()
            munet = ServerProcess("munet server (restarted)", munet.argv, env, tmp / "munet-server-2.log")
            servers.append(munet)
            munet.start()
            client = MunetClient(target, timeout=30.0, long_timeout=600.0)
            munet.wait_ready(lambda: client.health(timeout=1.0) == "SERVING", timeout=180)
            for t in tasks:
                for _ in range(5):
                    client.predict(t, images[:8])
            results["rss_server_10_tasks_restarted"] = _rss(munet.worker())
            _log("restarted server measured")
        ok = True
    except BaseException:
        for srv in servers:
            if srv.proc is not None:
                _log(f"{srv.name} log tail:\n{srv.log_tail()}")
        raise
    finally:
        if client is not None:
            client.close()
        if pool is not None:
            pool.close()
        for srv in reversed(servers):
            srv.stop()
        if store is not None:
            store.close()
        if not s.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not ok:
            _log(f"kept {tmp}")
    results["rows"] = finish_rows(rows)
    results["targets"] = targets(results)
    results["seconds"] = round(time.monotonic() - t_begin, 1)
    return results


def promotion_under_load(s: Settings, pool: ClientPool, client: Any, store: Any, task: str, target: str,
                         payloads: list[bytes]) -> dict:
    before = client.get_task(task)
    v0 = before.current_version
    # any candidate now beats the incumbent (scores are >= 0; the stored score is reused, not recomputed,
    # while the task's examples are unchanged)
    store.update_path(task, v0, score=-1.0)
    marks: dict[str, Any] = {}

    def during(start_at: float) -> None:
        time.sleep(max(0.0, start_at - time.monotonic()) + s.promotion_pre_s)
        marks["trigger_start"] = time.monotonic()
        try:
            marks["status"] = client.trigger_evolution(task, candidates=1, budget_seconds=s.promotion_budget_s,
                                                       wait=True, timeout=300.0)
        except Exception as e:  # noqa: BLE001 - reported; the load still gets evaluated
            marks["error"] = f"{type(e).__name__}: {e}"
        marks["trigger_end"] = time.monotonic()
        time.sleep(s.promotion_post_s)

    n = max(1, s.client_procs)
    start_at, res = pool.run(n, payloads, proto="grpc", target=target, images=1, inflight=s.inflight,
                             duration=600.0, warmup=s.warmup, timeout=s.request_timeout_s, rate=s.promotion_rate,
                             parse_version=True, during=during)
    after = client.get_task(task)
    ok = res["ok"]
    order = np.argsort(res["end"])
    ends, starts, oks, versions = res["end"][order], res["start"][order], ok[order], res["version"][order]
    ok_ends = ends[oks]
    t_first = float(starts.min()) if len(starts) else start_at
    gaps = np.diff(ok_ends) if len(ok_ends) > 1 else np.array([np.nan])
    lat = (ends - starts) * 1000.0
    t_a, t_b = marks.get("trigger_start", start_at), marks.get("trigger_end", start_at)
    pre_ok = ok_ends[ok_ends < t_a]
    pre_gap = float(np.diff(pre_ok).max() * 1000) if len(pre_ok) > 2 else float("nan")
    during_sel = (ends >= t_a) & (starts <= t_b)
    new_sel = oks & (versions > v0)
    first_new = float(ends[new_sel].min()) if new_sel.any() else None
    near_swap = (np.abs(ends - first_new) <= 0.5) if first_new is not None else np.zeros_like(oks)
    status = marks.get("status")
    report = status.recent[-1] if status is not None and status.recent else None
    out = {
        "task": task, "version_before": v0, "version_after": after.current_version,
        "promoted": bool(report.promoted) if report else False,
        "promoted_version": int(report.promoted_version) if report else 0,
        "generation_error": (report.error if report else "") or marks.get("error", ""),
        "trigger_seconds": round(t_b - t_a, 2),
        "requests": len(ok), "failed": int((~ok).sum()), "errors": res["errors"],
        "first_error": res["first_error"],
        "rate_requested": s.promotion_rate,
        "rate_achieved": float(oks.sum() / (ends.max() - t_first)) if len(ends) else 0.0,
        "max_gap_ms": float(np.nanmax(gaps) * 1000.0),
        "max_gap_before_trigger_ms": pre_gap,
        "requests_before_trigger": int((oks & (ends < t_a)).sum()),
        "requests_during_trigger": int((oks & during_sel).sum()),
        "max_latency_ms_before_trigger": float(lat[ends < t_a].max()) if (ends < t_a).any() else float("nan"),
        "p50_ms_before_trigger": _pct(lat[oks & (ends < t_a)], 50),
        "p99_ms_before_trigger": _pct(lat[oks & (ends < t_a)], 99),
        "p50_ms_during_trigger": _pct(lat[oks & during_sel], 50),
        "p99_ms_during_trigger": _pct(lat[oks & during_sel], 99),
        "max_latency_ms_during_trigger": float(lat[during_sel].max()) if during_sel.any() else float("nan"),
        "max_latency_ms_near_swap": float(lat[near_swap].max()) if near_swap.any() else float("nan"),
        "new_version_first_seen_s_after_trigger": round(first_new - t_a, 2) if first_new is not None else None,
        "versions_seen": sorted({int(v) for v in versions[oks]}),
    }
    return out


def finish_rows(rows: dict[str, Row]) -> list[dict]:
    for r in rows.values():
        ref = rows.get(r.ref_raw)
        if ref is not None and ref.images_per_s > 0:
            r.vs_raw = r.images_per_s / ref.images_per_s
        b = rows.get(r.ref_bentoml)
        if b is not None and b.images_per_s > 0:
            r.vs_bentoml = r.images_per_s / b.images_per_s
    return [asdict(r) for r in rows.values()]


def targets(results: dict) -> list[dict]:
    rows = {r["key"]: r for r in results.get("rows", [])}
    out = []

    def add(name: str, value: float | None, threshold: str, passed: bool | None, detail: str) -> None:
        out.append({"target": name, "value": value, "threshold": threshold, "passed": passed, "detail": detail})

    def ips(k: str) -> float | None:
        return rows[k]["images_per_s"] if k in rows else None

    a, b = ips("grpc_b64"), ips("raw_chain_b64")
    add("batched gRPC throughput vs raw ORT", a / b if a and b else None, ">= 0.85",
        (a / b >= 0.85) if a and b else None, "gRPC unary batch 64 / raw ORT chain batch 64")
    if "grpc_b1" in rows and "raw_chain_b1" in rows:
        d = rows["grpc_b1"]["p50_ms"] - rows["raw_chain_b1"]["p50_ms"]
        add("unary p50 overhead (ms)", d, "<= 1.0", d <= 1.0, "gRPC unary batch 1 p50 - raw ORT chain batch 1 p50")
    o = rows.get("grpc_b1", {}).get("extra", {}).get("overhead_ms_p50")
    if o is not None:
        add("server overhead p50 (ms)", o, "<= 0.3", o <= 0.3,
            "gRPC unary batch 1: server time outside queue and ONNX Runtime (munet_request_overhead_seconds)")
    a, b = ips("grpc_mixed"), ips("bento_conc")
    add("ten mixed tasks vs BentoML baseline", a / b if a and b else None, ">= 2.0",
        (a / b >= 2.0) if a and b else None, "gRPC 10 tasks mixed / BentoML concurrent, same concurrency")
    a, b = ips("grpc_mixed"), ips("grpc_conc_10")
    add("ten mixed tasks vs one task (info)", a / b if a and b else None, "-", None,
        "gRPC 10 tasks mixed / 1 task, same server state and concurrency")
    r1 = results.get("rss_server_1_task", {}).get("rss")
    r10 = results.get("rss_server_10_tasks", {}).get("rss")
    add("memory, ten tasks vs one", r10 / r1 if r1 and r10 else None, "<= 1.5",
        (r10 / r1 <= 1.5) if r1 and r10 else None, "server worker RSS with 10 tasks / with 1 task")
    p = results.get("promotion")
    if p is not None:
        add("failed requests during promotion", p["failed"], "== 0 (and promoted)",
            p["failed"] == 0 and p["promoted"], f"promoted v{p['version_before']} -> v{p['version_after']}"
            if p["promoted"] else f"no promotion: {p['generation_error'] or 'the candidate did not win'}")
        idle, busy = p["p99_ms_before_trigger"], p["p99_ms_during_trigger"]
        ratio = busy / idle if idle and busy and np.isfinite(idle) and np.isfinite(busy) else None
        add("Predict p99 during a generation vs idle", ratio, "<= 2.0", (ratio <= 2.0) if ratio else None,
            f"p99 {_f(busy, '{:.2f}')} ms while a generation trains / {_f(idle, '{:.2f}')} ms before it, "
            f"same steady rate")
        worst = p["max_latency_ms_during_trigger"]
        add("longest Predict during a generation (ms)", worst, "<= 250",
            bool(worst <= 250.0) if np.isfinite(worst) else None,
            f"slowest request while the generation ran (idle: {_f(p['max_latency_ms_before_trigger'])} ms)")
    return out


# ---- output -------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return fmt.format(v)


def _mb(b: int | None) -> str:
    return f"{b / 2**20:.0f} MB" if b else "-"


def markdown(results: dict) -> str:
    m = results["machine"]
    prov = results.get("providers", {})
    lines = [
        f"# munet bench serve, {m['date']}",
        "",
        (f"Machine: {m['nproc']} cores, {m['cpu_model']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}; onnxruntime {m['onnxruntime']}; "
        f"Python {m['python']}."),
        "Execution providers: " + "; ".join(f"{k} {', '.join(v) or '?'}" for k, v in prov.items()) + ".",
        (f"Settings: {results['settings']['duration_s']:g} s per row, concurrency "
        f"{results['settings']['client_procs']} client processes x {results['settings']['inflight']} in flight"
        f"{', --quick' if results['settings']['quick'] else ''}; run took {results.get('seconds', 0):.0f} s."),
        "",
        ("| row | batch | in flight | images/s | p50 ms | p99 ms | queue ms | compute ms | overhead ms | requests "
         "| failed | vs raw ORT | vs BentoML |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        vs_raw = f"{r['vs_raw']:.2f} ({r['ref_raw']})" if r["vs_raw"] is not None else "-"
        vs_b = f"{r['vs_bentoml']:.2f}" if r["vs_bentoml"] is not None else "-"
        extra = r.get("extra", {})
        name = r["name"]
        if "server_mean_batch" in extra:
            name += f" (server batch {extra['server_mean_batch']:.1f}"
            if extra.get("server_mean_tasks_per_batch", 0) > 1.0:
                name += f", {extra['server_mean_tasks_per_batch']:.1f} tasks"
            name += ")"
        split = [_f(extra.get(f"{part}_ms_p50"), "{:.2f}") for part in ("queue", "compute", "overhead")]
        lines.append(f"| {name} | {r['batch']} | {r['concurrency']} | {_f(r['images_per_s'])} | "
                     f"{_f(r['p50_ms'], '{:.2f}')} | {_f(r['p99_ms'], '{:.2f}')} | {' | '.join(split)} | "
                     f"{r['requests']} | {r['failed']} | {vs_raw} | {vs_b} |")
    lines += ["", "| target | value | threshold | pass | measured as |", "|---|---:|---|---|---|"]
    for t in results["targets"]:
        v = t["value"]
        vs = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        ok = "-" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['target']} | {vs} | {t['threshold']} | {ok} | {t['detail']} |")
    tk = results.get("tasks", {})
    lines += ["", (f"Memory (RSS of the munet server's worker process): {_mb(results.get('rss_server_0_tasks', {}).get('rss'))}"
              f" with no task, {_mb(results.get('rss_server_1_task', {}).get('rss'))} with 1 task, "
              f"{_mb(results.get('rss_server_10_tasks', {}).get('rss'))} with {tk.get('count', '?')} tasks "
              f"({tk.get('distinct_trunks', '?')} distinct trunk(s), {tk.get('distinct_heads', '?')} heads; "
              f"ONNX sessions {_f(results.get('sessions_1_task'), '{:.0f}')} -> "
              f"{_f(results.get('sessions_10_tasks'), '{:.0f}')})"
              + (f"; {_mb(results['rss_server_10_tasks_restarted'].get('rss'))} with the same {tk.get('count', '?')}"
                 " tasks after a restart (no registration residue: the first registration in a process loads torch "
                 "training state and data that stay resident)" if results.get("rss_server_10_tasks_restarted") else "")
              + f". BentoML baseline worker: {_mb(results.get('rss_baseline', {}).get('rss'))}.")]
    p = results.get("promotion")
    if p:
        lines += ["", (f"Promotion under steady load ({p['rate_requested']:g} requests/s requested, "
                  f"{p['rate_achieved']:.0f} achieved): task {p['task']} v{p['version_before']} -> "
                  f"v{p['version_after']} ({'promoted' if p['promoted'] else 'NOT promoted'}"
                  f"{': ' + p['generation_error'] if p['generation_error'] else ''}); TriggerEvolution took "
                  f"{p['trigger_seconds']:.1f} s; {p['requests']} requests, {p['failed']} failed"
                  f"{' ' + json.dumps(p['errors']) if p['errors'] else ''}; longest gap between successful responses "
                  f"{_f(p['max_gap_ms'])} ms (before the trigger {_f(p['max_gap_before_trigger_ms'])} ms); "
                  f"p50/p99 {_f(p['p50_ms_before_trigger'], '{:.2f}')}/{_f(p['p99_ms_before_trigger'], '{:.2f}')} ms "
                  f"before, {_f(p['p50_ms_during_trigger'], '{:.2f}')}/{_f(p['p99_ms_during_trigger'], '{:.2f}')} ms "
                  f"during the generation; max latency during it {_f(p['max_latency_ms_during_trigger'])} ms, "
                  f"within 0.5 s of the swap {_f(p['max_latency_ms_near_swap'])} ms; new version first answered "
                  f"{_f(p['new_version_first_seen_s_after_trigger'], '{:.2f}')} s after the trigger."),
                  "", "| evolution | requests | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|",
                  (f"| idle | {p.get('requests_before_trigger', '-')} | {_f(p['p50_ms_before_trigger'], '{:.2f}')} | "
                   f"{_f(p['p99_ms_before_trigger'], '{:.2f}')} | {_f(p.get('max_latency_ms_before_trigger'))} |"),
                  (f"| running a generation | {p.get('requests_during_trigger', '-')} | "
                   f"{_f(p['p50_ms_during_trigger'], '{:.2f}')} | {_f(p['p99_ms_during_trigger'], '{:.2f}')} | "
                   f"{_f(p['max_latency_ms_during_trigger'])} |")]
    lines += ["", ("Rows compare with raw ORT at the same batch size; concurrent single-image rows compare with raw "
              "batch 64 (the most a batching server can reach). Client processes share the machine's cores with "
              "the server. Queue / compute / overhead: medians of the server's own split of each request "
              "(Triton's: waiting for its batch, inside ONNX Runtime, the rest of the server's time), read off "
              "the /metrics histograms.")]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    jp, mp_ = out_dir / f"serve-{stamp}.json", out_dir / f"serve-{stamp}.md"

    def default(o: Any) -> Any:
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    jp.write_text(json.dumps(results, indent=2, default=default) + "\n")
    mp_.write_text(markdown(results))
    return jp, mp_


# ---- CLI ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="munet bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows and small tasks: a < 60 s smoke run")
    p.add_argument("--duration", type=float, help="seconds per measured row (default 8, quick 1)")
    p.add_argument("--client-procs", type=int, help="client processes for concurrent rows (default 2)")
    p.add_argument("--inflight", type=int, help="requests in flight per client process (default 8)")
    p.add_argument("--tasks", type=int, help="tasks for the mixed row (default 10)")
    p.add_argument("--max-examples", type=int, help="examples per registered task (default 300, quick 120)")
    p.add_argument("--promotion-rate", type=float, help="requests/s during the promotion (default 100)")
    p.add_argument("--root", help="root the tasks grow from (default mobilenet_v2_imagenet; `munet roots list`)")
    p.add_argument("--out", default="bench-results", help="results folder (default bench-results)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temporary store, logs and merged model")
    p.add_argument("--server-config", action="append", default=[], metavar="FIELD=VALUE",
                   help="munet server setting, e.g. max_delay_ms=0 (repeatable; becomes MUNET_FIELD)")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for name, attr in (("duration", "duration_s"), ("client_procs", "client_procs"), ("inflight", "inflight"),
                       ("tasks", "tasks"), ("max_examples", "max_examples"), ("promotion_rate", "promotion_rate")):
        if getattr(a, name) is not None:
            overrides[attr] = getattr(a, name)
    server_env = {}
    for item in a.server_config:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            p.error(f"--server-config wants FIELD=VALUE, got {item!r}")
        server_env[f"MUNET_{k.strip().upper()}"] = v.strip()
    if a.root:
        overrides["root"] = a.root
    overrides.update(out_dir=None if a.no_write else a.out, keep=a.keep, server_env=server_env)
    return (Settings.quick_settings(**overrides) if a.quick else Settings(**overrides)), a


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise SystemExit, so every `finally` that stops a process runs."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(list(sys.argv[1:] if argv is None else argv))
    with _sigterm_as_exit():
        try:
            results = run_bench(settings)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(markdown(results))
    if settings.out_dir:
        jp, mdp = write_results(results, Path(settings.out_dir))
        print(f"wrote {jp} and {mdp}", file=sys.stderr)
    failed = [t["target"] for t in results["targets"] if t["passed"] is False]
    if failed:
        print(f"targets not met: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
