"""One `munet bench serve` run: the munet server started on a fresh store, every phase in order, and
every process it started stopped in `finally` blocks, whatever happened."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, free_port, log, machine_info
from benchmarks.serve_baseline import baseline_rows, start_baseline
from benchmarks.serve_floor import NullServer
from benchmarks.serve_load import ClientPool
from benchmarks.serve_metrics import batch_stats, scrape_metrics, split_stats
from benchmarks.serve_promotion import promotion_under_load
from benchmarks.serve_raw import raw_rows
from benchmarks.serve_report import targets
from benchmarks.serve_rows import Row, finish_rows, row_from_clients
from benchmarks.serve_server import ServerProcess, worker_rss
from benchmarks.serve_settings import Settings

TASK_PREFIX = "bench-t"


def _log(msg: str) -> None:
    log("serve", msg)


def _root_env(settings: Settings) -> dict[str, str]:
    from munet.models.roots import RootUnavailable, get_root_spec

    try:
        spec = get_root_spec(settings.root)
        spec.load()  # fails now, with the reason, if its weights are not installed
    except RootUnavailable as e:
        raise BenchError(str(e)) from None
    return {"MUNET_ROOT": settings.root}


def grpc_payloads(tasks: list[str], images: np.ndarray) -> list[bytes]:
    from munet.client import raw_image
    from munet.v1 import munet_pb2 as pb

    return [pb.PredictRequest(task=t, images=[raw_image(im) for im in images], top_k=1).SerializeToString()
            for t in tasks]


def run_bench(settings: Settings) -> dict:
    """Run every phase; returns the results dict (rows, targets, promotion, memory, machine).

    The client processes are spawned: a script calling this needs the `if __name__ == "__main__":`
    guard, as with any multiprocessing code.
    """
    import onnxruntime as ort

    from munet.client import MunetClient

    t_begin = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="munet-bench-serve-"))
    home = tmp / "home"
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(onnxruntime=ort.__version__),
                               "tmp": str(tmp)}
    rows: dict[str, Row] = {}
    servers: list[ServerProcess] = []
    pool: ClientPool | None = None
    store = None
    client = None
    ok = False
    s = settings
    try:
        grpc_port, http_port = free_port(), free_port()
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
        results["rss_server_0_tasks"] = worker_rss(munet.worker())

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

        # ---- 1. raw ONNX Runtime in this process ------------------------------------------
        from munet.models.store import Store

        store = Store(home)
        merged_path = tmp / "merged.onnx"
        raw, providers = raw_rows(s, store, cfg, tasks[0], images, merged_path, results)
        rows.update(raw)
        _log(f"raw ORT: path of {len(results['path']['modules'])} sessions and one merged model "
            f"(parity {results['path']['merged_parity_max_abs']:.1e})")

        # ---- 2. munet-serve over gRPC, one task --------------------------------------------
        p1 = grpc_payloads([tasks[0]], images[:1])
        p64 = grpc_payloads([tasks[0]], images)
        common = {"proto": "grpc", "target": target, "duration": s.duration_s, "warmup": s.warmup,
                  "timeout": s.request_timeout_s}

        def grpc_row(key: str, name: str, n: int, payloads: list[bytes], batch: int, inflight: int,
                     ref_raw: str, ref_bentoml: str) -> Row:
            before = scrape_metrics(http_port)
            start_at, res = pool.run(n, payloads, images=batch, inflight=inflight, **common)
            after = scrape_metrics(http_port)
            stats = {**batch_stats(before, after), **split_stats(before, after)}
            return row_from_clients(key, name, batch, n * inflight, start_at, res, ref_raw=ref_raw,
                                    ref_bentoml=ref_bentoml, extra=stats)

        with NullServer(1) as floor_target:
            start_at, res = pool.run(1, p1, **{**common, "target": floor_target}, images=1, inflight=1)
        rows["grpc_floor_b1"] = row_from_clients("grpc_floor_b1", "gRPC floor: a server answering at once, no "
                                                 "model, 1 sequential client", 1, 1, start_at, res)
        ref_b1 = "raw_joined_b1" if cfg.merged_max_batch >= 1 else "raw_chain_b1"
        rows["grpc_b1"] = grpc_row("grpc_b1", "munet gRPC unary, 1 sequential client", 1, p1, 1, 1,
                                   ref_b1, "bento_b1")
        rows["grpc_b64"] = grpc_row("grpc_b64", "munet gRPC unary, 1 sequential client", 1, p64, s.big_batch, 1,
                                    "raw_chain_b64", "bento_b64")
        rows["grpc_conc"] = grpc_row("grpc_conc", f"munet gRPC, {s.client_procs} procs x {s.inflight} in flight, "
                                     "1 task", s.client_procs, p1, 1, s.inflight, "raw_chain_b64", "bento_conc")
        _log("gRPC single-task rows done")
        metrics_1 = scrape_metrics(http_port)
        results["providers"]["munet_server"] = metrics_1.get("providers", [])
        results["rss_server_1_task"] = worker_rss(munet.worker())
        results["sessions_1_task"] = metrics_1.get("munet_module_sessions")

        # ---- 3 (start) + 4 (register): the baseline starts while nine more tasks register --------
        baseline, base_url = start_baseline(merged_path, size, cfg.intra_op_threads, providers, tmp)
        servers.append(baseline)
        t0 = time.monotonic()
        for i, t in enumerate(tasks[1:], start=1):
            client.register_task(t, builtin="uci_digits", max_examples=s.max_examples, seed=i)
        _log(f"registered {len(tasks) - 1} more tasks in {time.monotonic() - t0:.1f} s")
        paths = {t.name: [m.id for m in t.path.modules] for t in client.list_tasks() if t.name in tasks}
        trunks = {tuple(m[:-1]) for m in paths.values()}
        heads = {m[-1] for m in paths.values()}
        results["tasks"] = {"count": len(paths), "distinct_trunks": len(trunks), "distinct_heads": len(heads),
                            "modules_per_path": len(paths[tasks[0]])}

        # ---- 3. the BentoML baseline ----------------------------------------------------------
        rows.update(baseline_rows(s, pool, baseline, base_url, images, results))
        baseline.stop()
        _log("BentoML baseline rows done")

        # ---- 4. ten tasks, mixed -----------------------------------------------------------------
        # one task again first, now that ten are registered: the like-for-like comparison for the mixed
        # row (the server process has changed since the first single-task row: registrations, baseline)
        rows["grpc_conc_10"] = grpc_row("grpc_conc_10", f"munet gRPC, {s.client_procs} procs x {s.inflight} in "
                                        f"flight, 1 of {len(tasks)} tasks", s.client_procs, p1, 1, s.inflight,
                                        "raw_chain_b64", "bento_conc")
        pmix = grpc_payloads(tasks, images[:1])
        rows["grpc_mixed"] = grpc_row("grpc_mixed", f"munet gRPC, {s.client_procs} procs x {s.inflight} in flight, "
                                      f"{len(tasks)} tasks mixed", s.client_procs, pmix, 1, s.inflight,
                                      "raw_chain_b64", "bento_conc")
        metrics_10 = scrape_metrics(http_port)
        results["rss_server_10_tasks"] = worker_rss(munet.worker())
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
            results["rss_server_10_tasks_restarted"] = worker_rss(munet.worker())
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
