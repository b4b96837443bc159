"""`munet bench quality`: is evolving a multitask system better than fine-tuning one model per task?

    munet bench quality            # the default run: ~1 h on 2 cores; writes bench-results/quality-<date>.*
    munet bench quality --quick    # a few minutes: uci_digits and animal_shapes, ~300 training images each

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

DEFAULT_TASKS = ["mnist", "fashion_mnist", "animal_shapes", "uci_digits", "emoji_noto"]
OPTIONAL_TASKS = ["emoji_subgroups"]  # added to the default list when load_builtin knows it
QUICK_TASKS = ["uci_digits", "animal_shapes"]
METHODS = ("probe", "finetune", "munet")
METHOD_NAMES = {"probe": "linear probe", "finetune": "full fine-tune", "munet": "munet-serve"}
# splits for data sets without their own (fractions of the whole set), stratified by label
VAL_FRACTION, TEST_FRACTION = 0.15, 0.2
LONG_BUDGET_S = 3600.0  # per candidate: the step cap, not the clock, ends training

T = TypeVar("T")
log = logging.getLogger("munet.bench.quality")


class BenchError(RuntimeError):
    """A benchmark cannot run (missing data, a server that did not start); reported, exit 2."""


def _say(msg: str) -> None:
    print(f"[bench quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    tasks: list[str] = field(default_factory=list)  # empty: the default list (+ optional ones present)
    max_train: int = 4000
    max_val: int = 1000
    max_test: int = 2000
    seed: int = 0
    budget: int = 24000  # examples processed per task and method (fine-tuning: all learning rates together)
    ft_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-4])
    ft_batch: int = 64
    ft_weight_decay: float = 0.05
    ft_evals: int = 3  # validation evaluations per fine-tuning run (the best one is kept, as munet does)
    generations: int = 3
    candidates: int = 4
    train_batch: int = 64  # munet's train_batch_size
    head_epochs: int = 30  # munet's head_train_epochs, also the probe's
    identity_inputs: int = 64  # fixed inputs per task for the bit-identity check (<= max_batch_size)
    threads: int = 2
    root: str = "mobilenet_v2_imagenet"  # a built-in root, or one imported into MUNET_HOME
    image_size: int = 0  # 0: the root's CPU input size
    out_dir: str | None = "bench-results"
    keep: bool = False
    verbose: bool = False
    json_out: bool = False  # print JSON instead of markdown
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"tasks": list(QUICK_TASKS), "max_train": 300, "max_val": 150, "max_test": 300,
                                  "budget": 1280, "generations": 2, "candidates": 2, "head_epochs": 15,
                                  "identity_inputs": 32, "ft_evals": 2, "quick": True}
        values.update(overrides)
        return cls(**values)

    @property
    def ft_steps(self) -> int:
        """Steps per fine-tuning run: the budget split evenly over the learning rates."""
        return max(1, round(self.budget / len(self.ft_lrs) / self.ft_batch))

    @property
    def munet_steps(self) -> int:
        """munet's candidate_max_steps: generations x candidates x steps x batch ~= budget."""
        return max(5, round(self.budget / (self.generations * self.candidates * self.train_batch)))


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class TaskData:
    name: str
    labels: list[str]
    x: dict[int, np.ndarray]  # split code -> (N, S, S, 3) uint8 at the root's input size
    y: dict[int, np.ndarray]  # split code -> (N,) int64
    split_source: str

    def sizes(self) -> dict[str, int]:
        from munet.data.splits import SPLIT_NAMES

        return {SPLIT_NAMES[s]: len(v) for s, v in self.y.items()}


