"""`munet bench serve`'s report: the targets judged on the results, the markdown table, the files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np


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
    if "grpc_b1" in rows and rows["grpc_b1"].get("ref_raw") in rows:
        ref = rows["grpc_b1"]["ref_raw"]
        d = rows["grpc_b1"]["p50_ms"] - rows[ref]["p50_ms"]
        what = "joined session" if ref == "raw_joined_b1" else "chain"
        floor = rows.get("grpc_floor_b1", {}).get("p50_ms")
        add("unary p50 overhead (ms)", d, "<= 1.0", d <= 1.0,
            f"gRPC unary batch 1 p50 - raw ORT batch 1 p50 of what the server runs (the path's {what})"
            + (f"; of it, {floor:.2f} ms is the gRPC floor (a server that answers at once)" if floor else ""))
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
