"""`munet`: run the server, pretrain the root model, and talk to a running server over gRPC.

    munet serve [--config munet.toml] [--grpc-port N] ...   the server (BentoML HTTP + our gRPC)
    munet tasks register digits --builtin uci_digits       create a task
    munet predict --task digits three.png                  classify images
    munet evolve --task digits --wait                      run a generation now and watch it

Built on typer (rich for tables, progress and help). Every command that prints takes `--json` (one
JSON document on stdout); every client command takes `--target` (env MUNET_TARGET, default
localhost:50051), `--token`, `--tls-ca`, ... before or after the command. Failures print one line,
`error: ...`, on stderr and exit by class: 2 usage, 3 not found, 4 invalid input, 5 unavailable,
1 anything else (see EXIT_CODES).
"""

import hashlib
import importlib
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from munet.cli_data import (
    CliError,
    image_folder,
    images_as_examples,
    labels_arg,
    load_npz,
    plot_generations,
)
from munet.cli_output import (
    describe_policy,
    describe_task,
    echo,
    print_json,
    print_roots,
    print_status,
    print_tasks,
    print_versions,
    status,
    stderr_console,
)
from munet.config import CONFIG_FILE_ENV, Config, ConfigError, env_name, settings_info

__all__ = ["EXIT_CODES", "CliError", "app", "image_folder", "main"]

DEFAULT_TARGET = "localhost:50051"  # munet.client.DEFAULT_TARGET, without importing grpc for --help

# exit status by error class; gRPC status codes not listed exit 1
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EXIT_CODES = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "INVALID_ARGUMENT": EXIT_INVALID, "FAILED_PRECONDITION": EXIT_INVALID, "ALREADY_EXISTS": EXIT_INVALID,
    "OUT_OF_RANGE": EXIT_INVALID,
    "UNAVAILABLE": EXIT_UNAVAILABLE, "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE, "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
}

Policy = Literal["auto", "approve", "frozen"]


# ---- options shared by many commands ------------------------------------------------------------


@dataclass
class Opts:
    """The client and output options, given before the command (`munet --json tasks list`) or after it."""

    target: str = DEFAULT_TARGET
    timeout: float = 30.0
    token: str = ""
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    json: bool = False
    config: Path | None = None

    def merged(self, given: dict[str, Any]) -> "Opts":
        changes = {k: v for k, v in given.items() if k != "json" and v is not None}
        if given.get("json"):
            changes["json"] = True
        return replace(self, **changes)

    def client(self) -> Any:
        from munet.client import MunetClient

        return MunetClient(self.target, timeout=self.timeout, token=self.token or None, tls_ca=self.tls_ca or None,
                           tls_cert=self.tls_cert or None, tls_key=self.tls_key or None)


HELP_TARGET = "gRPC address of the server, host:port"
HELP_TIMEOUT = "seconds per ordinary call (registration and waiting calls get longer)"
HELP_TOKEN = "bearer token sent with every call"
HELP_TLS_CA = "PEM CA bundle to trust: connect with TLS ('system' for the system's roots)"
HELP_TLS_CERT = "PEM client certificate, for servers that require one (mutual TLS; with --tls-key)"
HELP_TLS_KEY = "PEM private key of --tls-cert"
HELP_JSON = "print the result as one JSON document on stdout"
HELP_CONFIG = "TOML config file of server settings (below env vars and flags)"

_KW = inspect.Parameter.KEYWORD_ONLY
_CLIENT_PANEL = "Client options (also accepted before the command)"


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, _KW, default=default, annotation=annotation)


