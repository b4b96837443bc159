"""The store's behaviour, on both metadata backends (SQLite in the home; PostgreSQL, a private server
per session): every test taking `store` or `open_store` runs once per backend. Two Store objects on
one home and database are what two processes (or hosts) see."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psycopg
import pytest
import torch

from munet.errors import AlreadyExists, InvalidArgument, NotFound
from munet.models import store_postgres, store_sqlite
from munet.models.modules import build_module
from munet.models.store import SCHEMA_VERSION, Expectation, PathRecord, Store, StoreError, Superseded


def _head(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_module("head", {"dim": 8, "num_classes": 3})


def _task_with_version(store: Store, name: str = "t", seed: int = 0) -> tuple[str, PathRecord]:
    mid = store.put_module(_head(seed))
    store.create_task(name, ["a", "b", "c"], {"kind": "test"})
    rec = store.add_path_version(PathRecord(name, 0, [mid]))
    store.set_current(name, rec.version)
    return mid, rec


def _other_connection(store_url: str, home):
    """A raw connection to the store's database, as an operator (or an older release) would open it."""
    if store_url:
        return psycopg.connect(store_url, autocommit=True)
    import sqlite3

    return sqlite3.connect(home / "munet.db", isolation_level=None)


# ---- schema ---------------------------------------------------------------------------------------

def test_a_new_store_is_at_the_current_schema_version(store, store_url):
    assert store.schema_version == SCHEMA_VERSION
    assert store.backend == ("postgres" if store_url else "sqlite")
    assert store.integrity() == "ok"


@pytest.mark.parametrize("backend", [store_sqlite, store_postgres])
def test_every_backend_has_a_migration_for_every_step_to_the_current_version(backend):
    first = getattr(backend, "FIRST_VERSION", None) or backend.CREATED_AT_VERSION
    assert first <= SCHEMA_VERSION
    assert sorted(backend.MIGRATIONS) == list(range(first, SCHEMA_VERSION))


