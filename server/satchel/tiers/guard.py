"""The circuit breaker and the segment cache in front of a tier.

Callers never talk to a tier directly; they go through :class:`GuardedTier`:

* **Breaker** (`pybreaker <https://github.com/danielfm/pybreaker>`_): after
  ``fail_max`` consecutive failures the breaker opens and every call fails at once
  with ``TierUnavailable("breaker open")``: no socket is touched and no timeout is
  paid. After ``reset_timeout`` seconds one trial call is let through (half-open); its
  success closes the breaker, its failure opens it again. State changes are reported
  through ``on_event("breaker_opened" | "breaker_half_open" | "breaker_closed",
  tier=name)``. ``TierFull`` does not count as a failure: the tier answered.

  pybreaker keeps the state, the counters and the listeners. The tier call itself
  runs outside pybreaker's lock (which would otherwise serialize every tier call of
  the process) and its outcome is then recorded through the breaker; the open ->
  half-open decision uses the ``clock`` passed in, so tests control it.

  One breaker per *shard* (:meth:`Tier.shard_of`): a tier whose keys live on
  independent servers (Redis Cluster: the master that holds the key's slot) keeps one
  breaker per server, so a dead master opens the breaker for its own sessions only,
  and the others keep working. Every other tier is one shard. ``breaker_state`` and
  the state events report the worst shard (open, then half-open, then closed).

* **Cache** (:class:`SegmentCache`): an in-process LRU bounded by total bytes. Reads
  are served from it first and only the rest is asked of the tier; values written
  with ``put`` go into it too. Segments are immutable (their key is a MAC of their
  digest), so a cached copy is never stale; it is dropped on ``delete`` /
  ``delete_session`` / ``compare_and_set_mark`` of its key and at its TTL.

* **Partial results**: :meth:`GuardedTier.get_many` never raises. It returns a
  :class:`Fetched` with the values it has (cached ones even when the tier is down) and,
  for every other key, why it is missing: ``"missing"`` (the tier answered: no such
  key) or ``"tier_unavailable"`` (the tier failed or the breaker is open).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import pybreaker

from ..errors import ContextErased, TierBusy, TierError, TierFull, TierUnavailable
from .base import ClaimHeld, Companion, Tier, hash_tag

T = TypeVar("T")
Clock = Callable[[], float]
EventHook = Callable[..., Any]

log = logging.getLogger("satchel.tiers")

MISSING: Final = "missing"
TIER_UNAVAILABLE: Final = "tier_unavailable"
MiB = 1024 * 1024

#: the calls that write: they have a breaker of their own (BreakerPolicy)
_WRITE_OPS = frozenset({"put", "delete", "expire_soon", "compare_and_set_mark", "delete_session"})

_STATE_NAMES = {
    pybreaker.STATE_CLOSED: "closed",
    pybreaker.STATE_OPEN: "open",
    pybreaker.STATE_HALF_OPEN: "half_open",
}
_STATE_EVENTS = {
    pybreaker.STATE_CLOSED: "breaker_closed",
    pybreaker.STATE_OPEN: "breaker_opened",
    pybreaker.STATE_HALF_OPEN: "breaker_half_open",
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When the breaker opens (``fail_max`` consecutive failures) and for how long
    (``reset_timeout`` seconds before one trial call is let through).

    Writes have a breaker of their own on the same terms: a tier that answers reads
    but fails every write slowly (a write-locked SQLite file waits out its busy
    timeout; a read-only replica) would never open the main breaker (each request's
    successful read resets its count), and every request paid the write's timeout.
    Such a refusal (a TierError with the ``writes_only`` fact) counts only there: in
    the main breaker it opened it whenever reads came from the segment cache, and
    reads the tier still served failed.
    After ``fail_max`` consecutive write failures, writes fail fast for
    ``reset_timeout`` seconds (reads go on); then writes are let through again (each
    waiting writer, not a single trial: the first success closes it).
    """

    fail_max: int = 5
    reset_timeout: float = 2.0

    def __post_init__(self) -> None:
        # NaN fails too: an opened breaker would never have waited long enough.
        if not (self.fail_max >= 1 and 0 <= self.reset_timeout < math.inf):
            raise ValueError("fail_max must be >= 1 and reset_timeout a finite number >= 0")


