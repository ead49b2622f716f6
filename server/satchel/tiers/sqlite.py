"""The embedded overflow tier for one machine: a SQLite file in WAL mode.

* Safe across threads and processes (gunicorn workers): one connection per thread,
  and a fresh one after ``fork()`` (a connection is never used in two processes). The
  connection of a thread that has ended is closed when another thread connects, so a
  server that starts a thread per request does not pile up connections.
  WAL lets readers run while one writer writes; ``busy_timeout`` makes a writer wait
  for the lock instead of failing at once.
* Every row has an ``expires_at`` (Unix seconds, wall clock: the processes share it).
  Reads ignore expired rows; the first write of each process and every
  ``purge_every``-th after it run one indexed ``DELETE`` of up to ``PURGE_BATCH`` of
  them (bounded: a backlog after a clock jump must not hold the write lock for seconds
  inside one request), so the file does not grow without bound, even when gunicorn
  recycles workers (``--max-requests``) before any one of them reaches
  ``purge_every`` writes.
* ``max_bytes`` (optional) caps the database file through ``max_page_count``, and
  keeps the WAL near it (a checkpoint every quarter of the cap, ``journal_size_limit``
  after it); a write past it first purges expired rows, and fails with
  :class:`~satchel.errors.TierFull` only if the file is still full.
* A file deleted or replaced while the app runs (an operator clearing a broken tier)
  is noticed on the next call: each thread's connection is bound to the file's inode,
  and a changed one reconnects (creating the file and table again), rather than going
  on writing to an unlinked file that no new process can read.
* What can never work fails at construction (start-up) with
  :class:`~satchel.errors.ConfigurationError`: an option out of range, a path whose
  parent is a file or that is a directory, and (with ``create=False``) a file that
  does not exist or holds no tier (no ``satchel_kv`` table: an app's own database, an
  empty file), which is left untouched. A directory that does not exist yet is
  created on first use. An existing file that is not an SQLite database is logged as
  an error and the tier fails every call (``tier_unavailable``) until the file is
  replaced: it may be the tier's own file, damaged, and a worker that restarts
  (gunicorn's ``max_requests``, a crash) must not take the whole server down over its
  optional tier.
* Every :class:`sqlite3.Error` becomes :class:`~satchel.errors.TierFull` (disk or
  page cap full) or :class:`~satchel.errors.TierUnavailable` (locked, I/O error,
  corrupt file...). Nothing else escapes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, TierError, TierFull, TierUnavailable
from .base import CLAIM_HELD, ClaimHeld, Companion, Tier, hash_tag

Clock = Callable[[], float]

log = logging.getLogger("satchel.tiers")

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
#: The claim's and the key's live values, as bytes (NULL when there is none).
_CAS_STATE = (
    "SELECT (SELECT CAST(value AS BLOB) FROM satchel_kv "
    "WHERE key = :claim AND expires_at > :now), "
    "(SELECT CAST(value AS BLOB) FROM satchel_kv WHERE key = :key AND expires_at > :now)"
)


@functools.cache  # eight shapes in all: built once each, not on every save
def _cas_statement(rows: int, *, claimed: bool, new_key: bool) -> str:
    """An INSERT of ``rows`` rows (:k0, :t0, :v0, :e0, ...) that writes them only when
    the key holds what is expected (no live row, for a new key) and, when ``claimed``,
    no other holder's claim is live. SQLite reads the guard before it writes any row
    (an INSERT that selects from its own table is materialized first): both or none."""
    compare = (
        "NOT EXISTS (SELECT 1 FROM satchel_kv WHERE key = :key AND expires_at > :now)"
        if new_key
        else "EXISTS (SELECT 1 FROM satchel_kv WHERE key = :key AND expires_at > :now "
        "AND CAST(value AS BLOB) = :expected)"
    )
    if claimed:  # a live, non-empty claim of another holder refuses the write
        compare += (
            " AND NOT EXISTS (SELECT 1 FROM satchel_kv WHERE key = :claim "
            "AND expires_at > :now AND length(CAST(value AS BLOB)) > 0 "
            "AND (:holder IS NULL OR CAST(value AS BLOB) != :holder))"
        )
    arms = " UNION ALL ".join(
        f"SELECT :k{i}, :t{i}, :v{i}, :e{i} WHERE {compare}" for i in range(rows)
    )
    return f"INSERT OR REPLACE INTO satchel_kv (key, tag, value, expires_at) {arms}"


#: The row, unless the mark (key ?5) holds the refused value (?6) and is live (?7).
_UPSERT_UNLESS_MARKED = (
    "INSERT OR REPLACE INTO satchel_kv (key, tag, value, expires_at) "
    "SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (SELECT 1 FROM satchel_kv "
    "WHERE key = ?5 AND CAST(value AS BLOB) = ?6 AND expires_at > ?7)"
)
# SQLite's default limit on bound parameters is 32766 (999 before 3.32); stay far below.
_CHUNK = 500
_FULL_CODES = {getattr(sqlite3, "SQLITE_FULL", 13)}
# The first 16 bytes of every SQLite database file (an empty file is a new database).
_HEADER = b"SQLite format 3\x00"
# max_page_count below 16 pages leaves no room for the schema: the cap is raised to it.
MIN_MAX_BYTES = 64 * 1024
#: Expired rows one routine purge deletes at most (one indexed range of the expiry index).
PURGE_BATCH = 500
_PURGE = (
    "DELETE FROM satchel_kv WHERE key IN (SELECT key FROM satchel_kv WHERE expires_at <= ? LIMIT ?)"
)

#: A value as bytes whatever its storage class: a row someone wrote as TEXT (or a
#: number) reads as its bytes, which fail the segment's digest (segment_corrupt, that
#: session only) instead of raising in the driver (a tier failure that counted against
#: the breaker for every session; TEXT that is not UTF-8 failed to decode at all).
_VALUE_AS_BYTES = "CAST(value AS BLOB)"

_NO_TIER = (
    "no Satchel tier in {path}: the file exists but has no satchel_kv table (an "
    "app's own database, or an empty file?), and it is left as it was; name the "
    "tier's own file (the app creates its table on first use)"
)

#: What each option must be (the message of the ConfigurationError when it is not).
OPTION_RULES = {
    "busy_timeout": "must be a number of seconds >= 0",
    "max_bytes": f"must be a number of bytes >= {MIN_MAX_BYTES} (64 KiB)",
    "purge_every": "must be a number of writes >= 1",
}


def option_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the SQLite tier's option ``name`` (None: it can).

    ``max_bytes=None`` means no cap. Out-of-range values were silently clamped before
    (``max_bytes=-5`` became a 64 KiB cap); a typo must not become a policy.
    """
    if isinstance(value, bool):
        return OPTION_RULES[name]
    if name == "busy_timeout":
        ok = isinstance(value, int | float) and math.isfinite(value) and value >= 0
    elif name == "max_bytes":
        ok = value is None or (isinstance(value, int) and value >= MIN_MAX_BYTES)
    else:
        ok = isinstance(value, int) and value >= 1
    return None if ok else OPTION_RULES[name]