def test_a_store_from_a_newer_release_is_refused_and_left_as_it_is(open_store, store_url, tmp_path):
    s = open_store()
    s.create_task("kept", ["a"], {"kind": "test"})
    s.close()
    db = _other_connection(store_url, tmp_path / "home")
    db.execute(f"UPDATE munet_schema SET version={SCHEMA_VERSION + 1}" if store_url
               else f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="upgrade munet-serve"):
        open_store()
    version = db.execute("SELECT version FROM munet_schema" if store_url else "PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION + 1
    assert db.execute("SELECT name FROM tasks").fetchall() == [("kept",)]
    db.close()


# ---- tasks, versions, the pointer -----------------------------------------------------------------

def test_a_task_is_created_once_and_bad_names_are_refused(store):
    t = store.create_task("cats", ["a", "b"], {"kind": "test"}, root="vit_tiny", image_size=32, policy="approve",
                          evolution={"candidates_per_generation": 3})
    assert store.get_task("cats") == t and t.status == "creating" and t.current_version is None
    with pytest.raises(AlreadyExists):
        store.create_task("cats", ["x"], {"kind": "other"})
    assert store.get_task("cats").labels == ["a", "b"]  # the refused call changed nothing
    for bad in ("", "Cats", "-x", "a" * 64, "a/b"):
        with pytest.raises(InvalidArgument):
            store.create_task(bad, ["a"], {})
    with pytest.raises(InvalidArgument):
        store.create_task("dogs", ["a"], {}, policy="sometimes")
    assert [t.name for t in store.list_tasks()] == ["cats"]
    with pytest.raises(NotFound):
        store.get_task("dogs")
    assert store.set_policy("cats", "frozen", {"scale_base": 0.5}).evolution == {"candidates_per_generation": 3,
                                                                               "scale_base": 0.5}
    assert store.set_policy("cats", evolution={"candidates_per_generation": 0}).evolution == {"scale_base": 0.5}


def test_the_pointer_flips_only_under_its_expectation(store):
    mid, v1 = _task_with_version(store)
    uid = store.get_task("t").uid
    v2 = store.add_path_version(PathRecord("t", 0, [mid], score=0.5), expect_uid=uid)
    assert (v1.version, v2.version) == (1, 2)
    refusals = [Expectation("another-uid", 1), Expectation(uid, 2), Expectation(uid, 1, policies=("approve",))]
    for expect in refusals:
        with pytest.raises(Superseded):
            store.set_current("t", 2, expect=expect)
    with pytest.raises(NotFound):
        store.set_current("t", 7)
    with pytest.raises(NotFound):
        store.set_current("nobody", 1)
    assert store.get_task("t").current_version == 1  # every refusal left the pointer where it was
    store.set_current("t", 2, expect=Expectation(uid, 1, policies=("auto",)))
    assert store.get_task("t").current_version == 2
    assert [(v.version, v.status) for v in store.list_versions("t")] == [(1, "retired"), (2, "current")]
    assert store.get_path("t").score == 0.5 and store.current_paths()["t"].version == 2


def test_a_version_for_a_task_registered_again_is_refused(store):
    mid, _ = _task_with_version(store)
    old_uid = store.get_task("t").uid
    store.delete_task("t")
    store.create_task("t", ["a"], {"kind": "test"})
    with pytest.raises(Superseded):
        store.add_path_version(PathRecord("t", 0, [mid]), expect_uid=old_uid)
    with pytest.raises(NotFound):
        store.add_path_version(PathRecord("nobody", 0, [mid]))
    with pytest.raises(NotFound):
        store.add_path_version(PathRecord("t", 0, ["not-a-module"]))
    assert store.list_versions("t") == []


def test_pruning_keeps_the_current_and_pending_versions(store):
    mid, _ = _task_with_version(store)
    for status in ("candidate", "rejected", "pending", "failed", "candidate"):
        rec = store.add_path_version(PathRecord("t", 0, [mid]))
        store.set_path_status("t", rec.version, status, note=f"was {status}")
    assert store.get_path("t", 4).lineage == {"note": "was pending"}
    dropped = store.prune_versions("t", keep=3)
    assert sorted(dropped) == [2, 3, 6]  # rejected first, then candidates
    assert [(v.version, v.status) for v in store.list_versions("t")] == [(1, "current"), (4, "pending"), (5, "failed")]


def test_scores_and_lineage_update_in_place(store):
    _task_with_version(store)
    store.update_path("t", 1, validation_accuracy=0.75, test_accuracy=0.5, score=0.7, lineage={"why": "test"},
                      status="ignored")
    rec = store.get_path("t", 1)
    assert (rec.validation_accuracy, rec.test_accuracy, rec.score, rec.lineage, rec.status) == (
        0.75, 0.5, 0.7, {"why": "test"}, "current")


# ---- modules, examples, events, meta ----------------------------------------------------------------

def test_modules_are_stored_once_by_content(store):
    head = _head(0)
    mid = store.put_module(head)
    assert store.put_module(_head(0)) == mid and store.put_module(_head(1)) != mid
    rec = store.module_record(mid)
    assert rec.kind == "head" and rec.params == sum(p.numel() for p in head.parameters())
    loaded = store.load_module(mid)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values(),
                                                 strict=True))
    store.put_onnx(mid, b"onnx bytes")
    assert store.onnx_path(mid).read_bytes() == b"onnx bytes"
    with pytest.raises(NotFound):
        store.module_record("nothing")


def test_examples_are_stored_per_batch_and_bad_batches_store_nothing(store):
    store.create_task("t", ["a", "b"], {"kind": "test"}, image_size=8)
    x = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    assert store.add_examples("t", x, np.array([0, 1, 0, 1]), np.array([0, 0, 1, 2])) == {
        "train": 2, "validation": 1, "test": 1}
    v1 = store.examples_version("t")
    with pytest.raises(InvalidArgument):
        store.add_examples("t", np.zeros((2, 9, 9, 3), np.uint8), np.zeros(2), np.zeros(2))
    with pytest.raises(InvalidArgument):
        store.add_examples("t", x, np.zeros(3), np.zeros(4))
    with pytest.raises(NotFound):
        store.add_examples("nobody", x, np.zeros(4), np.zeros(4))
    assert store.examples_version("t") == v1 and store.example_counts("t") == {"train": 2, "validation": 1, "test": 1}
    xs, ys = store.load_examples("t", 0)
    assert np.array_equal(xs, x[:2]) and ys.tolist() == [0, 1]
    known = store.example_batch_ids("t")
    store.add_examples("t", x[:1], np.array([1]), np.array([0]))
    assert store.examples_version("t") != v1
    assert len(store.load_examples_except("t", known)[0]) == 1
    assert len(list((store.home / "tasks" / "t" / "examples").glob("*.npz"))) == 2


