"""The store: tasks, examples and path versions as rows; module and example files by content.

One interface, two metadata backends: SQLite in the store's home (the embedded default,
store_sqlite.py) or PostgreSQL (`database_url`, store_postgres.py: several hosts share one store).
The files always live under the store's home, readable with `ls`; with PostgreSQL it is a directory
every host mounts:

    munet.db                         tasks, example batches, modules, path versions, current pointers
                                     (SQLite only; with PostgreSQL the rows are in its database)
    store-id                         (PostgreSQL only) which database these files belong to
    modules/<id>/module.json         kind, config, parameter count (immutable once written)
    modules/<id>/weights.safetensors
    modules/<id>/model.onnx          exported lazily, also immutable
    tasks/<name>/examples/<batch>.npz  labelled images as uploaded, one file per batch

A module id is the content hash of its kind, config and weights, so equal modules are stored once
and a path version (an ordered list of ids) pins its function exactly. Every file is written to a
temporary name, fsynced and renamed, so a crash never leaves a half-written file under a real name,
and files are written before the rows that name them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.torch import load_file, save_file
from torch import nn

from munet.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from munet.models.modules import build_module, count_params, module_config
from munet.models.store_sqlite import SQLiteBackend

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# what happened to tasks, in order, for WatchTask: written by whichever process did it (a server,
# an HTTP worker, the evolution worker), so every watcher sees every change through the store
EVENT_KINDS = ("registered", "deleted", "generation_started", "generation_finished", "pending", "promoted",
               "rolled_back", "rejected", "failed", "policy_changed")
MAX_EVENTS = 10_000  # the oldest are dropped beyond this

# Schema versions, each reached from the one before by its migration, so a newer munet-serve opens
# a store an older one wrote (SQLite: PRAGMA user_version; PostgreSQL: the munet_schema row). Each
# backend module holds its DDL and its MIGRATIONS[v] (v -> v + 1); a new version adds one to both.
#   1: the first release (tasks without a root).
#   2: tasks record their root and input resolution, and a creation id (uid) that tells a task from
#      a later one of the same name; roots are recorded by name (meta "roots").
#   3: tasks record their promotion policy (auto, approve, frozen) and evolution settings.
#   4: leases (which server process leads evolution). PostgreSQL stores start here.
SCHEMA_VERSION = 4

POLICIES = ("auto", "approve", "frozen")
# settings a task may carry over the server's (Config fields of the same names)
TASK_EVOLUTION_SETTINGS = ("candidates_per_generation", "candidate_budget_s", "scale_base")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModuleRecord:
    id: str
    kind: str
    config: dict
    params: int
    parent: str | None = None


@dataclass(frozen=True)
class TaskRecord:
    name: str
    labels: list[str]
    source: dict
    status: str
    current_version: int | None
    created_at: str
    root: str = "vit_tiny"  # the root family its paths grew from
    image_size: int = 32  # the resolution its examples are stored and its paths run at
    uid: str = ""  # creation id: a task deleted and registered again under its name gets a new one
    policy: str = "auto"  # promotion policy: auto, approve (an operator promotes), frozen (no evolution)
    evolution: dict = field(default_factory=dict)  # per-task evolution settings over the server's


@dataclass
class PathRecord:
    task: str
    version: int
    modules: list[str]
    hparams: dict = field(default_factory=dict)
    # parents, parent_task, mutations, added_params, training_seconds, ...
    lineage: dict = field(default_factory=dict)
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    score: float | None = None
    status: str = "candidate"
    created_at: str = ""


@dataclass(frozen=True)
class Expectation:
    """What a pointer flip requires of its task: the same creation id and current version (and, for
    evolution's own promotions, a policy that lets it promote)."""

    uid: str
    current_version: int | None
    policies: tuple[str, ...] | None = None


class Superseded(FailedPrecondition):
    """The task changed (deleted and re-registered, rolled back) since the change was prepared."""


class StoreError(RuntimeError):
    """The store cannot be opened as configured: a newer release's schema, an unreachable database,
    a home that holds another store's files. Nothing was changed."""


def content_id(kind: str, config: dict, module: nn.Module) -> str:
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Backend(Protocol):
    """What `Store` needs of a metadata database (store_sqlite.SQLiteBackend, store_postgres.PostgresBackend).
    Statements are written once, with `?` placeholders and SQL both databases run."""

    name: str
    location: str  # where the rows are, for messages
    for_update: str  # appended to a SELECT whose rows the transaction then changes
    now_sql: str  # the database's time, seconds since the epoch (leases)

    def migrate(self, target: int) -> int: ...
    def schema_version(self) -> int: ...
    def tx(self) -> AbstractContextManager[Any]: ...  # a write transaction; yields .execute/.executemany
    def write_lock(self, db: Any, name: str) -> None: ...  # held to the end of the transaction
    def query(self, sql: str, args: tuple = ()) -> list[Mapping]: ...
    def change_token(self) -> tuple: ...
    def wait_for_change(self, token: tuple, timeout_s: float, poll_s: float = 0.05) -> tuple: ...
    def integrity(self) -> str: ...
    def close(self) -> None: ...


def open_store(config: Any) -> Store:
    """The store a Config names: its `home`, and its `database_url` (empty: SQLite in home)."""
    return Store(config.home, config.database_url)


class Store:
    def __init__(self, home: Path | str, database_url: str = ""):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "modules").mkdir(exist_ok=True)
        (self.home / "tasks").mkdir(exist_ok=True)
        self.database_url = database_url
        self._b: Backend = _open_backend(self.home, database_url)
        try:
            version = self._b.migrate(SCHEMA_VERSION)
            if version > SCHEMA_VERSION:
                raise StoreError(f"store {self._b.location} has schema version {version}; this munet-serve "
                                 f"knows up to {SCHEMA_VERSION}: upgrade munet-serve")
            if database_url:
                self._check_files_belong_here()
        except BaseException:
            self._b.close()
            raise

    @property
    def backend(self) -> str:
        """"sqlite" or "postgres"."""
        return self._b.name

    @property
    def location(self) -> str:
        """Where the rows are: the SQLite file, or the PostgreSQL server and database (no credentials)."""
        return self._b.location

    def _check_files_belong_here(self) -> None:
        """With PostgreSQL the files live apart from the rows: make sure `home` is this database's
        directory before anything reads or tidies it. A home that holds another store's files (or
        none, where the database has some: a shared volume not mounted) is refused, never cleaned up."""
        marker = self.home / "store-id"
        with self._tx() as db:
            self._b.write_lock(db, "store_id")  # hosts opening a new store at once agree on one id
            on_disk = marker.read_text().strip() if marker.exists() else None
            row = db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            if row is not None:
                if on_disk != row["value"]:
                    found = f"the files of store {on_disk}" if on_disk else "no store-id file"
                    raise StoreError(f"{self.home} holds {found}, not those of store {row['value']} in "
                                     f"{self._b.location}: is the store's shared directory mounted there?")
                return
            used = (self.home / "munet.db").exists() or any((self.home / "modules").iterdir()) or any(
                (self.home / "tasks").iterdir())
            if used:
                raise StoreError(f"{self.home} already holds a store's files and {self._b.location} is a new "
                                 "database: give a new PostgreSQL store an empty directory")
            store_id = on_disk or uuid.uuid4().hex
            atomic_write(marker, f"{store_id}\n".encode())
            db.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?)", (store_id,))

    @property
    def schema_version(self) -> int:
        return self._b.schema_version()

    def close(self) -> None:
        self._b.close()

    def _tx(self) -> AbstractContextManager[Any]:
        """A write transaction: on SQLite it holds the database's write lock (BEGIN IMMEDIATE); on
        PostgreSQL, statements that read what they then write add `self._b.for_update`."""
        return self._b.tx()

    def _query(self, sql: str, args: tuple = ()) -> list[Mapping]:
        return self._b.query(sql, args)

    # ---- change notification and leases (several server processes on one store) --------------

    def change_token(self) -> tuple:
        """Differs from an earlier value once anything was committed since, by any process. Cheap
        (SQLite: one PRAGMA; PostgreSQL: a counter of notifications), so servers check it often and
        reload only on a change."""
        return self._b.change_token()

    def wait_for_change(self, token: tuple, timeout_s: float, poll_s: float = 0.05) -> tuple:
        """Block until change_token() differs from `token` or `timeout_s` passed; returns the latest
        token. PostgreSQL wakes on the commit's notification; SQLite checks every `poll_s`."""
        return self._b.wait_for_change(token, timeout_s, poll_s)

    def acquire_lease(self, name: str, holder: str, ttl_s: float, info: dict | None = None) -> bool:
        """Take or renew the lease `name` for `holder` for `ttl_s` seconds: granted when nobody holds it,
        its holder let it expire, or `holder` already has it. One conditional statement, so two
        processes never both get it. Times are the database's clock (PostgreSQL: one clock for every
        host; SQLite: the one host's)."""
        with self._tx() as db:
            t = self._b.now_sql
            cur = db.execute(
                f"INSERT INTO leases(name, holder, info, expires_at, acquired_at) VALUES (?, ?, ?, {t} + ?, {t})"
                " ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, info=excluded.info,"
                " expires_at=excluded.expires_at, acquired_at=CASE WHEN leases.holder=excluded.holder"
                " THEN leases.acquired_at ELSE excluded.acquired_at END"
                " WHERE leases.holder=excluded.holder OR leases.expires_at <= excluded.acquired_at",
                (name, holder, json.dumps(info or {}), float(ttl_s)))
            return cur.rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (a clean shutdown), so another process need not wait for it to expire."""
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))

    def lease(self, name: str) -> dict | None:
        """The lease's holder, info and remaining seconds; None when nobody holds it (or it expired)."""
        now_sql = self._b.now_sql
        rows = self._query(f"SELECT holder, info, expires_at - {now_sql} AS left_s, {now_sql} - acquired_at AS held_s"
                           " FROM leases WHERE name=?", (name,))
        if not rows or rows[0]["left_s"] <= 0:
            return None
        r = rows[0]
        return {"holder": r["holder"], "info": json.loads(r["info"]), "expires_in_s": r["left_s"],
                "held_for_s": r["held_s"]}

    # ---- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, value))

    # ---- modules ----------------------------------------------------------------------------

    def module_dir(self, module_id: str) -> Path:
        return self.home / "modules" / module_id

    def put_module(self, module: nn.Module, parent: str | None = None) -> str:
        kind, config = module.kind, module_config(module)
        mid = content_id(kind, config, module)
        if self.has_module(mid):
            return mid
        d = self.module_dir(mid)
        d.mkdir(parents=True, exist_ok=True)
        buf = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        tmp = d / f".weights.{uuid.uuid4().hex}.tmp"
        save_file(buf, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / "weights.safetensors")
        params = count_params(module)
        meta = {"id": mid, "kind": kind, "config": config, "params": params, "parent": parent}
        atomic_write(d / "module.json", json.dumps(meta, indent=1).encode())
        with self._tx() as db:
            db.execute(
                "INSERT INTO modules(id, kind, config, params, parent, created_at) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(id) DO NOTHING",
                (mid, kind, json.dumps(config), params, parent, now()),
            )
        return mid

    def has_module(self, module_id: str) -> bool:
        rows = self._query("SELECT 1 FROM modules WHERE id=?", (module_id,))
        return bool(rows) and (self.module_dir(module_id) / "weights.safetensors").exists()

    def module_record(self, module_id: str) -> ModuleRecord:
        rows = self._query("SELECT * FROM modules WHERE id=?", (module_id,))
        if not rows:
            raise NotFound(f"module {module_id} is not in the store")
        r = rows[0]
        return ModuleRecord(r["id"], r["kind"], json.loads(r["config"]), r["params"], r["parent"])

    def load_module(self, module_id: str) -> nn.Module:
        rec = self.module_record(module_id)
        module = build_module(rec.kind, rec.config)
        module.load_state_dict(load_file(str(self.module_dir(module_id) / "weights.safetensors")))
        return module.eval()

    def onnx_path(self, module_id: str) -> Path:
        return self.module_dir(module_id) / "model.onnx"

    def put_onnx(self, module_id: str, data: bytes) -> Path:
        path = self.onnx_path(module_id)
        atomic_write(path, data)
        return path

    # ---- tasks ------------------------------------------------------------------------------

    def create_task(self, name: str, labels: list[str], source: dict, root: str = "vit_tiny",
                    image_size: int = 32, policy: str = "auto", evolution: dict | None = None) -> TaskRecord:
        if not TASK_NAME.match(name or ""):
            raise InvalidArgument(
                f"task name {name!r} is invalid: use 1-63 lowercase letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        policy, evolution = check_policy(policy or "auto"), check_evolution_settings(evolution or {})
        created = now()
        uid = uuid.uuid4().hex[:16]
        with self._tx() as db:
            # one statement decides: two hosts registering one name at once get one task and one refusal
            cur = db.execute(
                "INSERT INTO tasks(name, labels, source, status, current_version, created_at, root, image_size, uid,"
                " policy, evolution) VALUES (?,?,?,?,NULL,?,?,?,?,?,?) ON CONFLICT(name) DO NOTHING",
                (name, json.dumps(labels), json.dumps(source), "creating", created, root, int(image_size), uid,
                 policy, json.dumps(evolution)),
            )
            if cur.rowcount != 1:
                raise AlreadyExists(f"task {name!r} already exists")
        return TaskRecord(name, labels, source, "creating", None, created, root, int(image_size), uid, policy,
                          evolution)

    def set_policy(self, name: str, policy: str | None = None, evolution: dict | None = None) -> TaskRecord:
        """Change a task's promotion policy and/or its evolution settings (None: unchanged; a setting
        of 0 goes back to the server's)."""
        with self._tx() as db:
            row = db.execute(f"SELECT policy, evolution FROM tasks WHERE name=?{self._b.for_update}",
                             (name,)).fetchone()
            if row is None:
                raise NotFound(f"task {name!r} does not exist")
            new_policy = check_policy(policy) if policy else row["policy"]
            settings = json.loads(row["evolution"] or "{}")
            if evolution is not None:
                settings.update(check_evolution_settings(evolution, allow_zero=True))
                settings = {k: v for k, v in settings.items() if v}
            db.execute("UPDATE tasks SET policy=?, evolution=? WHERE name=?", (new_policy, json.dumps(settings), name))
        return self.get_task(name)

    def set_task_status(self, name: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE tasks SET status=? WHERE name=?", (status, name))

    def get_task(self, name: str) -> TaskRecord:
        rows = self._query("SELECT * FROM tasks WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"task {name!r} does not exist")
        return _task(rows[0])

    def list_tasks(self) -> list[TaskRecord]:
        return [_task(r) for r in self._query("SELECT * FROM tasks ORDER BY created_at, name")]

    def delete_task(self, name: str) -> None:
        self.get_task(name)
        with self._tx() as db:
            db.execute("DELETE FROM tasks WHERE name=?", (name,))
        # rows first, files second: a crash in between leaves orphan files, never dangling rows
        shutil.rmtree(self.home / "tasks" / name, ignore_errors=True)

    # ---- events -----------------------------------------------------------------------------

    def add_event(self, task: str, kind: str, version: int = 0, **detail: object) -> int:
        assert kind in EVENT_KINDS, kind
        with self._tx() as db:
            # watchers read "ids after the last I saw": ids must become visible in order, so event
            # writers take turns (SQLite's writers always do)
            self._b.write_lock(db, "events")
            event_id = int(db.execute("INSERT INTO events(task, kind, version, detail, at) VALUES (?,?,?,?,?)"
                                      " RETURNING id", (task, kind, int(version or 0), json.dumps(detail, default=str),
                                                        now())).fetchall()[0]["id"])
            if event_id % 1000 == 0:
                db.execute("DELETE FROM events WHERE id <= ?", (event_id - MAX_EVENTS,))
        return event_id

    def events(self, after: int = 0, task: str = "", limit: int = 1000) -> list[dict]:
        """Events with id > `after` (of `task`, or all), oldest first."""
        sql, args = "SELECT * FROM events WHERE id > ?", [after]
        if task:
            sql += " AND task = ?"
            args.append(task)
        rows = self._query(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [{"id": r["id"], "task": r["task"], "kind": r["kind"], "version": r["version"],
                 "detail": json.loads(r["detail"]), "at": r["at"]} for r in rows]

    def last_event_id(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(id), 0) AS n FROM events")[0]["n"])

    # ---- examples ---------------------------------------------------------------------------

    def add_examples(self, task: str, x: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict[str, int]:
        """Persist one batch of labelled images (uint8 (N, S, S, 3) at the task's size); returns counts per split."""
        if not (len(x) == len(y) == len(split)):
            raise InvalidArgument("images, labels and splits differ in length")
        size = self.get_task(task).image_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise InvalidArgument(f"task {task!r} stores images of shape ({size}, {size}, 3); got {x.shape[1:]}")
        buf = io.BytesIO()
        np.savez(buf, x=x.astype(np.uint8), y=y.astype(np.int64), split=split.astype(np.int8))
        data = buf.getvalue()
        batch = f"{int(time.time() * 1000):013d}-{hashlib.sha256(data).hexdigest()[:12]}"
        rel = Path("tasks") / task / "examples" / f"{batch}.npz"
        atomic_write(self.home / rel, data)
        counts = {"train": int((split == 0).sum()), "validation": int((split == 1).sum()),
                  "test": int((split == 2).sum())}
        with self._tx() as db:
            if not db.execute(f"SELECT 1 FROM tasks WHERE name=?{self._b.for_update}", (task,)).fetchone():
                raise NotFound(f"task {task!r} does not exist")
            db.execute(
                "INSERT INTO example_batches(id, task, file, n_train, n_validation, n_test, created_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (batch, task, str(rel), counts["train"], counts["validation"], counts["test"], now()),
            )
        return counts

    def example_counts(self, task: str) -> dict[str, int]:
        rows = self._query(
            "SELECT COALESCE(SUM(n_train),0) t, COALESCE(SUM(n_validation),0) v, COALESCE(SUM(n_test),0) s"
            " FROM example_batches WHERE task=?", (task,))
        return {"train": rows[0]["t"], "validation": rows[0]["v"], "test": rows[0]["s"]}

    def examples_version(self, task: str) -> str:
        """Changes whenever examples are added: scores are only comparable within one value."""
        rows = self._query("SELECT COUNT(*) n, COALESCE(MAX(id),'') m FROM example_batches WHERE task=?",
                           (task,))
        return f"{rows[0]['n']}:{rows[0]['m']}"

    def example_batch_ids(self, task: str) -> set[str]:
        return {r["id"] for r in self._query("SELECT id FROM example_batches WHERE task=?", (task,))}

    def load_examples_except(self, task: str, known: set[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every example (all splits) of the batches not in `known`: what was labelled since."""
        xs, ys = [], []
        for r in self._query("SELECT id, file FROM example_batches WHERE task=? ORDER BY id", (task,)):
            if r["id"] in known:
                continue
            with np.load(self.home / r["file"]) as z:
                xs.append(z["x"])
                ys.append(z["y"])
        if not xs:
            size = self.get_task(task).image_size
            return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def load_examples(self, task: str, split: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for r in self._query("SELECT file FROM example_batches WHERE task=? ORDER BY id", (task,)):
            with np.load(self.home / r["file"]) as z:
                keep = z["split"] == split
                xs.append(z["x"][keep])
                ys.append(z["y"][keep])
        if not xs:
            size = self.get_task(task).image_size
            return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    # ---- path versions ----------------------------------------------------------------------

    def add_path_version(self, rec: PathRecord, expect_uid: str | None = None) -> PathRecord:
        """Store a new version (numbered here). With `expect_uid`, only into that creation of the task."""
        for mid in rec.modules:
            if not self.has_module(mid):
                raise NotFound(f"module {mid} of the new path is not in the store")
        with self._tx() as db:
            # the task's row lock numbers its versions one writer at a time
            row = db.execute(f"SELECT uid FROM tasks WHERE name=?{self._b.for_update}", (rec.task,)).fetchone()
            if expect_uid is not None and (row is None or row["uid"] != expect_uid):
                raise Superseded(f"task {rec.task!r} was deleted (and maybe registered again) since this "
                                 "version was made for it")
            if row is None:
                raise NotFound(f"task {rec.task!r} does not exist")
            row = db.execute("SELECT COALESCE(MAX(version), 0) v FROM path_versions WHERE task=?",
                             (rec.task,)).fetchone()
            rec.version = row["v"] + 1
            rec.created_at = now()
            db.execute(
                "INSERT INTO path_versions(task, version, modules, hparams, lineage, validation_accuracy,"
                " test_accuracy, score, status, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rec.task, rec.version, json.dumps(rec.modules), json.dumps(rec.hparams),
                 json.dumps(rec.lineage), rec.validation_accuracy, rec.test_accuracy, rec.score,
                 rec.status, rec.created_at),
            )
        return rec

    def update_path(self, task: str, version: int, **values) -> None:
        """Update scores (validation_accuracy, test_accuracy, score) and/or the lineage of a version."""
        allowed = {"validation_accuracy", "test_accuracy", "score", "lineage"}
        sets = {k: (json.dumps(v) if k == "lineage" else v) for k, v in values.items() if k in allowed}
        if not sets:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE path_versions SET {', '.join(f'{k}=?' for k in sets)} WHERE task=? AND version=?",
                (*sets.values(), task, version),
            )

    def set_path_status(self, task: str, version: int, status: str, note: str | None = None) -> None:
        with self._tx() as db:
            if note is not None:
                row = db.execute(f"SELECT lineage FROM path_versions WHERE task=? AND version=?{self._b.for_update}",
                                 (task, version)).fetchone()
                lineage = json.loads(row["lineage"]) if row else {}
                lineage["note"] = note
                db.execute("UPDATE path_versions SET status=?, lineage=? WHERE task=? AND version=?",
                           (status, json.dumps(lineage), task, version))
            else:
                db.execute("UPDATE path_versions SET status=? WHERE task=? AND version=?",
                           (status, task, version))

    def set_current(self, task: str, version: int, expect: Expectation | None = None) -> None:
        """Flip the task's pointer in one transaction: the old current becomes 'retired'.

        With `expect`, the flip happens only if the task is still the one (creation id) and at the
        version the caller started from, checked in the same transaction: a generation that ran
        while its task was deleted and registered again, or rolled back, must not promote.
        """
        with self._tx() as db:
            row = db.execute(f"SELECT current_version, uid, policy FROM tasks WHERE name=?{self._b.for_update}",
                             (task,)).fetchone()
            if row is None:
                raise NotFound(f"task {task!r} does not exist")
            if expect is not None:
                if row["uid"] != expect.uid:
                    raise Superseded(f"task {task!r} was deleted and registered again since this candidate "
                                     "was made from it")
                if row["current_version"] != expect.current_version:
                    raise Superseded(f"task {task!r} now serves v{row['current_version']}, not "
                                     f"v{expect.current_version} that this candidate was compared with "
                                     "(a rollback or another promotion came first)")
                if expect.policies is not None and row["policy"] not in expect.policies:
                    raise Superseded(f"task {task!r} has policy {row['policy']!r} now: evolution does not "
                                     "promote it")
            if not db.execute("SELECT 1 FROM path_versions WHERE task=? AND version=?",
                              (task, version)).fetchone():
                raise NotFound(f"task {task!r} has no version {version}")
            if row["current_version"] is not None and row["current_version"] != version:
                db.execute("UPDATE path_versions SET status='retired' WHERE task=? AND version=?",
                           (task, row["current_version"]))
            db.execute("UPDATE path_versions SET status='current' WHERE task=? AND version=?", (task, version))
            db.execute("UPDATE tasks SET current_version=?, status='serving' WHERE name=?", (version, task))

    def get_path(self, task: str, version: int | None = None) -> PathRecord:
        if version is None:
            version = self.get_task(task).current_version
            if version is None:
                raise NotFound(f"task {task!r} has no path yet")
        rows = self._query("SELECT * FROM path_versions WHERE task=? AND version=?", (task, version))
        if not rows:
            raise NotFound(f"task {task!r} has no version {version}")
        return _path(rows[0])

    def list_versions(self, task: str) -> list[PathRecord]:
        self.get_task(task)
        return [_path(r) for r in self._query(
            "SELECT * FROM path_versions WHERE task=? ORDER BY version", (task,))]

    def current_paths(self) -> dict[str, PathRecord]:
        rows = self._query(
            "SELECT p.* FROM path_versions p JOIN tasks t ON t.name=p.task AND t.current_version=p.version")
        return {r["task"]: _path(r) for r in rows}

    def module_users(self) -> dict[str, set[str]]:
        """Module id -> tasks whose current path uses it."""
        users: dict[str, set[str]] = {}
        for task, rec in self.current_paths().items():
            for mid in rec.modules:
                users.setdefault(mid, set()).add(task)
        return users

    def referenced_modules(self) -> set[str]:
        out: set[str] = set()
        for r in self._query("SELECT modules FROM path_versions"):
            out.update(json.loads(r["modules"]))
        return out

    def prune_versions(self, task: str, keep: int) -> list[int]:
        """Forget versions beyond `keep`: unpromoted candidates first, then failed, then the oldest
        retired ones (the rollback history). The current version always stays."""
        versions = self.list_versions(task)
        rank = {"rejected": 0, "candidate": 1, "failed": 2, "retired": 3}  # "pending" waits for an operator
        removable = sorted((v for v in versions if v.status in rank), key=lambda v: (rank[v.status], v.version))
        drop = removable[: max(0, len(versions) - keep)]
        if drop:
            with self._tx() as db:
                # only in the status it was chosen in: a version promoted meanwhile stays
                db.executemany("DELETE FROM path_versions WHERE task=? AND version=? AND status=?",
                               [(task, v.version, v.status) for v in drop])
        return [v.version for v in drop]

    def integrity(self) -> str:
        """The database's own check: "ok", or what is wrong (SQLite: integrity_check of the file;
        PostgreSQL: data checksum failures it met)."""
        return self._b.integrity()

    def recover(self, min_age_s: float = 600.0) -> dict[str, int]:
        """After a crash: remove files no committed row refers to. Rows are always written after their
        files, so a crash leaves at worst files without rows: temp files of interrupted writes, module
        folders of unpromoted candidates, example files of uploads never committed, folders of tasks
        never registered. Files younger than `min_age_s` are spared (another process sharing the
        store may be writing them right now)."""
        cutoff = time.time() - min_age_s
        removed = {"temp_files": 0, "module_dirs": 0, "example_files": 0, "task_dirs": 0}

        def old(p: Path) -> bool:
            try:
                return p.stat().st_mtime <= cutoff
            except FileNotFoundError:
                return False

        for p in self.home.rglob(".*.tmp"):
            if old(p):
                p.unlink(missing_ok=True)
                removed["temp_files"] += 1
        modules = {r["id"] for r in self._query("SELECT id FROM modules")}
        for d in (self.home / "modules").iterdir():
            if d.is_dir() and d.name not in modules and old(d):
                shutil.rmtree(d, ignore_errors=True)
                removed["module_dirs"] += 1
        tasks = {r["name"] for r in self._query("SELECT name FROM tasks")}
        files = {r["file"] for r in self._query("SELECT file FROM example_batches")}
        for d in (self.home / "tasks").iterdir():
            if d.name not in tasks:
                if old(d):
                    shutil.rmtree(d, ignore_errors=True)
                    removed["task_dirs"] += 1
                continue
            for f in (d / "examples").glob("*.npz"):
                if str(f.relative_to(self.home)) not in files and old(f):
                    f.unlink(missing_ok=True)
                    removed["example_files"] += 1
        return removed

    def garbage_collect(self, protected: set[str], min_age_s: float = 600.0) -> list[str]:
        """Remove modules no stored path version uses (and not protected, e.g. the root's).

        Young modules are spared: a registration or promotion stores its modules before the version
        row that references them.
        """
        keep = self.referenced_modules() | protected
        cutoff = datetime.fromtimestamp(time.time() - min_age_s, UTC).isoformat(timespec="seconds")
        gone = [r["id"] for r in self._query("SELECT id, created_at FROM modules")
                if r["id"] not in keep and r["created_at"] <= cutoff]
        if gone:
            with self._tx() as db:
                db.executemany("DELETE FROM modules WHERE id=?", [(m,) for m in gone])
            for m in gone:
                shutil.rmtree(self.module_dir(m), ignore_errors=True)
        return gone


def _task(r: Mapping) -> TaskRecord:
    return TaskRecord(r["name"], json.loads(r["labels"]), json.loads(r["source"]), r["status"],
                      r["current_version"], r["created_at"], r["root"] or "vit_tiny", r["image_size"] or 32,
                      r["uid"] or "", r["policy"] or "auto", json.loads(r["evolution"] or "{}"))


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidArgument(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    return policy


def check_evolution_settings(settings: dict, allow_zero: bool = False) -> dict:
    """Per-task evolution settings: known names, finite positive numbers (0 = the server's)."""
    out: dict = {}
    for k, v in settings.items():
        if k not in TASK_EVOLUTION_SETTINGS:
            raise InvalidArgument(f"unknown evolution setting {k!r}; known: {', '.join(TASK_EVOLUTION_SETTINGS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InvalidArgument(f"evolution setting {k} must be a finite number >= 0; got {v!r}")
        if v == 0:
            if allow_zero:
                out[k] = 0  # back to the server's
            continue
        if k == "candidates_per_generation":
            if v != int(v):
                raise InvalidArgument(f"candidates_per_generation must be a whole number; got {v!r}")
            v = int(v)
        if k == "scale_base" and not 0 < v <= 1:
            raise InvalidArgument(f"scale_base must be in (0, 1]; got {v!r}")
        out[k] = v
    return out


def _path(r: Mapping) -> PathRecord:
    return PathRecord(
        task=r["task"], version=r["version"], modules=json.loads(r["modules"]),
        hparams=json.loads(r["hparams"]), lineage=json.loads(r["lineage"]),
        validation_accuracy=r["validation_accuracy"], test_accuracy=r["test_accuracy"],
        score=r["score"], status=r["status"], created_at=r["created_at"],
    )


def _open_backend(home: Path, database_url: str) -> Backend:
    if not database_url:
        return SQLiteBackend(home / "munet.db")
    scheme = database_url.split("://", 1)[0] if "://" in database_url else ""
    if scheme not in ("postgresql", "postgres"):
        raise StoreError(f"database_url must be a postgresql:// URL (postgresql://user@host:port/database); got "
                         f"{scheme + '://...' if scheme else 'something else'}")
    import psycopg

    from munet.models.store_postgres import PostgresBackend, describe

    try:
        return PostgresBackend(database_url)
    except psycopg.ProgrammingError as e:  # a malformed URL
        raise StoreError(f"database_url is not a valid PostgreSQL URL: {e}") from None
    except psycopg.OperationalError as e:
        raise StoreError(f"cannot connect to the store's database {describe(database_url)}: "
                         f"{str(e).strip()}") from None
