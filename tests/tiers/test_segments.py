"""SegmentStore on an in-process tier: round trips, keys, tampering, foreign segments,
key rotation and erasure. (The same against real Redis is in test_redis.py.)"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from satchel import Codec, Keyring, envelope, segments, serialize
from satchel.context import OpaqueBlock, ToolCall, Turn
from satchel.errors import BudgetExceeded, TierUnavailable
from satchel.keys import generate_key
from satchel.limits import Limits
from satchel.segments import (
    SEGMENT_CORRUPT,
    SEGMENT_FOREIGN,
    SEGMENT_MISSING,
    TIER_UNAVAILABLE,
    SegmentStore,
    segment_digest,
)
from satchel.tiers import GuardedTier, MemoryTier, NoTier, SegmentCache

from .conftest import make_ctx

NOW = float(int(time.time()))  # segments carry an expiry, checked by the codec's clock


@pytest.fixture
def codec(keyring: Keyring) -> Codec:
    """The codec on this module's clock: NOW is taken at import, and a full suite may
    reach these tests minutes later, past the 60 s TTLs they write."""
    return on_clock(keyring)


def on_clock(keyring: Keyring, **options: Any) -> Codec:
    """A codec on the module's clock (see ``codec``): every segment it opens was written
    at NOW, with a TTL that a slow suite's wall clock can pass."""
    return Codec(keyring, clock=lambda: NOW, **options)


def store_on(tier, codec: Codec, cache_bytes: int = 1 << 20) -> SegmentStore:
    return SegmentStore(GuardedTier(tier, cache=SegmentCache(max_bytes=cache_bytes)), codec)


def spill(store: SegmentStore, ctx, n: int, ttl: float = 600) -> None:
    """Move the oldest ``n`` turns of ``ctx`` into one segment."""
    moved, ctx.turns = ctx.turns[:n], ctx.turns[n:]
    ctx.overflow.append(store.write(ctx, moved, ttl, now=NOW))


def test_round_trip_keeps_order_and_reports_cache_use(codec) -> None:
    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(9, now=NOW)
    original = list(ctx.turns)
    spill(store, ctx, 3)
    spill(store, ctx, 2)
    ref = ctx.overflow[0]
    assert ref.turns == 3 and ref.seq == ctx.seq and ref.ts == NOW
    assert len(ref.digest) == 16 and ref.size > 0

    got = store.read(ctx)
    assert got.complete and got.missing == [] and got.error is None
    assert got.turns == original[:5]
    assert got.from_cache == 2  # write() cached both

    store.tier.cache.clear()
    got = store.read(ctx)
    assert got.turns == original[:5] and got.from_cache == 0


def test_session_tag_and_key_shape(codec) -> None:
    store = SegmentStore(GuardedTier(MemoryTier()), codec, prefix="app")
    ctx = make_ctx(1)
    tag = store.session_tag(ctx.session_id)
    assert re.fullmatch(r"[0-9a-f]{16}", tag)
    key = store.key_for(ctx.session_id, b"\x01" * 16)
    assert re.fullmatch(rf"app:\{{{tag}\}}:seg:[A-Za-z0-9_-]{{22}}", key)
    # keyed: another key ring gives other names for the same session and digest
    other = SegmentStore(GuardedTier(MemoryTier()), on_clock(Keyring.generate()), prefix="app")
    assert other.session_tag(ctx.session_id) != tag
    assert other.key_for(ctx.session_id, b"\x01" * 16) != key
    # and another purpose too
    scoped = SegmentStore(GuardedTier(MemoryTier()), on_clock(codec.keyring, purpose="other"))
    assert scoped.session_tag(ctx.session_id) != tag


def test_tampered_reference_is_missing_not_a_crash(codec) -> None:
    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(6, now=NOW)
    spill(store, ctx, 2)
    spill(store, ctx, 2)
    good = ctx.overflow[1]
    bad = dataclasses.replace(ctx.overflow[0], digest=bytes(16))
    ctx.overflow = [bad, good]
    got = store.read(ctx)
    assert got.missing == [(bad, SEGMENT_MISSING)]
    assert len(got.turns) == 2  # the intact segment is still used
    assert got.lost_turns == 2 and got.reasons == [SEGMENT_MISSING]


