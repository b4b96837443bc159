"""The committed gRPC stubs must be what the .proto generates (run `make protos` after editing it)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "protos/munet/v1/munet.proto")],
        check=True,
    )
    for name in ("munet_pb2.py", "munet_pb2.pyi", "munet_pb2_grpc.py"):
        generated = (tmp_path / "munet/v1" / name).read_text()
        committed = (ROOT / "munet/v1" / name).read_text()
        assert generated == committed, f"munet/v1/{name} is stale: run `make protos`"
