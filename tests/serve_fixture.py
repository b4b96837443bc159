"""The shipped process (`munet serve`: BentoML HTTP and gRPC on one core), started once per test session
by conftest's `munet_serve` for tests/test_http.py and tests/test_semantics.py, and a small HTTP client
for its routes (JSON, multipart uploads, query strings)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from munet.client import MunetClient

ADMIN = "admin-" + uuid.uuid4().hex  # the shipped process runs protected, as on a network


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Served:
    home: Path
    http: int
    grpc: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def call(self, method: str, route: str, body: dict | None = None, *, query: dict | None = None,
             fields: dict | None = None, files: list[tuple[str, bytes]] | None = None,
             token: str | None = ADMIN, headers: dict | None = None, raw: bytes | None = None
             ) -> tuple[int, object]:
        """One HTTP request: a JSON `body`, or multipart `fields` (a list value repeats the field) and
        `files` [(field, bytes)], or `raw` bytes; returns the status and the decoded JSON answer."""
        url = f"http://127.0.0.1:{self.http}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        hdrs = {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        data = raw
        if body is not None:
            data, hdrs["content-type"] = json.dumps(body).encode(), "application/json"
        elif fields is not None or files is not None:
            data, hdrs["content-type"] = multipart(fields or {}, files or [])
        req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text or b"null")
            except ValueError:
                return e.code, text.decode(errors="replace")


def multipart(fields: dict, files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for k, v in fields.items():
        for item in v if isinstance(v, list) else [v]:
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{item}\r\n'.encode())
    for i, (k, data) in enumerate(files):
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="f{i}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def serve(home: Path) -> Iterator[Served]:
    """`munet serve` on an empty store with the demo task and an admin token; yields once the demo
    task serves, and stops the whole process group afterwards."""
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "MUNET_HOME": str(home), "MUNET_HTTP_PORT": str(http_port),
           "MUNET_GRPC_PORT": str(grpc_port), "MUNET_HOST": "127.0.0.1", "MUNET_SCHEDULER_ENABLED": "0",
           "MUNET_DEMO_TASK": "1", "MUNET_ADMIN_TOKEN": ADMIN, "BENTOML_HOME": str(home / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "munet.cli", "serve"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 180
        with MunetClient(f"127.0.0.1:{grpc_port}") as c:
            while time.monotonic() < deadline:
                assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
                with contextlib.suppress(Exception):  # not up yet
                    if any(t.name == "digits-demo" for t in c.list_tasks()):
                        break
                time.sleep(1)
            else:
                pytest.fail("server did not come up: " + (home / "serve.log").read_text()[-3000:])
        yield Served(home, http_port, grpc_port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
