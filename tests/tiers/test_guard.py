"""GuardedTier: the pybreaker state machine, fail-fast, events, and the segment cache.

The tier under the guard here is an in-process MemoryTier with a switch that makes it
fail; the same behaviour against real redis-server processes is in test_redis.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from satchel.errors import TierError, TierFull, TierUnavailable
from satchel.tiers import MISSING, TIER_UNAVAILABLE, Fetched, MemoryTier, SegmentCache
from tests.support import timed_without_gc

from .conftest import FakeClock


class SwitchTier(MemoryTier):
    """A MemoryTier that fails every call while ``down`` is set, and counts calls."""

    def __init__(self) -> None:
        super().__init__(max_bytes=1 << 20)
        self.down: type[TierError] | None = None
        self.calls = 0
        self.gate: threading.Event | None = None

    def _check(self) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.down is not None:
            raise self.down("switched off", tier=self.name)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check()
        return super().get_many(keys)

    def put(self, key: str, value: bytes, ttl: float) -> None:
        self._check()
        super().put(key, value, ttl)

    def put_unless_marked(self, key: str, value: bytes, ttl: float, *unless: Any) -> bool:
        self._check()
        return super().put_unless_marked(key, value, ttl, *unless)

    def ping(self) -> None:
        self._check()


class BuggyTier(MemoryTier):
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        raise KeyError("a bug, not a tier error")


def test_breaker_opens_after_fail_max_and_fails_fast(guard_factory, clock, events) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=3)
    assert guard.breaker_state == "closed"
    tier.down = TierUnavailable
    for _ in range(3):
        with pytest.raises(TierUnavailable, match="switched off"):
            guard.put("k", b"v", 10)
    assert guard.breaker_state == "open"
    assert events.seen == [("breaker_opened", {"tier": "memory"})]

    calls = tier.calls
    with timed_without_gc():
        started = time.perf_counter()
        for _ in range(100):
            with pytest.raises(TierUnavailable, match="breaker open") as info:
                guard.put("k", b"v", 10)
        elapsed = time.perf_counter() - started
    assert elapsed / 100 < 0.005
    assert tier.calls == calls  # the tier was not touched
    assert info.value.facts["breaker"] == "open"
    # reads degrade instead of raising
    fetched = guard.get_many(["a", "b"])
    assert fetched.missing == {"a": TIER_UNAVAILABLE, "b": TIER_UNAVAILABLE}
    assert str(fetched.error) == "breaker open"


def test_half_open_trial_closes_or_reopens(guard_factory, clock, events) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=2, reset_timeout=10.0)
    tier.down = TierUnavailable
    for _ in range(2):
        with pytest.raises(TierUnavailable):
            guard.ping()
    clock.advance(9.9)
    with pytest.raises(TierUnavailable, match="breaker open"):
        guard.ping()

    clock.advance(0.2)  # reset timeout elapsed: one trial call, which fails -> open again
    with pytest.raises(TierUnavailable, match="switched off"):
        guard.ping()
    assert guard.breaker_state == "open"
    with pytest.raises(TierUnavailable, match="breaker open"):
        guard.ping()

    tier.down = None
    clock.advance(10.1)
    guard.put("k", b"v", 10)  # the trial succeeds -> closed
    assert guard.breaker_state == "closed"
    assert events.names == [
        "breaker_opened",
        "breaker_half_open",
        "breaker_opened",
        "breaker_half_open",
        "breaker_closed",
    ]
    assert all(fields == {"tier": "memory"} for _, fields in events.seen)


def test_only_one_trial_call_while_half_open(guard_factory, clock) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=1)
    tier.down = TierUnavailable
    with pytest.raises(TierUnavailable):
        guard.ping()
    tier.down = None
    clock.advance(11)
    tier.gate = threading.Event()  # hold the trial call inside the tier
    outcome: list[object] = []
    trial = threading.Thread(target=lambda: outcome.append(guard.ping()))
    trial.start()
    deadline = time.monotonic() + 5
    while guard.breaker_state != "half_open" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert guard.breaker_state == "half_open"
    with pytest.raises(TierUnavailable, match="breaker open"):
        guard.ping()  # a second caller does not pile onto the trial
    tier.gate.set()
    trial.join(5)
    assert outcome == [None]
    assert guard.breaker_state == "closed"


def test_tier_full_does_not_trip_the_breaker(guard_factory) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=2)
    tier.down = TierFull
    for _ in range(5):
        with pytest.raises(TierFull):
            guard.put("k", b"v", 10)
    assert guard.breaker_state == "closed"


def test_unexpected_exception_becomes_tier_unavailable(guard_factory) -> None:
    guard = guard_factory(BuggyTier(), fail_max=2)
    fetched = guard.get_many(["a"])
    assert fetched.missing == {"a": TIER_UNAVAILABLE}
    assert isinstance(fetched.error, TierUnavailable)
    assert fetched.error.facts["error"] == "KeyError"


def test_event_hook_errors_are_swallowed(guard_factory, clock) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=1)
    guard.on_event = lambda event, **fields: 1 / 0
    tier.down = TierUnavailable
    with pytest.raises(TierUnavailable):
        guard.ping()
    assert guard.breaker_state == "open"


# ----------------------------------------------------------------------------- cache


def test_cache_serves_first_and_reports_partial_results(guard_factory) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier)
    guard.put("s:{t}:a", b"A", 60)  # written values are cached
    tier.put("s:{t}:b", b"B", 60)  # behind the guard's back: not cached
    got = guard.get_many(["s:{t}:a", "s:{t}:b", "s:{t}:c"])
    assert got.values == {"s:{t}:a": b"A", "s:{t}:b": b"B"}
    assert got.missing == {"s:{t}:c": MISSING}
    assert got.cached == {"s:{t}:a"} and got.from_cache == 1
    assert got.ordered() == [b"A", b"B", None]
    assert guard.cache.hits == 1 and guard.cache.misses == 2

    tier.down = TierUnavailable
    got = guard.get_many(["s:{t}:a", "s:{t}:b", "s:{t}:c"])
    assert got.values == {"s:{t}:a": b"A", "s:{t}:b": b"B"}  # b was cached by the read
    assert got.missing == {"s:{t}:c": TIER_UNAVAILABLE}
    assert got.degraded and not got.complete
    assert isinstance(got.error, TierUnavailable)


def test_cache_is_bypassed_for_mutable_records(guard_factory) -> None:
    tier = SwitchTier()
    guard = guard_factory(tier)
    guard.put("m", b"1", 60, cache=False)
    assert "m" not in guard.cache
    assert guard.get_many(["m"], cache=False).values == {"m": b"1"}
    assert "m" not in guard.cache
    guard.put("s:{t}:seg", b"x", 60)
    assert guard.compare_and_set_mark("s:{t}:seg", b"x", b"y", 60) is None
    assert "s:{t}:seg" not in guard.cache


def test_delete_session_drops_cached_entries(guard_factory) -> None:
    guard = guard_factory(SwitchTier())
    guard.put("s:{one}:a", b"A", 60)
    guard.put("s:{one}:b", b"B", 60)
    guard.put("s:{two}:a", b"C", 60)
    assert guard.delete_session("one") == 2
    assert "s:{one}:a" not in guard.cache and "s:{two}:a" in guard.cache
    assert guard.get_many(["s:{one}:a"]).missing == {"s:{one}:a": MISSING}


def test_cache_lru_and_ttl() -> None:
    clock = FakeClock()
    cache = SegmentCache(max_bytes=30, max_age=100, clock=clock)
    assert cache.put("a", b"x" * 9)  # 10 bytes with the key
    assert cache.put("b", b"x" * 9)
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("c", b"x" * 9)
    assert cache.put("d", b"x" * 9)  # evicts b, the least recently used
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.evictions == 1 and cache.size == 30
    assert not cache.put("big", b"x" * 40)  # larger than the whole cache
    cache.put("short", b"", ttl=5)
    clock.advance(5)
    assert cache.get("short") is None
    clock.advance(95)
    assert cache.get("a") is None  # max_age
    assert cache.stats()["hits"] == 1


def test_expired_entries_leave_when_the_cache_is_measured() -> None:
    """Entries past their age left only when looked up or evicted: after the load
    stopped, a worker kept its 8 MiB of expired segments, and the metrics reported
    them as cached. Measuring the cache (what /metrics does) now sweeps them out."""
    clock = FakeClock()
    cache = SegmentCache(max_bytes=1000, max_age=100, clock=clock)
    for name in "abc":
        cache.put(name, b"x" * 9)
    cache.attach("a", b"d", object(), 20)
    clock.advance(50)
    cache.put("d", b"x" * 9)
    clock.advance(60)  # a, b and c are past their age; d is not
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"]) == (1, 10)
    assert "a" not in cache and "d" in cache and cache.misses == 0  # no lookup counted


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "discard"]),
            st.sampled_from([f"s:{{t{i % 3}}}:{i}" for i in range(8)]),
            st.integers(min_value=0, max_value=60),
        ),
        max_size=60,
    ),
    max_bytes=st.integers(min_value=0, max_value=200),
)
def test_cache_byte_bound_invariant(ops, max_bytes) -> None:
    cache = SegmentCache(max_bytes=max_bytes, clock=FakeClock())
    model: dict[str, bytes] = {}
    for op, key, size in ops:
        if op == "put":
            value = bytes([size % 256]) * size
            if cache.put(key, value):
                model[key] = value
            else:
                model.pop(key, None)
                cache.discard([key])
        elif op == "get":
            got = cache.get(key)
            assert got is None or got == model.get(key)
        else:
            cache.discard([key])
            model.pop(key, None)
        assert 0 <= cache.size <= max_bytes
        assert cache.size == sum(len(k) + len(entry[0]) for k, entry in cache._data.items())
    assert cache.hits + cache.misses == sum(1 for op, _, _ in ops if op == "get")


def test_fetched_is_plain_data() -> None:
    f = Fetched(("a", "b"), {"a": b"1"}, {"b": MISSING})
    assert f.get("a") == b"1" and f.reason("b") == MISSING and f.reason("a") is None
    assert not f.degraded and not f.complete and f.from_cache == 0


def test_values_cached_before_an_outage_are_unconfirmed_and_can_be_restored(
    guard_factory, clock
) -> None:
    """A tier that fails may come back empty (a Redis restart without persistence):
    what this process cached before is served, marked unconfirmed, and restore()
    writes it back so that every process has it again."""
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=2, reset_timeout=1.0)
    guard.put("seg", b"turns", 60)
    assert guard.get_many(["seg"]).unconfirmed == frozenset()  # no outage yet

    tier.down = TierUnavailable
    for _ in range(2):
        with pytest.raises(TierUnavailable):
            guard.ping()
    assert guard.breaker_state == "open" and guard.epoch == 1
    tier.down = None
    tier.clear()  # it restarted with nothing
    clock.advance(1.1)
    guard.ping()  # the trial call succeeds: closed again
    assert guard.breaker_state == "closed"

    fetched = guard.get_many(["seg"])
    assert fetched.get("seg") == b"turns" and fetched.unconfirmed == {"seg"}
    assert tier.get_many(["seg"]) == [None]  # the tier really lost it
    assert guard.restore([("seg", b"turns")], 60) == 1
    assert tier.get_many(["seg"]) == [b"turns"]
    assert guard.get_many(["seg"]).unconfirmed == frozenset()  # confirmed again

    # A restore that meets a failing tier stops and leaves the value unconfirmed.
    tier.down = TierUnavailable
    assert guard.restore([("a", b"1"), ("b", b"2")], 60) == 0


class ShardedTier(SwitchTier):
    """Keys on named shards (as Redis Cluster masters), from a map the test changes; the
    shards in ``dead`` fail."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[str, str] = {}
        self.dead: set[str] = set()

    def shard_of(self, key: str) -> str:
        return self.owner.get(key, "")

    def _check_key(self, key: str) -> None:
        if self.shard_of(key) in self.dead:
            raise TierUnavailable("master down", tier=self.name)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check_key(keys[0])
        return super().get_many(keys)

    def put(self, key: str, value: bytes, ttl: float) -> None:
        self._check_key(key)
        super().put(key, value, ttl)


