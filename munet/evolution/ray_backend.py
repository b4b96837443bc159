"""evolution_backend=ray: a generation's candidates train as Ray tasks, in parallel.

The generation still runs where it always does (the evolution worker process on the leader, or the
server's scheduler thread); only the training of its candidates moves. Once per generation the
leader puts into Ray's object store what the candidates share: every stored (frozen) module their
chains run, every cached prefix output (the prefix cache) and the labels. Each candidate's task
gets those as object references, so nothing is re-read or re-sent per candidate; only the
candidate's own trainable modules travel with its task. A task trains with `train_candidate`, as
the local backend does, and returns the trained modules' weights, its `TrainResult` and its
validation answers; the leader loads the weights back into the candidate's modules, and the
generation scores, persists and publishes exactly as with the local backend: the leader alone
writes the store.

`ray_address` "local" starts a Ray instance on this machine (from the process that runs
generations, so it inherits that process's low CPU priority); host:port joins an existing cluster,
whose workers must have munet-serve installed. Either happens once per process.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import traceback
import warnings

import numpy as np
import torch
from torch import nn

from munet.evolution.train import train_candidate
from munet.evolution.trainers import Done, Pause, TrainJob, TrainOutcome, TrainSettings, describe
from munet.models.training import predict_classes

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# a task that has not finished within this many candidate budgets (plus a margin for start-up and
# evaluation) is hung: cancelled and reported as that candidate's failure
DEADLINE_BUDGETS = 2.0
DEADLINE_MARGIN_S = 120.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster named by ray_address cannot be reached."""


_lock = threading.Lock()
_connected: str | None = None  # the ray_address this process connected with (None: not by us)
_remote_train = None
_flag_class = None


def _where(address: str) -> str:
    return f"the Ray cluster at {address!r} (ray_address, MUNET_RAY_ADDRESS)"


