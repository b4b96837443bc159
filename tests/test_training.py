"""The schedule and accuracy every trainer shares (munet.models.training), and muNet's schedules built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from munet.evolution.train import lr_at
from munet.models.training import accuracy, cosine, predict_classes, warmup_cosine


def test_warmup_cosine_ramps_from_the_first_step_then_decays_to_zero():
    total, warm, peak = 100, 10, 0.5
    lrs = [warmup_cosine(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm)  # the first step already moves
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[warm] == pytest.approx(peak)
    assert all(a <= b for a, b in zip(lrs[:warm - 1], lrs[1:warm], strict=True))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:], strict=False))
    assert lrs[(warm + total) // 2] == pytest.approx(peak / 2)
    assert warmup_cosine(total, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 50, total, warm, peak) == pytest.approx(0.0, abs=1e-12)  # clamped, not rising


def test_mu_net_schedules_share_the_cosine():
    hp = {"opt_lr": 0.01, "opt_lr_schedule": "cosine", "opt_lr_warmup_ratio": 0.1}
    assert lr_at(0, 100, hp) == pytest.approx(0.01 / 100)  # muNet's warm-up starts at lr/100
    assert lr_at(10, 100, hp) == pytest.approx(cosine(0.0, 0.01)) == pytest.approx(0.01)
    assert lr_at(55, 100, hp) == pytest.approx(cosine(0.5, 0.01))
    assert lr_at(40, 100, {**hp, "opt_lr_schedule": "constant"}) == pytest.approx(0.005)
    restarts = {**hp, "opt_lr_schedule": "restarts"}
    assert lr_at(0, 99, restarts) == pytest.approx(0.01 / 100)  # the first cycle warms up too
    assert lr_at(33, 99, restarts) == lr_at(66, 99, restarts) == pytest.approx(0.01)  # later cycles start at lr


@pytest.mark.parametrize("total", [31, 94, 99, 100, 301])
def test_restart_cycles_end_where_a_candidate_is_evaluated(total):
    # train_candidate evaluates after step round(total * k / 3): each evaluation must see the end of
    # a cycle (the rate near zero), never the first full-rate step of the next; the first steps warm
    # up (pretrained blocks under AdamW at the full rate from step 0 collapsed: train.lr_at)
    hp = {"opt_lr": 0.01, "opt_lr_schedule": "restarts", "opt_lr_warmup_ratio": 0.1}
    lrs = [lr_at(s, total, hp) for s in range(total)]
    ends = [round(total * (k + 1) / 3) for k in range(3)]
    for e in ends:
        assert lrs[e - 1] < 0.15 * 0.01, (e, lrs[e - 1])  # the step before an evaluation
    for e in ends[:-1]:
        assert lrs[e] == pytest.approx(0.01)  # the next cycle restarts at the full rate
    assert lrs[0] < 0.01 / 2 and max(lrs) == pytest.approx(0.01)
    assert all(0 < v <= 0.01 for v in lrs)


def test_accuracy_counts_argmax_hits_in_batches_and_empty_is_zero():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(1000, 4)
    y = np.asarray(model(x).argmax(1).detach())
    y[::4] = (y[::4] + 1) % 3  # a quarter wrong
    assert np.array_equal(predict_classes(model, x, batch=7), model(x).argmax(1).detach().numpy())
    assert accuracy(model, x, y, batch=7) == pytest.approx(0.75)
    assert accuracy(model, x[:0], y[:0]) == 0.0
    assert not math.isnan(accuracy(model, x[:0], y[:0]))