def resolve_tasks(requested: list[str]) -> list[str]:
    from munet.data.builtin import BUILTIN, available_builtins

    if requested:
        unknown = [t for t in requested if t not in BUILTIN]
        if unknown:
            raise BenchError(f"unknown built-in task(s) {', '.join(unknown)}; known: {', '.join(BUILTIN)}")
        return list(dict.fromkeys(requested))
    present = available_builtins()
    tasks = [t for t in DEFAULT_TASKS + OPTIONAL_TASKS if t in present]
    missing = [t for t in DEFAULT_TASKS if t not in present]
    if missing:
        _say(f"skipping default task(s) whose data is not installed: {', '.join(missing)} (`make setup`)")
    if not tasks:
        raise BenchError("no built-in data set is installed; run `make setup`")
    return tasks


def prepare_task(name: str, s: Settings, size: int) -> TaskData:
    """The task's fixed split: the loader's own where it has one (official test sets), else a seeded,
    stratified one; each part capped by a seeded, stratified subsample, then converted to `size`."""
    from munet.data.builtin import BUILTIN
    from munet.data.images import batch_to_rgb
    from munet.data.splits import TEST, TRAIN, VALIDATION, split_indices, stratified_subsample

    ds = BUILTIN[name].load()  # native sizes: only the kept examples are converted
    if ds.split is not None and (ds.split == TEST).any() and (ds.split == VALIDATION).any():
        codes, source = np.asarray(ds.split), "load_builtin's split (the official test set where there is one)"
    else:
        codes = split_indices(ds.y, s.seed, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION)
        source = f"seeded stratified split (validation {VAL_FRACTION:.0%}, test {TEST_FRACTION:.0%})"
    x, y = {}, {}
    for code, cap in ((TRAIN, s.max_train), (VALIDATION, s.max_val), (TEST, s.max_test)):
        members = np.flatnonzero(codes == code)
        keep = members[stratified_subsample(ds.y[members], min(cap, len(members)), s.seed)]
        x[code] = batch_to_rgb(np.ascontiguousarray(ds.x[keep]), size)
        y[code] = np.asarray(ds.y[keep], dtype=np.int64)
    return TaskData(name, list(ds.labels), x, y, source)


# ---- the root -----------------------------------------------------------------------------------


@dataclass
class Root:
    name: str
    modules: list  # first module, layers..., head (eval mode, frozen)
    info: dict
    ids: list[str]  # content ids, exactly as the server's store names them
    params: list[int]
    builtin: bool
    image_size: int

    @property
    def trunk_params(self) -> int:
        return sum(self.params[:-1])


def load_root_model(s: Settings) -> Root:
    from munet.config import Config
    from munet.models.modules import count_params, module_config
    from munet.models.roots import BUILTIN_ROOTS, RootUnavailable, get_root_spec, input_size
    from munet.models.store import content_id

    try:
        spec = get_root_spec(s.root, Config.from_env().home)
        modules, info = spec.load()
    except RootUnavailable as e:
        raise BenchError(str(e)) from None
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    ids = [content_id(m.kind, module_config(m), m) for m in modules]
    return Root(s.root, modules, info, ids, [count_params(m) for m in modules], s.root in BUILTIN_ROOTS,
                input_size(spec, s.image_size))


# ---- method 1: linear probe ---------------------------------------------------------------------


def run_probe(root: Root, data: TaskData, s: Settings) -> dict:
    import torch

    from munet.data.splits import TEST, TRAIN, VALIDATION
    from munet.evolution.train import accuracy, fit_head, run_modules
    from munet.models.modules import count_params

    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    like = root.modules[-1]
    feats = {c: run_modules(root.modules[:-1], data.x[c], reduce=type(like).reduce) for c in (TRAIN, VALIDATION, TEST)}
    head, _ = fit_head(feats[TRAIN], data.y[TRAIN], len(data.labels), like=like, epochs=s.head_epochs, seed=s.seed)
    train_s = time.perf_counter() - t0
    val = accuracy(head, feats[VALIDATION], data.y[VALIDATION])
    test = accuracy(head, feats[TEST], data.y[TEST])
    n_head = count_params(head)
    return {"test_accuracy": test, "validation_accuracy": val, "added_params": n_head,
            "model_params": root.trunk_params + n_head, "network_examples": 0,
            "head_fit_examples": s.head_epochs * len(data.y[TRAIN]), "train_wall_s": round(train_s, 2),
            "recipe": f"root trunk frozen; new zero-init head (the ViT's final LayerNorm from the root) by AdamW "
                      f"lr 3e-3, {s.head_epochs} epochs, batch 256 on cached trunk outputs"}