def test_damaged_bytes_are_corrupt(codec) -> None:
    tier = MemoryTier()
    store = store_on(tier, codec, cache_bytes=0)
    ctx = make_ctx(4, now=NOW)
    spill(store, ctx, 2)
    key = store.key_for(ctx.session_id, ctx.overflow[0].digest)
    stored = tier.get_many([key])[0]
    tier.put(key, stored[:-1] + bytes([stored[-1] ^ 1]), 60)
    assert store.read(ctx).missing == [(ctx.overflow[0], SEGMENT_CORRUPT)]


def test_bytes_that_match_the_digest_but_not_the_codec_are_corrupt(codec) -> None:
    """Someone with write access to the tier stores junk and a ref to it cannot be forged
    without the codec key; junk under a matching digest still never opens."""
    tier = MemoryTier()
    store = store_on(tier, codec, cache_bytes=0)
    ctx = make_ctx(2, now=NOW)
    junk = b"\x01\x01\x00\x02k1" + bytes(40)
    ref = dataclasses.replace(store.write(ctx, ctx.turns, 60, now=NOW), digest=segment_digest(junk))
    tier.put(store.key_for(ctx.session_id, ref.digest), junk, 60)
    ctx.overflow = [ref]
    assert store.read(ctx).missing == [(ref, SEGMENT_CORRUPT)]


def test_another_sessions_segment_cannot_be_read(codec) -> None:
    tier = MemoryTier()
    store = store_on(tier, codec, cache_bytes=0)
    alice, mallory = make_ctx(4, now=NOW), make_ctx(4, now=NOW)
    spill(store, alice, 2)
    # Mallory copies Alice's reference into her own context: the key is derived from
    # Mallory's session id, so it names nothing.
    mallory.overflow = list(alice.overflow)
    got = store.read(mallory)
    assert got.turns == [] and got.missing == [(alice.overflow[0], SEGMENT_MISSING)]
    # Even if Alice's bytes were copied under Mallory's key (tier write access), the
    # session id sealed inside the segment gives it away.
    alice_key = store.key_for(alice.session_id, alice.overflow[0].digest)
    tier.put(
        store.key_for(mallory.session_id, alice.overflow[0].digest),
        tier.get_many([alice_key])[0],
        60,
    )
    assert store.read(mallory).missing == [(alice.overflow[0], SEGMENT_FOREIGN)]


def test_another_sessions_segment_under_this_sessions_own_key_is_foreign(codec) -> None:
    """Bob's segment bytes copied over Alice's own segment (tier write access): they fail
    the digest in Alice's reference, and were reported segment_corrupt, although
    docs/overflow.md names this case segment_foreign. Junk and Alice's own other
    segment under that key stay segment_corrupt."""
    tier = MemoryTier()
    store = store_on(tier, codec, cache_bytes=0)
    alice, bob = make_ctx(6, now=NOW), make_ctx(4, now=NOW)
    spill(store, alice, 2)
    spill(store, alice, 2)
    spill(store, bob, 2)
    first, second = alice.overflow
    alice_key = store.key_for(alice.session_id, first.digest)

    def stored_at(ctx, ref):  # type: ignore[no-untyped-def]
        return tier.get_many([store.key_for(ctx.session_id, ref.digest)])[0]

    tier.put(alice_key, stored_at(bob, bob.overflow[0]), 60)
    assert store.read(alice).missing == [(first, SEGMENT_FOREIGN)]
    tier.put(alice_key, stored_at(alice, second), 60)  # hers, but not this segment
    assert store.read(alice).missing == [(first, SEGMENT_CORRUPT)]
    tier.put(alice_key, b"s1." + b"A" * 200, 60)
    assert store.read(alice).missing == [(first, SEGMENT_CORRUPT)]


