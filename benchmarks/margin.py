"""`munet bench margin`: how often does validation noise alone promote a version, with and without
the promotion margin?

    munet bench margin                     # ~10 min on 2 cores: two small tasks, 8 generations each

A promotion is only worth its swap if the new version is better on data it was not chosen on. For
each task and each margin setting (`--margins`: `promotion_margin_se`, which scales the winner's
curse of the candidates compared, ~1.03 paired standard errors for the default four; see
scoring.selection_bias_se), a fresh store registers the task the same way and runs the same
seeded generations; every promotion is then judged on the task's test split: a "noise promotion"
is one whose test accuracy is not higher than the version it replaced. Also reported: the binomial
standard error of the validation accuracy the margin is made of, and the spread of validation
accuracy among the candidates of a generation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_one(task: str, builtin: str, max_examples: int, margin_se: float, generations: int, candidates: int,
            steps: int, root: str, home: Path) -> dict:
    from munet.app import App
    from munet.config import Config
    from munet.service.core import TaskSpec

    cfg = Config(home=home, root=root, demo_task=False, scheduler_enabled=False, evolution_process=False,
                 candidates_per_generation=candidates, candidate_budget_s=600.0, candidate_max_steps=steps,
                 promotion_margin_se=margin_se, promotion_min_margin=0.0, gc_min_age_s=0.0,
                 providers=["CPUExecutionProvider"])
    app = App.build(cfg)
    try:
        app.start()
        app.core.register_task(TaskSpec(name=task, builtin=builtin, max_examples=max_examples, seed=0))
        promotions, spreads, ses = [], [], []
        for _ in range(generations):
            before = app.store.get_path(task)
            n_val = app.store.example_counts(task)["validation"]
            p = float(before.validation_accuracy or 0.0)
            ses.append(float(np.sqrt(max(p * (1 - p), 1e-4) / max(1, n_val))))
            rep = app.evolution.evolver.run_generation(task)
            vals = [c.validation_accuracy for c in rep.candidates]
            if len(vals) > 1:
                spreads.append(float(np.std(vals)))
            if rep.promoted:
                after = app.store.get_path(task, rep.promoted_version)
                promotions.append({"from": before.version, "to": after.version,
                                   "validation_gain": float((after.validation_accuracy or 0) - p),
                                   "test_gain": float((after.test_accuracy or 0) - (before.test_accuracy or 0))})
        final = app.store.get_path(task)
        return {"task": task, "margin_se": margin_se, "validation_examples": n_val,
                "promotions": len(promotions),
                "noise_promotions": sum(1 for x in promotions if x["test_gain"] <= 0),
                "mean_validation_se": float(np.mean(ses)), "mean_candidate_validation_std":
                    float(np.mean(spreads)) if spreads else float("nan"),
                "final_test_accuracy": float(final.test_accuracy or 0.0), "detail": promotions}
    finally:
        app.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench margin", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="uci_digits,animal_shapes", help="built-in data sets")
    p.add_argument("--max-examples", type=int, default=600, help="per task (small: a small validation set)")
    p.add_argument("--margins", default="0,1", help="promotion_margin_se values to compare")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="training steps per candidate")
    p.add_argument("--root", default="vit_tiny")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    rows = []
    t0 = time.monotonic()
    for builtin in a.tasks.split(","):
        for m in (float(x) for x in a.margins.split(",")):
            with tempfile.TemporaryDirectory(prefix="munet-bench-margin-") as tmp:
                r = run_one(builtin.replace("_", "-"), builtin, a.max_examples, m, a.generations, a.candidates,
                            a.steps, a.root, Path(tmp) / "home")
            rows.append(r)
            print(f"{builtin} margin {m:g} SE: {r['promotions']} promotions, {r['noise_promotions']} not better on "
                  f"test; validation SE {r['mean_validation_se']:.4f}, candidates' validation std "
                  f"{r['mean_candidate_validation_std']:.4f}; final test accuracy {r['final_test_accuracy']:.4f}",
                  flush=True)
    lines = [f"munet bench margin ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, root {a.root}, "
             f"{a.generations} generations x {a.candidates} candidates x {a.steps} steps, "
             f"{a.max_examples} examples per task; {time.monotonic() - t0:.0f} s)", "",
             "| task | margin (SE) | validation examples | validation SE | candidates' validation std | "
             "promotions | not better on test | final test accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['margin_se']:g} | {r['validation_examples']} | {r['mean_validation_se']:.4f} "
                     f"| {r['mean_candidate_validation_std']:.4f} | {r['promotions']} | {r['noise_promotions']} | "
                     f"{r['final_test_accuracy']:.4f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d-%H%M%S")
        (out / f"margin-{stamp}.md").write_text(text)
        (out / f"margin-{stamp}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