def test_events_are_read_in_order_by_task_and_from_an_id(store):
    ids = [store.add_event("a", "registered"), store.add_event("b", "registered"),
           store.add_event("a", "promoted", 2, by="operator")]
    assert ids == sorted(ids) and store.last_event_id() == ids[-1]
    assert [e["id"] for e in store.events(task="a")] == [ids[0], ids[2]]
    e = store.events(after=ids[1])[0]
    assert (e["task"], e["kind"], e["version"], e["detail"]) == ("a", "promoted", 2, {"by": "operator"})


def test_meta_values_are_replaced(store):
    assert store.get_meta("k") is None
    store.set_meta("k", "1")
    store.set_meta("k", "2")
    assert store.get_meta("k") == "2"


def test_deleting_a_task_removes_its_rows_and_files_and_gc_keeps_what_versions_use(store):
    mid, _ = _task_with_version(store)
    store.create_task("other", ["a"], {"kind": "test"}, image_size=8)
    store.add_examples("other", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2), np.zeros(2))
    unused = store.put_module(_head(5))
    assert store.garbage_collect(protected=set(), min_age_s=0) == [unused]
    assert not store.module_dir(unused).exists() and store.has_module(mid)
    store.delete_task("other")
    assert not (store.home / "tasks" / "other").exists()
    assert store.example_counts("other") == {"train": 0, "validation": 0, "test": 0}
    with pytest.raises(NotFound):
        store.delete_task("other")


def test_recovery_removes_only_files_no_row_names(store):
    mid, _ = _task_with_version(store)
    store.create_task("t2", ["a"], {"kind": "test"}, image_size=8)
    store.add_examples("t2", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2), np.zeros(2))
    orphans = [store.home / "modules" / "orphan", store.home / "tasks" / "never-registered",
               store.home / "tasks" / "t2" / "examples"]
    for d in orphans:
        d.mkdir(parents=True, exist_ok=True)
    (orphans[0] / "weights.safetensors").write_bytes(b"x")
    (orphans[2] / "uncommitted.npz").write_bytes(b"x")
    (store.home / "modules" / f".{mid}.tmp").write_bytes(b"x")
    assert store.recover(min_age_s=3600) == {"temp_files": 0, "module_dirs": 0, "example_files": 0, "task_dirs": 0}
    removed = store.recover(min_age_s=0)
    assert removed == {"temp_files": 1, "module_dirs": 1, "example_files": 1, "task_dirs": 1}
    assert store.has_module(mid) and store.example_counts("t2")["train"] == 2
    assert len(store.load_examples("t2", 0)[0]) == 2


# ---- leases and change notification (several processes on one store) -------------------------------

def test_a_lease_has_one_holder_until_it_is_released_or_expires(open_store):
    a, b = open_store(), open_store()  # two processes
    assert a.lease("evolution") is None
    assert a.acquire_lease("evolution", "a", 30.0, {"grpc": "host-a:50051"})
    assert not b.acquire_lease("evolution", "b", 30.0)
    seen = b.lease("evolution")
    assert seen["holder"] == "a" and seen["info"] == {"grpc": "host-a:50051"} and 29 < seen["expires_in_s"] <= 30
    time.sleep(0.05)
    assert a.acquire_lease("evolution", "a", 30.0)  # a renewal keeps when it was first taken
    assert b.lease("evolution")["held_for_s"] >= 0.05
    b.release_lease("evolution", "b")  # not b's: nothing happens
    assert b.lease("evolution")["holder"] == "a"
    a.release_lease("evolution", "a")
    assert b.lease("evolution") is None and b.acquire_lease("evolution", "b", 0.3)
    assert not a.acquire_lease("evolution", "a", 30.0)
    time.sleep(0.4)  # b died without releasing: its lease runs out
    assert a.lease("evolution") is None
    assert a.acquire_lease("evolution", "a", 30.0) and a.lease("evolution")["held_for_s"] < 1.0


