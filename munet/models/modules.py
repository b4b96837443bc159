"""Every module kind a path can hold, across root families: kind name -> (class, config class).

A module's identity is (kind, config, weights); the store rebuilds any stored module from its kind
and config alone, so each family's kinds are registered here once.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from munet.models import mobilenet, vit

MODULE_KINDS: dict[str, tuple[type[nn.Module], type]] = {**vit.MODULE_KINDS, **mobilenet.MODULE_KINDS}
HEAD_KINDS = {"head", "pool_head"}
ADAPTER_KINDS = {"adapter", "conv_adapter"}


def build_module(kind: str, config: dict) -> nn.Module:
    try:
        cls, cfg_cls = MODULE_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown module kind {kind!r}; known: {', '.join(MODULE_KINDS)}") from None
    return cls(cfg_cls(**config))


def module_config(module: nn.Module) -> dict:
    return asdict(module.cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