# ---- method 2: full fine-tuning -----------------------------------------------------------------


def _finetune_once(root: Root, data: TaskData, s: Settings, lr: float) -> tuple[float, Any, int, float]:
    """One run: (best validation accuracy, the best model, steps, seconds)."""
    import torch
    import torch.nn.functional as F

    from munet.data.images import to_model_input
    from munet.data.splits import TRAIN, VALIDATION
    from munet.models.vit import Chain

    torch.manual_seed(s.seed)
    like = root.modules[-1]
    head = type(like).fresh(like.cfg.dim, len(data.labels), like=like)
    model = Chain([copy.deepcopy(m) for m in root.modules[:-1]] + [head])
    for p in model.parameters():
        p.requires_grad_(True)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.ft_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    xt = torch.from_numpy(to_model_input(data.x[TRAIN]))
    yt = torch.from_numpy(data.y[TRAIN])
    xv = torch.from_numpy(to_model_input(data.x[VALIDATION]))
    yv = data.y[VALIDATION]
    total = s.ft_steps
    warm = max(1, total // 10)
    eval_at = {max(1, round(total * (k + 1) / s.ft_evals)) for k in range(s.ft_evals)}
    g = torch.Generator().manual_seed(s.seed)
    batch = min(s.ft_batch, len(yt))
    order = torch.randperm(len(yt), generator=g)
    pos = 0
    best_acc, best_state = -1.0, None
    t0 = time.perf_counter()
    for step in range(total):
        if pos + batch > len(order):  # epochs: every example once before any twice
            order, pos = torch.randperm(len(yt), generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        lr_now = lr * (step + 1) / warm if step < warm else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        model.train()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 in eval_at:
            acc = _accuracy(model, xv, yv)
            if acc > best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best_acc, model, total * batch, time.perf_counter() - t0


def _accuracy(model: Any, x: Any, y: np.ndarray, batch: int = 500) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()
    return float((pred == y).mean()) if len(y) else float("nan")


def run_finetune(root: Root, data: TaskData, s: Settings) -> dict:
    import torch

    from munet.data.images import to_model_input
    from munet.data.splits import TEST
    from munet.models.modules import count_params

    torch.set_num_threads(s.threads)
    runs, best = [], None
    examples, secs = 0, 0.0
    for lr in s.ft_lrs:
        val, model, n, sec = _finetune_once(root, data, s, lr)
        examples += n
        secs += sec
        runs.append({"lr": lr, "validation_accuracy": val, "examples": n, "seconds": round(sec, 2)})
        if best is None or val > best[0]:
            best = (val, lr, model)
    assert best is not None
    val, lr, model = best
    test = _accuracy(model, torch.from_numpy(to_model_input(data.x[TEST])), data.y[TEST])
    n = count_params(model)
    return {"test_accuracy": test, "validation_accuracy": val, "lr": lr, "added_params": n, "model_params": n,
            "network_examples": examples, "head_fit_examples": 0, "train_wall_s": round(secs, 2), "runs": runs,
            "recipe": f"all parameters trainable (BatchNorm statistics frozen, as in munet); AdamW (wd {s.ft_weight_decay}, none on norms/biases/tokens), "
                      f"{s.ft_steps} steps of batch {s.ft_batch} per lr, 10% linear warm-up then cosine, "
                      f"grad clip 1.0, best of {s.ft_evals} validation evaluations kept; lr in "
                      f"{', '.join(f'{v:g}' for v in s.ft_lrs)} chosen on validation"}


# ---- method 3: munet-serve through its public API -----------------------------------------------


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
    from munet.data.splits import TEST

    return np.ascontiguousarray(data.x[TEST][:n])


def run_munet(server: MunetServer, data: TaskData, s: Settings, root: Root, earlier: dict[str, Any]) -> dict:
    """Register the task through the API, evolve it, test it by Predict; `earlier`: task -> Task view."""
    from munet.data.splits import TEST, TRAIN, VALIDATION

    c = server.client
    xs = np.concatenate([data.x[TRAIN], data.x[VALIDATION], data.x[TEST]])
    ys = np.concatenate([data.y[TRAIN], data.y[VALIDATION], data.y[TEST]])
    codes = np.concatenate([np.full(len(data.y[k]), k, np.int8) for k in (TRAIN, VALIDATION, TEST)])
    # the trunks the registration probes (munet.evolution.engine.InitialPaths.trunks): root + others' distinct
    root_trunk = tuple(root.ids[:-1])
    other = {tuple(m.id for m in t.path.modules[:-1]) for t in earlier.values() if t.path is not None}
    n_trunks = min(4, 1 + len(other - {root_trunk}))

    t0 = time.perf_counter()
    reg = c.register_task(data.name, labels=data.labels, examples=(xs, ys, codes), seed=s.seed)
    register_s = time.perf_counter() - t0
    if (reg.train_examples, reg.validation_examples, reg.test_examples) != tuple(len(data.y[k]) for k in
                                                                                 (TRAIN, VALIDATION, TEST)):
        raise BenchError(f"{data.name}: the server holds {reg.train_examples}/{reg.validation_examples}/"
                         f"{reg.test_examples} examples, the bench sent another split")
    initial = reg.path
    _say(f"  munet: registered {data.name} in {register_s:.1f} s (v{reg.current_version}, "
         f"validation {initial.validation_accuracy:.4f} from trunk of {initial.parent_task})")
    generations = []
    examples = 0
    evolve_s = 0.0
    batch = min(s.train_batch, len(data.y[TRAIN]))
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
    preds = _predict_all(c, data.name, data.x[TEST])
    predict_s = time.perf_counter() - t2
    pred = np.array([p[0].index for p in preds], dtype=np.int64)
    test = float(np.mean(pred == data.y[TEST])) if len(pred) else float("nan")
    fp = fingerprint(c, data.name, identity_inputs(data, s.identity_inputs), len(data.labels))
    path = task.path
    assert path is not None
    return {
        "test_accuracy": test, "validation_accuracy": path.validation_accuracy,
        "server_test_accuracy": path.test_accuracy, "version": task.current_version,
        "initial_validation_accuracy": initial.validation_accuracy, "initial_trunk_from": initial.parent_task,
        "network_examples": examples,
        "head_fit_examples": s.head_epochs * len(data.y[TRAIN]) * n_trunks, "trunks_probed": n_trunks,
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
    """Per task: added (modules new to the system when it came: not the root's, not an earlier task's),
    unique (used by no other task and not the root's) and accounted (params / tasks using the module).
    System: distinct modules in all current paths."""
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
            "accounted_params": sum(params[i] / len(users[i]) for i in ids),
            "path_params": sum(params[i] for i in ids),
            "root_modules_used": sum(i in root_ids for i in ids),
        }
    system = {"modules": len(params), "params": sum(params.values()),
              "root_params_in_use": sum(params[i] for i in params if i in root_ids)}
    return per_task, system


# ---- the run ------------------------------------------------------------------------------------


def machine_info(s: Settings) -> dict:
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": cpu or platform.processor(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": s.threads,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


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
    info = machine_info(s)
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
            results[name]["munet"]["server_accounted_params"] = t.path.accounted_params
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


# ---- reporting ----------------------------------------------------------------------------------


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


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="munet bench quality", description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--quick", action="store_true", help="a few minutes: two small tasks, tiny budget")
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
        _say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
