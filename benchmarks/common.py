"""What every benchmark shares: its error, a free port, a progress line and the machine it ran on."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any


class BenchError(RuntimeError):
    """A benchmark cannot run (missing data, a server that did not start, a client that failed): one
    line on stderr and a non-zero exit status, not a traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(bench: str, msg: str) -> None:
    """Progress on stderr, so stdout carries only the results (`--json` output stays parseable)."""
    print(f"[bench {bench} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc (not Linux): the platform's own answer
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_info(**extra: Any) -> dict:
    """Where a result was measured: results from a shared, loaded machine are read with its load."""
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], **extra}
