"""`python -m benchmarks.evolution_backends`: candidates trained per minute, local vs Ray.

One task is registered once; its store is copied, and the same generations (same seed, so the same
candidates) run on each copy: one with evolution_backend=local (the candidates one after another in
this process, as the evolution worker trains them), one with evolution_backend=ray on a Ray instance
started here with `--workers` CPUs (its candidates as Ray tasks, `--threads` each). Generations of
the two alternate, so both see the same machine load; each backend first runs one warm-up
generation that is not counted (Ray's start, its workers' imports, the prefix cache).

Only the training phase of a generation is timed (the trainer's `train` call, from handing it the
prepared candidates to having every result back on the leader): drawing candidates, the prefix
cache, scoring and publishing are the same code on both backends. Per backend:

- candidates per minute: candidates / training-phase wall time;
- training s/candidate: the pure training time `train_candidate` reports (steps, evaluations), as
  measured where the candidate trained;
- overhead per candidate: the worker-seconds of the phase not spent in that pure training
  (workers x wall - sum of training s) / candidates: for Ray, putting the shared arrays and modules
  into the object store, scheduling, shipping arguments and results, loading the weights back, idle
  workers at the end of a generation; for both, the validation answers after training. Its share of
  the training time is the figure Ray Tune holds itself to (under 20%).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import BenchError, log, machine_info
from munet.config import Config

OVERHEAD_TARGET = 0.20


@dataclass
class Timed:
    """A trainer that records how long each `train` call took and what it returned."""

    inner: object
    runs: list[tuple[float, list]] = field(default_factory=list)
    counting: bool = False

    def train(self, jobs, settings, done, should_pause=None):
        t0 = time.perf_counter()
        outcomes = self.inner.train(jobs, settings, done, should_pause)
        if self.counting:
            self.runs.append((time.perf_counter() - t0, outcomes))
        return outcomes


def _config(home: Path, a: argparse.Namespace, **overrides) -> Config:
    return Config.from_env(home=home, root=a.root, demo_task=False, scheduler_enabled=False, seed=a.seed,
                           candidates_per_generation=a.candidates, candidate_max_steps=a.steps,
                           # steps, not seconds, end a candidate: both backends do the same work per candidate
                           candidate_budget_s=3600.0, training_threads=a.threads,
                           evolution_max_train=a.train, **overrides)


def _register(home: Path, a: argparse.Namespace) -> None:
    from munet.app import App
    from munet.service.core import TaskSpec

    app = App.build(_config(home, a))
    try:
        app.core.register_task(TaskSpec(name="bench", builtin=a.builtin, max_examples=a.examples, seed=a.seed))
    finally:
        app.close()


def _summary(name: str, workers: int, runs: list[tuple[float, list]]) -> dict:
    wall = sum(w for w, _ in runs)
    outs = [o for _, outcomes in runs for o in outcomes]
    failed = [o.error for o in outs if o.result is None]
    if failed:
        raise BenchError(f"{name}: {len(failed)} candidate(s) failed to train: {failed[0]}")
    train = sum(o.result.seconds for o in outs)
    n = len(outs)
    overhead = (workers * wall - train) / n
    return {"backend": name, "workers": workers, "candidates": n, "wall_s": round(wall, 2),
            "candidates_per_min": round(60 * n / wall, 2), "train_s_per_candidate": round(train / n, 3),
            "steps_per_candidate": round(sum(o.result.steps for o in outs) / n, 1),
            "overhead_s_per_candidate": round(overhead, 3), "overhead_share": round(overhead / (train / n), 4),
            "workers_seen": sorted({o.worker for o in outs})}


def run(a: argparse.Namespace) -> dict:
    import ray
    import torch

    from munet.evolution import ray_backend
    from munet.evolution.generation import Evolver
    from munet.models.store import Store

    work = Path(tempfile.mkdtemp(prefix="munet-bench-backends-"))
    stores: list[Store] = []
    try:
        log("evolution-backends", f"registering a {a.builtin} task on {a.root}")
        _register(work / "local", a)
        shutil.copytree(work / "local", work / "ray")
        # the Ray instance the benchmark asks for: `--workers` CPUs, so that many candidates train at once
        ray.init(num_cpus=a.workers * a.threads, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, namespace="munet")
        evolvers = {}
        for name in ("local", "ray"):
            store = Store(work / name)
            stores.append(store)
            # a pause hook, as the server gives: on Ray, tasks then ask the leader's pause flag every 10 steps
            ev = Evolver(_config(work / name, a, evolution_backend=name, ray_address="local"), store,
                         should_pause=lambda: False)
            ev.trainer = Timed(ev.trainer)
            evolvers[name] = ev
        for g in range(a.generations + 1):
            for name, ev in evolvers.items():
                ev.trainer.counting = g > 0  # generation 0 warms up
                t0 = time.perf_counter()
                report = ev.run_generation("bench")
                if report.error and not report.candidates:
                    raise BenchError(f"{name} generation failed: {report.error}")
                log("evolution-backends", f"{name} generation {g}{' (warm-up)' if g == 0 else ''}: "
                    f"{len(report.candidates)} candidates in {time.perf_counter() - t0:.1f} s")
        rows = [_summary("local", 1, evolvers["local"].trainer.runs),
                _summary("ray", a.workers, evolvers["ray"].trainer.runs)]
        return machine_info(torch=torch.__version__, ray=ray.__version__, root=a.root, builtin=a.builtin,
                            examples=a.examples, train=a.train, candidates_per_generation=a.candidates,
                            generations=a.generations, steps=a.steps, threads=a.threads, workers=a.workers,
                            rows=rows, speedup=round(rows[1]["candidates_per_min"] / rows[0]["candidates_per_min"], 2),
                            ray_overhead_share=rows[1]["overhead_share"], target=OVERHEAD_TARGET)
    finally:
        for s in stores:
            s.close()
        ray_backend.disconnect()
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict) -> str:
    lines = [f"evolution backends, {r['date']}, {r['cpu_model']}, {r['nproc']} cores (load at start "
             f"{r['load_average_at_start'][0]}), torch {r['torch']}, Ray {r['ray']}",
             f"root {r['root']}, task {r['builtin']} ({r['train']} training examples at most), {r['generations']} "
             f"generations of {r['candidates_per_generation']} candidates per backend after a warm-up one, "
             f"{r['steps']} steps per candidate, {r['threads']} thread(s) per candidate", "",
             "| backend | candidates | candidates/min | training s/candidate | overhead s/candidate | overhead / training |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        name = ("local (one process)" if row["backend"] == "local" else
                f"ray ({row['workers']} worker{'s' if row['workers'] > 1 else ''} on this machine)")
        lines.append(f"| {name} | {row['candidates']} | {row['candidates_per_min']} | {row['train_s_per_candidate']} | "
                     f"{row['overhead_s_per_candidate']} | {100 * row['overhead_share']:.1f}% |")
    verdict = "under" if r["ray_overhead_share"] < r["target"] else "NOT under"
    if any(row["overhead_share"] < 0 for row in r["rows"]):
        # more training seconds than worker-seconds: more candidates trained at once than there are workers
        verdict = "INVALID (more candidates trained at once than workers): not measured against"
    lines += ["", f"Ray trains {r['speedup']}x the candidates per minute of local; its overhead per candidate is "
              f"{100 * r['ray_overhead_share']:.1f}% of pure training time, {verdict} the {100 * r['target']:.0f}% target."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evolution_backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="vit_tiny", help="root (`munet roots list`)")
    p.add_argument("--builtin", default="uci_digits", help="built-in data set of the task")
    p.add_argument("--examples", type=int, default=1500, help="examples registered")
    p.add_argument("--train", type=int, default=1000, help="training examples a generation uses at most")
    p.add_argument("--candidates", type=int, default=6, help="candidates per generation")
    p.add_argument("--generations", type=int, default=2, help="measured generations per backend")
    p.add_argument("--steps", type=int, default=150, help="training steps per candidate")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs: candidates training at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per candidate (the server trains with 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    a = p.parse_args(argv)
    try:
        r = run(a)
    except BenchError as e:
        print(f"bench evolution-backends: {e}", file=sys.stderr, flush=True)
        return 1
    text = table(r)
    print(json.dumps(r, indent=1) if a.json else text)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M%S")
    (a.out / f"evolution-backends-{stamp}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"evolution-backends-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