# ----------------------------------------------------------------------------- cache


#: How many retired keys a GuardedTier remembers (a grace period's worth of merges in
#: a busy process; past it, a retired segment read within its grace may stay cached up
#: to the cache's max_age).
MAX_RETIRED_KEYS = 4096
#: How many sessions' erasures the segment cache remembers, to refuse what reads begun
#: before one bring back (past it, every read begun before the forgotten erasure is
#: refused: a missed cache fill, never a stale one).
MAX_CLEARED_TAGS = 4096


class SegmentCache:
    """Thread-safe LRU of ``key -> bytes`` bounded by the total size of keys and values.

    An entry may also hold what its value *opened* to (:meth:`attach`, :meth:`opened`:
    the segment store keeps the verified, unpacked turns there), counted in the same
    byte bound and dropped with the entry, so every way an entry leaves the cache
    (eviction, expiry, ``discard``, ``discard_tag`` for an erasure) takes it along.

    ``max_age`` caps how long an entry is kept (seconds, also for entries whose TTL is
    unknown because they were read, not written, here). ``hits`` and ``misses`` count
    lookups; ``evictions`` counts entries pushed out by the byte bound.

    ``discard_tag`` (an erasure) also bumps :attr:`generation`: a read or write that
    began before it (``put(since=...)``, the generation it started in) and returns
    after it must not cache what it carries, or another thread's read in flight
    brings an erased session's segments back into the cache the erasure just cleared.
    """

    def __init__(
        self,
        max_bytes: int = 8 * MiB,
        *,
        max_age: float | None = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0 disables the cache)")
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._bytes = 0
        self._lock = threading.Lock()
        # key -> (value, expires_at, epoch in which the tier was known to hold it)
        self._data: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        # key -> (digest of the value it was opened from, what it opened to, weight)
        self._opened: dict[str, tuple[bytes, Any, int]] = {}
        # session tag -> generation of its last discard_tag (erasure), newest last
        self._generation = 0
        self._cleared: OrderedDict[str, int] = OrderedDict()
        self._cleared_floor = 0  # the newest generation forgotten from _cleared

    @property
    def generation(self) -> int:
        """Erasures so far: pass it to :meth:`put` as ``since`` before a tier call."""
        return self._generation

    def __repr__(self) -> str:
        return (
            f"SegmentCache(entries={len(self._data)}, bytes={self._bytes}/{self.max_bytes}, "
            f"hits={self.hits}, misses={self.misses})"
        )

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    @property
    def size(self) -> int:
        """Bytes held (keys and values)."""
        return self._bytes

    def stats(self) -> dict[str, int]:
        """Counts and sizes, after dropping the entries past their age (a lookup drops
        one it meets; with no more lookups, as after the load stops, the cache would
        hold them, and report them, until the process ends)."""
        self.sweep()
        return {
            "entries": len(self._data),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def sweep(self) -> int:
        """Drop every entry past its age; returns how many."""
        with self._lock:
            now = self.clock()
            expired = [key for key, item in self._data.items() if item[1] <= now]
            for key in expired:
                self._pop(key)
            return len(expired)

    def _pop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= len(key) + len(item[0])
        opened = self._opened.pop(key, None)
        if opened is not None:
            self._bytes -= opened[2]

    def _make_room(self, size: int, keep: str | None = None) -> None:
        """Evict the least recently used entries until ``size`` more bytes fit, stopping
        at ``keep``. Called with the lock held."""
        while self._data and self._bytes + size > self.max_bytes:
            oldest = next(iter(self._data))
            if oldest == keep:
                return
            self._pop(oldest)
            self.evictions += 1

    def attach(self, key: str, digest: bytes, opened: Any, weight: int) -> bool:
        """Keep ``opened`` (what the cached value of ``key``, whose digest is
        ``digest``, opened to) with that entry, counting ``weight`` bytes against the
        bound. False when the entry is gone or the weight does not fit."""
        with self._lock:
            item = self._data.get(key)
            # Checked before evicting anything: a weight that cannot fit beside its own
            # entry must not empty the cache for nothing.
            if item is None or len(key) + len(item[0]) + weight > self.max_bytes:
                return False
            previous = self._opened.pop(key, None)
            if previous is not None:
                self._bytes -= previous[2]
            self._data.move_to_end(key)  # just read: the last entry to give way
            self._make_room(weight, keep=key)
            if self._bytes + weight > self.max_bytes:
                return False
            self._opened[key] = (digest, opened, weight)
            self._bytes += weight
            return True

    def opened(self, key: str, digest: bytes) -> Any | None:
        """What :meth:`attach` kept for ``key``, if its entry is still cached and was
        opened from a value with ``digest``; else None. Counts no hit or miss."""
        with self._lock:
            item = self._data.get(key)
            found = self._opened.get(key)
            if item is None or found is None or item[1] <= self.clock():
                return None
            return found[1] if hmac.compare_digest(found[0], digest) else None

    def get(self, key: str) -> bytes | None:
        """The cached value (counted as a hit) or None (a miss)."""
        entry = self.lookup(key)
        return None if entry is None else entry[0]

    def lookup(self, key: str) -> tuple[bytes, int] | None:
        """The cached value and the epoch it was cached in (a hit), or None (a miss)."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and item[1] <= self.clock():
                self._pop(key)
                item = None
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0], item[2]

    def put(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        *,
        epoch: int = 0,
        since: int | None = None,
    ) -> bool:
        """Cache ``value``; False when it is larger than the whole cache, or its
        session was erased after generation ``since`` (not cached).

        ``epoch``: the tier's outage count when it was known to hold the value
        (:attr:`GuardedTier.epoch`). ``since``: :attr:`generation` when the tier call
        that got the value began.
        """
        size = len(key) + len(value)
        ages = [a for a in (ttl, self.max_age) if a is not None]
        if size > self.max_bytes or (ages and min(ages) <= 0):
            return False
        expires_at = self.clock() + min(ages) if ages else float("inf")
        with self._lock:
            if since is not None and (
                since < self._cleared_floor or self._cleared.get(hash_tag(key) or "", 0) > since
            ):
                return False  # erased while the value was on its way
            self._pop(key)
            self._make_room(size)
            self._data[key] = (bytes(value), expires_at, epoch)
            self._bytes += size
            return True

    def discard(self, keys: Iterable[str]) -> None:
        """Drop ``keys`` (any not cached are skipped). Unlike :meth:`discard_tag`, a tier
        read already under way may cache them again."""
        with self._lock:
            for key in keys:
                self._pop(key)

    def discard_tag(self, session_tag: str) -> int:
        """Drop every entry of one session (keys whose hash tag is ``session_tag``), and
        refuse what tier calls begun before now bring back for it (:meth:`put`)."""
        with self._lock:
            self._generation += 1
            self._cleared[session_tag] = self._generation
            self._cleared.move_to_end(session_tag)
            while len(self._cleared) > MAX_CLEARED_TAGS:
                _, forgotten = self._cleared.popitem(last=False)
                self._cleared_floor = max(self._cleared_floor, forgotten)
            doomed = [k for k in self._data if hash_tag(k) == session_tag]
            for key in doomed:
                self._pop(key)
            return len(doomed)

    def clear(self) -> None:
        """Drop every entry and what :meth:`attach` kept with it. The hit, miss and
        eviction counts stay, and so does the record of erased sessions."""
        with self._lock:
            self._data.clear()
            self._opened.clear()
            self._bytes = 0


# ------------------------------------------------------------------------ result type


@dataclass(frozen=True, slots=True)
class Fetched:
    """What :meth:`GuardedTier.get_many` found, and why the rest is missing.

    ``values`` holds every key that was found (from the cache or the tier);
    ``missing`` maps each other key to ``"missing"`` (the tier answered: no such key,
    expired or evicted) or ``"tier_unavailable"`` (the tier failed, timed out or the
    breaker is open: the value may well exist). ``cached`` are the keys served from the
    cache; ``unconfirmed`` those of them cached before the tier's last outage, which the
    tier may have lost since (a restart without persistence): see
    :meth:`GuardedTier.restore`. ``error`` is the tier's failure, if there was one.
    """

    keys: tuple[str, ...]
    values: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    cached: frozenset[str] = frozenset()
    error: TierError | None = None
    unconfirmed: frozenset[str] = frozenset()

    def get(self, key: str) -> bytes | None:
        """The value found for ``key``, or None; :meth:`reason` says why it is missing."""
        return self.values.get(key)

    def reason(self, key: str) -> str | None:
        """None when ``key`` was found, else ``"missing"`` or ``"tier_unavailable"``."""
        return self.missing.get(key)

    def ordered(self) -> list[bytes | None]:
        """Values in the order of ``keys`` (None where missing), like ``Tier.get_many``."""
        return [self.values.get(k) for k in self.keys]

    @property
    def complete(self) -> bool:
        """Every key was found."""
        return not self.missing

    @property
    def degraded(self) -> bool:
        """Some key could not be looked up because the tier failed."""
        return self.error is not None

    @property
    def from_cache(self) -> int:
        """How many keys were served from the cache."""
        return len(self.cached)


# --------------------------------------------------------------------------- breaker


_SEVERITY = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


class _Shard:
    """One breaker: pybreaker's, plus the half-open trial and when it opened."""

    def __init__(self, guard: GuardedTier, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.trial = False  # a half-open trial call is in flight
        self.opened_at = 0.0
        #: the state as of the last transition (set in the listener: pybreaker updates
        #: its own storage only after the listeners ran)
        self.state: str = pybreaker.STATE_CLOSED
        self.last_call = guard.clock()
        #: when a failure of this shard was last logged (time.monotonic(); 0: never)
        self.failure_logged_at = 0.0
        #: the writes' own breaker (BreakerPolicy): consecutive write failures, and
        #: until when (guard.clock()) writes fail fast
        self.write_failures = 0
        self.writes_refused_until = 0.0
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=guard.policy.fail_max,
            reset_timeout=guard.policy.reset_timeout,
            exclude=[TierFull, TierBusy],  # the tier answered: nothing slow to spare
            listeners=[_Listener(guard, self)],
            name=f"satchel-{guard.tier.name}{'-' + name if name else ''}",
            throw_new_error_on_trip=False,
        )


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, guard: GuardedTier, shard: _Shard) -> None:
        self.guard = guard
        self.shard = shard

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        # Called with pybreaker's lock held: never take a shard's lock here.
        if new_state.name == pybreaker.STATE_OPEN:
            self.shard.opened_at = self.guard.clock()
            # The tier failed: it may come back without what it held (a restart with no
            # persistence). Values cached before now are unconfirmed from here on.
            self.guard.epoch += 1
        self.guard._report(self.shard, new_state.name)


