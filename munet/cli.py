"""`munet`: run the server, pretrain the root model, and talk to a running server over gRPC.

    munet serve [--home DIR] [--grpc-port N] ...      the server (BentoML HTTP + our gRPC)
    munet tasks register digits --builtin uci_digits  create a task
    munet predict --task digits three.png             classify images
    munet evolve --task digits --wait                 run a generation now and watch it

Every client command takes `--target` (env MUNET_TARGET, default localhost:50051). A refused call
prints `error: CODE: message` and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from munet.config import Config

SPLIT_NAMES = {"train": 0, "validation": 1, "test": 2, "auto": -1}


class CliError(Exception):
    """A local problem (a missing file, a bad argument) reported like a server error."""


# ---- output helpers -----------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    elif isinstance(obj, list):
        obj = [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in obj]
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _describe_path(p: Any, indent: str = "  ") -> list[str]:
    out = [
        f"{indent}version {p.version} ({p.status}): validation {p.validation_accuracy:.4f}, "
        + f"test {p.test_accuracy:.4f}, score {p.score:.4f}",
        f"{indent}params {_params(p.params)} (accounted {_params(p.accounted_params)}, "
        + f"added {_params(p.added_params)}), trained {p.training_seconds:.1f} s, created {p.created_at}",
    ]
    parents = ", ".join(f"v{v}" for v in p.parents) or "-"
    out.append(f"{indent}from {p.parent_task or '-'} {parents}; mutations: {', '.join(p.mutations) or '-'}")
    for i, m in enumerate(p.modules):
        flags = " frozen" if m.frozen else ""
        out.append(f"{indent}  {i:2d} {m.kind:8s} {m.id[:12]}  {_params(m.params):>8s}  "
                   f"shared by {m.shared_by}{flags}")
    return out


def _describe_task(t: Any) -> str:
    lines = [f"task {t.name} ({t.status}), source {t.source or '-'}, created {t.created_at}",
             f"  labels ({len(t.labels)}): {', '.join(t.labels)}",
             f"  examples: {t.train_examples} train, {t.validation_examples} validation, {t.test_examples} test",
             f"  root {t.root or '-'}, images resized to {t.image_size}x{t.image_size}",
             f"  current version {t.current_version}"]
    if t.path is not None:
        lines += _describe_path(t.path, "    ")
        if t.path.hyperparameters:
            lines.append("    hyperparameters " + json.dumps(t.path.hyperparameters, sort_keys=True))
    if len(t.lineage) > 1:
        lines.append("  lineage: " + " -> ".join(f"v{p.version} ({p.score:.3f})" for p in t.lineage))
    return "\n".join(lines)


def _describe_status(s: Any) -> str:
    state = "running" if s.running else "idle"
    if s.running:
        state += f" on {s.current_task or '?'}: {s.candidates_done}/{s.candidates_total} candidates"
    if s.paused_for_load:
        state += " (paused for serving load)"
    sched = f"a generation every {s.interval_seconds:g} s" if s.scheduler_enabled else "on demand only"
    lines = [f"evolution {state}; {s.generations} generations so far; {sched}"]
    if s.recent:
        rows = [[r.started_at, r.task, str(r.generation), str(r.candidates), f"{r.incumbent_score:.4f}",
                 f"{r.best_score:.4f}", f"v{r.promoted_version}" if r.promoted else "-", f"{r.seconds:.1f}",
                 r.error or ""] for r in s.recent[-10:]]
        lines.append(_table(rows, ["STARTED", "TASK", "GEN", "CANDS", "INCUMBENT", "BEST", "PROMOTED",
                                   "SECONDS", "ERROR"]))
    return "\n".join(lines)


# ---- local data ---------------------------------------------------------------------------------


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """x, y, optional split and label names from a local .npz (the server's import format)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"x", "y"} <= set(z.files):
                raise CliError(f"{path} must hold arrays 'x' and 'y'; it has {sorted(z.files)}")
            split = z["split"] if "split" in z.files else None
            names = [str(n) for n in z["label_names"]] if "label_names" in z.files else []
            return z["x"], z["y"], split, names
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}") from None