# the command-level copies default to None: a value given before the command stands unless repeated after
_CLIENT_PARAMS = [
    _param("target", Annotated[str | None, typer.Option(help=HELP_TARGET, rich_help_panel=_CLIENT_PANEL,
                                                        show_default=False)], None),
    _param("timeout", Annotated[float | None, typer.Option(help=HELP_TIMEOUT, rich_help_panel=_CLIENT_PANEL,
                                                           show_default=False)], None),
    _param("token", Annotated[str | None, typer.Option(help=HELP_TOKEN, rich_help_panel=_CLIENT_PANEL,
                                                       show_default=False)], None),
    _param("tls_ca", Annotated[str | None, typer.Option("--tls-ca", help=HELP_TLS_CA, rich_help_panel=_CLIENT_PANEL,
                                                        show_default=False)], None),
    _param("tls_cert", Annotated[str | None, typer.Option("--tls-cert", help=HELP_TLS_CERT, show_default=False,
                                                          rich_help_panel=_CLIENT_PANEL)], None),
    _param("tls_key", Annotated[str | None, typer.Option("--tls-key", help=HELP_TLS_KEY, show_default=False,
                                                         rich_help_panel=_CLIENT_PANEL)], None),
]
_JSON_PARAM = _param("json", Annotated[bool, typer.Option("--json", help=HELP_JSON)], False)
_CTX_PARAM = _param("ctx__", typer.Context, inspect.Parameter.empty)


