"""The background job: APScheduler runs a generation every interval, one at a time, and on demand.

Generations train in the evolution worker process (`evolution_process`, default on; see worker.py)
with `training_threads` torch threads (default 1 of the 2 cores) at a lower CPU priority, and pause
whenever the serving queue is deeper than `pause_queue_depth` images, so serving keeps its latency.
With `evolution_process` off they run in the scheduler's thread of the server (tests, tools). Only
the server process holding the store's evolution lease (munet/leader.py) runs this scheduler,
however many servers share the store, on one host or many.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from munet import metrics
from munet.config import Config
from munet.errors import FailedPrecondition, InvalidArgument, NotFound
from munet.evolution.generation import Evolver, Frozen, GenerationReport, Stopped, record_metrics
from munet.evolution.worker import EvolutionWorker
from munet.models.store import Store

log = logging.getLogger(__name__)


class Evolution:
    def __init__(self, config: Config, store: Store, load_signal: Callable[[], int] = lambda: 0,
                 leader: Callable[[], dict | None] = lambda: None):
        self.config = config
        self.store = store
        self.load_signal = load_signal
        self.leader = leader  # who leads evolution when this process does not (for error messages)
        self.evolver = Evolver(config, store, should_pause=self._should_pause)
        self.worker = EvolutionWorker(config) if config.evolution_process else None
        self.scheduler = self._new_scheduler()
        self._run_lock = threading.Lock()
        self._stop = threading.Event()
        self._next = 0
        self.running = False
        self.periodic = False
        self.current_task = ""
        self.candidates_done = 0
        self.candidates_total = 0
        self.paused = False
        self.generations = 0
        self.recent: deque[GenerationReport] = deque(maxlen=50)

    # ---- lifecycle --------------------------------------------------------------------------

    @staticmethod
    def _new_scheduler() -> BackgroundScheduler:
        return BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            executors={"default": {"type": "threadpool", "max_workers": 2}},
        )

    @property
    def leading(self) -> bool:
        return self.scheduler.running

    def start(self, periodic: bool = True) -> None:
        """Lead: run generations on demand, and every interval with `periodic`. Called when this
        process takes the evolution lease; `shutdown` when it loses it (or stops), and again `start`
        if it takes it back."""
        if self.scheduler.running:
            return
        self._stop.clear()
        self.scheduler = self._new_scheduler()
        if periodic:
            interval = self.config.evolve_interval_s
            self.scheduler.add_job(self._tick, "interval", seconds=interval, id="evolve",
                                   next_run_time=datetime.now() + timedelta(seconds=interval))
        self.scheduler.start()
        self.periodic = periodic
        log.info("evolution scheduler started: %s, %d candidates of %.0f s per generation",
                 f"a generation every {self.config.evolve_interval_s:.0f} s" if periodic else "on demand only",
                 self.config.candidates_per_generation, self.config.candidate_budget_s)

    def shutdown(self) -> None:
        self._stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.worker is not None:
            self.worker.close()

    # ---- work -------------------------------------------------------------------------------

    def _should_pause(self) -> bool:
        if self._stop.is_set():
            raise Stopped()
        busy = self.load_signal() > self.config.pause_queue_depth
        if busy != self.paused:
            self.paused = busy
            metrics.PAUSED.set(1 if busy else 0)
            log.info("evolution %s: %d images queued for serving", "paused" if busy else "resumed",
                     self.load_signal())
        return busy

    def pick_task(self) -> str | None:
        """Round robin over the tasks that are serving and not frozen."""
        frozen = {t.name for t in self.store.list_tasks() if t.policy == "frozen"}
        tasks = sorted(set(self.store.current_paths()) - frozen)
        if not tasks:
            return None
        task = tasks[self._next % len(tasks)]
        self._next += 1
        return task

    def _tick(self) -> None:
        task = self.pick_task()
        if task is not None:
            self.run(task)

    def run(self, task: str, candidates: int = 0, budget_s: float = 0.0) -> GenerationReport | None:
        with self._run_lock:
            if self._stop.is_set():
                return None
            try:
                if self.store.get_task(task).policy == "frozen":
                    log.info("generation for %s skipped: the task is frozen", task)
                    return None
            except NotFound:
                return None
            self.running, self.current_task = True, task
            self.candidates_done, self.candidates_total = 0, candidates or self.config.candidates_per_generation
            report: GenerationReport | None = None
            try:
                self.store.add_event(task, "generation_started", candidates=candidates, budget_seconds=budget_s)
                if self.worker is not None:
                    report = self.worker.run_generation(task, candidates or None, budget_s or None,
                                                        progress=self._progress, should_pause=self._should_pause)
                else:
                    report = self.evolver.run_generation(task, candidates or None, budget_s or None,
                                                         progress=self._progress)
            except Stopped:
                report = GenerationReport(task, 0, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), 0, 0.0,
                                          error="stopped: the server is shutting down")
                return None
            except (NotFound, Frozen) as e:
                log.info("generation for %s skipped: %s", task, e.message)
                return None
            except Exception as e:
                log.exception("generation for %s failed", task)
                report = GenerationReport(task, 0, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), 0, 0.0,
                                          error=f"{type(e).__name__}: {e}")
            finally:
                self.running, self.current_task = False, ""
                self.paused = False
                metrics.PAUSED.set(0)
                with contextlib.suppress(Exception):  # the store may be closing with the server
                    if report is not None:
                        detail = {k: v for k, v in report.summary().items() if k != "task"}
                        self.store.add_event(task, "generation_finished", report.generation, **detail)
            self.generations += 1
            self.recent.append(report)
            record_metrics(report)
            return report

    def _progress(self, done: int, total: int) -> None:
        self.candidates_done, self.candidates_total = done, total

    async def trigger(self, task: str | None, candidates: int = 0, budget_s: float = 0.0,
                      wait: bool = False) -> dict:
        """Queue a generation now (TriggerEvolution); with `wait`, return when it has finished."""
        if task:
            if self.store.get_task(task).policy == "frozen":  # NotFound for an unknown task, before queueing
                raise FailedPrecondition(f"task {task!r} is frozen (policy 'frozen'); set its policy to auto or "
                                         "approve to evolve it")
        else:
            task = self.pick_task()
            if task is None:
                raise FailedPrecondition("there is no task to evolve (none serving, or all frozen)")
        if not 0 <= candidates <= self.config.max_candidates_per_generation:
            raise InvalidArgument(f"candidates must be in 0..{self.config.max_candidates_per_generation} "
                                  f"(max_candidates_per_generation); got {candidates}")
        if not 0.0 <= budget_s <= self.config.max_candidate_budget_s:  # NaN fails this too
            raise InvalidArgument(f"budget_seconds must be in 0..{self.config.max_candidate_budget_s:g} "
                                  f"(max_candidate_budget_s); got {budget_s}")
        if not self.scheduler.running:
            lease = self.leader()
            where = (f"the server at {lease['info'].get('grpc') or lease['holder']} leads it"
                     if lease else "no server leads it right now (one takes the lease within seconds)")
            raise FailedPrecondition(f"this server does not run evolution: {where}")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            try:
                done.set_result(self.run(task, candidates, budget_s))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                done.set_exception(e)

        self.scheduler.add_job(job, id=f"trigger-{task}-{time.monotonic_ns()}")
        if wait:
            report = await asyncio.wrap_future(done)
            status = self.status()
            if report is not None:
                status["triggered"] = report.summary()
            return status
        # let the job start, so the status a caller gets back already says "running"
        for _ in range(20):
            if self.running:
                break
            await asyncio.sleep(0.05)
        return self.status()

    def status(self) -> dict:
        return {
            "running": self.running, "current_task": self.current_task, "candidates_done": self.candidates_done,
            "candidates_total": self.candidates_total, "paused_for_load": self.paused,
            "generations": self.generations, "recent": [r.summary() for r in self.recent],
            "scheduler_enabled": self.periodic, "interval_seconds": self.config.evolve_interval_s,
            "leading": self.leading,
            "leader": "" if self.leading else ((self.leader() or {}).get("info", {}).get("grpc", "")),
        }
