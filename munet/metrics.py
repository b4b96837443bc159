"""Prometheus metrics, labelled by task, protocol, path version and module.

They live in prometheus-client's default registry, which BentoML's `/metrics` serves (BentoML sets
up its multiprocess directory before our service module is imported).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("munet_requests", "Predict requests", ["task", "protocol", "code"])
IMAGES = Counter("munet_images", "Images classified", ["task", "version"])
LATENCY = Histogram(
    "munet_request_latency_seconds", "Predict latency from arrival to answer", ["task", "protocol"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
BATCH_SIZE = Histogram("munet_batch_size", "Images per executed micro-batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_TASKS = Histogram("munet_batch_tasks", "Distinct tasks per executed micro-batch",
                        buckets=(1, 2, 3, 5, 10, 20))
QUEUE_DEPTH = Gauge("munet_queue_depth", "Images waiting or running in the batcher",
                    multiprocess_mode="livesum")
SESSIONS = Gauge("munet_module_sessions", "Loaded ONNX Runtime sessions (one per module)",
                 multiprocess_mode="livesum")
MODULE_INFO = Gauge("munet_module_loaded", "1 for each loaded module session",
                    ["module", "kind", "provider"], multiprocess_mode="livemax")
PATH_VERSION = Gauge("munet_path_version", "Current path version per task", ["task"],
                     multiprocess_mode="livemax")
PATH_MODULE = Gauge("munet_path_module", "1 for each (task, version, position, module) served",
                    ["task", "version", "position", "module"], multiprocess_mode="livemax")
REGISTRATIONS = Counter("munet_registrations", "RegisterTask calls by outcome", ["code"])
EXAMPLES_ADDED = Counter("munet_examples_added", "Labelled examples added to live tasks", ["task"])

# evolution
GENERATIONS = Counter("munet_evolution_generations", "Generations run", ["task"])
CANDIDATES = Counter("munet_evolution_candidates", "Candidates trained", ["task"])
PROMOTIONS = Counter("munet_evolution_promotions", "Promotions by outcome", ["task", "outcome"])
CANDIDATE_SCORE = Histogram("munet_evolution_candidate_score", "Scores of trained candidates", ["task"],
                            buckets=(0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0))
TRAINING_SECONDS = Counter("munet_evolution_training_seconds", "Seconds spent training candidates", ["task"])
PAUSED = Gauge("munet_evolution_paused_for_load", "1 while evolution waits for serving load to drop",
               multiprocess_mode="livemax")
