"""A real munet server on loopback for end-to-end gRPC tests.

The server runs the production wiring (`App.build` + `App.start_grpc`) on its own event loop in a
background thread, so tests use the ordinary synchronous client against it, exactly as users do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from munet.app import App
from munet.client import MunetClient
from munet.config import Config

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine on it and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Served:
    app: App
    loop: LoopThread
    port: int
    client: MunetClient

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def server_config(home: Any, **overrides: Any) -> Config:
    """A store under `home`, no demo task and no scheduler: tests register exactly what they use."""
    values: dict[str, Any] = {
        "home": home, "root": "vit_tiny", "demo_task": False, "scheduler_enabled": False,
        "providers": ["CPUExecutionProvider"],
        # small enough that the over-the-cap upload test stays cheap, large enough for every task here
        "max_examples_per_task": 1500,
        # a generation triggered over gRPC: one short candidate on a small sample
        "candidates_per_generation": 1, "candidate_budget_s": 2.0, "candidate_max_steps": 40,
        "evolution_max_train": 600, "evolution_max_validation": 300, "intra_op_threads": 1,
    }
    values.update(overrides)
    return Config(**values)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    app = App.build(server_config(tmp_path_factory.mktemp("munet-home")))
    app.start()
    app.start_scheduler()  # on demand only (scheduler_enabled=False): TriggerEvolution works, no timer
    loop = LoopThread()
    try:
        port = loop.run(app.start_grpc("127.0.0.1:0"))
        client = MunetClient(f"127.0.0.1:{port}", timeout=30.0, long_timeout=300.0)
        try:
            client.wait_ready(10.0)
            yield Served(app, loop, port, client)
        finally:
            client.close()
            loop.run(app.stop())
    finally:
        loop.close()
