"""`munet bench serve --quick` end to end: every row measured, a clean promotion, nothing left running.

Numbers are not checked against the targets here (this machine is shared and small); only that the
bench completes, reports each row with positive numbers, and loses no request during the promotion.
"""

from __future__ import annotations

import json

import psutil
import pytest

from benchmarks import serve
from munet import cli
from munet.models.roots import mobilenet_weights_path

RAW = {"raw_chain_b1", "raw_chain_b64", "raw_joined_b1", "raw_merged_b1", "raw_merged_b64"}
ROWS = RAW | {"grpc_floor_b1", "grpc_b1", "grpc_b64", "grpc_conc", "bento_b1", "bento_b64", "bento_conc",
              "grpc_conc_10", "grpc_mixed"}


def test_bench_commands_outside_a_checkout_say_where_the_benchmarks_are(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_checkout", lambda: None)
    assert cli.main(["bench", "serve", "--help"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "benchmarks live in the repository's benchmarks/ folder; run from a checkout" in err


def test_bench_commands_in_a_checkout_reach_the_benchmarks(capsys):
    assert cli.main(["bench", "serve", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: munet bench serve")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_bench_serve_end_to_end(tmp_path):
    assert mobilenet_weights_path().is_file()  # installed by `make setup`: missing is a failure
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    assert serve.main(["--quick", "--out", str(tmp_path)]) == 0

    written = sorted(tmp_path.glob("serve-*.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").exists()
    results = json.loads(written[0].read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == ROWS
    for r in rows.values():
        assert r["images_per_s"] > 0, r
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"], r
        assert r["requests"] > 0, r
    for key in ROWS - RAW - {"grpc_floor_b1"}:
        assert rows[key]["vs_raw"] is not None and rows[key]["vs_raw"] > 0, key
    # a lone image is compared with what the server runs for it: the path's joined session
    assert rows["grpc_b1"]["ref_raw"] == "raw_joined_b1"

    p = results["promotion"]
    assert p["promoted"], p
    assert p["version_after"] > p["version_before"]
    assert p["requests"] > 0 and p["failed"] == 0, p
    assert p["max_gap_ms"] > 0

    assert results["rss_server_1_task"]["rss"] > 0 and results["rss_server_10_tasks"]["rss"] > 0
    assert results["tasks"]["count"] == 10 and results["tasks"]["distinct_trunks"] == 1
    assert {t["target"] for t in results["targets"]} >= {"batched gRPC throughput vs raw ORT",
                                                        "unary p50 overhead (ms)",
                                                        "ten mixed tasks vs BentoML baseline",
                                                        "memory, ten tasks vs one",
                                                        "failed requests during promotion"}
    assert all(t["value"] is not None for t in results["targets"])
    for name in ("raw_chain", "raw_joined", "munet_server", "bentoml_baseline"):
        assert results["providers"][name], name
    table = written[0].with_suffix(".md").read_text()
    assert "| row |" in table and "| target |" in table

    # every server and client process the bench started is gone (BentoML workers would be orphans,
    # not our children, if their arbiter died: they are found by the bench's folder in their env)
    # (multiprocessing's resource tracker stays for the life of this process, by design)
    left = [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    tmp = results["tmp"]
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if any(env.get(k, "").startswith(tmp) for k in ("MUNET_HOME", "MUNET_BASELINE_ONNX")):
            pytest.fail(f"process {p.pid} {p.cmdline()} of the bench is still running")
