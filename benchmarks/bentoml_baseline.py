"""The serving bench's baseline: a plain BentoML service serving one ONNX model with adaptive batching.

    MUNET_BASELINE_ONNX=/path/model.onnx bentoml serve benchmarks.bentoml_baseline:Baseline --port 3100

It is what one would write without munet: the whole path exported as ONE ONNX model, one session,
BentoML's adaptive batching in front. POST /predict {"x": [image, ...]} takes (N, S, S, 3) uint8
pixel values as nested lists (as munet's clients send raw uint8 pixels) and returns (N, C) logits.

The session uses the same options as munet's runtime (graph optimisation ALL, no thread spinning,
`MUNET_BASELINE_INTRA_OP` threads, 0 meaning ORT's default), so the comparison is between serving
stacks, not ORT settings. Env: MUNET_BASELINE_ONNX (required), MUNET_BASELINE_INTRA_OP,
MUNET_BASELINE_MAX_LATENCY_MS (adaptive batching's latency budget, default 10000: BentoML answers
503 to requests it expects to miss it), MUNET_BASELINE_PROVIDERS (comma-separated),
MUNET_BASELINE_ACCESS_LOG (1 to keep BentoML's per-request access log, off by default).
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

MAX_BATCH_SIZE = 64
MAX_LATENCY_MS = int(os.environ.get("MUNET_BASELINE_MAX_LATENCY_MS", "10000"))
# BentoML logs every request by default; off unless asked, as a tuned deployment would run it (and
# munet's gRPC path logs nothing per request either)
ACCESS_LOG = os.environ.get("MUNET_BASELINE_ACCESS_LOG", "0").lower() in ("1", "true", "yes", "on")


def _providers() -> list[str]:
    wanted = [p.strip() for p in os.environ.get("MUNET_BASELINE_PROVIDERS", "CPUExecutionProvider").split(",")
              if p.strip()]
    return wanted or ["CPUExecutionProvider"]


@bentoml.service(name="munet-bench-baseline", workers=1, traffic={"timeout": 120},
                 logging={"access": {"enabled": ACCESS_LOG}})
class Baseline:
    def __init__(self) -> None:
        import onnxruntime as ort

        path = os.environ["MUNET_BASELINE_ONNX"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = int(os.environ.get("MUNET_BASELINE_INTRA_OP", "0") or 0)
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, sess_options=so, providers=_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.ort_version = ort.__version__
        size = int(os.environ.get("MUNET_BASELINE_SIZE", "32"))  # the served task's input size
        self.session.run(None, {self.input_name: np.zeros((1, 3, size, size), np.float32)})

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, x: np.ndarray) -> np.ndarray:
        # (N, S, S, 3) pixel values -> (N, 3, S, S) float32 in [0, 1], as munet's server does
        x = np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]

    @bentoml.api
    def info(self) -> dict:
        return {"providers": self.session.get_providers(), "onnxruntime": self.ort_version, "pid": os.getpid(),
                "max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS}
