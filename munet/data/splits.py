"""Deterministic train/validation/test splits.

Two kinds:
- `split_indices` / `split_groups`: for a fixed data set, stratified by label and seeded, so a task's
  split is the same every time it is built;
- `split_new_examples`: for examples added to a live task one at a time, decided by a hash of the
  example itself, so resending the same example can never move it from validation to train.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# the split codes of every example everywhere: the store, the .npz format, the client's arrays
TRAIN, VALIDATION, TEST = 0, 1, 2
UNSPECIFIED = -1  # an example whose split the server assigns (registration: seeded; later: by its hash)
SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation", TEST: "test"}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"fractions must be >= 0 with a sum below 1; got val={val_fraction}, "
                         f"test={test_fraction}")


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional; got shape {y.shape}")
    return y


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of a class's n examples go to validation and test.

    Classes of 3 or more keep at least one example in train and, when the fraction asks for any,
    one each in validation and test (so a small class is still measured); smaller classes all train.
    """
    if n < 3:
        return 0, 0
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    # give back to train, test first, until train has one
    while n - n_val - n_test < 1:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def split_indices(y: np.ndarray, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> np.ndarray:
    """Split codes (int8: TRAIN, VALIDATION, TEST) per example, stratified by label, fixed by `seed`."""
    y = _labels(y)
    _check_fractions(val_fraction, test_fraction)
    codes = np.full(len(y), TRAIN, dtype=np.int8)
    rng = np.random.default_rng(seed)
    for label in np.unique(y):  # sorted, so the rng stream is consumed in a fixed order
        idx = np.flatnonzero(y == label)
        idx = idx[rng.permutation(len(idx))]
        n_val, n_test = _held_out_counts(len(idx), val_fraction, test_fraction)
        codes[idx[:n_test]] = TEST
        codes[idx[n_test:n_test + n_val]] = VALIDATION
    return codes


def split_groups(y: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> np.ndarray:
    """Like `split_indices`, but all examples of a group land in the same split.

    Groups (e.g. an emoji and its skin-tone variants) are split, stratified by label; a group's
    label is its first example's. Fractions therefore count groups, not examples.
    """
    y, groups = _labels(y), np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must match labels in shape; got {groups.shape} and {y.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_codes = split_indices(y[first], seed, val_fraction, test_fraction)
    return group_codes[inverse.ravel()]


def _key_bytes(key: object) -> bytes:
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, np.ndarray):
        return np.ascontiguousarray(key).tobytes()
    if isinstance(key, (int, np.integer)):
        return str(int(key)).encode()
    raise TypeError(f"cannot hash a split key of type {type(key).__name__}")


def split_new_examples(keys: np.ndarray | Sequence[object], seed: int, val_fraction: float = 0.1) -> np.ndarray:
    """TRAIN or VALIDATION (int8) per example, decided by hashing the example with the seed.

    `keys` is either an array of examples (one per row: the row's bytes are hashed, e.g. the
    (32, 32, 3) uint8 image) or a sequence of ids (bytes, str or int). The same key and seed always
    give the same code, whatever else is in the batch.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    salt = int(seed).to_bytes(8, "little", signed=True)
    # 2^64 buckets: the threshold is exact to far below any fraction anyone will ask for
    threshold = int(val_fraction * 2**64)
    codes = np.empty(len(keys), dtype=np.int8)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(_key_bytes(key), digest_size=8, key=salt).digest()
        codes[i] = VALIDATION if int.from_bytes(digest, "little") < threshold else TRAIN
    return codes


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split a total `n` over groups in proportion to `counts` (largest remainder; sums to n exactly)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if n >= total:
        return counts.copy()
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    # the groups with the largest fractional parts get the leftovers; ties go to the earlier group
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - int(take.sum())]] += 1
    return take


def stratified_subsample(strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` examples drawn so each stratum keeps its share."""
    strata = _labels(strata)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0; got {n}")
    if n >= len(strata):
        return np.arange(len(strata))
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    take = allocate(counts, n)
    rng = np.random.default_rng(seed)
    chosen = []
    for s in range(len(values)):
        idx = np.flatnonzero(inverse == s)
        chosen.append(idx[rng.permutation(len(idx))[: take[s]]])
    return np.sort(np.concatenate(chosen))