def _labels_arg(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


# ---- commands -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from munet.client import MunetClient

    return MunetClient(args.target, timeout=args.timeout, token=args.token or None,
                       tls_ca=args.tls_ca if args.tls_ca else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from munet.service.auth import Tokens

    config = Config.from_args(args)
    tokens = Tokens.from_config(config)  # an unreadable token file stops here, with its reason
    env = {**os.environ, **config.to_env()}
    argv = [sys.executable, "-m", "bentoml", "serve", "munet.service.http:MunetService",
            "--host", config.host, "--port", str(config.http_port)]
    if config.tls_cert and config.tls_key:
        argv += ["--ssl-certfile", str(config.tls_cert), "--ssl-keyfile", str(config.tls_key)]
        if config.tls_client_ca:
            argv += ["--ssl-ca-certs", str(config.tls_client_ca), "--ssl-cert-reqs", "2"]  # 2: CERT_REQUIRED
    for what, port in (("HTTP", config.http_port), ("gRPC", config.grpc_port)):
        taken = _port_taken(config.host, port)
        if taken:
            raise CliError(f"the {what} port {config.host}:{port} is taken ({taken}); stop the other server or "
                           f"choose another port (MUNET_{what.upper()}_PORT)")
    # BentoML keeps its Prometheus multiprocess files under its home: a home of this server's own, so
    # two servers on one host never mix (or wipe) each other's metrics
    env["BENTOML_HOME"] = str((config.home / "bentoml").resolve())
    scheme = "https" if config.tls_cert else "http"
    access = ("protected: management needs the admin token" + (", predictions the predict token"
              if tokens.predict else "; predictions are open")) if tokens.protected else \
        "OPEN: no admin token, anyone who reaches the ports can register, delete and evolve tasks"
    print(f"munet: {scheme.upper()} on {scheme}://{config.host}:{config.http_port} (docs at /), gRPC"
          f"{' (TLS)' if config.tls_cert else ''} on {config.host}:{config.grpc_port}, store {config.home}; "
          f"{access}", file=sys.stderr)
    if not tokens.protected and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"munet: WARNING: listening on {config.host} without an admin token: every client on the "
              "network can delete every task. Set MUNET_ADMIN_TOKEN (or MUNET_ADMIN_TOKEN_FILE).", file=sys.stderr)
    sys.stderr.flush()
    os.execvpe(sys.executable, argv, env)
    return 0  # not reached: the process is now BentoML


def _port_taken(host: str, port: int) -> str:
    """Why `port` cannot be bound on `host` ("" when it can)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "taken"
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return ""


BENCHES = {"quality": "quality", "serve": "serve", "prefix-cache": "prefix_cache", "fuzz": "fuzz", "flood": "flood"}


def _delegate(module: str, what: str, argv: list[str]) -> int:
    """Run another tool's `main(argv)`, imported only now (the benchmarks pull in heavy extras)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise CliError(f"{what} is not available in this installation ({module} is missing)") from None
        raise
    return int(mod.main(argv) or 0)


def _delegated(argv: list[str]) -> Callable[[], int] | None:
    # these commands own their flags (`munet pretrain --epochs 3`, `munet bench serve --help`), which
    # argparse would otherwise try to read as ours
    if argv[:1] == ["pretrain"]:
        return lambda: _delegate("munet.models.pretrain", "pretraining", argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHES:
        return lambda: _delegate(f"munet.bench.{BENCHES[argv[1]]}", f"the {argv[1]} benchmark", argv[2:])
    return None


def cmd_tasks_register(args: argparse.Namespace) -> int:
    labels = _labels_arg(args.labels)
    examples = None
    if args.upload:
        x, y, split, names = _load_npz(args.upload)
        labels = labels or names
        examples = (x, y, split) if split is not None else (x, y)
    elif args.from_dir:
        files, y, names = image_folder(args.from_dir)
        labels = labels or names
        examples = (files, y)
    with _client(args) as c:
        t = c.register_task(args.name, labels=labels, builtin=args.builtin, npz_file=args.npz,
                            examples=examples, max_examples=args.max_examples, seed=args.seed, root=args.root)
    if args.json:
        _print_json(t)
    else:
        print(_describe_task(t))
    return 0


def cmd_tasks_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        tasks = c.list_tasks()
    if args.json:
        _print_json(tasks)
        return 0
    rows = []
    for t in tasks:
        p = t.path
        rows.append([t.name, str(t.current_version), str(len(t.labels)),
                     f"{t.train_examples}/{t.validation_examples}/{t.test_examples}",
                     f"{p.validation_accuracy:.4f}" if p else "-", f"{p.test_accuracy:.4f}" if p else "-",
                     f"{p.score:.4f}" if p else "-", _params(p.params) if p else "-",
                     _params(p.accounted_params) if p else "-", t.source])
    print(_table(rows, ["NAME", "VERSION", "LABELS", "TRAIN/VAL/TEST", "VAL ACC", "TEST ACC", "SCORE",
                        "PARAMS", "ACCOUNTED", "SOURCE"]) if rows else "no tasks")
    return 0


def cmd_tasks_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        t = c.get_task(args.name)
    if args.json:
        _print_json(t)
    else:
        print(_describe_task(t))
    return 0


def cmd_tasks_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(f"deleted {c.delete_task(args.name)}")
    return 0


def cmd_tasks_versions(args: argparse.Namespace) -> int:
    with _client(args) as c:
        v = c.list_versions(args.name)
    if args.json:
        _print_json(v)
        return 0
    rows = [["*" if p.version == v.current_version else "", str(p.version), p.status,
             f"{p.validation_accuracy:.4f}", f"{p.test_accuracy:.4f}", f"{p.score:.4f}", _params(p.params),
             _params(p.accounted_params), f"{p.parent_task or '-'} " + ",".join(f"v{x}" for x in p.parents),
             ",".join(p.mutations), p.created_at] for p in v.versions]
    print(_table(rows, ["", "VERSION", "STATUS", "VAL ACC", "TEST ACC", "SCORE", "PARAMS", "ACCOUNTED",
                        "PARENT", "MUTATIONS", "CREATED"]))
    return 0


def cmd_tasks_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        t = c.rollback(args.name, args.version)
    print(f"task {t.name} now serves version {t.current_version}")
    return 0


def cmd_examples_add(args: argparse.Namespace) -> int:
    if args.upload and args.images:
        raise CliError("give either --upload FILE.npz or images with --label, not both")
    with _client(args) as c:
        if args.upload:
            x, y, split, _ = _load_npz(args.upload)
        elif args.images:
            if args.label is None:
                raise CliError("images need --label (an index or a label name)")
            x, y, split = _images_as_examples(c, args)
        else:
            raise CliError("nothing to add: give --upload FILE.npz or image files with --label")
        r = c.add_examples(args.task, x, y, split)
    print(f"added {r.added} examples to {r.task} ({r.train} train, {r.validation} validation, {r.test} test); "
          f"{r.total_examples} in all")
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def image_folder(root: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files and labels from class subfolders (sorted by name, as torchvision's ImageFolder)."""
    base = Path(root)
    if not base.is_dir():
        raise CliError(f"{root} is not a folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, y = [], []
    for i, name in enumerate(classes):
        for f in sorted((base / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                y.append(i)
    if len(classes) < 2 or not files:
        raise CliError(f"{root} needs at least two class subfolders holding images "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))}); found {len(classes)} folders, {len(files)} images")
    return files, np.array(y, np.int64), classes


def _images_as_examples(c: Any, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # decoded here with the server's own function at the task's size, so images of mixed sizes stack
    from munet.data.images import InvalidImage, decode_image

    task = c.get_task(args.task)
    labels = task.labels
    label = int(args.label) if args.label.isdigit() else labels.index(args.label) if args.label in labels else -1
    if not 0 <= label < len(labels):
        raise CliError(f"label {args.label!r} is not one of {labels} nor an index below {len(labels)}")
    xs = []
    for path in args.images:
        try:
            xs.append(decode_image(Path(path).read_bytes(), task.image_size or 32))
        except (OSError, InvalidImage) as e:
            raise CliError(f"cannot read image {path}: {e}") from None
    n = len(xs)
    return np.stack(xs), np.full(n, label), np.full(n, SPLIT_NAMES[args.split])


def cmd_predict(args: argparse.Namespace) -> int:
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    with _client(args) as c:
        r = c.predict(args.task, args.images, top_k=args.top_k)
    if args.json:
        _print_json({"task": r.task, "version": r.version,
                     "predictions": [{"image": img, "top": [s._asdict() for s in p]}
                                     for img, p in zip(args.images, r.predictions, strict=True)]})
        return 0
    print(f"task {r.task}, version {r.version}")
    for img, p in zip(args.images, r.predictions, strict=True):
        print(f"{img}: " + ", ".join(f"{s.label} ({s.probability:.3f})" for s in p))
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    wait = args.wait or args.generations > 1 or bool(args.plot)
    reports = []
    with _client(args) as c:
        for _ in range(max(1, args.generations)):
            generations = c.evolution_status().generations if wait else 0
            s = c.trigger_evolution(args.task or "", args.candidates, args.budget, wait=False)
            if wait:
                s = _watch(c, s, generations)
                if s.recent and s.generations > generations:
                    reports.append(s.recent[-1])
        print(_describe_status(s))
        if args.plot:
            _plot_generations(reports, args.plot)
            print(f"wrote {args.plot}")
    return 0


def _plot_generations(reports: list, path: str) -> None:
    """Score per generation: the incumbent's (before) and the best candidate's, promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reports:
        raise CliError("no generation finished: nothing to plot")
    x = list(range(1, len(reports) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(x, [r.incumbent_score for r in reports], "o-", label="incumbent (before the generation)")
    ax.plot(x, [r.best_score for r in reports], "s--", label="best candidate")
    promoted = [(i, r.best_score) for i, r in zip(x, reports, strict=True) if r.promoted]
    if promoted:
        ax.scatter(*zip(*promoted, strict=True), s=120, facecolors="none", edgecolors="green", label="promoted")
    tasks = sorted({r.task for r in reports})
    ax.set(xlabel="generation", ylabel="score (validation accuracy x size penalty)",
           title=f"munet evolution: {', '.join(tasks)}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _watch(c: Any, s: Any, generations_before: int, poll_s: float = 0.5, start_timeout_s: float = 30.0) -> Any:
    """Poll GetEvolutionStatus until the triggered generation ends, with a bar over its candidates.

    Done when none is running and one ran (or finished) since the trigger; a trigger whose job never
    starts (the task was deleted meanwhile) gives up after `start_timeout_s`.
    """
    from tqdm import tqdm

    t0, seen_running = time.monotonic(), False
    # disable=None: a bar only on a terminal; piped output gets the final table alone
    with tqdm(total=s.candidates_total or None, unit="candidate", file=sys.stderr, leave=False,
              disable=None, mininterval=1.0) as bar:
        while True:
            if s.running:
                seen_running = True
                if s.candidates_total and bar.total != s.candidates_total:
                    bar.total = s.candidates_total
                bar.set_description(f"evolving {s.current_task}")
                bar.set_postfix_str("paused for serving load" if s.paused_for_load else "", refresh=False)
                bar.update(s.candidates_done - bar.n)
            elif seen_running or s.generations > generations_before or time.monotonic() - t0 > start_timeout_s:
                return s
            time.sleep(poll_s)
            s = c.evolution_status()


def cmd_evolution_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.evolution_status()
    if args.json:
        _print_json(s)
    else:
        print(_describe_status(s))
    return 0


def _home(args: argparse.Namespace) -> Path:
    from munet.config import Config

    return Path(args.home) if args.home else Config.from_env().home


def cmd_roots_list(args: argparse.Namespace) -> int:
    from munet.models.roots import DEFAULT_ROOT, RootUnavailable, available_roots, mobilenet_weights_path

    home = _home(args)
    stored: dict = {}
    default = ""
    db = home / "munet.db"
    if db.is_file():
        from munet.models.roots import stored_roots
        from munet.models.store import Store

        store = Store(home)
        try:
            stored, default = stored_roots(store), store.get_meta("default_root") or ""
        finally:
            store.close()
    rows, out = [], []
    for name, spec in available_roots(home).items():
        installed = True
        if name == "mobilenet_v2_imagenet":
            try:
                mobilenet_weights_path()
            except RootUnavailable:
                installed = False
        default_mark = name == (default or DEFAULT_ROOT)
        out.append({"name": name, "family": spec.family, "image_size": spec.image_size,
                    "gpu_image_size": spec.gpu_image_size, "in_store": name in stored, "installed": installed,
                    "default": default_mark, "description": spec.description})
        rows.append(["*" if default_mark else "", name, spec.family, f"{spec.image_size}/{spec.gpu_image_size}",
                     "yes" if name in stored else "no", "yes" if installed else "NO (make setup)", spec.description])
    if args.json:
        _print_json(out)
    else:
        print(_table(rows, ["", "root", "family", "px cpu/gpu", "in store", "installed", "description"]))
    return 0


def cmd_roots_import(args: argparse.Namespace) -> int:
    from munet.models.roots import import_root

    def floats(text: str | None) -> tuple | None:
        return tuple(float(v) for v in text.split(",")) if text else None

    info = import_root(_home(args), args.name, Path(args.checkpoint), args.format, heads=args.heads,
                       eps=args.eps, mean=floats(args.mean), std=floats(args.std), image_size=args.image_size)
    if args.json:
        _print_json(info)
    else:
        print(f"imported root {info['name']} ({info['family']}, {len(info['modules'])} modules, "
              f"{info['params']:,} parameters, {info['image_size']} px); parity with the original forward "
              f"pass: {info['parity_relative_error']:.1e} relative. Use it with MUNET_ROOT={info['name']} "
              f"or `munet tasks register ... --root {info['name']}`")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="munet", description="munet-serve: an evolving multitask inference server")
    # client options work before the command (`munet --target h:p tasks list`) and after it; the
    # subcommand copies default to SUPPRESS so they never overwrite a value given before the command
    for target, suppress in ((parser, False), (client := argparse.ArgumentParser(add_help=False), True)):
        target.add_argument("--target", default=argparse.SUPPRESS if suppress else
                            os.environ.get("MUNET_TARGET", "localhost:50051"),
                            help="gRPC address of the server (env MUNET_TARGET; default localhost:50051)")
        target.add_argument("--timeout", type=float, default=argparse.SUPPRESS if suppress else 30.0,
                            help="seconds per ordinary call (default 30)")
        target.add_argument("--token", default=argparse.SUPPRESS if suppress else os.environ.get("MUNET_TOKEN", ""),
                            help="bearer token sent with every call (env MUNET_TOKEN)")
        target.add_argument("--tls-ca", default=argparse.SUPPRESS if suppress else os.environ.get("MUNET_TLS_CA"),
                            help="PEM CA bundle to trust: connect with TLS (env MUNET_TLS_CA; 'system' for "
                                 "the system's roots)")
        target.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                            help="print results as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server (HTTP via BentoML, gRPC, evolution)")
    Config.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    # listed for --help only: main() hands their arguments to the tool before argparse sees them
    p = sub.add_parser("pretrain", help="pretrain the root model (see `munet pretrain --help`)")
    p.set_defaults(func=lambda a: _delegate("munet.models.pretrain", "pretraining", []))
    # the benchmarks live in munet.bench.<name>, each with main(argv)
    p = sub.add_parser("bench", help="benchmarks: quality (accuracy vs. baselines), serve (latency, throughput), "
                                     "prefix-cache (what the frozen-prefix cache saves a candidate)")
    p.add_argument("which", choices=list(BENCHES))
    p.set_defaults(func=lambda a: _delegate(f"munet.bench.{BENCHES[a.which]}", f"the {a.which} benchmark", []))

    roots = sub.add_parser("roots", help="the roots new tasks can grow from; import one from a checkpoint")
    rsub = roots.add_subparsers(dest="roots_command", required=True, metavar="ACTION")
    p = rsub.add_parser("list", help="built-in and imported roots (* marks the default for new tasks)")
    p.add_argument("--home", help="the store (default: MUNET_HOME or .munet)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_roots_list)
    p = rsub.add_parser("import", help="cut a checkpoint into modules, check it against its own forward pass, "
                                       "and save it as a root in the store's home")
    p.add_argument("name", help="the new root's name (lowercase letters, digits, '_' or '-')")
    p.add_argument("checkpoint", help="a .pth/.pt (tensors only; no pickled code is run) or .safetensors file")
    p.add_argument("--format", required=True, choices=["torchvision-mobilenet_v2", "timm-vit"],
                   help="the checkpoint's key layout")
    p.add_argument("--heads", type=int, default=None, help="timm-vit: attention heads (default width/64)")
    p.add_argument("--eps", type=float, default=1e-6, help="timm-vit: LayerNorm epsilon (timm's default 1e-6)")
    p.add_argument("--mean", help="timm-vit: input normalisation mean, e.g. 0.5,0.5,0.5 (default)")
    p.add_argument("--std", help="timm-vit: input normalisation std, e.g. 0.5,0.5,0.5 (default)")
    p.add_argument("--image-size", type=int, default=None,
                   help="torchvision-mobilenet_v2: input size of its tasks on CPU (default 96)")
    p.add_argument("--home", help="the store (default: MUNET_HOME or .munet)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_roots_import)

    tasks = sub.add_parser("tasks", help="create, inspect, delete and roll back tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    p = tsub.add_parser("register", parents=[client], help="create a task and train its first path")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", help="built-in data set: mnist, fashion_mnist, animal_shapes, uci_digits, "
                                       "emoji_noto, emoji_subgroups")
    src.add_argument("--npz", metavar="FILE_ON_SERVER", help="an .npz file in the server's import directory")
    src.add_argument("--upload", metavar="LOCAL.npz", help="a local .npz (x, y[, split, label_names]) to stream")
    src.add_argument("--from", dest="from_dir", metavar="DIR",
                     help="a local folder with one subfolder of images (PNG, JPEG, ... any size) per class, "
                          "named for the class (torchvision's ImageFolder layout)")
    p.add_argument("--labels", help="comma-separated label names (default: the data set's)")
    p.add_argument("--max-examples", type=int, default=0, help="take at most this many examples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default="", help="root to grow from (default: the server's; see `munet roots list`)")
    p.set_defaults(func=cmd_tasks_register)
    p = tsub.add_parser("list", parents=[client], help="all tasks, one line each")
    p.set_defaults(func=cmd_tasks_list)
    for name, func, text in (("get", cmd_tasks_get, "one task in detail"), ("delete", cmd_tasks_delete,
                             "delete a task and its examples"), ("versions", cmd_tasks_versions,
                             "a task's stored path versions")):
        p = tsub.add_parser(name, parents=[client], help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    p = tsub.add_parser("rollback", parents=[client], help="serve an earlier version again")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=0, help="version to serve (0: the one before the current)")
    p.set_defaults(func=cmd_tasks_rollback)

    examples = sub.add_parser("examples", help="add labelled examples to a live task")
    esub = examples.add_subparsers(dest="examples_command", required=True, metavar="ACTION")
    p = esub.add_parser("add", parents=[client], help="add examples from a local .npz or image files")
    p.add_argument("--task", required=True)
    p.add_argument("--upload", metavar="LOCAL.npz")
    p.add_argument("--label", help="label (index or name) of every image given")
    p.add_argument("--split", choices=list(SPLIT_NAMES), default="auto", help="split of the images given")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.set_defaults(func=cmd_examples_add)

    p = sub.add_parser("predict", parents=[client], help="classify image files")
    p.add_argument("--task", required=True)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evolve", parents=[client], help="run an evolution generation now")
    p.add_argument("--task", help="task to evolve (default: the scheduler's next pick)")
    p.add_argument("--candidates", type=int, default=0, help="candidates to train (0: configured)")
    p.add_argument("--budget", type=float, default=0.0, help="seconds per candidate (0: configured)")
    p.add_argument("--wait", action="store_true", help="show progress until the generation ends")
    p.add_argument("--generations", type=int, default=1, help="run this many generations, one after another")
    p.add_argument("--plot", metavar="PNG", help="write a plot of the score per generation (implies --wait)")
    p.set_defaults(func=cmd_evolve)

    evo = sub.add_parser("evolution", help="evolution state")
    vsub = evo.add_subparsers(dest="evolution_command", required=True, metavar="ACTION")
    p = vsub.add_parser("status", parents=[client], help="running generation and recent reports")
    p.set_defaults(func=cmd_evolution_status)

    p = sub.add_parser("health", parents=[client], help="grpc.health.v1 check (exit 0 when SERVING)")
    p.add_argument("--service", default="", help='service name ("" is the whole server)')
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from munet.client import MunetClientError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        delegated = _delegated(argv)
        if delegated is not None:
            return delegated()
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except MunetClientError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except (CliError, ValueError, OSError) as e:
        # local problems (a missing file, an array of the wrong shape): no traceback, same exit status
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
