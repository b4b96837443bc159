"""Row 1 of `munet bench serve`, the limit: the served path run by ONNX Runtime in this process, as the
server's chain of sessions and exported as ONE merged model, at batch 1 and batch 64; and at batch 1
as the server runs a lone small batch, on its joined session (munet/service/merged.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serve_rows import Row, measure_inproc
from benchmarks.serve_settings import Settings


def export_merged(store: Any, module_ids: list[str], path: Path, size: int) -> float:
    """The path's modules as ONE ONNX model (`Chain`, dynamic batch), exported as `export_module` does.

    Returns the largest absolute difference to torch on a few random inputs.
    """
    import onnxruntime as ort
    import torch

    from munet.models.export import INPUT, OPSET, OUTPUT
    from munet.models.vit import Chain
    from munet.ort_threads import session_options

    chain = Chain([store.load_module(m).eval() for m in module_ids]).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(chain, (torch.rand(2, 3, size, size),), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=OPSET,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    x = np.random.default_rng(3).random((5, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        ref = chain(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"]).run(None, {INPUT: x})[0]
    return float(np.abs(ref - got).max())


def raw_rows(s: Settings, store: Any, cfg: Any, task: str, images: np.ndarray, merged_path: Path,
             results: dict[str, Any]) -> tuple[dict[str, Row], list[str]]:
    """The five raw rows, measured with the server's session options; writes the merged model to
    `merged_path` (the BentoML baseline serves it) and returns (rows, the providers the runtime used)."""
    import onnxruntime as ort

    from munet.data.images import to_model_input
    from munet.service.runtime import Runtime

    rec = store.get_path(task)
    labels = store.get_task(task).labels
    size = images.shape[1]
    runtime = Runtime(store, cfg.providers, cfg.intra_op_threads, merged_max_batch=max(1, cfg.merged_max_batch),
                      shared_threads=cfg.shared_thread_pool)
    served = runtime.prepare(rec, labels, size)
    if served.merged is None:
        raise RuntimeError("the path's joined session was not used (see the log): the joined row would be the chain")
    x1, x64 = to_model_input(images[:1]), to_model_input(images)
    parity = export_merged(store, list(rec.modules), merged_path, size)
    merged = ort.InferenceSession(str(merged_path), sess_options=runtime.pool._options(),
                                  providers=runtime.pool.providers)
    results["providers"] = {"raw_chain": sorted({p for sess in served.sessions for p in sess.get_providers()[:1]}),
                            "raw_joined": served.merged.get_providers()[:1],
                            "raw_merged": merged.get_providers()[:1]}
    results["path"] = {"task": task, "version": rec.version, "modules": list(rec.modules),
                       "merged_parity_max_abs": parity}

    def merged_run(x: np.ndarray) -> np.ndarray:
        return merged.run(None, {"x": x})[0]

    rows = {}
    for key, name, fn, x in (("raw_chain_b1", "raw ORT, path's session chain", served.run_chain, x1),
                             ("raw_chain_b64", "raw ORT, path's session chain", served.run_chain, x64),
                             ("raw_joined_b1", "raw ORT, path's joined session (the server's, <= "
                              f"{served.merged_max_batch} images)", served.run, x1),
                             ("raw_merged_b1", "raw ORT, merged single model", merged_run, x1),
                             ("raw_merged_b64", "raw ORT, merged single model", merged_run, x64)):
        rows[key] = measure_inproc(key, name, fn, x, s.duration_s, s.warmup)
    providers = list(runtime.pool.providers)
    served = merged = None  # free the sessions before the servers run
    runtime.pool.release(set())
    return rows, providers
