"""Local data for the `munet` commands: .npz files, ImageFolder trees, image files, score plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from munet.data.splits import SPLIT_NAMES, UNSPECIFIED

# `--split` values: the split names, and "auto" for the server's choice
SPLIT_ARGS = {name: code for code, name in SPLIT_NAMES.items()} | {"auto": UNSPECIFIED}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


class CliError(Exception):
    """A local problem reported like a server error: one line on stderr and `exit_code`.

    The default, 4, is the invalid-input class (a missing file, a bad argument)."""

    def __init__(self, message: str, exit_code: int = 4):
        super().__init__(message)
        self.exit_code = exit_code


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """x, y, split codes (UNSPECIFIED where the file has none) and label names from a local .npz,
    read and checked as the server reads one (munet.data.examples.read_npz), so a bad file is refused
    here, before any upload."""
    from munet.data.examples import InvalidExamples, read_npz

    try:
        return read_npz(Path(path).read_bytes(), str(path))
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    except InvalidExamples as e:
        raise CliError(str(e)) from None


def labels_arg(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files and labels from class subfolders (sorted by name, as torchvision's ImageFolder)."""
    base = Path(root)
    if not base.is_dir():
        raise CliError(f"{root} is not a folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, y = [], []
    for i, name in enumerate(classes):
        for f in sorted((base / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                y.append(i)
    if len(classes) < 2 or not files:
        raise CliError(f"{root} needs at least two class subfolders holding images "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))}); found {len(classes)} folders, {len(files)} images")
    return files, np.array(y, np.int64), classes


def images_as_examples(c: Any, task_name: str, images: Sequence[str], label: str,
                       split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image files as one labelled batch, decoded here with the server's own function at the task's
    size, so images of mixed sizes stack."""
    from munet.data.images import InvalidImage, decode_image

    task = c.get_task(task_name)
    labels = task.labels
    index = int(label) if label.isdigit() else labels.index(label) if label in labels else -1
    if not 0 <= index < len(labels):
        raise CliError(f"label {label!r} is not one of {labels} nor an index below {len(labels)}")
    xs = []
    for path in images:
        try:
            xs.append(decode_image(Path(path).read_bytes(), task.image_size or 32))
        except (OSError, InvalidImage) as e:
            raise CliError(f"cannot read image {path}: {e}") from None
    n = len(xs)
    return np.stack(xs), np.full(n, index), np.full(n, SPLIT_ARGS[split])


def plot_generations(reports: list, path: str) -> None:
    """Score per generation: the incumbent's (before) and the best candidate's, promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reports:
        raise CliError("no generation finished: nothing to plot", exit_code=1)
    x = list(range(1, len(reports) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(x, [r.incumbent_score for r in reports], "o-", label="incumbent (before the generation)")
    ax.plot(x, [r.best_score for r in reports], "s--", label="best candidate")
    promoted = [(i, r.best_score) for i, r in zip(x, reports, strict=True) if r.promoted]
    if promoted:
        ax.scatter(*zip(*promoted, strict=True), s=120, facecolors="none", edgecolors="green", label="promoted")
    tasks = sorted({r.task for r in reports})
    ax.set(xlabel="generation", ylabel="score (validation accuracy x size penalty)",
           title=f"munet evolution: {', '.join(tasks)}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
