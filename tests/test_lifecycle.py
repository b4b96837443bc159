"""The shipped process's life: two servers on one host keep their own metrics, kill -9 of the
supervisor frees the ports, and a taken port is one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from munet.client import MunetClient

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Server:
    def __init__(self, home, http: int | None = None, grpc: int | None = None, log: str = "serve.log", **env):
        self.home = home
        self.http, self.grpc = http or _free_port(), grpc or _free_port()
        self.env = {**os.environ, "MUNET_HOME": str(home), "MUNET_HTTP_PORT": str(self.http),
                    "MUNET_GRPC_PORT": str(self.grpc), "MUNET_SCHEDULER_ENABLED": "0", "MUNET_DEMO_TASK": "0",
                    "MUNET_ROOT": "vit_tiny", "BENTOML_DO_NOT_TRACK": "True", **env}
        self.log_path = home / log
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "munet.cli", "serve"], env=self.env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=self.log)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            # a fresh channel each time: one that failed early backs off for longer and longer
            with contextlib.suppress(Exception), MunetClient(self.target, timeout=2) as c:
                if c.health() == "SERVING":
                    return
            time.sleep(0.5)
        pytest.fail("server did not come up: " + self.log_path.read_text()[-3000:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=30) as r:
            return r.read().decode()

    def kill(self) -> None:
        """kill -9 of the whole process group: no shutdown hook runs."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def test_two_servers_keep_their_metrics_and_kill_9_of_a_supervisor_frees_its_ports(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = Server(tmp_path / "a"), Server(tmp_path / "b")
    try:
        a.wait_up()
        b.wait_up()
        with MunetClient(a.target) as ca, MunetClient(b.target) as cb:
            ca.register_task("only-on-a", builtin="uci_digits", max_examples=200)
            cb.register_task("only-on-b", builtin="uci_digits", max_examples=200)
            ca.predict("only-on-a", [np.zeros((8, 8), np.uint8)])
            cb.predict("only-on-b", [np.zeros((8, 8), np.uint8)])
        ma, mb = a.metrics(), b.metrics()
        assert 'task="only-on-a"' in ma and 'task="only-on-b"' not in ma
        assert 'task="only-on-b"' in mb and 'task="only-on-a"' not in mb

        # the supervisor dies without a chance to clean up; its worker must not live on as an orphan
        os.kill(a.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (_bindable(a.http) and _bindable(a.grpc)):
            time.sleep(0.5)
        assert _bindable(a.http) and _bindable(a.grpc), "an orphaned worker still holds the ports"
        with MunetClient(b.target) as cb:  # the other server never noticed
            assert cb.predict("only-on-b", [np.zeros((8, 8), np.uint8)]).version == 1
        # a restart on the same store serves what was acknowledged
        a2 = Server(tmp_path / "a", http=a.http, grpc=a.grpc)
        try:
            a2.wait_up()
            with MunetClient(a2.target) as c:
                assert [t.name for t in c.list_tasks()] == ["only-on-a"]
        finally:
            a2.stop()
    finally:
        a.stop()
        b.stop()


def test_a_taken_port_is_one_clear_line_and_a_non_zero_exit(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "MUNET_HOME": str(tmp_path), "MUNET_HTTP_PORT": str(port),
               "MUNET_GRPC_PORT": str(_free_port()), "MUNET_DEMO_TASK": "0"}
        r = subprocess.run([sys.executable, "-m", "munet.cli", "serve"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is taken" in lines[0] and str(port) in lines[0], r.stderr


def _kill_all(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)  # supervisor and worker at once: a power cut
    server.proc.wait(30)
    server.log.close()


def _files(home, sub: str) -> set[str]:
    return {str(p.relative_to(home)) for p in (home / sub).rglob("*") if p.is_file()}


def test_kill_9_during_registration_and_evolution_loses_nothing_acknowledged(tmp_path):
    import sqlite3
    import threading

    home = tmp_path / "s"
    home.mkdir()
    s = Server(home, MUNET_GC_MIN_AGE_S="0")
    s.wait_up()
    with MunetClient(s.target, long_timeout=120) as c:
        c.register_task("kept", builtin="uci_digits", max_examples=300)
        before = c.predict("kept", [np.zeros((8, 8), np.uint8)])
        c.add_examples("kept", np.zeros((4, 8, 8), np.uint8), [1, 2, 3, 4])
        acknowledged = c.get_task("kept")
    # 1. killed while a registration streams and trains
    def register_unfinished() -> None:
        with contextlib.suppress(Exception), MunetClient(s.target, long_timeout=60) as c:
            c.register_task("unfinished", builtin="animal_shapes", max_examples=5000)

    worker = threading.Thread(target=register_unfinished, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (home / "tasks" / "unfinished").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    _kill_all(s)
    worker.join(5)

    # 2. restart, then killed in the middle of a generation (training, maybe storing or promoting)
    s = Server(home, http=s.http, grpc=s.grpc, MUNET_GC_MIN_AGE_S="0")
    s.wait_up()
    with MunetClient(s.target) as c:
        assert [t.name for t in c.list_tasks()] == ["kept"]  # the unacknowledged registration is gone
        c.trigger_evolution("kept", candidates=6, budget_seconds=30.0)
    time.sleep(4.0)
    _kill_all(s)

    with sqlite3.connect(home / "munet.db") as db:
        pointer = db.execute("SELECT current_version FROM tasks WHERE name='kept'").fetchone()[0]
    s = Server(home, http=s.http, grpc=s.grpc, MUNET_GC_MIN_AGE_S="0")
    try:
        s.wait_up()
        with sqlite3.connect(home / "munet.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            referenced = set()
            for (mods,) in db.execute("SELECT modules FROM path_versions"):
                referenced.update(json.loads(mods))
            rows = {r[0] for r in db.execute("SELECT id FROM modules")}
            example_files = {r[0] for r in db.execute("SELECT file FROM example_batches")}
        with MunetClient(s.target) as c:
            t = c.get_task("kept")
            assert [x.name for x in c.list_tasks()] == ["kept"]
            assert t.current_version == pointer  # the last promoted version serves, whatever the crash hit
            total = t.train_examples + t.validation_examples + t.test_examples
            assert total == acknowledged.train_examples + acknowledged.validation_examples + acknowledged.test_examples
            # the version acknowledged before the crashes answers as it did, current or kept behind a promotion
            again = c.predict("kept", [np.zeros((8, 8), np.uint8)], version=before.version)
            assert again.version == before.version and again.predictions == before.predictions
        # nothing half-written is left: every module folder has its row, every example file its batch
        assert {p.split("/")[1] for p in _files(home, "modules")} <= rows
        assert _files(home, "tasks") == example_files
        assert not list(home.rglob(".*.tmp"))
        assert not (home / "tasks" / "unfinished").exists()
        assert referenced <= rows
    finally:
        s.stop()


def test_sigterm_stops_gracefully_even_during_a_generation(tmp_path):
    s = Server(tmp_path)
    s.wait_up()
    with MunetClient(s.target) as c:
        c.register_task("busy", builtin="uci_digits", max_examples=300)
        c.trigger_evolution("busy", candidates=8, budget_seconds=60.0)  # minutes of work, abandoned
        assert c.evolution_status().running or c.evolution_status().candidates_total
    time.sleep(1.0)
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    s.proc.wait(60)
    stopped_in = time.monotonic() - t0
    assert stopped_in < 30, stopped_in  # the running generation did not hold the shutdown
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (_bindable(s.http) and _bindable(s.grpc)):
        time.sleep(0.2)
    assert _bindable(s.http) and _bindable(s.grpc)
    s.log.close()
    again = Server(tmp_path, http=s.http, grpc=s.grpc)
    try:
        again.wait_up()
        with MunetClient(again.target) as c:
            assert c.get_task("busy").current_version >= 1
    finally:
        again.stop()


def test_a_restart_never_removes_a_registration_another_process_is_running(make_app, tmp_path):
    import socket as _socket

    app = make_app(home=tmp_path / "shared", gc_min_age_s=600.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"host": _socket.gethostname(), "pid": sleeper.pid}
        app.store.create_task("in-progress", ["a", "b"], {"kind": "upload", "owner": live})
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        app.store.create_task("crashed", ["a", "b"], {"kind": "upload", "owner": {**live, "pid": dead.pid}})
        app.store.create_task("elsewhere", ["a", "b"], {"kind": "upload", "owner": {"host": "other", "pid": 1}})
        app.core.restore()  # as a worker's restart does
        names = {t.name for t in app.store.list_tasks()}
        assert "in-progress" in names  # its registering process is alive
        assert "crashed" not in names  # its process is gone: a crash's leftover
        assert "elsewhere" in names  # another host, younger than gc_min_age_s
    finally:
        sleeper.kill()


def test_every_worker_follows_what_another_registers_and_deletes(tmp_path):


    s = Server(tmp_path, MUNET_HTTP_WORKERS="2")
    try:
        s.wait_up()
        names = [f"via-http-{i}" for i in range(4)]  # spread over both workers by the shared socket
        for name in names:
            req = urllib.request.Request(f"http://127.0.0.1:{s.http}/tasks",
                                         data=json.dumps({"name": name, "builtin": "uci_digits",
                                                          "max_examples": 200}).encode(),
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 201
        deadline = time.monotonic() + 15
        with MunetClient(s.target) as c:  # gRPC lives in worker 1
            served = set()
            while time.monotonic() < deadline and served != set(names):
                for name in set(names) - served:  # served, not just listed: loaded in worker 1
                    with contextlib.suppress(Exception):
                        if c.predict(name, [np.zeros((8, 8), np.uint8)]).version == 1:
                            served.add(name)
                time.sleep(0.5)
            assert served == set(names)
            for name in names:
                req = urllib.request.Request(f"http://127.0.0.1:{s.http}/tasks/{name}", method="DELETE")
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status == 200
            deadline = time.monotonic() + 15
            gone = set()
            while time.monotonic() < deadline and gone != set(names):
                for name in names:
                    try:
                        c.predict(name, [np.zeros((8, 8), np.uint8)])
                    except Exception:  # noqa: BLE001 - NOT_FOUND once followed
                        gone.add(name)
                time.sleep(0.5)
            assert gone == set(names)
    finally:
        s.stop()