def command(parent: typer.Typer, name: str, help: str, *, client: bool = False, prints: bool = True,
            extra: Sequence[inspect.Parameter] = (), **settings: Any) -> Callable[[Callable], Callable]:
    """Register `f(o: Opts, ...)` as `parent`'s command `name`, with the shared options appended.

    `f`'s first parameter receives the merged options (Opts); `extra` parameters (built at run time, as
    `serve`'s settings) are passed to it as keyword arguments."""

    def deco(f: Callable) -> Callable:
        own = [p.replace(kind=_KW) for p in list(inspect.signature(f, eval_str=True).parameters.values())[1:]
               if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        shared = [*(_CLIENT_PARAMS if client else []), *([_JSON_PARAM] if prints else [])]
        names = [p.name for p in shared]

        def run(**kwargs: Any) -> Any:
            ctx = kwargs.pop("ctx__")
            given = {n: kwargs.pop(n) for n in names}
            root = ctx.find_root().obj or Opts()
            return f(root.merged(given), **kwargs)

        params = [*own, *extra, *shared, _CTX_PARAM]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__ = run.__qualname__ = f.__name__
        run.__doc__ = f.__doc__
        parent.command(name, help=help, **settings)(run)
        return f

    return deco


def _version() -> str:
    try:
        return package_version("munet-serve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# ---- the application ----------------------------------------------------------------------------

app = typer.Typer(name="munet", help="munet-serve: an evolving multitask inference server.", add_completion=False,
                  no_args_is_help=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(envvar="MUNET_TARGET", help=HELP_TARGET)] = DEFAULT_TARGET,
    timeout: Annotated[float, typer.Option(help=HELP_TIMEOUT)] = 30.0,
    token: Annotated[str, typer.Option(envvar="MUNET_TOKEN", help=HELP_TOKEN, show_default=False)] = "",
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", envvar="MUNET_TLS_CA", help=HELP_TLS_CA)] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help=HELP_TLS_CERT)] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help=HELP_TLS_KEY)] = None,
    config: Annotated[Path | None, typer.Option("--config", envvar=CONFIG_FILE_ENV, help=HELP_CONFIG,
                                                dir_okay=False)] = None,
    json: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
    version: Annotated[bool, typer.Option("--version", help="print munet-serve's version and exit")] = False,
) -> None:
    ctx.obj = Opts(target, timeout, token, tls_ca, tls_cert, tls_key, json, config)
    if version:
        if json:
            print_json({"name": "munet-serve", "version": _version()})
        else:
            echo(f"munet-serve {_version()}")
        raise typer.Exit(EXIT_OK)
    if ctx.invoked_subcommand is None:
        echo(ctx.get_help())
        raise typer.Exit(EXIT_USAGE)


tasks_app = typer.Typer(help="create, inspect, delete, roll back and promote tasks")
roots_app = typer.Typer(help="the roots new tasks can grow from; import one from a checkpoint")
examples_app = typer.Typer(help="add labelled examples to a live task")
evolution_app = typer.Typer(help="evolution state")
bench_app = typer.Typer(help="benchmarks, each with its own options (`munet bench serve --help`)")
app.add_typer(tasks_app, name="tasks")
app.add_typer(roots_app, name="roots")
app.add_typer(examples_app, name="examples")
app.add_typer(evolution_app, name="evolution")
app.add_typer(bench_app, name="bench")


# ---- serve --------------------------------------------------------------------------------------


def _setting_params() -> list[inspect.Parameter]:
    """One `--<field>` option per Config field, with the field's description, env var and default."""
    out = []
    for s in settings_info():
        default = (",".join(s.default) if isinstance(s.default, list) else "none" if s.default is None
                   else '""' if s.default == "" else s.default)
        text = f"{s.help} [env {env_name(s.name)}; default {default}]"
        option = typer.Option(f"--{s.name.replace('_', '-')}", help=escape(text), metavar=s.kind,
                              show_default=False, rich_help_panel="Settings (flag > env > config file > default)")
        out.append(_param(s.name, Annotated[str | None, option], None))
    return out


@command(app, "serve", "run the server: HTTP via BentoML, gRPC, evolution", extra=_setting_params())
def serve(
    o: Opts,
    config: Annotated[Path | None, typer.Option("--config", help=HELP_CONFIG, dir_okay=False,
                                                show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="check the settings (values, token file, free ports), "
                                                        "print them and exit without serving")] = False,
    **settings: str | None,
) -> int:
    from munet.service.auth import Tokens

    config_file = config or o.config
    cfg = Config.from_env(config_file=config_file, **settings)
    tokens = Tokens.from_config(cfg)  # an unreadable token file stops here, with its reason
    for what, port in (("HTTP", cfg.http_port), ("gRPC", cfg.grpc_port)):
        taken = _port_taken(cfg.host, port)
        if taken:
            raise CliError(f"the {what} port {cfg.host}:{port} is taken ({taken}); stop the other server or "
                           f"choose another port (MUNET_{what.upper()}_PORT)", exit_code=EXIT_ERROR)
    scheme = "https" if cfg.tls_cert else "http"
    access = ("protected: management needs the admin token" + (", predictions the predict token"
              if tokens.predict else "; predictions are open")) if tokens.protected else \
        "OPEN: no admin token, anyone who reaches the ports can register, delete and evolve tasks"
    summary = {"http": f"{scheme}://{cfg.host}:{cfg.http_port}", "grpc": f"{cfg.host}:{cfg.grpc_port}",
               "grpc_tls": bool(cfg.tls_cert), "home": str(cfg.home), "protected": tokens.protected,
               "config_file": str(config_file) if config_file else None}
    if check:
        shown = cfg.to_dict()
        for secret in ("admin_token", "predict_token"):
            shown[secret] = "***" if shown[secret] else ""
        if o.json:
            print_json({**summary, "settings": shown})
        else:
            echo(f"munet: settings OK; would serve {summary['http']} and gRPC on {summary['grpc']}; {access}")
            for k, v in shown.items():
                echo(f"  {k} = {v}")
        return EXIT_OK

    argv = [sys.executable, "-m", "bentoml", "serve", "munet.server:MunetService",
            "--host", cfg.host, "--port", str(cfg.http_port)]
    if cfg.tls_cert and cfg.tls_key:
        argv += ["--ssl-certfile", str(cfg.tls_cert), "--ssl-keyfile", str(cfg.tls_key)]
        if cfg.tls_client_ca:
            argv += ["--ssl-ca-certs", str(cfg.tls_client_ca), "--ssl-cert-reqs", "2"]  # 2: CERT_REQUIRED
    # the worker gets every setting as MUNET_* (to_env), so it never re-reads the config file
    env = {k: v for k, v in os.environ.items() if k != CONFIG_FILE_ENV}
    env.update(cfg.to_env())
    # BentoML keeps its Prometheus multiprocess files under its home, and wipes them at start: a home
    # of this server's own, on local disk (not in a store that replicas share, maybe on a network
    # volume), so two servers on one host never mix or wipe each other's metrics
    store_key = hashlib.sha256(str(cfg.home.resolve()).encode()).hexdigest()[:10]
    env["BENTOML_HOME"] = str(Path(tempfile.gettempdir()) / f"munet-bentoml-{store_key}-{cfg.http_port}")
    if o.json:  # stdout belongs to BentoML from here on: the banner is one JSON line on stderr
        import json as _json

        print(_json.dumps({"event": "starting", **summary, "access": access}), file=sys.stderr)
    else:
        print(f"munet: {scheme.upper()} on {summary['http']} (docs at /), gRPC{' (TLS)' if cfg.tls_cert else ''} "
              f"on {summary['grpc']}, store {cfg.home}; {access}", file=sys.stderr)
    if not tokens.protected and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"munet: WARNING: listening on {cfg.host} without an admin token: every client on the "
              "network can delete every task. Set MUNET_ADMIN_TOKEN (or MUNET_ADMIN_TOKEN_FILE).", file=sys.stderr)
    sys.stderr.flush()
    os.execvpe(sys.executable, argv, env)
    return EXIT_OK  # not reached: the process is now BentoML


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


