"""A row of `munet bench serve`: throughput and client-side latency of one load pattern, measured from
client processes' timings or in this process, and its ratios to the raw ONNX Runtime and BentoML rows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


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
               pct(lat, 50), pct(lat, 99), len(ok), int((~ok).sum()), extra=extra, **kw)


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
    return Row(key, name, len(x), 1, len(lat) * len(x) / elapsed, pct(a, 50), pct(a, 99), len(lat), 0)


def finish_rows(rows: dict[str, Row]) -> list[dict]:
    for r in rows.values():
        ref = rows.get(r.ref_raw)
        if ref is not None and ref.images_per_s > 0:
            r.vs_raw = r.images_per_s / ref.images_per_s
        b = rows.get(r.ref_bentoml)
        if b is not None and b.images_per_s > 0:
            r.vs_bentoml = r.images_per_s / b.images_per_s
    return [asdict(r) for r in rows.values()]
