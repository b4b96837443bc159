"""One `munet bench quality` run: for each task in turn, the three methods on its fixed split; then the
bit-identity check on every earlier task, the parameters of each final system, the averages."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import log, machine_info
from benchmarks.quality_data import TaskData, prepare_task, resolve_tasks
from benchmarks.quality_finetune import run_finetune
from benchmarks.quality_munet import MunetServer, account_params, fingerprint, identity_inputs, run_munet
from benchmarks.quality_probe import run_probe
from benchmarks.quality_root import load_root_model
from benchmarks.quality_settings import METHODS, Settings


def _say(msg: str) -> None:
    log("quality", msg)


def run(s: Settings, command: str = "munet bench quality") -> dict:
    import torch

    t_start = time.perf_counter()
    if s.verbose:  # the server's own INFO logs: every registration probe and candidate
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("munet").setLevel(logging.INFO)
    else:
        logging.getLogger("munet").setLevel(logging.WARNING)
    tasks = resolve_tasks(s.tasks)
    root = load_root_model(s)
    info = machine_info(torch=torch.__version__, threads=s.threads)
    _say(f"tasks {', '.join(tasks)}; root {root.name} at {root.image_size} px; "
         f"budget {s.budget} examples per task; fine-tune {len(s.ft_lrs)} lr x {s.ft_steps} steps x "
         f"{s.ft_batch}; munet {s.generations} generations x {s.candidates} candidates x "
         f"{s.munet_steps} steps x {s.train_batch}; {s.threads} threads")
    torch.set_num_threads(s.threads)
    home = Path(tempfile.mkdtemp(prefix="munet-bench-quality-"))
    results: dict[str, dict] = {}
    task_views: dict[str, Any] = {}
    fingerprints: dict[str, dict] = {}
    datas: dict[str, TaskData] = {}
    server = None
    try:
        server = MunetServer(s, root.name, home / "store")
        for i, name in enumerate(tasks):
            t0 = time.perf_counter()
            data = prepare_task(name, s, root.image_size)
            datas[name] = data
            _say(f"[{i + 1}/{len(tasks)}] {name}: {len(data.labels)} classes, {data.sizes()} ({data.split_source})")
            row: dict[str, Any] = {"classes": len(data.labels), "sizes": data.sizes(), "split": data.split_source}
            row["probe"] = run_probe(root, data, s)
            _say(f"  probe: test {row['probe']['test_accuracy']:.4f} ({row['probe']['train_wall_s']:.1f} s)")
            row["finetune"] = run_finetune(root, data, s)
            _say(f"  fine-tune: test {row['finetune']['test_accuracy']:.4f} (lr {row['finetune']['lr']:g}, "
                 f"{row['finetune']['network_examples']} examples, {row['finetune']['train_wall_s']:.1f} s)")
            m = run_munet(server, data, s, root, task_views)
            task_views[name] = m.pop("_task")
            fingerprints[name] = m.pop("_fingerprint")
            row["munet"] = m
            _say(f"  munet: test {m['test_accuracy']:.4f} (v{m['version']}, {m['promotions']} promotions, "
                 f"{m['network_examples']} examples, {m['train_wall_s']:.1f} s)")
            row["task_wall_s"] = round(time.perf_counter() - t0, 1)
            results[name] = row
        # after the last task: every task asked again, by the same request
        identity = {}
        for name in tasks:
            again = fingerprint(server.client, name, identity_inputs(datas[name], s.identity_inputs),
                                len(datas[name].labels))
            before = fingerprints[name]
            identity[name] = {
                "checked_after": tasks[-1], "inputs": len(before["top"]),
                "version_then": before["version"], "version_now": again["version"],
                "bit_identical": again == before,
                "max_abs_diff": _max_diff(before["top"], again["top"]),
            }
        # parameters of the final multitask system, from the API's view of every current path
        paths = {}
        for name in tasks:
            t = server.client.get_task(name)
            assert t.path is not None
            paths[name] = [{"id": mod.id, "kind": mod.kind, "params": mod.params} for mod in t.path.modules]
            # the server's own figure (munet.models.accounting), the one its evolution scores with
            results[name]["munet"]["accounted_params"] = t.path.accounted_params
        per_task, system = account_params(tasks, paths, root)
    finally:
        if server is not None:
            server.close()
        if s.keep:
            _say(f"kept the server's store in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    n = len(tasks)
    for name in tasks:
        r = results[name]
        r["munet"].update(per_task[name])
        r["identity"] = identity[name]
        r["probe"]["accounted_params"] = root.trunk_params / n + r["probe"]["added_params"]
        r["finetune"]["accounted_params"] = r["finetune"]["model_params"]
        ft, mu = r["finetune"], r["munet"]
        r["target_met"] = bool(mu["test_accuracy"] > ft["test_accuracy"]
                               and mu["accounted_params"] <= 0.5 * ft["accounted_params"])
    avg = {meth: {"test_accuracy": float(np.mean([results[t][meth]["test_accuracy"] for t in tasks])),
                  "accounted_params": float(np.mean([results[t][meth]["accounted_params"] for t in tasks])),
                  "added_params": float(np.mean([results[t][meth]["added_params"] for t in tasks])),
                  "network_examples": float(np.mean([results[t][meth]["network_examples"] for t in tasks])),
                  "head_fit_examples": float(np.mean([results[t][meth]["head_fit_examples"] for t in tasks])),
                  "train_wall_s": float(np.mean([results[t][meth]["train_wall_s"] for t in tasks]))}
           for meth in METHODS}
    delta = avg["munet"]["test_accuracy"] - avg["finetune"]["test_accuracy"]
    ratio = avg["munet"]["accounted_params"] / avg["finetune"]["accounted_params"]
    systems = {
        "probe": {"params": root.trunk_params + sum(results[t]["probe"]["added_params"] for t in tasks),
                  "what": "the root trunk once + one head per task"},
        "finetune": {"params": sum(results[t]["finetune"]["model_params"] for t in tasks),
                     "what": "one full model per task"},
        "munet": {"params": system["params"], "modules": system["modules"],
                  "what": "distinct modules in all current paths (root modules included where used)"},
    }
    return {
        "benchmark": "quality", "command": command, "machine": info, "settings": asdict(s),
        "root": {"name": root.name, "builtin": root.builtin, "image_size": root.image_size,
                 "params": sum(root.params),
                 "trunk_params": root.trunk_params,
                 "validation_accuracy": root.info.get("validation_accuracy"),
                 "epochs": root.info.get("training", {}).get("epochs"), "test": root.info.get("test")},
        "derived": {"ft_steps_per_lr": s.ft_steps, "munet_candidate_max_steps": s.munet_steps,
                    "munet_planned_examples": s.generations * s.candidates * s.munet_steps * s.train_batch},
        "tasks": tasks, "results": results, "average": avg, "systems": systems,
        "summary": {
            "munet_minus_finetune_accuracy": delta, "munet_over_finetune_params_per_task": ratio,
            "target_met": bool(delta > 0 and ratio <= 0.5),
            "all_bit_identical": all(identity[t]["bit_identical"] for t in tasks),
            "identity_checked": len(tasks),
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _max_diff(a: list, b: list) -> float:
    try:
        pa = np.array([[p for _, p in sorted(row)] for row in a], dtype=np.float64)
        pb = np.array([[p for _, p in sorted(row)] for row in b], dtype=np.float64)
        return float(np.abs(pa - pb).max()) if pa.size else 0.0
    except (ValueError, TypeError):
        return float("nan")
