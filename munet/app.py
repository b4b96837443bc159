"""The composition root: one store, one core, one gRPC server, one scheduler per server process.

Service and evolution never import each other and never call each other: evolution publishes
versions to the store, and every serving process follows the store (Core.follow). This module only
builds them and starts them; the store's evolution lease (leader.py) decides which process evolves.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field

from munet.config import Config
from munet.errors import MunetError
from munet.evolution.engine import InitialPaths
from munet.evolution.scheduler import Evolution
from munet.leader import LEASE, Leadership
from munet.models.roots import all_root_modules, ensure_root, resolve_root
from munet.models.store import Store, open_store
from munet.service.core import Core, TaskSpec

log = logging.getLogger(__name__)

DEMO_TASK = "digits-demo"


@dataclass
class App:
    config: Config
    store: Store
    core: Core
    evolution: Evolution | None = None
    grpc_server: object | None = None
    leadership: Leadership | None = None
    _started: bool = field(default=False, repr=False)
    _periodic: bool = field(default=False, repr=False)
    _follow_stop: threading.Event | None = field(default=None, repr=False)

    @classmethod
    def build(cls, config: Config) -> App:
        config.home.mkdir(parents=True, exist_ok=True)
        config.imports.mkdir(parents=True, exist_ok=True)
        store = open_store(config)  # SQLite in home, or PostgreSQL (database_url)
        ensure_root(store, resolve_root(store, config.root))  # the first start records the store's root
        core = Core(config, store, path_maker=InitialPaths(config, store))
        log.info("new tasks grow from root %s at %d px", core.root, core.image_size)
        app = cls(config, store, core)
        app.evolution = Evolution(config, store, load_signal=lambda: core.batcher.queue_depth,
                                  leader=lambda: store.lease(LEASE))
        app.leadership = Leadership(store, config.leader_lease_s, on_gain=app._lead, on_loss=app._follow_only,
                                    info={"grpc": f"{socket.getfqdn()}:{config.grpc_port}",
                                          "http": f"{socket.getfqdn()}:{config.http_port}"})
        return app

    def start(self) -> None:
        """Serve every stored task and follow the store from now on. The leader (the first to take the
        evolution lease, if this server may lead) also checks and tidies the store after any crash
        and, on an empty store, registers the demo task (unless turned off)."""
        lead = self.config.leader and self.leadership is not None and self.store.acquire_lease(
            LEASE, self.leadership.holder, self.config.leader_lease_s, self.leadership.info)
        check = self.store.integrity()
        if check != "ok":
            log.error("the store's database fails its integrity check: %s", check)
        self.core.restore(cleanup=lead)
        self.follow()
        if lead:
            self.tidy()
        self._started = True

    def follow(self) -> None:
        """Serve what the store says from now on (any process may change it)."""
        if self._follow_stop is None:
            self._follow_stop = self.core.follow(self.config.follow_interval_s)

    def tidy(self) -> None:
        """The leader's start-up chores: remove what a crash left behind, and the demo task."""
        removed = self.store.recover(self.config.gc_min_age_s)
        gone = self.store.garbage_collect(protected=all_root_modules(self.store), min_age_s=self.config.gc_min_age_s)
        if any(removed.values()) or gone:
            log.warning("cleaned up after an earlier crash: %s, %d unreferenced modules", removed, len(gone))
        if self.config.demo_task and not self.store.list_tasks():
            log.info("empty store: registering the demo task %r from %s", DEMO_TASK, self.config.demo_builtin)
            try:
                self.core.register_task(TaskSpec(name=DEMO_TASK, builtin=self.config.demo_builtin,
                                                 seed=self.config.seed))
            except MunetError as e:
                log.error("demo task not registered: %s", e.message)

    async def start_grpc(self, address: str | None = None) -> int:
        from munet.service.grpc_server import create_grpc_server

        server, port = create_grpc_server(self.core, self.evolution, self.config, address)
        await server.start()
        self.grpc_server = server
        log.info("gRPC server listening on port %d", port)
        return port

    def start_scheduler(self) -> None:
        """Run for the evolution lease (if this server may lead, `leader`): while this process holds
        it, TriggerEvolution works here and the periodic job runs when `scheduler_enabled`."""
        self._periodic = self.config.scheduler_enabled
        if self.leadership is not None and self.config.leader:
            self.leadership.start()

    def _lead(self) -> None:
        if self.evolution is not None:
            self.evolution.start(periodic=self._periodic)

    def _follow_only(self) -> None:
        if self.evolution is not None:
            self.evolution.shutdown()

    def _stop_background(self) -> None:
        if self.leadership is not None:
            self.leadership.stop()
        if self.evolution is not None:
            self.evolution.shutdown()
        if self._follow_stop is not None:
            self._follow_stop.set()
            self._follow_stop = None

    def close(self) -> None:
        """Synchronous shutdown for tools and tests that never started the async servers."""
        self._stop_background()
        self.store.close()

    async def stop(self, grace: float = 2.0) -> None:
        self._stop_background()
        if self.grpc_server is not None:
            health = getattr(self.grpc_server, "munet_health", None)
            if health is not None:
                await health.enter_graceful_shutdown()
            await self.grpc_server.stop(grace)
            self.grpc_server = None
        await self.core.batcher.stop()
        self.store.close()
