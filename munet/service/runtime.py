"""ONNX Runtime execution of paths: one session per module id, shared by every path that uses it.

A path runs as a chain of sessions, `x -> embed -> block ... -> head -> logits`. A batch that mixes
tasks runs as a tree: requests whose paths start with the same modules go through those modules
together, and split where their paths part (`run_grouped`). So ten tasks on one frozen trunk cost
one trunk pass per batch, not ten. A batch of one path alone, up to `merged_max_batch` images, runs
on one session joining the path's modules instead (`merged.py`): same answers bit for bit, faster.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from munet.models.export import ensure_onnx
from munet.models.store import PathRecord, Store
from munet.ort_threads import session_options, shared_thread_pool
from munet.service.merged import join_modules

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
            got = ort.InferenceSession(probe, session_options(), providers=[p, "CPUExecutionProvider"]).get_providers()
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

    def __init__(self, store: Store, providers: list[str], intra_op_threads: int = 0, shared_threads: bool = True):
        self.store = store
        self.providers = usable_providers(providers)
        self.intra_op_threads = intra_op_threads
        if shared_threads:
            shared_thread_pool(intra_op_threads)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._joined: dict[tuple[str, ...], ort.InferenceSession] = {}  # module ids -> one session for all
        self._lock = threading.Lock()
        # with CUDA first, sessions hand each other device buffers (I/O binding), not host arrays
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else None
        log.info("ONNX Runtime %s, providers %s", ort.__version__, self.providers)

    def _options(self) -> ort.SessionOptions:
        so = session_options(self.intra_op_threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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

    def joined(self, module_ids: tuple[str, ...]) -> ort.InferenceSession:
        """One session running the modules in order (`merged.join_modules`), shared by every path
        version made of exactly these modules. Raises NotJoinable."""
        s = self._joined.get(module_ids)
        if s is not None:
            return s
        import onnx

        model = join_modules([onnx.load(ensure_onnx(self.store, m)) for m in module_ids])
        s = ort.InferenceSession(model, sess_options=self._options(), providers=self.providers)
        with self._lock:
            return self._joined.setdefault(module_ids, s)

    def joined_loaded(self) -> int:
        return len(self._joined)

    def drop_joined(self, module_ids: tuple[str, ...]) -> None:
        with self._lock:
            self._joined.pop(module_ids, None)

    def provider_of(self, module_id: str) -> str:
        return self.get(module_id).get_providers()[0]

    def loaded(self) -> list[str]:
        return list(self._sessions)

    def release(self, keep: set[str], keep_joined: set[tuple[str, ...]] | None = None) -> list[str]:
        """Drop sessions of modules no served path uses any more (and joined sessions of paths not
        in `keep_joined`, when given)."""
        with self._lock:
            gone = [m for m in self._sessions if m not in keep]
            for m in gone:
                del self._sessions[m]
            if keep_joined is not None:
                for ids in [k for k in self._joined if k not in keep_joined]:
                    del self._joined[ids]
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
    # the path as one session (merged.py), for batches of this path alone up to merged_max_batch images
    merged: ort.InferenceSession | None = field(default=None, repr=False, compare=False)
    merged_max_batch: int = 0

    def runs_merged(self, images: int) -> bool:
        return self.merged is not None and images <= self.merged_max_batch

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.runs_merged(len(x)):
            return host(run_session(self.merged, x, self.device))  # type: ignore[arg-type]
        return self.run_chain(x)

    def run_chain(self, x: np.ndarray) -> np.ndarray:
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
    if depth == 0 and _run_merged(idx, xs, paths, outputs):
        return
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


def _run_merged(idx: list[int], xs: list[np.ndarray], paths: list[ServedPath],
                outputs: list[np.ndarray | None]) -> bool:
    """A batch of one path alone, small enough, on the path's joined session. False: run the tree."""
    first = paths[idx[0]]
    if not all(paths[i].module_ids == first.module_ids for i in idx):
        return False
    sizes = [len(x) for x in xs]
    if not first.runs_merged(sum(sizes)):
        return False
    y = host(run_session(first.merged, xs[0] if len(xs) == 1 else np.concatenate(xs), first.device))  # type: ignore[arg-type]
    for i, part in zip(idx, np.split(y, np.cumsum(sizes)[:-1]), strict=True):
        outputs[i] = part
    return True


