"""The committed root model, put into the store as the first shared, frozen modules."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from munet.models.store import Store

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def ensure_root(store: Store, assets: Path | None = None) -> list[str]:
    """Module ids of the root path (embed, blocks..., head), storing them on first start.

    The store remembers its root: a later start with another checkpoint keeps serving the first.
    """
    known = store.get_meta("root_modules")
    if known:
        return json.loads(known)
    from munet.models.pretrain import load_root

    modules, info = load_root(assets or ASSETS)
    ids = [store.put_module(m) for m in modules]
    store.set_meta("root_modules", json.dumps(ids))
    store.set_meta("root_info", json.dumps(info))
    log.info("root model stored: %d modules, %s", len(ids), ", ".join(i[:8] for i in ids))
    return ids


def root_params(store: Store) -> int:
    return sum(store.module_record(m).params for m in ensure_root(store))
