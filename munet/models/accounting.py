"""muNet's parameter accounting: what a path costs a task when its modules are shared.

One definition, read by evolution (the scale-controlled score) and by the service (GetTask's
`accounted_params`), so what a client is shown is what a candidate was scored on.
"""

from __future__ import annotations

from munet.models.store import Store


def accounted_params(store: Store, task: str, module_ids: list[str], new_params: int = 0,
                     users: dict[str, set[str]] | None = None) -> float:
    """Each module's parameters divided by the number of tasks that use it, `task` always among them.

    As muNet's `accounted_num_params`: the divisor is the tasks whose current path holds the module
    plus the task being scored, so a candidate (or a kept older version) that reuses another task's
    module pays half of it, exactly as it would once current. `new_params`: trainable modules not yet
    stored, used by this task alone. `users`: `store.module_users()`, when the caller has it already.
    """
    users = store.module_users() if users is None else users
    return new_params + sum(store.module_record(m).params / len(users.get(m, set()) | {task}) for m in module_ids)
