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


@pytest.fixture(scope="session")
def munet_serve(tmp_path_factory):
    """One shipped `munet serve` (HTTP and gRPC, admin token, demo task) for the whole session: the HTTP
    tests and the HTTP/gRPC twin tests (test_semantics.py) share it instead of starting one each."""
    from serve_fixture import serve

    with serve(tmp_path_factory.mktemp("serve-home")) as served:
        yield served


def register_digits(app: App, name: str = "digits", max_examples: int = 500, seed: int = 0, builtin="uci_digits"):
    return app.core.register_task(TaskSpec(name=name, builtin=builtin, max_examples=max_examples, seed=seed))


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def evolve(app: App, task: str, **kwargs):
    """One generation in this process, as the scheduler runs it; returns once this server serves what
    the generation published (the server follows the store, as every server does)."""
    report = app.evolution.evolver.run_generation(task, **kwargs)
    if report.promoted:
        wait_until(lambda: (p := app.core.runtime.get(task)) is not None and p.version == report.promoted_version,
                   what=f"{task} v{report.promoted_version} to be served")
    if report.pending_version:
        wait_until(lambda: (p := app.core.shadows.get(task)) is not None and p.version == report.pending_version,
                   what=f"{task} v{report.pending_version} to be loaded as pending")
    return report


# ---- the store on both backends: SQLite in a home, PostgreSQL (a private server, tests/postgres.py) ----

@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the session, started on first use. Missing binaries fail the
    tests that need it (CI must run the PostgreSQL suite), with how to install them."""
    from postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def database_url(postgres):
    """A new, empty PostgreSQL database for one test (dropped afterwards)."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request) -> str:
    """The test runs once per backend: "" (SQLite in the home) or a new PostgreSQL database's URL."""
    return "" if request.param == "sqlite" else request.getfixturevalue("database_url")


@pytest.fixture
def open_store(tmp_path, store_url):
    """Opens Stores on one home and database (each one as another process or host sees the store);
    closes them afterwards."""
    from munet.models.store import Store

    stores: list[Store] = []

    def make(home=None) -> Store:
        s = Store(home or tmp_path / "home", store_url)
        stores.append(s)
        return s

    yield make
    for s in stores:
        with contextlib.suppress(Exception):  # already closed by the test
            s.close()


@pytest.fixture
def store(open_store):
    return open_store()
