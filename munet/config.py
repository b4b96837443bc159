"""The one configuration object, `Config`, and how it is loaded.

Every field has a default that works. `Config.from_env()` loads it through pydantic-settings from,
highest precedence first:

1. overrides (the `munet serve --<field>` flags, or keyword arguments),
2. environment variables `MUNET_<FIELD>` (lists comma-separated: `MUNET_PROVIDERS=CPUExecutionProvider`),
3. a TOML config file named by `MUNET_CONFIG` (or `munet --config FILE`), with top-level keys named
   as the fields (`grpc_port = 50051`),
4. the defaults below.

Values are validated (types, unknown keys in the file); a bad one raises `ConfigError`, one line that
names the setting and where its value came from. `Config` itself stays a plain dataclass (picklable,
`dataclasses.replace`/`asdict` work, `Config(...)` does no I/O); each field carries its description
in `metadata["help"]`, which `munet serve --help` shows.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

ENV_PREFIX = "MUNET_"
CONFIG_FILE_ENV = "MUNET_CONFIG"


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A Config field with its description (shown by `munet serve --help` and the README)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class Config:
    home: Path = setting(Path(".munet"), "data root: the SQLite store, module files and example data")
    # loopback unless told otherwise: a server reachable from the network should carry a token
    host: str = setting("127.0.0.1", "interface both servers bind (0.0.0.0 for all; then set an admin token)")
    admin_token: str = setting("", "bearer token for management calls (register, add examples, delete, evolve, "
                                   "rollback, policy); empty: management is open")
    admin_token_file: Path | None = setting(None, "a file holding the admin token (keeps it out of the environment)")
    predict_token: str = setting("", "bearer token for Predict and the read-only calls (the admin token works too); "
                                     "empty: open")
    tls_cert: Path | None = setting(None, "PEM certificate chain: with tls_key, TLS on gRPC and HTTP")
    tls_key: Path | None = setting(None, "PEM private key of tls_cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: clients must present a certificate it signed "
                                               "(mutual TLS)")
    grpc_port: int = setting(50051, "gRPC port (munet.v1, health, reflection, Open Inference Protocol)")
    http_port: int = setting(3000, "HTTP port (BentoML: REST routes, docs at /, /metrics)")
    http_workers: int = setting(1, "HTTP worker processes; gRPC and the scheduler still run once (worker 1)")
    providers: list[str] = setting(help="ONNX Runtime execution providers in order of preference, comma-separated; "
                                        "unavailable ones are dropped at start-up",
                                   factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    intra_op_threads: int = setting(0, "ONNX Runtime intra-op threads (0: its default, one per core): of the shared "
                                       "pool, or of each session without it")
    shared_thread_pool: bool = setting(True, "every ONNX Runtime session of the process runs on one intra-op thread "
                                             "pool whose workers spin briefly between operators (a lone image ~1.5x "
                                             "faster); false: a pool per session, no spinning")
    merged_max_batch: int = setting(8, "batches of one path up to this many images run on one ONNX Runtime session "
                                       "joining the path's modules (answers bit-identical to the chain of sessions, "
                                       "checked when loaded; faster); 0: always the chain")
    max_batch_size: int = setting(64, "images per server-side micro-batch")
    max_delay_ms: float = setting(2.0, "how long (ms) the first request of a micro-batch waits for company")
    # admission: images admitted and not yet answered, in all and per task; past them a request is
    # refused at once with RESOURCE_EXHAUSTED / 429 + Retry-After
    max_queue_images: int = setting(2048, "images admitted and not yet answered, over all tasks; past it requests "
                                          "get RESOURCE_EXHAUSTED / 429 (~225 MB of input at 96 px)")
    max_task_queue_images: int = setting(0, "the same bound for one task (0: half of max_queue_images, and at "
                                            "least max_request_images)")
    max_request_images: int = setting(1024, "images per Predict request")
    # read from the file's header before anything is decoded (a 700-byte WebP can claim 4096x4096)
    max_image_pixels: int = setting(4096 * 4096, "pixels per image, read from its header before decoding")
    max_npz_bytes: int = setting(1 << 30, "what an uploaded .npz may unpack to (its declared sizes, checked "
                                          "before inflating)")
    max_http_body_bytes: int = setting(256 << 20, "larger HTTP bodies get 413 before they are read")
    decode_threads: int = setting(2, "threads that decode images, off the event loop")
    shadow_rate: float = setting(0.2, "share of a task's live requests its pending version also answers "
                                      "(off-path, for comparison)")
    max_loaded_versions: int = setting(8, "versions asked for by number (not the current one) kept loaded, least "
                                          "recently used out")
    access_log: bool = setting(True, "one log line per gRPC call: method, task, status, latency, peer")
    import_dir: Path | None = setting(None, "folder of .npz files RegisterTask may name (default <home>/imports)")
    root: str = setting("", "the root new tasks grow from: mobilenet_v2_imagenet, vit_tiny or an imported one "
                            "(`munet roots list`); empty: the store's first root, else mobilenet_v2_imagenet")
    image_size: int = setting(0, "input size of new tasks on a convolutional root (0: the root's, 96 on CPU, "
                                 "160 with CUDA); a ViT root keeps its own")
    demo_task: bool = setting(True, "register a small built-in task (digits-demo) on an empty store")
    demo_builtin: str = setting("uci_digits", "the built-in data set of the demo task")
    seed: int = setting(0, "random seed of initial training and evolution")
    head_train_epochs: int = setting(30, "full-batch epochs of a new task's head on cached trunk features")
    max_examples_per_task: int = setting(20000, "examples per task, over all its uploads, registration included")
    max_labels: int = setting(1000, "classes per task")
    max_tasks: int = setting(200, "tasks per server")
    max_candidates_per_generation: int = setting(64, "the most candidates TriggerEvolution may ask for")
    max_candidate_budget_s: float = setting(3600.0, "the largest per-candidate budget (s) TriggerEvolution may ask "
                                                    "for")
    parity_atol: float = setting(1e-4, "largest allowed difference between a path's ONNX and torch outputs before "
                                       "it is served")
    # evolution
    scheduler_enabled: bool = setting(True, "run evolution generations periodically (off: only on request)")
    evolve_interval_s: float = setting(60.0, "seconds between scheduled generations")
    candidates_per_generation: int = setting(4, "candidate paths trained per generation")
    candidate_budget_s: float = setting(30.0, "training seconds per candidate")
    candidate_max_steps: int = setting(300, "training steps per candidate (whichever of time and steps ends first)")
    train_batch_size: int = setting(64, "examples per training step")
    scale_base: float = setting(0.98, "score = validation accuracy x scale_base ** (accounted params / root params)")
    # validation noise alone must not swap versions back and forth
    promotion_margin_se: float = setting(1.0, "the best of k candidates is promoted only if its score beats the "
                                              "incumbent's by this many times the expected maximum of k standard "
                                              "normals (1.03 for four, 0 for one), in standard errors of the "
                                              "difference of their validation accuracies (paired: the same images)")
    promotion_min_margin: float = setting(0.002, "and by at least this much (absolute score)")
    keep_versions: int = setting(10, "path versions kept per task for rollback")
    pause_queue_depth: int = setting(32, "evolution pauses while more images than this wait to be served")
    training_threads: int = setting(1, "torch (and prefix-cache ONNX Runtime) threads for training")
    # generations train in a separate process at a lower CPU priority, so training, ONNX export and
    # parity checks never hold the serving process's GIL or preempt it
    evolution_process: bool = setting(True, "train generations in a separate, lower-priority process")
    evolution_nice: int = setting(10, "niceness added to that process")
    evolution_sched_idle: bool = setting(True, "and the idle scheduling class (Linux): preempted whenever serving "
                                               "wakes")
    evolution_max_train: int = setting(6000, "training examples per generation (a seeded subset of larger tasks)")
    evolution_max_validation: int = setting(2000, "validation examples per generation")
    gc_min_age_s: float = setting(600.0, "never garbage-collect a module younger than this (s): a registration may "
                                         "still hold it")
    # beyond one machine: several serving processes share one store; one of them (the holder of a lease
    # in the store) runs evolution, the others only serve what the store says
    database_url: str = setting("", "PostgreSQL URL for the store's metadata (postgresql://user@host/db); module and "
                                    "example files stay under home, which must then be a shared directory. Empty: "
                                    "SQLite in home")
    evolution_backend: Literal["local", "ray"] = setting("local", "where candidates train: local (the evolution "
                                                                  "process on this machine) or ray (as Ray tasks on "
                                                                  "ray_address)")
    ray_address: str = setting("local", "the Ray cluster for evolution_backend=ray: host:port of its head, or local "
                                        "for a Ray instance started on this machine")
    leader: bool = setting(True, "may lead evolution (take the store's evolution lease); false: only serve")
    leader_lease_s: float = setting(10.0, "the evolution lease's length (s): a dead leader is replaced within it")
    follow_interval_s: float = setting(0.1, "how often a server checks the store for changes other processes made "
                                            "(s; a cheap check, the reload runs only on a change)")

    @property
    def imports(self) -> Path:
        return self.import_dir if self.import_dir is not None else self.home / "imports"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, config_file: str | os.PathLike | None = None,
                 **overrides: Any) -> Config:
        """Load: `overrides` (None values ignored) > `env` (default os.environ) `MUNET_<FIELD>` > the TOML
        `config_file` (default: the file `MUNET_CONFIG` names, if any) > defaults. Raises ConfigError."""
        env = dict(os.environ if env is None else env)
        if config_file is None:
            config_file = env.get(CONFIG_FILE_ENV) or None
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"Config has no setting {', '.join(unknown)}")
        file_values = read_config_file(config_file) if config_file is not None else {}
        model = _settings_model(cls)
        token = _SOURCES.set((env, file_values))
        try:
            loaded = model(**overrides)
        except _validation_error() as e:
            raise ConfigError(_describe(e, overrides, env, config_file)) from None
        finally:
            _SOURCES.reset(token)
        return cls(**{f.name: getattr(loaded, f.name) for f in fields(cls)})

    def to_env(self) -> dict[str, str]:
        """The env vars that recreate this config in a child process (the BentoML worker)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[env_name(f.name)] = ",".join(v) if isinstance(v, list) else str(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (paths as strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A setting that cannot be read: one line naming it and where its value came from."""


class SettingInfo(NamedTuple):
    name: str
    kind: str  # INTEGER, FLOAT, BOOLEAN, TEXT, PATH, LIST
    default: Any
    help: str


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def settings_info(cls: type[Config] = Config) -> list[SettingInfo]:
    """Every setting with its kind, default and description (for `munet serve` options and docs)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append(SettingInfo(f.name, _kind(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a TOML config file: top-level keys named as Config's fields."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    return data


# ---- loading through pydantic-settings ----------------------------------------------------------

# (env mapping, config-file values) of the load in progress: read by the settings model's sources
_SOURCES: contextvars.ContextVar[tuple[dict[str, str], dict[str, Any]]] = contextvars.ContextVar("munet_config")


def _kind(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and args else hint
    if typing.get_origin(base) is list:
        return "LIST"
    return {bool: "BOOLEAN", int: "INTEGER", float: "FLOAT", Path: "PATH"}.get(base, "TEXT")


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, list) else v


def _split_list(v: Any) -> Any:
    """A comma-separated string (or a JSON list) -> list of str; lists pass through."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                pass
        return [p.strip() for p in text.split(",") if p.strip()]
    return v


def _empty_is_none(v: Any) -> Any:
    return None if v == "" else v


def _validation_error() -> type[Exception]:
    from pydantic import ValidationError

    return ValidationError


@cache
def _settings_model(cls: type[Config]) -> Any:
    """A pydantic-settings model with Config's fields, defaults and descriptions."""
    from typing import Annotated

    from pydantic import BeforeValidator, Field, create_model
    from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
    from pydantic_settings.sources import InitSettingsSource

    class MappingEnv(EnvSettingsSource):
        """MUNET_* variables from the mapping given to from_env (os.environ by default)."""

        def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
            self._mapping = env
            super().__init__(settings_cls)

        def _load_env_vars(self) -> Mapping[str, str | None]:
            return {k.lower(): v for k, v in self._mapping.items() if k.startswith(ENV_PREFIX) and v != ""}

    class Settings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid",
                                          validate_default=False)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):  # noqa: ANN001, ANN206
            env, file_values = _SOURCES.get()
            return init_settings, MappingEnv(settings_cls, env), InitSettingsSource(settings_cls, file_values)

    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in fields(cls):
        hint = hints[f.name]
        if _kind(hint) == "LIST":
            hint = Annotated[hint, NoDecode, BeforeValidator(_split_list)]
        elif type(None) in typing.get_args(hint):
            hint = Annotated[hint, BeforeValidator(_empty_is_none)]
        default = Field(default_factory=f.default_factory) if f.default_factory is not MISSING else Field(f.default)
        default.description = f.metadata.get("help") or None
        spec[f.name] = (hint, default)
    return create_model("MunetSettings", __base__=Settings, **spec)


def _describe(e: Any, overrides: dict[str, Any], env: Mapping[str, str], config_file: Any) -> str:
    parts = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r} in config file {config_file}")
            continue
        if name in overrides:
            where = f"--{name.replace('_', '-')}"
        elif env.get(env_name(name)):
            where = env_name(name)
        elif config_file is not None:
            where = f"config file {config_file}"
        else:
            where = "default"
        msg = err["msg"][0].lower() + err["msg"][1:] if err["msg"] else "invalid"
        parts.append(f"invalid setting {name} = {err.get('input')!r} (from {where}): {msg}")
    return "; ".join(parts)
