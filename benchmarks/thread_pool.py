"""`munet bench thread-pool`: ONNX Runtime's shared spinning pool against a pool per session.

    munet bench thread-pool          # ~1 min: the ImageNet root at 96 px, one task

ONNX Runtime's shared pool is the process's and cannot be undone, so each setting runs in its own
process: an App on a fresh store with one task registered, then (1) the path's joined session and
its chain of sessions in a tight loop, and (2) light traffic, one image every 20 ms (50/s), with an
idle-class torch training loop of two threads beside it (as the evolution worker runs), reporting
the serving process's CPU time per second and the training loop's steps, against the same loop
alone. Printed side by side: what spinning buys (latency) and what it costs (CPU under light load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_TRAIN = r'''
import os, sys, time, torch
os.nice(10)
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
torch.set_num_threads(2)
m = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 32, 3, padding=1))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(16, 32, 24, 24)
end, n = time.time() + float(sys.argv[1]), 0
while time.time() < end:
    opt.zero_grad(); m(x).square().mean().backward(); opt.step(); n += 1
print(n)
'''


def _p50(fn, n: int) -> float:
    import numpy as np

    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return float(np.median(lat) * 1000)


def measure(shared: bool, root: str, runs: int, seconds: float) -> dict:
    """One setting, in this process (which must not have made an ONNX Runtime session yet)."""
    import tempfile

    import numpy as np

    from munet.app import App
    from munet.config import Config
    from munet.service.core import TaskSpec

    with tempfile.TemporaryDirectory(prefix="munet-bench-pool-") as tmp:
        app = App.build(Config(home=Path(tmp) / "home", root=root, demo_task=False, scheduler_enabled=False,
                               providers=["CPUExecutionProvider"], access_log=False, shared_thread_pool=shared))
        app.start()
        app.core.register_task(TaskSpec(name="pool", builtin="uci_digits", max_examples=200))
        path = app.core.runtime.get("pool")
        x = np.zeros((1, 3, path.image_size, path.image_size), np.float32)
        for _ in range(100):
            path.run(x)
            path.run_chain(x)
        joined, chain = _p50(lambda: path.run(x), runs), _p50(lambda: path.run_chain(x), runs)
        train = subprocess.Popen([sys.executable, "-c", _TRAIN, str(seconds)], stdout=subprocess.PIPE, text=True)
        lat, cpu0, t0 = [], time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            path.run(x)
            lat.append(time.perf_counter() - t)
            time.sleep(max(0.0, 0.02 - (time.perf_counter() - t)))
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - t0)
        steps = int(train.communicate()[0].strip())
    return {"shared": shared, "joined_ms": joined, "chain_ms": chain, "light_p50_ms": float(np.median(lat) * 1000),
            "cpu_per_s": cpu, "train_steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench thread-pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="mobilenet_v2_imagenet")
    p.add_argument("--runs", type=int, default=800, help="tight-loop runs per measurement")
    p.add_argument("--seconds", type=float, default=8.0, help="length of the light-traffic phase")
    p.add_argument("--one", choices=["shared", "per-session"], help=argparse.SUPPRESS)  # a child's setting
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one == "shared", a.root, a.runs, a.seconds)))
        return 0
    alone = int(subprocess.run([sys.executable, "-c", _TRAIN, str(a.seconds)], capture_output=True, text=True,
                               check=True).stdout.strip())
    rows = []
    for mode in ("per-session", "shared"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.thread_pool", "--root", a.root, "--runs", str(a.runs),
                              "--seconds", str(a.seconds), "--one", mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    per, shared = rows
    print(f"munet bench thread-pool ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, root {a.root}, "
          f"{a.runs} runs per loop, {a.seconds:g} s of 50 images/s)\n")
    print("| measured | a pool per session, no spinning | one shared pool, spinning | shared / per session |")
    print("|---|---:|---:|---:|")
    for key, name in (("joined_ms", "lone image, joined session, tight loop (p50 ms)"),
                      ("chain_ms", "lone image, chain of sessions, tight loop (p50 ms)"),
                      ("light_p50_ms", "lone image every 20 ms, training beside (p50 ms)"),
                      ("cpu_per_s", "serving process CPU s per s at 50 images/s"),
                      ("train_steps", f"idle-class training steps beside it (alone: {alone})")):
        fmt = "{:d}" if key == "train_steps" else "{:.2f}"
        print(f"| {name} | {fmt.format(per[key])} | {fmt.format(shared[key])} | {shared[key] / max(per[key], 1e-9):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
