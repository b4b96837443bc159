"""What each call of the munet.v1 API means, once for both transports: its gRPC method, its HTTP method
and route, who may make it, and what each parameter means when it is left out.

The REST app (`rest.py`) takes its routes, its parameters' defaults and their descriptions from this
table, the gRPC servicer its defaults for fields with presence, `auth.py` who may call what, and
tests/test_semantics.py runs every row over both transports against one server and compares the
answers and the error classes. A parameter's `default` is what an absent one means on both
transports; `rule` says what its zero means where zero is not simply a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from munet.errors import InvalidArgument

Access = Literal["admin", "read"]


@dataclass(frozen=True)
class Param:
    rule: str  # what it is and, where one applies, what its zero or absence means
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Operation:
    rpc: str  # the method of munet.v1.Munet
    http: str  # "METHOD /route", the route's {name} standing for the task's name
    access: Access  # admin: management; read: predictions and views
    summary: str
    params: dict[str, Param] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.http.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.http.split(" ", 1)[1]

    def matches(self, path: str) -> bool:
        """Whether an HTTP path is this operation's route (whatever the method)."""
        return re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", self.path), path) is not None


def _op(rpc: str, http: str, access: Access, summary: str, **params: Param) -> Operation:
    return Operation(rpc, http, access, summary, params)


_TASK = Param("the task's name", required=True)
_POLICY_NAMES = "auto, approve or frozen"

