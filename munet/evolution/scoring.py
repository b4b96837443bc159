"""muNet's score with scale control: quality traded against the parameters a path adds."""

from __future__ import annotations

from munet.models.store import Store


def accounted_params(store: Store, task: str, module_ids: list[str]) -> float:
    """Each module's parameters divided by the number of tasks using it (this task included)."""
    users = store.module_users()
    total = 0.0
    for m in module_ids:
        n = len(users.get(m, set()) | {task})
        total += store.module_record(m).params / n
    return total


def score(quality: float, accounted: float, root_params: int, base: float) -> float:
    """score = quality * base ** (accounted params / root params); base 1.0 means no size penalty."""
    return float(quality) * float(base) ** (accounted / max(1, root_params))