def test_signed_mode_segments_round_trip(keyring) -> None:
    store = store_on(MemoryTier(), on_clock(keyring, mode="signed"))
    ctx = make_ctx(4, now=NOW)
    turns = list(ctx.turns)
    spill(store, ctx, 3)
    assert store.read(ctx).turns == turns[:3]


def test_segments_survive_key_rotation_while_the_anchor_is_in_the_ring() -> None:
    tier = MemoryTier()
    old_ring = Keyring.generate("old")
    ctx = make_ctx(4, now=NOW)
    turns = list(ctx.turns)
    spill(store_on(tier, on_clock(old_ring), cache_bytes=0), ctx, 2)

    rotated = old_ring.rotated(generate_key("new"))
    store = store_on(tier, on_clock(rotated), cache_bytes=0)
    spill(store, ctx, 1)  # written while the new key seals
    got = store.read(ctx)
    assert got.complete and got.turns == turns[:3]
    # Names are keyed by the anchor (the oldest key): one tag, one cluster slot.
    assert store.session_tag(ctx.session_id) == store_on(tier, on_clock(old_ring)).session_tag(
        ctx.session_id
    )
    assert store.erase(ctx.session_id) == 2
    assert [r for _, r in store.read(ctx).missing] == [SEGMENT_MISSING] * 2

    spill(store_on(tier, on_clock(old_ring), cache_bytes=0), ctx, 1)
    retired = Keyring([rotated.current])  # retiring the anchor re-anchors every name
    assert store_on(tier, on_clock(retired)).read(ctx).missing[0][1] == SEGMENT_MISSING


def test_expired_and_erased_segments_are_missing(codec, clock) -> None:
    tier = MemoryTier(clock=clock)
    store = SegmentStore(GuardedTier(tier, cache=SegmentCache(max_bytes=0)), codec)
    ctx = make_ctx(4, now=NOW)
    spill(store, ctx, 1, ttl=10)
    spill(store, ctx, 1, ttl=100)
    clock.advance(11)
    assert [r for _, r in store.read(ctx).missing] == [SEGMENT_MISSING]
    assert store.erase(ctx.session_id) == 1
    assert [r for _, r in store.read(ctx).missing] == [SEGMENT_MISSING] * 2


def test_tier_down_is_reported_and_write_raises(codec) -> None:
    store = SegmentStore(GuardedTier(NoTier()), codec)
    ctx = make_ctx(2, now=NOW)
    with pytest.raises(TierUnavailable):
        store.write(ctx, ctx.turns, 60, now=NOW)
    assert store.read(make_ctx(0)).complete  # nothing referenced: no tier call at all


def test_too_large_segment_is_refused(keyring) -> None:
    codec = on_clock(keyring, limits=Limits(max_decompressed_bytes=4096))
    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(0)
    ctx.add_turn("user", "x" * 5000)
    with pytest.raises(BudgetExceeded):
        store.write(ctx, ctx.turns, 60, now=NOW)


def test_a_segment_larger_than_the_token_cap_still_opens(keyring) -> None:
    codec = on_clock(keyring, limits=Limits(max_token_bytes=1024), level=1)
    store = store_on(MemoryTier(), codec, cache_bytes=0)
    ctx = make_ctx(0, now=NOW)
    ctx.add_turn("user", os.urandom(3000).hex(), ts=NOW)  # incompressible-ish, > 1 KiB
    turns = list(ctx.turns)
    spill(store, ctx, 1)
    assert ctx.overflow[0].size > 1024
    assert store.read(ctx).turns == turns


texts = st.text(max_size=80)
turn_strategy = st.builds(
    Turn,
    role=st.sampled_from(["system", "user", "assistant", "tool"]),
    content=texts,
    ts=st.integers(min_value=0, max_value=2**32 - 1).map(float),
    tool_calls=st.lists(st.builds(ToolCall, id=texts, name=texts, arguments=texts), max_size=2).map(
        tuple
    ),
    tool_call_id=st.none() | texts,
    blocks=st.lists(
        st.builds(OpaqueBlock, type=texts, data=st.binary(max_size=40), provider=texts), max_size=2
    ).map(tuple),
    name=st.none() | texts,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunks=st.lists(st.lists(turn_strategy, min_size=1, max_size=4), max_size=4))