OPERATIONS: dict[str, Operation] = {op.rpc: op for op in (
    _op("Predict", "POST /predict", "read",
        "Classify a batch of images with a task's current path (or a kept version of it).",
        task=_TASK,
        top_k=Param("labels per image, best first; 0 means 1; capped at the task's number of labels", 1),
        version=Param("the path version to answer with; 0 = the current one", 0)),
    _op("RegisterTask", "POST /tasks", "admin",
        "Create a task from a built-in data set, an .npz file in the server's import directory or an "
        "uploaded .npz; answers once its first path serves.",
        name=Param("the new task's name: [a-z0-9][a-z0-9_-]{0,62}", required=True),
        labels=Param("label names; optional for built-in data sets and .npz files that carry label_names", []),
        builtin=Param("a built-in data set: mnist, fashion_mnist, animal_shapes, uci_digits, emoji_noto, "
                      "emoji_subgroups"),
        npz_file=Param("an .npz file in the server's import directory (x, y, optional label_names and split)"),
        max_examples=Param("caps the examples taken from the source; 0 = all", 0),
        # 0 is a real value of both fractions (no test split), so absence, not 0, means the default:
        # the proto gives them presence (`optional`) for this
        validation_fraction=Param("share of unsplit examples put in validation, in [0, 0.5); absent = 0.1; "
                                  "0 = none (refused: a task needs validation examples)", 0.1),
        test_fraction=Param("share of unsplit examples put in test, in [0, 0.5); absent = 0.1; 0 = none", 0.1),
        seed=Param("seed of the example sampling and split assignment (0 is a seed like any other)", 0),
        root=Param("the root the task grows from; empty = the server's default root", ""),
        policy=Param(f"promotion policy: {_POLICY_NAMES}; empty = auto", "auto"),
        evolution=Param("the task's evolution settings; absent, or 0 in a field = the server's")),
    _op("AddExamples", "POST /tasks/{name}/examples", "admin",
        "Add labelled examples (an uploaded .npz: x, y, optional split) to a live task.",
        task=_TASK),
    _op("ListTasks", "GET /tasks", "read", "Every task of this server, oldest first."),
    _op("GetTask", "GET /tasks/{name}", "read",
        "One task: its state, current path, lineage, policy and pending versions.", name=_TASK),
    _op("DeleteTask", "DELETE /tasks/{name}", "admin",
        "Delete a task with its examples and versions; modules other tasks use stay.", name=_TASK),
    _op("ListVersions", "GET /tasks/{name}/versions", "read",
        "Every kept version of a task's path, with its status, scores and lineage.", task=_TASK),
    _op("Rollback", "POST /tasks/{name}/rollback", "admin",
        "Serve an earlier version again; the task is frozen unless `policy` says otherwise.",
        task=_TASK,
        version=Param("the version to serve; 0 = the newest one that served before the current one", 0),
        policy=Param(f"the task's policy afterwards: {_POLICY_NAMES}; empty = frozen, so the next generation "
                     "does not undo the rollback", "")),
    _op("SetTaskPolicy", "PATCH /tasks/{name}/policy", "admin",
        "Set a task's promotion policy and/or its evolution settings.",
        task=_TASK,
        policy=Param(f"the new policy: {_POLICY_NAMES}; empty = unchanged", ""),
        evolution=Param("when present, replaces the task's three settings (0 in a field = the server's); "
                        "absent = unchanged")),
    _op("Promote", "POST /tasks/{name}/promote", "admin",
        "Serve a version now: under policy approve, the pending version an operator accepts.",
        task=_TASK,
        version=Param("a pending version, or any kept version that did not fail; required (0 is refused)",
                      required=True)),
    _op("Reject", "POST /tasks/{name}/reject", "admin",
        "Refuse a pending version: evolution never serves it, and it is pruned first.",
        task=_TASK,
        version=Param("the version to refuse; required (0 is refused)", required=True),
        reason=Param("why, kept as the version's note", "")),
    _op("TriggerEvolution", "POST /evolve", "admin",
        "Run an evolution generation now, for one task or the scheduler's next pick.",
        task=Param("the task to evolve; empty = the scheduler's next pick", ""),
        candidates=Param("candidates to train; 0 = the task's or the server's configured number", 0),
        budget_seconds=Param("training budget per candidate, in seconds; 0 = the configured budget", 0.0),
        wait=Param("true: answer when the generation ends (its report in `triggered`); false: when it starts",
                   False)),
    _op("GetEvolutionStatus", "GET /evolution", "read",
        "What evolution is doing now and the reports of its recent generations."),
    _op("WatchTask", "GET /events", "read",
        "What happened to a task (or to every task): the stored events, oldest first. gRPC streams them "
        "as they happen; HTTP answers the stored ones after `after_id` (poll with the last id seen).",
        task=Param("the task's name; empty = every task", ""),
        after_id=Param("HTTP: events with a larger id (0 = every kept one); gRPC's since_id is after_id + 1, "
                       "and its since_id 0 streams only what happens from now on", 0),
        limit=Param("HTTP: at most this many events, 1..10000", 1000)),
)}


def default(rpc: str, param: str) -> Any:
    """What an absent parameter of `rpc` means (the table's default)."""
    return OPERATIONS[rpc].params[param].default


def rule(rpc: str, param: str) -> str:
    return OPERATIONS[rpc].params[param].rule


def require_version(rpc: str, version: int) -> None:
    """Promote and Reject name the version they act on: 0 (proto3's unset) is refused, never guessed."""
    if not version:
        raise InvalidArgument(f"{rpc} needs the version to {'serve' if rpc == 'Promote' else 'refuse'} "
                              "(ListVersions, Task.pending_versions)")


def http_access(method: str, path: str) -> Access | None:
    """Who may make an HTTP request: the access of the operation at that route and method; for a route
    whose method is wrong (answered 405), the strictest access of the operations at that route; None
    for a path that is no operation's (docs, metrics, health, the Open Inference Protocol)."""
    method = "GET" if method == "HEAD" else method  # a GET route answers HEAD too
    at_path = [op for op in OPERATIONS.values() if op.matches(path)]
    exact = [op.access for op in at_path if op.method == method]
    found = exact or [op.access for op in at_path]
    if not found:
        return None
    return "admin" if "admin" in found else "read"


__all__ = ["OPERATIONS", "Access", "Operation", "Param", "default", "http_access", "require_version", "rule"]
