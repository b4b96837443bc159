"""Two serving processes on one store: the store is the only meeting point.

One holds the evolution lease and evolves; both serve. A promotion the leader publishes reaches the
follower within seconds with no failed request on either; a task registered through the follower is
served by the leader; killing the leader (kill -9: no clean release) hands the lease over."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from munet.client import MunetClient, MunetClientError
from munet.models.store import Store
from tests.conftest import wait_until
from tests.test_lifecycle import Server

pytestmark = pytest.mark.slow

LEASE_S = "2"  # a short lease: the takeover is tested within seconds


def _leading(server: Server) -> bool:
    m = re.search(r"^munet_leader(?:\{[^}]*\})? (\S+)$", server.metrics(), re.M)
    return m is not None and float(m.group(1)) == 1.0


def test_a_promotion_reaches_the_follower_and_leadership_moves_when_the_leader_dies(tmp_path):
    home = tmp_path / "store"
    home.mkdir()
    env = {"MUNET_LEADER_LEASE_S": LEASE_S, "MUNET_CANDIDATE_MAX_STEPS": "30", "MUNET_EVOLUTION_MAX_TRAIN": "300",
           "MUNET_CANDIDATES_PER_GENERATION": "1", "MUNET_GC_MIN_AGE_S": "0"}
    a = Server(home, **env)
    b = None
    try:
        a.wait_up()
        with MunetClient(a.target, timeout=120) as ca:
            ca.register_task("shared", builtin="uci_digits", max_examples=300)
        b = Server(home, log="serve-b.log", **env)
        b.wait_up()
        assert _leading(a) and not _leading(b)
        x = [np.full((8, 8), 40 * i, np.uint8) for i in range(4)]
        with MunetClient(a.target, timeout=120) as ca, MunetClient(b.target, timeout=30) as cb:
            assert cb.predict("shared", x).version == 1  # the follower serves what the leader registered
            assert ca.evolution_status().leading
            st = cb.evolution_status()
            assert not st.leading and st.leader.endswith(f":{a.grpc}")
            # only the leader evolves; the follower says who does
            with pytest.raises(MunetClientError) as e:
                cb.trigger_evolution("shared", candidates=1)
            assert e.value.code == "FAILED_PRECONDITION" and "leads it" in e.value.message

            # load on both replicas through the promotion
            failures: list[str] = []
            seen_b: list[tuple[float, int]] = []
            stop = threading.Event()

            def hammer(target: str, record: list | None) -> None:
                with MunetClient(target, timeout=30) as c:
                    while not stop.is_set():
                        try:
                            v = c.predict("shared", x).version
                            if record is not None:
                                record.append((time.monotonic(), v))
                        except Exception as err:  # noqa: BLE001 - every failure counts
                            failures.append(f"{target}: {err}")

            threads = [threading.Thread(target=hammer, args=(a.target, None)),
                       threading.Thread(target=hammer, args=(b.target, seen_b))]
            for t in threads:
                t.start()
            store = Store(home)
            store.update_path("shared", 1, score=0.0)  # any candidate now wins
            store.close()
            report = ca.trigger_evolution("shared", candidates=1, wait=True).triggered
            published = time.monotonic()  # the leader serves it now (wait=True answers after its swap)
            assert report.promoted, report
            wait_until(lambda: seen_b and seen_b[-1][1] == report.promoted_version, timeout=10,
                       what="the follower to serve the promotion")
            stop.set()
            for t in threads:
                t.join()
            assert not failures, failures[:3]
            first_new = next(at for at, v in seen_b if v == report.promoted_version)
            assert first_new - published < 2.0, f"the follower took {first_new - published:.2f} s"
            assert all(v == report.promoted_version for at, v in seen_b if at >= first_new)  # never back

            # a write through the follower goes to the store; the leader serves it
            cb.register_task("from-b", builtin="uci_digits", max_examples=200)
            wait_until(lambda: "from-b" in {t.name for t in ca.list_tasks()}, timeout=10, what="the leader to list it")
            assert ca.predict("from-b", x).version == 1

        # the leader dies without a word; the follower takes the lease within about one lease length
        a.kill()
        t0 = time.monotonic()
        wait_until(lambda: _leading(b), timeout=15, what="the follower to take the evolution lease")
        took = time.monotonic() - t0
        assert took < 3 * float(LEASE_S) + 2, took
        with MunetClient(b.target, timeout=120) as cb:
            assert cb.predict("shared", x).version == report.promoted_version
            assert cb.trigger_evolution("shared", candidates=1, wait=True).triggered.generation >= 1
    finally:
        a.stop()
        if b is not None:
            b.stop()
