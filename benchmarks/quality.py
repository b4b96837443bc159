"""`munet bench quality`: is evolving a multitask system better than fine-tuning one model per task?

    munet bench quality            # the default run: ~1 h on 2 cores; writes bench-results/quality-<date>.*
    munet bench quality --quick    # about a minute: uci_digits and animal_shapes, 200 training images each

Three methods on the built-in tasks, each task with one fixed, seeded train/validation/test split
(the data set's own split where it has one, so MNIST and Fashion-MNIST are tested on their official
test sets), the same split for every method:

1. linear probe: the root trunk frozen, a new head fitted on its cached outputs (`fit_head`);
2. full fine-tuning: a copy of every root module plus a new head, all trainable, one model per task,
   AdamW with warm-up and cosine decay; the best of `--ft-lrs` on validation (every run is counted
   in the budget);
3. munet-serve as a user meets it: the real server (App.build, gRPC on loopback) in this process,
   the tasks introduced ONE AFTER ANOTHER through the public API with `MunetClient`: RegisterTask
   (the bench's own split streamed with explicit split codes), then TriggerEvolution(task, wait) for
   `--generations` generations of `--candidates` candidates, then Predict on the test set (what a
   user gets). Right after a task's own evolution its Predict outputs (all class probabilities) on
   fixed inputs are recorded; after the last task was added and evolved, every earlier task is
   asked again and the answers must be bit-identical (muNet's immunity to forgetting).

Budget, in examples processed per task (an example = one image through a forward and a backward pass
of the trained modules): fine-tuning runs `budget / len(ft_lrs)` examples per learning rate; munet's
evolution gets the same total, as generations x candidates x steps x train_batch_size (the steps are
read from the in-process evolution reports, not assumed). Head fits on cached trunk features (the
probe, and munet's registration probe of up to 4 trunks) are reported separately: they train one
linear layer (and the ViT's final LayerNorm) on one pooled feature vector per image, a tiny fraction
of a full step's arithmetic.

The root is `--root` (default the ImageNet MobileNetV2, at its CPU input size of 96 px; `vit_tiny`
is the small committed ViT at 32 px). Every method starts from the same root and sees the same images.

Parameters per task: probe = the head; fine-tuning = the whole model; munet = "added" (modules in
its final path that neither the root nor an earlier task had) and "accounted" (each module's
parameters divided by the number of tasks whose current path uses it; these sum to the system's
total). Target (muNet, Gesmundo & Dean 2022: +2.39% average accuracy with 47% fewer parameters per
task than fine-tuning): a higher average test accuracy than full fine-tuning with at most half its
parameters per task (accounted).

The modules, by phase and method: `quality_settings`, `quality_data` (the tasks and their splits),
`quality_root`, `quality_probe` (1), `quality_finetune` (2), `quality_munet` (3), `quality_run` (the
tasks in turn, the bit-identity check, the totals), `quality_report` (table, chart, files).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, log
from benchmarks.quality_report import to_markdown, write_results
from benchmarks.quality_run import run
from benchmarks.quality_settings import DEFAULT_TASKS, OPTIONAL_TASKS, QUICK_TASKS, Settings


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="munet bench quality", description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--quick", action="store_true", help="about a minute: two small tasks, tiny budget (a smoke run)")
    p.add_argument("--tasks", help=f"comma-separated built-ins (default: {','.join(DEFAULT_TASKS)}, plus "
                                   f"{','.join(OPTIONAL_TASKS)} when available; quick: {','.join(QUICK_TASKS)})")
    p.add_argument("--max-train", type=int, help=f"training examples per task (default {d.max_train})")
    p.add_argument("--max-val", type=int, help=f"validation examples per task (default {d.max_val})")
    p.add_argument("--max-test", type=int, help=f"test examples per task (default {d.max_test})")
    p.add_argument("--budget", type=int, help=f"examples processed per task and method (default {d.budget})")
    p.add_argument("--ft-lrs", help="fine-tuning learning rates, comma-separated (default 1e-3,3e-4)")
    p.add_argument("--ft-batch", type=int, help=f"fine-tuning batch size (default {d.ft_batch})")
    p.add_argument("--generations", type=int, help=f"munet generations per task (default {d.generations})")
    p.add_argument("--candidates", type=int, help=f"munet candidates per generation (default {d.candidates})")
    p.add_argument("--train-batch", type=int, help=f"munet train_batch_size (default {d.train_batch})")
    p.add_argument("--head-epochs", type=int, help=f"head fit epochs, probe and munet (default {d.head_epochs})")
    p.add_argument("--identity-inputs", type=int, help=f"images per task for the bit-identity check "
                                                       f"(default {d.identity_inputs})")
    p.add_argument("--seed", type=int, help="split and training seed (default 0)")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: min(2, cores))")
    p.add_argument("--root", help=f"root to start every method from (default {d.root}; see `munet roots list`)")
    p.add_argument("--image-size", type=int, help="input size for a convolutional root (default: the root's, 96)")
    p.add_argument("--out", help="results folder (default bench-results)")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--json", action="store_true", help="print the JSON results on stdout instead of markdown")
    p.add_argument("--keep", action="store_true", help="keep the server's temporary store")
    p.add_argument("-v", "--verbose", action="store_true", help="the server's INFO logs (every candidate)")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for key in ("max_train", "max_val", "max_test", "budget", "ft_batch", "generations", "candidates",
                "train_batch", "head_epochs", "identity_inputs", "seed", "threads", "root", "image_size"):
        v = getattr(a, key)
        if v is not None:
            overrides[key] = v
    if a.tasks:
        overrides["tasks"] = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.ft_lrs:
        overrides["ft_lrs"] = [float(v) for v in a.ft_lrs.split(",") if v.strip()]
    overrides["threads"] = overrides.get("threads") or min(2, os.cpu_count() or 1)
    overrides["out_dir"] = None if a.no_write else (a.out or "bench-results")
    overrides.update(keep=a.keep, verbose=a.verbose, json_out=a.json)
    s = Settings.quick_settings(**overrides) if a.quick else Settings(**overrides)
    for key in ("max_train", "max_val", "max_test", "budget", "ft_batch", "generations", "candidates",
                "train_batch", "head_epochs", "identity_inputs", "threads"):
        if getattr(s, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not s.ft_lrs:
        p.error("--ft-lrs needs at least one learning rate")
    return s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(argv)
    command = "munet bench quality" + (" " + shlex.join(argv) if argv else "")
    try:
        r = run(s, command)
    except BenchError as e:
        print(f"munet bench quality: {e}", file=sys.stderr)
        return 2
    if s.json_out:
        print(json.dumps(r, indent=1, default=str))
    else:
        print(to_markdown(r))
    if s.out_dir:
        paths = write_results(r, Path(s.out_dir))
        log("quality", "wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
