"""Image decoding, splits, the examples container and .npz format, built-in data sets and the committed
root checkpoint."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from munet.data.builtin import BUILTIN, available_builtins, load_builtin
from munet.data.examples import Examples, InvalidExamples, npz_examples, read_npz
from munet.data.images import InvalidImage, batch_to_rgb, decode_image, from_raw, to_model_input, to_rgb
from munet.data.splits import (
    TEST,
    TRAIN,
    UNSPECIFIED,
    VALIDATION,
    split_groups,
    split_indices,
    split_new_examples,
    stratified_subsample,
)
from munet.models.roots import load_saved_root as load_root
from munet.models.vit import Chain

rng = np.random.default_rng(0)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb32_ok(out: np.ndarray) -> None:
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1), (32, 32, 3), (28, 28), (1, 1), (7, 333, 3), (50, 9, 4)])
def test_to_rgb_takes_every_layout_and_size(shape):
    _rgb32_ok(to_rgb(rng.integers(0, 256, shape, dtype=np.uint8)))


def test_to_rgb_32px_rgb_passes_through_unchanged():
    x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb(x), x)


def test_gray_is_repeated_to_three_equal_channels():
    out = to_rgb(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_float_images_in_unit_range_match_uint8():
    x = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb(x.astype(np.float32) / 255.0), to_rgb(x))


def test_alpha_is_composited_on_white():
    x = np.zeros((32, 32, 4), np.uint8)  # transparent black
    assert (to_rgb(x) == 255).all()
    x[..., 3] = 255  # opaque black
    assert (to_rgb(x) == 0).all()


@pytest.mark.parametrize("bad", [
    np.zeros((0, 5), np.uint8), np.zeros((5, 4097), np.uint8), np.zeros((4, 4, 2), np.uint8),
    np.zeros((2, 4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), np.full((4, 4), 1.5),
    np.full((4, 4), np.nan),
])
def test_to_rgb_rejects_bad_arrays(bad):
    with pytest.raises(InvalidImage):
        to_rgb(bad)


def test_batch_matches_one_by_one_exactly():
    for h, w in [(28, 28), (8, 8), (1, 40), (32, 17), (45, 30)]:
        x = rng.integers(0, 256, (6, h, w), dtype=np.uint8)
        assert np.array_equal(batch_to_rgb(x), np.stack([to_rgb(i) for i in x])), (h, w)


@pytest.mark.parametrize("mode,shape", [("L", (28, 28)), ("RGB", (40, 24, 3)), ("RGBA", (17, 33, 4))])
def test_png_round_trip_is_lossless(mode, shape):
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(decode_image(_encode(x, "PNG")), to_rgb(x))


def test_jpeg_decodes_close_to_the_original():
    x = np.zeros((64, 64, 3), np.uint8)
    x[:, 32:] = (200, 40, 10)
    out = decode_image(_encode(x, "JPEG", quality=95))
    _rgb32_ok(out)
    assert np.abs(out.astype(int) - to_rgb(x).astype(int)).mean() < 4


def test_palette_and_16bit_pngs_decode():
    p = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).convert("P")
    buf = io.BytesIO()
    p.save(buf, "PNG")
    _rgb32_ok(decode_image(buf.getvalue()))
    wide = np.full((8, 8), 65535, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    assert (decode_image(buf.getvalue()) == 255).all()


@pytest.mark.parametrize("data", [b"", b"not an image", _encode(np.zeros((8, 8), np.uint8), "PNG")[:40]])
def test_bad_bytes_raise_invalid_image(data):
    with pytest.raises(InvalidImage):
        decode_image(data)


def test_oversized_image_is_refused_before_decoding():
    big = _encode(np.zeros((1, 5000), np.uint8), "PNG")
    with pytest.raises(InvalidImage, match="4096"):
        decode_image(big)


@pytest.mark.parametrize("c", [1, 3, 4])
def test_raw_round_trip(c):
    x = rng.integers(0, 256, (13, 29, c), dtype=np.uint8)
    assert np.array_equal(from_raw(x.tobytes(), 13, 29, c), to_rgb(x))


@pytest.mark.parametrize("args", [(b"\0" * 10, 3, 3, 1), (b"\0" * 18, 3, 3, 2), (b"\0" * 9, 0, 9, 1),
                                  (b"\0" * 9, 3, 3, 3)])
def test_raw_with_wrong_length_or_shape_raises(args):
    with pytest.raises(InvalidImage):
        from_raw(*args)


def test_model_input_layout_and_range():
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x[0, 0, 0] = 255
    out = to_model_input(x)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.max() == 1.0 and out.min() >= 0.0
    np.testing.assert_allclose(out[2, 1, 4, 7], x[2, 4, 7, 1] / 255.0, rtol=1e-6)
    assert to_model_input(np.zeros((2, 96, 96, 3), np.uint8)).shape == (2, 3, 96, 96)  # any square size
    for bad in (np.zeros((2, 28, 30, 3), np.uint8), np.zeros((2, 28, 28, 1), np.uint8), np.zeros((28, 28, 3))):
        with pytest.raises(InvalidImage):
            to_model_input(bad)


# ---- splits ---------------------------------------------------------------------------------


def test_split_is_deterministic_and_seed_dependent():
    y = rng.integers(0, 5, 1000)
    a, b, c = split_indices(y, 1), split_indices(y, 1), split_indices(y, 2)
    assert a.dtype == np.int8 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_split_is_stratified_with_requested_fractions():
    y = np.repeat(np.arange(4), [100, 200, 50, 30])
    codes = split_indices(y, 0, val_fraction=0.1, test_fraction=0.2)
    for label, n in zip(range(4), [100, 200, 50, 30], strict=True):
        c = codes[y == label]
        assert (c == VALIDATION).sum() == round(0.1 * n) and (c == TEST).sum() == round(0.2 * n)


def test_small_classes_keep_a_training_example():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    codes = split_indices(y, 0, val_fraction=0.4, test_fraction=0.4)
    for label in (0, 1):
        assert (codes[y == label] == TRAIN).sum() >= 1
    assert (codes[y == 2] == TRAIN).all()  # two examples: too few to hold any out


def test_group_split_keeps_groups_together():
    groups = np.repeat(np.arange(60), 5)
    y = groups % 3
    codes = split_groups(y, groups, 0)
    for g in range(60):
        assert len(set(codes[groups == g])) == 1
    assert {TRAIN, VALIDATION, TEST} <= set(codes.tolist())


def test_new_example_split_depends_only_on_the_example():
    x = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
    codes = split_new_examples(x, seed=3, val_fraction=0.2)
    assert set(codes.tolist()) <= {TRAIN, VALIDATION}
    assert 0.15 < (codes == VALIDATION).mean() < 0.25
    assert np.array_equal(split_new_examples(x[::-1], seed=3, val_fraction=0.2), codes[::-1])
    assert np.array_equal(split_new_examples(["a", b"b", 7], 1), split_new_examples(["a", b"b", 7], 1))
    assert not np.array_equal(split_new_examples(x, seed=4, val_fraction=0.2), codes)


def test_stratified_subsample_keeps_shares():
    y = np.repeat(np.arange(3), [600, 300, 100])
    idx = stratified_subsample(y, 100, 0)
    assert len(idx) == 100 and np.array_equal(np.bincount(y[idx]), [60, 30, 10])
    assert np.array_equal(idx, stratified_subsample(y, 100, 0))


# ---- the examples container and the .npz format ----------------------------------------------


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_examples_concat_subset_and_part_keep_rows_together():
    a = Examples(np.full((3, 4, 4, 3), 1, np.uint8), np.array([0, 1, 2]), np.array([TRAIN, TEST, VALIDATION], np.int8),
                 ["a", "b", "c"])
    b = Examples(np.full((2, 4, 4, 3), 2, np.uint8), np.array([1, 1]), np.full(2, UNSPECIFIED, np.int8))
    both = Examples.concat([b, a], size=4)
    assert len(both) == 5 and both.labels == ["a", "b", "c"]  # the names of the part that has them
    assert both.split.tolist() == [UNSPECIFIED, UNSPECIFIED, TRAIN, TEST, VALIDATION]
    test = both.part(TEST)
    assert len(test) == 1 and test.y.tolist() == [1] and (test.x == 1).all()
    assert len(Examples.concat([], size=4)) == 0 and Examples.empty(4).x.shape == (0, 4, 4, 3)


def test_npz_round_trip_with_and_without_a_split():
    x = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    ex = npz_examples(_npz(x=x, y=y, label_names=np.array(["z", "o", "t"])), size=16)
    assert ex.x.shape == (6, 16, 16, 3) and ex.y.dtype == np.int64 and ex.y.tolist() == y.tolist()
    assert ex.labels == ["z", "o", "t"] and (ex.split == UNSPECIFIED).all()
    assert np.array_equal(ex.x, batch_to_rgb(x, 16))  # the same conversion a client's images get
    split = np.array([TRAIN, TRAIN, VALIDATION, TEST, TRAIN, VALIDATION])
    xs, ys, codes, names = read_npz(_npz(x=x, y=y, split=split))
    assert np.array_equal(xs, x) and codes.dtype == np.int8 and codes.tolist() == split.tolist() and names == []


@pytest.mark.parametrize(("arrays", "why"), [
    (dict(x=np.zeros((2, 8, 8), np.uint8)), "'y'"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=np.array([0.5, 1.0])), "integers"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=np.zeros(3, np.int64)), "x must be"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=np.zeros(2, np.int64), split=np.array([0, 3])), "2 (test)"),
    (dict(x=np.array([object()] * 2, dtype=object), y=np.zeros(2, np.int64)), "plain arrays"),
])
def test_bad_npz_files_are_refused_with_the_reason(arrays, why):
    with pytest.raises(InvalidExamples, match=re.escape(why)) as e:
        read_npz(_npz(**arrays), "bad.npz")
    assert str(e.value).startswith("bad.npz")  # names the file it read


def test_npz_declared_size_is_checked_before_inflating_and_a_lone_array_is_refused():
    data = _npz(x=np.zeros((64, 64, 64), np.uint8), y=np.zeros(64, np.int64))
    with pytest.raises(InvalidExamples, match="max_npz_bytes"):
        read_npz(data, max_bytes=10_000)
    assert len(read_npz(data, max_bytes=1 << 20)[1]) == 64
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InvalidExamples, match="archive"):
        read_npz(buf.getvalue())


# ---- built-in data sets ---------------------------------------------------------------------


def _check_labelled(d, n_classes):
    assert d.x.dtype == np.uint8 and d.x.shape[1:] == (32, 32, 3) and len(d.x) == len(d.y)
    assert d.y.dtype == np.int64 and d.y.min() >= 0 and d.y.max() < n_classes
    assert len(d.labels) == n_classes


def test_uci_digits():
    d = load_builtin("uci_digits")
    _check_labelled(d, 10)
    assert len(d) == 1797 and d.labels[3] == "3"
    # no split of its own: every example's split is the server's to assign, seeded per task
    assert d.split.dtype == np.int8 and (d.split == UNSPECIFIED).all()


def test_a_sample_of_an_unsplit_set_keeps_each_class_share():
    d = load_builtin("uci_digits", max_examples=500, seed=3)
    assert len(d) == 500 and (d.split == UNSPECIFIED).all()
    shares = np.bincount(d.y, minlength=10) / 500
    full = np.bincount(load_builtin("uci_digits").y, minlength=10) / 1797
    assert np.abs(shares - full).max() < 0.01


def test_mnist_subsample_keeps_official_split_and_classes():
    d = load_builtin("mnist", max_examples=700, seed=1)
    _check_labelled(d, 10)
    assert len(d) == 700 and d.split.dtype == np.int8
    assert np.array_equal(np.bincount(d.split), [500, 100, 100])  # 50k/10k/10k scaled
    assert set(d.y.tolist()) == set(range(10))
    again = load_builtin("mnist", max_examples=700, seed=1)
    assert np.array_equal(d.x, again.x) and np.array_equal(d.y, again.y)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="uci_digits"):
        load_builtin("cifar10")


def test_available_builtins_describe_each():
    names = available_builtins()
    assert set(names) <= set(BUILTIN) and "uci_digits" in names
    assert all(isinstance(v, str) and v for v in names.values())


# ---- root checkpoint ------------------------------------------------------------------------


def test_committed_root_rebuilds_and_classifies():
    modules, info = load_root()
    assert [m.kind for m in modules] == [m["kind"] for m in info["modules"]]
    assert modules[0].kind == "embed" and modules[-1].kind == "head"
    x = torch.from_numpy(to_model_input(load_builtin("mnist", max_examples=64).x))
    with torch.inference_mode():
        logits = Chain(modules).eval()(x)
    assert logits.shape == (64, 20) and torch.isfinite(logits).all()
    assert info["test"]["mnist"]["accuracy_20way"] > 0.5