class GuardedTier:
    """A tier behind a circuit breaker and an in-process segment cache.

    Same method names as :class:`~satchel.tiers.base.Tier`; ``get_many`` returns a
    :class:`Fetched` (never raises), the other methods raise
    :class:`~satchel.errors.TierError` only (``TierUnavailable("breaker open")`` at
    once while the breaker is open). ``on_event(event, **fields)`` is called on every
    breaker state change with ``tier=<name>``.
    """

    def __init__(
        self,
        tier: Tier,
        breaker: BreakerPolicy | None = None,
        cache: SegmentCache | None = None,
        clock: Clock = time.monotonic,
        on_event: EventHook | None = None,
    ) -> None:
        self.tier = tier
        self.policy = breaker or BreakerPolicy()
        self.cache = cache if cache is not None else SegmentCache(clock=clock)
        self.clock = clock
        self.on_event = on_event
        #: how many times a breaker has opened (an outage); cache entries older than
        #: the current epoch are "unconfirmed" (Fetched.unconfirmed)
        self.epoch = 0
        #: clock() time of the last write the tier refused for want of memory (TierFull),
        #: or None: /readyz reports a tier that is full now as degraded
        self.last_full_at: float | None = None
        self._shards_lock = threading.RLock()  # _report may run inside _shard (a listener)
        self._reported = pybreaker.STATE_CLOSED  # the worst state last reported
        self._shards: dict[str, _Shard] = {}
        # A shard no call has named for this long (a Cluster master replaced in a
        # failover) stops counting: its breaker would otherwise stay open for good.
        self._stale_after = max(60.0, 10 * self.policy.reset_timeout)
        self._pruned_at = clock()
        #: the breaker of the tier's default shard (the only one, but for a Cluster)
        self.breaker = self._shard("").breaker
        # Keys expire_soon() retired, with the clock() time their grace ends: a read
        # within the grace must not cache them (nor an outage's restore() write them
        # back) for longer than the tier keeps them. Bounded: the oldest are forgotten.
        self._retired: OrderedDict[str, float] = OrderedDict()
        self._retired_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GuardedTier({self.tier!r}, breaker={self.breaker_state!r}, cache={self.cache!r})"

    @property
    def name(self) -> str:
        """The wrapped tier's name (``"redis"``, ``"sqlite"``, ...)."""
        return self.tier.name

    @property
    def breaker_state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``: the worst of the shards'."""
        return _STATE_NAMES.get(self._worst_state(), "closed")

    @property
    def writes_failing(self) -> bool:
        """True while some shard's writes keep failing (``fail_max`` in a row, none
        since): writes fail fast there until one succeeds. Kept apart from the breaker,
        which reads feed too: a store that answers reads but refuses writes (a SQLite
        file on a read-only disk) keeps its breaker closed while every spill fails."""
        fail_max = self.policy.fail_max
        return any(s.write_failures >= fail_max for s in list(self._shards.values()))

    def breaker_states(self) -> dict[str, str]:
        """Each shard's breaker state, by shard name (``""``: the default shard)."""
        return {name: _STATE_NAMES.get(s.state, s.state) for name, s in list(self._shards.items())}

    def _worst_state(self) -> str:
        states = [s.state for s in list(self._shards.values())]
        return max(states, key=lambda state: _SEVERITY.get(state, 0), default="closed")

    def _shard(self, name: str) -> _Shard:
        shard = self._shards.get(name)
        if shard is None:
            with self._shards_lock:
                shard = self._shards.get(name)
                if shard is None:
                    shard = self._shards[name] = _Shard(self, name)
        return shard

    def _shard_of(self, key: str) -> _Shard:
        try:
            name = self.tier.shard_of(key)
        except Exception:  # naming a shard must never fail a call
            name = ""
        return self._shard(name)

    def _report(self, cause: _Shard | None = None, new_state: str | None = None) -> None:
        """Report the tier's worst state when it changes: the gauge and the events
        describe the tier, ``detail`` names the shard whose change moved it. Emitted
        under the lock, so two shards' changes are never reported in the opposite
        order of their effect."""
        with self._shards_lock:
            if cause is not None and new_state is not None:
                cause.state = new_state  # under the lock: the report names its own cause
            worst = self._worst_state()
            if worst == self._reported:
                return
            self._reported = worst
            event = _STATE_EVENTS.get(worst)
            if event and cause is not None and cause.name:
                self._emit(event, detail=cause.name)
            elif event:
                self._emit(event)

    def _prune(self, now: float) -> None:
        """Forget shards no call has named for ``_stale_after`` seconds."""
        with self._shards_lock:
            self._pruned_at = now
            stale = [
                name
                for name, s in self._shards.items()
                if name and now - s.last_call > self._stale_after
            ]
            for name in stale:
                del self._shards[name]
        if stale:
            self._report()

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event, tier=self.name, **fields)
        except Exception:  # an observer must never break a request
            log.exception("satchel tier event hook failed for %s", event)

    # -- breaker mechanics -------------------------------------------------------------

    def _admit(self, shard: _Shard, op: str) -> bool:
        """Let a call through, or fail fast. Returns True for a half-open trial call."""
        breaker = shard.breaker
        state = breaker.current_state
        if state == pybreaker.STATE_CLOSED:
            return False
        with shard.lock:
            state = breaker.current_state
            if state == pybreaker.STATE_CLOSED:
                return False
            waited = self.clock() - shard.opened_at
            if shard.trial or (
                state == pybreaker.STATE_OPEN and waited < self.policy.reset_timeout
            ):
                facts: dict[str, Any] = {"shard": shard.name} if shard.name else {}
                raise TierUnavailable(
                    "breaker open",
                    tier=self.name,
                    op=op,
                    unsent=True,  # no socket touched: nothing reached the tier
                    breaker=_STATE_NAMES.get(state, state),
                    retry_in=max(0.0, self.policy.reset_timeout - waited),
                    **facts,
                )
            shard.trial = True
        if state == pybreaker.STATE_OPEN:
            breaker.half_open()
        return True

    def _admit_write(self, shard: _Shard, op: str, now: float) -> None:
        """Fail a write fast while the shard's writes keep failing (BreakerPolicy)."""
        if now < shard.writes_refused_until:
            facts: dict[str, Any] = {"shard": shard.name} if shard.name else {}
            raise TierUnavailable(
                "the tier's writes keep failing, so none is tried for a moment; "
                "nothing was written: retry shortly",
                tier=self.name,
                op=op,
                unsent=True,  # no socket touched: nothing reached the tier
                breaker="writes_open",
                retry_in=shard.writes_refused_until - now,
                **facts,
            )

    def _record_write(self, shard: _Shard, op: str, outcome: TierError | None) -> None:
        if outcome is None:
            if shard.write_failures >= self.policy.fail_max:
                log.warning("satchel %s tier: writes succeed again (%s)", self.name, op)
            shard.write_failures = 0
            shard.writes_refused_until = 0.0
            return
        if isinstance(outcome, TierFull):
            self.last_full_at = self.clock()
            return  # answered at once: nothing slow to spare requests
        if isinstance(outcome, TierBusy):
            return  # a slot on the move: the server is well
        if outcome.facts.get("unsent"):
            return  # never sent
        shard.write_failures += 1
        if shard.write_failures >= self.policy.fail_max:
            if shard.write_failures == self.policy.fail_max:
                log.warning(
                    # Counted apart from the breaker (which reads also feed), so this
                    # says nothing of reads: they may be failing too, or succeeding.
                    "satchel %s tier: %d writes failed in a row; "
                    "writes fail fast for %.1f s at a time until one succeeds",
                    self.name,
                    shard.write_failures,
                    self.policy.reset_timeout,
                )
            shard.writes_refused_until = self.clock() + self.policy.reset_timeout

    def full_recently(self, within: float = 60.0) -> bool:
        """True if the tier refused a write for want of memory in the last ``within``
        seconds (a full store: every write that needs room fails until some expires)."""
        full_at = self.last_full_at
        return full_at is not None and self.clock() - full_at <= within

    @staticmethod
    def _record(shard: _Shard, outcome: TierError | None) -> None:
        def replay() -> None:
            if outcome is not None:
                raise outcome

        try:
            shard.breaker.call(replay)
        except (TierError, pybreaker.CircuitBreakerError):
            pass

    def _call(self, op: str, fn: Callable[..., T], *args: Any, key: str | None = None) -> T:
        """Run one tier call through the breaker of the shard that holds ``key``."""
        shard = self._shards[""] if key is None else self._shard_of(key)
        now = self.clock()
        shard.last_call = now
        if now - self._pruned_at > 5.0:
            self._prune(now)
        trial = self._admit(shard, op)
        write = op in _WRITE_OPS
        try:
            if write:
                self._admit_write(shard, op, now)
            outcome: TierError | None = None
            try:
                result = fn(*args)
            except TierError as exc:
                outcome = exc
            except Exception as exc:  # a tier bug: still only TierError leaves the guard
                log.exception("satchel %s tier raised %s in %s", self.name, type(exc).__name__, op)
                outcome = TierUnavailable(
                    f"the {self.name} tier failed ({op}): {type(exc).__name__}",
                    tier=self.name,
                    op=op,
                    error=type(exc).__name__,
                )
            if not (write and outcome is not None and outcome.facts.get("writes_only")):
                # Not a write the tier refused while it still serves reads (a SQLite
                # file locked or read-only; a Redis replica): the writes' breaker counts
                # those. Counted here too, they opened the main breaker whenever reads
                # came from the segment cache (nothing to start the count over), and
                # reads the tier would have served failed "breaker open".
                self._record(shard, outcome)
            if write:
                self._record_write(shard, op, outcome)
            if outcome is not None:
                self._log_failure(shard, op, outcome)
        finally:
            if trial:
                with shard.lock:
                    shard.trial = False
        if outcome is not None:
            raise outcome
        return result

    #: at most one failure logged per shard in this many seconds
    FAILURE_LOG_INTERVAL = 10.0

    def _log_failure(self, shard: _Shard, op: str, error: TierError) -> None:
        """Log what the tier said (a read-only file, a malformed database, an OOM), once
        per shard per :attr:`FAILURE_LOG_INTERVAL`: requests report only a reason
        (``tier_unavailable``), and a fault that fails writes alone never opens the
        main breaker (only the writes' own), whose events would name it otherwise."""
        now = time.monotonic()
        if now - shard.failure_logged_at < self.FAILURE_LOG_INTERVAL:
            return
        shard.failure_logged_at = now
        log.warning(
            "satchel %s tier: %s failed: %s%s",
            self.name,
            op,
            error.message,
            f" (shard {shard.name})" if shard.name else "",
        )

    # -- Tier-like API -----------------------------------------------------------------

    def get_many(self, keys: Sequence[str], *, cache: bool = True) -> Fetched:
        """Cached values first, the rest in one tier call; never raises.

        ``cache=False`` bypasses the cache both ways (for mutable records).
        """
        unique = list(dict.fromkeys(keys))
        values: dict[str, bytes] = {}
        cached: set[str] = set()
        unconfirmed: set[str] = set()
        epoch = self.epoch
        since = self.cache.generation
        if cache and self.cache.max_bytes:
            for key in unique:
                entry = self.cache.lookup(key)
                if entry is not None:
                    values[key] = entry[0]
                    cached.add(key)
                    if entry[1] < epoch:
                        unconfirmed.add(key)
        rest = [k for k in unique if k not in values]
        missing: dict[str, str] = {}
        error: TierError | None = None
        if rest:
            try:
                # One session's keys share a slot (hash tag): one shard for all of them.
                found = self._call("get_many", self.tier.get_many, rest, key=rest[0])
                if len(found) != len(rest):
                    raise TierUnavailable(
                        "the tier returned the wrong number of values", tier=self.name
                    )
            except TierError as exc:
                error = exc
                missing = dict.fromkeys(rest, TIER_UNAVAILABLE)
            else:
                for key, value in zip(rest, found, strict=True):
                    if value is None:
                        missing[key] = MISSING
                    else:
                        values[key] = value
                        if cache:
                            self.cache.put(
                                key, value, self._grace_left(key), epoch=epoch, since=since
                            )
        return Fetched(
            tuple(keys), values, missing, frozenset(cached), error, frozenset(unconfirmed)
        )

    def put(self, key: str, value: bytes, ttl: float, *, cache: bool = True) -> None:
        """Store ``value`` (and cache it once the tier has it). Raises TierError."""
        epoch, since = self.epoch, self.cache.generation
        self._call("put", self.tier.put, key, value, ttl, key=key)
        if cache:
            self.cache.put(key, value, ttl, epoch=epoch, since=since)

    def put_unless_marked(
        self, key: str, value: bytes, ttl: float, mark: str, refused: bytes, *, cache: bool = True
    ) -> bool:
        """Store ``value`` unless ``mark`` holds ``refused`` (:meth:`Tier.put_unless_marked`);
        False when refused. Raises TierError."""
        epoch, since = self.epoch, self.cache.generation
        written = self._call(
            "put", self.tier.put_unless_marked, key, value, ttl, mark, refused, key=key
        )
        if written and cache:
            self.cache.put(key, value, ttl, epoch=epoch, since=since)
        return written

    def restore(
        self,
        items: Sequence[tuple[str, bytes]],
        ttl: float,
        *,
        unless: tuple[str, bytes] | None = None,
    ) -> int:
        """Write cached values the tier may have lost back to it (best effort).

        After an outage the tier may have come back empty; this process still holds
        what it cached, and writing it back keeps it for every process, not only this
        one. Returns how many were written; stops at the first failure (they stay
        unconfirmed and are tried again on a later read). ``unless`` (mark, value):
        each write is refused while the mark holds the value (the session's erasure
        tombstone); then this raises :class:`~satchel.errors.ContextErased`.
        """
        written = 0
        for key, value in items:
            left = self._grace_left(key)
            if left is not None and left <= 0:
                continue  # retired and past its grace: the tier was right to drop it
            keep_for = ttl if left is None else min(ttl, left)
            try:
                if unless is None:
                    self.put(key, value, keep_for)
                elif not self.put_unless_marked(key, value, keep_for, *unless):
                    raise ContextErased("this conversation was erased")
            except TierError:
                break
            written += 1
        return written

    def delete(self, keys: Sequence[str]) -> int:
        """:meth:`Tier.delete` through the breaker, after dropping ``keys`` from the
        cache; how many existed. Raises TierError."""
        self.cache.discard(keys)
        return self._call("delete", self.tier.delete, keys, key=keys[0] if keys else None)

    def expire_soon(self, keys: Sequence[str], ttl: float) -> None:
        """:meth:`Tier.expire_soon` through the breaker. The keys leave the cache now
        and are not cached again for longer than ``ttl``. Raises TierError."""
        # The cache forgets them now: within the grace period the tier still serves them.
        self.cache.discard(keys)
        self._call("expire_soon", self.tier.expire_soon, keys, ttl, key=keys[0] if keys else None)
        deadline = self.clock() + ttl
        with self._retired_lock:
            for key in keys:
                self._retired[key] = deadline
                self._retired.move_to_end(key)
            while len(self._retired) > MAX_RETIRED_KEYS:
                self._retired.popitem(last=False)

    def _grace_left(self, key: str) -> float | None:
        """Seconds the tier still keeps a key expire_soon() retired; None for any other."""
        with self._retired_lock:
            deadline = self._retired.get(key)
        return None if deadline is None else deadline - self.clock()

    @contextlib.contextmanager
    def _session_uncached(self, session_tag: str) -> Iterator[None]:
        """Around a deletion of a session's keys in the tier: its cached entries are
        dropped before and after. A read that starts between the two still finds the
        keys in the tier, and caches them; the second clear drops them, and refuses
        what a read begun before it brings back later (SegmentCache.put's since)."""
        self.cache.discard_tag(session_tag)
        try:
            yield
        finally:
            self.cache.discard_tag(session_tag)

    def delete_session(self, session_tag: str) -> int:
        """:meth:`Tier.delete_session` through the breaker, with the session's cached
        entries dropped before and after; how many it deleted. Raises TierError."""
        with self._session_uncached(session_tag):
            return self._call(
                "delete_session", self.tier.delete_session, session_tag, key=f"{{{session_tag}}}"
            )

    def erase_session(self, session_tag: str, mark: str, tombstone: bytes, ttl: float) -> int:
        """:meth:`Tier.erase_session` (all but ``mark`` deleted, ``mark`` set to
        ``tombstone``), uncached like :meth:`delete_session`. Raises TierError."""
        with self._session_uncached(session_tag):
            return self._call(
                "delete_session",
                self.tier.erase_session,
                session_tag,
                mark,
                tombstone,
                ttl,
                key=f"{{{session_tag}}}",
            )

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        """:meth:`Tier.compare_and_set_mark` through the breaker, uncached: None when
        set, else the value found. Raises TierError."""
        self.cache.discard((key,))
        return self._call(
            "compare_and_set_mark", self.tier.compare_and_set_mark, key, expected, new, ttl, key=key
        )

    def compare_and_set_mark_with(
        self, key: str, expected: bytes | None, new: bytes, ttl: float, companion: Companion | None
    ) -> bytes | None:
        """:meth:`Tier.compare_and_set_mark_with` through the breaker (the mark and the
        companion uncached): None when set, else the value found. Raises TierError."""
        self.cache.discard((key,) if companion is None else (key, companion[0]))
        return self._call(
            "compare_and_set_mark",
            self.tier.compare_and_set_mark_with,
            key,
            expected,
            new,
            ttl,
            companion,
            key=key,
        )

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
        """:meth:`Tier.compare_and_set_unclaimed` through the breaker: CLAIM_HELD while
        another holder's ``claim`` lives, else as :meth:`compare_and_set_mark_with`."""
        self.cache.discard((key,) if companion is None else (key, companion[0]))
        return self._call(
            "compare_and_set_mark",
            self.tier.compare_and_set_unclaimed,
            key,
            expected,
            new,
            ttl,
            claim,
            holder,
            companion,
            key=key,
        )

    def ping(self) -> None:
        """:meth:`Tier.ping` through the breaker: TierError unless the tier answers (at
        once while the breaker is open)."""
        self._call("ping", self.tier.ping)

    def close(self) -> None:
        """Close the wrapped tier (not through the breaker); the cache is kept."""
        self.tier.close()


__all__ = [
    "MISSING",
    "TIER_UNAVAILABLE",
    "BreakerPolicy",
    "Fetched",
    "GuardedTier",
    "SegmentCache",
]
