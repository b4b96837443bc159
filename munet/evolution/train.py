"""Training on a path: frozen-prefix feature caching, head fitting, evaluation."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from munet.data.images import to_model_input
from munet.models.export import ensure_onnx
from munet.models.store import Store
from munet.models.training import accuracy, cosine, warmup_cosine

log = logging.getLogger(__name__)


@torch.no_grad()
def run_modules(modules: list[nn.Module], x_u8: np.ndarray, batch: int = 256,
                dtype: torch.dtype = torch.float32, reduce=None) -> torch.Tensor:
    """Outputs of a frozen chain of modules for uint8 images, computed once and kept (the cache).

    `reduce` (a head's `reduce`) keeps only what a head reads of each batch's outputs."""
    outs = []
    for i in range(0, len(x_u8), batch):
        t = torch.from_numpy(to_model_input(x_u8[i:i + batch]))
        for m in modules:
            t = m(t)
        outs.append((reduce(t) if reduce is not None else t).to(dtype))
    if not outs:
        return torch.zeros(0)
    return torch.cat(outs)


class _TorchSession:
    """The `run` interface of an InferenceSession over a torch module (FrozenRunner's fallback)."""

    def __init__(self, module: nn.Module):
        self.module = module.eval()

    @torch.no_grad()
    def run(self, _outputs, feeds: dict) -> list[np.ndarray]:
        return [self.module(torch.from_numpy(feeds["x"])).numpy()]


class FrozenRunner:
    """Outputs of stored (frozen) modules through ONNX Runtime, for prefix caches and head probes.

    Frozen modules never train, so they need no autograd: their ONNX graphs (exported once, beside
    their weights) run MobileNetV2 about 3x faster than torch eager on this CPU (measured: 200 vs
    69 images/s at 96 px on one thread). Sessions use the training thread budget and no spinning,
    so serving keeps its cores.
    """

    def __init__(self, store: Store, threads: int = 1):
        self.store = store
        self.threads = max(1, threads)
        self._sessions: dict[str, object] = {}

    def session(self, module_id: str):
        s = self._sessions.get(module_id)
        if s is None:
            import onnxruntime as ort

            from munet.ort_threads import session_options

            so = session_options(self.threads)  # the server's shared pool when it runs in the server
            # no arena: these sessions run whole data sets in large batches once and then sit idle; an
            # arena would keep each one's peak (hundreds of MB for early MobileNetV2 blocks) for good
            so.enable_cpu_mem_arena = False
            try:
                s = ort.InferenceSession(ensure_onnx(self.store, module_id), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - an export or load failure must not stop evolution
                # the promotion gate reports a module that does not export; scoring still needs its outputs
                log.warning("module %s does not run in ONNX Runtime (%s); using torch for it", module_id, e)
                s = _TorchSession(self.store.load_module(module_id))
            if len(self._sessions) > 64:  # bounded: evolution visits many prefixes over time
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[module_id] = s
        return s

    def run(self, module_ids: list[str], x_u8: np.ndarray, batch: int = 64, dtype: torch.dtype = torch.float32,
            reduce=None) -> torch.Tensor:
        sessions = [self.session(m) for m in module_ids]
        outs = []
        for i in range(0, len(x_u8), batch):
            y = to_model_input(x_u8[i:i + batch])
            for s in sessions:
                y = s.run(None, {"x": y})[0]
            t = torch.from_numpy(y)
            outs.append((reduce(t) if reduce is not None else t).to(dtype))
        if not outs:
            return torch.zeros(0)
        return torch.cat(outs)


def fit_head(
    features: torch.Tensor,
    y: np.ndarray,
    num_classes: int,
    like: nn.Module,
    epochs: int = 30,
    lr: float = 3e-3,
    batch: int = 256,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """A new head of `like`'s kind, trained on cached trunk outputs (only what the head reads of them:
    `like.reduce`, the ViT's class token or the CNN's pooled features)."""
    torch.manual_seed(seed)
    cls = type(like).reduce(features).float().clone()
    dim = cls.shape[-1] if cls.ndim == 3 else cls.shape[1]
    head = type(like).fresh(dim, num_classes, like=like)  # the ViT's pretrained final norm is kept
    yt = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * math.ceil(len(yt) / batch))
    warm = max(1, steps // 10)
    def factor(s: int) -> float:  # linear warm-up, then cosine to zero
        return warmup_cosine(s, steps, warm, 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(head(cls[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    return head, time.perf_counter() - t0


class PrefixCache:
    """Outputs of a frozen path prefix for a task's examples, computed once and reused.

    Keyed by the prefix's module ids (content hashes: a different prefix is a different key) and the
    task's examples version (new examples make a new key). Held as float16 to halve memory; an LRU
    bound keeps the cache from growing without limit.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._items: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute) -> torch.Tensor:
        t = self._items.pop(key, None)
        if t is None:
            self.misses += 1
            t = compute().to(torch.float16)
        else:
            self.hits += 1
        self._items[key] = t  # most recently used last
        while sum(v.numel() * v.element_size() for v in self._items.values()) > self.max_bytes and len(self._items) > 1:
            self._items.pop(next(iter(self._items)))
        return t

    def clear(self) -> None:
        self._items.clear()


def augment(x: torch.Tensor, hp: dict, g: torch.Generator) -> torch.Tensor:
    """Pixel-level augmentation of a (B, 3, H, W) [0, 1] batch, as the hyperparameters ask."""
    shift = int(hp.get("ds_translate_px", 0))
    if shift:
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if hp.get("ds_flip_left_right") and bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(3)
    b = float(hp.get("ds_brightness_delta", 0.0))
    c = float(hp.get("ds_contrast_delta", 0.0))
    if b or c:
        bright = (torch.rand(len(x), 1, 1, 1, generator=g) * 2 - 1) * b
        contrast = 1 + (torch.rand(len(x), 1, 1, 1, generator=g) * 2 - 1) * c
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + bright).clamp(0, 1)
    return x


# AdamW's step does not scale with the gradient as SGD's does: it runs at a tenth of opt_lr, so one
# list of learning rates serves both optimizers (0.01 -> 1e-3). Weight decay as full fine-tuning's.
ADAMW_LR_SCALE = 0.1
ADAMW_WEIGHT_DECAY = 0.05


def lr_at(step: int, total: int, hp: dict, restarts: int = 3) -> float:
    """muNet's schedules: cosine with warm-up from lr/100, constant at lr/2, SGDR restarts.

    Restarts run one cosine cycle per validation interval, as muNet does: the cycles end exactly
    where `train_candidate` evaluates (after steps round(total * k / restarts)), so every evaluation
    sees the end of a cycle, never the first full-rate step of the next. The first cycle warms up
    like cosine: pretrained blocks under AdamW at the full rate from step 0 collapse (uci_digits span
    at lr 0.01: 44.6% validation before, 98.9% now, 99.6% with cosine; measured 2026-11-28, README
    Trains step). `restarts` is the number of evaluations `train_candidate` makes.
    """
    lr = float(hp["opt_lr"])
    kind = hp.get("opt_lr_schedule", "cosine")
    if kind == "constant":
        return 0.5 * lr
    warm = max(1, int(total * float(hp.get("opt_lr_warmup_ratio", 0.1))))
    if kind == "restarts":
        n, k = max(1, min(restarts, total)), 0
        while k < n - 1 and step >= round(total * (k + 1) / n):  # the evaluation steps' rounding
            k += 1
        start, end = round(total * k / n), round(total * (k + 1) / n)
        if k == 0:  # the first cycle warms up, as cosine does, within the cycle
            warm = start = min(warm, end - 1)
        else:
            warm = 0
        total = end
    else:
        start = warm
    if step < warm:
        return lr / 100 + (lr - lr / 100) * step / warm
    return cosine((step - start) / max(1, total - start), lr)


@torch.no_grad()
def _calibrate(model: nn.Module, modules: list[nn.Module], inputs: torch.Tensor, batch_size: int,
               g: torch.Generator, batches: int = 4) -> None:
    """BatchNorm statistics of newly inserted blocks, measured on their real inputs (the chain's
    output before them on a few training batches), then frozen (models/mobilenet.py says why)."""
    bns = [b for m in modules for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    if not bns:
        return
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batches
        bn.train()
    n = len(inputs)
    for _ in range(batches):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        model(inputs[idx].float())
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


@dataclass
class TrainResult:
    validation_accuracy: float
    steps: int
    seconds: float
    step_seconds: float
    cached_prefix: int  # modules whose outputs came from the cache


def train_candidate(
    chain: list[nn.Module],
    trainable: list[nn.Module],
    inputs_train: torch.Tensor,
    y_train: np.ndarray,
    inputs_val: torch.Tensor,
    y_val: np.ndarray,
    hp: dict,
    batch_size: int,
    max_steps: int,
    budget_s: float,
    raw_images: bool,
    seed: int = 0,
    should_pause=None,
    evals: int = 3,
    calibrate: list[nn.Module] = (),
) -> TrainResult:
    """Train the trainable modules of `chain`: AdamW or muNet's momentum SGD (hparam opt_optimizer),
    global-norm clipping at 1.0.

    `inputs_*` are raw (N, 3, 32, 32) images when `raw_images`, else cached prefix outputs. Every
    module not in `trainable` is frozen. The weights of the best validation evaluation are kept.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_ids = {id(m) for m in trainable}
    for m in chain:
        is_t = id(m) in train_ids
        m.train(is_t)
        for p in m.parameters():
            p.requires_grad_(is_t)
    params = [p for m in trainable for p in m.parameters()]
    momentum = float(hp.get("opt_momentum", 0.9))
    adamw = hp.get("opt_optimizer", "sgd") == "adamw"
    if adamw:
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=float(hp["opt_lr"]) * ADAMW_LR_SCALE,
                                                       weight_decay=ADAMW_WEIGHT_DECAY)
    else:
        opt = torch.optim.SGD(params, lr=float(hp["opt_lr"]), momentum=momentum, nesterov=momentum > 0)
    lr_scale = ADAMW_LR_SCALE if adamw else 1.0
    model = nn.Sequential(*chain)
    yt = torch.from_numpy(y_train.astype(np.int64))
    n = len(yt)
    if calibrate:
        _calibrate(model, calibrate, inputs_train, batch_size, g)
        for m in trainable:
            m.train()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.float())

    def evaluate() -> float:
        for m in trainable:
            m.eval()
        acc = accuracy(model, inputs_val, y_val)
        for m in trainable:
            m.train()
        return acc

    best_acc, best_state = -1.0, None
    t0 = time.perf_counter()
    total = max_steps
    step = 0
    paused = 0.0
    while step < total:
        if should_pause is not None and step % 10 == 0:
            p0 = time.perf_counter()
            while should_pause():
                time.sleep(0.2)
            paused += time.perf_counter() - p0
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        xb = inputs_train[idx].float()
        if raw_images:
            xb = augment(xb, hp, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, hp, restarts=evals) * lr_scale
        loss = F.cross_entropy(forward(xb), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step == 5:
            # the time budget caps the step count once the cost of a step is known
            per_step = (time.perf_counter() - t0 - paused) / 5
            total = max(step, min(max_steps, int(budget_s / max(per_step, 1e-4))))
        # `evals` evaluations spread evenly, the last at the final step
        if step == total or any(step == round(total * (k + 1) / evals) for k in range(evals - 1)):
            acc = evaluate()
            if acc > best_acc:
                best_acc = acc
                best_state = [copy.deepcopy(m.state_dict()) for m in trainable]
    if best_state is None:
        best_acc = evaluate()
    else:
        for m, sd in zip(trainable, best_state, strict=True):
            m.load_state_dict(sd)
    for m in chain:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    secs = time.perf_counter() - t0 - paused
    return TrainResult(best_acc, step, secs, secs / max(1, step), 0)
