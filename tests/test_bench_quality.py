"""`munet bench quality --quick` end to end: two tiny tasks, three methods, the bit-identity check."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import quality
from benchmarks.quality_settings import METHODS, QUICK_TASKS
from munet.data.builtin import available_builtins
from munet.models.roots import mobilenet_weights_path

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # a hang guard; the run itself takes about a minute on 2 cores
def test_quick_run_reports_every_method_for_every_task(tmp_path):
    # `make setup` installs the root's weights and the data: a missing one is a failure, not a skip
    assert mobilenet_weights_path().is_file()
    missing = [t for t in QUICK_TASKS if t not in available_builtins()]
    assert not missing, f"data not installed (run make setup): {missing}"

    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0

    written = {p.suffix: p for p in tmp_path.iterdir()}
    assert {".json", ".md", ".png"} <= set(written)
    r = json.loads(written[".json"].read_text())
    assert r["tasks"] == QUICK_TASKS
    assert r["root"]["name"] == "mobilenet_v2_imagenet" and r["root"]["image_size"] == 96
    for task in QUICK_TASKS:
        row = r["results"][task]
        for method in METHODS:
            acc = row[method]["test_accuracy"]
            assert isinstance(acc, float) and not math.isnan(acc) and 0.0 <= acc <= 1.0, (task, method, acc)
        # earlier tasks' answers never change: the same version, every probability bit for bit
        ident = row["identity"]
        assert ident["inputs"] > 0 and ident["checked_after"] == QUICK_TASKS[-1]
        assert ident["bit_identical"] is True and ident["max_abs_diff"] == 0.0, (task, ident)
        assert ident["version_now"] == ident["version_then"], (task, ident)
        # parameters per task are the server's own accounting, and a share of the task's path
        munet = row["munet"]
        assert 0 < munet["accounted_params"] <= munet["path_params"], (task, munet)
    assert r["summary"]["identity_checked"] == len(QUICK_TASKS)
    assert r["summary"]["all_bit_identical"] is True
    md = written[".md"].read_text()
    assert "| **average** |" in md and "target met" in md.lower()
