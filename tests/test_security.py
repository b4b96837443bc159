"""Bearer tokens and TLS on the gRPC server, as a client on the network meets them."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from grpc_fixtures import LoopThread, server_config

from munet.app import App
from munet.client import MunetClient, MunetClientError
from munet.service.auth import HTTPAuthMiddleware, Tokens
from munet.service.core import TaskSpec

pytestmark = pytest.mark.slow

ADMIN, READER = "admin-secret-1", "reader-secret-2"


def _serve(home, **overrides):
    app = App.build(server_config(home, **overrides))
    app.start()
    app.core.register_task(TaskSpec(name="digits", builtin="uci_digits", max_examples=200))
    loop = LoopThread()
    port = loop.run(app.start_grpc("127.0.0.1:0" if not overrides.get("tls_cert") else "localhost:0"))
    return app, loop, port


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secrets") / "admin.token"
    token_file.write_text(ADMIN + "\n")
    app, loop, port = _serve(tmp_path_factory.mktemp("sec"), admin_token_file=token_file, predict_token=READER)
    yield f"127.0.0.1:{port}"
    loop.run(app.stop())
    loop.close()


def _code(fn) -> str:
    with pytest.raises(MunetClientError) as e:
        fn()
    return e.value.code


def test_each_call_class_needs_its_token(protected):
    x = [np.zeros((8, 8), np.uint8)]
    with MunetClient(protected) as anon:
        assert anon.health() == "SERVING"  # health stays open for probes
        assert _code(lambda: anon.predict("digits", x)) == "UNAUTHENTICATED"
        assert _code(lambda: anon.delete_task("digits")) == "UNAUTHENTICATED"
    with MunetClient(protected, token=READER) as reader:
        assert reader.predict("digits", x).version == 1
        assert [t.name for t in reader.list_tasks()] == ["digits"]
        assert _code(lambda: reader.delete_task("digits")) == "PERMISSION_DENIED"
        assert _code(lambda: reader.add_examples("digits", np.zeros((2, 8, 8), np.uint8), [0, 1])) \
            == "PERMISSION_DENIED"
    with MunetClient(protected, token="nope") as wrong:
        assert _code(lambda: wrong.predict("digits", x)) == "PERMISSION_DENIED"
    with MunetClient(protected, token=ADMIN) as admin:
        assert admin.predict("digits", x).version == 1  # the admin token reads too
        assert admin.add_examples("digits", np.zeros((2, 8, 8), np.uint8), [0, 1]).added == 2
        with MunetClient(protected, token=READER) as reader:
            assert [t.name for t in reader.list_tasks()] == ["digits"]  # nothing was deleted


def _certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_with_a_fresh_certificate(tmp_path):
    cert, key = _certificate(tmp_path)
    app, loop, port = _serve(tmp_path / "home", tls_cert=cert, tls_key=key)
    try:
        with MunetClient(f"localhost:{port}", tls_ca=cert) as c:
            assert c.predict("digits", [np.zeros((8, 8), np.uint8)]).version == 1
        with MunetClient(f"localhost:{port}", timeout=3) as plain:  # plaintext to a TLS port: refused
            assert _code(lambda: plain.list_tasks()) == "UNAVAILABLE"
    finally:
        loop.run(app.stop())
        loop.close()


def test_http_middleware_refuses_before_the_app_runs():
    import asyncio

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    def call(method, path, auth=None, tokens=Tokens(admin=ADMIN)):
        headers = [(b"authorization", auth.encode())] if auth else []
        sent.clear()
        mw = HTTPAuthMiddleware(app, tokens)
        asyncio.run(mw({"type": "http", "method": method, "path": path, "headers": headers}, receive, send))
        return sent[0]["status"] if sent else 200

    # writes (POST, PATCH, DELETE) need the admin token; the same route's read (GET) does not
    assert call("DELETE", "/tasks/t") == 401 and call("DELETE", "/tasks/t", "Bearer x") == 403 and not reached
    assert call("POST", "/tasks") == 401 and call("PATCH", "/tasks/t/policy") == 401 and not reached
    assert call("DELETE", "/tasks/t", f"Bearer {ADMIN}") == 200 and reached == ["/tasks/t"]
    assert call("GET", "/tasks/t") == 200 and call("GET", "/tasks") == 200
    assert call("POST", "/predict") == 200 and call("GET", "/metrics") == 200 and call("GET", "/livez") == 200
    # with a predict token, the reads (GET, and POST /predict) need it too; docs stay open
    both = Tokens(admin=ADMIN, predict=READER)
    assert call("GET", "/tasks", tokens=both) == 401 and call("POST", "/predict", tokens=both) == 401
    assert call("GET", "/events", tokens=both) == 401 and call("GET", "/tasks", f"Bearer {READER}", both) == 200
    assert call("POST", "/tasks", f"Bearer {READER}", both) == 403
    assert call("GET", "/docs.json", tokens=both) == 200 and call("GET", "/docs", tokens=both) == 200


def test_the_shipped_server_serves_https_and_grpc_over_tls(tmp_path):
    """`munet serve` with MUNET_TLS_CERT/KEY: HTTPS and gRPC with TLS answer with the certificate; a
    plaintext client on either port gets nothing."""
    import ssl
    import urllib.error
    import urllib.request

    from tests.test_lifecycle import Server

    cert, key = _certificate(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    s = Server(home, MUNET_TLS_CERT=str(cert), MUNET_TLS_KEY=str(key), MUNET_ADMIN_TOKEN=ADMIN)
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 180
        while True:
            assert s.proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"https://localhost:{s.http}/readyz", context=ctx, timeout=2) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with MunetClient(f"localhost:{s.grpc}", tls_ca=cert, token=ADMIN, timeout=120) as c:
            c.register_task("digits", builtin="uci_digits", max_examples=200)
        body = json.dumps({"task": "digits", "arrays": [np.zeros((8, 8), np.uint8).tolist()]}).encode()
        req = urllib.request.Request(f"https://localhost:{s.http}/predict", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            out = json.loads(r.read())
        assert out["task"] == "digits" and out["path_version"] == 1 and len(out["predictions"]) == 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP to the TLS port
            urllib.request.urlopen(f"http://localhost:{s.http}/readyz", timeout=5)
        with MunetClient(f"localhost:{s.grpc}", timeout=3) as plain:
            assert _code(lambda: plain.list_tasks()) == "UNAVAILABLE"
    finally:
        s.stop()
