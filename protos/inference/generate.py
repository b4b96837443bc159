"""Generate munet/inference/ from protos/inference/grpc_predict_v2.proto (`make protos` runs this).

Two edits to what protoc writes, both checked so that a protoc that writes something else fails here:

- the messages go into a descriptor pool of their own, not protobuf's default pool. The package,
  service and message names must be KServe's (`inference.GRPCInferenceService`, ...), and Triton's
  client (tritonclient.grpc) registers those same names from its own .proto file; in the default
  pool, a process importing both (a test, or a user's program that embeds the server and uses
  tritonclient) would fail with "duplicate symbol". The wire format does not depend on the pool.
- the proto sits at protos/inference/ (its import name in the KServe world) but the Python package
  is munet.inference, so the generated import and module names are rewritten to it.

usage: python protos/inference/generate.py [OUT_DIR]   (default: munet/inference)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO = "inference/grpc_predict_v2.proto"
EDITS = {
    "grpc_predict_v2_pb2.py": [
        ("DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
         "# a descriptor pool of its own, not protobuf's default one: see protos/inference/generate.py\n"
         "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("),
        ("'inference.grpc_predict_v2_pb2'", "'munet.inference.grpc_predict_v2_pb2'"),
    ],
    "grpc_predict_v2_pb2_grpc.py": [
        ("from inference import grpc_predict_v2_pb2", "from munet.inference import grpc_predict_v2_pb2"),
    ],
    "grpc_predict_v2_pb2.pyi": [],
}


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", str(ROOT / "protos" / PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {rc})")
        for name, edits in EDITS.items():
            text = (Path(tmp) / "inference" / name).read_text()
            for old, new in edits:
                if text.count(old) != 1:
                    raise SystemExit(f"{name}: expected {old!r} once in protoc's output; update generate.py")
                text = text.replace(old, new)
            path = out_dir / name
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "munet" / "inference"):
        print(p)
