"""`munet bench fuzz`: thousands of malformed requests over gRPC and HTTP against a running server.

    munet bench fuzz                        # starts `munet serve` on a temporary store, 10,000 requests
    munet bench fuzz --target h:50051 --http http://h:3000 --token T   # an existing server

Every request is malformed somewhere (garbled or truncated images, impossible sizes, NaN pixels,
labels out of range, unknown tasks, names with NUL or 10k characters, bad fractions, broken
JSON, uploads without their end message, ...). Reported as failures: any gRPC status outside the
clear ones (INTERNAL, UNKNOWN, ...), any HTTP 5xx, a server that stops answering, and any change to
what the server stores (tasks, versions, example counts) made by a refused request. Exit status 1
when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import free_port
from munet.client import MunetClient
from munet.v1 import munet_pb2 as pb
from munet.v1 import munet_pb2_grpc as pb_grpc

CLEAR_GRPC = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
              "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"}
TASK = "fuzz-target"


def _name(r: random.Random) -> str:
    return r.choice(["", "x" * 10_000, "a\0b", "../etc", "UPPER", "ok-but-unknown", "ünïcode", " ", "-lead",
                     TASK + "\0", "a/b", "🙂" * 50])


def _image(r: random.Random) -> pb.Image:
    kind = r.randrange(6)
    if kind == 0:
        return pb.Image(encoded=bytes(r.getrandbits(8) for _ in range(r.randrange(0, 300))))
    if kind == 1:  # a real header, then garbage: truncated files
        head = r.choice([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP"])
        return pb.Image(encoded=head + bytes(r.getrandbits(8) for _ in range(r.randrange(0, 200))))
    if kind == 2:  # raw pixels whose length does not match the shape
        h, w, c = r.randrange(0, 70), r.randrange(0, 70), r.choice([0, 1, 2, 3, 4, 5])
        return pb.Image(raw=pb.RawImage(data=bytes(max(0, h * w * c + r.choice([-1, 1, 7]))), height=h, width=w,
                                        channels=c))
    if kind == 3:  # impossible sizes
        return pb.Image(raw=pb.RawImage(data=b"\0" * 12, height=r.choice([0, 5000, 2**31]), width=2, channels=3))
    if kind == 4:
        return pb.Image()  # neither encoded nor raw
    return pb.Image(raw=pb.RawImage(data=b"", height=0, width=0, channels=3))


def grpc_request(stub, r: random.Random):
    kind = r.randrange(7)
    if kind <= 2:
        task = TASK if r.random() < 0.6 else _name(r)
        return lambda: stub.Predict(pb.PredictRequest(task=task, images=[_image(r) for _ in range(r.randrange(0, 4))],
                                                      top_k=r.choice([0, 1, 2**32 - 1])), timeout=20)
    if kind == 3:  # uploads: malformed examples, wrong labels, missing or miscounted end
        batch = pb.ExampleBatch(examples=[pb.LabelledImage(image=_image(r), label=r.choice([0, 9, 10, 2**32 - 1]),
                                                           split=r.randrange(0, 5)) for _ in range(r.randrange(0, 4))])
        msgs = [pb.AddExamplesRequest(task=r.choice([TASK, _name(r)]), examples=batch)]
        if r.random() < 0.5:
            msgs.append(pb.AddExamplesRequest(end=pb.UploadEnd(examples=r.randrange(0, 9))))
        return lambda: stub.AddExamples(iter(msgs), timeout=20)
    if kind == 4:
        spec = pb.TaskSpec(name=_name(r), labels=[_name(r) for _ in range(r.randrange(0, 3))],
                           validation_fraction=r.choice([float("nan"), -1.0, 0.7, 5.0]),
                           test_fraction=r.choice([0.0, float("inf"), 0.6]), root=r.choice(["", "nope", "../x"]))
        if r.random() < 0.5:
            spec.builtin = r.choice(["", "nope", "uci_digits"])
        else:
            spec.npz_file = r.choice(["../../etc/passwd.npz", "a\0.npz", "x" * 500 + ".npz", "missing.npz"])
        msgs = [pb.RegisterTaskRequest(spec=spec)] + ([pb.RegisterTaskRequest(end=pb.UploadEnd())]
                                                      if r.random() < 0.5 else [])
        return lambda: stub.RegisterTask(iter(msgs), timeout=30)
    if kind == 5:
        return lambda: stub.TriggerEvolution(pb.TriggerEvolutionRequest(
            task=r.choice([_name(r), "nope"]), candidates=r.choice([2**32 - 1, 1000]),
            budget_seconds=r.choice([float("nan"), -1.0, 1e12])), timeout=20)
    return lambda: r.choice([
        lambda: stub.GetTask(pb.GetTaskRequest(name=_name(r)), timeout=20),
        lambda: stub.DeleteTask(pb.DeleteTaskRequest(name=_name(r)), timeout=20),
        lambda: stub.Rollback(pb.RollbackRequest(task=r.choice([_name(r), TASK]), version=r.choice([99, 2**32 - 1])),
                              timeout=20),
        lambda: stub.ListVersions(pb.ListVersionsRequest(task=_name(r)), timeout=20)])()


def http_request(base: str, r: random.Random, token: str | None):
    # every route of the HTTP API (the semantics table is its one definition), Predict twice as often,
    # a task's routes on the live task or on a random name; sometimes the wrong method
    from munet.service.semantics import OPERATIONS

    op = r.choice([*OPERATIONS.values(), OPERATIONS["Predict"]])
    method = op.method if r.random() < 0.9 else r.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
    # never DELETE the live task: the fuzz checks that bad calls change nothing stored
    name = urllib.parse.quote(_name(r) if method == "DELETE" else r.choice([TASK, _name(r)]), safe="")
    route = op.path.replace("{name}", name).lstrip("/")
    kind = r.randrange(5)
    if kind == 0:
        body, ctype = b"{not json", "application/json"
    elif kind == 1:
        body, ctype = json.dumps({"task": TASK, "arrays": [[[float("nan")] * 3] * 3]}).encode(), "application/json"
    elif kind == 2:
        body = json.dumps({"task": r.choice([TASK, _name(r)]), "name": _name(r), "images": ["***", ""],
                           "arrays": [[[1, 2], [3]], [[-5, 300]]], "top_k": r.choice([-1, "x", 10**20]),
                           "max_examples": r.choice([-5, "many"]), "version": -1, "candidates": 2**40}).encode()
        ctype = "application/json"
    elif kind == 3:
        body, ctype = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.npz\"\r\n\r\nPK\x03\x04junk" \
                      b"\r\n--b--\r\n", "multipart/form-data; boundary=b"
    else:
        body, ctype = bytes(r.getrandbits(8) for _ in range(r.randrange(0, 200))), r.choice(
            ["application/json", "application/octet-stream", "text/plain"])
    headers = {"content-type": ctype, **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"{base}/{route}", data=None if method in ("GET", "DELETE") else body,
                                 headers=headers, method=method)

    def call() -> int:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    return call


def snapshot(client: MunetClient) -> list:
    out = []
    for t in client.list_tasks():
        v = client.list_versions(t.name)
        out.append((t.name, t.current_version, t.train_examples, t.validation_examples, t.test_examples,
                    tuple(p.version for p in v.versions)))
    return sorted(out)


def run(target: str, http: str, n: int, seed: int, token: str | None) -> dict:
    r = random.Random(seed)
    client = MunetClient(target, token=token)
    channel = grpc.insecure_channel(target)
    if token:
        from munet.client import _Bearer

        channel = grpc.intercept_channel(channel, _Bearer(token))
    stub = pb_grpc.MunetStub(channel)
    before = snapshot(client)
    grpc_codes, http_codes, failures = Counter(), Counter(), []
    t0 = time.perf_counter()
    for i in range(n):
        if i % 2 == 0:
            try:
                grpc_request(stub, r)()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            grpc_codes[code] += 1
            if code not in CLEAR_GRPC:
                failures.append(f"gRPC request {i}: {code}")
        else:
            try:
                status = http_request(http, r, token)()
            except OSError as e:  # the connection itself failed: the server is not answering
                status = 0
                failures.append(f"HTTP request {i}: {e}")
            http_codes[status] += 1
            if status == 0 or status >= 500:
                failures.append(f"HTTP request {i}: status {status}")
        if i % 1000 == 999:
            if client.health(timeout=10) != "SERVING":
                failures.append(f"after {i + 1} requests the server is not SERVING")
            print(f"[bench fuzz] {i + 1}/{n} requests, {len(failures)} failures", file=sys.stderr, flush=True)
    after = snapshot(client)
    if after != before:
        failures.append(f"stored data changed: {before} -> {after}")
    healthy = client.health(timeout=10) == "SERVING"
    if not healthy:
        failures.append("the server is not SERVING at the end")
    return {"requests": n, "seconds": round(time.perf_counter() - t0, 1), "grpc_codes": dict(grpc_codes),
            "http_statuses": {str(k): v for k, v in http_codes.items()}, "failures": failures[:50],
            "failure_count": len(failures), "healthy": healthy, "store_unchanged": after == before}


def _start_server(home: Path) -> tuple[subprocess.Popen, str, str]:
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "MUNET_HOME": str(home), "MUNET_HTTP_PORT": str(http), "MUNET_GRPC_PORT": str(grpc_port),
           "MUNET_SCHEDULER_ENABLED": "0", "MUNET_DEMO_TASK": "0", "MUNET_ROOT": "vit_tiny",
           "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen([sys.executable, "-m", "munet.cli", "serve"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "wb"))  # noqa: SIM115
    target = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited: " + (home / "serve.log").read_text()[-2000:])
        with contextlib.suppress(Exception), MunetClient(target, timeout=2) as c:
            if c.health() == "SERVING":
                c.register_task(TASK, builtin="uci_digits", max_examples=300)
                return proc, target, f"http://127.0.0.1:{http}"
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet bench fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests in all, half gRPC, half HTTP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="gRPC address of a running server (default: start one on a temporary store)")
    p.add_argument("--http", help="its HTTP base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--token", default=os.environ.get("MUNET_TOKEN"), help="admin token of that server")
    a = p.parse_args(argv)
    proc = None
    tmp = None
    try:
        if a.target:
            if not a.http:
                p.error("--target needs --http too")
            target, http = a.target, a.http.rstrip("/")
        else:
            tmp = Path(tempfile.mkdtemp(prefix="munet-fuzz-"))
            proc, target, http = _start_server(tmp)
        result = run(target, http, a.requests, a.seed, a.token)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    print(json.dumps(result, indent=1))
    return 0 if result["failure_count"] == 0 else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
