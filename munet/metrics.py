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
# Triton's split of a request's time in the server: waiting for its batch to start (queue), inside
# ONNX Runtime (compute), and everything else (overhead = total - queue - compute: protocol parsing,
# decoding, which is also shown on its own, scheduling, post-processing, the response)
_SPLIT_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
QUEUE_SECONDS = Histogram("munet_request_queue_seconds", "Time a request waited for its batch to start",
                          ["protocol"], buckets=_SPLIT_BUCKETS)
COMPUTE_SECONDS = Histogram("munet_request_compute_seconds", "Time a request's batch spent in ONNX Runtime",
                            ["protocol"], buckets=_SPLIT_BUCKETS)
OVERHEAD_SECONDS = Histogram("munet_request_overhead_seconds",
                             "Server time of a request outside the queue and ONNX Runtime", ["protocol"],
                             buckets=_SPLIT_BUCKETS)
DECODE_SECONDS = Histogram("munet_request_decode_seconds", "Time converting a request's images (part of overhead)",
                           ["protocol"], buckets=_SPLIT_BUCKETS)


def observe_request(task: str, protocol: str, code: str, total: float, timing: dict[str, float] | None) -> None:
    """One Predict-class request, whatever its protocol: its count by status code, its latency and
    (when it reached ONNX Runtime) its queue/compute/overhead split. `task` is a served task's name or
    "unknown" (only served names become label values)."""
    REQUESTS.labels(task, protocol, code).inc()
    LATENCY.labels(task, protocol).observe(total)
    observe_split(protocol, total, timing or {})


def observe_split(protocol: str, total: float, timing: dict[str, float]) -> None:
    """Record one answered request's queue / compute / overhead split (seconds)."""
    if "compute" not in timing:
        return  # it never reached ONNX Runtime (refused, failed to decode): only its latency counts
    queue, compute = timing.get("queue", 0.0), timing["compute"]
    QUEUE_SECONDS.labels(protocol).observe(queue)
    COMPUTE_SECONDS.labels(protocol).observe(compute)
    OVERHEAD_SECONDS.labels(protocol).observe(max(0.0, total - queue - compute))
    DECODE_SECONDS.labels(protocol).observe(timing.get("decode", 0.0))


BATCH_SIZE = Histogram("munet_batch_size", "Images per executed micro-batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_TASKS = Histogram("munet_batch_tasks", "Distinct tasks per executed micro-batch",
                        buckets=(1, 2, 3, 5, 10, 20))
QUEUE_DEPTH = Gauge("munet_queue_depth", "Images waiting or running in the batcher",
                    multiprocess_mode="livesum")
SESSIONS = Gauge("munet_module_sessions", "Loaded ONNX Runtime sessions (one per module)",
                 multiprocess_mode="livesum")
JOINED_SESSIONS = Gauge("munet_joined_sessions", "Loaded paths that also run as one joined ONNX Runtime session "
                        "(lone batches up to merged_max_batch images)", multiprocess_mode="livesum")
MODULE_INFO = Gauge("munet_module_loaded", "1 for each loaded module session",
                    ["module", "kind", "provider"], multiprocess_mode="livemax")
PATH_VERSION = Gauge("munet_path_version", "Current path version per task", ["task"],
                     multiprocess_mode="livemax")
PATH_MODULE = Gauge("munet_path_module", "1 for each (task, version, position, module) served",
                    ["task", "version", "position", "module"], multiprocess_mode="livemax")
VERSION_LOADS = Counter("munet_version_loads", "Versions loaded because a request asked for them by number",
                        ["task"])
VERSION_LOAD_SECONDS = Histogram("munet_version_load_seconds", "Time to load, check and warm a version on request",
                                 buckets=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0))
# a version the store says to serve that this process could not load (the old one keeps serving)
FOLLOW_FAILURES = Counter("munet_follow_failures", "Versions the store made current or pending that this server "
                          "could not load (it keeps serving the old one and retries)", ["task"])
LEADER = Gauge("munet_leader", "1 while this server holds the store's evolution lease (runs evolution)",
               multiprocess_mode="livemax")
# shadow evaluation of a pending version (service/shadow.py)
SHADOW_IMAGES = Counter("munet_shadow_images", "Live images a pending version also answered, in shadow", ["task"])
SHADOW_AGREEMENTS = Counter("munet_shadow_agreements", "Shadow images whose top-1 matched the served version's",
                            ["task"])
SHADOW_DROPPED = Counter("munet_shadow_dropped", "Sampled requests not shadowed: the shadow thread was behind",
                         ["task"])
SHADOW_LABELLED = Counter("munet_shadow_labelled", "Examples labelled while a version was pending", ["task"])
SHADOW_CORRECT = Counter("munet_shadow_correct", "Of those, correctly classified: by the pending (shadow) and "
                         "by the served (incumbent) version", ["task", "role"])
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
