"""Method 2 of `munet bench quality`, full fine-tuning: a copy of every root module plus a new head, all
trainable, one model per task; AdamW, warm-up then cosine, the best of the learning rates on validation
(every run counted in the budget)."""

from __future__ import annotations

import copy
import time
from typing import Any

from benchmarks.quality_data import TaskData
from benchmarks.quality_root import Root
from benchmarks.quality_settings import Settings


def _finetune_once(root: Root, data: TaskData, s: Settings, lr: float) -> tuple[float, Any, int, float]:
    """One run: (best validation accuracy, the best model, steps, seconds)."""
    import torch
    import torch.nn.functional as F

    from munet.data.images import to_model_input
    from munet.data.splits import TRAIN, VALIDATION
    from munet.models.training import accuracy, warmup_cosine
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
    xt = torch.from_numpy(to_model_input(data.parts[TRAIN].x))
    yt = torch.from_numpy(data.parts[TRAIN].y)
    xv = torch.from_numpy(to_model_input(data.parts[VALIDATION].x))
    yv = data.parts[VALIDATION].y
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
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, total, warm, lr)
        model.train()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 in eval_at:
            acc = accuracy(model, xv, yv)
            if acc > best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best_acc, model, total * batch, time.perf_counter() - t0


def run_finetune(root: Root, data: TaskData, s: Settings) -> dict:
    import torch

    from munet.data.images import to_model_input
    from munet.data.splits import TEST
    from munet.models.modules import count_params
    from munet.models.training import accuracy

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
    test = accuracy(model, torch.from_numpy(to_model_input(data.parts[TEST].x)), data.parts[TEST].y)
    n = count_params(model)
    return {"test_accuracy": test, "validation_accuracy": val, "lr": lr, "added_params": n, "model_params": n,
            "network_examples": examples, "head_fit_examples": 0, "train_wall_s": round(secs, 2), "runs": runs,
            "recipe": f"all parameters trainable (BatchNorm statistics frozen, as in munet); AdamW (wd {s.ft_weight_decay}, none on norms/biases/tokens), "
                      f"{s.ft_steps} steps of batch {s.ft_batch} per lr, 10% linear warm-up then cosine, "
                      f"grad clip 1.0, best of {s.ft_evals} validation evaluations kept; lr in "
                      f"{', '.join(f'{v:g}' for v in s.ft_lrs)} chosen on validation"}
