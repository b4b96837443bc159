"""The README's examples run as written.

Every fenced code block in README.md right after a line `<!-- tested ... -->` is run, one command at a
time (a line ending in a backslash continues on the next; comment-only lines are skipped), with bash
and pipefail, against a fresh `munet serve` (the small ViT root, the demo task on, as `make run` on
an empty store). Each must exit 0. The commands run in a scratch folder that links the checkout's
`.venv`, `docs` and `deploy`, so relative paths work as they do from the repository root, with
MUNET_TARGET / MUNET_HOME pointing at the test server and `localhost:3000` / `localhost:50051`
rewritten to its ports. Blocks without the marker (`make run`, which starts a server itself,
examples that need files of your own) are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_lifecycle import Server

from munet.client import MunetClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LINKED = (".venv", "docs", "deploy")
_BLOCK = re.compile(r"^<!-- tested\b[^\n]*-->[ \t]*\n```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def readme_commands(text: str) -> list[str]:
    """The commands of the marked blocks, continuation lines joined, in README order."""
    commands = []
    for block in _BLOCK.findall(text):
        current = ""
        for line in block.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1].rstrip() + " "
                continue
            commands.append(current + line.strip())
            current = ""
        assert not current, f"a marked block ends in a continuation line: {current!r}"
    return commands


def test_the_marker_convention():
    text = ("<!-- tested -->\n```\na --x \\\n  --y  # z\n\n# only a comment\nb | c\n```\n"
            "```\nnot run\n```\n<!-- tested: why -->\n```sh\nd\n```\n")
    assert readme_commands(text) == ["a --x --y  # z", "b | c", "d"]


def test_try_it_has_tested_examples_using_the_sample_images():
    text = README.read_text()
    try_it = text[text.index("## Try it"):text.index("\n## ", text.index("## Try it") + 1)]
    commands = readme_commands(try_it)
    assert len(commands) >= 5
    samples = {m for c in commands for m in re.findall(r"docs/samples/[\w./-]+", c)}
    assert samples, "the Try-it examples use no sample image"
    for s in samples:
        assert (REPO / s).exists(), s


def _wait_for_demo_task(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception), MunetClient(server.target, timeout=5) as c:
            if any(t.name == "digits-demo" and t.current_version for t in c.list_tasks()):
                return
        time.sleep(0.5)
    pytest.fail("the demo task was not registered: " + (server.home / "serve.log").read_text()[-3000:])


@pytest.mark.timeout(900)
def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands(README.read_text())
    assert commands
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    # MUNET_README_ROOT=mobilenet_v2_imagenet runs them on `make run`'s default root (minutes, not seconds)
    server = Server(home, MUNET_DEMO_TASK="1", MUNET_ROOT=os.environ.get("MUNET_README_ROOT", "vit_tiny"))
    try:
        server.wait_up()
        _wait_for_demo_task(server)
        env = {**os.environ, "MUNET_TARGET": server.target, "MUNET_HOME": str(home)}
        env.pop("MUNET_TOKEN", None)
        ran = []
        for command in commands:
            run = (command.replace("localhost:3000", f"127.0.0.1:{server.http}")
                   .replace("localhost:50051", server.target))
            t0 = time.monotonic()
            r = subprocess.run(["bash", "-o", "pipefail", "-c", run], cwd=work, env=env, capture_output=True,
                               text=True, timeout=180)
            ran.append(f"{time.monotonic() - t0:5.1f} s  {command[:100]}")
            assert r.returncode == 0, (f"README command failed (exit {r.returncode}): {command}\n"
                                       f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}")
        print("\n".join(ran))
        # what the dashboard and alert rules read is there under the names they use
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        for series in ("munet_requests_total{", "munet_request_latency_seconds_bucket{", "munet_queue_depth",
                       "munet_path_version{"):
            assert series in text, series
    finally:
        server.stop()
