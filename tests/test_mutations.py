"""Each mutation keeps the path's function until training (Gesmundo & Maile 2023), and never
touches a stored module."""

import numpy as np
import pytest
import torch

from munet.evolution.mutations import (
    DEFAULT_HPARAMS,
    HP_LISTS,
    add_heads,
    clone,
    identity_block,
    incremental_mutation,
    mutate_hparams,
    mutate_path,
    new_adapter,
    widen_mlp,
)
from munet.models.vit import Chain, RootModel, ViTConfig


@pytest.fixture(scope="module")
def root():
    m = RootModel.create(ViTConfig(num_classes=10), seed=3)
    for mod in m.modules:
        mod.eval()
    return m


def _tokens(root, n=4):
    torch.manual_seed(0)
    with torch.no_grad():
        return root.modules[0](torch.rand(n, 3, 32, 32))


def test_identity_block_and_adapter_are_the_identity(root):
    x = _tokens(root)
    blk = identity_block(root.modules[1].cfg).eval()
    ada = new_adapter(96, 32).eval()
    with torch.no_grad():
        assert torch.equal(blk(x), x)
        assert torch.equal(ada(x), x)


@pytest.mark.parametrize("grow", ["widen", "heads"])
def test_expansions_preserve_the_block_function(root, grow):
    x = _tokens(root)
    block = root.modules[2]
    rng = np.random.default_rng(0)
    grown = (widen_mlp(block, 192, rng) if grow == "widen" else add_heads(block, 2, rng)).eval()
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in block.parameters())
    with torch.no_grad():
        ref, got = block(x), grown(x)
    # only float summation order differs: the added units contribute exact zeros
    assert torch.allclose(ref, got, atol=1e-6, rtol=0)
    # and training can move them: the new output weights receive gradient
    grown.train()
    grown(x).sum().backward()
    new_w = grown.mlp.fc2.weight if grow == "widen" else grown.attn.proj.weight
    assert new_w.grad is not None and new_w.grad.abs().sum() > 0


def test_clone_is_a_detached_trainable_copy(root):
    block = root.modules[1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    c = clone(block)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(1.0)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k])


def test_hparam_steps_stay_on_their_lists():
    rng = np.random.default_rng(0)
    hp = dict(DEFAULT_HPARAMS)
    for _ in range(200):
        hp, _ = mutate_hparams(hp, rng, mu=0.5)
        for k, values in HP_LISTS.items():
            assert hp[k] in values
    assert incremental_mutation(0.1, HP_LISTS["opt_lr"], np.random.default_rng(1)) in (0.05, 0.1)


def test_mutated_path_keeps_the_function_before_training(root):
    ids = [f"m{i}" for i in range(len(root.modules))]
    parent = list(zip(ids, root.modules, strict=True))
    root_blocks = parent[1:-1]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = Chain(root.modules)(x)
    kinds_seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        hp = {**DEFAULT_HPARAMS, "mu": 0.3}
        cand = mutate_path("t", parent, "t", 1, hp, root.modules[-1], root_blocks, rng, max_blocks=6)
        mods = [s.module if s.trainable else dict(parent)[s.module_id] for s in cand.slots]
        assert cand.slots[-1].trainable, "the head always trains"
        kinds_seen.update(m.split(":")[0] for m in cand.mutations)
        if any(m.startswith(("remove_layer", "restore_layer", "add_layer")) for m in cand.mutations):
            continue  # changing depth changes the function by design
        for m in mods:
            m.eval()
        with torch.no_grad():
            assert torch.allclose(Chain(mods)(x), ref, atol=1e-5), cand.mutations
    assert {"clone", "insert_adapter"} <= kinds_seen


# ---- the same mutations on the convolutional family (ImageNet MobileNetV2) ------------------------


@pytest.fixture(scope="module")
def mbv2():
    from munet.models.roots import BUILTIN_ROOTS

    modules, _ = BUILTIN_ROOTS["mobilenet_v2_imagenet"].load()
    return modules


def _maps(mbv2, upto: int, n=3, size=64):
    torch.manual_seed(0)
    with torch.no_grad():
        return Chain(mbv2[:upto])(torch.rand(n, 3, size, size))


