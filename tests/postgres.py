"""A private PostgreSQL server for the test suite: its own data directory and socket in a temporary
folder, its own port number, trust authentication, gone when the session ends.

The binaries come from Debian's `postgresql` package (`make setup` installs it). initdb refuses to
run as root, so as root the server runs as the package's `postgres` user (runuser), in a folder that
user owns. Durability settings are off: the server's data lives for one test session.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

SUPERUSER = "munet"


def find_bindir() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    override = os.environ.get("MUNET_TEST_PG_BINDIR")
    if override:
        candidates = [Path(override)]
    else:
        installed = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()]
        candidates = sorted(installed, key=lambda p: int(p.parent.name), reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    raise RuntimeError("the PostgreSQL suite needs a PostgreSQL server's binaries (initdb, pg_ctl) under "
                       "/usr/lib/postgresql/<version>/bin, or MUNET_TEST_PG_BINDIR: run `make setup`, which "
                       "installs Debian's postgresql package")


def _free_port() -> int:
    # the server listens on its socket only; the port number names the socket file and is in the URL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="munet-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "run", self.root / "server.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")  # Debian's package creates it
            except KeyError:
                raise RuntimeError("running as root, the PostgreSQL suite needs the unprivileged `postgres` user "
                                   "(created by Debian's postgresql package: run `make setup`)") from None
            self.user = "postgres"
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run_as("mkdir", "-p", str(self.sockets))
        self._started = False

    def _run_as(self, *cmd: str) -> None:
        full = ["runuser", "-u", self.user, "--", *cmd] if self.user else list(cmd)
        r = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
                               f"\n{log}")

    def start(self) -> PostgresServer:
        self._run_as(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                     "-E", "UTF8", "--locale=C", "--no-sync")
        opts = (f"-p {self.port} -k {self.sockets} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB")
        self._run_as(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                     "-w", "-t", "60", "start")
        self._started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.sockets}&port={self.port}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("/")[-1].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a test may have left a store open

    def stop(self) -> None:
        try:
            if self._started:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self._run_as(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                 "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
