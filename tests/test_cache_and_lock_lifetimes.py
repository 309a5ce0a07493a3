"""Every cache and lock waits a bounded time and is closed on every path: the teacher cache when
the instruction run fails half-way, the shared database's advisory lock (a timeout naming the
lock instead of waiting forever), the PostgreSQL teacher cache when its schema lock times out."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from maemi_core import shared_database
from maemi_core.shared_database import LockTimeout, advisory_lock, lock_key
from maemi_core.teacher import cache as cache_module
from tests.teacher_fixtures import teacher_project

URL = "postgresql://maemi:s3cret@db.example:5432/maemi"


def test_the_teacher_cache_is_closed_when_the_run_fails(tmp_path, monkeypatch):
    """A write that fails (a full disk) ends the run with its error, and the cache's connection is
    closed all the same, not left open until the process ends."""
    import maemi_core.teacher.instruction_set as instruction_set

    cfg, manifest, few_shot, groups = teacher_project(tmp_path, per_class=2, tasks=["caption"])
    opened = []

    class FullDisk(cache_module.TeacherCache):
        def put(self, *args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

    def open_cache(cfg, path):
        opened.append(FullDisk(path))
        return opened[-1]

    monkeypatch.setattr(instruction_set, "open_teacher_cache", open_cache)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        instruction_set.generate_instruction_set(cfg, manifest, few_shot, groups)
    (cache,) = opened
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        cache._db.execute("SELECT 1")


def test_the_sqlite_teacher_cache_is_a_context_manager_with_a_busy_timeout(tmp_path):
    with cache_module.TeacherCache(tmp_path / "c.sqlite") as cache:
        cache.put("k", "an answer", 1, 2, 1, {"teacher": "t"})
        assert cache.get("k")["text"] == "an answer"
        busy_ms = cache._db.execute("PRAGMA busy_timeout").fetchone()[0]
        assert busy_ms == cache_module.SQLITE_BUSY_TIMEOUT_S * 1000
    with pytest.raises(sqlite3.ProgrammingError):
        cache._db.execute("SELECT 1")


class FakeServer:
    """Advisory locks as a PostgreSQL server keeps them, for connections made by ``connect``."""

    def __init__(self):
        self.held: dict[int, "FakeConnection"] = {}
        self.connections: list[FakeConnection] = []

    def connect(self, url, statement_timeout_s=None):
        conn = FakeConnection(self, statement_timeout_s)
        self.connections.append(conn)
        return conn


class FakeConnection:
    def __init__(self, server: FakeServer, statement_timeout_s):
        self.server, self.statement_timeout_s, self.closed, self.tries = server, statement_timeout_s, False, 0

    def cursor(self):
        return FakeCursor(self)

    def close(self):
        self.closed = True
        for key in [k for k, c in self.server.held.items() if c is self]:   # the server releases on close
            del self.server.held[key]


class FakeCursor:
    def __init__(self, conn: FakeConnection):
        self.conn, self.result, self.description = conn, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql, args=()):
        assert not self.conn.closed
        held = self.conn.server.held
        if "pg_try_advisory_lock" in sql:
            self.conn.tries += 1
            free = args[0] not in held or held[args[0]] is self.conn
            if free:
                held[args[0]] = self.conn
            self.result = (free,)
        elif "pg_advisory_unlock" in sql:
            self.result = (held.pop(args[0], None) is self.conn,)
        elif "pg_advisory_lock" in sql:
            raise AssertionError("a blocking pg_advisory_lock waits forever")
        else:
            self.result = None

    def fetchone(self):
        return self.result


@pytest.fixture
def server(monkeypatch):
    srv = FakeServer()
    monkeypatch.setattr(shared_database, "connect", srv.connect)
    return srv


def test_a_held_advisory_lock_times_out_with_an_error_naming_the_lock(server):
    holder = server.connect(URL)
    server.held[lock_key("registry:maemi-elpv")] = holder
    started = time.monotonic()
    with pytest.raises(LockTimeout) as err:
        with advisory_lock(URL, "registry:maemi-elpv", timeout_s=0.3, poll_s=0.05):
            pytest.fail("entered a lock another connection holds")
    assert 0.3 <= time.monotonic() - started < 5
    message = str(err.value)
    assert "'registry:maemi-elpv'" in message and "0.3 s" in message
    assert "s3cret" not in message and "maemi:***@db.example" in message     # never the password
    assert isinstance(err.value, TimeoutError)
    waiter = server.connections[-1]
    assert waiter.closed and waiter.tries >= 3           # it polled, then closed its connection


def test_an_advisory_lock_freed_while_waiting_is_taken_and_released_on_every_path(server):
    key = lock_key("teacher-cache-schema")
    holder = server.connect(URL)
    server.held[key] = holder
    import threading

    threading.Timer(0.2, holder.close).start()           # the holder ends: the server frees its lock
    with pytest.raises(RuntimeError, match="boom"):
        with advisory_lock(URL, "teacher-cache-schema", timeout_s=10, poll_s=0.05):
            assert server.held[key] is server.connections[-1]
            raise RuntimeError("boom")
    assert key not in server.held and server.connections[-1].closed


def test_the_postgres_teacher_cache_closes_its_connection_when_the_schema_lock_times_out(server, monkeypatch):
    monkeypatch.setattr(cache_module, "PG_SCHEMA_LOCK_TIMEOUT_S", 0.2)
    server.held[lock_key("teacher-cache-schema")] = server.connect(URL)   # another worker, stuck
    with pytest.raises(LockTimeout, match="teacher-cache-schema"):
        cache_module.PostgresTeacherCache(URL)
    cache_conn, lock_conn = server.connections[1:]
    assert cache_conn.statement_timeout_s == cache_module.PG_STATEMENT_TIMEOUT_S
    assert cache_conn.closed and lock_conn.closed


def _open_and_write(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        with cache_module.TeacherCache(path) as cache:
            cache.put(f"key-{os.getpid()}", "text", 1, 1, 1, {"kind": "test"})
        results.put("ok")
    except Exception as e:       # reported to the parent, which asserts on it
        results.put(repr(e))


def test_processes_opening_a_new_teacher_cache_at_once_all_get_it(tmp_path):
    """Two runs that start at once open the same new cache file: both switch it to WAL, and sqlite
    answers one of them "database is locked" at once, without its busy timeout (this failed half
    of such starts of 8 processes before the retry). Every process must get the cache."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for rep in range(8):
        path = str(tmp_path / f"cache{rep}.sqlite")
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(path, barrier, results)) for _ in range(8)]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["ok"] * 8, got
        with cache_module.TeacherCache(path) as cache:
            assert len(cache) == 8
