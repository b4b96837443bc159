"""ONNX export of single modules, and the parity check between a path's torch and ONNX outputs."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from torch import nn

from munet.models.store import Store

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "x", "y"


def _dynamic_axes(module: nn.Module, x: torch.Tensor) -> dict:
    """Batch always; image height and width for convolutional modules (they serve any resolution);
    the token axis for ViT blocks and heads (an imported ViT may have any number of tokens)."""
    if x.ndim == 4 and module.kind != "embed":
        return {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"} if module.kind == "pool_head"
                else {0: "batch", 2: "out_height", 3: "out_width"}}
    if x.ndim == 3:
        return {INPUT: {0: "batch", 1: "tokens"}, OUTPUT: {0: "batch"} if module.kind == "head"
                else {0: "batch", 1: "tokens"}}
    return {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}


def export_module(module: nn.Module) -> bytes:
    """One module as a self-contained ONNX graph `x -> y` with dynamic batch (and spatial) axes."""
    module = module.eval()
    x = module.example_input(2)
    buf = io.BytesIO()
    # The TorchScript exporter takes ~0.2 s per module where the dynamo one takes seconds; evolution
    # exports every promoted candidate, and our modules use no op it cannot trace.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buf, input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
            dynamic_axes=_dynamic_axes(module, x), dynamo=False,
        )
    return buf.getvalue()


def ensure_onnx(store: Store, module_id: str) -> str:
    """Export a stored module once; its ONNX file lives beside its weights."""
    path = store.onnx_path(module_id)
    if not path.exists():
        store.put_onnx(module_id, export_module(store.load_module(module_id)))
    return str(path)


def torch_chain_outputs(store: Store, module_ids: list[str], x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        t = torch.from_numpy(x)
        for mid in module_ids:
            t = store.load_module(mid)(t)
    return t.numpy()


def parity_error(store: Store, module_ids: list[str], x: np.ndarray, run_onnx) -> float:
    """Largest difference of logits between torch and ONNX Runtime on the same input, relative to
    the largest logit where logits exceed 1 (an ImageNet trunk's can reach tens; float32 rounding
    scales with them), absolute below that."""
    ref = torch_chain_outputs(store, module_ids, x)
    got = run_onnx(x)
    return float(np.max(np.abs(ref - got)) / max(1.0, float(np.max(np.abs(ref)))))


def export_and_check(store: Store, rec, atol: float, threads: int = 1, n: int = 4) -> float:
    """Publish-ready: export every module of path version `rec` to ONNX (stored beside its weights,
    once) and compare the chain's ONNX Runtime output with torch's on the same input. Raises
    FailedPrecondition past `atol`. Runs where the version is made (evolution, registration), so
    servers only ever load and warm sessions of versions that passed."""
    import time

    import onnxruntime as ort

    from munet.errors import FailedPrecondition
    from munet.ort_threads import session_options

    so = session_options(max(1, threads))
    sessions = [ort.InferenceSession(ensure_onnx(store, m), sess_options=so, providers=["CPUExecutionProvider"])
                for m in rec.modules]

    def run(x: np.ndarray) -> np.ndarray:
        for s in sessions:
            x = s.run(None, {INPUT: x})[0]
        return x

    size = store.get_task(rec.task).image_size
    chans = store.module_record(rec.modules[0]).config.get("in_chans", 3)
    x = np.random.default_rng(1).random((n, chans, size, size), dtype=np.float32)
    t0 = time.perf_counter()
    err = parity_error(store, list(rec.modules), x, run)
    if not err <= atol:
        raise FailedPrecondition(f"ONNX output differs from torch by {err:.2e} (> {atol}) for {rec.task} "
                                 f"v{rec.version}")
    log.info("%s v%d exported, parity %.1e (%.2f s)", rec.task, rec.version, err, time.perf_counter() - t0)
    return err