# ---- pretrain and bench: tools with their own argparse, handed the rest of the command line -------

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _delegate(module: str, what: str, argv: list[str]) -> int:
    """Run another tool's `main(argv)`, imported only now (the benchmarks pull in heavy extras)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise CliError(f"{what} is not available in this installation ({module} is missing)",
                           exit_code=EXIT_ERROR) from None
        raise
    try:
        return int(mod.main(argv) or 0)
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)


@app.command("pretrain", help="pretrain the small ViT root (its own options: `munet pretrain --help`)",
             context_settings=_PASS_THROUGH, add_help_option=False)
def pretrain(ctx: typer.Context) -> int:
    return _delegate("munet.models.pretrain", "pretraining", list(ctx.args))


BENCHES = {
    "quality": ("quality", "accuracy against fine-tuning baselines"),
    "serve": ("serve", "latency and throughput against baselines"),
    "prefix-cache": ("prefix_cache", "what the frozen-prefix cache saves a candidate"),
    "fuzz": ("fuzz", "malformed requests over both protocols"),
    "flood": ("flood", "a flood on one task: another task's latency, the worker's memory"),
    "margin": ("margin", "promotions on validation noise, with and without the margin"),
    "spans": ("clone_spans", "which layers a candidate should train: cloned spans against fine-tuning"),
    "hot-path": ("hot_path", "where a single image's time goes: client, server, ONNX Runtime, caches"),
    "thread-pool": ("thread_pool", "ONNX Runtime's shared spinning pool against a pool per session: latency, CPU"),
}


def _checkout() -> Path | None:
    """The repository checkout that holds `benchmarks/`: the one this munet was imported from (an
    editable install), else the current directory when it is a checkout."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "munet" / "__init__.py").is_file():
            return root
    return None


def _run_bench(module: str, name: str, argv: list[str]) -> int:
    # benchmarks are tools, not the installed package (pyproject installs munet* only): they are
    # imported from the checkout, which goes first on sys.path so the spawned client processes of
    # `bench serve` and `bench flood` (multiprocessing hands them this sys.path) find them too
    root = _checkout()
    if root is None:
        raise CliError("benchmarks live in the repository's benchmarks/ folder; run from a checkout",
                       exit_code=EXIT_ERROR)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return _delegate(f"benchmarks.{module}", f"the {name} benchmark", argv)


def _bench_command(name: str, module: str, text: str) -> None:
    def run(ctx: typer.Context) -> int:
        return _run_bench(module, name, list(ctx.args))

    run.__name__ = f"bench_{module}"
    bench_app.command(name, help=f"{text} (its own options: `munet bench {name} --help`)",
                      context_settings=_PASS_THROUGH, add_help_option=False)(run)


for _name, (_module, _text) in BENCHES.items():
    _bench_command(_name, _module, _text)


# ---- roots --------------------------------------------------------------------------------------

HomeOption = Annotated[Path | None, typer.Option(help="the store (default: the home setting: MUNET_HOME, the "
                                                      "config file, or .munet)", show_default=False)]


def _home(o: Opts, home: Path | None) -> Path:
    return home if home is not None else Config.from_env(config_file=o.config).home


