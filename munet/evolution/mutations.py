"""muNet's mutations over a path, as named functions, each with its function-preservation property.

A candidate is a list of slots: a stored module (frozen, shared) or a new trainable module (a clone,
an identity-initialised insertion, an expansion). Stored modules are never changed: that is what
makes every other task immune to this task's evolution.

Value lists follow muNet (Gesmundo & Dean 2022, `exp_config_add_auto_tune`) and mu2Net's mutated
mutation probability; deviations for our 32x32, 0.5M-parameter root are marked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from munet.models import mobilenet
from munet.models.vit import Adapter, AdapterConfig, Block, BlockConfig

HP_LISTS: dict[str, list] = {
    # beyond muNet's SGD: AdamW moves a cloned pretrained block much further in the few steps a
    # candidate gets (full fine-tuning in the quality bench uses AdamW too); it steps at a tenth of
    # opt_lr (train.ADAMW_LR_SCALE), so the default 0.01 is AdamW's usual 1e-3
    "opt_optimizer": ["sgd", "adamw"],
    "opt_lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1],
    "opt_lr_schedule": ["constant", "cosine", "restarts"],
    "opt_lr_warmup_ratio": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4],
    "opt_momentum": [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],  # muNet's None is 0.0 here
    "adapter_dim": [8, 16, 32, 64, 128],
    # muNet's crop area/aspect lists suit 80-384 px images; at 32 px we shift by whole pixels instead
    "ds_translate_px": [0, 1, 2, 3, 4],
    "ds_flip_left_right": [False, True],
    "ds_brightness_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "ds_contrast_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "mu": [round(0.10 + 0.02 * i, 2) for i in range(11)],  # mu2Net: the mutation rate mutates too
}

# Beyond muNet: a contiguous run of layers cloned together, with this probability per candidate. muNet
# clones each layer independently at rate mu, which on an 18-block CNN gives a few scattered clones;
# a far domain (digits, drawings on ImageNet features) needs a whole stage to move, and a candidate
# gets ~100 steps here, not muNet's thousands. `munet bench spans` (README, quality): blocks 8-14
# cloned together and trained alone for 94 steps matched fine-tuning every layer on animal_shapes
# (96.6% vs 96.2% test) and MNIST (98.7% both) at 28% of its parameters.
# A span candidate is that and nothing else: no scattered clones, adapters, widenings, layer moves or
# hyperparameter steps on top. Mixed in, they made it a lottery: MNIST's span candidate in the six-task
# run of 2026-11-28 09:55 UTC also widened three blocks with random filters and stepped to the restarts
# schedule, and reached 84.0% validation against the probe's 92.6%. The other candidates stay muNet's.
# Where a span sits: it ends in the upper middle of the path, its last layer drawn uniformly from
# half to three quarters of the depth (MobileNetV2: blocks 10-14 of 17), and reaches down by its
# length. Drawn anywhere, spans were a second lottery: in the six-task runs of 2026-11-28 (seeds 0
# and 1) the spans that moved a task ended at blocks 9-15 (fashion_mnist 0.823 -> 0.882 validation,
# uci_digits 0.958 -> 0.978, emoji_subgroups 0.786 -> 0.815, MNIST 0.916 -> 0.974), while one at
# blocks 4-6 gained nothing and one over the top blocks and conv lost 2.2 points. The top of a CNN
# is also where the parameters are (MobileNetV2's blocks 15-17 and final conv: 1.5M of 2.2M), which
# scale control pays for; muNet's scattered clones still reach those layers.
SPAN_PROB = 0.5
SPAN_MIN = 2
SPAN_END = (0.5, 0.75)  # the span's last layer, as a fraction of the path's layers (both ends drawn)

DEFAULT_HPARAMS: dict = {
    "opt_optimizer": "adamw",
    "opt_lr": 0.01, "opt_lr_schedule": "cosine", "opt_lr_warmup_ratio": 0.1, "opt_momentum": 0.9,
    "adapter_dim": 32, "ds_translate_px": 0, "ds_flip_left_right": False, "ds_brightness_delta": 0.0,
    "ds_contrast_delta": 0.0, "mu": 0.2,
}


@dataclass
class Slot:
    module_id: str | None = None  # a stored, frozen module
    module: nn.Module | None = None  # or a new trainable one
    origin: str = ""

    @property
    def trainable(self) -> bool:
        return self.module is not None

    @property
    def kind(self) -> str:
        return self.module.kind if self.module is not None else ""


@dataclass
class Candidate:
    task: str
    parent_task: str
    parent_version: int | None
    slots: list[Slot]
    hparams: dict
    mutations: list[str] = field(default_factory=list)

    def frozen_prefix(self) -> list[str]:
        out = []
        for s in self.slots:
            if s.trainable:
                break
            out.append(s.module_id)
        return out

    def trainable_modules(self) -> list[nn.Module]:
        return [s.module for s in self.slots if s.trainable]


def incremental_mutation(value, values: list, rng: np.random.Generator):
    """Step one place up or down a fixed list, clipped at its ends (muNet's `incremental_mutation`)."""
    try:
        i = values.index(value)
    except ValueError:
        i = int(np.argmin([abs(v - value) if isinstance(v, int | float) else 1 for v in values]))
    j = min(len(values) - 1, max(0, i + (1 if rng.random() < 0.5 else -1)))
    return values[j]


def mutate_hparams(hparams: dict, rng: np.random.Generator, mu: float) -> tuple[dict, list[str]]:
    out = {**DEFAULT_HPARAMS, **hparams}
    changes = []
    for key, values in HP_LISTS.items():
        if rng.random() < mu:
            new = incremental_mutation(out[key], values, rng)
            if new != out[key]:
                changes.append(f"hp:{key}={new}")
            out[key] = new
    return out, changes


# ---- module surgery: each keeps the path's function unchanged until training ---------------------


def clone(module: nn.Module) -> nn.Module:
    """A trainable copy; the original stays frozen and shared."""
    m = copy.deepcopy(module)
    for p in m.parameters():
        p.requires_grad_(True)
    return m.train()


def new_adapter(dim: int, hidden: int, eps: float = 1e-5) -> Adapter:
    return Adapter(AdapterConfig(dim, hidden, eps))  # zero up-projection: the identity at insertion


def identity_block(like: BlockConfig) -> Block:
    return Block.identity(like)


@torch.no_grad()
def widen_mlp(block: Block, extra: int, rng: np.random.Generator) -> Block:
    """MLP expansion (Gesmundo & Maile 2023): new fc1 rows are random, the new fc2 columns zero."""
    c = block.cfg
    wide = Block(BlockConfig(c.dim, c.heads, c.mlp_hidden + extra, c.head_dim, c.eps))
    sd = wide.state_dict()
    for k, v in block.state_dict().items():
        if k.startswith("mlp."):
            continue
        sd[k] = v.clone()
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    fc1_w = torch.randn(c.mlp_hidden + extra, c.dim, generator=g) * 0.02
    fc1_w[: c.mlp_hidden] = block.mlp.fc1.weight
    fc1_b = torch.zeros(c.mlp_hidden + extra)
    fc1_b[: c.mlp_hidden] = block.mlp.fc1.bias
    fc2_w = torch.zeros(c.dim, c.mlp_hidden + extra)
    fc2_w[:, : c.mlp_hidden] = block.mlp.fc2.weight
    sd.update({"mlp.fc1.weight": fc1_w, "mlp.fc1.bias": fc1_b, "mlp.fc2.weight": fc2_w,
               "mlp.fc2.bias": block.mlp.fc2.bias.clone()})
    wide.load_state_dict(sd)
    return wide


@torch.no_grad()
def add_heads(block: Block, extra: int, rng: np.random.Generator) -> Block:
    """Head addition (Gesmundo & Maile 2023): new heads' Q/K/V are random, their output projection zero."""
    c = block.cfg
    h2 = c.heads + extra
    grown = Block(BlockConfig(c.dim, h2, c.mlp_hidden, c.head_dim, c.eps))
    sd = grown.state_dict()
    for k, v in block.state_dict().items():
        if not k.startswith("attn."):
            sd[k] = v.clone()
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    old_w, old_b = block.attn.qkv.weight, block.attn.qkv.bias  # rows: [q heads | k heads | v heads]
    w = torch.randn(3 * h2 * c.head_dim, c.dim, generator=g) * 0.02
    b = torch.zeros(3 * h2 * c.head_dim)
    n_old, n_new = c.heads * c.head_dim, h2 * c.head_dim
    for part in range(3):
        w[part * n_new: part * n_new + n_old] = old_w[part * n_old:(part + 1) * n_old]
        b[part * n_new: part * n_new + n_old] = old_b[part * n_old:(part + 1) * n_old]
    proj_w = torch.zeros(c.dim, n_new)
    proj_w[:, :n_old] = block.attn.proj.weight
    sd.update({"attn.qkv.weight": w, "attn.qkv.bias": b, "attn.proj.weight": proj_w,
               "attn.proj.bias": block.attn.proj.bias.clone()})
    grown.load_state_dict(sd)
    return grown


# ---- family dispatch: what a layer of each root family can grow ---------------------------------


def is_conv(module: nn.Module) -> bool:
    return module.kind in mobilenet.MODULE_KINDS


def in_dim(module: nn.Module) -> int | None:
    """Channels (or width) a layer reads; None for a first module (it reads pixels)."""
    cfg = module.cfg
    if module.kind in ("embed", "conv_stem"):
        return None
    for name in ("inp", "channels", "dim"):
        if hasattr(cfg, name):
            return int(getattr(cfg, name))
    return None


def adapter_after(module: nn.Module, hidden: int) -> nn.Module:
    """A residual adapter that fits after `module`, the identity at insertion."""
    if is_conv(module):
        return mobilenet.ConvAdapter(mobilenet.ConvAdapterConfig(module.out_dim, hidden))
    return Adapter(AdapterConfig(module.out_dim, hidden, getattr(module.cfg, "eps", 1e-5)))


def identity_layer_after(module: nn.Module) -> nn.Module | None:
    """A new identity-initialised layer that fits after `module`, or None where the family has none
    of a sensible size (after MobileNetV2's 1280-channel last conv a block would hold 20M weights)."""
    if isinstance(module, Block):
        return identity_block(module.cfg)
    if isinstance(module, mobilenet.InvertedResidual):
        return mobilenet.InvertedResidual.identity(module.cfg.oup)
    return None


def expansions(module: nn.Module) -> list[tuple[str, object]]:
    """Function-preserving expansions a cloned layer may take: (name, fn(module, rng) -> module)."""
    if isinstance(module, Block):
        return [("widen_mlp", lambda m, rng: widen_mlp(m, m.cfg.mlp_hidden // 2, rng)),
                ("add_head", lambda m, rng: add_heads(m, 1, rng))]
    if isinstance(module, mobilenet.InvertedResidual) and module.cfg.expand:
        return [("widen", lambda m, rng: m.widen(m.cfg.hidden // 2, rng))]
    return []


def new_head_like(head: nn.Module, dim: int) -> nn.Module:
    """A new head for the same classes reading `dim` features (after layers were removed or restored)."""
    return type(head).fresh(dim, head.cfg.num_classes, like=head)


# ---- whole-path mutation ------------------------------------------------------------------------


def clone_span(layers: list[tuple[str, nn.Module]], rng: np.random.Generator) -> set[int]:
    """Positions of a contiguous run of layers to clone together (SPAN_PROB per candidate; empty
    otherwise): between SPAN_MIN layers and half of them, ending in the SPAN_END part of the path."""
    n = len(layers)
    if n < SPAN_MIN or rng.random() >= SPAN_PROB:
        return set()
    lo = max(SPAN_MIN - 1, int(n * SPAN_END[0]))
    end = int(rng.integers(lo, max(lo, min(n - 1, int(n * SPAN_END[1]))) + 1))
    length = int(rng.integers(SPAN_MIN, max(SPAN_MIN, n // 2) + 1))
    return set(range(max(0, end - length + 1), end + 1))


def mutate_path(
    task: str,
    parent_modules: list[tuple[str, nn.Module]],
    parent_task: str,
    parent_version: int | None,
    parent_hparams: dict,
    own_head: nn.Module,
    root_blocks: list[tuple[str, nn.Module]],
    rng: np.random.Generator,
    max_blocks: int,
    own: set[str] = frozenset(),
) -> Candidate:
    """A child of `parent`: stored modules stay frozen unless cloned; the head always trains.

    `parent_modules` are (id, module) for the first module (embedding or stem), layers..., head;
    `root_blocks` the root's layers after its first module, in order (what a removed top layer is
    restored from). The head is the task's own current head (cloned) even when the parent is
    another task's path: its classes are this task's; when the layers end in another width than it
    reads, a new head of that width is trained instead. Modules in `own` (this task's alone: neither
    the root's nor in another task's path) are always cloned, as muNet keeps training a task's
    unlocked components; the rest with probability mu each, or, with SPAN_PROB, a contiguous run of
    layers together and no other change (`clone_span`). Works for every root family: what a layer can
    grow is asked of `adapter_after`, `identity_layer_after` and `expansions`.
    """
    first = parent_modules[0]
    layers = list(parent_modules[1:-1])
    span = clone_span(layers, rng)
    if span:  # a focused candidate (SPAN_PROB's comment): the span, the task's own modules, the head
        hp, muts = {**DEFAULT_HPARAMS, **parent_hparams}, [f"clone_span:{min(span)}-{max(span)}"]
        mu = 0.0
    else:
        mu = float(parent_hparams.get("mu", DEFAULT_HPARAMS["mu"]))
        hp, muts = mutate_hparams(parent_hparams, rng, mu)
        mu = hp["mu"]

    # layer removal / restoration: the number of (non-adapter) layers moves by one
    depth = [i for i, (_, m) in enumerate(layers) if m.kind not in ("adapter", "conv_adapter")]
    if rng.random() < mu:
        top = layers[depth[-1]][1] if depth else first[1]
        restore = root_blocks[len(depth)] if len(depth) < len(root_blocks) else None
        if rng.random() < 0.5 and len(depth) > 1:
            layers = layers[: depth[-1]]  # the top layer and any adapter after it
            muts.append("remove_layer")
        elif restore is not None and in_dim(restore[1]) == top.out_dim:
            layers.append(restore)
            muts.append(f"restore_layer:{len(depth)}")
        elif len(depth) < max_blocks and restore is None:
            new = identity_layer_after(top)
            if new is not None:
                layers.append(("", new))
                muts.append("add_layer")

    slots: list[Slot] = []
    first_slot = Slot(module_id=first[0])
    if first[0] in own or rng.random() < mu:
        first_slot = Slot(module=clone(first[1]), origin=f"clone:{first[0]}")
        muts.append(f"clone:{first[1].kind}")
    slots.append(first_slot)
    for pos, (mid, m) in enumerate(layers):
        if not mid:
            slots.append(Slot(module=m, origin=f"new:{m.kind}"))
        elif mid in own or pos in span or rng.random() < mu:
            c = clone(m)
            if pos not in span:
                muts.append(f"clone:{m.kind}{pos}")
            grow = expansions(c)
            if grow and rng.random() < mu:
                name, fn = grow[int(rng.integers(len(grow)))] if len(grow) > 1 else grow[0]
                c = fn(c, rng)
                muts.append(f"{name}:{pos}")
            slots.append(Slot(module=c, origin=f"clone:{mid}"))
        else:
            slots.append(Slot(module_id=mid))
        if m.kind not in ("adapter", "conv_adapter") and rng.random() < mu:
            slots.append(Slot(module=adapter_after(m, int(hp["adapter_dim"])), origin="new:adapter"))
            muts.append(f"insert_adapter:{pos}")
    if layers and rng.random() < mu / 2:
        # an identity layer anywhere after the first module, where one fits what comes before it
        at = int(rng.integers(1, len(slots) + 1))
        before = slots[at - 1]
        prev = before.module if before.trainable else dict(parent_modules + layers).get(before.module_id)
        new = identity_layer_after(prev) if prev is not None else None
        if new is not None:
            slots.insert(at, Slot(module=new, origin=f"new:{new.kind}"))
            muts.append(f"insert_block:{at}")
    last = layers[-1][1] if layers else first[1]
    if slots[-1].trainable:
        last = slots[-1].module
    width = last.out_dim
    if width == own_head.cfg.dim:
        slots.append(Slot(module=clone(own_head), origin="clone:head"))
    else:
        slots.append(Slot(module=new_head_like(own_head, width), origin="new:head"))
        muts.append(f"new_head:{width}")
    return Candidate(task, parent_task, parent_version, slots, hp, muts)
