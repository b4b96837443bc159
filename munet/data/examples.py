"""Labelled examples: the one container they travel in (built-in data sets, uploads, the store's
batches, the benchmarks), and the `.npz` format users hand them over in."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from munet.data import images as imglib
from munet.data.splits import SPLIT_NAMES, UNSPECIFIED


class InvalidExamples(ValueError):
    """Examples that cannot be used (an unreadable .npz, labels that are not integers, a bad split);
    the message says why and names what was read."""


@dataclass
class Examples:
    """Labelled images, each with a split code: TRAIN, VALIDATION, TEST, or UNSPECIFIED where the
    source has no split and the server assigns one."""

    x: np.ndarray  # (N, S, S, 3) uint8 at the task's input size S (a data set's loaders: native sizes)
    y: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) int8
    labels: list[str] = field(default_factory=list)  # label id -> name, where the source names them

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def empty(cls, size: int = imglib.SIZE) -> Examples:
        return cls(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int8))

    @classmethod
    def concat(cls, parts: list[Examples], size: int = imglib.SIZE) -> Examples:
        """The parts one after another; label names from the first part that has any."""
        if not parts:
            return cls.empty(size)
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                   np.concatenate([p.split for p in parts]), next((list(p.labels) for p in parts if p.labels), []))

    def subset(self, idx: np.ndarray) -> Examples:
        """The examples at `idx` (indices or a boolean mask), in that order."""
        return Examples(self.x[idx], self.y[idx], self.split[idx], list(self.labels))

    def part(self, code: int) -> Examples:
        """The examples of one split."""
        return self.subset(np.flatnonzero(self.split == code))


def read_npz(data: bytes, what: str = "upload",
             max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """x, y, split codes and label names from an .npz: `x` (N,H,W[,C]) images, `y` (N,) integer labels,
    optional `split` (N,) of TRAIN/VALIDATION/TEST (UNSPECIFIED for every example when absent) and
    `label_names`. Images are returned as stored; `npz_examples` converts them.

    Read without pickle (object arrays are refused). With `max_bytes`, the members' declared sizes
    are checked before anything is inflated, so a small file that unpacks to gigabytes is refused.
    """
    if max_bytes is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                inflated = sum(i.file_size for i in zf.infolist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise InvalidExamples(f"{what} is not a readable .npz file: {e}") from None
        if inflated > max_bytes:
            raise InvalidExamples(f"{what} unpacks to {inflated} bytes; the limit (max_npz_bytes) is {max_bytes}")
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError("one array, not an archive of named arrays")
        with z:
            files = set(z.files)
            arrays = {k: z[k] for k in ("x", "y", "split", "label_names") if k in files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        # pickled object arrays land here: allow_pickle=False refuses them
        raise InvalidExamples(f"{what} is not a readable .npz file of plain arrays: {e}") from None
    if not {"x", "y"} <= files:
        raise InvalidExamples(f"{what} must hold arrays 'x' (images) and 'y' (labels); it has {sorted(files)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim not in (3, 4) or len(x) != len(y) or y.ndim != 1:
        raise InvalidExamples(f"{what}: x must be (N,H,W) or (N,H,W,C) and y (N,); got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidExamples(f"{what}: labels y must be integers, got {y.dtype}")
    split = np.full(len(y), UNSPECIFIED, np.int8)
    if "split" in arrays:
        s = arrays["split"]
        if s.shape != y.shape or not np.isin(s, list(SPLIT_NAMES)).all():
            raise InvalidExamples(f"{what}: split must be (N,) of "
                                  + ", ".join(f"{code} ({name})" for code, name in SPLIT_NAMES.items()))
        split = s.astype(np.int8)
    names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays else []
    return x, y.astype(np.int64), split, names


def npz_examples(data: bytes, what: str = "upload", size: int = imglib.SIZE,
                 max_bytes: int | None = None) -> Examples:
    """An .npz (see `read_npz`) as Examples at the input size `size`, its label names as `labels`."""
    x, y, split, names = read_npz(data, what, max_bytes)
    try:
        xs = imglib.batch_to_rgb(x, size) if len(x) else Examples.empty(size).x
    except imglib.InvalidImage as e:
        raise InvalidExamples(f"{what}: {e}") from None
    return Examples(xs, y, split, names)
