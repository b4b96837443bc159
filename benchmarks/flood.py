"""`munet bench flood`: does a flood on one task get refused at once while another task keeps its latency,
and does the server's memory stay bounded?

    munet bench flood                  # starts `munet serve` on a temporary store, 60 s of flood

Two tasks on one server. `--flooders` client processes each keep `--inflight` Predict requests of
`--batch` images in flight on the hot task for `--duration` seconds, as fast as answers come back; one
more process sends single-image requests to the cold task at a steady rate and records their latency.
Reported: the cold task's p50/p99/max latency idle (before) and during the flood, how many flood
requests were answered, refused with RESOURCE_EXHAUSTED, or failed otherwise, and the server worker's
RSS before, during (peak) and after the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HOT, COLD = "flood-hot", "flood-cold"


def _flooder(target: str, batch: int, inflight: int, duration: float, size: int, out: mp.Queue) -> None:
    import grpc

    from munet.v1 import munet_pb2 as pb
    from munet.v1 import munet_pb2_grpc as pb_grpc

    img = pb.Image(raw=pb.RawImage(data=bytes(size * size * 3), height=size, width=size, channels=3))
    req = pb.PredictRequest(task=HOT, images=[img] * batch)
    counts: dict[str, int] = {}

    async def main() -> None:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.MunetStub(ch)
            end = time.monotonic() + duration

            async def worker() -> None:
                while time.monotonic() < end:
                    try:
                        await stub.Predict(req, timeout=30)
                        code = "OK"
                    except grpc.aio.AioRpcError as e:
                        code = e.code().name
                    counts[code] = counts.get(code, 0) + 1

            await asyncio.gather(*(worker() for _ in range(inflight)))

    asyncio.run(main())
    out.put(counts)


def _prober(target: str, rate: float, duration: float, out: mp.Queue) -> None:
    from munet.client import MunetClient

    lat, errors = [], 0
    with MunetClient(target, timeout=10) as c:
        x = [np.zeros((8, 8), np.uint8)]
        end, k, t0 = time.monotonic() + duration, 0, time.monotonic()
        while time.monotonic() < end:
            due = t0 + k / rate
            k += 1
            time.sleep(max(0.0, due - time.monotonic()))
            s = time.perf_counter()
            try:
                c.predict(COLD, x)
                lat.append(time.perf_counter() - s)
            except Exception:  # noqa: BLE001 - counted
                errors += 1
    out.put({"latencies_ms": [v * 1000 for v in lat], "errors": errors})


def _stats(ms: list[float]) -> dict:
    a = np.array(ms) if ms else np.array([float("nan")])
    return {"n": len(ms), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def run(a: argparse.Namespace) -> dict:
    import psutil

    from benchmarks.fuzz import _start_server
    from munet.client import MunetClient

    home = Path(tempfile.mkdtemp(prefix="munet-flood-"))
    proc, target, _ = _start_server(home)  # registers fuzz-target; we add our two tasks
    try:
        with MunetClient(target, long_timeout=300) as c:
            c.register_task(HOT, builtin="uci_digits", max_examples=300)
            c.register_task(COLD, builtin="uci_digits", max_examples=300, seed=1)
            size = c.get_task(HOT).image_size
        worker = max(psutil.Process(proc.pid).children(recursive=True), key=lambda p: p.memory_info().rss)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        rss = {"before_mb": worker.memory_info().rss >> 20}
        idle = ctx.Process(target=_prober, args=(target, a.rate, a.idle_s, q))
        idle.start()
        idle_res = q.get(timeout=a.idle_s + 60)
        idle.join()
        peak = [rss["before_mb"]]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak.append(worker.memory_info().rss >> 20)
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        procs = [ctx.Process(target=_flooder, args=(target, a.batch, a.inflight, a.duration, size, q))
                 for _ in range(a.flooders)]
        procs.append(ctx.Process(target=_prober, args=(target, a.rate, a.duration, q)))
        for p in procs:
            p.start()
        results = [q.get(timeout=a.duration + 120) for _ in procs]
        for p in procs:
            p.join(30)
        stop.set()
        time.sleep(2.0)
        rss.update(peak_mb=max(peak), after_mb=worker.memory_info().rss >> 20)
        flood: dict[str, int] = {}
        probe = None
        for r in results:
            if "latencies_ms" in r:
                probe = r
            else:
                for k, v in r.items():
                    flood[k] = flood.get(k, 0) + v
        assert probe is not None
        return {"settings": vars(a), "image_size": size, "flood_requests": flood,
                "cold_idle": {**_stats(idle_res["latencies_ms"]), "errors": idle_res["errors"]},
                "cold_during_flood": {**_stats(probe["latencies_ms"]), "errors": probe["errors"]},
                "worker_rss": rss}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of flood")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds of cold-task probing before the flood")
    p.add_argument("--flooders", type=int, default=8, help="flooding client processes")
    p.add_argument("--inflight", type=int, default=16, help="requests each keeps in flight")
    p.add_argument("--batch", type=int, default=64, help="images per flood request")
    p.add_argument("--rate", type=float, default=20.0, help="cold-task requests per second")
    a = p.parse_args(argv)
    r = run(a)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
