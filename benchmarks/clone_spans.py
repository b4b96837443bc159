"""`munet bench spans`: which layers should a candidate train? Spans of root layers cloned together,
against fine-tuning every layer, at the same number of steps.

    munet bench spans                                   # ~5 min on 2 cores: animal_shapes, five spans
    munet bench spans --tasks mnist,uci_digits --spans 8-15,11-18,0-19

A span `a-b` clones the root's modules a..b-1 into trainable copies; the modules before it are
frozen (their outputs computed once), those after it frozen too, and a new head trains with them.
`0-19` on MobileNetV2 is every layer: full fine-tuning, as `munet bench quality` runs it. Each row
trains `--steps` AdamW steps of batch 64 at each of `--lrs` (warm-up then cosine, clipping at 1.0, BatchNorm statistics
frozen as everywhere in munet), keeps the best of three validation evaluations and reports test
accuracy on the quality bench's split. This is the measurement behind the `clone_span` mutation
(evolution/mutations.py): it isolates where training helps from everything else a candidate mutates.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from benchmarks.common import BenchError, log, machine_info


def train_span(root_modules: list, data, lo: int, hi: int, steps: int, lr: float, seed: int = 0) -> dict:
    """Clone root_modules[lo:hi] (the head is always new), train; test accuracy of the best evaluation."""
    import torch
    import torch.nn.functional as F

    from munet.data.splits import TEST, TRAIN, VALIDATION
    from munet.evolution.train import run_modules
    from munet.models.training import accuracy, warmup_cosine
    from munet.models.vit import Chain

    n_layers = len(root_modules) - 1
    if not 0 <= lo < hi <= n_layers:
        raise BenchError(f"span {lo}-{hi} is outside the root's layers 0-{n_layers} (the head is always new)")
    t0 = time.perf_counter()
    y = {k: torch.from_numpy(data.parts[k].y) for k in (TRAIN, VALIDATION, TEST)}
    prefix = {k: run_modules(root_modules[:lo], data.parts[k].x) for k in y}  # the frozen prefix, once
    prefix_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    like = root_modules[-1]
    head = type(like).fresh(like.cfg.dim, len(data.labels), like=like)
    clones = [copy.deepcopy(m) for m in root_modules[lo:hi]]
    trained = [*clones, head]
    for m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    model = Chain([*clones, *root_modules[hi:-1], head])
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    order, pos, best, best_state = torch.randperm(len(y[TRAIN]), generator=g), 0, -1.0, None
    evals = {round(steps * (k + 1) / 3) for k in range(3)}
    t1 = time.perf_counter()
    for step in range(steps):
        if pos + 64 > len(order):
            order, pos = torch.randperm(len(y[TRAIN]), generator=g), 0
        idx = order[pos:pos + 64]
        pos += 64
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, max(1, steps // 10), lr)
        for m in trained:
            m.train()  # munet's modules keep BatchNorm in inference mode while training
        loss = F.cross_entropy(model(prefix[TRAIN][idx]), y[TRAIN][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step + 1 in evals:
            for m in trained:
                m.eval()
            val = accuracy(model, prefix[VALIDATION], y[VALIDATION].numpy())
            if val > best:
                best, best_state = val, [copy.deepcopy(m.state_dict()) for m in trained]
    assert best_state is not None
    for m, sd in zip(trained, best_state, strict=True):
        m.load_state_dict(sd)
        m.eval()
    test = accuracy(model, prefix[TEST], y[TEST].numpy())
    return {"span": f"{lo}-{hi}", "validation_accuracy": best, "test_accuracy": test,
            "trained_params": sum(p.numel() for p in params), "steps": steps, "lr": lr,
            "prefix_s": round(prefix_s, 1), "train_s": round(time.perf_counter() - t1, 1)}


def to_markdown(result: dict) -> str:
    lines = [f"Spans trained on `{result['root']}` at {result['image_size']} px, {result['steps']} AdamW steps of 64 "
             f"per learning rate in {', '.join(f'{v:g}' for v in result['lrs'])}, the best on validation kept (command: `{result['command']}`, {result['machine']['date']}):", "",
             "| task | span (modules) | lr | validation | test | trained params | share of fine-tuning's |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['span']} | {r['lr']:g} | {100 * r['validation_accuracy']:.2f} | "
                     f"{100 * r['test_accuracy']:.2f} | {r['trained_params'] / 1e3:.1f}k | "
                     f"{r['trained_params'] / r['full_params']:.0%} |")
    lines.append("")
    lines.append("Share of fine-tuning's: trained parameters against every layer of the trunk plus a new head, what "
                 "`munet bench quality`'s full fine-tuning trains.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quality_data import prepare_task, resolve_tasks
    from benchmarks.quality_root import load_root_model
    from benchmarks.quality_settings import Settings

    p = argparse.ArgumentParser(prog="munet bench spans", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="animal_shapes", help="built-in tasks, comma-separated")
    p.add_argument("--spans", default="8-15,11-15,8-11,14-18,0-19",
                   help="a-b: clone root modules a..b-1 (0-19: every layer of MobileNetV2)")
    p.add_argument("--steps", type=int, default=94, help="training steps per span (94: one fine-tuning run "
                                                           "of `munet bench quality --budget 12000`)")
    p.add_argument("--lrs", default="0.001,0.0003", help="learning rates, comma-separated: each span keeps the "
                                                           "best on validation (as fine-tuning does in the quality bench)")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-val", type=int, default=500)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--root", default="mobilenet_v2_imagenet")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    a = p.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(2)
        spans = [tuple(int(v) for v in s.split("-")) for s in a.spans.split(",")]
        lrs = [float(v) for v in a.lrs.split(",")]
        if any(len(s) != 2 for s in spans) or not lrs:
            raise ValueError
    except ValueError:
        print(f"munet bench spans: --spans wants a-b,c-d and --lrs numbers (got {a.spans!r}, {a.lrs!r})",
              file=sys.stderr)
        return 2
    try:
        s = Settings(max_train=a.max_train, max_val=a.max_val, max_test=a.max_test, root=a.root)
        root = load_root_model(s)
        rows = []
        for task in resolve_tasks(a.tasks.split(",")):
            data = prepare_task(task, s, root.image_size)
            for lo, hi in spans:
                runs = [train_span(root.modules, data, lo, hi, a.steps, lr) for lr in lrs]
                r = max(runs, key=lambda run: run["validation_accuracy"])
                full = sum(root.params[:-1]) + (root.modules[-1].cfg.dim + 1) * len(data.labels)  # + a new head
                rows.append({"task": task, **r, "full_params": full})
                log("spans", f"{task} {r['span']}: val {r['validation_accuracy']:.4f} test {r['test_accuracy']:.4f} "
                             f"(lr {r['lr']:g}, {r['trained_params']} params, {sum(x['train_s'] for x in runs):.0f} s)")
    except BenchError as e:
        print(f"munet bench spans: {e}", file=sys.stderr)
        return 1
    result = {"root": a.root, "image_size": root.image_size, "steps": a.steps, "lrs": lrs, "rows": rows,
              "command": "munet bench spans " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info()}
    print(json.dumps(result, indent=1) if a.json else to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
