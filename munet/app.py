"""The composition root: one store, one core, one gRPC server, one scheduler per server process.

Service and evolution never import each other; this module wires them together through the store
and a few callables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from munet.config import Config
from munet.errors import MunetError
from munet.evolution.engine import InitialPaths
from munet.evolution.scheduler import Evolution
from munet.models.roots import all_root_modules, ensure_root, resolve_root
from munet.models.store import Store
from munet.service.core import Core, TaskSpec

log = logging.getLogger(__name__)

DEMO_TASK = "digits-demo"


def setup_logging() -> None:
    level = os.environ.get("MUNET_LOG_LEVEL", "INFO").upper()
    # BentoML installs its own root handlers; then ours only needs the level on the munet logger
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("munet").setLevel(level)


@dataclass
class App:
    config: Config
    store: Store
    core: Core
    evolution: Evolution | None = None
    grpc_server: object | None = None
    _started: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, config: Config) -> App:
        config.home.mkdir(parents=True, exist_ok=True)
        config.imports.mkdir(parents=True, exist_ok=True)
        store = Store(config.home)
        ensure_root(store, resolve_root(store, config.root))  # the first start records the store's root
        core = Core(config, store, path_maker=InitialPaths(config, store))
        log.info("new tasks grow from root %s at %d px", core.root, core.image_size)
        evolution = Evolution(config, store, activate=core.activate, load_signal=lambda: core.batcher.queue_depth,
                              stage=core.stage)
        return cls(config, store, core, evolution)

    def start(self) -> None:
        """Check and tidy the store after any crash, serve every stored task; on an empty store,
        register the demo task (unless turned off)."""
        check = self.store.integrity()
        if check != "ok":
            log.error("the store's database fails its integrity check: %s", check)
        self.core.restore()
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
        self._started = True

    async def start_grpc(self, address: str | None = None) -> int:
        from munet.service.grpc_server import create_grpc_server

        server, port = create_grpc_server(self.core, self.evolution, self.config, address)
        await server.start()
        self.grpc_server = server
        log.info("gRPC server listening on port %d", port)
        return port

    def start_scheduler(self) -> None:
        """TriggerEvolution always works; the periodic job runs only when `scheduler_enabled`."""
        if self.evolution is not None:
            self.evolution.start(periodic=self.config.scheduler_enabled)

    def close(self) -> None:
        """Synchronous shutdown for tools and tests that never started the async servers."""
        if self.evolution is not None:
            self.evolution.shutdown()
        self.store.close()

    async def stop(self, grace: float = 2.0) -> None:
        if self.evolution is not None:
            self.evolution.shutdown()
        if self.grpc_server is not None:
            health = getattr(self.grpc_server, "munet_health", None)
            if health is not None:
                await health.enter_graceful_shutdown()
            await self.grpc_server.stop(grace)
            self.grpc_server = None
        await self.core.batcher.stop()
        self.store.close()
