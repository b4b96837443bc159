"""The `munet-client` distribution (clients/python/build.py, `make client-dist`): the clients import
nothing of the server, the wheel holds the clients and the munet.v1 stubs only and requires the
server's pins of grpcio, grpcio-health-checking, protobuf and numpy, and installed alone in a fresh
venv (its requirements from the package index) it talks to a running server, sync and async, with
torch, ONNX Runtime and BentoML neither installed nor imported."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from grpc_fixtures import Served

pytest_plugins = ["grpc_fixtures"]

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("munet_client_build", REPO / "clients" / "python" / "build.py")
client_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client_build)

CLIENT_MODULES = ("munet/client.py", "munet/aio_client.py")
# what the clients may import: the standard library, their four requirements, and each other
ALLOWED = {"grpc", "grpc_health", "google", "numpy", "munet"}
SERVER_ONLY = ("torch", "onnxruntime", "onnx", "bentoml", "PIL", "sklearn", "typer", "pydantic")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_clients_import_only_their_requirements():
    for module in CLIENT_MODULES:
        for name in _imports(REPO / module):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in ALLOWED, f"{module} imports {name}"
            if top == "munet":
                assert name in ("munet.client", "munet.v1"), f"{module} imports {name}: not in the client wheel"
    # and at run time, in a fresh interpreter of this (the server's) venv: munet/__init__.py stays light
    code = ("import json, sys; import munet.client, munet.aio_client; print(json.dumps(sorted(m for m in "
            f"sys.modules if m.split('.')[0] in {SERVER_ONLY!r} or m.startswith('munet'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                                       text=True).stdout)
    assert set(loaded) <= {"munet", "munet.client", "munet.aio_client", "munet.v1", "munet.v1.munet_pb2",
                           "munet.v1.munet_pb2_grpc"}, loaded


def test_the_wheel_requires_the_servers_pins(tmp_path):
    wheel = client_build.build(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "munet/__init__.py", "munet/client.py", "munet/aio_client.py", "munet/v1/__init__.py",
        "munet/v1/munet_pb2.py", "munet/v1/munet_pb2.pyi", "munet/v1/munet_pb2_grpc.py"}
    server = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requires = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:"))
    pins = {d.split("==")[0]: d for d in server["dependencies"]}
    assert requires == sorted(pins[n] for n in ("grpcio", "grpcio-health-checking", "protobuf", "numpy"))
    assert f"Version: {server['version']}" in metadata and "Name: munet-client" in metadata


# Run by the fresh venv's interpreter in isolated mode (-I: not this checkout, not PYTHONPATH).
SCRIPT = r"""
import asyncio, importlib.util, json, sys
import numpy as np
import munet, munet.client
from munet.client import MunetClient
from munet.aio_client import AsyncMunetClient

target = sys.argv[1]
out = {"munet": munet.__file__}
rng = np.random.default_rng(0)
x = np.concatenate([rng.integers(0, 60, (20, 8, 8)), rng.integers(190, 256, (20, 8, 8))]).astype(np.uint8)
y = [0] * 20 + [1] * 20
with MunetClient(target, timeout=60, long_timeout=300) as c:
    c.wait_ready(30)
    out["health"] = c.health()
    out["version"] = c.register_task("alone", labels=["dark", "bright"], examples=(x, y)).current_version
    r = c.predict("alone", np.full((8, 8, 3), 250, np.uint8))  # rank 3: one RGB image
    out["sync"] = [p[0].label for p in r.predictions]


async def main():
    async with AsyncMunetClient(target, timeout=60) as a:
        r = await a.predict("alone", [np.zeros((8, 8), np.uint8), np.full((8, 8), 250, np.uint8)])
        return [p[0].label for p in r.predictions], [t.name for t in await a.list_tasks()], await a.health()

out["async"], out["tasks"], out["async_health"] = asyncio.run(main())
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "onnx", "bentoml"))
out["installed"] = [m for m in ("torch", "onnxruntime", "bentoml") if importlib.util.find_spec(m)]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_client_installs_alone_and_talks_to_the_server(served: Served, tmp_path):
    wheel = client_build.build(tmp_path / "dist")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    pip = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=240)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    (tmp_path / "check.py").write_text(SCRIPT)
    run = subprocess.run([python, "-I", tmp_path / "check.py", served.target], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # the installed wheel, not this checkout
    assert Path(out["munet"]).resolve().is_relative_to(env_dir.resolve()), out["munet"]
    assert out["health"] == out["async_health"] == "SERVING"
    assert out["version"] == 1 and "alone" in out["tasks"]
    assert out["sync"] == ["bright"] and out["async"] == ["dark", "bright"]
    assert out["imported"] == [] and out["installed"] == []
