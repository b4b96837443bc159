"""The one configuration object. Defaults work; `MUNET_<FIELD>` env vars and CLI flags override."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


@dataclass
class Config:
    home: Path = Path(".munet")  # data root: SQLite store, module files, example data
    # loopback unless told otherwise: a server reachable from the network should carry a token
    host: str = "127.0.0.1"
    admin_token: str = ""  # bearer token for management calls (register, add, delete, evolve, rollback)
    admin_token_file: Path | None = None  # or a file holding it (not in the environment)
    predict_token: str = ""  # bearer token for Predict and the read-only calls ("" = open)
    tls_cert: Path | None = None  # PEM certificate chain and key: TLS on gRPC and HTTP
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: require client certificates (mutual TLS)
    grpc_port: int = 50051
    http_port: int = 3000
    http_workers: int = 1
    # Execution providers in order of preference; unavailable ones are dropped at start-up.
    providers: list[str] = field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    max_batch_size: int = 64  # images per server-side micro-batch
    max_delay_ms: float = 2.0  # how long the first request of a batch waits for company
    # admission: images admitted and not yet answered, in all and per task; past
    # them a request is refused at once with RESOURCE_EXHAUSTED / 429 + Retry-After
    max_queue_images: int = 2048  # ~225 MB of model input at 96 px
    max_task_queue_images: int = 0  # 0: half the queue, and at least max_request_images
    max_request_images: int = 1024
    # pixels per image, read from the file's header before anything is decoded (a 700-byte WebP can
    # claim 4096x4096); images decode in a pool of this many threads, off the event loop
    max_image_pixels: int = 4096 * 4096
    max_npz_bytes: int = 1 << 30  # what an .npz may unpack to (declared sizes, checked before inflating)
    max_http_body_bytes: int = 256 << 20  # larger HTTP bodies get 413 before they are read
    decode_threads: int = 2
    access_log: bool = True  # one log line per gRPC call: method, task, status, latency, peer
    import_dir: Path | None = None  # .npz files RegisterTask may name; default <home>/imports
    # the root new tasks grow from: mobilenet_v2_imagenet, vit_tiny or an imported one (`munet roots
    # list`); "" = the store's first root, or mobilenet_v2_imagenet on a new store
    root: str = ""
    image_size: int = 0  # input size of new tasks on a convolutional root; 0 = the root's (96 CPU, 160 GPU)
    demo_task: bool = True  # register a small built-in task on an empty store
    demo_builtin: str = "uci_digits"
    seed: int = 0
    head_train_epochs: int = 30  # initial head: full-batch epochs on cached trunk features
    max_examples_per_task: int = 20000  # over all uploads of a task, registration included
    max_labels: int = 1000  # classes per task
    max_tasks: int = 200
    max_candidates_per_generation: int = 64  # what TriggerEvolution may ask for
    max_candidate_budget_s: float = 3600.0
    parity_atol: float = 1e-4
    # evolution
    scheduler_enabled: bool = True
    evolve_interval_s: float = 60.0
    candidates_per_generation: int = 4
    candidate_budget_s: float = 30.0
    candidate_max_steps: int = 300
    train_batch_size: int = 64
    scale_base: float = 0.98  # score = quality * base ** (accounted params / root params)
    keep_versions: int = 10
    pause_queue_depth: int = 32  # evolution pauses while this many images wait to be served
    training_threads: int = 1
    # generations train in a separate process at a lower CPU priority (niceness +evolution_nice), so
    # training, ONNX export and parity checks never hold the serving process's GIL or preempt it
    evolution_process: bool = True
    evolution_nice: int = 10
    evolution_max_train: int = 6000  # examples per generation (a seeded subset of larger tasks)
    evolution_max_validation: int = 2000
    gc_min_age_s: float = 600.0  # never collect a module younger than this (a registration may hold it)

    @property
    def imports(self) -> Path:
        return self.import_dir if self.import_dir is not None else self.home / "imports"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        env = dict(os.environ if env is None else env)
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MUNET_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(hints[f.name], raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        cfg.home = Path(cfg.home)
        return cfg

    def to_env(self) -> dict[str, str]:
        """The env vars that recreate this config in a child process (the BentoML worker)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f"MUNET_{f.name.upper()}"] = ",".join(v) if isinstance(v, list) else str(v)
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: list[str] | None = None) -> None:
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, type=str,
                                help=f"env MUNET_{f.name.upper()}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        hints = get_type_hints(cls)
        overrides = {}
        for f in fields(cls):
            raw = getattr(args, f.name, None)
            if raw is not None:
                overrides[f.name] = _parse(hints[f.name], raw, f.name)
        return cls.from_env(**overrides)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _parse(hint: Any, raw: str, name: str) -> Any:
    text = str(hint)
    try:
        if hint is bool or text == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if "list" in text:
            return [p.strip() for p in raw.split(",") if p.strip()]
        if "Path" in text:
            return Path(raw)
        return raw
    except ValueError:
        raise ValueError(f"setting {name}: cannot read {raw!r} as {text}") from None
