"""The `munet` command line: --json on every command, --version, exit codes by error class, help on
every option, and configuration (config file, env, flags) through pydantic-settings."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import socket
from typing import TYPE_CHECKING

import numpy as np
import pytest
import typer
from PIL import Image

from munet.cli import EXIT_CODES, app
from munet.cli import main as cli_main
from munet.config import Config, ConfigError, settings_info
from munet.data.builtin import load_builtin

if TYPE_CHECKING:  # imported for real by pytest_plugins (an earlier import would skip assert rewriting)
    from grpc_fixtures import Served

pytest_plugins = ["grpc_fixtures"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_munet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MUNET_* settings must not leak into these tests."""
    import os

    for k in list(os.environ):
        if k.startswith("MUNET_"):
            monkeypatch.delenv(k)


# ---- no server needed ---------------------------------------------------------------------------


def test_version(capsys) -> None:
    from importlib.metadata import version

    rc, out, err = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"munet-serve {version('munet-serve')}" and err == ""
    for argv in (["--json", "--version"], ["--version", "--json"]):
        rc, out, _ = _run(capsys, *argv)
        assert rc == 0 and json.loads(out) == {"name": "munet-serve", "version": version("munet-serve")}


def _options(cmd, path=()):
    """(command path, click option) for every option of every command."""
    for p in cmd.params:
        if p.param_type_name == "option":
            yield " ".join(path), p
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _options(sub, (*path, name))


def test_every_option_has_help_beyond_an_env_var_name() -> None:
    options = list(_options(typer.main.get_command(app), ("munet",)))
    assert len(options) > 100
    serve = [o for path, o in options if path == "munet serve"]
    assert {o.name for o in serve} >= {f.name for f in dataclasses.fields(Config)}
    for path, o in options:
        text = re.sub(r"\s*\\?\[env [A-Z_]+; default .*\]$", "", o.help or "")
        assert len(text) >= 8 and not re.fullmatch(r"(env )?MUNET_\w+", text), (path, o.opts, o.help)
    for s in settings_info():  # every Config field documents itself
        assert len(s.help) >= 8, s.name


