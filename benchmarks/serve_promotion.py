"""Row 5 of `munet bench serve`: a promotion under steady load. The incumbent's stored score drops below
any candidate's, TriggerEvolution(wait) runs while clients keep a steady rate; reported: failed
requests, the longest gap between answers, latency before and during the generation and near the swap."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.serve_load import ClientPool
from benchmarks.serve_rows import pct
from benchmarks.serve_settings import Settings


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
        "p50_ms_before_trigger": pct(lat[oks & (ends < t_a)], 50),
        "p99_ms_before_trigger": pct(lat[oks & (ends < t_a)], 99),
        "p50_ms_during_trigger": pct(lat[oks & during_sel], 50),
        "p99_ms_during_trigger": pct(lat[oks & during_sel], 99),
        "max_latency_ms_during_trigger": float(lat[during_sel].max()) if during_sel.any() else float("nan"),
        "max_latency_ms_near_swap": float(lat[near_swap].max()) if near_swap.any() else float("nan"),
        "new_version_first_seen_s_after_trigger": round(first_new - t_a, 2) if first_new is not None else None,
        "versions_seen": sorted({int(v) for v in versions[oks]}),
    }
    return out
