"""The floor of a gRPC unary call on this machine, for `munet bench serve`: a grpc.aio server process
that answers Predict at once with a canned response (no decoding, no model), driven by the same client
processes and request bytes as the munet rows. munet's single-image latency is this floor plus the
model's time plus munet's own work; only the last two are ours to cut."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.serve_load import PREDICT_METHOD

_SERVER = r'''
import asyncio, sys
import grpc
from munet.v1 import munet_pb2 as pb

resp = pb.PredictResponse(task="floor", path_version=1)
for _ in range(int(sys.argv[2])):
    resp.predictions.add().top.add(label="0", index=0, probability=1.0)
answer = resp.SerializeToString()
service, method = sys.argv[1].strip("/").split("/")


async def predict(request, context):
    return answer


async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(predict)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''


class NullServer:
    """`with NullServer(images) as target:` a loopback gRPC server process answering every Predict
    with `images` predictions."""

    def __init__(self, images: int = 1):
        self.images = images
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER, PREDICT_METHOD, str(self.images)],
                                      stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError("the null gRPC server did not start")
        return f"127.0.0.1:{line.strip()}"

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None