def test_cnn_insertions_are_the_identity(mbv2):
    from munet.evolution.mutations import adapter_after, identity_layer_after

    for at in (2, 8, 17, 19):  # after blocks of 24, 64, 320 channels and the 1280-channel last conv
        x = _maps(mbv2, at)
        ada = adapter_after(mbv2[at - 1], 32).eval()
        with torch.no_grad():
            assert torch.equal(ada(x), x)
    # a 1280-channel identity block would hold ~20M weights: not offered after the last conv
    assert mbv2[18].kind == "conv_1x1" and identity_layer_after(mbv2[18]) is None
    for at in (2, 8, 17):
        x = _maps(mbv2, at)
        blk = identity_layer_after(mbv2[at - 1])
        # even with BatchNorm statistics measured on data (train mode) the block adds exactly zero
        blk.train()
        for bn in (m for m in blk.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.train()
        with torch.no_grad():
            assert torch.equal(blk(x), x)


def test_cnn_widening_preserves_the_block_and_trains(mbv2):
    from munet.evolution.mutations import expansions

    block = mbv2[10]
    x = _maps(mbv2, 10)
    (name, fn), = expansions(block)
    wide = fn(clone(block), np.random.default_rng(0)).eval()
    assert name == "widen" and wide.cfg.hidden == block.cfg.hidden * 3 // 2
    with torch.no_grad():
        assert torch.allclose(wide(x), block(x), atol=1e-5, rtol=0)
    wide.train()
    wide(x).square().sum().backward()
    assert wide.project.weight.grad[:, block.cfg.hidden:].abs().sum() > 0


def test_cloned_cnn_blocks_keep_frozen_batchnorm_statistics(mbv2):
    block = clone(mbv2[5])
    before = block.dw_bn.running_mean.clone()
    x = _maps(mbv2, 5, n=8)
    assert block.training and not block.dw_bn.training  # BatchNorm stays in inference mode
    block(x).sum().backward()
    assert torch.equal(block.dw_bn.running_mean, before)
    assert block.dw_bn.weight.grad is not None  # its scale and shift still train


def test_mutated_cnn_path_keeps_the_function_and_fits_the_head(mbv2):
    ids = [f"m{i}" for i in range(len(mbv2))]
    parent = list(zip(ids, mbv2, strict=True))
    from munet.models.mobilenet import PoolHead

    head = PoolHead.fresh(1280, 5)
    with torch.no_grad():
        head.fc.weight.normal_()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = Chain([*mbv2[:-1], head.eval()])(x)
    seen = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        cand = mutate_path("t", [*parent[:-1], ("h", head)], "t", 1, {**DEFAULT_HPARAMS, "mu": 0.3}, head,
                           parent[1:-1], rng, max_blocks=len(mbv2))
        mods = [s.module if s.trainable else dict(parent)[s.module_id] for s in cand.slots]
        seen.update(m.split(":")[0] for m in cand.mutations)
        for m in mods:
            m.eval()
        with torch.no_grad():
            out = Chain(mods)(x)  # every candidate runs: channels always line up, the head included
        assert out.shape == (2, 5)
        if any(m.startswith(("remove_layer", "restore_layer", "add_layer", "new_head")) for m in cand.mutations):
            continue
        assert torch.allclose(out, ref, atol=1e-4), cand.mutations
    assert {"clone", "insert_adapter", "remove_layer", "widen", "clone_span"} <= seen


def test_clone_span_is_a_contiguous_run_within_the_path():
    from munet.evolution.mutations import SPAN_MIN, clone_span

    layers = [(f"m{i}", None) for i in range(18)]
    spans = [clone_span(layers, np.random.default_rng(seed)) for seed in range(200)]
    drawn = [s for s in spans if s]
    assert 0.3 < len(drawn) / len(spans) < 0.7  # SPAN_PROB = 0.5 per candidate
    for s in drawn:
        assert s == set(range(min(s), max(s) + 1))
        assert SPAN_MIN <= len(s) <= 9 and 0 <= min(s) and max(s) < 18
    # spans end in the upper middle (SPAN_END: layers 9-13 of 18) and reach down by their length
    assert {max(s) for s in drawn} == set(range(9, 14)) and max(len(s) for s in drawn) == 9
    assert min(min(s) for s in drawn) <= 3
    assert clone_span(layers[:1], np.random.default_rng(0)) == set()


def test_a_span_candidate_clones_the_span_and_changes_nothing_else(mbv2):
    ids = [f"m{i}" for i in range(len(mbv2))]
    parent = list(zip(ids, mbv2, strict=True))
    hparams = {**DEFAULT_HPARAMS, "mu": 0.5, "opt_lr": 0.002}  # a high mu: every other mutation is likely
    spans = others = 0
    for seed in range(40):
        cand = mutate_path("t", parent, "t", 1, hparams, mbv2[-1], parent[1:-1],
                           np.random.default_rng(seed), max_blocks=len(mbv2), own={"m3"})
        span = [m for m in cand.mutations if m.startswith("clone_span:")]
        if not span:
            others += len(cand.mutations) > 0
            continue
        spans += 1
        own_clone = "clone:inverted_residual2"  # m3 is layers[2]: cloned as the task's own, logged
        assert [m for m in cand.mutations if m != own_clone] == span and cand.hparams == hparams
        lo, hi = (int(v) for v in span[0].split(":")[1].split("-"))
        cloned = {s.origin.removeprefix("clone:") for s in cand.slots if s.origin.startswith("clone:m")}
        # layers[p] is parent[p + 1]; the task's own modules are cloned too; the path keeps its shape
        assert cloned == {f"m{p + 1}" for p in range(lo, hi + 1)} | {"m3"}
        assert [s.module_id or s.origin.removeprefix("clone:") for s in cand.slots[:-1]] == ids[:-1]
    assert spans >= 5 and others >= 5