def test_help_exits_0_and_usage_errors_exit_2_in_one_line(capsys) -> None:
    rc, out, _ = _run(capsys, "serve", "--help")
    assert rc == 0 and "--grpc-port" in out and "MUNET_GRPC_PORT" in out
    for argv in (["tasks", "get"], ["no-such-command"], ["tasks", "policy", "t", "sometimes"],
                 ["tasks", "register", "t"], ["predict", "--task", "t", "--top-k", "many", "x.png"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)


def test_unavailable_server_exits_5(capsys) -> None:
    target = f"127.0.0.1:{_free_port()}"  # nothing listens there
    for argv in (["tasks", "list"], ["evolution", "status", "--json"], ["health"]):
        rc, out, err = _run(capsys, "--target", target, "--timeout", "3", *argv)
        assert rc == 5 and out == "", argv
        assert err.startswith("error: UNAVAILABLE: ") and len(err.strip().splitlines()) == 1


def test_roots_list_json(tmp_path, capsys) -> None:
    rc, out, _ = _run(capsys, "roots", "list", "--home", str(tmp_path), "--json")
    roots = {r["name"]: r for r in json.loads(out)}
    assert rc == 0 and {"mobilenet_v2_imagenet", "vit_tiny"} <= set(roots)
    rc, out, _ = _run(capsys, "--json", "roots", "list", "--home", str(tmp_path))  # --json before the command
    assert rc == 0 and {r["name"] for r in json.loads(out)} == set(roots)
    rc, out, _ = _run(capsys, "roots", "list", "--home", str(tmp_path))
    assert rc == 0 and out.splitlines()[0].split()[0] == "ROOT" and "vit_tiny" in out


def test_roots_import_of_a_missing_checkpoint_is_invalid_input(tmp_path, capsys) -> None:
    rc, out, err = _run(capsys, "roots", "import", "x", str(tmp_path / "none.pth"), "--format", "timm-vit",
                        "--home", str(tmp_path), "--json")
    assert rc == 4 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ---- configuration ------------------------------------------------------------------------------


def test_config_precedence_flag_env_file_default(tmp_path) -> None:
    f = tmp_path / "munet.toml"
    f.write_text('grpc_port = 1111\nhttp_port = 2222\nmax_batch_size = 7\nseed = 5\nproviders = ["A", "B"]\n'
                 'home = "/srv/munet"\n')
    env = {"MUNET_GRPC_PORT": "3333", "MUNET_HTTP_PORT": "4444", "MUNET_MAX_BATCH_SIZE": "9"}
    cfg = Config.from_env(env=env, config_file=f, grpc_port="5555")
    assert (cfg.grpc_port, cfg.http_port, cfg.max_batch_size, cfg.seed) == (5555, 4444, 9, 5)
    assert cfg.providers == ["A", "B"] and str(cfg.home) == "/srv/munet" and cfg.decode_threads == 2
    # MUNET_CONFIG names the file when no config_file is given
    assert Config.from_env(env={"MUNET_CONFIG": str(f)}).grpc_port == 1111
    assert Config.from_env(env={}).grpc_port == 50051


def test_config_env_values_keep_their_old_forms() -> None:
    cfg = Config.from_env(env={"MUNET_PROVIDERS": "CPUExecutionProvider", "MUNET_DEMO_TASK": "0",
                               "MUNET_ACCESS_LOG": "off", "MUNET_TLS_CERT": "", "MUNET_MAX_DELAY_MS": "5",
                               "MUNET_HOME": "/tmp/h", "MUNET_TARGET": "not-a-setting:1"})
    assert cfg.providers == ["CPUExecutionProvider"] and cfg.demo_task is False and cfg.access_log is False
    assert cfg.tls_cert is None and cfg.max_delay_ms == 5.0 and str(cfg.home) == "/tmp/h"
    assert Config.from_env(env={"MUNET_PROVIDERS": "A, B"}).providers == ["A", "B"]
    # the worker's copy: to_env recreates it, and it pickles (the evolution worker gets it over a socket)
    assert Config.from_env(env=cfg.to_env()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0 and dataclasses.asdict(cfg)["seed"] == 0
    assert Config.from_env(env={}, home=None, seed=None) == Config()  # None overrides are ignored


def test_config_errors_name_the_setting_and_its_source(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"grpc_port = 'abc' \(from MUNET_GRPC_PORT\)"):
        Config.from_env(env={"MUNET_GRPC_PORT": "abc"})
    with pytest.raises(ConfigError, match=r"max_delay_ms = 'x' \(from --max-delay-ms\)"):
        Config.from_env(env={}, max_delay_ms="x")
    f = tmp_path / "munet.toml"
    f.write_text('grpc_prot = 1\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'grpc_prot' in config file"):
        Config.from_env(env={}, config_file=f)
    f.write_text('demo_task = "perhaps"\n')
    with pytest.raises(ConfigError, match=r"demo_task = 'perhaps' \(from config file"):
        Config.from_env(env={}, config_file=f)
    f.write_text('grpc_port = \n')
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_env(env={}, config_file=f)
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_env(env={}, config_file=tmp_path / "missing.toml")


def test_serve_check_json_shows_the_precedence(tmp_path, monkeypatch, capsys) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    f = tmp_path / "munet.toml"
    f.write_text(f'home = "{tmp_path / "home"}"\ngrpc_port = 1\nhttp_port = 2\nseed = 5\nmax_batch_size = 7\n')
    monkeypatch.setenv("MUNET_HTTP_PORT", str(http_port))
    monkeypatch.setenv("MUNET_GRPC_PORT", "3")
    monkeypatch.setenv("MUNET_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("MUNET_ADMIN_TOKEN", "s3cret")
    rc, out, err = _run(capsys, "serve", "--config", str(f), "--grpc-port", str(grpc_port), "--check", "--json")
    assert rc == 0, err
    r = json.loads(out)
    s = r["settings"]
    assert (s["grpc_port"], s["http_port"], s["max_batch_size"], s["seed"], s["decode_threads"]) == \
        (grpc_port, http_port, 9, 5, 2)
    assert s["admin_token"] == "***" and "s3cret" not in out and r["protected"] is True
    assert r["grpc"] == f"127.0.0.1:{grpc_port}" and r["config_file"] == str(f)
    # the same through MUNET_CONFIG and the global --config, plain text
    monkeypatch.setenv("MUNET_CONFIG", str(f))
    rc, out, _ = _run(capsys, "serve", "--grpc-port", str(grpc_port), "--check")
    assert rc == 0 and "  seed = 5" in out and f"  grpc_port = {grpc_port}" in out
    monkeypatch.delenv("MUNET_CONFIG")
    rc, out, _ = _run(capsys, "--config", str(f), "serve", "--grpc-port", str(grpc_port), "--check", "--json")
    assert rc == 0 and json.loads(out)["settings"]["seed"] == 5


def test_serve_refuses_a_bad_setting_in_one_line_with_status_4(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MUNET_HOME", str(tmp_path))
    monkeypatch.setenv("MUNET_GRPC_PORT", "abc")
    rc, out, err = _run(capsys, "serve", "--check")
    assert rc == 4 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: invalid setting grpc_port = 'abc' (from MUNET_GRPC_PORT)")
    monkeypatch.delenv("MUNET_GRPC_PORT")
    rc, _, err = _run(capsys, "serve", "--http-port", "3.5", "--check")
    assert rc == 4 and "--http-port" in err
    f = tmp_path / "bad.toml"
    f.write_text("no_such_setting = 1\n")
    rc, _, err = _run(capsys, "serve", "--config", str(f), "--check")
    assert rc == 4 and "unknown setting 'no_such_setting'" in err


# ---- against a running server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("images")
    x = load_builtin("uci_digits", max_examples=4, seed=1).x
    paths = []
    for i, img in enumerate(x):
        (d / f"{i}.png").write_bytes(_png(img))
        paths.append(str(d / f"{i}.png"))
    return paths


def test_every_client_command_prints_parseable_json(served: Served, images, tmp_path, capsys) -> None:
    def js(*argv: str):
        rc, out, err = _run(capsys, "--target", served.target, *argv)
        assert rc == 0, (argv, err)
        return json.loads(out)

    t = js("tasks", "register", "cli-json", "--builtin", "uci_digits", "--max-examples", "300", "--json")
    assert t["name"] == "cli-json" and t["current_version"] == 1 and t["labels"] == [str(d) for d in range(10)]
    assert "cli-json" in {x["name"] for x in js("tasks", "list", "--json")}
    assert js("--json", "tasks", "list")  # --json before the command
    assert js("tasks", "get", "cli-json", "--json")["path"]["version"] == 1
    p = js("predict", "--task", "cli-json", "--top-k", "2", *images, "--json")
    assert p["task"] == "cli-json" and [q["image"] for q in p["predictions"]] == images
    assert set(p["predictions"][0]["top"][0]) == {"label", "index", "probability"}
    r = js("examples", "add", "--task", "cli-json", "--label", "3", "--split", "train", images[0], "--json")
    assert (r["added"], r["train"]) == (1, 1)
    npz = tmp_path / "more.npz"
    ds = load_builtin("uci_digits", max_examples=20, seed=2)
    np.savez(npz, x=ds.x, y=ds.y)
    assert js("examples", "add", "--task", "cli-json", "--upload", str(npz), "--json")["added"] == 20
    assert js("tasks", "policy", "cli-json", "approve", "--candidates", "1", "--json")["policy"] == "approve"

    for _ in range(3):  # a candidate is kept (pending) only when it beats the incumbent by the margin
        e = js("evolve", "--task", "cli-json", "--candidates", "1", "--budget", "2", "--wait", "--json")
        assert e["status"]["running"] is False and len(e["generations"]) == 1 and e["plot"] is None
        assert e["generations"][0]["task"] == "cli-json"
        v = js("tasks", "versions", "cli-json", "--json")
        current = v["current_version"]
        others = [x["version"] for x in v["versions"] if x["version"] != current]
        if others:
            break
    assert others, v  # the better candidate is kept, pending approval
    assert js("tasks", "rollback", "cli-json", "--version", str(current), "--json")["policy"] == "frozen"
    assert js("tasks", "promote", "cli-json", str(current), "--json")["current_version"] == current
    assert js("tasks", "reject", "cli-json", str(others[-1]), "--reason", "test", "--json")["name"] == "cli-json"
    s = js("evolution", "status", "--json")
    assert s["generations"] >= 1 and isinstance(s["recent"], list)
    assert js("health", "--json") == {"service": "", "status": "SERVING"}
    assert js("tasks", "delete", "cli-json", "--json") == {"deleted": "cli-json"}


def test_exit_codes_by_error_class(served: Served, images, tmp_path, capsys) -> None:
    def fails(*argv: str) -> tuple[int, str]:
        rc, out, err = _run(capsys, *argv, "--target", served.target)  # client options after the command too
        assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
        return rc, err

    rc, err = fails("tasks", "get", "no-such-task", "--json")
    assert rc == 3 and err.startswith("error: NOT_FOUND: ")
    assert fails("predict", "--task", "no-such-task", images[0])[0] == 3
    # invalid input: refused by the server (INVALID_ARGUMENT, ALREADY_EXISTS) or locally
    rc, err = fails("tasks", "register", "bad", "--builtin", "no_such_data_set")
    assert rc == 4 and err.startswith("error: INVALID_ARGUMENT: ")
    rc, err = fails("tasks", "register", "bad", "--from", str(tmp_path / "no-folder"))
    assert rc == 4 and "is not a folder" in err
    rc, err = fails("predict", "--task", "x", str(tmp_path / "missing.png"))
    assert rc == 4 and "no such file" in err
    assert fails("examples", "add", "--task", "x", "--upload", str(tmp_path / "missing.npz"))[0] == 4
    rc, out, _ = _run(capsys, "--target", served.target, "tasks", "register", "twice", "--builtin", "uci_digits",
                      "--max-examples", "200")
    assert rc == 0
    try:
        rc, err = fails("tasks", "register", "twice", "--builtin", "uci_digits", "--max-examples", "200")
        assert rc == 4 and err.startswith("error: ALREADY_EXISTS: ")
        rc, err = fails("tasks", "policy", "twice", "--scale-base", "5")
        assert rc == 4 and err.startswith("error: INVALID_ARGUMENT: ")
        rc, err = fails("tasks", "rollback", "twice")  # nothing earlier to serve
        assert rc == 4 and err.startswith("error: FAILED_PRECONDITION: ")
    finally:
        served.client.delete_task("twice")
    assert EXIT_CODES["RESOURCE_EXHAUSTED"] == EXIT_CODES["DEADLINE_EXCEEDED"] == 5


def test_register_from_an_image_folder(served: Served, tmp_path, capsys) -> None:
    ds = load_builtin("uci_digits", max_examples=60, seed=3)
    for i, (img, y) in enumerate(zip(ds.x, ds.y, strict=True)):
        d = tmp_path / "folder" / ("low" if y < 5 else "high")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(_png(img))
    rc, out, err = _run(capsys, "tasks", "register", "folder", "--from", str(tmp_path / "folder"),
                        "--target", served.target)
    try:
        assert rc == 0, err
        assert out.startswith("task folder (") and "labels (2): high, low" in out
        t = served.client.get_task("folder")
        assert t.labels == ["high", "low"] and t.train_examples + t.validation_examples + t.test_examples == 60
    finally:
        served.client.delete_task("folder")
