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
3. a plain BentoML service (`benchmarks.bentoml_baseline`) serving the merged model with adaptive
   batching, JSON requests, the same three load patterns.
4. ten tasks sharing the root trunk (each its own head), mixed single-image load, and the server's
   RSS with one task vs ten.
5. a promotion under steady load: the incumbent's stored score is set to 0 so any candidate wins,
   TriggerEvolution(wait) runs while clients keep a steady rate; failed requests and the longest
   gap between successful responses are reported.

Load comes from separate client processes (multiprocessing, spawn) on loopback, each bounded by a
duration and a request count. Every process this bench starts is stopped in `finally` blocks.

The modules, by phase: `serve_settings` (what a run measures), `serve_server` (server processes:
start-up, readiness, stopping), `serve_load` (the client processes), `serve_rows` (a row and its
timings), `serve_raw` (1), `serve_metrics` (the server's own split of each row), `serve_baseline` (3),
`serve_promotion` (5), `serve_run` (the phases in order), `serve_report` (targets, table, files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from benchmarks.serve_report import markdown, write_results
from benchmarks.serve_run import run_bench
from benchmarks.serve_settings import Settings


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
