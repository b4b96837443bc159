"""The root Vision Transformer, cut into the modules that muNet paths are made of.

A path is a chain of modules, each with its own weights and its own ONNX graph:

    embed:   (B, 3, H, W) float in [0, 1]  ->  (B, T, D)   patch embedding + class token + position
    block:   (B, T, D) -> (B, T, D)                        pre-norm transformer block
    adapter: (B, T, D) -> (B, T, D)                        residual adapter (muNet's layer insertion)
    head:    (B, T, D) -> (B, C)                           final norm on the class token + linear

Every module kind is a plain nn.Module built from a small typed config, so a module's identity is
(kind, config, weights) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 20

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class EmbedConfig:
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    dim: int = 96
    # input normalisation: (x - mean) / std on [0, 1] pixels (timm's augreg ViTs use 0.5 too)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):  # JSON gives lists back; keep tuples so configs compare alike
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class BlockConfig:
    dim: int = 96
    heads: int = 4
    mlp_hidden: int = 384
    head_dim: int = 24  # kept explicit so "add heads" can grow heads without changing dim
    eps: float = 1e-5  # LayerNorm epsilon (timm's ViTs use 1e-6)


@dataclass(frozen=True)
class AdapterConfig:
    dim: int = 96
    hidden: int = 32
    eps: float = 1e-5


@dataclass(frozen=True)
class HeadConfig:
    dim: int = 96
    num_classes: int = 10
    eps: float = 1e-5


class PatchEmbed(nn.Module):
    kind = "embed"

    def __init__(self, cfg: EmbedConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, cfg.dim) * 0.02)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    @property
    def num_tokens(self) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2 + 1

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.rand(batch, self.cfg.in_chans, self.cfg.image_size, self.cfg.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inputs arrive as [0, 1] floats; normalising here keeps clients and ONNX free of it
        x = (x - self.mean) / self.std
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.heads * self.head_dim, dim=2)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        # plain matmuls instead of nn.MultiheadAttention: its eval fast path does not export to ONNX
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        y = att.softmax(dim=-1) @ v  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    kind = "block"

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_hidden)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def example_input(self, batch: int = 2, tokens: int = 65) -> torch.Tensor:
        return torch.randn(batch, tokens, self.cfg.dim)

    @classmethod
    def identity(cls, like: BlockConfig) -> Block:
        """A new block with `like`'s shape that adds nothing until trained."""
        return cls(like).identity_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x

    @torch.no_grad()
    def identity_init(self) -> Block:
        # zero output projections make both residual branches add nothing: the block is the
        # identity until trained (muNet layer insertion, Gesmundo & Maile 2023 layer addition)
        for lin in (self.attn.proj, self.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        return self


class Adapter(nn.Module):
    kind = "adapter"

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.down = nn.Linear(cfg.dim, cfg.hidden)
        self.up = nn.Linear(cfg.hidden, cfg.dim)
        # zero up-projection: a freshly inserted adapter leaves the path's function unchanged
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def example_input(self, batch: int = 2, tokens: int = 65) -> torch.Tensor:
        return torch.randn(batch, tokens, self.cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class Head(nn.Module):
    kind = "head"

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # the encoder's final norm: logically part of the head
        self.fc = nn.Linear(cfg.dim, cfg.num_classes)

    def example_input(self, batch: int = 2, tokens: int = 65) -> torch.Tensor:
        return torch.randn(batch, tokens, self.cfg.dim)

    @staticmethod
    def reduce(features: torch.Tensor) -> torch.Tensor:
        """The smallest input that gives the same logits: the class token, (N, 1, D)."""
        return features[:, :1]

    @classmethod
    def fresh(cls, dim: int, num_classes: int, like: Head | None = None) -> Head:
        """A new head for `num_classes`: zero logits; the final norm copied from `like` when given."""
        head = cls(HeadConfig(dim, num_classes, like.cfg.eps if like is not None else 1e-5))
        if like is not None and like.cfg.dim == dim:
            head.norm.load_state_dict(like.norm.state_dict())
        nn.init.zeros_(head.fc.weight)
        nn.init.zeros_(head.fc.bias)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))  # (B, C) logits from the class token


MODULE_KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "embed": (PatchEmbed, EmbedConfig),
    "block": (Block, BlockConfig),
    "adapter": (Adapter, AdapterConfig),
    "head": (Head, HeadConfig),
}


@dataclass
class RootModel:
    """The root network as a list of modules; `forward` is the chain a path runs."""

    config: ViTConfig
    modules: list[nn.Module] = field(default_factory=list)

    @classmethod
    def create(cls, config: ViTConfig, seed: int = 0) -> RootModel:
        torch.manual_seed(seed)
        c = config
        mods: list[nn.Module] = [PatchEmbed(EmbedConfig(c.image_size, c.patch_size, c.in_chans, c.dim))]
        for _ in range(c.depth):
            mods.append(Block(BlockConfig(c.dim, c.heads, int(c.dim * c.mlp_ratio), c.dim // c.heads)))
        mods.append(Head(HeadConfig(c.dim, c.num_classes)))
        for m in mods:
            _init_weights(m)
        return cls(c, mods)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Chain(nn.Module):
    """A path's modules run in order: the torch twin of the ONNX session chain."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.mods = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            x = m(x)
        return x


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