def probe(address: str) -> None:
    """Fail fast, with one clear message, when nothing Ray-like answers at `address`: ray.init itself
    waits for an unreachable head for minutes, logging retries (measured: over 200 s with Ray 2.60)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayUnavailable(f"{_where(address)}: not host:port (or local, for a Ray instance on this machine)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise RayUnavailable(f"cannot reach {_where(address)}: {e.strerror or e}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS head would refuse the plaintext handshake below
    import grpc

    # Ray's head (GCS) and its client server both speak gRPC: anything else listening there would
    # leave ray.init waiting as long as an unreachable address does
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise RayUnavailable(f"{_where(address)}: something listens there, but not a Ray head (no gRPC answer "
                             f"within {PROBE_TIMEOUT_S:.0f} s)") from None
    finally:
        channel.close()


def connect(address: str):
    """Ray, initialised for this process: started here (address "local") or joined, once per process.

    A Ray its owner initialised already (a benchmark that chose the number of CPUs) is used as it is."""
    global _connected
    with _lock:
        try:
            import ray
        except ImportError:
            raise RayUnavailable("evolution_backend=ray needs Ray, which is not installed: pip install "
                                 "'munet-serve[ray]' (make setup installs it)") from None
        if address != "local":
            probe(address)
        if ray.is_initialized():
            if _connected is not None and _connected != address:
                raise RayUnavailable(f"this process is already connected to the Ray cluster at {_connected!r}; "
                                     f"restart it to use {address!r}")
            return ray
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, namespace="munet")
        except Exception as e:  # noqa: BLE001 - whatever Ray raises, the operator needs the address and the cause
            raise RayUnavailable(f"cannot connect to {_where(address)}: {describe(e)}") from e
        _connected = address
        log.info("evolution trains on Ray at %s: %s CPUs", address, ray.cluster_resources().get("CPU", 0))
        return ray


def disconnect() -> None:
    """Leave Ray, stopping the instance this process started (tests and benchmarks, between runs; a
    process that exits leaves it by itself)."""
    global _connected
    with _lock:
        import ray

        ray.shutdown()
        _connected = None


def _train_task(spec: dict, train_in: np.ndarray, val_in: np.ndarray, y_train: np.ndarray, y_val: np.ndarray,
                *frozen: nn.Module) -> dict:
    """One candidate, in a Ray worker. `frozen` are the stored modules of its chain, from the object
    store; `spec["chain"]` places them and the candidate's own trainable modules in order."""
    import ray

    t0 = time.perf_counter()
    where = f"ray pid {os.getpid()} on node {ray.get_runtime_context().get_node_id()[:12]}"
    try:
        return {**_train_in_worker(spec, train_in, val_in, y_train, y_val, frozen), "worker": where,
                "task_seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - the candidate's own failure, reported as local training reports it
        return {"error": describe(e), "traceback": traceback.format_exc(), "worker": where}


def _train_in_worker(spec: dict, train_in: np.ndarray, val_in: np.ndarray, y_train: np.ndarray, y_val: np.ndarray,
                     frozen: tuple[nn.Module, ...]) -> dict:
    import ray

    torch.set_num_threads(spec["threads"])
    chain = [frozen[item] if kind == "frozen" else item for kind, item in spec["chain"]]
    trainable = [chain[i] for i in spec["trainable"]]
    calibrate = [chain[i] for i in spec["calibrate"]]
    with warnings.catch_warnings():
        # arrays from the object store are read-only views of shared memory; training only reads them
        # (every batch is an indexed copy), so they are used without copying
        warnings.simplefilter("ignore", UserWarning)
        x_train, x_val = torch.from_numpy(train_in), torch.from_numpy(val_in)
    should_pause = _PausePoll(ray, spec["pause"], spec["busy"]) if spec["pause"] is not None else None
    res = train_candidate(chain, trainable, x_train, y_train, x_val, y_val, spec["hparams"], spec["batch_size"],
                          spec["max_steps"], spec["budget_s"], raw_images=spec["raw_images"], seed=spec["seed"],
                          should_pause=should_pause, calibrate=calibrate)
    pred = predict_classes(nn.Sequential(*chain), x_val)
    return {"state": [m.state_dict() for m in trainable], "result": res, "val_predictions": pred}


class _PauseFlag:
    """The leader's "serving is busy" answer, for tasks that run elsewhere: they ask every 10 steps
    (train_candidate's pause hook) and wait while it is set, as local training does."""

    def __init__(self):
        self.busy = False

    def set(self, busy: bool) -> None:
        self.busy = busy

    def get(self) -> bool:
        return self.busy


class _PausePoll:
    """train_candidate's pause hook inside a task: the leader's flag, read without blocking.

    A task blocked in ray.get hands its CPU back to Ray, which starts another candidate on it: asking
    the flag with ray.get every 10 steps ran 3 tasks at once on 2 CPUs (measured), and more in longer
    runs. So each call uses the answer to the previous ask, if it has come (`ray.wait` with timeout 0
    does not block), and asks again; until the first answer, the leader's state at submission holds."""

    def __init__(self, ray, flag, busy: bool):
        self.ray, self.flag, self.busy = ray, flag, busy
        self.asked = flag.get.remote()

    def __call__(self) -> bool:
        ready, _ = self.ray.wait([self.asked], timeout=0)
        if ready:
            self.busy = bool(self.ray.get(ready[0]))
            self.asked = self.flag.get.remote()
        return self.busy


def _remote(ray):
    global _remote_train, _flag_class
    if _remote_train is None:
        # no retries: a candidate whose task fails is reported as failed; the next generation samples anew
        _remote_train = ray.remote(max_retries=0)(_train_task)
        _flag_class = ray.remote(num_cpus=0)(_PauseFlag)
    return _remote_train, _flag_class


class RayTrainer:
    def __init__(self, address: str):
        self.address = address
        self._flag = None  # the pause flag's actor, started on the first generation that can pause

    def train(self, jobs: list[TrainJob], settings: TrainSettings, done: Done,
              should_pause: Pause | None = None) -> list[TrainOutcome]:
        ray = connect(self.address)
        remote_train, flag_class = _remote(ray)
        if should_pause is not None and self._flag is None:
            self._flag = flag_class.remote()
        flag = self._flag if should_pause is not None else None
        # whether serving is busy now: each task starts from this answer, then follows the flag
        busy = bool(should_pause is not None and should_pause())
        if flag is not None:
            ray.get(flag.set.remote(busy))
        threads = max(1, settings.threads)
        # what the candidates share goes into the object store once: labels, each cached prefix output
        # (the same tensor object for every candidate on that prefix), each stored module
        y_train, y_val = ray.put(settings.y_train), ray.put(settings.y_val)
        arrays: dict[int, tuple[torch.Tensor, object]] = {}  # id(tensor) -> (tensor, ref); the tensor pins the id
        modules: dict[str, object] = {}

        def array_ref(t: torch.Tensor):
            if id(t) not in arrays:
                arrays[id(t)] = (t, ray.put(t.numpy()))
            return arrays[id(t)][1]

        refs = []
        for job in jobs:
            frozen, chain = [], []
            for m, mid in zip(job.chain, job.frozen_ids, strict=True):
                if mid is None:
                    chain.append(("trainable", m))
                    continue
                if mid not in modules:
                    modules[mid] = ray.put(m)
                chain.append(("frozen", len(frozen)))
                frozen.append(modules[mid])
            position = {id(m): i for i, m in enumerate(job.chain)}
            spec = {"chain": chain, "trainable": [position[id(m)] for m in job.trainable],
                    "calibrate": [position[id(m)] for m in job.calibrate], "hparams": job.hparams,
                    "raw_images": job.raw_images, "seed": job.seed, "threads": threads,
                    "batch_size": settings.batch_size, "max_steps": settings.max_steps,
                    "budget_s": settings.budget_s, "pause": flag, "busy": busy}
            refs.append(remote_train.options(num_cpus=threads).remote(
                spec, array_ref(job.train_in), array_ref(job.val_in), y_train, y_val, *frozen))
        return self._gather(ray, refs, jobs, settings, done, should_pause, flag, busy)

    @classmethod
    def _gather(cls, ray, refs: list, jobs: list[TrainJob], settings: TrainSettings, done: Done,
                should_pause: Pause | None, flag, busy: bool) -> list[TrainOutcome]:
        index = {ref: i for i, ref in enumerate(refs)}
        outcomes: list[TrainOutcome | None] = [None] * len(refs)
        parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // max(1, settings.threads)))
        limit = math.ceil(len(refs) / parallel) * (DEADLINE_BUDGETS * settings.budget_s + DEADLINE_MARGIN_S)
        deadline = time.monotonic() + limit
        pending = list(refs)
        try:
            while pending:
                t = time.monotonic()
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                # the pause hook raises when the server shuts down: the tasks are cancelled below
                now_busy = bool(should_pause is not None and should_pause())
                if now_busy != busy and flag is not None:
                    flag.set.remote(now_busy)
                if busy:
                    deadline += time.monotonic() - t  # a paused task is not late
                busy = now_busy
                for ref in ready:
                    i = index[ref]
                    outcomes[i] = cls._collect(ray, ref, jobs[i])
                    done(i, outcomes[i])
                if pending and time.monotonic() > deadline:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                        i = index[ref]
                        outcomes[i] = TrainOutcome(None, None, error=f"did not finish within {limit:.0f} s on Ray "
                                                                     "(cancelled)")
                        done(i, outcomes[i])
                    pending = []
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if busy and flag is not None:
                flag.set.remote(False)
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _collect(ray, ref, job: TrainJob) -> TrainOutcome:
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as e:
            # the worker died, the node went away, the task was cancelled, or its arguments did not load
            # there (a worker without munet-serve): Ray's message carries the whole remote traceback
            log.warning("candidate lost on Ray: %s", e)
            cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
            return TrainOutcome(None, None, error=describe(cause if isinstance(cause, BaseException) else e))
        if "error" in out:
            log.warning("candidate failed in %s:\n%s", out["worker"], out["traceback"])
            return TrainOutcome(None, None, error=out["error"], worker=out["worker"])
        for m, state in zip(job.trainable, out["state"], strict=True):
            m.load_state_dict(state)
        for m in job.chain:  # as train_candidate leaves a chain it trained in place
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return TrainOutcome(out["result"], out["val_predictions"], worker=out["worker"])
