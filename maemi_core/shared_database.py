"""The database that hosts share when the project runs on many machines (README: "From one
machine to many").

Embedded default: nothing is shared; the teacher cache is a sqlite file in the workdir and the
promotion lock an fcntl lock on this host. When the environment variable named by
``operations.shared_database_env`` (default ``MAEMI_SHARED_DATABASE_URL``) holds a PostgreSQL
URL (``postgresql://user:password@host:5432/db``), every host uses that database instead:

- the teacher cache is a table there (:class:`maemi_core.teacher.cache.PostgresTeacherCache`),
  so a teacher answer paid for on one worker is reused by all;
- the promotion compare-and-move holds a PostgreSQL advisory lock keyed by the registered model's
  name (:func:`advisory_lock`); the server releases it when the holder's connection ends, so a
  killed worker never leaves the registry locked. A waiter gives up after a timeout
  (``DEFAULT_LOCK_TIMEOUT_S``, 600 s) with :class:`LockTimeout` naming the lock, instead of
  waiting forever behind a holder that hangs.

The URL carries a password, so it only ever comes from the environment and is never logged:
:func:`redacted` is what messages show.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

DEFAULT_ENV = "MAEMI_SHARED_DATABASE_URL"
DEFAULT_LOCK_TIMEOUT_S = 600.0


class SharedDatabaseError(RuntimeError):
    """The shared database is configured but cannot be used; the message says what to fix."""


class LockTimeout(SharedDatabaseError, TimeoutError):
    """An advisory lock was not free within its timeout."""


def shared_database_url(cfg=None) -> Optional[str]:
    """The configured PostgreSQL URL, or None for the embedded single-host default."""
    env = getattr(getattr(cfg, "operations", None), "shared_database_env", None) or DEFAULT_ENV
    url = os.environ.get(env, "").strip()
    if not url:
        return None
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise SharedDatabaseError(f"${env} must be a PostgreSQL URL (postgresql://user:password@host:port/db), "
                                  f"got scheme {scheme!r}; unset it to use the embedded single-host stores")
    return url


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, statement_timeout_s: Optional[float] = None):
    """A psycopg2 connection (autocommit) to ``url``; a clear error when it cannot be made.
    ``statement_timeout_s``: the server cancels any statement of this connection that runs (or
    waits for a lock) longer."""
    try:
        import psycopg2
    except ImportError as err:   # pragma: no cover - the deploy extra installs it
        raise SharedDatabaseError("a shared database is configured but psycopg2 is not installed: "
                                  "pip install -e '.[deploy]'") from err
    dsn = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    options = {} if statement_timeout_s is None else {"options": f"-c statement_timeout={int(statement_timeout_s * 1000)}"}
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10, **options)
    except psycopg2.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SharedDatabaseError(f"cannot reach the shared database {redacted(url)}: {first}. Start it "
                                  "(make deploy-up) or unset the variable for the single-host stores") from None
    conn.autocommit = True
    return conn


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"maemi:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(url: str, name: str, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
                  poll_s: float = 0.5) -> Iterator[None]:
    """Exclusive across every host that uses the database, for ``name``. Session-level: held on
    a connection of its own, released on exit, and by the server if this process dies. Waits at
    most ``timeout_s`` (trying every ``poll_s``), then raises :class:`LockTimeout` naming the
    lock; the connection is closed in every case."""
    key = lock_key(name)
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + timeout_s
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                if cur.fetchone()[0]:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(f"the shared lock {name!r} (advisory key {key} in {redacted(url)}) was not free "
                                      f"within {timeout_s:g} s: another process holds it. Find it with SELECT pid, "
                                      "backend_start, state, query FROM pg_stat_activity JOIN pg_locks USING (pid) "
                                      "WHERE locktype = 'advisory'; it is released when that process ends")
                time.sleep(min(poll_s, left))
            try:
                yield
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


@contextmanager
def host_file_lock(path, timeout_s: float, what: str, poll_s: float = 0.05) -> Iterator[None]:
    """Exclusive across the processes of this host (``fcntl.flock`` on ``path``): waits at most
    ``timeout_s``, then raises :class:`LockTimeout` naming ``what`` is held."""
    import fcntl
    import time
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what} was held by another process for {timeout_s:g} s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