class Runtime:
    """The live serving graph: task -> ServedPath, swapped atomically; plus older or newer versions
    that requests asked for by number, kept loaded in an LRU of `max_versions`."""

    def __init__(self, store: Store, providers: list[str], intra_op_threads: int = 0, max_versions: int = 8,
                 merged_max_batch: int = 8, shared_threads: bool = True):
        self.store = store
        self.pool = SessionPool(store, providers, intra_op_threads, shared_threads)
        self.merged_max_batch = merged_max_batch
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
            self.release()
        return out


    def prepare(self, rec: PathRecord, labels: list[str], image_size: int,
                warm_batches: tuple[int, ...] = (1, 8)) -> ServedPath:
        """Export (if needed), load and warm every module of a path version without serving it."""
        sessions = tuple(self.pool.get(m) for m in rec.modules)
        served = ServedPath(rec.task, rec.version, tuple(rec.modules), tuple(labels), sessions, image_size,
                            self.pool.device)
        first = self.store.module_record(rec.modules[0]).config
        warm = []
        for b in warm_batches:
            x = np.random.default_rng(0).random((b, first.get("in_chans", 3), image_size, image_size),
                                                dtype=np.float32)
            out = served.run_chain(x)
            if out.shape != (b, len(labels)):
                raise ValueError(f"path {rec.task} v{rec.version} gives outputs of shape {out.shape}, "
                                 f"expected {(b, len(labels))}")
            warm.append((x, out))
        merged = self._merged_for(served, warm)
        if merged is not None:
            served = dataclasses.replace(served, merged=merged, merged_max_batch=self.merged_max_batch)
        return served

    def _merged_for(self, served: ServedPath, warm: list[tuple[np.ndarray, np.ndarray]]
                    ) -> ort.InferenceSession | None:
        """The path's joined session, if it answers the warm-up batches exactly as the chain did;
        otherwise None (and why, in the log): the path then always runs as the chain."""
        if self.merged_max_batch <= 0 or len(served.module_ids) < 2:
            return None
        what = f"path {served.task} v{served.version}"
        try:
            merged = self.pool.joined(served.module_ids)
            outs = [(host(run_session(merged, x[:self.merged_max_batch], served.device)), want[:self.merged_max_batch])
                    for x, want in warm]
        except Exception as e:  # noqa: BLE001 - whatever fails here, the chain (already warm) serves
            self.pool.drop_joined(served.module_ids)
            log.info("%s runs as a chain of sessions: its modules cannot be joined (%s: %s)", what,
                     type(e).__name__, e)
            return None
        for got, want in outs:
            if not np.array_equal(got, want):
                err = float(np.max(np.abs(got - want))) if got.shape == want.shape else "shape"
                log.warning("%s runs as a chain of sessions: its joined session's answers differ from the "
                            "chain's (max %s), and a request's answer must not depend on its batch", what, err)
                self.pool.drop_joined(served.module_ids)
                return None
        return merged

    def swap(self, served: ServedPath) -> ServedPath | None:
        """Make `served` the task's live path; requests already pinned to the old one finish on it."""
        with self._lock:
            old = self._paths.get(served.task)
            self._paths[served.task] = served
        return old

    def forget_version(self, task: str, version: int) -> None:
        with self._lock:
            self._versions.pop((task, version), None)
        self.release()

    def remove(self, task: str) -> None:
        with self._lock:
            self._paths.pop(task, None)
            for key in [k for k in self._versions if k[0] == task]:
                del self._versions[key]
        self.release()

    def release(self) -> list[str]:
        """Drop the sessions (module and joined) that no loaded path uses any more."""
        with self._lock:
            paths = [*self._paths.values(), *self._versions.values()]
        return self.pool.release({m for p in paths for m in p.module_ids}, {p.module_ids for p in paths})

    def get(self, task: str) -> ServedPath | None:
        return self._paths.get(task)

    def tasks(self) -> dict[str, ServedPath]:
        return dict(self._paths)