def test_any_turns_round_trip(codec, chunks) -> None:
    store = store_on(MemoryTier(), codec, cache_bytes=0)
    ctx = make_ctx(0, now=NOW)
    for chunk in chunks:
        ctx.overflow.append(store.write(ctx, chunk, 60, now=NOW))
    got = store.read(ctx)
    assert got.complete
    assert got.turns == [t for chunk in chunks for t in chunk]


def test_reasons_for_a_tier_that_is_down_with_partial_cache(codec) -> None:
    tier = MemoryTier()
    guard = GuardedTier(tier)
    store = SegmentStore(guard, codec)
    ctx = make_ctx(6, now=NOW)
    spill(store, ctx, 2)
    spill(store, ctx, 2)
    guard.cache.discard([store.key_for(ctx.session_id, ctx.overflow[1].digest)])
    guard.tier = NoTier()  # the tier "goes away"; NoTier answers "missing" for everything
    got = store.read(ctx)
    assert got.from_cache == 1 and len(got.turns) == 2
    assert got.missing == [(ctx.overflow[1], SEGMENT_MISSING)]

    class Down(MemoryTier):
        def get_many(self, keys):
            raise TierUnavailable("down")

    guard.tier = Down()
    got = store.read(ctx)
    assert got.missing == [(ctx.overflow[1], TIER_UNAVAILABLE)]
    assert isinstance(got.error, TierUnavailable) and got.from_cache == 1


def test_segment_past_its_sealed_expiry_is_missing_even_if_the_tier_kept_it(codec) -> None:
    store = store_on(MemoryTier(), codec, cache_bytes=0)
    ctx = make_ctx(2, now=NOW)
    # written "long ago" with a short TTL, but the tier's own TTL has not run out yet
    ctx.overflow.append(store.write(ctx, ctx.turns, 60, now=NOW - 3600))
    assert store.read(ctx).missing == [(ctx.overflow[0], SEGMENT_MISSING)]


