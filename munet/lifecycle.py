"""Process lifecycle shared by the server's worker processes (HTTP workers, the evolution worker)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger(__name__)


def setup_logging() -> None:
    level = os.environ.get("MUNET_LOG_LEVEL", "INFO").upper()
    # BentoML installs its own root handlers; then ours only needs the level on the munet logger
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("munet").setLevel(level)


def die_with_parent() -> None:
    """This process ends when the process that started it (the BentoML supervisor, the server) dies,
    kill -9 included, so an orphan never keeps the ports or goes on evolving tasks: the kernel's
    parent-death signal where there is one (Linux), and a watchdog on the parent's pid everywhere."""
    import ctypes
    import os
    import signal
    import threading

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.error("the parent process (pid %d) is gone; stopping", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10.0)
                os._exit(1)  # SIGTERM did not end it in time

    threading.Thread(target=watch, name="munet-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
