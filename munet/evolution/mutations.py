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

from munet.models.vit import Adapter, AdapterConfig, Block, BlockConfig

HP_LISTS: dict[str, list] = {
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

DEFAULT_HPARAMS: dict = {
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


def new_adapter(dim: int, hidden: int) -> Adapter:
    return Adapter(AdapterConfig(dim, hidden))  # zero up-projection: the identity at insertion


def identity_block(like: BlockConfig) -> Block:
    return Block(BlockConfig(like.dim, like.heads, like.mlp_hidden, like.head_dim)).identity_init()


@torch.no_grad()
def widen_mlp(block: Block, extra: int, rng: np.random.Generator) -> Block:
    """MLP expansion (Gesmundo & Maile 2023): new fc1 rows are random, the new fc2 columns zero."""
    c = block.cfg
    wide = Block(BlockConfig(c.dim, c.heads, c.mlp_hidden + extra, c.head_dim))
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
    grown = Block(BlockConfig(c.dim, h2, c.mlp_hidden, c.head_dim))
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


# ---- whole-path mutation ------------------------------------------------------------------------


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

    `parent_modules` are (id, module) for embed, layers..., head. The head is the task's own current
    head (cloned) even when the parent is another task's path: its classes are this task's.
    Modules in `own` (this task's alone: neither the root's nor in another task's path) are always
    cloned, as muNet keeps training a task's unlocked components; the rest with probability mu.
    """
    mu = float(parent_hparams.get("mu", DEFAULT_HPARAMS["mu"]))
    hp, muts = mutate_hparams(parent_hparams, rng, mu)
    mu = hp["mu"]
    embed = parent_modules[0]
    layers = list(parent_modules[1:-1])

    # layer removal / restoration: the number of blocks moves by one
    blocks = [i for i, (_, m) in enumerate(layers) if m.kind == "block"]
    if rng.random() < mu:
        if rng.random() < 0.5 and len(blocks) > 1:
            layers = layers[: blocks[-1]]
            muts.append("remove_layer")
        elif len(blocks) < len(root_blocks):
            layers.append(root_blocks[len(blocks)])
            muts.append(f"restore_layer:{len(blocks)}")
        elif len(blocks) < max_blocks:
            layers.append(("", identity_block(layers[blocks[-1]][1].cfg)))
            muts.append("add_layer")

    slots: list[Slot] = []
    embed_slot = Slot(module_id=embed[0])
    if embed[0] in own or rng.random() < mu:
        embed_slot = Slot(module=clone(embed[1]), origin=f"clone:{embed[0]}")
        muts.append("clone:embed")
    slots.append(embed_slot)
    dim = embed[1].cfg.dim
    for pos, (mid, m) in enumerate(layers):
        if not mid:
            slots.append(Slot(module=m, origin="new:block"))
        elif mid in own or rng.random() < mu:
            c = clone(m)
            muts.append(f"clone:{m.kind}{pos}")
            if m.kind == "block" and rng.random() < mu:
                if rng.random() < 0.5:
                    c = widen_mlp(c, c.cfg.mlp_hidden // 2, rng)
                    muts.append(f"widen_mlp:{pos}")
                else:
                    c = add_heads(c, 1, rng)
                    muts.append(f"add_head:{pos}")
            slots.append(Slot(module=c, origin=f"clone:{mid}"))
        else:
            slots.append(Slot(module_id=mid))
        if m.kind == "block" and rng.random() < mu:
            slots.append(Slot(module=new_adapter(dim, int(hp["adapter_dim"])), origin="new:adapter"))
            muts.append(f"insert_adapter:{pos}")
    block_cfgs = [m.cfg for _, m in layers if m.kind == "block"]
    if block_cfgs and rng.random() < mu / 2:
        at = int(rng.integers(1, len(slots) + 1))  # anywhere after the embedding, before the head
        slots.insert(at, Slot(module=identity_block(block_cfgs[0]), origin="new:block"))
        muts.append(f"insert_block:{at}")
    slots.append(Slot(module=clone(own_head), origin="clone:head"))
    return Candidate(task, parent_task, parent_version, slots, hp, muts)
