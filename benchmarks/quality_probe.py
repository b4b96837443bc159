"""Method 1 of `munet bench quality`, the linear probe: the root trunk frozen, a new head fitted on its
cached outputs with the same `fit_head` munet's registration uses."""

from __future__ import annotations

import time

from benchmarks.quality_data import TaskData
from benchmarks.quality_root import Root
from benchmarks.quality_settings import Settings


def run_probe(root: Root, data: TaskData, s: Settings) -> dict:
    import torch

    from munet.data.splits import TEST, TRAIN, VALIDATION
    from munet.evolution.train import fit_head, run_modules
    from munet.models.modules import count_params
    from munet.models.training import accuracy

    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    like = root.modules[-1]
    feats = {c: run_modules(root.modules[:-1], data.parts[c].x, reduce=type(like).reduce)
             for c in (TRAIN, VALIDATION, TEST)}
    head, _ = fit_head(feats[TRAIN], data.parts[TRAIN].y, len(data.labels), like=like, epochs=s.head_epochs, seed=s.seed)
    train_s = time.perf_counter() - t0
    val = accuracy(head, feats[VALIDATION], data.parts[VALIDATION].y)
    test = accuracy(head, feats[TEST], data.parts[TEST].y)
    n_head = count_params(head)
    return {"test_accuracy": test, "validation_accuracy": val, "added_params": n_head,
            "model_params": root.trunk_params + n_head, "network_examples": 0,
            "head_fit_examples": s.head_epochs * len(data.parts[TRAIN].y), "train_wall_s": round(train_s, 2),
            "recipe": f"root trunk frozen; new zero-init head (the ViT's final LayerNorm from the root) by AdamW "
                      f"lr 3e-3, {s.head_epochs} epochs, batch 256 on cached trunk outputs"}
