"""The serving core: every task operation, once. Transports (gRPC, HTTP) only translate wire types.

The core owns the store, the runtime and the batcher. How a new task gets its first path, and how
paths improve, is evolution's business: the composition root (`munet.app`) hands the core a
`PathMaker`, so this package never imports evolution; the two meet through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from munet import metrics
from munet.config import Config
from munet.data import images as imglib
from munet.data.examples import Examples, InvalidExamples, npz_examples
from munet.data.splits import TEST, TRAIN, UNSPECIFIED, VALIDATION, split_indices, split_new_examples
from munet.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, MunetError, NotFound
from munet.models.accounting import accounted_params
from munet.models.export import export_and_check
from munet.models.roots import RootUnavailable, all_root_modules, ensure_root, get_root_spec, input_size, resolve_root
from munet.models.store import (
    Expectation,
    PathRecord,
    Store,
    TaskRecord,
    check_evolution_settings,
    check_policy,
)
from munet.service.batching import MicroBatcher
from munet.service.runtime import Runtime, ServedPath
from munet.service.shadow import Shadows

log = logging.getLogger(__name__)

NPZ_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,195}\.npz")


@dataclass
class ImageInput:
    encoded: bytes | None = None
    raw: bytes | None = None
    height: int = 0
    width: int = 0
    channels: int = 0


@dataclass
class TaskSpec:
    name: str
    labels: list[str] = field(default_factory=list)
    builtin: str | None = None
    npz_file: str | None = None
    max_examples: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    root: str = ""  # the root to grow from; "" = the server's
    policy: str = "auto"  # promotion policy: auto, approve or frozen
    evolution: dict = field(default_factory=dict)  # per-task evolution settings (store.TASK_EVOLUTION_SETTINGS)


@dataclass
class Prediction:
    top: list[tuple[str, int, float]]  # (label, index, probability), best first


class PathMaker(Protocol):
    """Makes and stores a new task's first path version (evolution implements it)."""

    def initial_path(self, task: TaskRecord) -> PathRecord: ...


