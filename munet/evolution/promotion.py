"""Storing a trained candidate as a path version, and promoting it into the live serving graph.

Promotion order: modules stored (content-addressed, immutable) -> version row ("candidate") ->
`activate` (export to ONNX, parity against torch, load, warm, then flip the pointer atomically in
the store and in memory). Any failure leaves the old version serving and records why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from munet.errors import NotFound
from munet.evolution.mutations import Candidate
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


def promote(store: Store, activate: Callable[..., object], rec: PathRecord,
            expect: Expectation | None = None) -> tuple[str, str]:
    """Make `rec` the task's served version; on failure the incumbent keeps serving.

    With `expect`, the pointer flips only if the task is still at the version the generation started
    from (checked in the flip's transaction); otherwise `rec` stays an unpromoted candidate.
    Returns (outcome, error): "promoted", "superseded" or "failed".
    """
    try:
        activate(rec, expect=expect)
    except Superseded as e:
        log.warning("%s v%d not promoted: %s", rec.task, rec.version, e.message)
        with contextlib.suppress(NotFound):
            store.set_path_status(rec.task, rec.version, "candidate", note=f"not promoted: {e.message}"[:500])
        return "superseded", f"not promoted: {e.message}"
    except Exception as e:  # noqa: BLE001 - export, parity or load: all mean "do not serve this"
        msg = f"{type(e).__name__}: {e}"
        log.error("promotion of %s v%d failed, keeping the current version: %s", rec.task, rec.version, msg)
        store.set_path_status(rec.task, rec.version, "failed", note=msg[:500])
        return "failed", msg
    log.info("promoted %s v%d (validation %.4f, score %.4f)", rec.task, rec.version,
             rec.validation_accuracy or 0.0, rec.score or 0.0)
    return "promoted", ""
