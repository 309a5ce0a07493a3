"""A durable, content-addressed store of teacher answers (sqlite, one row per request).

Key: sha256 over the image hashes, the system and teacher prompt texts and the teacher's
identity (model and generation parameters, never secrets). Materializing again is free,
an interrupted generation resumes from what was committed, and changing one prompt of a
pack only misses the cache for that prompt. Failures are kept in their own table with the
error, so they are reported, not silently dropped, and retried on the next run.

Single host: a sqlite file (:class:`TeacherCache`). Many hosts: the same two tables in the
shared PostgreSQL database (:class:`PostgresTeacherCache`, :mod:`maemi_core.shared_database`);
:func:`open_teacher_cache` picks by configuration.

Both wait a bounded time (sqlite's busy timeout; PostgreSQL's connect and statement timeouts, the
schema lock's timeout) and are closed in ``finally`` by their users (they are context managers).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional


def cache_key(image_ids: list[str], system: str, prompt: str, identity: dict) -> str:
    payload = json.dumps({"images": image_ids, "system": system, "prompt": prompt, "teacher": identity},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


SQLITE_BUSY_TIMEOUT_S = 30.0       # a writer of the same file waits at most this long for another's lock
PG_STATEMENT_TIMEOUT_S = 120.0     # any statement of the PostgreSQL cache (row locks included)
PG_SCHEMA_LOCK_TIMEOUT_S = 120.0   # waiting for another worker creating the tables


class _Closing:
    """Context manager protocol: ``with open_teacher_cache(...) as cache:`` closes it on every path."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _answer(row) -> Optional[dict]:
    """A stored answer (text, prompt_tokens, completion_tokens, attempts, teacher, created) as a dict."""
    if row is None:
        return None
    return {"text": row[0], "prompt_tokens": row[1], "completion_tokens": row[2], "attempts": row[3],
            "teacher": json.loads(row[4]), "created": row[5]}


class TeacherCache(_Closing):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            self._create_schema()
        except BaseException:
            self._db.close()
            raise

    def _create_schema(self) -> None:
        """WAL mode and the tables, retried while another process holds the file's lock. Two runs
        that open a new cache at once race to switch it to WAL; sqlite then answers one of them
        "database is locked" at once, without its busy timeout (it would otherwise deadlock), so
        that one waits a moment and tries again, for at most ``SQLITE_BUSY_TIMEOUT_S``."""
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                if str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("""CREATE TABLE IF NOT EXISTS answers (
                    key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
                    attempts INTEGER, teacher TEXT, created REAL)""")
                self._db.execute("""CREATE TABLE IF NOT EXISTS failures (
                    key TEXT PRIMARY KEY, error TEXT, attempts INTEGER, teacher TEXT, last_at REAL)""")
                self._db.commit()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise sqlite3.OperationalError(
                        f"teacher cache {self.path} stayed locked for {SQLITE_BUSY_TIMEOUT_S:.0f} s by another "
                        f"process ({e}): is a run stuck? Stop it or wait, then start this one again") from e
                if self._db.in_transaction:
                    self._db.rollback()
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens, attempts, teacher, created FROM answers WHERE key=?",
                (key,)).fetchone()
        return _answer(row)

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, attempts: int,
            teacher: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, text, prompt_tokens, completion_tokens, attempts, json.dumps(teacher), time.time()))
            self._db.execute("DELETE FROM failures WHERE key=?", (key,))
            self._db.commit()

    def fail(self, key: str, error: str, attempts: int, teacher: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                             (key, error[:2000], attempts, json.dumps(teacher), time.time()))
            self._db.commit()

    def failures(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, error FROM failures").fetchall())

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS maemi_teacher_answers (
    key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
    attempts INTEGER, teacher TEXT, created DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS maemi_teacher_failures (
    key TEXT PRIMARY KEY, error TEXT, attempts INTEGER, teacher TEXT, last_at DOUBLE PRECISION);
"""


class PostgresTeacherCache(_Closing):
    """:class:`TeacherCache` in the shared PostgreSQL database: every worker host reads and
    writes the same answers. Same interface and semantics; one connection, serialised per process."""

    def __init__(self, url: str):
        from maemi_core.shared_database import advisory_lock, connect

        self.url = url
        self._lock = threading.Lock()
        self._db = connect(url, statement_timeout_s=PG_STATEMENT_TIMEOUT_S)
        try:
            with advisory_lock(url, "teacher-cache-schema", timeout_s=PG_SCHEMA_LOCK_TIMEOUT_S), \
                    self._db.cursor() as cur:
                cur.execute(_PG_SCHEMA)      # concurrent CREATE TABLE IF NOT EXISTS can race: one at a time
        except BaseException:
            self._db.close()
            raise

    def _one(self, sql: str, args: tuple = ()):
        with self._lock, self._db.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone() if cur.description else None

    def _all(self, sql: str, args: tuple = ()):
        with self._lock, self._db.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def get(self, key: str) -> Optional[dict]:
        row = self._one("SELECT text, prompt_tokens, completion_tokens, attempts, teacher, created "
                        "FROM maemi_teacher_answers WHERE key=%s", (key,))
        return _answer(row)

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, attempts: int,
            teacher: dict) -> None:
        with self._lock, self._db.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute("""INSERT INTO maemi_teacher_answers VALUES (%s, %s, %s, %s, %s, %s, %s)
                               ON CONFLICT (key) DO UPDATE SET text=EXCLUDED.text,
                                 prompt_tokens=EXCLUDED.prompt_tokens, completion_tokens=EXCLUDED.completion_tokens,
                                 attempts=EXCLUDED.attempts, teacher=EXCLUDED.teacher, created=EXCLUDED.created""",
                            (key, text, prompt_tokens, completion_tokens, attempts, json.dumps(teacher), time.time()))
                cur.execute("DELETE FROM maemi_teacher_failures WHERE key=%s", (key,))
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

    def fail(self, key: str, error: str, attempts: int, teacher: dict) -> None:
        with self._lock, self._db.cursor() as cur:
            cur.execute("""INSERT INTO maemi_teacher_failures VALUES (%s, %s, %s, %s, %s)
                           ON CONFLICT (key) DO UPDATE SET error=EXCLUDED.error, attempts=EXCLUDED.attempts,
                             teacher=EXCLUDED.teacher, last_at=EXCLUDED.last_at""",
                        (key, error[:2000], attempts, json.dumps(teacher), time.time()))

    def failures(self) -> dict[str, str]:
        return dict(self._all("SELECT key, error FROM maemi_teacher_failures"))

    def __len__(self) -> int:
        return self._one("SELECT COUNT(*) FROM maemi_teacher_answers")[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_teacher_cache(cfg, sqlite_path: str | Path):
    """The shared PostgreSQL cache when the profile's shared database is configured, else the
    sqlite file at ``sqlite_path``."""
    from maemi_core.shared_database import shared_database_url

    url = shared_database_url(cfg)
    return PostgresTeacherCache(url) if url else TeacherCache(sqlite_path)
