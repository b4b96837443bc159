"""What every trainer here shares (the root's pretraining, evolution's candidates and head fits, the
quality bench's fine-tuning): the warm-up + cosine learning-rate schedule and accuracy in batches."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def cosine(progress: float, peak: float) -> float:
    """Half a cosine from `peak` at progress 0 down to 0 at progress 1 (and after)."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """The learning rate at 0-based `step` of `total`: a linear ramp to `peak` over `warmup` steps,
    starting at peak / warmup (a first step at 0 would be wasted), then `cosine` down to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine((step - warmup) / max(1, total - warmup), peak)


@torch.no_grad()
def predict_classes(model: nn.Module, feats: torch.Tensor, batch: int = 512) -> np.ndarray:
    """The arg-max class of each input, `batch` at a time, in eval mode."""
    model.eval()
    out = [model(feats[i:i + batch].float()).argmax(1).numpy() for i in range(0, len(feats), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy(model: nn.Module, feats: torch.Tensor, y: np.ndarray, batch: int = 512) -> float:
    """The share of inputs whose predicted class is `y`; 0.0 for no inputs, so an empty validation
    set can never make a candidate look best."""
    if len(y) == 0:
        return 0.0
    return float((predict_classes(model, feats, batch) == y).mean())
