"""Evolution's entry points for the server: a new task's first path, and (scheduler) generations."""

from __future__ import annotations

import logging
import time

import torch

from munet.config import Config
from munet.data.splits import TEST, TRAIN, VALIDATION
from munet.evolution.mutations import DEFAULT_HPARAMS
from munet.evolution.scoring import paired_margin, score, selection_bias_se
from munet.evolution.train import FrozenRunner, fit_head
from munet.models.accounting import accounted_params
from munet.models.export import export_and_check
from munet.models.roots import ensure_root, root_params
from munet.models.store import PathRecord, Store, TaskRecord
from munet.models.training import accuracy, predict_classes

log = logging.getLogger(__name__)



class InitialPaths:
    """A new task's first path: the best existing trunk (the root's or another task's) plus a new head.

    Every candidate trunk is frozen, so its outputs are computed once per trunk and only the head
    trains (seconds). This is muNet's cross-task transfer probe at registration time.
    """

    def __init__(self, config: Config, store: Store, max_trunks: int = 4):
        self.config = config
        self.store = store
        self.max_trunks = max_trunks
        self.runner = FrozenRunner(store, config.training_threads)

    def trunks(self, task: TaskRecord) -> list[tuple[str, PathRecord | None, list[str]]]:
        """(source task, its path, trunk module ids): the root first, then the best paths of other
        tasks on the same root (another root's trunk reads other inputs)."""
        root = ensure_root(self.store, task.root)
        out: list[tuple[str, PathRecord | None, list[str]]] = [("root", None, root[:-1])]
        seen = {tuple(root[:-1])}
        same_root = {t.name for t in self.store.list_tasks() if t.root == task.root and t.name != task.name}
        others = [p for t, p in self.store.current_paths().items() if t in same_root]
        others.sort(key=lambda p: -(p.score or 0.0))
        for p in others:
            trunk = p.modules[:-1]
            if tuple(trunk) in seen:
                continue
            seen.add(tuple(trunk))
            out.append((p.task, p, trunk))
            if len(out) >= self.max_trunks:
                break
        return out

    def initial_path(self, task: TaskRecord) -> PathRecord:
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, self.config.training_threads))
        xs = {s: self.store.load_examples(task.name, s) for s in (TRAIN, VALIDATION, TEST)}
        root = ensure_root(self.store, task.root)
        root_head = self.store.load_module(root[-1])
        n_root = root_params(self.store, task.root)
        best = None
        trunks = list(self.trunks(task))
        # the root's trunk is the incumbent, the others contend (scoring.selection_bias_se)
        margin_se = self.config.promotion_margin_se * selection_bias_se(len(trunks) - 1)
        for source, parent, trunk in trunks:
            # only what a head reads is kept: (N, 1, D) class tokens or (N, C, 1, 1) pooled maps
            feats = {s: self.runner.run(trunk, x, reduce=type(root_head).reduce) for s, (x, _) in xs.items()}
            head, secs = fit_head(feats[TRAIN], xs[TRAIN][1], len(task.labels), like=root_head,
                                  epochs=self.config.head_train_epochs, seed=self.config.seed)
            val = accuracy(head, feats[VALIDATION], xs[VALIDATION][1])
            log.info("task %s: trunk from %s -> validation accuracy %.4f (head %.1f s)",
                     task.name, source, val, secs)
            # another task's trunk must beat the root's by the promotion margin: on a small validation
            # set the best of four is otherwise often a lucky draw (measured: -2.4 test points on
            # emoji_subgroups, 298 validation images)
            pred = predict_classes(head, feats[VALIDATION])
            cfg = self.config
            if best is None or val > best[0] + paired_margin(best[6], pred, xs[VALIDATION][1], margin_se,
                                                             cfg.promotion_min_margin):
                best = (val, source, parent, trunk, head, feats, pred)
        assert best is not None
        val, source, parent, trunk, head, feats, _ = best
        test = accuracy(head, feats[TEST], xs[TEST][1]) if len(xs[TEST][1]) else None
        head_id = self.store.put_module(head)
        modules = [*trunk, head_id]
        added = self.store.module_record(head_id).params
        accounted = accounted_params(self.store, task.name, modules)
        rec = PathRecord(
            task=task.name, version=0, modules=modules, hparams=dict(DEFAULT_HPARAMS),
            lineage={"parents": [parent.version] if parent else [], "parent_task": source,
                     "mutations": ["new_head"], "added_params": added,
                     "training_seconds": round(time.perf_counter() - t0, 3),
                     "examples_version": self.store.examples_version(task.name)},
            validation_accuracy=val, test_accuracy=test,
            score=score(val, accounted, n_root, self.config.scale_base),
        )
        rec = self.store.add_path_version(rec)
        # published like every version: exported and checked here, so servers only load it
        export_and_check(self.store, rec, self.config.parity_atol, self.config.training_threads)
        return rec
