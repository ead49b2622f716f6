"""End to end: the example chat app over real HTTP while its overflow tier fails.

The Redis test drives one werkzeug process (``a``, the app under test, default segment
cache) and reads contexts back through a second one (``cold``, segment cache off, so
its reads show what the tier really holds) through: overflow and full rehydration over
many requests; ``kill -9`` of Redis mid-conversation (answers stay 200 and fast, the
refused writes are flagged, the breaker opens, turns past the hard cap are counted as
``data_loss``); restart (no persistence: segments written before the kill are gone,
which the cold reader reports as ``segment_missing``; new overflow works once the
breaker has closed); SIGSTOP (timeouts fire, answers stay fast and flagged, the
breaker opens) and SIGCONT (recovery). The SQLite test runs one conversation
alternately on two processes sharing one file, and blocks writers with a held lock.

Throughout: no 5xx, every response's ``Satchel-Degraded`` header and JSON ``degraded``
field agree (the JSON is built by the view, before the token is sealed, so it cannot
carry the save-time reasons ``tier_write_failed`` / ``data_loss``: see
``test_chat_json_carries_save_time_reasons``), and every turn sent is either in
``all_turns`` or accounted for: in a referenced segment that could not be read
(``overflowed_turns - rehydrated_turns``, with a segment reason flagged), in
``lifecycle.lost`` (with ``data_loss`` flagged on some response), or in a policy drop
(``lifecycle.dropped``, other than ``data_loss``; overflowed turns are not dropped).

Timing: the breaker reset is shortened to :data:`RESET` seconds through
``SATCHEL_BREAKER_RESET_TIMEOUT`` (passed to ``create_app``); every wait polls with a
deadline.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from satchel.keys import generate_key
from tests.support import HttpResponse, LiveServer, RedisServer, wait_until

pytestmark = pytest.mark.redis

RESET = 1.5  # SATCHEL_BREAKER_RESET_TIMEOUT for these tests (default 2 s)
FAIL_MAX = 5  # SATCHEL_BREAKER_FAIL_MAX default
READ_TIMEOUT_MS = 50  # SATCHEL_TIER_READ_TIMEOUT default
FAST = 1.5  # seconds: a degraded answer is still this fast (tier timeouts are 50/100 ms)
KEYS = generate_key("e2e").to_string()
HEADER = "Satchel-Context"

SAVE_TIME_REASONS = frozenset({"tier_write_failed", "data_loss"})
SEGMENT_REASONS = frozenset(
    {"segment_missing", "segment_corrupt", "segment_foreign", "tier_unavailable"}
)
TIER_REASONS = frozenset({"tier_unavailable", "tier_write_failed"})
KNOWN_REASONS = SAVE_TIME_REASONS | SEGMENT_REASONS
MARKER = re.compile(r"\b(m\d+)-(\d{3})\b")


def app_spec(**config: Any) -> str:
    """The example app's factory called with ``config`` (the runner evaluates literals)."""
    base = {"SATCHEL_BREAKER_RESET_TIMEOUT": RESET}
    return f"examples.minimal_chat.app:create_app({dict(base, **config)!r})"


def reasons(resp: HttpResponse) -> list[str]:
    value = resp.headers.get("Satchel-Degraded")
    return [r.strip() for r in value.split(",") if r.strip()] if value else []


