"""Shared fixtures: small, fast apps on temporary stores (tiny budgets; the small committed ViT root,
except where a test names the ImageNet MobileNetV2)."""

from __future__ import annotations

import contextlib

import pytest

from munet.app import App
from munet.config import Config
from munet.service.core import TaskSpec

# Budgets are in steps, not seconds (the time budget is far away): a loaded CI machine then trains
# the same candidates as a quiet one, and the tests' outcomes do not depend on the load.
FAST = dict(
    root="vit_tiny",  # the small committed root: most tests are about serving and evolution, not the root
    demo_task=False, scheduler_enabled=False, head_train_epochs=15, candidates_per_generation=2,
    candidate_budget_s=600.0, candidate_max_steps=40, train_batch_size=32, evolution_max_train=600,
    evolution_max_validation=300, gc_min_age_s=0.0, max_delay_ms=2.0, intra_op_threads=1,
)


def fast_config(home, **overrides) -> Config:
    return Config.from_env(home=home, **{**FAST, **overrides})


@pytest.fixture
def make_app(tmp_path):
    """Builds (and afterwards closes) apps; pass `home` to reopen a store, as after a restart."""
    apps: list[App] = []

    def make(home=None, start=True, **overrides) -> App:
        app = App.build(fast_config(home or tmp_path / "home", **overrides))
        if start:
            app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        with contextlib.suppress(Exception):  # already closed by the test
            app.close()


def register_digits(app: App, name: str = "digits", max_examples: int = 500, seed: int = 0, builtin="uci_digits"):
    return app.core.register_task(TaskSpec(name=name, builtin=builtin, max_examples=max_examples, seed=seed))
