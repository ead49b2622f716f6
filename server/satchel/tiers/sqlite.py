"""The embedded overflow tier for one machine: a SQLite file in WAL mode.

* Safe across threads and processes (gunicorn workers): one connection per thread,
  and a fresh one after ``fork()`` (a connection is never used in two processes).
  WAL lets readers run while one writer writes; ``busy_timeout`` makes a writer wait
  for the lock instead of failing at once.
* Every row has an ``expires_at`` (Unix seconds, wall clock: the processes share it).
  Reads ignore expired rows; every ``purge_every`` writes one indexed ``DELETE``
  removes them, so the file does not grow without bound.
* ``max_bytes`` (optional) caps the file through ``max_page_count``; a write past it
  fails with :class:`~satchel.errors.TierFull`.
* Every :class:`sqlite3.Error` becomes :class:`~satchel.errors.TierFull` (disk or
  page cap full) or :class:`~satchel.errors.TierUnavailable` (locked, I/O error,
  corrupt file...). Nothing else escapes.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import TierError, TierFull, TierUnavailable
from .base import Tier, hash_tag

Clock = Callable[[], float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS satchel_kv (
    key        TEXT PRIMARY KEY,
    tag        TEXT,
    value      BLOB NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS satchel_kv_tag ON satchel_kv(tag) WHERE tag IS NOT NULL;
CREATE INDEX IF NOT EXISTS satchel_kv_expiry ON satchel_kv(expires_at);
"""
_UPSERT = "INSERT OR REPLACE INTO satchel_kv (key, tag, value, expires_at) VALUES (?, ?, ?, ?)"
# SQLite's default limit on bound parameters is 32766 (999 before 3.32); stay far below.
_CHUNK = 500
_FULL_CODES = {getattr(sqlite3, "SQLITE_FULL", 13)}


