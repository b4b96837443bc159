"""One generation of muNet for one task: sample parents, mutate, train, score, keep, promote."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from munet import metrics
from munet.config import Config
from munet.data.images import to_model_input
from munet.data.splits import TEST, TRAIN, VALIDATION
from munet.errors import NotFound
from munet.evolution.mutations import DEFAULT_HPARAMS, Candidate, is_conv, mutate_path
from munet.evolution.promotion import persist_candidate, promote
from munet.evolution.scoring import score as scale_score
from munet.evolution.train import FrozenRunner, PrefixCache, train_candidate
from munet.models.roots import all_root_modules, ensure_root, root_params
from munet.models.store import Expectation, PathRecord, Store, Superseded

log = logging.getLogger(__name__)

POPULATION_STATUSES = ("current", "retired", "candidate")


@dataclass
class CandidateReport:
    parent_task: str
    parent_version: int | None
    mutations: list[str]
    validation_accuracy: float
    score: float
    added_params: int
    seconds: float
    steps: int
    cached_prefix: int
    examples: int = 0  # images through forward and backward: the budget all methods are compared on
    prepare_seconds: float = 0.0  # computing the frozen prefix's outputs (0 when cached already)
    survived: bool = False
    version: int | None = None


@dataclass
class GenerationReport:
    task: str
    generation: int
    started_at: str
    incumbent_version: int
    incumbent_score: float
    candidates: list[CandidateReport] = field(default_factory=list)
    best_score: float = 0.0
    promoted: bool = False
    promoted_version: int = 0
    outcome: str = ""  # promotion: "promoted", "failed", "superseded" ("" when nothing beat the incumbent)
    error: str = ""
    seconds: float = 0.0

    @property
    def examples_processed(self) -> int:
        return sum(c.examples for c in self.candidates)

    def summary(self) -> dict:
        return {"task": self.task, "generation": self.generation, "candidates": len(self.candidates),
                "examples_processed": self.examples_processed,
                "best_score": self.best_score, "incumbent_score": self.incumbent_score,
                "promoted": self.promoted, "promoted_version": self.promoted_version, "error": self.error,
                "started_at": self.started_at, "seconds": round(self.seconds, 2)}


class Stopped(Exception):
    """Raised inside training when the server shuts down."""


def record_metrics(report: GenerationReport) -> None:
    """Prometheus series for a finished generation, in the serving process (wherever it trained)."""
    for c in report.candidates:
        metrics.CANDIDATES.labels(report.task).inc()
        metrics.CANDIDATE_SCORE.labels(report.task).observe(c.score)
        metrics.TRAINING_SECONDS.labels(report.task).inc(c.seconds)
    if report.candidates:
        metrics.GENERATIONS.labels(report.task).inc()
    if report.outcome:
        metrics.PROMOTIONS.labels(report.task, report.outcome).inc()


class Evolver:
    def __init__(self, config: Config, store: Store, activate: Callable[[PathRecord], object],
                 should_pause: Callable[[], bool] | None = None):
        self.config = config
        self.store = store
        self.activate = activate
        self.should_pause = should_pause
        self.cache = PrefixCache()
        self.runner = FrozenRunner(store, config.training_threads)
        self.offspring: dict[tuple[str, int | None], int] = {}
        self.generations: dict[str, int] = {}

    # ---- data and scores --------------------------------------------------------------------

    def _data(self, task: str, split: int, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.store.load_examples(task, split)
        if len(y) > cap:
            keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:cap])
            x, y = x[keep], y[keep]
        return x, y

    def _features(self, prefix: list[str], x: np.ndarray, key: tuple) -> torch.Tensor:
        if not prefix:
            return torch.from_numpy(to_model_input(x))
        return self.cache.get((tuple(prefix), *key), lambda: self.runner.run(prefix, x))

    def _cacheable(self, prefix: list[str], x: np.ndarray, n: int) -> bool:
        """Whether `n` examples' outputs of `prefix` fit the cache: an early MobileNetV2 prefix outputs
        more numbers per image than the image has (32x48x48 after the stem at 96 px), and is cheap to
        recompute; such candidates train through the frozen prefix on the raw images instead."""
        if not prefix or not len(x):
            return bool(prefix)
        per_example = self.runner.run(prefix, x[:1]).numel()
        return per_example * 2 * n <= self.cache.max_bytes // 2

    def path_accuracy(self, rec: PathRecord, split: int, x: np.ndarray, y: np.ndarray, key: tuple) -> float:
        if len(y) == 0:
            return float("nan")
        prefix = rec.modules[:-1]
        feats = self._features(prefix, x, key)
        head = self.store.load_module(rec.modules[-1])
        with torch.no_grad():
            pred = torch.cat([head(feats[i:i + 512].float()) for i in range(0, len(feats), 512)]).argmax(1)
        return float((pred.numpy() == y).mean())

    def accounted(self, task: str, modules: list[str], new_params: int = 0) -> float:
        users = self.store.module_users()
        total = float(new_params)
        for m in modules:
            total += self.store.module_record(m).params / len(users.get(m, set()) | {task})
        return total

    def rescore(self, rec: PathRecord, xv: np.ndarray, yv: np.ndarray, ev: str) -> PathRecord:
        """Score a stored version on the current validation set, so incumbent and children compare alike."""
        if rec.lineage.get("examples_version") == ev and rec.score is not None:
            return rec
        acc = self.path_accuracy(rec, VALIDATION, xv, yv, (rec.task, ev, "val"))
        rec.validation_accuracy = acc
        rec.score = scale_score(acc, self.accounted(rec.task, rec.modules),
                                root_params(self.store, self.store.get_task(rec.task).root), self.config.scale_base)
        rec.lineage["examples_version"] = ev
        self.store.update_path(rec.task, rec.version, validation_accuracy=acc, score=rec.score,
                               lineage=rec.lineage)
        return rec

    # ---- parents ----------------------------------------------------------------------------

    def sample_parent(self, population: list[PathRecord], seeds: list[PathRecord],
                      rng: np.random.Generator) -> PathRecord:
        """muNet: walk the population best-first, taking each with probability 0.5^offspring; else a seed."""
        for rec in population:
            if rng.random() < 0.5 ** self.offspring.get((rec.task, rec.version), 0):
                return rec
        pool = seeds + population
        return pool[int(rng.integers(len(pool)))]

    def seed_paths(self, task: str, own_head: str) -> list[PathRecord]:
        """Cross-task parents: the current paths of other tasks on the same root, and the root itself,
        each with this task's head."""
        root_name = self.store.get_task(task).root
        root = ensure_root(self.store, root_name)
        seeds = [PathRecord(task="root", version=0, modules=[*root[:-1], own_head],
                            hparams=dict(DEFAULT_HPARAMS))]
        same_root = {t.name for t in self.store.list_tasks() if t.root == root_name and t.name != task}
        for t, rec in sorted(self.store.current_paths().items()):
            if t in same_root:
                seeds.append(PathRecord(task=t, version=rec.version, modules=[*rec.modules[:-1], own_head],
                                        hparams=dict(rec.hparams)))
        return seeds

    # ---- the generation ---------------------------------------------------------------------

    def run_generation(self, task: str, n_candidates: int | None = None, budget_s: float | None = None,
                       progress: Callable[[int, int], None] | None = None) -> GenerationReport:
        cfg = self.config
        n_candidates = n_candidates or cfg.candidates_per_generation
        budget_s = budget_s or cfg.candidate_budget_s
        t_start = time.perf_counter()
        gen = self.generations.get(task, 0) + 1
        self.generations[task] = gen
        torch.set_num_threads(max(1, cfg.training_threads))
        # crc32, not hash(): str hashes change per process, and runs must repeat
        rng = np.random.default_rng([cfg.seed, gen, zlib.crc32(task.encode())])
        incumbent = self.store.get_path(task)
        # what the task must still be when a candidate is promoted: the same creation (not deleted
        # and registered again under its name) at the same version (not rolled back meanwhile)
        expect = Expectation(self.store.get_task(task).uid, incumbent.version)
        ev = self.store.examples_version(task)
        xt, yt = self._data(task, TRAIN, cfg.evolution_max_train, cfg.seed)
        xv, yv = self._data(task, VALIDATION, cfg.evolution_max_validation, cfg.seed)
        incumbent = self.rescore(incumbent, xv, yv, ev)
        report = GenerationReport(task, gen, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  incumbent.version, float(incumbent.score or 0.0))
        population = [self.rescore(v, xv, yv, ev) for v in self.store.list_versions(task)
                      if v.status in POPULATION_STATUSES]
        population.sort(key=lambda r: -(r.score or 0.0))
        own_head = incumbent.modules[-1]
        seeds = self.seed_paths(task, own_head)
        root_name = self.store.get_task(task).root
        root = ensure_root(self.store, root_name)
        root_blocks = [(m, self.store.load_module(m)) for m in root[1:-1]]
        n_root = root_params(self.store, root_name)
        head_module = self.store.load_module(own_head)
        best: tuple[float, Candidate, CandidateReport] | None = None
        trained: list[tuple[Candidate, CandidateReport]] = []
        for i in range(n_candidates):
            parent = self.sample_parent(population, seeds, rng)
            self.offspring[(parent.task, parent.version)] = self.offspring.get((parent.task, parent.version), 0) + 1
            parent_modules = [(m, self.store.load_module(m)) for m in parent.modules]
            users = self.store.module_users()
            own = {m for m in parent.modules if m not in root and users.get(m, set()) <= {task}}
            cand = mutate_path(task, parent_modules, parent.task, parent.version if parent.task == task else None,
                               parent.hparams, head_module, root_blocks, rng, max_blocks=len(root_blocks) + 2,
                               own=own)
            rep = self._train(cand, xt, yt, xv, yv, ev, budget_s, n_root, int(rng.integers(1 << 31)))
            parent_score = parent.score if parent.task == task else None
            rep.survived = parent_score is None or rep.score > parent_score
            report.candidates.append(rep)
            trained.append((cand, rep))
            log.info("%s gen %d cand %d/%d: parent %s v%s, %s -> val %.4f score %.4f (%.1f s, %d steps, %d cached)",
                     task, gen, i + 1, n_candidates, parent.task, parent.version, ",".join(cand.mutations) or "-",
                     rep.validation_accuracy, rep.score, rep.seconds, rep.steps, rep.cached_prefix)
            if best is None or rep.score > best[0]:
                best = (rep.score, cand, rep)
            if progress:
                progress(i + 1, n_candidates)
        assert best is not None
        report.best_score = best[0]
        gone = self._superseded(task, expect)
        if gone:
            # its examples, scores and parents belong to a task that no longer exists: keep nothing
            report.error = f"discarded: {gone}"
            log.warning("%s gen %d discarded: %s", task, gen, gone)
            report.outcome = "superseded"
            report.seconds = time.perf_counter() - t_start
            return report
        if best[0] > (incumbent.score or 0.0):
            _, cand, rep = best
            rec = persist_candidate(self.store, cand, rep.validation_accuracy, rep.score, self._lineage(cand, rep, ev),
                                    expect_uid=expect.uid)
            rep.version = rec.version
            # reported, never used to choose: the test split stays out of selection
            x_test, y_test = self.store.load_examples(task, TEST)
            rec.test_accuracy = self.path_accuracy(rec, TEST, x_test, y_test, (task, ev, "test", rec.version))
            self.store.update_path(task, rec.version, test_accuracy=rec.test_accuracy)
            report.outcome, report.error = promote(self.store, self.activate, rec, expect)
            report.promoted = report.outcome == "promoted"
            report.promoted_version = rec.version if report.promoted else 0
        # children that beat their parent join the population (muNet's survival rule)
        for cand, rep in trained:
            if not rep.survived or rep.version is not None:
                continue
            try:
                rec = persist_candidate(self.store, cand, rep.validation_accuracy, rep.score,
                                        self._lineage(cand, rep, ev), expect_uid=expect.uid)
            except Superseded:
                break  # the task was deleted meanwhile: nothing more of this generation is kept
            rep.version = rec.version
        self.store.prune_versions(task, cfg.keep_versions)
        self.store.garbage_collect(protected=all_root_modules(self.store), min_age_s=cfg.gc_min_age_s)
        report.seconds = time.perf_counter() - t_start
        return report

    def _superseded(self, task: str, expect: Expectation) -> str:
        """Why this generation's task is not the one it started from any more ("" when it is)."""
        try:
            t = self.store.get_task(task)
        except NotFound:
            return f"task {task!r} was deleted during the generation"
        if t.uid != expect.uid:
            return f"task {task!r} was deleted and registered again during the generation"
        return ""

    def _lineage(self, cand: Candidate, rep: CandidateReport, ev: str) -> dict:
        return {"parents": [cand.parent_version] if cand.parent_version is not None else [],
                "parent_task": cand.parent_task, "mutations": cand.mutations, "added_params": rep.added_params,
                "training_seconds": round(rep.seconds, 3), "steps": rep.steps, "examples": rep.examples,
                "cached_prefix": rep.cached_prefix, "examples_version": ev}

    def _train(self, cand: Candidate, xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray, ev: str,
               budget_s: float, n_root: int, seed: int) -> CandidateReport:
        cfg = self.config
        t0 = time.perf_counter()
        prefix = cand.frozen_prefix()
        if prefix and not self._cacheable(prefix, xt, len(xt) + len(xv)):
            prefix = []
        rest = cand.slots[len(prefix):]
        chain: list[nn.Module] = [s.module if s.trainable else self.store.load_module(s.module_id) for s in rest]
        trainable = cand.trainable_modules()
        # new convolutional blocks have no BatchNorm statistics yet: measured on this task's data
        new_conv = [s.module for s in cand.slots if s.trainable and s.origin.startswith("new:") and is_conv(s.module)]
        train_in = self._features(prefix, xt, (cand.task, ev, "train"))
        val_in = self._features(prefix, xv, (cand.task, ev, "val"))
        prepare = time.perf_counter() - t0
        res = train_candidate(chain, trainable, train_in, yt, val_in, yv, cand.hparams, cfg.train_batch_size,
                              cfg.candidate_max_steps, budget_s, raw_images=not prefix, seed=seed,
                              should_pause=self.should_pause, calibrate=new_conv)
        added = sum(p.numel() for m in trainable for p in m.parameters())
        frozen_ids = [s.module_id for s in cand.slots if not s.trainable]
        accounted = self.accounted(cand.task, frozen_ids, new_params=added)
        sc = scale_score(res.validation_accuracy, accounted, n_root, cfg.scale_base)
        rep = CandidateReport(cand.parent_task, cand.parent_version, cand.mutations, res.validation_accuracy, sc,
                              added, res.seconds, res.steps, len(prefix),
                              examples=res.steps * min(cfg.train_batch_size, len(yt)), prepare_seconds=prepare)
        return rep
