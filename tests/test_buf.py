"""`buf lint` and `buf breaking` on the munet.v1 proto, with the project's pinned buf (`make setup`
installs it into .tools/). Lint rules and their documented exceptions: protos/buf.yaml. The baseline of
the breaking-change check is the released proto, protos/released (git commit 0fccac4)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / ".tools/node_modules/.bin/buf"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason=f"buf is not installed at {BUF.relative_to(ROOT)}: "
                                                          "run `make setup` (it installs buf from npm)")


def _buf(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # a cache of our own: buf writes one even for local inputs, and HOME may be read-only
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")}
    return subprocess.run([str(BUF), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_buf_lint(tmp_path):
    r = _buf(tmp_path, "lint", "protos")
    assert r.returncode == 0 and not r.stdout.strip(), f"buf lint protos:\n{r.stdout}{r.stderr}"


def test_no_breaking_change_against_the_released_proto(tmp_path):
    r = _buf(tmp_path, "breaking", "protos", "--against", "protos/released")
    assert r.returncode == 0 and not r.stdout.strip(), \
        f"buf breaking protos --against protos/released:\n{r.stdout}{r.stderr}"


def test_the_checks_see_the_files(tmp_path):
    """Both inputs hold exactly the munet.v1 file (protos/inference, the KServe copy, is excluded), so a
    passing check is not a check of nothing."""
    for path in ("protos", "protos/released"):
        r = _buf(tmp_path, "ls-files", path)
        assert r.returncode == 0, r.stderr
        assert [Path(p).as_posix() for p in r.stdout.split()] == [f"{path}/munet/v1/munet.proto"], r.stdout
