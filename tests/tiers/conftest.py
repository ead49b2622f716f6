"""Fixtures for the overflow tier tests: a controllable clock, a codec, contexts."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from satchel import Codec, Context, Keyring
from satchel.tiers import BreakerPolicy, GuardedTier, SegmentCache, Tier
from satchel.tiers.base import CLAIM_HELD
from tests.support.clock import FakeClock


class Events:
    """Collects ``on_event`` calls of a GuardedTier."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, event: str, **fields: object) -> None:
        self.seen.append((event, fields))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.generate("k1")


@pytest.fixture
def codec(keyring: Keyring) -> Codec:
    return Codec(keyring)


def make_ctx(turns: int = 6, *, now: float | None = None) -> Context:
    now = int(time.time()) if now is None else now
    ctx = Context.new(now=now)
    for i in range(turns):
        ctx.add_turn("user" if i % 2 == 0 else "assistant", f"turn {i}: " + "lorem " * 20, ts=now)
    return ctx


@pytest.fixture
def guard_factory(clock: FakeClock, events: Events) -> Callable[..., GuardedTier]:
    def make(
        tier: Tier, *, fail_max: int = 3, reset_timeout: float = 10.0, cache_bytes: int = 1 << 20
    ) -> GuardedTier:
        return GuardedTier(
            tier,
            breaker=BreakerPolicy(fail_max=fail_max, reset_timeout=reset_timeout),
            cache=SegmentCache(max_bytes=cache_bytes, clock=clock),
            clock=clock,
            on_event=events,
        )

    return make


def unclaimed_contract(tier: Tier) -> None:
    """The contract of :meth:`Tier.compare_and_set_unclaimed` (every tier: one test)."""
    key, claim = "satchel:{s}:ctx", "satchel:{s}:claim"
    save = tier.compare_and_set_unclaimed
    assert save(key, None, b"v1", 60, claim, None) is None  # no claim: a plain CAS
    tier.put(claim, b"stream-a", 60)
    # Held by another: nothing written, whatever the compare would have said.
    assert save(key, b"v1", b"v2", 60, claim, None) is CLAIM_HELD
    assert save(key, b"v1", b"v2", 60, claim, b"stream-b") is CLAIM_HELD
    assert tier.get_many([key]) == [b"v1"]
    # The holder's own save: a compare-and-set as before (and its loss reported so).
    assert save(key, b"old", b"v2", 60, claim, b"stream-a") == b"v1"
    assert save(key, b"v1", b"v2", 60, claim, b"stream-a") is None
    assert tier.get_many([key, claim]) == [b"v2", b"stream-a"]  # the claim is not touched
    tier.put(claim, b"", 60)  # a claim released late (swapped for an empty value)
    assert save(key, b"v2", b"v3", 60, claim, None) is None
    assert tier.get_many([key]) == [b"v3"]
    # With a companion (a monotonic mark and the newest token): both or neither.
    newest = "satchel:{s}:newest"
    tier.put(claim, b"stream-a", 60)
    assert save(key, b"v3", b"v4", 60, claim, None, (newest, b"t4", 30)) is CLAIM_HELD
    assert tier.get_many([key, newest]) == [b"v3", None]
    assert save(key, b"v3", b"v4", 60, claim, b"stream-a", (newest, b"t4", 30)) is None
    assert tier.get_many([key, newest]) == [b"v4", b"t4"]
