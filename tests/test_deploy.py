"""deploy/: the Grafana dashboard and the Prometheus configuration and alert rules parse, and every
metric they name is one munet/metrics.py exports (with prometheus_client's suffixes). When promtool is
on PATH (or MUNET_PROMTOOL names it; Debian's `prometheus` package has it), the rules, their unit
tests (deploy/prometheus/munet-alerts.test.yml), the scrape configuration and the dashboard's
queries are also checked by Prometheus' own parser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from munet import metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "munet-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "munet-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "munet-alerts.test.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"

# series Prometheus itself adds to every scrape job
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def exported_series() -> set[str]:
    """The series names munet/metrics.py's metrics appear under at /metrics."""
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.update(family.name + s for s in _SUFFIXES[family.type])
    return names


_STRIP = [
    r'"(?:[^"\\]|\\.)*"', r"'(?:[^'\\]|\\.)*'", r"`[^`]*`",  # strings (before braces: they may hold a brace)
    r"\{[^}]*\}",  # label matchers
    r"\[[^\]]*\]",  # ranges and subqueries: [5m], [$__rate_interval], [1h:1m]
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",  # label lists
]
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions or keywords)."""
    e = expr
    for pattern in _STRIP:
        e = re.sub(pattern, " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_metric_names_parser():
    assert metric_names('sum by (le, task) (rate(a_bucket{code!="}", x=~"$task"}[$__rate_interval])) / b') \
        == {"a_bucket", "b"}
    assert metric_names("x > 0.8 * 2048 unless on (task) increase(y_total[6h] offset 1h) > 1e-3") == {"x", "y_total"}
    assert metric_names("absent(up{job='munet'}) and bool histogram_quantile(0.99, z)") == {"up", "z"}
    assert "munet_requests_total" in exported_series() and "munet_requests" not in exported_series()
    assert {"munet_request_latency_seconds_bucket", "munet_queue_depth"} <= exported_series()


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(d: dict) -> list[str]:
    return [t["expr"] for p in _panels(d) for t in p.get("targets", [])]


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _check_names(exprs: list[str], where: str) -> set[str]:
    known = exported_series() | PROMETHEUS_SERIES
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{where}: {sorted(unknown)} in {expr!r} are not exported by munet/metrics.py"
        used |= names
    return used


def test_dashboard_is_an_importable_grafana_dashboard():
    d = _dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"] and d["id"] is None
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["type"] == "datasource" and d["__inputs"][0]["pluginId"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = _panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    required_types = {r["id"] for r in d["__requires"] if r["type"] == "panel"}
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["type"] in required_types, f"{p['type']} missing from __requires"
        assert p["datasource"] == ds and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
    for v in d["templating"]["list"]:
        assert v["datasource"] == ds
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", query)
        assert m, query
        _check_names([m.group(1)], f"variable {v['name']}")


def test_dashboard_queries_name_exported_metrics_and_cover_the_brief():
    used = _check_names(dashboard_exprs(_dashboard()), "dashboard")
    # request rate and errors, latency, the time split, queue depth, batch size, sessions, versions,
    # evolution generations/candidates/promotions, paused-for-load
    for name in ["munet_requests_total", "munet_request_latency_seconds_bucket", "munet_request_queue_seconds_sum",
                 "munet_request_compute_seconds_sum", "munet_request_overhead_seconds_sum", "munet_queue_depth",
                 "munet_batch_size_bucket", "munet_module_sessions", "munet_path_version",
                 "munet_evolution_generations_total", "munet_evolution_candidates_total",
                 "munet_evolution_promotions_total", "munet_evolution_paused_for_load"]:
        assert name in used, f"the dashboard shows no {name}"


def test_alert_rules_parse_and_name_exported_metrics():
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smhd]", r["for"]), r["alert"]
    _check_names([r["expr"] for r in rules], "alerts")
    by_name = {r["alert"]: r["expr"] for r in rules}
    # the brief: no promotion in N hours while generations run, failed promotions, queue saturation,
    # error rate, server down
    assert {"munet_evolution_generations_total", "munet_evolution_promotions_total"} <= metric_names(
        by_name["MunetNoPromotion"])
    assert 'outcome="failed"' in by_name["MunetPromotionFailed"]
    assert "munet_queue_depth" in metric_names(by_name["MunetQueueSaturated"])
    assert 'code="RESOURCE_EXHAUSTED"' in by_name["MunetRequestsRefused"]
    assert 'code!="OK"' in by_name["MunetHighErrorRate"]
    assert metric_names(by_name["MunetDown"]) == {"up"}


def test_scrape_config_loads_the_rules_and_matches_their_job():
    cfg = yaml.safe_load(SCRAPE.read_text())
    for f in cfg["rule_files"]:
        assert (SCRAPE.parent / f).is_file(), f
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["munet"]["metrics_path"] == "/metrics"
    for r in _alert_rules():
        for job in re.findall(r'job="([^"]+)"', r["expr"]):
            assert job in jobs, f"{r['alert']} selects job {job!r}, which prometheus.yml does not scrape"
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in _alert_rules()}, "every alert has a unit test"


def _promtool() -> str:
    local = Path(__file__).resolve().parent.parent / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
    tool = os.environ.get("MUNET_PROMTOOL") or (str(local) if local.exists() else None) or shutil.which("promtool")
    if not tool:
        pytest.skip("promtool not found: `make setup` unpacks it into .tools/ (or MUNET_PROMTOOL=/path/to/promtool)")
    return tool


def _run(*cmd: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_checks_config_rules_and_their_unit_tests():
    tool = _promtool()
    _run(tool, "check", "config", str(SCRAPE))  # also checks the rule files it names
    _run(tool, "check", "rules", str(ALERTS))
    _run(tool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)


def test_promtool_parses_every_dashboard_query(tmp_path):
    tool = _promtool()
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(dashboard_exprs(_dashboard())):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables: all values
        rules.append({"record": f"munet:dashboard_query_{i}", "expr": expr})
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(tool, "check", "rules", str(f))