def test_a_commit_by_another_process_changes_the_token_promptly(open_store):
    a, b = open_store(), open_store()
    token = a.change_token()
    assert a.change_token() == token and a.wait_for_change(token, 0.2) == token  # nothing happened
    b.create_task("new", ["a"], {"kind": "test"})
    t0 = time.monotonic()
    latest = a.wait_for_change(token, 10.0)
    assert latest != token and time.monotonic() - t0 < 0.5
    own = a.change_token()
    a.set_meta("k", "v")
    assert a.change_token() != own  # its own commits show at once
    # a refused lease bid writes nothing, and wakes nobody (every follower bids every few seconds)
    assert b.acquire_lease("evolution", "b", 30.0)
    time.sleep(0.2)
    quiet = a.change_token()
    assert not a.acquire_lease("evolution", "a", 30.0)
    assert b.wait_for_change(b.change_token(), 0.3) == b.change_token()
    time.sleep(0.1)
    assert a.change_token() == quiet


def test_a_waiter_wakes_when_another_thread_commits(open_store):
    a, b = open_store(), open_store()
    token = a.change_token()
    woke: list[float] = []

    def wait() -> None:
        t0 = time.monotonic()
        a.wait_for_change(token, 10.0)
        woke.append(time.monotonic() - t0)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    assert not woke  # nothing committed yet
    b.set_meta("k", "v")
    t.join(5)
    assert woke and woke[0] < 1.0


# ---- concurrent writers (each a Store: another process's connection) -------------------------------

def _race(stores: list[Store], work) -> list:
    """Run work(store, i) on every store at once; returns each result or the exception it raised."""
    barrier = threading.Barrier(len(stores))
    results: list = [None] * len(stores)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(stores[i], i)
        except Exception as e:  # noqa: BLE001 - the caller looks at what each got
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_racing_writers_number_versions_without_gaps_or_duplicates(open_store):
    stores = [open_store() for _ in range(4)]
    mid, _ = _task_with_version(stores[0])
    results = _race(stores, lambda s, i: [s.add_path_version(PathRecord("t", 0, [mid])).version for _ in range(5)])
    assert sorted(v for r in results for v in r) == list(range(2, 22))
    assert [v.version for v in stores[0].list_versions("t")] == list(range(1, 22))


def test_racing_flips_under_one_expectation_promote_exactly_one(open_store):
    stores = [open_store() for _ in range(4)]
    mid, _ = _task_with_version(stores[0])
    uid = stores[0].get_task("t").uid
    candidates = [stores[0].add_path_version(PathRecord("t", 0, [mid])).version for _ in stores]
    results = _race(stores, lambda s, i: s.set_current("t", candidates[i], expect=Expectation(uid, 1)))
    won = [c for c, r in zip(candidates, results, strict=True) if r is None]
    assert len(won) == 1 and all(isinstance(r, Superseded) for r in results if r is not None)
    assert stores[0].get_task("t").current_version == won[0]
    assert [v.status for v in stores[0].list_versions("t")].count("current") == 1


def test_racing_bids_for_a_lease_and_registrations_of_a_name_have_one_winner(open_store):
    stores = [open_store() for _ in range(4)]
    got = _race(stores, lambda s, i: s.acquire_lease("evolution", f"holder-{i}", 30.0))
    assert got.count(True) == 1 and got.count(False) == 3
    assert stores[0].lease("evolution")["holder"] == f"holder-{got.index(True)}"
    made = _race(stores, lambda s, i: s.create_task("same", [str(i)], {"kind": "test"}))
    assert sum(not isinstance(r, Exception) for r in made) == 1
    assert all(isinstance(r, AlreadyExists) for r in made if isinstance(r, Exception))


def test_a_follower_reading_events_after_the_last_it_saw_misses_none(open_store):
    writers = [open_store() for _ in range(3)]
    reader = open_store()
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        last = 0
        while True:
            finished = done.is_set()  # read before the poll: the last poll sees every commit
            for e in reader.events(after=last):
                seen.append(e["id"])
                last = e["id"]
            if finished:
                return
            time.sleep(0.001)

    t = threading.Thread(target=follow)
    t.start()
    written = _race(writers, lambda s, i: [s.add_event(f"t{i}", "registered") for _ in range(30)])
    done.set()
    t.join(30)
    assert seen == sorted(v for r in written for v in r)  # every id, each once, in order


# ---- opening a store: bad settings are refused, nothing is changed ----------------------------------

def test_a_database_url_that_is_not_postgresql_is_refused(tmp_path):
    for url in ("mysql://u@h/db", "munet.db", "postgresql://host:notaport/db"):
        with pytest.raises(StoreError, match="postgresql"):
            Store(tmp_path / "h", url)