def test_one_breaker_per_shard_and_a_replaced_shard_stops_counting(
    guard_factory, clock, events
) -> None:
    """A dead master opens its own breaker only. After a failover no key names it any
    more: it must not keep the tier (the gauge, /readyz) reported open for good."""
    tier = ShardedTier()
    tier.owner = {"a": "m1", "b": "m2"}
    guard = guard_factory(tier, fail_max=3, reset_timeout=2.0)
    tier.dead = {"m1"}
    for _ in range(3):
        with pytest.raises(TierUnavailable):
            guard.put("a", b"1", 10)
    guard.put("b", b"1", 10)  # m2 is served
    assert guard.breaker_states() == {"": "closed", "m1": "open", "m2": "closed"}
    assert guard.breaker_state == "open"
    assert events.seen == [("breaker_opened", {"tier": "memory", "detail": "m1"})]

    tier.owner["a"] = "m3"  # failover: a replica, under another name, serves the slot
    tier.dead = set()
    for _ in range(30):  # traffic goes on, to m2 and m3 only
        clock.advance(5)
        guard.put("a", b"2", 10)
        guard.put("b", b"2", 10)
    assert "m1" not in guard.breaker_states()
    assert guard.breaker_state == "closed"
    assert events.names == ["breaker_opened", "breaker_closed"]