@command(roots_app, "list", "built-in and imported roots (* marks the default for new tasks)")
def roots_list(o: Opts, home: HomeOption = None) -> int:
    from munet.models.roots import DEFAULT_ROOT, RootUnavailable, available_roots, mobilenet_weights_path

    home = _home(o, home)
    stored: dict = {}
    default = ""
    database_url = Config.from_env(config_file=o.config).database_url
    # only a store that exists: listing roots creates none (a PostgreSQL store's home has store-id)
    if (home / ("store-id" if database_url else "munet.db")).is_file():
        from munet.models.roots import stored_roots
        from munet.models.store import Store

        store = Store(home, database_url)
        try:
            stored, default = stored_roots(store), store.get_meta("default_root") or ""
        finally:
            store.close()
    out = []
    for name, spec in available_roots(home).items():
        installed = True
        if name == "mobilenet_v2_imagenet":
            try:
                mobilenet_weights_path()
            except RootUnavailable:
                installed = False
        out.append({"name": name, "family": spec.family, "image_size": spec.image_size,
                    "gpu_image_size": spec.gpu_image_size, "in_store": name in stored, "installed": installed,
                    "default": name == (default or DEFAULT_ROOT), "description": spec.description})
    if o.json:
        print_json(out)
    else:
        print_roots(out)
    return EXIT_OK


@command(roots_app, "import", "cut a checkpoint into modules, check it against its own forward pass, and save "
                              "it as a root in the store's home")
def roots_import(
    o: Opts,
    name: Annotated[str, typer.Argument(help="the new root's name (lowercase letters, digits, '_' or '-')")],
    checkpoint: Annotated[Path, typer.Argument(help="a .pth/.pt (tensors only; no pickled code is run) or "
                                                    ".safetensors file")],
    format: Annotated[Literal["torchvision-mobilenet_v2", "timm-vit"],
                      typer.Option("--format", help="the checkpoint's key layout")],
    heads: Annotated[int | None, typer.Option(help="timm-vit: attention heads (default width/64)",
                                              show_default=False)] = None,
    eps: Annotated[float, typer.Option(help="timm-vit: LayerNorm epsilon (timm's default)")] = 1e-6,
    mean: Annotated[str | None, typer.Option(help="timm-vit: input normalisation mean, e.g. 0.5,0.5,0.5 "
                                                  "(the default)")] = None,
    std: Annotated[str | None, typer.Option(help="timm-vit: input normalisation std, e.g. 0.5,0.5,0.5 "
                                                 "(the default)")] = None,
    image_size: Annotated[int | None, typer.Option(help="torchvision-mobilenet_v2: input size of its tasks on "
                                                        "CPU (default 96)", show_default=False)] = None,
    home: HomeOption = None,
) -> int:
    from munet.models.roots import import_root

    def floats(text: str | None) -> tuple | None:
        try:
            return tuple(float(v) for v in text.split(",")) if text else None
        except ValueError:
            raise CliError(f"{text!r} is not a comma-separated list of numbers") from None

    info = import_root(_home(o, home), name, checkpoint, format, heads=heads, eps=eps, mean=floats(mean),
                       std=floats(std), image_size=image_size)
    if o.json:
        print_json(info)
    else:
        echo(f"imported root {info['name']} ({info['family']}, {len(info['modules'])} modules, "
             f"{info['params']:,} parameters, {info['image_size']} px); parity with the original forward "
             f"pass: {info['parity_relative_error']:.1e} relative. Use it with MUNET_ROOT={info['name']} "
             f"or `munet tasks register ... --root {info['name']}`")
    return EXIT_OK


# ---- tasks --------------------------------------------------------------------------------------

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the task's name")]


