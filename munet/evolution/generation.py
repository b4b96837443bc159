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
from munet.errors import FailedPrecondition, NotFound
from munet.evolution.mutations import DEFAULT_HPARAMS, Candidate, is_conv, mutate_path
from munet.evolution.promotion import offer, persist_candidate, promote
from munet.evolution.scoring import paired_margin, selection_bias_se
from munet.evolution.scoring import score as scale_score
from munet.evolution.train import FrozenRunner, PrefixCache
from munet.evolution.trainers import TrainJob, TrainOutcome, TrainSettings, make_trainer
from munet.models.accounting import accounted_params
from munet.models.roots import all_root_modules, ensure_root, root_params
from munet.models.store import Expectation, PathRecord, Store, Superseded, TaskRecord
from munet.models.training import predict_classes

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
    error: str = ""  # why it failed to train ("" when it trained); a failed candidate scores 0 and is not kept


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
    pending_version: int = 0  # policy "approve": the version waiting for an operator
    # "promoted", "pending", "failed", "superseded" ("" when nothing beat the incumbent by the margin)
    outcome: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def examples_processed(self) -> int:
        return sum(c.examples for c in self.candidates)

    def summary(self) -> dict:
        return {"task": self.task, "generation": self.generation, "candidates": len(self.candidates),
                "examples_processed": self.examples_processed,
                "best_score": self.best_score, "incumbent_score": self.incumbent_score,
                "promoted": self.promoted, "promoted_version": self.promoted_version,
                "pending_version": self.pending_version, "outcome": self.outcome, "error": self.error,
                "started_at": self.started_at, "seconds": round(self.seconds, 2)}


class Stopped(Exception):
    """Raised inside training when the server shuts down."""


class Frozen(FailedPrecondition):
    """The task's policy is "frozen": no generation runs for it."""


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


