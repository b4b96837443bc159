"""Method 3 of `munet bench quality`: munet-serve as a user meets it. The real server (App.build, gRPC on
loopback) in this process; each task registered through the public API with the bench's own split,
evolved for the configured generations, tested by Predict; its answers on fixed inputs recorded for
the bit-identity check after the last task."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks.common import BenchError, log
from benchmarks.quality_data import TaskData
from benchmarks.quality_root import Root
from benchmarks.quality_settings import LONG_BUDGET_S, Settings
from munet.data.examples import Examples
from munet.data.splits import TEST, TRAIN, VALIDATION

T = TypeVar("T")


def _say(msg: str) -> None:
    log("quality", msg)


class LoopThread:
    """An asyncio loop in a daemon thread, for the in-process gRPC server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-grpc-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class MunetServer:
    """The production wiring (App.build, start, scheduler on demand, gRPC on loopback) in this process."""

    def __init__(self, s: Settings, root: str, home: Path):
        from munet.app import App
        from munet.client import MunetClient
        from munet.config import Config

        self.config = Config.from_env(
            home=home, root=root, image_size=s.image_size, demo_task=False, scheduler_enabled=False,
            providers=["CPUExecutionProvider"], intra_op_threads=s.threads, training_threads=s.threads,
            candidates_per_generation=s.candidates, candidate_max_steps=s.munet_steps,
            candidate_budget_s=LONG_BUDGET_S, train_batch_size=s.train_batch, head_train_epochs=s.head_epochs,
            evolution_max_train=max(s.max_train, 1), evolution_max_validation=max(s.max_val, 1),
            max_examples_per_task=max(20000, s.max_train + s.max_val + s.max_test), seed=s.seed,
            max_batch_size=max(64, s.identity_inputs),
        )
        self.app = App.build(self.config)
        self.app.start()
        self.app.start_scheduler()  # on demand only: TriggerEvolution works, no periodic generations
        self.loop = LoopThread()
        try:
            self.port = self.loop.run(self.app.start_grpc("127.0.0.1:0"))
            self.client = MunetClient(f"127.0.0.1:{self.port}", timeout=120.0, long_timeout=7200.0)
            self.client.wait_ready(20.0)
        except BaseException:
            self.loop.close()
            raise

    def generation_details(self, n: int) -> list[Any]:
        """The engine's own reports of the last `n` generations (the API's reports lack step counts)."""
        recent = list(self.app.evolution.recent) if self.app.evolution is not None else []
        return recent[-n:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            self.loop.run(self.app.stop(), timeout=30.0)
        self.loop.close()


def _predict_all(client: Any, task: str, x: np.ndarray, top_k: int = 1, chunk: int = 500) -> list[Any]:
    out = []
    for i in range(0, len(x), chunk):
        out.extend(client.predict(task, x[i:i + chunk], top_k=top_k).predictions)
    return out


def fingerprint(client: Any, task: str, x: np.ndarray, n_classes: int) -> dict:
    """Every class probability for fixed inputs, as served (one request: the same batch every time)."""
    r = client.predict(task, x, top_k=n_classes)
    return {"version": r.version,
            "top": [[[s.index, s.probability] for s in p] for p in r.predictions]}


def identity_inputs(data: TaskData, n: int) -> np.ndarray:
    return np.ascontiguousarray(data.parts[TEST].x[:n])


def run_munet(server: MunetServer, data: TaskData, s: Settings, root: Root, earlier: dict[str, Any]) -> dict:
    """Register the task through the API, evolve it, test it by Predict; `earlier`: task -> Task view."""
    c = server.client
    sent = Examples.concat([data.parts[k] for k in (TRAIN, VALIDATION, TEST)])
    # the trunks the registration probes (munet.evolution.engine.InitialPaths.trunks): root + others' distinct
    root_trunk = tuple(root.ids[:-1])
    other = {tuple(m.id for m in t.path.modules[:-1]) for t in earlier.values() if t.path is not None}
    n_trunks = min(4, 1 + len(other - {root_trunk}))

    t0 = time.perf_counter()
    reg = c.register_task(data.name, labels=data.labels, examples=(sent.x, sent.y, sent.split), seed=s.seed)
    register_s = time.perf_counter() - t0
    if (reg.train_examples, reg.validation_examples, reg.test_examples) != tuple(len(data.parts[k]) for k in
                                                                                 (TRAIN, VALIDATION, TEST)):
        raise BenchError(f"{data.name}: the server holds {reg.train_examples}/{reg.validation_examples}/"
                         f"{reg.test_examples} examples, the bench sent another split")
    initial = reg.path
    _say(f"  munet: registered {data.name} in {register_s:.1f} s (v{reg.current_version}, "
         f"validation {initial.validation_accuracy:.4f} from trunk of {initial.parent_task})")
    generations = []
    examples = 0
    evolve_s = 0.0
    batch = min(s.train_batch, len(data.parts[TRAIN]))
    for g in range(s.generations):
        t1 = time.perf_counter()
        st = c.trigger_evolution(data.name, candidates=s.candidates, budget_seconds=LONG_BUDGET_S, wait=True)
        evolve_s += time.perf_counter() - t1
        api = st.recent[-1] if st.recent else None
        if api is None or api.task != data.name:
            raise BenchError(f"{data.name}: generation {g + 1} returned no report")
        if api.error:  # a failed promotion or generation: recorded and reported, the run goes on
            _say(f"  munet: {data.name} generation {g + 1} reported an error: {api.error}")
        details = server.generation_details(1)
        detail = details[0] if details else None
        if detail is not None and detail.task == data.name and detail.generation == api.generation:
            steps = [cr.steps for cr in detail.candidates]
        else:  # not this generation's report: fall back to the configured step cap
            _say(f"  munet: no engine report for {data.name} generation {api.generation}; steps estimated")
            steps, detail = [s.munet_steps] * api.candidates, None
        examples += sum(steps) * batch
        generations.append({
            "generation": api.generation, "candidates": api.candidates, "promoted": api.promoted,
            "promoted_version": api.promoted_version, "error": api.error, "best_score": api.best_score,
            "incumbent_score": api.incumbent_score, "seconds": api.seconds,
            "candidate_details": [{"parent_task": cr.parent_task, "parent_version": cr.parent_version,
                                   "mutations": cr.mutations, "validation_accuracy": cr.validation_accuracy,
                                   "score": cr.score, "added_params": cr.added_params, "steps": cr.steps,
                                   "seconds": round(cr.seconds, 2), "cached_prefix": cr.cached_prefix,
                                   "survived": cr.survived, "version": cr.version}
                                  for cr in (detail.candidates if detail is not None else [])],
            "steps_from": "engine report" if detail is not None else "estimate (candidate_max_steps)",
        })
        _say(f"  munet: {data.name} generation {api.generation}: {api.candidates} candidates, "
             f"{sum(steps)} steps, best score {api.best_score:.4f} vs {api.incumbent_score:.4f}, "
             f"{f'promoted v{api.promoted_version}' if api.promoted else 'kept'} ({api.seconds:.1f} s)")
    task = c.get_task(data.name)
    versions = c.list_versions(data.name)
    t2 = time.perf_counter()
    preds = _predict_all(c, data.name, data.parts[TEST].x)
    predict_s = time.perf_counter() - t2
    pred = np.array([p[0].index for p in preds], dtype=np.int64)
    test = float(np.mean(pred == data.parts[TEST].y)) if len(pred) else float("nan")
    fp = fingerprint(c, data.name, identity_inputs(data, s.identity_inputs), len(data.labels))
    path = task.path
    assert path is not None
    return {
        "test_accuracy": test, "validation_accuracy": path.validation_accuracy,
        "server_test_accuracy": path.test_accuracy, "version": task.current_version,
        "initial_validation_accuracy": initial.validation_accuracy, "initial_trunk_from": initial.parent_task,
        "network_examples": examples,
        "head_fit_examples": s.head_epochs * len(data.parts[TRAIN]) * n_trunks, "trunks_probed": n_trunks,
        "register_s": round(register_s, 2), "evolve_s": round(evolve_s, 2),
        "train_wall_s": round(register_s + evolve_s, 2), "test_predict_s": round(predict_s, 2),
        "generations": generations, "promotions": sum(g["promoted"] for g in generations),
        "errors": [g["error"] for g in generations if g["error"]],
        "path": [{"id": m.id, "kind": m.kind, "params": m.params} for m in path.modules],
        "path_mutations": path.mutations, "path_parent_task": path.parent_task,
        "hyperparameters": path.hyperparameters,
        "versions": [{"version": v.version, "status": v.status, "validation_accuracy": v.validation_accuracy,
                      "score": v.score, "parent_task": v.parent_task, "mutations": v.mutations}
                     for v in versions.versions],
        "_fingerprint": fp, "_task": task,
    }


def account_params(order: list[str], paths: dict[str, list[dict]], root: Root) -> tuple[dict, dict]:
    """Per task: added (modules new to the system when it came: not the root's, not an earlier task's)
    and unique (used by no other task and not the root's). System: distinct modules in all current
    paths. Accounted parameters are the server's own (GetTask), not computed again here."""
    users: dict[str, set[str]] = {}
    params: dict[str, int] = {}
    for t, mods in paths.items():
        for m in mods:
            users.setdefault(m["id"], set()).add(t)
            params[m["id"]] = m["params"]
    root_ids = set(root.ids)
    seen = set(root_ids)
    per_task = {}
    for t in order:
        mods = paths[t]
        ids = list(dict.fromkeys(m["id"] for m in mods))
        added = [i for i in ids if i not in seen]
        seen.update(ids)
        per_task[t] = {
            "added_params": sum(params[i] for i in added),
            "added_modules": [f"{next(m['kind'] for m in mods if m['id'] == i)}:{i[:8]}" for i in added],
            "unique_params": sum(params[i] for i in ids if users[i] == {t} and i not in root_ids),
            "path_params": sum(params[i] for i in ids),
            "root_modules_used": sum(i in root_ids for i in ids),
        }
    system = {"modules": len(params), "params": sum(params.values()),
              "root_params_in_use": sum(params[i] for i in params if i in root_ids)}
    return per_task, system