@command(tasks_app, "register", "create a task from one data source and train its first path", client=True)
def tasks_register(
    o: Opts,
    name: NameArg,
    builtin: Annotated[str | None, typer.Option(help="a built-in data set: mnist, fashion_mnist, animal_shapes, "
                                                     "uci_digits, emoji_noto, emoji_subgroups")] = None,
    npz: Annotated[str | None, typer.Option(metavar="FILE_ON_SERVER", help="an .npz file in the server's import "
                                                                           "directory")] = None,
    upload: Annotated[Path | None, typer.Option(metavar="LOCAL.npz", help="a local .npz (x, y[, split, "
                                                                          "label_names]) to stream")] = None,
    from_dir: Annotated[Path | None, typer.Option("--from", metavar="DIR", help="a local folder with one subfolder "
                                                  "of images (PNG, JPEG, ... any size) per class, named for the "
                                                  "class (torchvision's ImageFolder layout)")] = None,
    labels: Annotated[str | None, typer.Option(help="comma-separated label names (default: the data set's)")] = None,
    max_examples: Annotated[int, typer.Option(help="take at most this many examples (0: all)")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the split and of the initial training")] = 0,
    policy: Annotated[Policy, typer.Option(help="promotion policy: auto (evolution promotes), approve (a better "
                                                "candidate waits for `tasks promote`), frozen")] = "auto",
    root: Annotated[str, typer.Option(help="root to grow from (default: the server's; see `munet roots list`)",
                                      show_default=False)] = "",
) -> int:
    sources = [s for s, v in (("--builtin", builtin), ("--npz", npz), ("--upload", upload), ("--from", from_dir))
               if v is not None]
    if len(sources) != 1:
        raise typer.BadParameter("give exactly one of --builtin, --npz, --upload, --from"
                                 + (f" (got {', '.join(sources)})" if sources else ""))
    names = labels_arg(labels)
    examples = None
    if upload is not None:
        x, y, split, found = load_npz(upload)
        names = names or found
        examples = (x, y, split)
    elif from_dir is not None:
        files, y, found = image_folder(from_dir)
        names = names or found
        examples = (files, y)
    with o.client() as c, status(f"registering {name} and training its first path"):
        t = c.register_task(name, labels=names, builtin=builtin, npz_file=npz, examples=examples,
                            max_examples=max_examples, seed=seed, root=root, policy=policy)
    _task_out(o, t)
    return EXIT_OK


def _task_out(o: Opts, t: Any, text: str | None = None) -> None:
    if o.json:
        print_json(t)
    else:
        echo(describe_task(t) if text is None else text)


@command(tasks_app, "list", "all tasks, one line each", client=True)
def tasks_list(o: Opts) -> int:
    with o.client() as c:
        tasks = c.list_tasks()
    if o.json:
        print_json(tasks)
    else:
        print_tasks(tasks)
    return EXIT_OK


@command(tasks_app, "get", "one task in detail: root, input size, current version, modules, lineage", client=True)
def tasks_get(o: Opts, name: NameArg) -> int:
    with o.client() as c:
        t = c.get_task(name)
    _task_out(o, t)
    return EXIT_OK


@command(tasks_app, "delete", "delete a task, its versions and its examples", client=True)
def tasks_delete(o: Opts, name: NameArg) -> int:
    with o.client() as c:
        deleted = c.delete_task(name)
    if o.json:
        print_json({"deleted": deleted})
    else:
        echo(f"deleted {deleted}")
    return EXIT_OK


@command(tasks_app, "versions", "a task's stored path versions (* marks the one served)", client=True)
def tasks_versions(o: Opts, name: NameArg) -> int:
    with o.client() as c:
        v = c.list_versions(name)
    if o.json:
        print_json(v)
    else:
        print_versions(v)
    return EXIT_OK


@command(tasks_app, "rollback", "serve an earlier version again", client=True)
def tasks_rollback(
    o: Opts,
    name: NameArg,
    version: Annotated[int, typer.Option(help="version to serve (0: the one before the current)")] = 0,
    policy: Annotated[Policy | None, typer.Option(help="the task's policy afterwards (default frozen: evolution "
                                                       "does not undo the rollback)", show_default=False)] = None,
) -> int:
    with o.client() as c, status(f"rolling {name} back"):
        t = c.rollback(name, version, policy=policy or "")
    _task_out(o, t, f"task {t.name} now serves version {t.current_version}; policy {t.policy}")
    return EXIT_OK


@command(tasks_app, "policy", "set a task's promotion policy and evolution settings", client=True)
def tasks_policy(
    o: Opts,
    name: NameArg,
    policy: Annotated[Policy | None, typer.Argument(help="auto: evolution promotes; approve: a better candidate "
                                                         "waits for `tasks promote`; frozen: no evolution "
                                                         "(default: unchanged)", show_default=False)] = None,
    candidates: Annotated[int | None, typer.Option(help="candidates per generation (0: the server's)",
                                                   show_default=False)] = None,
    budget: Annotated[float | None, typer.Option(help="seconds per candidate (0: the server's)",
                                                 show_default=False)] = None,
    scale_base: Annotated[float | None, typer.Option(help="scale control base in (0, 1] (0: the server's)",
                                                     show_default=False)] = None,
) -> int:
    with o.client() as c:
        t = c.set_task_policy(name, policy or "", candidates_per_generation=candidates,
                              candidate_budget_seconds=budget, scale_base=scale_base)
    _task_out(o, t, describe_policy(t))
    return EXIT_OK


VersionArg = Annotated[int, typer.Argument(help="a kept path version (see `munet tasks versions NAME`)")]


@command(tasks_app, "promote", "serve a pending (or any kept) version", client=True)
def tasks_promote(o: Opts, name: NameArg, version: VersionArg) -> int:
    with o.client() as c, status(f"promoting {name} v{version}"):
        t = c.promote(name, version)
    _task_out(o, t, f"task {t.name} now serves version {t.current_version}")
    return EXIT_OK


@command(tasks_app, "reject", "refuse a pending version", client=True)
def tasks_reject(
    o: Opts,
    name: NameArg,
    version: VersionArg,
    reason: Annotated[str, typer.Option(help="why, kept with the version", show_default=False)] = "",
) -> int:
    with o.client() as c:
        t = c.reject(name, version, reason)
    _task_out(o, t, f"task {t.name}: version {version} rejected; serving {t.current_version}")
    return EXIT_OK


# ---- examples, predict --------------------------------------------------------------------------

TaskOption = Annotated[str, typer.Option("--task", help="the task's name")]


@command(examples_app, "add", "add examples from a local .npz, or image files with one --label", client=True)
def examples_add(
    o: Opts,
    task: TaskOption,
    images: Annotated[list[str] | None, typer.Argument(metavar="IMAGE", help="image files (PNG, JPEG, ... "
                                                       "any size), all of class --label", show_default=False)] = None,
    upload: Annotated[Path | None, typer.Option(metavar="LOCAL.npz", help="a local .npz (x, y[, split]) to "
                                                                          "stream")] = None,
    label: Annotated[str | None, typer.Option(help="label (index or name) of every image given")] = None,
    split: Annotated[Literal["auto", "train", "validation", "test"],
                     typer.Option(help="split of the images given (auto: the server's choice)")] = "auto",
) -> int:
    if upload is not None and images:
        raise typer.BadParameter("give either --upload FILE.npz or images with --label, not both")
    if upload is None and not images:
        raise typer.BadParameter("nothing to add: give --upload FILE.npz or image files with --label")
    if images and label is None:
        raise typer.BadParameter("images need --label (an index or a label name)")
    with o.client() as c:
        if upload is not None:
            x, y, sp, _ = load_npz(upload)
        else:
            x, y, sp = images_as_examples(c, task, images or [], label or "", split)
        r = c.add_examples(task, x, y, sp)
    if o.json:
        print_json(r)
    else:
        echo(f"added {r.added} examples to {r.task} ({r.train} train, {r.validation} validation, {r.test} test); "
             f"{r.total_examples} in all")
    return EXIT_OK


@command(app, "predict", "classify image files", client=True)
def predict(
    o: Opts,
    task: TaskOption,
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="image files (PNG, JPEG, ... any size)")],
    top_k: Annotated[int, typer.Option(help="labels per image, best first")] = 1,
    version: Annotated[int, typer.Option(help="a kept path version to answer with (0: the current one)")] = 0,
) -> int:
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    with o.client() as c:
        r = c.predict(task, images, top_k=top_k, version=version)
    if o.json:
        print_json({"task": r.task, "version": r.version,
                    "predictions": [{"image": img, "top": p} for img, p in zip(images, r.predictions, strict=True)]})
        return EXIT_OK
    echo(f"task {r.task}, version {r.version}")
    for img, p in zip(images, r.predictions, strict=True):
        echo(f"{img}: " + ", ".join(f"{s.label} ({s.probability:.3f})" for s in p))
    return EXIT_OK


