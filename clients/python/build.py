"""Build the `munet-client` wheel: the Python clients of munet-serve without the server.

    python clients/python/build.py [OUT_DIR]        # make client-dist: build/client/munet_client-*.whl

`pip install munet-serve` brings the server's dependencies (torch, ONNX Runtime, BentoML: about
1.8 GB), and no extra of the same distribution can leave them out. So the clients ship as a second,
small distribution, built from the same files: munet/client.py, munet/aio_client.py and the generated
munet/v1 stubs, copied into a scratch project (setuptools builds only what lies inside a project's
folder) with a minimal munet/__init__.py. Its requirements are the server's own pins of grpcio,
grpcio-health-checking, protobuf and numpy, read from the repository's pyproject.toml, so the two
never drift. The client sends image files as they are (the server decodes them): no Pillow.

It installs the same `munet` package as munet-serve (so `from munet.client import MunetClient` is the
same line everywhere): install one or the other in an environment, not both; the server includes
the clients.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAME = "munet-client"
MODULES = ("client.py", "aio_client.py")  # from munet/
STUBS = ("__init__.py", "munet_pb2.py", "munet_pb2.pyi", "munet_pb2_grpc.py")  # from munet/v1/
REQUIREMENTS = ("grpcio", "grpcio-health-checking", "protobuf", "numpy")

INIT = '"""munet-client: the Python clients of munet-serve (munet.client, munet.aio_client)."""\n'
README = """# munet-client

The Python clients of munet-serve: `munet.client.MunetClient` (synchronous) and
`munet.aio_client.AsyncMunetClient` (grpc.aio), for the `munet.v1` gRPC API, without the server's
dependencies. Built by `make client-dist` from the munet-serve repository.
"""


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements() -> list[str]:
    """The server's pins of the client's requirements (`grpcio==1.85.1`, ...)."""
    pins = {re.split(r"[=<>~!\[ ;]", d, maxsplit=1)[0].lower(): d for d in project()["dependencies"]}
    missing = [r for r in REQUIREMENTS if r not in pins]
    if missing:
        raise SystemExit(f"pyproject.toml pins none of {missing}")
    return [pins[r] for r in REQUIREMENTS]


def pyproject() -> str:
    p = project()
    deps = ",\n".join(f'    "{d}"' for d in requirements())
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{p['version']}"
description = "Python clients (sync and asyncio) for the munet-serve gRPC API, without the server"
readme = "README.md"
requires-python = "{p['requires-python']}"
dependencies = [
{deps},
]

[tool.setuptools]
packages = ["munet", "munet.v1"]

[tool.setuptools.package-data]
"munet.v1" = ["*.pyi"]
"""


def stage(into: Path) -> Path:
    """The scratch project: pyproject.toml, README.md, munet/{__init__,client,aio_client}.py, munet/v1/."""
    (into / "munet" / "v1").mkdir(parents=True)
    (into / "pyproject.toml").write_text(pyproject())
    (into / "README.md").write_text(README)
    (into / "munet" / "__init__.py").write_text(INIT)
    for m in MODULES:
        shutil.copy2(REPO / "munet" / m, into / "munet" / m)
    for s in STUBS:
        shutil.copy2(REPO / "munet" / "v1" / s, into / "munet" / "v1" / s)
    return into


def build(out: Path) -> Path:
    """Build the wheel into `out` (offline when setuptools is importable here) and return its path."""
    out = out.resolve()  # pip runs in the scratch folder
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="munet-client-") as tmp:
        src = stage(Path(tmp) / "src")
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps",
               "-w", str(out), str(src)]
        try:
            import setuptools  # noqa: F401 - the build needs nothing from an index then
            cmd.insert(-1, "--no-build-isolation")
        except ImportError:
            pass
        subprocess.run(cmd, check=True, cwd=tmp)
    version = project()["version"]
    wheel = out / f"{NAME.replace('-', '_')}-{version}-py3-none-any.whl"
    if not wheel.exists():
        raise SystemExit(f"pip wheel did not write {wheel}")
    return wheel


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "client"))
