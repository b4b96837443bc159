"""`munet bench hot-path`: where a single image's time goes between a gRPC client and ONNX Runtime.

    munet bench hot-path            # ~1 min: the ImageNet root at 96 px, one task

One process holds the server (App + gRPC on loopback, as `munet serve` runs them, without BentoML);
a client process sends single raw images one after another. Printed, side by side in one run:

- the client's p50 latency;
- the server's time inside ONNX Runtime per request (the batcher's `run_grouped`), while serving;
- the same path run in a tight loop in the same process (as the server runs a lone image: its joined
  session, or its chain when it has none): with warm caches, and with 32 MB streamed
  through the caches before each run (what the client, gRPC and the event loop do between two
  requests on a 2-core machine); and as the chain of one session per module, warm.

The difference between warm and polluted says how much of "compute is slower in the server" is caches.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CLIENT = r'''
import sys, time, numpy as np
from munet.client import MunetClient
c = MunetClient(sys.argv[1], timeout=10)
x = [np.zeros((int(sys.argv[3]), int(sys.argv[3]), 3), np.uint8)]
for _ in range(100): c.predict("hot", x)
lat = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); c.predict("hot", x); lat.append(time.perf_counter() - t)
print(np.median(lat) * 1000)
'''


def _p50(fn, n: int, between=None) -> float:
    lat = []
    for _ in range(n):
        if between is not None:
            between()
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return float(np.median(lat) * 1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench hot-path", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="mobilenet_v2_imagenet")
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads per session (0: one per core)")
    a = p.parse_args(argv)

    import munet.service.batching as batching
    from munet.app import App
    from munet.config import Config
    from munet.service.core import TaskSpec

    compute: list[float] = []
    run_grouped = batching.run_grouped

    def timed(items):
        t = time.perf_counter()
        out = run_grouped(items)
        compute.append(time.perf_counter() - t)
        return out

    batching.run_grouped = timed
    with tempfile.TemporaryDirectory(prefix="munet-bench-hot-") as tmp:
        cfg = Config(home=Path(tmp) / "home", root=a.root, demo_task=False, scheduler_enabled=False,
                     providers=["CPUExecutionProvider"], access_log=False, intra_op_threads=a.intra_op_threads)
        app = App.build(cfg)
        app.start()
        app.core.register_task(TaskSpec(name="hot", builtin="uci_digits", max_examples=200))
        import asyncio
        import threading

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        port = asyncio.run_coroutine_threadsafe(app.start_grpc("127.0.0.1:0"), loop).result(60)
        path = app.core.runtime.get("hot")
        size = path.image_size
        out = subprocess.run([sys.executable, "-c", _CLIENT, f"127.0.0.1:{port}", str(a.requests), str(size)],
                             capture_output=True, text=True, check=True)
        client_p50 = float(out.stdout.strip())
        serving = float(np.median(compute[-a.requests:]) * 1000)
        x = np.zeros((1, 3, size, size), np.float32)
        junk = np.ones(8 << 20, np.float32)

        def pollute() -> None:
            np.add(junk, 1.0, out=junk)

        for _ in range(50):
            path.run(x)
        hot = _p50(lambda: path.run(x), a.requests)
        cold = _p50(lambda: path.run(x), a.requests, between=pollute)
        chain = _p50(lambda: path.run_chain(x), a.requests)
        asyncio.run_coroutine_threadsafe(app.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    print(f"munet bench hot-path ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, root {a.root} at {size} px, "
          f"{len(path.module_ids)} modules, {'one joined session' if path.merged is not None else 'a chain of sessions'} "
          f"for a lone image, intra-op threads {a.intra_op_threads or 'default'}, {a.requests} requests)\n")
    print("| measured | p50 ms |\n|---|---:|")
    print(f"| client round trip (gRPC unary, one raw image) | {client_p50:.2f} |")
    print(f"| server: inside ONNX Runtime per request, while serving | {serving:.2f} |")
    print(f"| same path, tight loop in the same process (warm caches) | {hot:.2f} |")
    print(f"| same path, tight loop, 32 MB through the caches before each run | {cold:.2f} |")
    print(f"| same path as the chain of one session per module, tight loop (warm caches) | {chain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