class Core:
    def __init__(self, config: Config, store: Store, path_maker: PathMaker | None = None):
        self.config = config
        self.store = store
        self.path_maker = path_maker
        self.runtime = Runtime(store, config.providers, config.intra_op_threads,
                               max_versions=config.max_loaded_versions, merged_max_batch=config.merged_max_batch,
                               shared_threads=config.shared_thread_pool)
        self._loading: dict[tuple[str, int], asyncio.Future] = {}
        self.shadows = Shadows(config.shadow_rate, seed=config.seed)
        self.batcher = MicroBatcher(config.max_batch_size, config.max_delay_ms, on_batch=self._on_batch,
                                    max_queue_images=max(config.max_queue_images, config.max_request_images),
                                    max_task_queue_images=config.max_task_queue_images or max(
                                        config.max_request_images, config.max_queue_images // 2))
        self._registering: set[str] = set()
        self._lock = threading.Lock()
        self._sync_lock = threading.RLock()  # one sync or flip at a time: swaps never go backwards
        self._load_failures: dict[tuple[str, int | None], float] = {}  # (task, version) -> retry after
        self.decode_pool = ThreadPoolExecutor(max(1, config.decode_threads), thread_name_prefix="munet-decode")
        self.root = resolve_root(store, config.root)
        self.image_size = self.root_input_size(self.root)

    def root_input_size(self, root: str) -> int:
        """The input size new tasks on `root` get: configured, else the root's (larger on a GPU)."""
        try:
            spec = get_root_spec(root, self.store.home)
        except RootUnavailable as e:
            raise InvalidArgument(str(e)) from None
        on_gpu = any(p != "CPUExecutionProvider" for p in self.runtime.pool.providers)
        return input_size(spec, self.config.image_size, on_gpu)

    def new_task_size(self, spec: TaskSpec) -> int:
        return self.image_size if not spec.root or spec.root == self.root else self.root_input_size(spec.root)

    # ---- lifecycle --------------------------------------------------------------------------

    def restore(self, cleanup: bool = True) -> list[str]:
        """Serve every task's current version, and load pending ones, as stored. With `cleanup`, drop
        tasks a crash left half-registered, but never one whose registration still runs in another
        process (the leader cleans up; other servers only follow)."""
        if cleanup:
            for t in self.store.list_tasks():
                if t.current_version is None and not self.registration_alive(t):
                    log.warning("task %s was never finished registering (status %s); removing it", t.name, t.status)
                    self.store.delete_task(t.name)
        self.sync_from_store()
        served = sorted(self.runtime.tasks())
        log.info("restored %d tasks: %s", len(served), ", ".join(served) or "-")
        return served

    def registration_alive(self, t: TaskRecord) -> bool:
        """Whether the process registering `t` may still be at work: on this host, its pid is alive (and
        is not this freshly started process); elsewhere, the registration is younger than gc_min_age_s."""
        owner = t.source.get("owner") or {}
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if owner["pid"] == os.getpid():
                return False  # a crashed process of ours had this pid; this one registers nothing yet
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        created = datetime.fromisoformat(t.created_at)
        return (datetime.now(UTC) - created).total_seconds() < self.config.gc_min_age_s

    # ---- following the store --------------------------------------------------------------------
    #
    # The store is the only meeting point: whichever process published a version (this one, the
    # evolution worker, another server, the leader on another host), every serving process sees the
    # task's pointer move, loads and warms the modules it lacks, then swaps; requests in flight finish
    # on the old version. A version that fails to load here keeps the old one serving, is reported
    # (log, metric, a "failed" event) and is retried after LOAD_RETRY_S.

    LOAD_RETRY_S = 30.0

    def sync_from_store(self) -> None:
        """Make this process serve what the store says: current versions, pending ones (loaded for
        Predict-by-version and shadowed), and no deleted task."""
        with self._sync_lock:
            tasks = {t.name: t for t in self.store.list_tasks() if t.current_version is not None}
            for t in tasks.values():
                live = self.runtime.get(t.name)
                try:
                    if live is None or live.version != t.current_version:
                        self._follow_version(t)
                    self._follow_pending(t)
                except NotFound:
                    if not self._moved_on(t):
                        raise
                    # deleted or moved while this sync ran: the next sync serves what is there then
            for task in set(self.runtime.tasks()) - set(tasks):
                old = self.runtime.get(task)
                self.runtime.remove(task)
                self.shadows.clear(task)
                if old is not None:
                    _retire_series(old)
                    _drop(metrics.PATH_VERSION, task)
                log.info("task %s is gone from the store; no longer serving it", task)
            self._update_session_metrics()

    def follow(self, interval_s: float) -> threading.Event:
        """Follow the store from a background thread: every `interval_s`, a cheap check of the store's
        change token; a sync only when something changed (or a failed load is due again). Set the
        returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            token = None
            while not stop.wait(interval_s):
                try:
                    now = self.store.change_token()
                    due = any(t <= time.monotonic() for t in self._load_failures.values())
                    if now != token or due:
                        token = now
                        self.sync_from_store()
                except Exception:  # noqa: BLE001 - a closing store at shutdown, a transient database error
                    if not stop.is_set():
                        log.exception("following the store failed")
                        stop.wait(1.0)

        threading.Thread(target=loop, name="munet-follow-store", daemon=True).start()
        return stop

    def _follow_version(self, t: TaskRecord) -> None:
        key = (t.name, t.current_version)
        if self._load_failures.get(key, 0.0) > time.monotonic():
            return
        try:
            rec = self.store.get_path(t.name, t.current_version)
            served = self.runtime.prepare(rec, t.labels, t.image_size)
        except Exception as e:  # noqa: BLE001 - whatever it is, the old version keeps serving
            if isinstance(e, NotFound) and self._moved_on(t):
                return  # not a failure: the task was deleted or rolled on while this loaded
            self._load_failures[key] = time.monotonic() + self.LOAD_RETRY_S
            live = self.runtime.get(t.name)
            msg = f"{type(e).__name__}: {e}"
            log.error("cannot load %s v%s, %s: %s", t.name, t.current_version,
                      f"v{live.version} keeps serving" if live else "not serving it", msg)
            metrics.FOLLOW_FAILURES.labels(t.name).inc()
            with contextlib.suppress(Exception):
                self.store.add_event(t.name, "failed", t.current_version or 0, stage="load", error=msg[:500],
                                     server=f"{socket.gethostname()}:{os.getpid()}")
            return
        self._load_failures.pop(key, None)
        self._swap_in(served)
        log.info("serving %s v%d", served.task, served.version)

    def _moved_on(self, t: TaskRecord) -> bool:
        """Whether the store no longer has `t` as this sync read it (deleted, or another current
        version): what a NotFound during a sync means when it is no fault of the store."""
        try:
            now = self.store.get_task(t.name)
        except NotFound:
            return True
        return now.uid != t.uid or now.current_version != t.current_version

    def _follow_pending(self, t: TaskRecord) -> None:
        pending = [v for v in self.store.list_versions(t.name) if v.status == "pending"]
        shadow = self.shadows.get(t.name)
        if not pending:
            if shadow is not None:
                self.shadows.clear(t.name)
            return
        rec = pending[-1]
        if shadow is not None and shadow.version == rec.version:
            return
        key = (t.name, rec.version)
        if self._load_failures.get(key, 0.0) > time.monotonic():
            return
        try:
            self.shadows.set(self._load_version(rec))
            self._load_failures.pop(key, None)
        except Exception as e:  # noqa: BLE001 - it stays pending; Promote loads it again
            self._load_failures[key] = time.monotonic() + self.LOAD_RETRY_S
            log.error("pending %s v%d could not be loaded: %s", t.name, rec.version, e)

    def _swap_in(self, served: ServedPath) -> None:
        old = self.runtime.swap(served)
        if old is not None and old.version != served.version:
            _retire_series(old)
        metrics.PATH_VERSION.labels(served.task).set(served.version)
        for i, m in enumerate(served.module_ids):
            metrics.PATH_MODULE.labels(served.task, str(served.version), str(i), m).set(1)
        shadow = self.shadows.get(served.task)
        if shadow is not None and shadow.version == served.version:
            self.shadows.clear(served.task)
        self.runtime.release()
        self._update_session_metrics()

    def _flip(self, rec: PathRecord, expect: Expectation | None = None) -> ServedPath:
        """This process's own pointer moves (registration, rollback, an operator's promotion): load and
        warm here first, so a version that cannot load never becomes current, then flip the store
        and swap. Other servers follow the store."""
        with self._sync_lock:
            t = self.store.get_task(rec.task)
            served = self.runtime.prepare(rec, t.labels, t.image_size)
            self.store.set_current(rec.task, rec.version, expect)
            self._swap_in(served)
            return served

    def _on_batch(self, images: int, tasks: int) -> None:
        # per batch, not per request: multiprocess metric writes cost the event loop (profiled)
        metrics.QUEUE_DEPTH.set(self.batcher.queue_depth)
        metrics.BATCH_SIZE.observe(images)
        metrics.BATCH_TASKS.observe(tasks)

    # ---- predict ----------------------------------------------------------------------------

    def decode(self, inputs: list[ImageInput], size: int, deadline: float | None = None,
               cancelled: threading.Event | None = None) -> np.ndarray:
        """Images of any size and format -> uint8 (N, size, size, 3), the task's input format.

        CPU-bound: run it in `decode_pool`. Work stops between images once the request's `deadline`
        (time.monotonic()) has passed or it was `cancelled`."""
        if not inputs:
            raise InvalidArgument("the request has no images")
        if len(inputs) > self.config.max_request_images:
            raise InvalidArgument(f"{len(inputs)} images in one request; the limit is "
                                  f"{self.config.max_request_images}")
        out = np.empty((len(inputs), size, size, 3), np.uint8)
        limit = self.config.max_image_pixels
        for i, im in enumerate(inputs):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("the request was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"the request's deadline passed while decoding image {i} of {len(inputs)}")
            try:
                if im.encoded is not None:
                    out[i] = imglib.decode_image(im.encoded, size, limit)
                elif im.raw is not None:
                    out[i] = imglib.from_raw(im.raw, im.height, im.width, im.channels, size, limit)
                else:
                    raise imglib.InvalidImage("it carries neither encoded bytes nor raw pixels")
            except imglib.InvalidImage as e:
                raise InvalidArgument(f"image {i}: {e}") from None
        return out

    def served(self, task: str) -> ServedPath:
        p = self.runtime.get(task)
        if p is None:
            if task in self._registering:
                raise FailedPrecondition(f"task {task!r} is still being registered")
            raise NotFound(f"task {task!r} does not exist")
        return p

    async def path_for(self, task: str, version: int = 0) -> ServedPath:
        """The path that answers a request: the task's current one (version 0), or any version kept in
        the store, loaded on first request (off the event loop, once however many ask) into an LRU."""
        current = self.served(task)
        if not version or version == current.version:
            return current
        if version < 0:
            raise InvalidArgument(f"version must be 0 (current) or a version number; got {version}")
        rec = self.store.get_path(task, version)
        if rec.status in ("failed", "rejected"):
            raise FailedPrecondition(f"{task} v{version} is {rec.status} and cannot serve: "
                                     f"{rec.lineage.get('note', '')}")
        p = self.runtime.cached_version(task, version, tuple(rec.modules))
        if p is not None:
            return p
        key = (task, version)
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(self.decode_pool, self._load_version, rec)
            self._loading[key] = fut
            fut.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(fut)

    def _load_version(self, rec: PathRecord) -> ServedPath:
        t0 = time.perf_counter()
        t = self.store.get_task(rec.task)
        if rec.status == "candidate":
            # never published, so never exported and checked (published versions were, by evolution)
            export_and_check(self.store, rec, self.config.parity_atol)
        served = self.runtime.prepare(rec, t.labels, t.image_size)
        self.runtime.keep_version(served)
        secs = time.perf_counter() - t0
        metrics.VERSION_LOADS.labels(rec.task).inc()
        metrics.VERSION_LOAD_SECONDS.observe(secs)
        self._update_session_metrics()
        log.info("loaded %s v%d on request in %.2f s", rec.task, rec.version, secs)
        return served

    async def predict(self, task: str, inputs: list[ImageInput], top_k: int = 1, timeout: float | None = None,
                      version: int = 0, timing: dict[str, float] | None = None) -> tuple[ServedPath, list[Prediction]]:
        """Top-k labels per image, from the current path or the `version` asked for. `timing` receives
        the request's "decode", "queue" and "compute" seconds (see `metrics.observe_split`)."""
        return await self._classify(task, inputs, timeout, version,
                                    lambda path, y: top_k_predictions(y, path.labels, top_k), timing)

    async def probabilities(self, task: str, inputs: list[ImageInput], timeout: float | None = None,
                            version: int = 0, timing: dict[str, float] | None = None
                            ) -> tuple[ServedPath, np.ndarray]:
        """Every class's probability per image, float32 (N, labels) (the Open Inference Protocol)."""
        return await self._classify(task, inputs, timeout, version, lambda path, y: softmax(y), timing)

    async def _classify(self, task: str, inputs: list[ImageInput], timeout: float | None, version: int,
                        post: Callable[[ServedPath, np.ndarray], Any], timing: dict[str, float] | None = None
                        ) -> tuple[ServedPath, Any]:
        # the path is pinned here: a swap while this request waits does not change its answer
        path = self.served(task) if not version else await self.path_for(task, version)
        # decoding is CPU-bound (a 4096x4096 WebP takes ~3 s): never on the event loop, where health
        # checks and every other request wait; in a bounded pool, stopped for a request that is gone
        deadline = time.monotonic() + timeout if timeout is not None else None
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        if not inputs:
            raise InvalidArgument("the request has no images")
        if len(inputs) > self.config.max_request_images:
            raise InvalidArgument(f"{len(inputs)} images in one request; the limit is "
                                  f"{self.config.max_request_images} (max_request_images)")
        # admitted before decoding: a refused request costs nothing; the batcher releases it
        self.batcher.reserve(task, len(inputs))
        t_decode = time.perf_counter()
        try:
            if _cheap(inputs, path.image_size):
                # raw pixels, few and small: converting them costs less than the hop to the decode pool
                # and back (measured: the hop is most of a single image's server overhead)
                x = imglib.to_model_input(self.decode(inputs, path.image_size))
            else:
                x = await loop.run_in_executor(
                    self.decode_pool, lambda: imglib.to_model_input(self.decode(inputs, path.image_size, deadline,
                                                                                cancelled)))
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                cancelled.set()
            self.batcher.release(task, len(inputs))
            raise
        if timing is not None:
            timing["decode"] = time.perf_counter() - t_decode
        if not version and self.shadows.get(task) is not None:
            def post_and_shadow(y: np.ndarray) -> Any:
                self.shadows.maybe_sample(task, x, y)  # after the answer, never instead of it
                return post(path, y)
            out = await self.batcher.submit(path, x, post=post_and_shadow, reserved=True, timing=timing)
        else:
            out = await self.batcher.submit(path, x, post=lambda y: post(path, y), reserved=True, timing=timing)
        metrics.IMAGES.labels(task, str(path.version)).inc(len(x))
        return path, out

    def predict_sync(self, task: str, x_u8: np.ndarray) -> tuple[ServedPath, np.ndarray]:
        """Logits for already-converted images, bypassing the batcher (tools and tests)."""
        path = self.served(task)
        if x_u8.ndim != 4 or x_u8.shape[1] != path.image_size:
            x_u8 = imglib.batch_to_rgb(x_u8, path.image_size)
        return path, path.run(imglib.to_model_input(x_u8))

    # ---- tasks ------------------------------------------------------------------------------

    def register_task(self, spec: TaskSpec, uploaded: Iterable[Examples] = ()) -> TaskRecord:
        """Create a task, store its examples, train and serve its first path. Blocking (seconds)."""
        t0 = time.perf_counter()
        try:
            rec = self._register(spec, uploaded)
        except MunetError as e:
            metrics.REGISTRATIONS.labels(e.code).inc()
            raise
        except Exception:
            metrics.REGISTRATIONS.labels("INTERNAL").inc()
            raise
        finally:
            _release_memory()
        metrics.REGISTRATIONS.labels("OK").inc()
        log.info("registered task %s in %.1f s", spec.name, time.perf_counter() - t0)
        return rec

    def _register(self, spec: TaskSpec, uploaded: Iterable[Examples]) -> TaskRecord:
        if self.path_maker is None:
            raise FailedPrecondition("this server cannot train new tasks (no path maker configured)")
        if spec.max_examples < 0:
            raise InvalidArgument(f"max_examples must be >= 0 (0: all); got {spec.max_examples}")
        check_policy(spec.policy or "auto")
        self._check_evolution_limits(spec.evolution or {})
        if len(self.store.list_tasks()) >= self.config.max_tasks:
            raise InvalidArgument(f"this server holds at most {self.config.max_tasks} tasks (max_tasks); "
                                  "delete one first")
        for frac, what in ((spec.validation_fraction, "validation"), (spec.test_fraction, "test")):
            if not 0.0 <= frac < 0.5:
                raise InvalidArgument(f"{what}_fraction must be in [0, 0.5), got {frac}")
        if spec.builtin and spec.npz_file:
            raise InvalidArgument("give either a built-in data set or an .npz file, not both")
        sources = [s for s in (spec.builtin, spec.npz_file) if s]
        root = spec.root or self.root
        size = self.new_task_size(spec)
        data, labels = self._load_source(spec, uploaded, size)
        if len(data.y) == 0:
            raise InvalidArgument("the task has no examples: name a built-in data set or an .npz file, "
                                  "or stream labelled images after the spec")
        if not labels:
            raise InvalidArgument("the task has no label names")
        if len(set(labels)) != len(labels) or any(not s for s in labels):
            raise InvalidArgument("label names must be non-empty and distinct")
        if len(labels) > self.config.max_labels:
            raise InvalidArgument(f"{len(labels)} labels; a task may have at most {self.config.max_labels} "
                                  "(max_labels)")
        if any(len(s) > 200 or "\x00" in s for s in labels):
            raise InvalidArgument("label names must be at most 200 characters, without NUL")
        bad = (data.y < 0) | (data.y >= len(labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgument(f"example {i} has label {int(data.y[i])}, outside 0..{len(labels) - 1}")
        if spec.max_examples and len(data.y) > spec.max_examples:
            keep = np.sort(np.random.default_rng(spec.seed).permutation(len(data.y))[: spec.max_examples])
            data = Examples(data.x[keep], data.y[keep], data.split[keep])
        if len(data.y) > self.config.max_examples_per_task:
            raise InvalidArgument(f"{len(data.y)} examples; this server takes at most "
                                  f"{self.config.max_examples_per_task} per task (set max_examples)")
        unspecified = data.split == UNSPECIFIED
        if unspecified.any():
            codes = split_indices(data.y[unspecified], spec.seed, spec.validation_fraction, spec.test_fraction)
            data.split[unspecified] = codes
        if not (data.split == TRAIN).any() or not (data.split == VALIDATION).any():
            raise InvalidArgument("the task needs training and validation examples; add more examples")

        with self._lock:
            if spec.name in self._registering:
                raise InvalidArgument(f"task {spec.name!r} is being registered by another call")
            self._registering.add(spec.name)
        try:
            source = {"kind": "builtin" if spec.builtin else "npz" if spec.npz_file else "upload",
                      "name": sources[0] if sources else None, "seed": spec.seed,
                      # who registers it: another worker restarting must not take it for a crash's leftover
                      "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
            ensure_root(self.store, root)
            self.store.create_task(spec.name, labels, source, root=root, image_size=size, policy=spec.policy or "auto",
                                   evolution=spec.evolution)
            try:
                self.store.add_examples(spec.name, data.x, data.y, data.split)
                path = self.path_maker.initial_path(self.store.get_task(spec.name))
                self._flip(path)
                self.store.add_event(spec.name, "registered", path.version, root=root, labels=len(labels),
                                     policy=spec.policy or "auto")
            except BaseException:
                # a failed registration leaves nothing behind: the name can be used again
                self.runtime.remove(spec.name)
                self.store.delete_task(spec.name)
                raise
        finally:
            with self._lock:
                self._registering.discard(spec.name)
        return self.store.get_task(spec.name)

    def _load_source(self, spec: TaskSpec, uploaded: Iterable[Examples], size: int) -> tuple[Examples, list[str]]:
        labels = list(spec.labels)
        parts = list(uploaded)
        if spec.builtin:
            from munet.data.builtin import DatasetUnavailable, builtin_length, load_builtin

            try:
                n = min(builtin_length(spec.builtin), spec.max_examples or 1 << 62)
                if n > self.config.max_examples_per_task:
                    # checked before converting: 70k images at 96 px would take 2 GB only to be refused
                    raise InvalidArgument(f"{n} examples; this server takes at most "
                                          f"{self.config.max_examples_per_task} per task (set max_examples)")
                ds = load_builtin(spec.builtin, max_examples=spec.max_examples or None, seed=spec.seed, size=size)
            except DatasetUnavailable as e:
                raise FailedPrecondition(str(e)) from None
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            parts.insert(0, ds)
            if labels and len(labels) != len(ds.labels):
                raise InvalidArgument(f"{spec.builtin} has {len(ds.labels)} classes, {len(labels)} labels given")
            labels = labels or list(ds.labels)
        elif spec.npz_file:
            ex, names = self.read_npz(self._import_path(spec.npz_file).read_bytes(), spec.npz_file, size,
                                      self.config.max_npz_bytes)
            parts.insert(0, ex)
            labels = labels or names
        elif not labels and parts:
            raise InvalidArgument("uploaded examples need label names in the spec")
        return Examples.concat(parts, size), labels

    def _import_path(self, name: str) -> Path:
        # the client names a file, never a path: nothing outside the import directory is readable
        # (a symlink inside it that points out is refused too: the resolved path is checked)
        if not NPZ_NAME.fullmatch(name or ""):
            raise InvalidArgument(f"npz_file {name[:80]!r} must be a plain file name ending in .npz: letters, "
                                  "digits, '.', '_' or '-', at most 200 characters, no directories")
        base = self.config.imports.resolve()
        path = (base / name).resolve()
        if base not in path.parents:
            raise InvalidArgument(f"npz_file {name!r} must name an .npz file inside the import directory")
        if not path.is_file():
            raise NotFound(f"no file {name!r} in the import directory {base}")
        return path

    @staticmethod
    def read_npz(data: bytes, what: str = "upload", size: int = imglib.SIZE,
                 max_bytes: int = 1 << 30) -> tuple[Examples, list[str]]:
        """An .npz (munet.data.examples.read_npz) as Examples at `size`, and its label names."""
        try:
            ex = npz_examples(data, what, size, max_bytes)
        except InvalidExamples as e:
            raise InvalidArgument(str(e)) from None
        return ex, ex.labels

    def add_examples(self, task: str, examples: Examples) -> dict[str, int]:
        """Store labelled examples durably; unsplit ones go to train or validation by a seeded hash."""
        t = self.store.get_task(task)
        if len(examples.y) == 0:
            raise InvalidArgument("no examples given")
        held = sum(self.store.example_counts(task).values())
        if held + len(examples.y) > self.config.max_examples_per_task:
            raise InvalidArgument(f"task {task!r} holds {held} examples; {len(examples.y)} more would pass the "
                                  f"limit of {self.config.max_examples_per_task} per task (max_examples_per_task)")
        bad = (examples.y < 0) | (examples.y >= len(t.labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgument(f"example {i} has label {int(examples.y[i])}, outside 0..{len(t.labels) - 1}")
        unspecified = examples.split == UNSPECIFIED
        if unspecified.any():
            examples.split[unspecified] = split_new_examples(
                examples.x[unspecified], int(t.source.get("seed", 0)), 0.2)
        counts = self.store.add_examples(task, examples.x, examples.y, examples.split)
        metrics.EXAMPLES_ADDED.labels(task).inc(len(examples.y))
        if self.shadows.get(task) is not None:
            self.shadows.labelled(task, self.runtime.get(task), imglib.to_model_input(examples.x), examples.y)
        return counts

    def delete_task(self, task: str) -> None:
        self.store.get_task(task)
        old = self.runtime.get(task)
        self.runtime.remove(task)
        self.store.delete_task(task)
        self.store.add_event(task, "deleted")
        self.shadows.clear(task)
        if old is not None:
            _retire_series(old)
            _drop(metrics.PATH_VERSION, task)
        self.store.garbage_collect(protected=self.protected_modules())
        self._update_session_metrics()

    def protected_modules(self) -> set[str]:
        return all_root_modules(self.store)

    # ---- serving graph ----------------------------------------------------------------------

    def _update_session_metrics(self) -> None:
        loaded = self.runtime.pool.loaded()
        metrics.SESSIONS.set(len(loaded))
        metrics.JOINED_SESSIONS.set(self.runtime.pool.joined_loaded())
        for labels in list(getattr(metrics.MODULE_INFO, "_metrics", {})):
            if labels[0] not in loaded:  # a released session's series
                _drop(metrics.MODULE_INFO, *labels)
        for m in loaded:
            try:
                rec = self.store.module_record(m)
            except NotFound:
                continue
            metrics.MODULE_INFO.labels(m, rec.kind, self.runtime.pool.provider_of(m)).set(1)

    # ---- views ------------------------------------------------------------------------------

    def task_view(self, name: str) -> dict:
        t = self.store.get_task(name)
        counts = self.store.example_counts(name)
        path = self.store.get_path(name) if t.current_version is not None else None
        lineage = []
        if path is not None:
            by_version = {v.version: v for v in self.store.list_versions(name)}
            seen, cur = set(), path
            while cur is not None and cur.version not in seen:
                seen.add(cur.version)
                lineage.append(self.path_view(cur))
                parents = [p for p in cur.lineage.get("parents", []) if cur.lineage.get("parent_task") == name]
                cur = by_version.get(parents[0]) if parents else None
            lineage.reverse()
        return {
            "name": t.name, "labels": t.labels, "status": t.status, "current_version": t.current_version or 0,
            "path": self.path_view(path) if path else None, "train_examples": counts["train"],
            "validation_examples": counts["validation"], "test_examples": counts["test"],
            "source": t.source.get("name") or t.source.get("kind", ""), "created_at": t.created_at,
            "lineage": lineage, "root": t.root, "image_size": t.image_size,
            "policy": t.policy,
            "evolution": {"candidates_per_generation": t.evolution.get("candidates_per_generation", 0),
                          "candidate_budget_seconds": t.evolution.get("candidate_budget_s", 0.0),
                          "scale_base": t.evolution.get("scale_base", 0.0)},
            "pending_versions": [v.version for v in self.store.list_versions(name) if v.status == "pending"],
            "shadow": self.shadows.stats(name),
        }

    def path_view(self, rec: PathRecord) -> dict:
        users = self.store.module_users()
        protected = self.protected_modules()
        modules, total = [], 0
        for m in rec.modules:
            r = self.store.module_record(m)
            n_users = len(users.get(m, set()) | ({rec.task} if rec.status == "current" else set()))
            total += r.params
            modules.append({"id": m, "kind": r.kind, "params": r.params, "shared_by": n_users,
                            "frozen": m in protected or n_users > 0})
        lin = rec.lineage
        return {
            "version": rec.version, "modules": modules, "validation_accuracy": rec.validation_accuracy or 0.0,
            "test_accuracy": rec.test_accuracy or 0.0, "score": rec.score or 0.0, "params": total,
            "accounted_params": int(round(accounted_params(self.store, rec.task, rec.modules, users=users))),
            "added_params": int(lin.get("added_params", 0)),
            "parents": [int(p) for p in lin.get("parents", [])], "parent_task": lin.get("parent_task", ""),
            "mutations": list(lin.get("mutations", [])), "hyperparameters": rec.hparams,
            "training_seconds": float(lin.get("training_seconds", 0.0)), "created_at": rec.created_at,
            "status": rec.status, "training_steps": int(lin.get("steps", 0)),
            "training_examples": int(lin.get("examples", 0)), "decision": str(lin.get("decision", "")),
            "note": str(lin.get("note", "")),
        }

    def list_versions(self, task: str) -> tuple[int, list[dict]]:
        t = self.store.get_task(task)
        return t.current_version or 0, [self.path_view(v) for v in self.store.list_versions(task)]

    def rollback(self, task: str, version: int = 0, policy: str = "") -> dict:
        """Serve an earlier stored version again (0: the newest one older than the current).

        The task is frozen unless `policy` says otherwise ("auto" or "approve"), so the next
        generation does not silently undo the operator's decision."""
        t = self.store.get_task(task)
        policy = check_policy(policy or "frozen")
        versions = [v for v in self.store.list_versions(task) if v.status not in ("failed", "rejected")]
        if version == 0:
            # the version served before this one: a retired version (candidates never served)
            older = [v for v in versions if v.status == "retired" and v.version < (t.current_version or 0)]
            if not older:
                raise FailedPrecondition(f"task {task!r} has no earlier served version than {t.current_version}")
            rec = older[-1]
        else:
            match = [v for v in versions if v.version == version]
            if not match:
                raise NotFound(f"task {task!r} has no servable version {version}")
            rec = match[0]
        # the policy first: a generation finishing now must not promote over the rollback
        self.store.set_policy(task, policy)
        if rec.version != t.current_version:
            self._flip(rec)
            log.info("task %s rolled back from v%s to v%d; policy %s", task, t.current_version, rec.version, policy)
        self.store.add_event(task, "rolled_back", rec.version, previous=t.current_version, policy=policy)
        return self.task_view(task)

    def _check_evolution_limits(self, evolution: dict, allow_zero: bool = False) -> None:
        """A task's own settings within the limits TriggerEvolution has: a task cannot ask every
        scheduled generation for what no single call may."""
        settings = check_evolution_settings(evolution, allow_zero=allow_zero)
        cfg = self.config
        limits = {"candidates_per_generation": ("max_candidates_per_generation", cfg.max_candidates_per_generation),
                  "candidate_budget_s": ("max_candidate_budget_s", cfg.max_candidate_budget_s)}
        for k, (name, most) in limits.items():
            if settings.get(k, 0) > most:
                raise InvalidArgument(f"{k} must be at most {most:g} ({name}); got {settings[k]:g}")

    def set_policy(self, task: str, policy: str = "", evolution: dict | None = None) -> dict:
        """Change a task's promotion policy ("" keeps it) and evolution settings (0 = the server's)."""
        before = self.store.get_task(task)
        self._check_evolution_limits(evolution or {}, allow_zero=True)
        t = self.store.set_policy(task, policy or None, evolution)
        if t.policy != before.policy:
            log.info("task %s: policy %s -> %s", task, before.policy, t.policy)
        if (t.policy, t.evolution) != (before.policy, before.evolution):
            self.store.add_event(task, "policy_changed", policy=t.policy, previous=before.policy, evolution=t.evolution)
        return self.task_view(task)

    def promote(self, task: str, version: int) -> dict:
        """An operator's promotion: serve `version` (pending, or any kept version that did not fail)."""
        rec = self.store.get_path(task, version)
        if rec.status in ("failed", "rejected"):
            raise FailedPrecondition(f"{task} v{version} is {rec.status} and cannot be promoted"
                                     f"{': ' + rec.lineage['note'] if rec.lineage.get('note') else ''}")
        if rec.status == "current":
            return self.task_view(task)
        if rec.status == "candidate":
            export_and_check(self.store, rec, self.config.parity_atol)  # never published: never checked
        self._flip(rec)
        self.store.update_path(task, version, lineage={**rec.lineage, "decision": "promoted by an operator"})
        self.store.add_event(task, "promoted", version, by="operator")
        self.shadows.clear(task)
        log.info("task %s: v%d promoted by an operator", task, version)
        return self.task_view(task)

    def reject(self, task: str, version: int, reason: str = "") -> dict:
        """An operator's refusal of a pending (or any not-current) version: it is never promoted by
        evolution, and is pruned first."""
        rec = self.store.get_path(task, version)
        if rec.status == "current":
            raise FailedPrecondition(f"{task} v{version} is serving; roll back or promote another version first")
        note = f"rejected by an operator{': ' + reason if reason else ''}"
        self.store.set_path_status(task, version, "rejected", note=note[:500])
        self.runtime.forget_version(task, version)
        self.store.add_event(task, "rejected", version, reason=reason)
        self.shadows.clear(task, version)
        log.info("task %s: v%d rejected%s", task, version, f" ({reason})" if reason else "")
        return self.task_view(task)

    def list_task_views(self) -> list[dict]:
        return [self.task_view(t.name) for t in self.store.list_tasks() if t.current_version is not None]


def _release_memory() -> None:
    # registration trains on cached features of the whole data set; without this, glibc keeps the
    # freed arenas and a server that registered one task stays ~300 MB larger (measured)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


INLINE_DECODE_PIXELS = 4 * 128 * 128  # raw pixels converted on the event loop (~0.1 ms at most)


def _cheap(inputs: list[ImageInput], size: int) -> bool:
    """Whether a request is only raw pixels, at most INLINE_DECODE_PIXELS of them in and out."""
    if len(inputs) * size * size > INLINE_DECODE_PIXELS:
        return False
    total = 0
    for im in inputs:
        if im.raw is None or im.encoded is not None:
            return False
        total += len(im.raw)
    return total <= INLINE_DECODE_PIXELS * 3


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(np.float32, copy=False)


def top_k_predictions(logits: np.ndarray, labels: tuple[str, ...] | list[str], k: int) -> list[Prediction]:
    k = max(1, min(int(k or 1), len(labels)))
    p = softmax(logits)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return [Prediction([(labels[j], int(j), float(p[i, j])) for j in order[i]]) for i in range(len(p))]


def _drop(gauge, *labels: str) -> None:
    """Remove a series. Under BentoML's multiprocess collector a removed child's last value stays in
    this process's file until the process ends, so it is set to 0 first: a retired version or a
    deleted task never keeps reporting 1."""
    with contextlib.suppress(KeyError, ValueError):
        gauge.labels(*labels).set(0)
        gauge.remove(*labels)


def _retire_series(path: ServedPath) -> None:
    for i, m in enumerate(path.module_ids):
        _drop(metrics.PATH_MODULE, path.task, str(path.version), str(i), m)


__all__ = [
    "TEST",
    "TRAIN",
    "UNSPECIFIED",
    "VALIDATION",
    "Core",
    "Examples",
    "ImageInput",
    "PathMaker",
    "Prediction",
    "TaskSpec",
    "top_k_predictions",
]