def test_an_unreachable_database_is_a_clear_error_without_the_password(tmp_path, postgres):
    url = f"postgresql://munet:s3cret@/postgres?host={postgres.sockets}&port=1"  # no server on that socket
    with pytest.raises(StoreError, match="cannot connect to the store's database") as e:
        Store(tmp_path / "h", url)
    assert "s3cret" not in str(e.value)


def test_a_home_of_another_store_is_refused_and_keeps_its_files(tmp_path, postgres):
    first, second = postgres.create_database(), postgres.create_database()
    home = tmp_path / "shared"
    s = Store(home, first)
    mid, _ = _task_with_version(s)
    store_id = (home / "store-id").read_text()
    s.close()
    with pytest.raises(StoreError, match="already holds a store's files"):
        Store(home, second)  # a new database over a used directory
    with pytest.raises(StoreError, match="no store-id file"):
        Store(tmp_path / "empty", first)  # the shared directory not mounted
    sqlite_home = tmp_path / "embedded"
    Store(sqlite_home).close()
    with pytest.raises(StoreError, match="already holds"):
        Store(sqlite_home, second)
    s = Store(home, first)
    try:
        assert (home / "store-id").read_text() == store_id and s.has_module(mid)
        assert s.get_task("t").current_version == 1
    finally:
        s.close()
        postgres.drop_database(first)
        postgres.drop_database(second)


def test_a_database_with_foreign_tables_is_refused(tmp_path, database_url):
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("CREATE TABLE tasks (id int)")
    with pytest.raises(RuntimeError, match="not a munet store"):
        Store(tmp_path / "h", database_url)
    with psycopg.connect(database_url, autocommit=True) as c:
        assert c.execute("SELECT to_regclass('munet_schema')").fetchone()[0] is None


def test_a_store_outlives_its_dropped_connections(tmp_path, database_url):
    s = Store(tmp_path / "h", database_url)
    try:
        _task_with_version(s)
        token = s.change_token()
        with psycopg.connect(database_url, autocommit=True) as c:  # a restart or a failover, as the store sees it
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert s.get_task("t").current_version == 1  # a read is repeated on a new connection
        assert s.wait_for_change(token, 10.0) != token  # notifications may have been missed: followers re-read
        s.set_meta("after", "reconnect")
        assert s.get_meta("after") == "reconnect"
    finally:
        s.close()


def test_the_files_of_a_postgresql_store_are_where_its_home_says(tmp_path, database_url):
    home = tmp_path / "shared"
    s = Store(home, database_url)
    try:
        mid, _ = _task_with_version(s)
        assert (home / "modules" / mid / "weights.safetensors").is_file()
        assert not (home / "munet.db").exists() and (home / "store-id").is_file()
        assert s.location.startswith("postgresql://munet@") and os.fspath(home) not in s.location
    finally:
        s.close()


# ---- end to end: servers on PostgreSQL -----------------------------------------------------------------

@pytest.mark.slow
def test_servers_on_postgresql_register_evolve_in_the_worker_and_predict(tmp_path, database_url):
    from conftest import fast_config, register_digits, wait_until

    from munet.app import App

    home = tmp_path / "shared"  # the directory every host mounts
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    first = App.build(fast_config(home, database_url=database_url))
    second = None
    try:
        first.start()
        assert first.store.backend == "postgres" and not (home / "munet.db").exists()
        register_digits(first, "digits", max_examples=300)
        assert first.core.predict_sync("digits", x)[0].version == 1
        # a generation in the evolution process, which opens the store its server names
        first.store.update_path("digits", 1, score=0.0)  # any candidate now beats the incumbent
        report = first.evolution.run("digits", candidates=1)
        assert report is not None and report.error == "" and report.promoted, report
        assert not (home / "munet.db").exists()  # nobody fell back to SQLite in the shared directory
        wait_until(lambda: first.core.runtime.get("digits").version == report.promoted_version,
                   what="the promoted version to be served")
        # another server (another host) on the same database and directory serves the same
        second = App.build(fast_config(home, database_url=database_url))
        second.start()
        served = second.core.runtime.get
        wait_until(lambda: (p := served("digits")) is not None and p.version == report.promoted_version,
                   what="the second server to serve the promoted version")
        assert np.array_equal(first.core.predict_sync("digits", x)[1], second.core.predict_sync("digits", x)[1])
        kinds = [e["kind"] for e in second.store.events(task="digits")]
        assert kinds[:1] == ["registered"] and "promoted" in kinds
    finally:
        for app in (second, first):
            if app is not None:
                app.close()