def test_what_the_tier_said_is_logged_once_per_interval(guard_factory, caplog) -> None:
    """Requests only report a reason (tier_unavailable), and a fault that fails writes
    alone (a read-only or damaged SQLite file) never opens the breaker: the tier's own
    message reached no log at all."""
    tier = SwitchTier()
    guard = guard_factory(tier, fail_max=100)
    tier.down = TierUnavailable
    with caplog.at_level("WARNING", logger="satchel.tiers"):
        for _ in range(5):
            with pytest.raises(TierUnavailable):
                guard.put("k", b"v", 10)
    failures = [r for r in caplog.records if "put failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].getMessage() == "satchel memory tier: put failed: switched off"
    guard.FAILURE_LOG_INTERVAL = 0.0  # the interval passed
    with caplog.at_level("WARNING", logger="satchel.tiers"):
        with pytest.raises(TierUnavailable):
            guard.put("k", b"v", 10)
    assert len([r for r in caplog.records if "put failed" in r.getMessage()]) == 2


def test_a_retired_key_read_within_its_grace_is_not_served_after_it(guard_factory, clock) -> None:
    """expire_soon() gives a merged-away segment a grace period. A read within it (a
    second tab with the token from before the merge) must not put it back in the cache
    for the cache's whole max_age: after the grace, the tier has dropped it, and this
    process must not keep serving it either."""
    tier = MemoryTier(clock=clock)
    guard = guard_factory(tier)
    guard.put("s:{a}:old", b"turns", 3600)
    guard.expire_soon(["s:{a}:old"], 10.0)
    clock.advance(5)
    assert guard.get_many(["s:{a}:old"]).get("s:{a}:old") == b"turns"  # within the grace
    clock.advance(6)
    fetched = guard.get_many(["s:{a}:old"])
    assert fetched.get("s:{a}:old") is None
    assert fetched.reason("s:{a}:old") == MISSING
    # A key that was never retired is cached as before.
    guard.put("s:{a}:live", b"x", 3600)
    guard.cache.discard(["s:{a}:live"])
    guard.get_many(["s:{a}:live"])
    assert "s:{a}:live" in guard.cache


def test_restore_does_not_write_back_a_retired_key_past_its_grace(guard_factory, clock) -> None:
    tier = MemoryTier(clock=clock)
    guard = guard_factory(tier)
    guard.put("s:{a}:old", b"turns", 3600)
    guard.expire_soon(["s:{a}:old"], 10.0)
    clock.advance(11)
    assert guard.restore([("s:{a}:old", b"turns"), ("s:{a}:new", b"n")], 3600) == 1
    assert tier.get_many(["s:{a}:old", "s:{a}:new"]) == [None, b"n"]


def test_writes_that_keep_failing_slowly_while_reads_succeed_fail_fast(
    guard_factory, clock, tmp_path
) -> None:
    """A write-locked SQLite file (another process holds a write transaction): reads go
    on, every write waits out the busy timeout. Each request's successful read reset
    the breaker's count, so it never opened and every request paid the timeout. Writes
    have a breaker of their own: after fail_max slow failures they fail fast (reads go
    on), and once the window has passed one is let through again."""
    import sqlite3

    from satchel.tiers import SQLiteTier

    path = tmp_path / "tier.db"
    guard = guard_factory(SQLiteTier(path, busy_timeout=0.05), fail_max=3, reset_timeout=5.0)
    guard.put("satchel:{s}:a", b"one", 60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # held by "another process"
    try:
        for _ in range(3):
            assert guard.get_many(["satchel:{s}:a"], cache=False).get("satchel:{s}:a") == b"one"
            with pytest.raises(TierUnavailable) as slow:
                guard.put("satchel:{s}:b", b"two", 60)
            assert "unsent" not in slow.value.facts
        started = time.perf_counter()
        with pytest.raises(TierUnavailable, match="writes keep failing") as fast:
            guard.put("satchel:{s}:b", b"two", 60)
        # Refused without touching the tier (unsent): not waiting out the busy timeout.
        # (A bound under it on the clock failed now and then: a full garbage collection
        # late in the suite takes 25-80 ms.)
        assert fast.value.facts["unsent"] is True
        assert time.perf_counter() - started < 0.5
        assert guard.breaker_state == "closed"  # reads are fine: the main breaker stays
        assert guard.get_many(["satchel:{s}:a"], cache=False).get("satchel:{s}:a") == b"one"
    finally:
        other.execute("ROLLBACK")
        other.close()
    with pytest.raises(TierUnavailable, match="writes keep failing"):
        guard.put("satchel:{s}:b", b"two", 60)  # still within the window
    clock.advance(5.0)
    guard.put("satchel:{s}:b", b"two", 60)  # the window has passed: let through
    guard.put("satchel:{s}:c", b"three", 60)
    assert guard.get_many(["satchel:{s}:b", "satchel:{s}:c"], cache=False).values == {
        "satchel:{s}:b": b"two",
        "satchel:{s}:c": b"three",
    }


def test_writes_refused_while_reads_come_from_the_cache_leave_the_main_breaker_closed(
    guard_factory, clock, tmp_path
) -> None:
    """The same lock, with every read a cache hit (a worker reading its own segments):
    nothing started the main breaker's count over, so fail_max refused writes opened
    it, and reads of segments this worker had not cached (another worker's) failed
    "breaker open" though the tier would have served them."""
    import sqlite3

    from satchel.tiers import SQLiteTier

    path = tmp_path / "tier.db"
    guard = guard_factory(SQLiteTier(path, busy_timeout=0.05), fail_max=3, reset_timeout=5.0)
    guard.put("satchel:{s}:mine", b"cached", 60)
    guard.tier.put("satchel:{t}:theirs", b"another worker's", 60)  # not in this cache
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # held by "another process"
    try:
        for _ in range(5):
            assert guard.get_many(["satchel:{s}:mine"]).get("satchel:{s}:mine") == b"cached"
            with pytest.raises(TierUnavailable) as refused:
                guard.put("satchel:{s}:next", b"two", 60)
            assert refused.value.facts.get("writes_only") or refused.value.facts["unsent"]
        assert guard.breaker_state == "closed"
    finally:
        other.execute("ROLLBACK")
        other.close()
    theirs = guard.get_many(["satchel:{t}:theirs"])
    assert theirs.get("satchel:{t}:theirs") == b"another worker's", theirs.missing


class ErasedWhileReading(MemoryTier):
    """A MemoryTier whose read answers with what it held, then lets an erasure of the
    session run before the answer reaches the guard: the read reached the tier first,
    and the erase finished while its reply was on the way (another thread, a slow
    network)."""

    erase: Any = None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found = super().get_many(keys)
        if self.erase is not None:
            erase, self.erase = self.erase, None
            erase()
        return found


def test_an_erasure_during_a_read_leaves_nothing_of_the_session_cached(guard_factory) -> None:
    """Satchel.erase clears this process's cache, but a read in flight then cached the
    erased segments again: served for up to the cache's max_age, unflagged, at the
    client level. What a read started before an erasure of its session brought back
    is not cached; nor is a write's."""
    tier = ErasedWhileReading()
    guard = guard_factory(tier)
    keys = ["satchel:{s1}:seg:a", "satchel:{s1}:seg:b"]
    for key in keys:
        tier.put(key, b"turns", 60)
    tier.put("satchel:{s2}:seg:c", b"other", 60)

    tier.erase = lambda: guard.erase_session("s1", "satchel:{s1}:hwm", b"\x00erased", 60)
    fetched = guard.get_many([*keys, "satchel:{s2}:seg:c"])
    assert set(fetched.values) == {*keys, "satchel:{s2}:seg:c"}  # what the read found
    assert not any(key in guard.cache for key in keys)  # none of it kept for later reads
    assert "satchel:{s2}:seg:c" in guard.cache  # another session's is cached as usual
    assert guard.get_many(keys).missing == dict.fromkeys(keys, MISSING)

    # A session erased long ago caches again once read afresh.
    tier.put(keys[0], b"new", 60)
    guard.get_many(keys[:1])
    assert keys[0] in guard.cache
