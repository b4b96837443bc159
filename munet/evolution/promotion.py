"""Publishing a trained candidate: the one lane a new version takes into service.

Modules stored (content-addressed, immutable) -> version row ("candidate") -> every module exported
to ONNX and the chain checked against torch (models/export.py) -> the task's pointer flipped in the
store, in one transaction that checks the generation's Expectation. Nothing here calls a server:
every serving process follows the store (service/core.py `sync_from_store`), loads and warms the
version's modules it lacks, then swaps; requests in flight finish on the old version. Any failure
before the flip leaves the old version current and records why.
"""

from __future__ import annotations

import contextlib
import logging

from munet.errors import NotFound
from munet.evolution.mutations import Candidate
from munet.models.export import export_and_check
from munet.models.store import Expectation, PathRecord, Store, Superseded

log = logging.getLogger(__name__)


def persist_candidate(store: Store, cand: Candidate, validation_accuracy: float, score: float,
                      lineage: dict, expect_uid: str | None = None) -> PathRecord:
    ids = []
    for s in cand.slots:
        if s.trainable:
            parent = s.origin.split(":", 1)[1] if s.origin.startswith("clone:") else None
            ids.append(store.put_module(s.module, parent=parent))
        else:
            ids.append(s.module_id)
    rec = PathRecord(task=cand.task, version=0, modules=ids, hparams=dict(cand.hparams), lineage=lineage,
                     validation_accuracy=validation_accuracy, score=score, status="candidate")
    return store.add_path_version(rec, expect_uid=expect_uid)


def promote(store: Store, rec: PathRecord, expect: Expectation | None = None, parity_atol: float = 1e-4,
            threads: int = 1) -> tuple[str, str]:
    """Make `rec` the task's current version in the store; on failure the incumbent stays current.

    With `expect`, the pointer flips only if the task is still at the version the generation started
    from (checked in the flip's transaction); otherwise `rec` stays an unpromoted candidate.
    Returns (outcome, error): "promoted", "superseded" or "failed".
    """
    try:
        export_and_check(store, rec, parity_atol, threads)
        store.set_current(rec.task, rec.version, expect)
    except Superseded as e:
        log.warning("%s v%d not promoted: %s", rec.task, rec.version, e.message)
        with contextlib.suppress(NotFound):
            store.set_path_status(rec.task, rec.version, "candidate", note=f"not promoted: {e.message}"[:500])
        return "superseded", f"not promoted: {e.message}"
    except Exception as e:  # noqa: BLE001 - export or parity: both mean "do not serve this"
        msg = f"{type(e).__name__}: {e}"
        log.error("promotion of %s v%d failed, keeping the current version: %s", rec.task, rec.version, msg)
        with contextlib.suppress(NotFound):
            store.set_path_status(rec.task, rec.version, "failed", note=msg[:500])
        return "failed", msg
    log.info("published %s v%d (validation %.4f, score %.4f)", rec.task, rec.version,
             rec.validation_accuracy or 0.0, rec.score or 0.0)
    return "promoted", ""


def offer(store: Store, rec: PathRecord, why: str, parity_atol: float = 1e-4, threads: int = 1) -> tuple[str, str]:
    """Policy "approve": the winner waits as "pending", exported and checked (servers load it for
    Predict-by-version and shadow it on live traffic), until an operator promotes or rejects it.
    It replaces any older pending one."""
    for v in store.list_versions(rec.task):
        if v.status == "pending" and v.version != rec.version:
            store.set_path_status(rec.task, v.version, "candidate",
                                  note=f"no longer pending: v{rec.version} replaced it")
    try:
        export_and_check(store, rec, parity_atol, threads)
    except Exception as e:  # noqa: BLE001 - export or parity: both mean "do not offer this"
        msg = f"{type(e).__name__}: {e}"
        store.set_path_status(rec.task, rec.version, "failed", note=msg[:500])
        return "failed", msg
    store.set_path_status(rec.task, rec.version, "pending", note=f"waiting for approval: {why}")
    log.info("%s v%d pending approval (%s)", rec.task, rec.version, why)
    return "pending", ""