# ---- evolution ----------------------------------------------------------------------------------


@command(app, "evolve", "run an evolution generation now (and watch it with --wait)", client=True)
def evolve(
    o: Opts,
    task: Annotated[str | None, typer.Option(help="task to evolve (default: the scheduler's next pick)",
                                             show_default=False)] = None,
    candidates: Annotated[int, typer.Option(help="candidates to train (0: the configured number)")] = 0,
    budget: Annotated[float, typer.Option(help="seconds per candidate (0: the configured budget)")] = 0.0,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the generation ends")] = False,
    generations: Annotated[int, typer.Option(help="run this many generations, one after another")] = 1,
    plot: Annotated[str | None, typer.Option(metavar="PNG", help="write a plot of the score per generation "
                                                                 "(implies --wait)")] = None,
) -> int:
    wait = wait or generations > 1 or bool(plot)
    reports = []
    with o.client() as c:
        for _ in range(max(1, generations)):
            before = c.evolution_status().generations if wait else 0
            s = c.trigger_evolution(task or "", candidates, budget, wait=False)
            if wait:
                s = _watch(c, s, before)
                if s.recent and s.generations > before:
                    reports.append(s.recent[-1])
    if plot:
        plot_generations(reports, plot)
    if o.json:
        print_json({"status": s, "generations": reports, "plot": plot})
        return EXIT_OK
    print_status(s)
    if plot:
        echo(f"wrote {plot}")
    return EXIT_OK


