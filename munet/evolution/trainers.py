"""Where a generation's candidates train: the seam between the generation and its backend.

The generation (generation.py) samples parents, mutates, and prepares each candidate as a `TrainJob`
on the leader: its chain after the frozen prefix, and that prefix's cached outputs. A trainer trains
the jobs and hands back one `TrainOutcome` each, with the trained weights already in the job's
modules; scoring, persisting and publishing then go on in the generation, whatever trained them.

- `LocalTrainer` (evolution_backend=local): one job after another, in this process.
- `RayTrainer` (evolution_backend=ray, ray_backend.py): the jobs as Ray tasks, in parallel.

Both report a candidate that raises as that candidate's failure (`TrainOutcome.error`); only an
exception from the pause hook (the server shutting down) ends the generation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from munet.config import Config, ConfigError
from munet.evolution.train import TrainResult, train_candidate
from munet.models.training import predict_classes

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass
class TrainJob:
    """One candidate, ready to train.

    `chain` runs on `train_in` / `val_in`: the cached outputs of the candidate's frozen prefix, or
    the raw images (`raw_images`) when it has none worth caching. `frozen_ids[i]` is the stored id of
    `chain[i]` when that module is frozen (None for a trainable one): a backend that ships modules
    elsewhere sends each stored module once per generation, however many candidates use it."""

    chain: list[nn.Module]
    frozen_ids: list[str | None]
    trainable: list[nn.Module]
    calibrate: list[nn.Module]  # new convolutional blocks: BatchNorm statistics measured before training
    train_in: torch.Tensor
    val_in: torch.Tensor
    raw_images: bool
    hparams: dict
    seed: int


@dataclass
class TrainOutcome:
    result: TrainResult | None  # None when the candidate failed
    val_predictions: np.ndarray | None  # per validation image, for the paired promotion margin
    error: str = ""
    worker: str = ""  # where it trained: "local pid N" or "ray pid N on node X"


@dataclass
class TrainSettings:
    """What every job of a generation shares."""

    y_train: np.ndarray
    y_val: np.ndarray
    budget_s: float
    batch_size: int
    max_steps: int
    threads: int  # torch threads per candidate; on Ray also the CPUs each task reserves


Done = Callable[[int, TrainOutcome], None]  # (job index, its outcome), called as each job finishes
# True while serving is busy (training waits); raises when the server shuts down (the generation ends)
Pause = Callable[[], bool]


class Trainer(Protocol):
    def train(self, jobs: list[TrainJob], settings: TrainSettings, done: Done,
              should_pause: Pause | None = None) -> list[TrainOutcome]: ...


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class LocalTrainer:
    """The jobs one after another in this process (the evolution worker's, or the server's)."""

    def train(self, jobs: list[TrainJob], settings: TrainSettings, done: Done,
              should_pause: Pause | None = None) -> list[TrainOutcome]:
        # an exception from the pause hook means "stop the generation" (the server is shutting down):
        # remembered here so that it is re-raised, not mistaken for the candidate's own failure
        stopping: list[BaseException] = []

        def pause() -> bool:
            try:
                return bool(should_pause is not None and should_pause())
            except BaseException as e:
                stopping.append(e)
                raise

        outcomes = []
        for i, job in enumerate(jobs):
            try:
                res = train_candidate(job.chain, job.trainable, job.train_in, settings.y_train, job.val_in,
                                      settings.y_val, job.hparams, settings.batch_size, settings.max_steps,
                                      settings.budget_s, raw_images=job.raw_images, seed=job.seed,
                                      should_pause=pause, calibrate=job.calibrate)
                out = TrainOutcome(res, predict_classes(nn.Sequential(*job.chain), job.val_in),
                                   worker=f"local pid {os.getpid()}")
            except Exception as e:
                if stopping:
                    raise
                log.exception("candidate %d failed to train", i + 1)
                out = TrainOutcome(None, None, error=describe(e), worker=f"local pid {os.getpid()}")
            outcomes.append(out)
            done(i, out)
        return outcomes


def make_trainer(config: Config) -> Trainer:
    """The trainer `config.evolution_backend` names. A bad name is refused here, when the server
    builds its evolution, not at its first generation; Ray itself is imported and reached only when
    a generation first trains on it."""
    backend = config.evolution_backend
    if backend == "local":
        return LocalTrainer()
    if backend == "ray":
        from munet.evolution.ray_backend import RayTrainer

        return RayTrainer(config.ray_address)
    raise ConfigError(f"evolution_backend {backend!r} (MUNET_EVOLUTION_BACKEND) is not one of {', '.join(BACKENDS)}")
