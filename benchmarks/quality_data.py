"""`munet bench quality`'s data: the built-in tasks to run, and each task's one fixed split, the same
for every method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.common import BenchError, log
from benchmarks.quality_settings import DEFAULT_TASKS, OPTIONAL_TASKS, TEST_FRACTION, VAL_FRACTION, Settings
from munet.data.examples import Examples
from munet.data.splits import SPLIT_NAMES, TEST, TRAIN, VALIDATION


@dataclass
class TaskData:
    name: str
    labels: list[str]
    parts: dict[int, Examples]  # split code -> its examples, (N, S, S, 3) uint8 at the root's input size
    split_source: str

    def sizes(self) -> dict[str, int]:
        return {SPLIT_NAMES[s]: len(v) for s, v in self.parts.items()}


def resolve_tasks(requested: list[str]) -> list[str]:
    from munet.data.builtin import BUILTIN, available_builtins

    if requested:
        unknown = [t for t in requested if t not in BUILTIN]
        if unknown:
            raise BenchError(f"unknown built-in task(s) {', '.join(unknown)}; known: {', '.join(BUILTIN)}")
        return list(dict.fromkeys(requested))
    present = available_builtins()
    tasks = [t for t in DEFAULT_TASKS + OPTIONAL_TASKS if t in present]
    missing = [t for t in DEFAULT_TASKS if t not in present]
    if missing:
        log("quality", f"skipping default task(s) whose data is not installed: {', '.join(missing)} (`make setup`)")
    if not tasks:
        raise BenchError("no built-in data set is installed; run `make setup`")
    return tasks


def prepare_task(name: str, s: Settings, size: int) -> TaskData:
    """The task's fixed split: the loader's own where it has one (official test sets), else a seeded,
    stratified one; each part capped by a seeded, stratified subsample, then converted to `size`."""
    from munet.data.builtin import BUILTIN
    from munet.data.images import batch_to_rgb
    from munet.data.splits import split_indices, stratified_subsample

    ds = BUILTIN[name].load()  # native sizes: only the kept examples are converted
    if (ds.split == TEST).any() and (ds.split == VALIDATION).any():
        codes, source = np.asarray(ds.split), "load_builtin's split (the official test set where there is one)"
    else:
        codes = split_indices(ds.y, s.seed, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION)
        source = f"seeded stratified split (validation {VAL_FRACTION:.0%}, test {TEST_FRACTION:.0%})"
    parts = {}
    for code, cap in ((TRAIN, s.max_train), (VALIDATION, s.max_val), (TEST, s.max_test)):
        members = np.flatnonzero(codes == code)
        keep = members[stratified_subsample(ds.y[members], min(cap, len(members)), s.seed)]
        parts[code] = Examples(batch_to_rgb(np.ascontiguousarray(ds.x[keep]), size),
                               np.asarray(ds.y[keep], dtype=np.int64), np.full(len(keep), code, np.int8),
                               list(ds.labels))
    return TaskData(name, list(ds.labels), parts, source)
