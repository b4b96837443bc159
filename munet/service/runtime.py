"""ONNX Runtime execution of paths: one session per module id, shared by every path that uses it.

A path runs as a chain of sessions, `x -> embed -> block ... -> head -> logits`. A batch that mixes
tasks runs as a tree: requests whose paths start with the same modules go through those modules
together, and split where their paths part (`run_grouped`). So ten tasks on one frozen trunk cost
one trunk pass per batch, not ten.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from munet.models.export import ensure_onnx
from munet.models.store import PathRecord, Store

log = logging.getLogger(__name__)


def usable_providers(wanted: list[str]) -> list[str]:
    """The wanted providers that really start here, in order.

    `get_available_providers()` lists what the wheel was built with (onnxruntime-gpu always lists
    CUDA), so each non-CPU provider is tried on a one-node model with ORT's logger silenced: its
    failure to load CUDA libraries is expected on a CPU host and would otherwise be logged as an
    error by every session.
    """
    import onnx
    from onnx import TensorProto, helper

    built = set(ort.get_available_providers())
    out: list[str] = []
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe = model.SerializeToString()
    for p in wanted:
        if p not in built:
            log.info("execution provider %s is not in this onnxruntime build; skipped", p)
            continue
        if p == "CPUExecutionProvider":
            out.append(p)
            continue
        ort.set_default_logger_severity(4)
        try:
            got = ort.InferenceSession(probe, providers=[p, "CPUExecutionProvider"]).get_providers()
        except Exception:  # noqa: BLE001 - any failure means "not usable here"
            got = []
        finally:
            ort.set_default_logger_severity(2)
        if p in got:
            out.append(p)
        else:
            log.info("execution provider %s cannot start on this machine; skipped", p)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


class SessionPool:
    """Module id -> InferenceSession, created on first use and shared by all paths."""

    def __init__(self, store: Store, providers: list[str], intra_op_threads: int = 0):
        self.store = store
        self.providers = usable_providers(providers)
        self.intra_op_threads = intra_op_threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        # with CUDA first, sessions hand each other device buffers (I/O binding), not host arrays
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else None
        log.info("ONNX Runtime %s, providers %s", ort.__version__, self.providers)

    def _options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads:
            so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        # A path is a chain of sessions: spinning worker threads of idle sessions fight the busy one
        # for the cores (measured 2.5x slower on 2 cores), and starve training too.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def get(self, module_id: str) -> ort.InferenceSession:
        s = self._sessions.get(module_id)
        if s is not None:
            return s
        with self._lock:
            s = self._sessions.get(module_id)
            if s is None:
                path = ensure_onnx(self.store, module_id)
                s = ort.InferenceSession(path, sess_options=self._options(), providers=self.providers)
                self._sessions[module_id] = s
        return s

    def provider_of(self, module_id: str) -> str:
        return self.get(module_id).get_providers()[0]

    def loaded(self) -> list[str]:
        return list(self._sessions)

    def release(self, keep: set[str]) -> list[str]:
        """Drop sessions of modules no served path uses any more."""
        with self._lock:
            gone = [m for m in self._sessions if m not in keep]
            for m in gone:
                del self._sessions[m]
        return gone


def run_session(session: ort.InferenceSession, x: np.ndarray | ort.OrtValue, device: str | None
                ) -> np.ndarray | ort.OrtValue:
    """One module. With a `device` (CUDA), input and output stay in device memory (ONNX Runtime I/O
    binding), so a chain of sessions copies to the GPU once and back once, not at every module."""
    if device is None:
        return session.run(None, {"x": host(x)})[0]
    binding = session.io_binding()
    if not isinstance(x, ort.OrtValue):
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0)
    binding.bind_ortvalue_input("x", x)
    binding.bind_output("y", device, 0)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0]


def host(x: np.ndarray | ort.OrtValue) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()


@dataclass(frozen=True)
class ServedPath:
    """An immutable, loaded path version: what a request is pinned to when it arrives."""

    task: str
    version: int
    module_ids: tuple[str, ...]
    labels: tuple[str, ...]
    sessions: tuple[ort.InferenceSession, ...] = field(repr=False, compare=False)
    image_size: int = 32  # inputs are (N, 3, image_size, image_size)
    device: str | None = None  # "cuda": intermediate outputs stay on the GPU between sessions

    def run(self, x: np.ndarray) -> np.ndarray:
        for s in self.sessions:
            x = run_session(s, x, self.device)
        return host(x)


def run_grouped(items: list[tuple[ServedPath, np.ndarray]]) -> list[np.ndarray]:
    """Run several (path, input) pairs, sharing work on common module prefixes. Returns outputs in order."""
    outputs: list[np.ndarray | None] = [None] * len(items)
    _run_tree(list(range(len(items))), [x for _, x in items], [p for p, _ in items], 0, outputs)
    return [host(o) for o in outputs]  # type: ignore[arg-type]


def _run_tree(idx: list[int], xs: list[np.ndarray], paths: list[ServedPath], depth: int,
              outputs: list[np.ndarray | None]) -> None:
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(idx):
        p = paths[i]
        if depth == len(p.module_ids):
            outputs[i] = xs[j]
        else:
            groups.setdefault(p.module_ids[depth], []).append(j)
    for members in groups.values():
        path = paths[idx[members[0]]]
        session, device = path.sessions[depth], path.device
        parts = [xs[j] for j in members]
        if len(parts) == 1:
            y = run_session(session, parts[0], device)
            _run_tree([idx[j] for j in members], [y], paths, depth + 1, outputs)
            continue
        # requests join here: on a GPU their device outputs come back once for the concatenation
        parts = [host(p) for p in parts]
        sizes = [len(a) for a in parts]
        y = host(run_session(session, np.concatenate(parts), device))
        _run_tree([idx[j] for j in members], np.split(y, np.cumsum(sizes)[:-1]), paths, depth + 1, outputs)


class Runtime:
    """The live serving graph: task -> ServedPath, swapped atomically; plus older or newer versions
    that requests asked for by number, kept loaded in an LRU of `max_versions`."""

    def __init__(self, store: Store, providers: list[str], intra_op_threads: int = 0, max_versions: int = 8):
        self.store = store
        self.pool = SessionPool(store, providers, intra_op_threads)
        self._paths: dict[str, ServedPath] = {}
        self._lock = threading.Lock()
        self.max_versions = max_versions
        self._versions: OrderedDict[tuple[str, int], ServedPath] = OrderedDict()

    def cached_version(self, task: str, version: int, modules: tuple[str, ...]) -> ServedPath | None:
        """A version loaded on request, if it is still the same modules (a task deleted and registered
        again numbers its versions anew)."""
        with self._lock:
            p = self._versions.get((task, version))
            if p is None or p.module_ids != modules:
                return None
            self._versions.move_to_end((task, version))
            return p

    def keep_version(self, served: ServedPath) -> list[ServedPath]:
        """Remember a version loaded on request; returns the least recently used ones it pushed out."""
        with self._lock:
            self._versions[(served.task, served.version)] = served
            self._versions.move_to_end((served.task, served.version))
            out = []
            while len(self._versions) > self.max_versions:
                out.append(self._versions.popitem(last=False)[1])
        if out:
            self.pool.release(self.live_modules())
        return out


    def prepare(self, rec: PathRecord, labels: list[str], image_size: int,
                warm_batches: tuple[int, ...] = (1, 8)) -> ServedPath:
        """Export (if needed), load and warm every module of a path version without serving it."""
        sessions = tuple(self.pool.get(m) for m in rec.modules)
        served = ServedPath(rec.task, rec.version, tuple(rec.modules), tuple(labels), sessions, image_size,
                            self.pool.device)
        first = self.store.module_record(rec.modules[0]).config
        for b in warm_batches:
            x = np.random.default_rng(0).random((b, first.get("in_chans", 3), image_size, image_size),
                                                dtype=np.float32)
            out = served.run(x)
            if out.shape != (b, len(labels)):
                raise ValueError(f"path {rec.task} v{rec.version} gives outputs of shape {out.shape}, "
                                 f"expected {(b, len(labels))}")
        return served

    def swap(self, served: ServedPath) -> ServedPath | None:
        """Make `served` the task's live path; requests already pinned to the old one finish on it."""
        with self._lock:
            old = self._paths.get(served.task)
            self._paths[served.task] = served
        return old

    def forget_version(self, task: str, version: int) -> None:
        with self._lock:
            self._versions.pop((task, version), None)
        self.pool.release(self.live_modules())

    def remove(self, task: str) -> None:
        with self._lock:
            self._paths.pop(task, None)
            for key in [k for k in self._versions if k[0] == task]:
                del self._versions[key]
        self.pool.release(self.live_modules())

    def get(self, task: str) -> ServedPath | None:
        return self._paths.get(task)

    def tasks(self) -> dict[str, ServedPath]:
        return dict(self._paths)

    def live_modules(self) -> set[str]:
        """Modules of every loaded path: current ones and versions kept on request."""
        with self._lock:
            paths = [*self._paths.values(), *self._versions.values()]
        return {m for p in paths for m in p.module_ids}
