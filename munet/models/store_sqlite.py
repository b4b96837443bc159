"""The store's metadata in SQLite: the embedded default, one file (`munet.db`) in the store's home.

WAL mode with `synchronous=FULL`: a call that returned has its rows on disk, even across power loss.
Write transactions are `BEGIN IMMEDIATE`: they take SQLite's one database write lock at once, so a
transaction's reads and writes are never interleaved with another writer's, in this process or any
other on the host (several server processes share the file). That lock is why the statements
`Store` runs need no row locks here (`for_update` is empty).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The tables of the first release (schema version 1), plus leases, which version 4 added: a fresh
# database starts from them at version 1 and the migrations below add the rest, so a fresh store and
# a migrated old one are the same by construction.
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    current_version INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS example_batches (
    id TEXT NOT NULL,
    task TEXT NOT NULL REFERENCES tasks(name) ON DELETE CASCADE,
    file TEXT NOT NULL,
    n_train INTEGER NOT NULL,
    n_validation INTEGER NOT NULL,
    n_test INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (task, id)
);
CREATE TABLE IF NOT EXISTS modules (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    params INTEGER NOT NULL,
    parent TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS path_versions (
    task TEXT NOT NULL REFERENCES tasks(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    modules TEXT NOT NULL,
    hparams TEXT NOT NULL,
    lineage TEXT NOT NULL,
    validation_accuracy REAL,
    test_accuracy REAL,
    score REAL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (task, version)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '{}',
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    expires_at REAL NOT NULL,
    acquired_at REAL NOT NULL
);
"""

# Migrations: MIGRATIONS[v] takes a database at schema version v to v + 1, inside the opening
# transaction (the list of versions is in store.py, beside SCHEMA_VERSION).


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    cols = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    if "root" not in cols:
        db.execute("ALTER TABLE tasks ADD COLUMN root TEXT")
    if "image_size" not in cols:
        db.execute("ALTER TABLE tasks ADD COLUMN image_size INTEGER")
    if "uid" not in cols:
        db.execute("ALTER TABLE tasks ADD COLUMN uid TEXT")
        db.execute("UPDATE tasks SET uid=lower(hex(randomblob(8))) WHERE uid IS NULL")
    # a first-release store was created with the committed ViT root at 32x32
    old = db.execute("SELECT value FROM meta WHERE key='root_modules'").fetchone()
    if old is not None:
        roots = {"vit_tiny": {"modules": json.loads(old[0]), "image_size": 32, "family": "vit"}}
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('roots', ?)", (json.dumps(roots),))
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('default_root', 'vit_tiny')")
        db.execute("DELETE FROM meta WHERE key='root_modules'")
    db.execute("UPDATE tasks SET root='vit_tiny' WHERE root IS NULL")
    db.execute("UPDATE tasks SET image_size=32 WHERE image_size IS NULL")


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    cols = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    if "policy" not in cols:
        db.execute("ALTER TABLE tasks ADD COLUMN policy TEXT NOT NULL DEFAULT 'auto'")
    if "evolution" not in cols:
        db.execute("ALTER TABLE tasks ADD COLUMN evolution TEXT NOT NULL DEFAULT '{}'")


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    pass  # CREATE TABLE IF NOT EXISTS leases (SCHEMA) already ran


FIRST_VERSION = 1  # what a fresh database (SCHEMA) is; the migrations take it from there
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3,
                                                                3: _migrate_3_to_4}


class SQLiteBackend:
    name = "sqlite"
    # BEGIN IMMEDIATE already holds the database's only write lock: nothing to add to a SELECT
    for_update = ""
    # seconds since the epoch by this host's clock (one SQLite store lives on one host); SQLite's
    # 'now' is fixed for the whole statement
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)
        self._lock = threading.RLock()
        self._own_commits = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a call that returned has its rows on disk, even across power loss
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")

    def migrate(self, target: int) -> int:
        """Create or upgrade the schema to `target`, in one transaction; returns the version the
        database is at now. A newer release's database (above `target`) is left untouched, for the
        caller to refuse."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                fresh = not self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='tasks'").fetchone()
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                if fresh or version == 0:
                    version = FIRST_VERSION  # stores written before versioning are the first release
                if version > target:
                    self._db.execute("ROLLBACK")
                    return version
                while version < target:
                    MIGRATIONS[version](self._db)
                    version += 1
                self._db.execute(f"PRAGMA user_version={target}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return version

    def schema_version(self) -> int:
        return self.query("PRAGMA user_version")[0][0]

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if self._db.total_changes != before:  # a transaction that wrote nothing changed nothing
                self._own_commits += 1

    def write_lock(self, db: sqlite3.Connection, name: str) -> None:
        pass  # BEGIN IMMEDIATE: every write transaction already runs alone

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def change_token(self) -> tuple[int, int]:
        """SQLite's data_version moves on other connections' commits, our own count on this one's.
        Costs one PRAGMA (microseconds)."""
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0], self._own_commits

    def wait_for_change(self, token: tuple, timeout_s: float, poll_s: float = 0.05) -> tuple:
        # SQLite has no notifications across processes; data_version is cheap enough to poll often
        deadline = time.monotonic() + timeout_s
        while True:
            latest = self.change_token()
            if latest != token or time.monotonic() >= deadline:
                return latest
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def integrity(self) -> str:
        """SQLite's own check of the database file: "ok", or what is wrong."""
        return "; ".join(r[0] for r in self.query("PRAGMA integrity_check"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

