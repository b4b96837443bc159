"""`munet bench prefix-cache`: what the frozen-prefix cache saves a candidate.

The same candidate (the root trunk with its top block(s) cloned, plus a head) is trained twice with
the same steps and seed: once on cached outputs of its frozen prefix (computed once, reused by
every candidate with that prefix), once recomputing the prefix for every batch. Both rows come
from one run on this machine; the ratio is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import cpu_model
from munet.data.builtin import load_builtin
from munet.data.images import to_model_input
from munet.data.splits import TRAIN, VALIDATION, split_indices
from munet.evolution.mutations import DEFAULT_HPARAMS, clone
from munet.evolution.train import fit_head, run_modules, train_candidate
from munet.models.roots import get_root_spec, input_size


class _Frozen(nn.Module):
    """The prefix run inside the training loop, as a candidate without the cache would."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.mods = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for m in self.mods:
                x = m(x)
        return x


def run(task: str, n_train: int, steps: int, cloned: int, batch: int, threads: int, seed: int,
        root: str = "mobilenet_v2_imagenet") -> dict:
    torch.set_num_threads(threads)
    spec = get_root_spec(root)
    size = input_size(spec)
    ds = load_builtin(task, max_examples=n_train + n_train // 4, seed=seed, size=size)
    split = split_indices(ds.y, seed, 0.2, 0.0)
    xt, yt = ds.x[split == TRAIN], ds.y[split == TRAIN]
    xv, yv = ds.x[split == VALIDATION], ds.y[split == VALIDATION]
    modules, _ = spec.load()
    trunk = modules[:-1]
    prefix, top = trunk[: len(trunk) - cloned], trunk[len(trunk) - cloned:]
    hp = dict(DEFAULT_HPARAMS)
    rows = []
    for mode in ("cached prefix", "prefix every step"):
        torch.manual_seed(seed)
        trainable = [clone(m) for m in top]
        feats = run_modules(trunk, xt[:512], reduce=type(modules[-1]).reduce)
        head, _ = fit_head(feats, yt[:512], len(ds.labels), like=modules[-1], epochs=5, seed=seed)
        trainable.append(head.train())
        t0 = time.perf_counter()
        if mode == "cached prefix":
            train_in = run_modules(prefix, xt).to(torch.float16)
            val_in = run_modules(prefix, xv).to(torch.float16)
            chain, raw = list(trainable), False
        else:
            train_in = torch.from_numpy(to_model_input(xt))
            val_in = torch.from_numpy(to_model_input(xv))
            chain, raw = [_Frozen(prefix), *trainable], True
            hp = {**hp, "ds_translate_px": 0}  # same data as the cached run: no augmentation
        prep = time.perf_counter() - t0
        res = train_candidate(chain, trainable, train_in, yt, val_in, yv, hp, batch, steps, budget_s=1e9,
                              raw_images=raw, seed=seed, evals=1)
        rows.append({"mode": mode, "prepare_s": round(prep, 2), "train_s": round(res.seconds, 2),
                     "steps": res.steps, "ms_per_step": round(1000 * res.step_seconds, 2),
                     "validation_accuracy": round(res.validation_accuracy, 4),
                     "trainable_params": sum(p.numel() for m in trainable for p in m.parameters())})
    cached, full = rows
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "task": task,
        "root": root, "image_size": size,
        "train_examples": len(yt), "cloned_blocks": cloned, "frozen_prefix_modules": len(prefix),
        "batch": batch, "threads": threads, "rows": rows,
        "speedup_per_step": round(full["ms_per_step"] / cached["ms_per_step"], 2),
        "speedup_with_cache_fill": round((full["train_s"] + full["prepare_s"])
                                         / (cached["train_s"] + cached["prepare_s"]), 2),
    }


def _machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"torch {torch.__version__}")


def table(r: dict) -> str:
    lines = [f"prefix cache, {r['date']}, {r['machine']}",
             (f"root {r['root']} at {r['image_size']} px, task {r['task']}, {r['train_examples']} train examples, "
              f"top {r['cloned_blocks']} layer(s) cloned, "
             f"{r['frozen_prefix_modules']} frozen prefix modules, batch {r['batch']}, {r['threads']} thread(s)"), "",
             "| mode | prefix outputs (s) | training (s) | steps | ms/step | validation acc |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['mode']} | {row['prepare_s']} | {row['train_s']} | {row['steps']} | "
                     f"{row['ms_per_step']} | {row['validation_accuracy']} |")
    lines += ["", (f"speed-up per step: {r['speedup_per_step']}x; including filling the cache once: "
              f"{r['speedup_with_cache_fill']}x (the fill is shared by every later candidate with this prefix)")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench prefix-cache", description=__doc__)
    p.add_argument("--task", default="fashion_mnist")
    p.add_argument("--train", type=int, default=4000, help="training examples")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--cloned", type=int, default=2, help="top layers cloned (trainable)")
    p.add_argument("--root", default="mobilenet_v2_imagenet", help="root (`munet roots list`)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the server trains with 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    r = run(a.task, a.train, a.steps, a.cloned, a.batch, a.threads, a.seed, a.root)
    text = table(r)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (a.out / f"prefix-cache-{stamp}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"prefix-cache-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