def _predict(chain: list[nn.Module], x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return predict_classes(nn.Sequential(*chain), x, batch)


class Evolver:
    def __init__(self, config: Config, store: Store, should_pause: Callable[[], bool] | None = None):
        self.config = config
        self.store = store
        self.should_pause = should_pause
        self.trainer = make_trainer(config)  # evolution_backend: local or ray
        self.cache = PrefixCache()
        self.runner = FrozenRunner(store, config.training_threads)
        self.offspring: dict[tuple[str, int | None], int] = {}
        self._val_predictions: dict[int, np.ndarray] = {}
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

    def path_predictions(self, rec: PathRecord, x: np.ndarray, key: tuple) -> np.ndarray:
        prefix = rec.modules[:-1]
        feats = self._features(prefix, x, key)
        head = self.store.load_module(rec.modules[-1])
        return predict_classes(head, feats)

    def path_accuracy(self, rec: PathRecord, split: int, x: np.ndarray, y: np.ndarray, key: tuple) -> float:
        if len(y) == 0:
            return float("nan")
        return float((self.path_predictions(rec, x, key) == y).mean())

    def accounted(self, task: str, modules: list[str], new_params: int = 0) -> float:
        return accounted_params(self.store, task, modules, new_params)

    def setting(self, task: TaskRecord, name: str):
        """A task's own evolution setting, else the server's."""
        return task.evolution.get(name) or getattr(self.config, name)

    def rescore(self, rec: PathRecord, xv: np.ndarray, yv: np.ndarray, ev: str) -> PathRecord:
        """Score a stored version on the current validation set, so incumbent and children compare alike."""
        t = self.store.get_task(rec.task)
        base = self.setting(t, "scale_base")
        if rec.lineage.get("examples_version") == ev and rec.score is not None \
                and rec.lineage.get("scale_base", self.config.scale_base) == base:
            return rec
        acc = self.path_accuracy(rec, VALIDATION, xv, yv, (rec.task, ev, "val"))
        rec.validation_accuracy = acc
        rec.score = scale_score(acc, self.accounted(rec.task, rec.modules), root_params(self.store, t.root), base)
        rec.lineage["examples_version"] = ev
        rec.lineage["scale_base"] = base
        self.store.update_path(rec.task, rec.version, validation_accuracy=acc, score=rec.score,
                               lineage=rec.lineage)
        return rec

    def margin(self, incumbent_pred: np.ndarray, candidate_pred: np.ndarray, y: np.ndarray,
               contenders: int) -> float:
        """What the best of `contenders` candidates must beat the incumbent's score by (scoring's
        selection_bias_se: the winner's curse of choosing it among that many, and the floor)."""
        return paired_margin(incumbent_pred, candidate_pred, y,
                             self.config.promotion_margin_se * selection_bias_se(contenders),
                             self.config.promotion_min_margin)

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
        t_rec = self.store.get_task(task)
        if t_rec.policy == "frozen":
            raise Frozen(f"task {task!r} is frozen (policy 'frozen'): set its policy to auto or approve to evolve it")
        n_candidates = n_candidates or self.setting(t_rec, "candidates_per_generation")
        budget_s = budget_s or self.setting(t_rec, "candidate_budget_s")
        scale_base = self.setting(t_rec, "scale_base")
        t_start = time.perf_counter()
        gen = self.generations.get(task, 0) + 1
        self.generations[task] = gen
        torch.set_num_threads(max(1, cfg.training_threads))
        # crc32, not hash(): str hashes change per process, and runs must repeat
        rng = np.random.default_rng([cfg.seed, gen, zlib.crc32(task.encode())])
        incumbent = self.store.get_path(task)
        # what the task must still be when a candidate is promoted: the same creation (not deleted
        # and registered again under its name) at the same version (not rolled back meanwhile)
        # ... and, for an automatic promotion, still under policy "auto" (frozen meanwhile: no promotion)
        expect = Expectation(t_rec.uid, incumbent.version, policies=("auto",))
        ev = self.store.examples_version(task)
        known_batches = self.store.example_batch_ids(task)  # labels that arrive later are "fresh"
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
        # every candidate is drawn before any trains (training draws nothing from `rng`: the candidates
        # are those that training them one by one would draw), then the trainer trains them all: one
        # after another here, or in parallel as Ray tasks (evolution_backend)
        picks: list[tuple[PathRecord, Candidate, TrainJob, int, float]] = []
        # new modules (adapters, blocks, heads) take their initial weights from torch's global generator:
        # seeded per generation, so a generation repeats, and is the same on either backend
        torch.manual_seed(zlib.crc32(f"{cfg.seed}/{gen}/{task}".encode()))
        for _ in range(n_candidates):
            parent = self.sample_parent(population, seeds, rng)
            self.offspring[(parent.task, parent.version)] = self.offspring.get((parent.task, parent.version), 0) + 1
            parent_modules = [(m, self.store.load_module(m)) for m in parent.modules]
            users = self.store.module_users()
            own = {m for m in parent.modules if m not in root and users.get(m, set()) <= {task}}
            cand = mutate_path(task, parent_modules, parent.task, parent.version if parent.task == task else None,
                               parent.hparams, head_module, root_blocks, rng, max_blocks=len(root_blocks) + 2,
                               own=own)
            picks.append((parent, cand, *self._prepare(cand, xt, xv, ev, int(rng.integers(1 << 31)))))
        reports: dict[int, CandidateReport] = {}  # by candidate, filled as each finishes (in any order)

        def done(i: int, out: TrainOutcome) -> None:
            parent, cand, job, cached, prepare = picks[i]
            rep = self._report(cand, job, out, cached, prepare, len(yt), n_root, scale_base)
            parent_score = parent.score if parent.task == task else None
            rep.survived = not rep.error and (parent_score is None or rep.score > parent_score)
            reports[i] = rep
            if rep.error:
                log.warning("%s gen %d cand %d/%d: parent %s v%s, %s -> failed (%s): %s", task, gen, i + 1,
                            n_candidates, parent.task, parent.version, ",".join(cand.mutations) or "-", out.worker,
                            rep.error)
            else:
                log.info("%s gen %d cand %d/%d: parent %s v%s, %s -> val %.4f score %.4f (%.1f s, %d steps, "
                         "%d cached, %s)", task, gen, i + 1, n_candidates, parent.task, parent.version,
                         ",".join(cand.mutations) or "-", rep.validation_accuracy, rep.score, rep.seconds, rep.steps,
                         rep.cached_prefix, out.worker)
            if progress:
                progress(len(reports), n_candidates)

        self.trainer.train([job for _, _, job, _, _ in picks],
                           TrainSettings(yt, yv, budget_s, cfg.train_batch_size, cfg.candidate_max_steps,
                                         cfg.training_threads), done, self.should_pause)
        for i, (_, cand, _, _, _) in enumerate(picks):  # in the order drawn, however they finished
            rep = reports[i]
            report.candidates.append(rep)
            trained.append((cand, rep))
            if not rep.error and (best is None or rep.score > best[0]):
                best = (rep.score, cand, rep)
        if best is None:
            report.error = f"every candidate failed to train; the first: {report.candidates[0].error}"
            report.seconds = time.perf_counter() - t_start
            return report
        report.best_score = best[0]
        gone = self._superseded(task, expect)
        if gone:
            # its examples, scores and parents belong to a task that no longer exists: keep nothing
            report.error = f"discarded: {gone}"
            log.warning("%s gen %d discarded: %s", task, gen, gone)
            report.outcome = "superseded"
            report.seconds = time.perf_counter() - t_start
            return report
        _, best_cand, best_rep = best
        inc_pred = self.path_predictions(incumbent, xv, (task, ev, "val"))
        margin = self.margin(inc_pred, self._val_predictions.pop(id(best_cand)), yv,
                             sum(not r.error for r in reports.values()))
        self._val_predictions.clear()
        bar = float(incumbent.score or 0.0) + margin
        policy = self.store.get_task(task).policy  # may have changed during the generation
        fresh = ""
        if best[0] > bar and policy == "auto":
            fresh = self._fresh_label_veto(task, incumbent, best_cand, known_batches)
        if fresh:
            report.error = fresh
            log.info("%s gen %d: %s", task, gen, fresh)
        elif best[0] > bar and policy != "frozen":
            why = (f"score {best[0]:.4f} > incumbent v{incumbent.version} {incumbent.score or 0.0:.4f} + margin "
                   f"{margin:.4f}")
            rec = persist_candidate(self.store, best_cand, best_rep.validation_accuracy, best_rep.score,
                                    {**self._lineage(best_cand, best_rep, ev, scale_base), "decision": why},
                                    expect_uid=expect.uid)
            best_rep.version = rec.version
            # reported, never used to choose: the test split stays out of selection
            x_test, y_test = self.store.load_examples(task, TEST)
            rec.test_accuracy = self.path_accuracy(rec, TEST, x_test, y_test, (task, ev, "test", rec.version))
            self.store.update_path(task, rec.version, test_accuracy=rec.test_accuracy)
            if policy == "approve":
                report.outcome, report.error = offer(self.store, rec, why, cfg.parity_atol, cfg.training_threads)
                report.pending_version = rec.version if report.outcome == "pending" else 0
            else:
                report.outcome, report.error = promote(self.store, rec, expect, cfg.parity_atol,
                                                       cfg.training_threads)
                report.promoted = report.outcome == "promoted"
                report.promoted_version = rec.version if report.promoted else 0
                if report.promoted:
                    self.store.update_path(task, rec.version, lineage={**rec.lineage, "decision": "promoted: " + why})
            if report.outcome in ("promoted", "pending", "failed"):
                self.store.add_event(task, report.outcome, rec.version, by="evolution", reason=why,
                                     score=round(best[0], 6), error=report.error)
        elif best[0] > bar:
            report.error = f"not promoted: task {task!r} was frozen during the generation"
        # children that beat their parent join the population (muNet's survival rule)
        for cand, rep in trained:
            if not rep.survived or rep.version is not None:
                continue
            if rep is best_rep:
                why = (f"not promoted: score {rep.score:.4f} <= incumbent v{incumbent.version} "
                       f"{incumbent.score or 0.0:.4f} + margin {margin:.4f}" if rep.score <= bar else report.error)
                if fresh:
                    why = fresh
            else:
                why = f"not promoted: not the generation's best ({rep.score:.4f} < {best[0]:.4f}); beat its parent"
            try:
                rec = persist_candidate(self.store, cand, rep.validation_accuracy, rep.score,
                                        {**self._lineage(cand, rep, ev, scale_base), "decision": why},
                                        expect_uid=expect.uid)
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

    def _fresh_label_veto(self, task: str, incumbent: PathRecord, cand: Candidate, known: set[str]) -> str:
        """Examples labelled while the generation ran (AddExamples: corrections of live answers) were
        seen by neither version: a winner that does worse than the incumbent on them is not promoted,
        whatever its validation score. Returns the reason, or "" to go ahead."""
        x, y = self.store.load_examples_except(task, known)
        if not len(y):
            return ""
        inp = torch.from_numpy(to_model_input(x))
        with torch.no_grad():
            chain = [s.module if s.trainable else self.store.load_module(s.module_id) for s in cand.slots]
            new = _predict(chain, inp)
            old = _predict([self.store.load_module(m) for m in incumbent.modules], inp)
        acc_new, acc_old = float((new == y).mean()), float((old == y).mean())
        if acc_new < acc_old:
            return (f"not promoted: on {len(y)} examples labelled during the generation it scored {acc_new:.4f}, "
                    f"the incumbent v{incumbent.version} {acc_old:.4f}")
        return ""

    def _lineage(self, cand: Candidate, rep: CandidateReport, ev: str, scale_base: float) -> dict:
        return {"scale_base": scale_base, "parents": [cand.parent_version] if cand.parent_version is not None else [],
                "parent_task": cand.parent_task, "mutations": cand.mutations, "added_params": rep.added_params,
                "training_seconds": round(rep.seconds, 3), "steps": rep.steps, "examples": rep.examples,
                "cached_prefix": rep.cached_prefix, "examples_version": ev}

    def _prepare(self, cand: Candidate, xt: np.ndarray, xv: np.ndarray, ev: str,
                 seed: int) -> tuple[TrainJob, int, float]:
        """The candidate as a job any trainer can train: its chain after the frozen prefix whose outputs
        are cached (computed here, on the leader, once per prefix), with the modules it loads from the
        store. Also the number of cached modules and the seconds the cache took."""
        t0 = time.perf_counter()
        prefix = cand.frozen_prefix()
        if prefix and not self._cacheable(prefix, xt, len(xt) + len(xv)):
            prefix = []
        rest = cand.slots[len(prefix):]
        chain: list[nn.Module] = [s.module if s.trainable else self.store.load_module(s.module_id) for s in rest]
        # new convolutional blocks have no BatchNorm statistics yet: measured on this task's data
        new_conv = [s.module for s in cand.slots if s.trainable and s.origin.startswith("new:") and is_conv(s.module)]
        train_in = self._features(prefix, xt, (cand.task, ev, "train"))
        val_in = self._features(prefix, xv, (cand.task, ev, "val"))
        job = TrainJob(chain, [None if s.trainable else s.module_id for s in rest], cand.trainable_modules(), new_conv,
                       train_in, val_in, raw_images=not prefix, hparams=cand.hparams, seed=seed)
        return job, len(prefix), time.perf_counter() - t0

    def _report(self, cand: Candidate, job: TrainJob, out: TrainOutcome, cached: int, prepare: float, n_train: int,
                n_root: int, scale_base: float) -> CandidateReport:
        added = sum(p.numel() for m in job.trainable for p in m.parameters())
        res = out.result
        if res is None:
            return CandidateReport(cand.parent_task, cand.parent_version, cand.mutations, 0.0, 0.0, added, 0.0, 0,
                                   cached, prepare_seconds=prepare, error=out.error)
        # per-image answers on validation, for the paired promotion margin (the best candidate's is used)
        self._val_predictions[id(cand)] = out.val_predictions
        frozen_ids = [s.module_id for s in cand.slots if not s.trainable]
        accounted = self.accounted(cand.task, frozen_ids, new_params=added)
        sc = scale_score(res.validation_accuracy, accounted, n_root, scale_base)
        return CandidateReport(cand.parent_task, cand.parent_version, cand.mutations, res.validation_accuracy, sc,
                               added, res.seconds, res.steps, cached,
                               examples=res.steps * min(self.config.train_batch_size, n_train), prepare_seconds=prepare)
