"""Row 3 of `munet bench serve`: the same path served the way one would without munet, a plain BentoML
service (`benchmarks.bentoml_baseline`) over the merged model, JSON requests, the same three loads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import free_port
from benchmarks.serve_load import ClientPool
from benchmarks.serve_rows import Row, row_from_clients
from benchmarks.serve_server import ServerProcess, http_ok, worker_rss
from benchmarks.serve_settings import Settings

# the checkout that holds `benchmarks`: BentoML imports the service (in its arbiter and in each fresh worker
# interpreter) from its working directory, whatever the bench's own current directory is
REPO = Path(__file__).resolve().parent.parent


def start_baseline(merged_path: Path, size: int, intra_op_threads: int, providers: list[str],
                   tmp: Path) -> tuple[ServerProcess, str]:
    """Start the baseline (it loads while the bench goes on); returns it and its base URL."""
    port = free_port()
    env = {**os.environ, "MUNET_BASELINE_ONNX": str(merged_path), "MUNET_BASELINE_SIZE": str(size),
           "MUNET_BASELINE_INTRA_OP": str(intra_op_threads), "MUNET_BASELINE_PROVIDERS": ",".join(providers),
           "BENTOML_HOME": str(tmp / "bentoml-baseline"), "BENTOML_DO_NOT_TRACK": "True"}
    baseline = ServerProcess("BentoML baseline", [sys.executable, "-m", "bentoml", "serve",
                                                  "benchmarks.bentoml_baseline:Baseline", "--working-dir", str(REPO),
                                                  "--host", "127.0.0.1", "--port", str(port)],
                             env, tmp / "baseline.log")
    baseline.start()
    return baseline, f"http://127.0.0.1:{port}"


def _json_payload(images: np.ndarray) -> bytes:
    return json.dumps({"x": images.tolist()}, separators=(",", ":")).encode()


def baseline_rows(s: Settings, pool: ClientPool, baseline: ServerProcess, base_url: str, images: np.ndarray,
                  results: dict[str, Any]) -> dict[str, Row]:
    """Wait for the baseline, measure its rows and its worker's memory."""
    baseline.wait_ready(lambda: bool(http_ok(base_url + "/readyz")), timeout=120)
    info = json.loads(http_ok(base_url + "/info", b"{}", timeout=10))
    results["providers"]["bentoml_baseline"] = info.get("providers", [])[:1]
    results["baseline"] = info
    j1, j64 = [_json_payload(images[:1])], [_json_payload(images)]
    common = {"proto": "http", "target": base_url + "/predict", "duration": s.duration_s, "warmup": s.warmup,
              "timeout": s.request_timeout_s}
    rows = {}
    for key, name, n, payloads, batch, inflight, ref in (
            ("bento_b1", "BentoML baseline, 1 sequential client", 1, j1, 1, 1, "raw_merged_b1"),
            ("bento_b64", "BentoML baseline, 1 sequential client", 1, j64, s.big_batch, 1, "raw_merged_b64"),
            ("bento_conc", f"BentoML baseline, {s.client_procs} procs x {s.inflight} in flight", s.client_procs,
             j1, 1, s.inflight, "raw_merged_b64")):
        start_at, res = pool.run(n, payloads, images=batch, inflight=inflight, **common)
        rows[key] = row_from_clients(key, name, batch, n * inflight, start_at, res, ref_raw=ref)
    results["rss_baseline"] = worker_rss(baseline.worker())
    return rows