def server_timing(resp: HttpResponse) -> dict[str, float]:
    """``Server-Timing`` as ``{step: milliseconds}``."""
    out = {}
    for part in (resp.headers.get("Server-Timing") or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def breaker_state(srv: LiveServer) -> float | None:
    """``satchel_breaker_state`` from /metrics (0 closed, 1 half-open, 2 open): a
    passive look (unlike /readyz, whose ping goes through the breaker)."""
    text = srv.get("/metrics").text
    match = re.search(r'^satchel_breaker_state\{tier="\w+"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


@dataclass
class Observed:
    """Every exchange of a test, checked as it happens."""

    responses: list[tuple[str, int, list[str]]] = field(default_factory=list)

    def check(self, where: str, resp: HttpResponse, elapsed: float) -> HttpResponse:
        header = reasons(resp)
        self.responses.append((where, resp.status, header))
        assert resp.status < 500, f"{where}: {resp.status} {resp.text[:300]}"
        assert resp.status == 200, f"{where}: {resp.status} {resp.text[:300]}"
        body = resp.json().get("degraded")
        assert isinstance(body, list), f"{where}: no JSON degraded field"
        assert set(header) <= KNOWN_REASONS, header
        # The JSON says every load-time reason; the header adds the save-time ones.
        assert set(body) <= set(header), (where, body, header)
        assert set(header) - set(body) <= SAVE_TIME_REASONS, (where, body, header)
        assert elapsed < FAST, f"{where}: answered in {elapsed:.2f}s"
        return resp

    @property
    def five_xx(self) -> int:
        return sum(1 for _, status, _ in self.responses if status >= 500)


@dataclass
class Account:
    sent: int
    present: int
    in_missing_segments: int
    lost: int
    policy: int
    flagged: list[str]

    @property
    def unaccounted(self) -> int:
        return self.sent - self.present - self.in_missing_segments - self.lost - self.policy


class Chat:
    """One conversation: its token, the turns it sent, what it was told."""

    def __init__(self, name: str, seen: Observed) -> None:
        self.name = name
        self.seen = seen
        self.token: str | None = None
        self.exchanges = 0  # answered exchanges (2 turns each)
        self.data_loss_flagged = False

    def message(self, n: int) -> str:
        # Hex digests do not compress away, so a small budget really overflows.
        words = " ".join(f"{(n * 7919 + i) * 2654435761 % 2**32:08x}" for i in range(14))
        return f"{self.name}-{n:03d} please remember these codes: {words}."

    def say(self, srv: LiveServer) -> HttpResponse:
        n = self.exchanges
        headers = {HEADER: self.token} if self.token else {}
        started = time.monotonic()
        resp = srv.post("/api/chat", json_body={"message": self.message(n)}, headers=headers)
        self.seen.check(f"{self.name} say {n} on {srv.port}", resp, time.monotonic() - started)
        self.token = resp.headers[HEADER]
        self.exchanges += 1
        self.data_loss_flagged |= "data_loss" in reasons(resp)
        return resp

    def read(self, srv: LiveServer, *, adopt: bool = True) -> tuple[dict[str, Any], list[str]]:
        """``GET /api/context`` (a read: it issues no new token unless one comes back)."""
        assert self.token
        started = time.monotonic()
        resp = srv.get("/api/context", headers={HEADER: self.token})
        self.seen.check(f"{self.name} read on {srv.port}", resp, time.monotonic() - started)
        if adopt:
            self.token = resp.headers.get(HEADER, self.token)
            self.data_loss_flagged |= "data_loss" in reasons(resp)
        return resp.json(), reasons(resp)

    def account(self, data: dict[str, Any], flagged: list[str]) -> Account:
        """Every turn sent: present in order and once, or accounted for."""
        found: list[tuple[int, str]] = []
        for turn in data["all_turns"]:
            match = MARKER.search(turn["content"])
            if match and match.group(1) == self.name:
                found.append((int(match.group(2)), turn["role"]))
        expected = [(n, role) for n in range(self.exchanges) for role in ("user", "assistant")]
        assert len(found) == len(set(found)), f"{self.name}: duplicated turns {found}"
        assert set(found) <= set(expected), f"{self.name}: turns never sent {found}"
        order = [expected.index(t) for t in found]
        assert order == sorted(order), f"{self.name}: turns out of order {found}"
        lifecycle = data["lifecycle"]
        dropped = lifecycle.get("dropped", {})
        gap = data["overflowed_turns"] - data["rehydrated_turns"]
        if gap:
            assert set(flagged) & SEGMENT_REASONS, f"{self.name}: {gap} turns unread, unflagged"
        if lifecycle["lost"]:
            assert self.data_loss_flagged, f"{self.name}: lost turns never flagged data_loss"
        assert lifecycle["lost"] == dropped.get("data_loss", 0)
        policy = sum(v for k, v in dropped.items() if k not in ("data_loss", "overflow"))
        account = Account(len(expected), len(found), gap, lifecycle["lost"], policy, flagged)
        assert account.unaccounted == 0, f"{self.name}: {account}"
        return account


def recover(chat: Chat, srv: LiveServer, *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one more exchange on ``srv`` (its save overflows the held-back turns) and read
    ``chat`` back, until both are clean and the breaker is closed; returns that read.
    Reads issue no token, so only a chat turn can move the held-back turns."""

    def clean() -> dict[str, Any] | None:
        said = reasons(chat.say(srv))
        data, flagged = chat.read(srv)
        if (set(flagged) | set(said)) & TIER_REASONS:
            return None
        if breaker_state(srv) != 0:
            # A read that needs no tier call leaves the breaker as it is; /readyz pings
            # through it (the trial call, once the reset timeout has passed).
            srv.get("/readyz")
            return None
        return data

    return wait_until(clean, timeout=timeout, interval=0.05, message="the tier to recover")


# ----------------------------------------------------------------------------- redis


@pytest.fixture
def redis_apps(
    redis_server: RedisServer, live_server_factory: Callable[..., LiveServer]
) -> tuple[LiveServer, LiveServer]:
    env = {
        "SATCHEL_KEYS": KEYS,
        "SATCHEL_OVERFLOW_URL": redis_server.url,
        "SATCHEL_MAX_TOKEN_BYTES": "1200",
        "SATCHEL_HARD_MAX_TOKEN_BYTES": "3000",
    }
    a = live_server_factory(app_spec(), env=env)
    cold = live_server_factory(app_spec(SATCHEL_SEGMENT_CACHE_BYTES=0), env=env)
    return a, cold


def test_redis_overflow_kill_restart_hang_recover(
    redis_server: RedisServer, redis_apps: tuple[LiveServer, LiveServer]
) -> None:
    a, cold = redis_apps
    seen = Observed()
    chat = Chat("m1", seen)

    # -- healthy: overflow, and every request rehydrates the whole conversation --------
    for n in range(16):
        resp = chat.say(a)
        assert reasons(resp) == []
        # the example numbers its reply from len(all_turns): right only if every
        # overflowed turn came back on this request
        assert resp.json()["reply"].startswith(f"(turn {n + 1})")
    data, flagged = chat.read(a)
    assert flagged == []
    assert data["overflowed_turns"] >= 8 and len(data["overflow"]) >= 2
    assert data["rehydrated_turns"] == data["overflowed_turns"]
    assert chat.account(data, flagged).present == 32
    data, flagged = chat.read(cold, adopt=False)  # another process, straight from Redis
    assert flagged == [] and chat.account(data, flagged).present == 32
    before_kill = data["overflowed_turns"]
    assert redis_server.client().dbsize() > 0

    # -- kill -9 mid-conversation ------------------------------------------------------
    redis_server.kill()
    refused = 0
    while not chat.data_loss_flagged:  # bounded: the hard cap is reached in ~10 turns
        assert chat.exchanges < 60, "the hard cap never forced data_loss"
        resp = chat.say(a)
        refused += "tier_write_failed" in reasons(resp)
    assert refused >= FAIL_MAX
    assert breaker_state(a) == 2  # open: refused writes no longer touch a socket
    data, flagged = chat.read(a, adopt=False)  # the writer's cache still has the segments
    account = chat.account(data, flagged)
    assert account.lost > 0 and account.in_missing_segments == 0
    data, flagged = chat.read(cold, adopt=False)  # no cache: the tier is down
    assert "tier_unavailable" in flagged
    assert chat.account(data, flagged).in_missing_segments >= before_kill

    # -- restart: an empty Redis; recovery once the breaker closes ---------------------
    redis_server.restart()
    assert redis_server.client().dbsize() == 0
    # No persistence: every segment written before the kill is gone, and a process
    # without them in its cache says so; the turns are accounted for as unreadable.
    data, flagged = chat.read(cold, adopt=False)
    assert "segment_missing" in flagged
    account = chat.account(data, flagged)
    assert account.in_missing_segments == data["overflowed_turns"] >= before_kill
    data = recover(chat, a)
    assert redis_server.client().dbsize() > 0  # the held-back turns were written
    chat.account(data, [])
    # The writer still had the old segments in its cache: whether they were merged
    # into a new segment or are still missing for the cold reader, all is accounted.
    data, flagged = chat.read(cold, adopt=False)
    chat.account(data, flagged)
    # A new conversation overflows into the new Redis and rehydrates elsewhere.
    fresh = Chat("m2", seen)
    for _ in range(10):
        assert reasons(fresh.say(a)) == []
    data, flagged = fresh.read(cold, adopt=False)
    assert flagged == [] and data["overflowed_turns"] > 0
    assert fresh.account(data, flagged).present == 20

    # -- SIGSTOP: connections hang, the tier timeouts fire, answers stay fast ----------
    redis_server.pause()
    paid_timeout, fast_failed = 0, 0
    while not fast_failed:
        assert fresh.exchanges < 40, "the breaker never opened during the hang"
        resp = fresh.say(a)
        overflow_ms = server_timing(resp).get("overflow", 0.0)
        if "tier_write_failed" in reasons(resp):
            if overflow_ms >= READ_TIMEOUT_MS * 0.9:
                paid_timeout += 1
            elif paid_timeout >= FAIL_MAX:
                fast_failed += 1  # the breaker is open: refused without waiting
    assert paid_timeout >= FAIL_MAX
    assert breaker_state(a) == 2
    data, flagged = fresh.read(cold, adopt=False)  # a read times out too, still answers
    assert "tier_unavailable" in flagged
    fresh.account(data, flagged)

    # -- SIGCONT: recovery -------------------------------------------------------------
    redis_server.resume()
    for conversation in (chat, fresh):
        data = recover(conversation, a)
        conversation.account(data, [])
        data, flagged = conversation.read(cold, adopt=False)
        conversation.account(data, flagged)
    assert seen.five_xx == 0
    assert len(seen.responses) > 60


# ---------------------------------------------------------------------------- sqlite


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock (``BEGIN IMMEDIATE``) on ``path``: writers wait their
    busy timeout and fail; WAL readers carry on."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_sqlite_two_processes_alternating_with_locked_writer(
    tmp_path: Path, live_server_factory: Callable[..., LiveServer]
) -> None:
    db = tmp_path / "tier.sqlite3"
    env = {
        "SATCHEL_KEYS": KEYS,
        # busy_timeout: how long a writer waits for the lock (the tier's own default
        # is 1 s; SATCHEL_TIER_*_TIMEOUT apply to Redis only)
        "SATCHEL_OVERFLOW_URL": f"sqlite:///{db}?busy_timeout=0.2",
        "SATCHEL_MAX_TOKEN_BYTES": "1200",
    }
    a = live_server_factory(app_spec(), env=env)
    b = live_server_factory(app_spec(), env=env)
    seen = Observed()
    chat = Chat("m3", seen)

    for n in range(20):  # alternate: each process reads what the other wrote
        resp = chat.say((a, b)[n % 2])
        assert reasons(resp) == []
        assert resp.json()["reply"].startswith(f"(turn {n + 1})")
    for srv in (a, b):
        data, flagged = chat.read(srv, adopt=False)
        assert flagged == [] and data["overflowed_turns"] > 0
        assert chat.account(data, flagged).present == 40

    refused = 0
    with write_lock(db):
        for n in range(8):
            resp = chat.say((a, b)[n % 2])
            refused += "tier_write_failed" in reasons(resp)
        for srv in (a, b):  # reads are not blocked by a writer in WAL mode
            data, flagged = chat.read(srv, adopt=False)
            assert not set(flagged) & SEGMENT_REASONS
            chat.account(data, flagged)
    assert refused >= 4

    for srv in (a, b):
        data = recover(chat, srv)
        assert chat.account(data, []).present == chat.exchanges * 2  # nothing was lost
    for n in range(6):
        assert not set(reasons(chat.say((a, b)[n % 2]))) & TIER_REASONS
    data, flagged = chat.read(b, adopt=False)
    assert flagged == [] and chat.account(data, flagged).present == chat.exchanges * 2
    assert seen.five_xx == 0


# ------------------------------------------------------------------- known limitation


def test_chat_json_carries_save_time_reasons(
    redis_server: RedisServer, redis_apps: tuple[LiveServer, LiveServer]
) -> None:
    a, _ = redis_apps
    chat = Chat("m4", Observed())
    for _ in range(4):
        chat.say(a)
    redis_server.kill()
    for n in range(4, 10):
        headers = {HEADER: chat.token} if chat.token else {}
        resp = a.post("/api/chat", json_body={"message": chat.message(n)}, headers=headers)
        assert resp.status == 200
        chat.token = resp.headers[HEADER]
        assert resp.json()["degraded"] == reasons(resp)
