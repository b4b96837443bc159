"""`munet bench quality`'s report: the markdown table, the chart and the files."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.quality_settings import METHOD_NAMES, METHODS


def _k(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def to_markdown(r: dict) -> str:
    s, m, root = r["settings"], r["machine"], r["root"]
    lines = [
        f"# munet-serve quality benchmark{' (quick)' if s['quick'] else ''}",
        "",
        f"- date: {m['date']}; total wall time {r['wall_s'] / 60:.1f} min",
        (f"- machine: {m['cpu_model']}, {m['nproc']} cores, {m['threads']} torch/ORT threads, {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}; load average at start {m['load_average_at_start']}"),
        f"- command: `{r['command']}`",
        (f"- root: `{root['name']}` ({'built in' if root['builtin'] else 'imported'}, {root['image_size']} px, "
        f"{_k(root['params'])} params)"),
        (f"- budget per task and method: {s['budget']} examples (forward+backward). Fine-tune: "
        f"{len(s['ft_lrs'])} lr x {r['derived']['ft_steps_per_lr']} steps x batch {s['ft_batch']}. munet: "
        f"{s['generations']} generations x {s['candidates']} candidates x {r['derived']['munet_candidate_max_steps']} "
        f"steps x batch {s['train_batch']}. Head fits on cached trunk features are listed apart (`head-fit ex.`)."),
        f"- split caps: train {s['max_train']}, validation {s['max_val']}, test {s['max_test']}; seed {s['seed']}",
        "",
        ("Test accuracy (%), parameters per task (accounted: each module's parameters divided by the tasks "
        "using it; fine-tune: the whole model) and training examples:"),
        "",
        ("| task | n (train/val/test) | probe | fine-tune (lr) | munet | munet − FT | params/task probe | "
        "params/task FT | params/task munet (added) | examples FT / munet | head-fit ex. munet | wall s FT / munet "
        "| bit-identical | target met |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["tasks"]:
        x = r["results"][t]
        p, f, u, ident = x["probe"], x["finetune"], x["munet"], x["identity"]
        sz = x["sizes"]
        lines.append(
            f"| {t} | {sz['train']}/{sz['validation']}/{sz['test']} | {_pct(p['test_accuracy'])} | "
            f"{_pct(f['test_accuracy'])} ({f['lr']:g}) | {_pct(u['test_accuracy'])} | "
            f"{100 * (u['test_accuracy'] - f['test_accuracy']):+.2f} | {_k(p['accounted_params'])} | "
            f"{_k(f['accounted_params'])} | {_k(u['accounted_params'])} ({_k(u['added_params'])}) | "
            f"{f['network_examples']} / {u['network_examples']} | {u['head_fit_examples']} | "
            f"{f['train_wall_s']:.0f} / {u['train_wall_s']:.0f} | "
            f"{'yes' if ident['bit_identical'] else 'NO'} | {'yes' if x['target_met'] else 'no'} |")
    a, sm = r["average"], r["summary"]
    lines.append(
        f"| **average** | | {_pct(a['probe']['test_accuracy'])} | {_pct(a['finetune']['test_accuracy'])} | "
        f"{_pct(a['munet']['test_accuracy'])} | {100 * sm['munet_minus_finetune_accuracy']:+.2f} | "
        f"{_k(a['probe']['accounted_params'])} | {_k(a['finetune']['accounted_params'])} | "
        f"{_k(a['munet']['accounted_params'])} ({_k(a['munet']['added_params'])}) | "
        f"{a['finetune']['network_examples']:.0f} / {a['munet']['network_examples']:.0f} | "
        f"{a['munet']['head_fit_examples']:.0f} | {a['finetune']['train_wall_s']:.0f} / "
        f"{a['munet']['train_wall_s']:.0f} | "
        f"{sm['identity_checked'] - sum(not r['results'][t]['identity']['bit_identical'] for t in r['tasks'])}"
        f"/{sm['identity_checked']} | **{'yes' if sm['target_met'] else 'no'}** |")
    sy = r["systems"]
    lines += [
        "",
        (f"Target (muNet: +2.39% average accuracy, −47% parameters per task vs fine-tuning): munet average accuracy "
        f"above fine-tuning's with at most half its parameters per task. munet − fine-tune: "
        f"{100 * sm['munet_minus_finetune_accuracy']:+.2f} points; parameters per task: "
        f"{100 * sm['munet_over_finetune_params_per_task']:.1f}% of fine-tuning's. "
        f"**Target met: {'yes' if sm['target_met'] else 'no'}.**"),
        "",
        "Total system parameters after all tasks:",
        "",
        "| system | parameters | what |",
        "|---|---|---|",
        f"| linear probes | {_k(sy['probe']['params'])} | {sy['probe']['what']} |",
        f"| fine-tuned models | {_k(sy['finetune']['params'])} | {sy['finetune']['what']} |",
        f"| munet-serve | {_k(sy['munet']['params'])} ({sy['munet']['modules']} modules) | {sy['munet']['what']} |",
        "",
        (f"Bit-identity: after `{r['tasks'][-1]}` was added and evolved, each task's Predict outputs (all class "
        f"probabilities for {s['identity_inputs']} fixed test images, one request) were compared with those recorded "
        f"right after its own evolution: "
        f"{'all bit-identical' if sm['all_bit_identical'] else 'DIFFERENCES FOUND'}."),
        "",
        "munet paths (final):",
        "",
    ]
    for t in r["tasks"]:
        u = r["results"][t]["munet"]
        kinds = "-".join(m["kind"][0] for m in u["path"])
        lines.append(f"- {t}: v{u['version']}, {u['promotions']} promotion(s) in {len(u['generations'])} generations, "
                     f"path {kinds} ({len(u['path'])} modules, {u['root_modules_used']} from the root), first trunk "
                     f"from {u['initial_trunk_from']}, added {', '.join(u['added_modules']) or 'nothing'}; "
                     f"last mutations: {', '.join(u['path_mutations']) or '-'}")
    lines += [
        "",
        ("Accounting: an example counts once per forward+backward pass of the trained modules. Fine-tuning counts "
        "every learning-rate run. munet counts the steps x batch of every candidate of every generation (steps "
        "from the engine's generation reports); its registration's head fits on cached trunk features "
        "(head_train_epochs x train examples x trunks probed) are listed apart, as the probe's are not counted "
        "either: they train a LayerNorm and a linear layer on one cached token per image. Wall times are training "
        "only (munet: RegisterTask + TriggerEvolution calls, including ONNX export and promotion); munet's test "
        "accuracy is measured through Predict over gRPC."),
        "",
    ]
    return "\n".join(lines)


def write_chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = r["tasks"] + ["average"]
    colors = {"probe": "#9e9e9e", "finetune": "#1f77b4", "munet": "#d62728"}

    def val(meth: str, t: str, key: str) -> float:
        return r["average"][meth][key] if t == "average" else r["results"][t][meth][key]

    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(tasks) + 4), 5.0))
    xs = np.arange(len(tasks))
    w = 0.27
    for k, meth in enumerate(METHODS):
        acc = [100 * val(meth, t, "test_accuracy") for t in tasks]
        bars = axes[0].bar(xs + (k - 1) * w, acc, w, label=METHOD_NAMES[meth], color=colors[meth])
        axes[0].bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        par = [val(meth, t, "accounted_params") / 1e3 for t in tasks]
        bars = axes[1].bar(xs + (k - 1) * w, par, w, label=METHOD_NAMES[meth], color=colors[meth])
        axes[1].bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    lo = min(100 * val(mm, t, "test_accuracy") for mm in METHODS for t in tasks)
    axes[0].set_ylim(max(0.0, lo - 10), 112)
    axes[0].set_ylabel("test accuracy (%)")
    top = max(val(mm, t, "accounted_params") / 1e3 for mm in METHODS for t in tasks)
    axes[1].set_ylim(0, top * 1.25)
    axes[1].set_ylabel("parameters per task, thousands (accounted)")
    for ax in axes:
        ax.set_xticks(xs, tasks, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8, ncols=3, loc="upper center")
    sm = r["summary"]
    fig.suptitle(f"munet-serve quality ({r['machine']['date'][:10]}, budget {r['settings']['budget']} examples/task"
                 f", root {r['root']['name']}): munet − fine-tune "
                 f"{100 * sm['munet_minus_finetune_accuracy']:+.2f} pts, params/task "
                 f"{100 * sm['munet_over_finetune_params_per_task']:.0f}%, target met: "
                 f"{'yes' if sm['target_met'] else 'no'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(r: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    paths = {ext: out_dir / f"quality-{stamp}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(r, indent=1, default=str) + "\n")
    paths["md"].write_text(to_markdown(r))
    write_chart(r, paths["png"])
    return paths
