"""The processes `munet bench serve` measures: a BentoML server (arbiter and workers) started in its own
session, waited for, stopped for sure, and its worker's memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError


class ServerProcess:
    """A BentoML server (arbiter + spawned workers) in its own session, stopped for sure on `stop`.

    BentoML's arbiter spawns each worker as a fresh interpreter in its own session, so killing the
    arbiter's process group would not reach them: the workers are found (and remembered) as the
    arbiter's descendants and stopped by pid.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._known: dict[int, Any] = {}  # pid -> psutil.Process

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def descendants(self) -> list[Any]:
        import psutil

        if self.proc is None:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return kids

    def worker(self) -> Any:
        """The BentoML worker process (the one that holds the model), or None while it starts."""
        for k in self.descendants():
            with contextlib.suppress(Exception):  # it may just have exited
                if any("_bentoml_impl.worker" in a for a in k.cmdline()):
                    return k
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with status {self.proc.returncode if self.proc else '?'}"
                                 f" while starting; log:\n{self.log_tail()}")
            with contextlib.suppress(Exception):  # not up yet
                if check():
                    self.descendants()
                    return
            time.sleep(0.25)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, grace: float = 15.0) -> None:
        import psutil

        if self.proc is None:
            return
        self.descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)  # the arbiter stops its workers gracefully
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        left = []
        for p in self._known.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():
                    left.append(p)
        if left:
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, still = psutil.wait_procs(left, timeout=5)
            for p in still:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(still, timeout=5)
        with contextlib.suppress(Exception):
            self._log.close()
        self.proc = None


def http_ok(url: str, data: bytes | None = None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if r.status != 200:
            raise BenchError(f"{url}: HTTP {r.status}")
        return r.read()


def worker_rss(proc: Any) -> dict[str, int]:
    if proc is None:
        return {}
    out = {"rss": int(proc.memory_info().rss)}
    with contextlib.suppress(Exception):
        out["uss"] = int(proc.memory_full_info().uss)
    return out