class SQLiteTier(Tier):
    """Key-value tier in one SQLite file, shared by every thread and process on a machine."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 1.0,
        purge_every: int = 256,
        max_bytes: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.path = Path(path).absolute()  # relative to the directory at start-up
        self.busy_timeout = busy_timeout
        self.purge_every = max(1, purge_every)
        self.max_bytes = max_bytes
        self.clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writes = itertools.count(1)
        #: (pid, connection) of every connection opened, to close them all in close()
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._schema_ready_pid: int | None = None

    def __repr__(self) -> str:
        return f"SQLiteTier({str(self.path)!r})"

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path),
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit; explicit BEGIN where atomicity matters
            check_same_thread=False,  # only ever used by the thread that opened it
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        mode = self._switch_to_wal(conn)
        if mode != "wal":
            conn.close()
            raise TierUnavailable(
                "the SQLite tier needs WAL mode, which this file system refused",
                tier=self.name,
                path=str(self.path),
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        if self.max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(16, self.max_bytes // page_size)}")
        pid = os.getpid()
        if self._schema_ready_pid != pid:
            conn.executescript(_SCHEMA)
            self._schema_ready_pid = pid
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """Put the file in WAL mode (it stays so) and return the journal mode.

        Changing the journal mode does not wait on the busy handler: connections that
        open a new file at the same moment (threads, or gunicorn workers on their first
        request) get "database is locked" at once. Only one of them needs to succeed,
        so the others retry until the busy timeout rather than fail the request.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                row = conn.execute("PRAGMA journal_mode").fetchone()
                if row and str(row[0]).lower() == "wal":
                    return "wal"
                row = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(row[0]).lower() if row else ""
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.002)  # another connection is switching it right now

    def _conn(self) -> sqlite3.Connection:
        pid = os.getpid()
        local = self._local
        if getattr(local, "pid", None) != pid or local.conn is None:
            # After fork() the parent's connection is abandoned, never closed or used.
            local.conn = self._connect()
            local.pid = pid
            with self._lock:
                self._conns.append((pid, local.conn))
        return local.conn

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except TierError:
            raise
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            message = str(exc).lower()
            facts: dict[str, Any] = {
                "tier": self.name,
                "op": op,
                "error": type(exc).__name__,
                "detail": str(exc),
            }
            if code in _FULL_CODES or "full" in message:
                raise TierFull(f"the SQLite tier is full ({op})", **facts) from exc
            if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
                self._drop_conn()  # e.g. closed by close(): reconnect next time
            raise TierUnavailable(f"the SQLite tier failed ({op}): {exc}", **facts) from exc
        except OSError as exc:
            raise TierUnavailable(
                f"the SQLite tier failed ({op}): {exc}", tier=self.name, op=op
            ) from exc

    def _drop_conn(self) -> None:
        self._local.conn = None

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        if next(self._writes) % self.purge_every == 0:
            conn.execute("DELETE FROM satchel_kv WHERE expires_at <= ?", (now,))

    # -- Tier --------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("get_many"):
            conn = self._conn()
            now = self.clock()
            unique = list(dict.fromkeys(keys))
            found: dict[str, bytes] = {}
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT key, value FROM satchel_kv WHERE key IN ({marks}) "  # noqa: S608
                    "AND expires_at > ?",
                    (*chunk, now),
                )
                found.update((k, bytes(v)) for k, v in rows)
            return [found.get(k) for k in keys]

    def put(self, key: str, value: bytes, ttl: float) -> None:
        with self._errors("put"):
            conn = self._conn()
            now = self.clock()
            conn.execute(_UPSERT, (key, hash_tag(key), bytes(value), now + max(ttl, 0.001)))
            self._maybe_purge(conn, now)

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._errors("delete"):
            conn = self._conn()
            now = self.clock()
            unique = list(dict.fromkeys(keys))
            count = 0
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                count += (
                    conn.execute(
                        f"DELETE FROM satchel_kv WHERE key IN ({marks}) "  # noqa: S608
                        "RETURNING expires_at > ?",
                        (*chunk, now),
                    )
                    .fetchall()
                    .count((1,))
                )
            return count

    def expire_soon(self, keys: Sequence[str], ttl: float) -> None:
        if not keys:
            return
        with self._errors("expire_soon"):
            conn = self._conn()
            due = self.clock() + max(ttl, 0.001)
            unique = list(dict.fromkeys(keys))
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                conn.execute(
                    f"UPDATE satchel_kv SET expires_at = ? WHERE key IN ({marks}) "  # noqa: S608
                    "AND expires_at > ?",
                    (due, *chunk, due),
                )

    def delete_session(self, session_tag: str) -> int:
        with self._errors("delete_session"):
            conn = self._conn()
            rows = conn.execute(
                "DELETE FROM satchel_kv WHERE tag = ? RETURNING expires_at > ?",
                (session_tag, self.clock()),
            ).fetchall()
            return rows.count((1,))

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        with self._errors("compare_and_set_mark"):
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock()
                row = conn.execute(
                    "SELECT value FROM satchel_kv WHERE key = ? AND expires_at > ?", (key, now)
                ).fetchone()
                current = None if row is None else bytes(row[0])
                if current != expected:
                    conn.execute("ROLLBACK")
                    return b"" if current is None else current
                conn.execute(_UPSERT, (key, hash_tag(key), bytes(new), now + max(ttl, 0.001)))
                conn.execute("COMMIT")
                return None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def ping(self) -> None:
        with self._errors("ping"):
            self._conn().execute("SELECT 1").fetchone()

    def purge_expired(self) -> int:
        """Delete every expired row now; returns how many."""
        with self._errors("purge"):
            return (
                self._conn()
                .execute("DELETE FROM satchel_kv WHERE expires_at <= ?", (self.clock(),))
                .rowcount
            )

    def close(self) -> None:
        """Close every connection this process opened (other threads reconnect on use)."""
        pid = os.getpid()
        with self._lock:
            mine = [c for p, c in self._conns if p == pid]
            self._conns = [(p, c) for p, c in self._conns if p != pid]
        for conn in mine:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


__all__ = ["SQLiteTier"]
