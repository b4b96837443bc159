"""The munet server's own view of a row, read off its Prometheus /metrics before and after: batch sizes,
tasks per batch, sessions, providers and the queue / compute / overhead split of a request's time."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.serve_server import http_ok

SPLIT_PARTS = ("queue", "compute", "overhead", "decode")


def scrape_metrics(http_port: int) -> dict[str, Any]:
    """The munet server's Prometheus metrics that describe batching, sessions and providers."""
    try:
        text = http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=5.0).decode()
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


def split_stats(before: dict, after: dict) -> dict[str, float]:
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


def batch_stats(before: dict, after: dict) -> dict[str, float]:
    out = {}
    n = after.get("munet_batch_size_count", 0) - before.get("munet_batch_size_count", 0)
    if n > 0:
        out["server_batches"] = int(n)
        out["server_mean_batch"] = (after.get("munet_batch_size_sum", 0)
                                    - before.get("munet_batch_size_sum", 0)) / n
        out["server_mean_tasks_per_batch"] = (after.get("munet_batch_tasks_sum", 0)
                                              - before.get("munet_batch_tasks_sum", 0)) / n
    return out