def _watch(c: Any, s: Any, generations_before: int, poll_s: float = 0.5, start_timeout_s: float = 30.0) -> Any:
    """Poll GetEvolutionStatus until the triggered generation ends, with a bar over its candidates.

    Done when none is running and one ran (or finished) since the trigger; a trigger whose job never
    starts (the task was deleted meanwhile) gives up after `start_timeout_s`.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = stderr_console()
    t0, seen_running = time.monotonic(), False
    # a bar only on a terminal; piped output gets the final table alone
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        job = bar.add_task("waiting for the generation to start", total=s.candidates_total or None)
        while True:
            if s.running:
                seen_running = True
                text = f"evolving {s.current_task}" + (" (paused for serving load)" if s.paused_for_load else "")
                bar.update(job, description=escape(text), total=s.candidates_total or None,
                           completed=s.candidates_done)
            elif seen_running or s.generations > generations_before or time.monotonic() - t0 > start_timeout_s:
                return s
            time.sleep(poll_s)
            s = c.evolution_status()


@command(evolution_app, "status", "the running generation and recent reports", client=True)
def evolution_status(o: Opts) -> int:
    with o.client() as c:
        s = c.evolution_status()
    if o.json:
        print_json(s)
    else:
        print_status(s)
    return EXIT_OK


@command(app, "health", "grpc.health.v1 check (exit 0 when SERVING, 5 otherwise)", client=True)
def health(o: Opts, service: Annotated[str, typer.Option(help='service name ("" is the whole server)')] = "") -> int:
    with o.client() as c:
        state = c.health(service)
    if o.json:
        print_json({"service": service, "status": state})
    else:
        echo(state)
    return EXIT_OK if state == "SERVING" else EXIT_UNAVAILABLE


# ---- entry point --------------------------------------------------------------------------------


def _error(message: str, code: int) -> int:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run `munet` with `argv` (default sys.argv[1:]); returns the exit status (see EXIT_CODES)."""
    from munet.client import MunetClientError

    args = list(sys.argv[1:] if argv is None else argv)
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name="munet", standalone_mode=False)
        return rv if isinstance(rv, int) else EXIT_OK
    except typer.Abort:
        return _error("aborted", EXIT_ERROR)
    except typer.Exit as e:
        return e.exit_code
    except MunetClientError as e:
        return _error(f"{e.code}: {e.message}", EXIT_CODES.get(e.code, EXIT_ERROR))
    except CliError as e:
        return _error(str(e), e.exit_code)
    except ConfigError as e:
        return _error(str(e), EXIT_INVALID)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback, unless asked for
        exit_code = getattr(e, "exit_code", None)
        if isinstance(exit_code, int) and hasattr(e, "format_message"):  # click's own: usage errors (2), ...
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            return _error(e.format_message() + where, exit_code)
        if isinstance(e, ValueError | OSError):  # local problems: a bad file, an array of the wrong shape
            return _error(str(e), EXIT_INVALID)
        if os.environ.get("MUNET_DEBUG"):
            raise
        return _error(f"{type(e).__name__}: {e} (MUNET_DEBUG=1 shows the traceback)", EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
