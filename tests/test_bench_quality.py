"""`munet bench quality --quick` end to end: two tiny tasks, three methods, the bit-identity check."""

from __future__ import annotations

import json
import math

import pytest

from munet.bench import quality
from munet.data.builtin import available_builtins
from munet.models.roots import mobilenet_weights_path

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # a hang guard; the run itself takes about a minute on 2 cores
def test_quick_run_reports_every_method_for_every_task(tmp_path):
    # `make setup` installs the root's weights and the data: a missing one is a failure, not a skip
    assert mobilenet_weights_path().is_file()
    missing = [t for t in quality.QUICK_TASKS if t not in available_builtins()]
    assert not missing, f"data not installed (run make setup): {missing}"

    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0

    written = {p.suffix: p for p in tmp_path.iterdir()}
    assert {".json", ".md", ".png"} <= set(written)
    r = json.loads(written[".json"].read_text())
    assert r["tasks"] == quality.QUICK_TASKS
    assert r["root"]["name"] == "mobilenet_v2_imagenet" and r["root"]["image_size"] == 96
    for task in quality.QUICK_TASKS:
        row = r["results"][task]
        for method in quality.METHODS:
            acc = row[method]["test_accuracy"]
            assert isinstance(acc, float) and not math.isnan(acc) and 0.0 <= acc <= 1.0, (task, method, acc)
        assert row["identity"]["bit_identical"] is True, task  # earlier tasks' answers never change
        assert row["identity"]["inputs"] > 0
    assert r["summary"]["identity_checked"] == len(quality.QUICK_TASKS)
    md = written[".md"].read_text()
    assert "| **average** |" in md and "target met" in md.lower()
