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


def example_input(module: nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = module.cfg
    if module.kind == "embed":
        return torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    tokens = getattr(module, "num_tokens", 65)
    return torch.randn(batch, tokens, cfg.dim)


def export_module(module: nn.Module) -> bytes:
    """One module as a self-contained ONNX graph `x -> y` with a dynamic batch axis."""
    module = module.eval()
    x = example_input(module)
    buf = io.BytesIO()
    # The TorchScript exporter takes ~0.2 s per module where the dynamo one takes seconds; evolution
    # exports every promoted candidate, and our modules use no op it cannot trace.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buf, input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False,
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
    """Largest absolute difference of logits between torch and ONNX Runtime on the same input."""
    ref = torch_chain_outputs(store, module_ids, x)
    got = run_onnx(x)
    return float(np.max(np.abs(ref - got)))