def test_a_cached_segment_opens_once_and_each_read_gets_its_own_turns(
    codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long conversation reads every segment on every request: the unpacked turns of
    a cached segment are kept with its cache entry, so later reads skip decrypting,
    decompressing and unpacking. Each read still gets turns of its own: changing one
    (a tool call's arguments map included) changes no later read."""
    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(6, now=NOW)
    ctx.turns[1] = Turn("assistant", "", NOW, tool_calls=(ToolCall("c1", "f", {"q": [1]}),))
    original = [dataclasses.replace(t) for t in ctx.turns]
    spill(store, ctx, 4)
    opened = []
    open_envelope = codec.open_envelope

    def counting_open(*args, **kwargs):
        opened.append(1)
        return open_envelope(*args, **kwargs)

    codec.open_envelope = counting_open  # type: ignore[method-assign]
    hashed = []
    real_digest = segments.segment_digest
    monkeypatch.setattr(segments, "segment_digest", lambda b: hashed.append(1) or real_digest(b))
    first = store.read(ctx)
    assert first.turns == original[:4] and len(opened) == 1 and len(hashed) == 1
    first.turns[1].tool_calls[0].arguments["q"].append(2)
    first.turns[0].content = "changed"
    second = store.read(ctx)
    assert second.turns == original[:4] and len(opened) == 1  # not opened again
    assert len(hashed) == 1  # the very bytes verified before: not hashed again
    # Equal bytes in another object (read from the tier again) are hashed, then reused.
    key = store.key_for(ctx.session_id, ctx.overflow[0].digest)
    entry = store.tier.cache._data[key]
    store.tier.cache._data[key] = (bytes(bytearray(entry[0])), *entry[1:])
    assert store.read(ctx).turns == original[:4] and len(hashed) == 2 and len(opened) == 1
    assert second.turns[1].tool_calls[0].arguments == {"q": [1]}
    # The kept turns go with the cache entry: erasing the session's cache (or any
    # other way the entry leaves) means the next read opens the stored bytes again.
    store.tier.cache.discard_tag(store.session_tag(ctx.session_id))
    assert store.tier.cache.size == 0
    assert store.read(ctx).turns == original[:4] and len(opened) == 2


def test_a_kept_segment_still_expires_and_still_belongs_to_its_session(keyring) -> None:
    now = [NOW]
    codec = Codec(keyring, clock=lambda: now[0])
    store = store_on(MemoryTier(clock=lambda: now[0] - NOW), codec)
    ctx = make_ctx(4, now=NOW)
    spill(store, ctx, 2, ttl=60)
    assert store.read(ctx).complete  # opened and kept
    assert store.read(ctx).complete  # from what was kept
    foreign = dataclasses.replace(ctx, session_id=os.urandom(16))
    key = store.key_for(ctx.session_id, ctx.overflow[0].digest)
    stored = store.tier.cache.get(key)
    assert stored is not None
    assert store.tier.cache.opened(key, ctx.overflow[0].digest) is not None  # kept
    # The bytes of one session presented under another's reference: foreign, kept or not.
    assert store._decode(foreign, ctx.overflow[0], stored, key) == ([], SEGMENT_FOREIGN)
    now[0] = NOW + 60 + codec.limits.clock_skew + 1  # the segment's own expiry has passed
    assert store._decode(ctx, ctx.overflow[0], stored, key) == ([], SEGMENT_MISSING)


@pytest.mark.parametrize("kind", ["plain", "emoji", "tool calls"])
def test_kept_turns_are_weighed_at_least_at_what_they_take(codec, kind: str) -> None:
    """The turns a cached segment keeps count against SATCHEL_SEGMENT_CACHE_BYTES:
    weighed below what they take, the cache held several times its bound (8 MiB
    reported, 72 MiB held, with tool-call turns)."""
    import tracemalloc

    from satchel.segments import _unpacked_weight

    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(0, now=NOW)
    for i in range(300):
        if kind == "plain":
            ctx.add_turn("user", f"short message {i} ✓", ts=NOW)
        elif kind == "emoji":
            # One character past U+FFFF stores the whole str at 4 bytes a character: a
            # cache weighing it by its UTF-8 payload held 3.3 times its bound.
            ctx.add_turn("user", f"a longer message about the plan, number {i} " * 8 + "👍", ts=NOW)
        else:
            ctx.turns.append(
                Turn("assistant", "", NOW, tool_calls=(ToolCall(f"c{i}", "f", {"a": [i]}),))
            )
    spill(store, ctx, 300)
    key = store.key_for(ctx.session_id, ctx.overflow[0].digest)
    stored = store.tier.cache.get(key)
    payload = codec.open_envelope(envelope.parse_raw(stored))
    tracemalloc.start()
    wires = serialize.unpack(payload, codec.limits)["t"]
    held, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _unpacked_weight(len(payload), wires) >= held


def test_a_segment_whose_version_is_a_float_is_corrupt(codec) -> None:
    """Segments are schema 2 exactly, held to the type as token payloads are (a float
    version is token_invalid_context there): 2.0 is not 2."""
    from satchel.context import SegmentRef

    store = store_on(MemoryTier(), codec)
    ctx = make_ctx(0, now=NOW)
    payload = serialize.pack({"v": 2.0, "i": ctx.session_id, "t": [[1, "hi", NOW]]})
    _token, stored = codec.seal_payload(payload, now=NOW, expires_at=NOW + 600)
    digest = segment_digest(stored)
    store.tier.put(store.key_for(ctx.session_id, digest), stored, 600)
    ctx.overflow.append(SegmentRef(digest=digest, turns=1, size=len(stored), seq=1, ts=NOW))
    got = store.read(ctx)
    assert got.turns == [] and [reason for _ref, reason in got.missing] == [SEGMENT_CORRUPT]