def _has_table(conn: sqlite3.Connection) -> bool:
    """Does the database ``conn`` opened hold the tier's table (a read, no write lock)?"""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'satchel_kv'"
    ).fetchone()
    return row is not None


class SQLiteTier(Tier):
    """Key-value tier in one SQLite file, shared by every thread and process on a machine.

    ``create=False``: open an existing tier only (never create the file, its directory,
    or the table in a file that has none; never switch such a file to WAL).
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 1.0,
        purge_every: int = 256,
        max_bytes: int | None = None,
        clock: Clock = time.time,
        create: bool = True,
    ) -> None:
        for name, value in (
            ("busy_timeout", busy_timeout),
            ("max_bytes", max_bytes),
            ("purge_every", purge_every),
        ):
            problem = option_problem(name, value)
            if problem is not None:
                raise ConfigurationError(f"SQLite tier: {name} {problem}, not {value!r}")
        self.path = Path(path).absolute()  # relative to the directory at start-up
        self.busy_timeout = busy_timeout
        self.purge_every = purge_every
        self.max_bytes = max_bytes
        self.clock = clock
        self.create = create
        self._check_path()
        self._local = threading.local()
        self._lock = threading.Lock()
        #: (pid, writes made by this process): counted per process, so that a forked
        #: worker starts from its own first write, which purges
        self._writes: tuple[int, Iterator[int]] = (os.getpid(), itertools.count(0))
        #: (pid, thread, connection) of every connection open, to close them all in
        #: close(), and each one whose thread has ended: servers that start a thread
        #: per request (werkzeug's threaded dev server) would otherwise keep one
        #: connection, and two file descriptors, per request ever served
        self._conns: list[_Entry] = []

    def __repr__(self) -> str:
        return f"SQLiteTier({str(self.path)!r})"

    def _check_path(self) -> None:
        """Refuse, at start-up, a path that can never hold the tier.

        Otherwise the app starts and every spill fails (``tier_write_failed``) until
        someone reads the log. Only certain problems are refused: a file that cannot
        be read here is left to the first request (``tier_unavailable``), where the
        error says why.
        """
        path = self.path
        if path.is_dir():
            raise ConfigurationError(f"the SQLite tier path {path} is a directory, not a file")
        if path.exists():
            try:
                with path.open("rb") as f:
                    header = f.read(len(_HEADER))
            except OSError:
                return
            if header and header != _HEADER:
                # Not refused: it may be this tier's own file, damaged while the app
                # ran; a worker restarting must not stop the server over it.
                log.error(
                    "satchel: the SQLite tier file %s is not an SQLite database: every "
                    "tier call fails (tier_unavailable) until it is replaced or removed; "
                    "check that the tier URL names the tier's own file",
                    path,
                )
            elif not self.create:
                self._check_holds_a_tier()
            return
        if not self.create:
            raise ConfigurationError(
                f"no SQLite tier at {path}: the file does not exist (a relative path "
                f"resolves from the current directory, {Path.cwd()}); run from the app's "
                "directory or give the absolute path, sqlite:////absolute/path.db"
            )
        for parent in path.parents:  # the nearest one that exists must be a directory
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigurationError(
                        f"cannot create the SQLite tier {path}: {parent} is a file, not a directory"
                    )
                break

    def _check_holds_a_tier(self) -> None:
        """With ``create=False``: refuse an existing file that holds no tier.

        An app's own database, or an empty file, named by mistake: opening it as the
        tier would switch it to WAL and create ``satchel_kv`` in it (and ``satchel
        erase`` would report success). Read-only: the file is left byte for byte as
        it was. A file that cannot be read here is left to the first call, like above.
        """
        # A database in WAL mode with no -wal file beside it (no connection open, all
        # checkpointed) is read as immutable: a read-only connection would leave -wal
        # and -shm files next to someone else's database.
        try:
            with self.path.open("rb") as f:
                header = f.read(20)
        except OSError:
            return
        wal_file = Path(f"{self.path}-wal")
        idle_wal = len(header) == 20 and header[18:20] == b"\x02\x02" and not wal_file.exists()
        query = "immutable=1" if idle_wal else "mode=ro"
        try:
            conn = sqlite3.connect(
                f"{self.path.as_uri()}?{query}", uri=True, timeout=self.busy_timeout
            )
        except sqlite3.Error:
            return
        try:
            found = _has_table(conn)
        except sqlite3.Error:
            return
        finally:
            conn.close()
        if not found:
            raise ConfigurationError(_NO_TIER.format(path=self.path))

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.create:
            target, uri = str(self.path), False
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
        else:  # mode=rw: SQLite refuses to create the file if it went away since
            target, uri = f"{self.path.as_uri()}?mode=rw", True
        if self.create:
            # Never let SQLite fall back to a read-only open: a process whose first
            # connection maps the -shm read-only shares that mapping with every later
            # connection of the process (all threads), so writes keep failing after the
            # permissions are fixed, until every thread has let its connection go.
            for name in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if name.exists() and not os.access(name, os.R_OK | os.W_OK):
                    raise TierUnavailable(
                        f"the SQLite tier file {name} is not writable by this process",
                        tier=self.name,
                        path=str(name),
                    )
        conn = sqlite3.connect(
            target,
            uri=uri,
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit; explicit BEGIN where atomicity matters
            check_same_thread=False,  # only ever used by the thread that opened it
        )
        try:
            return self._set_up(conn)
        except BaseException:
            # Closed, not left to the garbage collector: an open connection keeps this
            # process's view of the file's WAL index, and the next one would share it.
            conn.close()
            raise

    def _set_up(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if not self.create and not _has_table(conn):
            # Replaced since start-up by a file with no tier in it: never make one
            # there (no WAL switch, no schema), whatever the file is.
            raise TierUnavailable(
                _NO_TIER.format(path=self.path), tier=self.name, path=str(self.path)
            )
        mode = self._switch_to_wal(conn)
        if mode != "wal":
            raise TierUnavailable(
                "the SQLite tier needs WAL mode, which this file system refused",
                tier=self.name,
                path=str(self.path),
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        if self.max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            cap_pages = max(16, self.max_bytes // page_size)
            conn.execute(f"PRAGMA max_page_count = {cap_pages}")
            # The WAL is not part of the page count: it grows until a checkpoint, by
            # default after 1000 pages (4 MiB, sixteen times a 256 KiB cap). A
            # checkpoint every quarter of the cap keeps it near the cap, unless a long
            # read holds it back. After a checkpoint it is truncated back to the cap
            # (it keeps its high-water size otherwise).
            conn.execute(f"PRAGMA wal_autocheckpoint = {max(4, cap_pages // 4)}")
            conn.execute(f"PRAGMA journal_size_limit = {self.max_bytes}")
        # Every new connection checks (a read, no write lock): the file may be new.
        if not _has_table(conn):
            conn.executescript(_SCHEMA)
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
            local.conn = None
        elif self._file_identity() != local.identity:
            # Deleted or replaced since this thread connected: the connection still
            # reads and writes the old (maybe unlinked) file. Let it go.
            self._discard(local.conn)
            local.conn = None
        if local.conn is None:
            conn = self._connect()
            local.conn, local.pid, local.identity = conn, pid, self._file_identity()
            with self._lock:
                kept: list[_Entry] = []
                ended: list[_Entry] = []
                for entry in self._conns:
                    (ended if entry[0] == pid and not _alive(entry[1]) else kept).append(entry)
                self._conns = kept
                self._conns.append((pid, weakref.ref(threading.current_thread()), conn))
            for _pid, _thread, old in ended:
                _close_quietly(old)  # its thread has ended: nothing can be using it
        return local.conn

    def _file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the tier's file, None when it is missing (one stat call)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _discard(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._conns = [e for e in self._conns if e[2] is not conn]
        _close_quietly(conn)

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
            if any(word in message for word in ("locked", "busy", "readonly", "read-only")):
                # Another process holds the write lock, or the file is read-only: reads
                # still work (WAL), so only the writes' breaker counts it (guard.py).
                facts["writes_only"] = True
            if "locked" not in message and "busy" not in message:
                # Anything but contention may be this connection's own state (closed by
                # close(), a table dropped, a WAL left by another process for a file
                # replaced since: "disk I/O error"): reconnect next time, or it stays
                # broken for the life of the process.
                self._drop_conn()
            raise TierUnavailable(f"the SQLite tier failed ({op}): {exc}", **facts) from exc
        except OSError as exc:
            raise TierUnavailable(
                f"the SQLite tier failed ({op}): {exc}", tier=self.name, op=op
            ) from exc

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self._discard(conn)

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        """On a process's first write and every ``purge_every``-th after it, delete up
        to :data:`PURGE_BATCH` expired rows.

        The first write purges too: workers recycled after fewer than ``purge_every``
        writes each (gunicorn's ``--max-requests``) would otherwise never purge, and the
        file would fill with expired rows. After the write it follows has committed: a
        purge that fails (locked by another writer) is skipped, not reported as a
        failed write.
        """
        pid, writes = self._writes
        if pid != os.getpid():
            writes = itertools.count(0)
            self._writes = (os.getpid(), writes)
        if next(writes) % self.purge_every == 0:
            self._purge_batch(conn, now)

    def _purge_batch(self, conn: sqlite3.Connection, now: float) -> int:
        try:
            return conn.execute(_PURGE, (now, PURGE_BATCH)).rowcount
        except sqlite3.Error:
            log.debug("satchel: SQLite tier purge skipped", exc_info=True)
            return 0

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
                    f"SELECT key, {_VALUE_AS_BYTES} FROM satchel_kv "  # noqa: S608
                    f"WHERE key IN ({marks}) AND expires_at > ?",
                    (*chunk, now),
                )
                found.update(rows)
            return [found.get(k) for k in keys]

    def put(self, key: str, value: bytes, ttl: float) -> None:
        with self._errors("put"):
            conn = self._conn()
            now = self.clock()
            row = _row(key, value, ttl, now)
            try:
                conn.execute(_UPSERT, row)
            except sqlite3.Error as exc:
                if not self._made_room(conn, exc, now):
                    raise
                conn.execute(_UPSERT, row)
            self._maybe_purge(conn, now)

    def _made_room(self, conn: sqlite3.Connection, exc: sqlite3.Error, now: float) -> bool:
        """After a write failed: if the file is full of rows that have expired (a capped
        file after a quiet spell, or a clock jump), purge some, once, and say so; False
        when the error is another, or the file is really full."""
        return _is_full(exc) and bool(self._purge_batch(conn, now))

    def put_unless_marked(
        self, key: str, value: bytes, ttl: float, mark: str, refused: bytes
    ) -> bool:
        with self._errors("put"):
            conn = self._conn()
            now = self.clock()
            row = _row(key, value, ttl, now)

            def check_and_write() -> bool:
                # The mark read and the write in one statement: SQLite's write lock is
                # taken and released inside one call. As a transaction of several
                # calls, the thread held the lock while it waited for the GIL between
                # them (tens to hundreds of ms in a threaded server), and other writers
                # ran out their busy_timeout: most spills failed, tier_write_failed.
                return conn.execute(_UPSERT_UNLESS_MARKED, (*row, mark, refused, now)).rowcount > 0

            try:
                written = check_and_write()
            except sqlite3.Error as exc:
                # SQLite rolled the full write's transaction back: room is made outside
                # it, then the check and the write run again.
                if not self._made_room(conn, exc, now):
                    raise
                written = check_and_write()
            if written:
                self._maybe_purge(conn, now)
            return written

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

    def erase_session(self, session_tag: str, mark: str, tombstone: bytes, ttl: float) -> int:
        with self._errors("delete_session"):
            conn = self._conn()
            now = self.clock()
            with _immediate(conn):  # the delete and the tombstone: one step
                previous = _live_value(conn, mark, now)
                deleted = conn.execute(
                    "DELETE FROM satchel_kv WHERE tag = ? AND key != ? RETURNING expires_at > ?",
                    (session_tag, mark, now),
                ).fetchall()
                conn.execute(_UPSERT, _row(mark, tombstone, ttl, now))
            return deleted.count((1,)) + (previous is not None and previous != tombstone)

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        return self.compare_and_set_mark_with(key, expected, new, ttl, None)

    def compare_and_set_mark_with(
        self, key: str, expected: bytes | None, new: bytes, ttl: float, companion: Companion | None
    ) -> bytes | None:
        result = self._compare_and_set(key, expected, new, ttl, companion, None)
        assert not isinstance(result, ClaimHeld)  # no claim was checked
        return result

    def compare_and_set_unclaimed(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        ttl: float,
        claim: str,
        holder: bytes | None,
        companion: Companion | None = None,
    ) -> bytes | ClaimHeld | None:
        if type(self).compare_and_set_mark_with is not SQLiteTier.compare_and_set_mark_with:
            # A subclass compares and sets its own way: its method, after the claim.
            return super().compare_and_set_unclaimed(
                key, expected, new, ttl, claim, holder, companion
            )
        return self._compare_and_set(key, expected, new, ttl, companion, (claim, holder))

    def _compare_and_set(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        ttl: float,
        companion: Companion | None,
        unclaimed: tuple[str, bytes | None] | None,
    ) -> bytes | ClaimHeld | None:
        """Both compare-and-sets in one statement: the claim (when given), the compare,
        the write and its companion (both rows or neither). One statement, as for a
        spill (put_unless_marked): a transaction of several calls held SQLite's write
        lock across GIL waits, and under a threaded server most saves failed."""
        with self._errors("compare_and_set_mark"):
            conn = self._conn()
            now = self.clock()
            rows = [_row(key, new, ttl, now)]
            if companion is not None:
                rows.append(_row(*companion, now))
            claim_key, holder = unclaimed if unclaimed is not None else (None, None)
            sql = _cas_statement(len(rows), claimed=unclaimed is not None, new_key=expected is None)
            params = {
                "key": key,
                "expected": expected,
                "claim": claim_key,
                "holder": holder,
                "now": now,
            }
            for i, (k, tag, value, expires) in enumerate(rows):
                params.update({f"k{i}": k, f"t{i}": tag, f"v{i}": value, f"e{i}": expires})
            for _ in range(3):
                if conn.execute(sql, params).rowcount > 0:
                    return None
                # Refused: say why, from the values as they are now (one read).
                current_claim, current = conn.execute(_CAS_STATE, params).fetchone()
                if unclaimed is not None and current_claim and current_claim != holder:
                    return CLAIM_HELD
                if current != expected:
                    return b"" if current is None else current
                # Changed back between the write and the read: try the write again.
            return b"" if current is None else current

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
            mine = [c for p, _t, c in self._conns if p == pid]
            self._conns = [e for e in self._conns if e[0] != pid]
        for conn in mine:
            _close_quietly(conn)
        self._local = threading.local()


#: (pid, the thread that opened it, connection)
_Entry = tuple[int, "weakref.ref[threading.Thread]", sqlite3.Connection]


def _row(key: str, value: bytes, ttl: float, now: float) -> tuple[str, str | None, bytes, float]:
    """The ``satchel_kv`` row that keeps ``value`` under ``key`` for ``ttl`` seconds."""
    return (key, hash_tag(key), bytes(value), now + max(ttl, 0.001))


def _live_value(conn: sqlite3.Connection, key: str, now: float) -> bytes | None:
    row = conn.execute(
        f"SELECT {_VALUE_AS_BYTES} FROM satchel_kv WHERE key = ? AND expires_at > ?",  # noqa: S608
        (key, now),
    ).fetchone()
    return None if row is None else row[0]


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, its lock taken before the first read (BEGIN IMMEDIATE), so
    a read and the writes that depend on it are one step: committed at the end (with
    nothing written, too), rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _is_full(exc: sqlite3.Error) -> bool:
    """The database or disk is full (SQLITE_FULL), or the file reached its max size."""
    return getattr(exc, "sqlite_errorcode", None) in _FULL_CODES or "full" in str(exc).lower()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def _alive(thread: weakref.ref[threading.Thread]) -> bool:
    found = thread()
    return found is not None and found.is_alive()


__all__ = ["SQLiteTier"]
