"""The byte budget through the pipeline: overflow, merging references, rehydration,
and the write-failure path (inline to the hard cap, then reported data loss)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from satchel import Codec, Context, Keyring, Limits, Turn, schema
from satchel.errors import BudgetExceeded, ContextNotSerializable, TierUnavailable
from satchel.lifecycle import LifecyclePolicy
from satchel.pipeline import MAX_HELD_SEGMENT_REFS, MAX_SEGMENT_REFS, Pipeline
from satchel.segments import SegmentStore, merge_start
from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache

NOW = 1_795_000_000.0
SENTENCES = [
    "Could you explain how the event loop schedules callbacks?",
    "The short answer is that each callback runs to completion before the next starts.",
    "I tried adding an index on the orders table but the query is still slow.",
    "Check the plan with EXPLAIN ANALYZE and look for a sequential scan.",
    "For the trip I would spend two nights in Kyoto and one in Nara.",
    "Roast the vegetables at a high heat so they brown instead of steaming.",
]


def message(i: int) -> str:
    noise = hashlib.sha256(str(i).encode()).hexdigest()[:12]
    return f"{SENTENCES[i % len(SENTENCES)]} ({noise}) {SENTENCES[(i * 7) % len(SENTENCES)]}"


class FlakyTier(MemoryTier):
    """A real in-memory tier whose writes can be switched off, as a full or dead store."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_writes = False

    def put(self, key: str, value: bytes, ttl: float) -> None:
        if self.refuse_writes:
            raise TierUnavailable("writes refused for the test")
        super().put(key, value, ttl)

    def put_unless_marked(self, key: str, value: bytes, ttl: float, *unless: Any) -> bool:
        if self.refuse_writes:
            raise TierUnavailable("writes refused for the test")
        return super().put_unless_marked(key, value, ttl, *unless)


def make(tier: MemoryTier, budget: int = 1500, hard: int = 3000, grace: float = 600.0) -> Pipeline:
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    # reset_timeout=0: the breaker lets a trial call through at once once it has opened,
    # so recovery is visible on the next request without waiting.
    guarded = GuardedTier(tier, BreakerPolicy(reset_timeout=0.0), cache=SegmentCache(0))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=budget, hard_max_token_bytes=hard)
    store = SegmentStore(guarded, codec, grace=grace)
    return Pipeline(codec, policy, segments=store, clock=lambda: NOW)


def converse(pipeline: Pipeline, exchanges: Sequence[int], token: str | None = None) -> str | None:
    for i in exchanges:
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", message(i), ts=NOW)
        ctx.add_turn("assistant", message(i + 1000), ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
    return token


def test_long_conversation_stays_in_budget_and_comes_back_whole() -> None:
    pipeline = make(MemoryTier(), budget=1500)
    token = None
    for i in range(150):
        token = converse(pipeline, [i], token)
        assert token is not None and len(token) <= 1500
        ctx = pipeline.codec.open(token, now=NOW)
        assert len(ctx.overflow) <= MAX_SEGMENT_REFS
    ctx = pipeline.load(token, now=NOW)
    every = ctx.all_turns()
    assert not ctx.degraded
    assert len(every) == 300
    assert [t.content for t in every[::2]] == [message(i) for i in range(150)]
    # The running summary covers what left the token.
    assert ctx.summary.startswith(f"({ctx.overflowed_turns} earlier turns summarized)")


class CountingTier(MemoryTier):
    """Counts the bytes written, to measure how often overflowed turns are rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_written = 0

    def put(self, key: str, value: bytes, ttl: float) -> None:
        self.bytes_written += len(value)
        super().put(key, value, ttl)

    def put_unless_marked(self, key: str, value: bytes, ttl: float, *unless: Any) -> bool:
        self.bytes_written += len(value)
        return super().put_unless_marked(key, value, ttl, *unless)


def test_merges_rewrite_old_turns_a_few_times_not_on_every_merge() -> None:
    """Size-tiered merging: 400 exchanges spill about 70 times; merging every
    reference whenever they pile up would write the history about 9 times over."""
    tier = CountingTier()
    pipeline = make(tier, budget=1500, grace=0)
    token = converse(pipeline, range(400))
    ctx = pipeline.load(token, now=NOW)
    assert len(ctx.all_turns()) == 800 and not ctx.degraded
    assert 1 <= len(ctx.overflow) <= MAX_SEGMENT_REFS
    kept = sum(ref.size for ref in ctx.overflow)
    assert tier.bytes_written < 6 * kept, (tier.bytes_written, kept)
    # With no grace period, replaced segments were deleted at once: the tier holds
    # exactly what the token references.
    assert len(tier) == len(ctx.overflow)


def test_tokens_from_before_a_merge_open_whole_within_the_grace_period() -> None:
    """A retried request or a second tab carries a token from before a merge; in
    ``client`` consistency it is valid, so its replaced segments must still be there."""
    tier_clock = [0.0]
    tier = MemoryTier(clock=lambda: tier_clock[0])
    pipeline = make(tier, budget=1500, grace=60)
    tokens: list[str] = []
    token = None
    for i in range(60):
        token = converse(pipeline, [i], token)
        assert token is not None
        tokens.append(token)
    final = {ref.digest for ref in pipeline.codec.open(tokens[-1], now=NOW).overflow}
    merged_away = [
        t for t in tokens if {r.digest for r in pipeline.codec.open(t, now=NOW).overflow} - final
    ]
    assert len(merged_away) > 5  # the conversation did merge references
    for n, old in enumerate(tokens):  # every one of them, replayed as a retry would
        ctx = pipeline.load(old, now=NOW)
        assert not ctx.degraded, n
        assert len(ctx.all_turns()) == 2 * (n + 1)
    # After the grace period the replaced copies are gone (storage stays bounded); a
    # token that old finds the summary in their place, and says so.
    tier_clock[0] += 61
    ctx = pipeline.load(merged_away[0], now=NOW)
    assert "segment_missing" in ctx.degraded
    assert len(pipeline.load(tokens[-1], now=NOW).all_turns()) == 120


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=12),
    spill=st.integers(min_value=1, max_value=500),
    max_refs=st.integers(min_value=2, max_value=8),
)
@settings(max_examples=300, deadline=None)
def test_merge_start_keeps_references_within_the_cap(
    sizes: list[int], spill: int, max_refs: int
) -> None:
    start = merge_start(sizes, spill, max_refs)
    assert 0 <= start <= len(sizes)
    assert start + 1 <= max_refs  # the kept references and the new one fit the cap
    if len(sizes) >= max_refs:
        assert start < len(sizes)  # a full set of references always merges


def test_merge_start_merges_small_recent_segments_and_leaves_large_old_ones() -> None:
    # Steeply shrinking segments: the small recent ones merge, the big old ones stay.
    assert merge_start([5000, 600, 80, 10, 4, 2], 2, 6) == 2
    # Equal small segments early in a conversation merge into one.
    assert merge_start([2, 2, 2, 2, 2, 2], 2, 6) == 0


@pytest.mark.parametrize("setup", ["no tier", "tier", "tier refusing writes"])
def test_the_token_holds_exactly_the_context_that_was_measured(setup: str) -> None:
    """The seal reuses the bytes the byte budget measured (Codec.prepare): whatever path
    the budget took (drops, spills, refused writes, data loss), the token opens to
    exactly the context as it stood when sealed."""
    tier = FlakyTier()
    pipeline = make(tier, budget=900, hard=1400)
    if setup == "no tier":
        pipeline = Pipeline(pipeline.codec, pipeline.policy, clock=lambda: NOW)
    token = None
    for i in range(60):
        tier.refuse_writes = setup == "tier refusing writes" and i >= 4
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", message(i) * (1 + i % 3), ts=NOW)
        ctx.add_turn("assistant", message(i + 1000), ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
        opened = pipeline.codec.open(token, now=NOW)
        assert schema.to_wire(opened) == schema.to_wire(ctx), i


def test_a_question_stays_with_its_answer_when_turns_move() -> None:
    pipeline = make(MemoryTier(), budget=900)
    token = converse(pipeline, range(20))
    assert token is not None
    ctx = pipeline.codec.open(token, now=NOW)
    assert ctx.turns[0].role == "user"
    assert len(ctx.turns) % 2 == 0


def test_refused_writes_hold_turns_inline_then_report_data_loss() -> None:
    tier = FlakyTier()
    pipeline = make(tier, budget=1200, hard=1800)
    token = converse(pipeline, range(6))
    tier.refuse_writes = True
    inline_over_budget = False
    lost_seen = 0
    for i in range(6, 60):
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", message(i), ts=NOW)
        ctx.add_turn("assistant", message(i + 1000), ts=NOW)
        result = pipeline.save(ctx, now=NOW)
        token = result.token
        assert result.size <= 1800
        if result.size > 1200:
            assert "tier_write_failed" in ctx.degraded  # over budget only when flagged
            inline_over_budget = True
        if "data_loss" in ctx.degraded:
            lost_seen = ctx.lifecycle.lost
    assert inline_over_budget, "turns should stay inline above the soft budget"
    assert lost_seen > 0, "past the hard cap the loss must be reported with a count"
    # Every turn is present, overflowed, or counted as lost: nothing silently vanishes.
    ctx = pipeline.load(token, now=NOW)
    assert len(ctx.all_turns()) + ctx.lifecycle.lost == 120
    # Back up: pending inline turns overflow again and the token returns under budget.
    tier.refuse_writes = False
    token = converse(pipeline, [60], token)
    assert token is not None and len(token) <= 1200


@pytest.mark.parametrize("budget", [700, 2000])
def test_without_a_tier_the_budget_trims_and_summarizes(budget: int) -> None:
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    pipeline = Pipeline(codec, LifecyclePolicy(max_turns=None, max_token_bytes=budget))
    token = converse(pipeline, range(40))
    assert token is not None and len(token) <= budget
    ctx = codec.open(token, now=NOW)
    assert ctx.lifecycle.dropped.get("byte_budget", 0) + len(ctx.turns) == 80
    assert ctx.lifecycle.lost == 0  # trimming by policy is not a loss


def test_a_failing_summarizer_falls_back_instead_of_failing_the_request() -> None:
    def broken(dropped: object, previous: str) -> str:
        raise TimeoutError("the LLM did not answer")

    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    policy = LifecyclePolicy(max_turns=4, summarizer=broken)
    token = converse(Pipeline(codec, policy), range(5))
    assert token is not None
    ctx = codec.open(token, now=NOW)
    assert len(ctx.turns) == 4
    assert ctx.summary.startswith("(6 earlier turns summarized)")


def test_segments_a_tier_lost_in_an_outage_are_written_back_by_the_process_caching_them() -> None:
    """Redis restarts empty after an outage: the process that still caches the
    conversation's segments writes them back on its next request, so a process that
    never saw them (another worker, a new deploy) reads the whole conversation."""
    tier = FlakyTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)

    def pipeline(cache_bytes: int) -> Pipeline:
        guarded = GuardedTier(
            tier, BreakerPolicy(fail_max=1, reset_timeout=0.0), cache=SegmentCache(cache_bytes)
        )
        policy = LifecyclePolicy(max_turns=None, max_token_bytes=1200, hard_max_token_bytes=3000)
        return Pipeline(codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW)

    warm = pipeline(1 << 20)
    token = converse(warm, range(30))
    assert len(warm.codec.open(token, now=NOW).overflow) >= 2

    # The outage: writes fail. Talk until a spill is tried and refused (the breaker
    # opens); an exchange that spills nothing would not notice the outage at all.
    tier.refuse_writes = True
    sent = 30
    while True:
        ctx = warm.load(token, now=NOW)
        ctx.add_turn("user", message(sent), ts=NOW)
        ctx.add_turn("assistant", message(sent + 1000), ts=NOW)
        failed = token = warm.save(ctx, now=NOW).token
        sent += 1
        if "tier_write_failed" in ctx.degraded:
            break
        assert sent < 40, "no spill was tried during the outage"
    tier.refuse_writes = False
    tier.clear()  # and Redis comes back empty
    cold = pipeline(0)
    assert "segment_missing" in cold.load(failed, now=NOW).degraded

    ctx = warm.load(failed, now=NOW)  # served from the cache, and written back
    assert not ctx.degraded
    ctx = cold.load(failed, now=NOW)
    assert not ctx.degraded
    assert [t.content for t in ctx.all_turns()[::2]] == [message(i) for i in range(sent)]


# -- the hard cap: no token is longer, whatever the newest exchange holds ---------------


def pasted_blob(n: int, seed: int = 0) -> str:
    """``n`` characters that do not compress (a pasted key, image or minified file)."""
    out = ""
    while len(out) < n:
        out += base64.b64encode(hashlib.sha512(f"{seed}:{len(out)}".encode()).digest()).decode()
    return out[:n]


def no_tier_pipeline(budget: int = 1500, hard: int = 3000) -> Pipeline:
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=budget, hard_max_token_bytes=hard)
    return Pipeline(codec, policy, clock=lambda: NOW)


class Pasted(NamedTuple):
    token: str
    context: Context


def two_exchanges_then_a_paste(pipeline: Pipeline, tier: FlakyTier | None = None) -> Pasted:
    """Two ordinary exchanges, then one whose 6,000 characters alone pass a 3,000-byte
    hard cap. With ``tier``, the tier refuses writes from the paste on."""
    token = converse(pipeline, range(2))
    if tier is not None:
        tier.refuse_writes = True
    ctx = pipeline.load(token, now=NOW)
    ctx.add_turn("user", pasted_blob(6000), ts=NOW)
    ctx.add_turn("assistant", "That looks like a hex dump.", ts=NOW)
    return Pasted(pipeline.save(ctx, now=NOW).token, ctx)


def test_without_a_tier_an_exchange_over_the_hard_cap_is_summarized_not_issued() -> None:
    """One exchange alone longer than the hard cap used to stay whole in the token (the
    newest group always stays), making a token the next proxy refuses. Now it goes,
    as the byte budget would take any other: summarized and recorded."""
    pipeline = no_tier_pipeline(budget=1500, hard=3000)
    token = two_exchanges_then_a_paste(pipeline).token
    assert len(token) <= 3000
    opened = pipeline.load(token, now=NOW)
    assert opened.turns == []
    assert opened.lifecycle.dropped["byte_budget"] == 6  # the two older exchanges and it
    assert opened.lifecycle.lost == 0 and not opened.degraded  # a policy, not a loss
    assert pasted_blob(6000)[:40] in opened.summary  # the summary says what left
    # The conversation goes on from there.
    token = converse(pipeline, [7], token)
    assert [t.content for t in pipeline.load(token, now=NOW).turns] == [
        message(7),
        message(1007),
    ]


def test_with_a_tier_an_exchange_over_the_hard_cap_moves_to_the_tier_whole() -> None:
    tier = FlakyTier()
    pipeline = make(tier, budget=1500, hard=3000)
    token = two_exchanges_then_a_paste(pipeline).token
    assert len(token) <= 3000
    opened = pipeline.load(token, now=NOW)
    assert opened.turns == [] and not opened.degraded
    every = opened.all_turns()
    assert [t.content for t in every] == [
        message(0),
        message(1000),
        message(1),
        message(1001),
        pasted_blob(6000),
        "That looks like a hex dump.",
    ]
    assert opened.lifecycle.lost == 0


def test_with_the_tier_refusing_writes_an_exchange_over_the_hard_cap_is_reported_lost() -> None:
    tier = FlakyTier()
    pipeline = make(tier, budget=1500, hard=3000)
    result = two_exchanges_then_a_paste(pipeline, tier)
    ctx = result.context
    assert len(result.token) <= 3000
    assert "tier_write_failed" in ctx.degraded and "data_loss" in ctx.degraded
    opened = pipeline.load(result.token, now=NOW)
    assert opened.turns == []
    assert opened.lifecycle.lost == 6  # every turn that left is counted: nothing silent


def test_state_that_no_trim_can_fit_under_the_hard_cap_is_refused() -> None:
    pipeline = no_tier_pipeline(budget=1500, hard=3000)
    ctx = pipeline.new_context(now=NOW)
    ctx.metadata["notes"] = pasted_blob(5000)
    ctx.add_turn("user", "hello", ts=NOW)
    with pytest.raises(BudgetExceeded) as info:
        pipeline.save(ctx, now=NOW)
    assert info.value.facts["limit"] == 3000 and info.value.code == "budget_exceeded"


@given(
    exchanges=st.lists(
        st.tuples(st.integers(0, 9000), st.integers(0, 3000), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    setup=st.sampled_from(["no tier", "tier", "tier refusing writes"]),
)
@settings(max_examples=60, deadline=None)
def test_no_token_is_ever_longer_than_the_hard_cap(
    exchanges: list[tuple[int, int, bool]], setup: str
) -> None:
    tier = FlakyTier()
    tier.refuse_writes = setup == "tier refusing writes"
    pipeline = no_tier_pipeline(1200, 2500) if setup == "no tier" else make(tier, 1200, 2500)
    token = None
    for i, (asked, answered, compressible) in enumerate(exchanges):
        ctx = pipeline.load(token, now=NOW)
        text = (message(i) * 200)[:asked] if compressible else pasted_blob(asked, i)
        ctx.add_turn("user", text, ts=NOW)
        ctx.add_turn("assistant", pasted_blob(answered, -i), ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
        assert len(token) <= 2500
        opened = pipeline.load(token, now=NOW)
        if setup == "tier":
            assert opened.lifecycle.lost == 0 and not opened.degraded
        elif setup == "no tier":
            assert opened.lifecycle.lost == 0


def test_the_byte_budget_may_not_exceed_the_hard_cap() -> None:
    with pytest.raises(ValueError, match="hard cap"):
        LifecyclePolicy(max_token_bytes=9000, hard_max_token_bytes=8000)
    assert LifecyclePolicy().hard_max_token_bytes == 8000
    assert LifecyclePolicy(max_token_bytes=9000, hard_max_token_bytes=None).max_token_bytes == 9000


@pytest.mark.parametrize("with_tier", [True, False, "server mode"])
def test_a_turn_that_could_not_be_read_back_is_refused_when_the_window_drops_it(
    with_tier: bool | str,
) -> None:
    """The window drops and summarizes before anything measures the token. A turn that
    could not be read back is still the typed ContextNotSerializable (a JSON 500, naming
    the place), not an AttributeError from inside the summarizer (it was, without a
    tier)."""
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    policy = LifecyclePolicy(max_turns=2, max_token_bytes=None, hard_max_token_bytes=None)
    store = SegmentStore(GuardedTier(MemoryTier()), codec) if with_tier is True else None
    pipeline = Pipeline(codec, policy, segments=store, clock=lambda: NOW)
    if with_tier == "server mode":  # shares the policies' step, not save()
        from satchel.server_mode import ServerSidePipeline

        pipeline = ServerSidePipeline(
            codec, policy, store=GuardedTier(MemoryTier()), clock=lambda: NOW
        )
    ctx = pipeline.new_context(now=NOW)
    ctx.add_turn("user", "look this up", ts=NOW)
    ctx.turns.append(Turn("assistant", "", NOW, tool_calls=({"id": "c1"},)))  # type: ignore[arg-type]
    ctx.add_turn("user", "and then?", ts=NOW)
    ctx.add_turn("assistant", "done", ts=NOW)
    with pytest.raises(ContextNotSerializable, match=r"tool_calls\[0\] is dict"):
        pipeline.save(ctx, now=NOW)


def test_the_segment_store_refuses_a_turn_that_could_not_be_read_back() -> None:
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    store = SegmentStore(GuardedTier(MemoryTier()), codec)
    ctx = Context.new(now=NOW)
    bad = Turn("assistant", "", NOW, blocks=("signature",))  # type: ignore[arg-type]
    with pytest.raises(ContextNotSerializable, match=r"blocks\[0\] is str, not OpaqueBlock"):
        store.write(ctx, [Turn("user", "hi", NOW), bad], 60, now=NOW)
    assert store.write(ctx, [Turn("user", "hi", NOW)], 60, now=NOW).turns == 1


def test_no_token_is_longer_than_its_codec_opens_even_without_a_hard_cap() -> None:
    """A token past Limits.max_token_bytes (SATCHEL_TOKEN_LIMIT) would be refused as
    token_too_large on the next request: the cap holds with the hard cap off too."""
    codec = Codec(Keyring.generate("k1"), limits=Limits(max_token_bytes=2000), clock=lambda: NOW)
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=None, hard_max_token_bytes=None)
    pipeline = Pipeline(codec, policy, clock=lambda: NOW)
    token = None
    for i in range(4):
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", pasted_blob(900, i), ts=NOW)
        ctx.add_turn("assistant", "noted", ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
        assert len(token) <= 2000
    assert pipeline.load(token, now=NOW).lifecycle.dropped["byte_budget"] > 0


def test_a_summary_over_the_hard_cap_loses_its_oldest_part_not_the_conversation() -> None:
    """An app's own summarizer (an LLM asked for "a summary", no length given) can
    outgrow any budget. Refusing to seal would fail every request from then on, since
    the client keeps the token it sent: the summary keeps its newest part instead."""

    def verbose(dropped: Sequence[Turn], previous: str) -> str:
        return previous + "".join(pasted_blob(1500, len(previous) + i) for i in range(len(dropped)))

    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    policy = LifecyclePolicy(
        max_turns=None, max_token_bytes=1500, hard_max_token_bytes=2500, summarizer=verbose
    )
    pipeline = Pipeline(codec, policy, clock=lambda: NOW)
    token, cuts = None, 0
    for i in range(12):
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", pasted_blob(300, i), ts=NOW)
        ctx.add_turn("assistant", message(i + 1000), ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
        assert len(token) <= 2500
        cuts += any(a.policy == "summary_cap" for a in ctx.lifecycle.recent[-1:])
    opened = pipeline.load(token, now=NOW)
    assert cuts > 0 and opened.summary.startswith("[… earlier summary cut by Satchel]")
    # The newest exchange stayed: the summary gave way, not the conversation.
    assert [t.content for t in opened.turns][-2:] == [pasted_blob(300, 11), message(1011)]


class WriteOnlyTier(MemoryTier):
    """Takes writes but cannot answer reads of segments (a Redis user without read
    rights on them, reads that time out): references can never be merged."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_fail = True

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.reads_fail and any(":seg:" in key for key in keys):
            raise TierUnavailable("reads refused for the test")
        return super().get_many(keys)


def test_references_stay_bounded_when_the_tier_cannot_be_read() -> None:
    tier = WriteOnlyTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    guarded = GuardedTier(tier, BreakerPolicy(fail_max=10_000), cache=SegmentCache(0))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=1500, hard_max_token_bytes=3000)
    pipeline = Pipeline(codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW)
    token = None
    for i in range(300):
        token = converse(pipeline, [i], token)
        assert token is not None and len(token) <= 3000  # never stuck on 413
    ctx = codec.open(token, now=NOW)
    assert len(ctx.overflow) <= MAX_HELD_SEGMENT_REFS
    # Every turn is inline, in a referenced segment, or reported lost.
    held = len(ctx.turns) + sum(ref.turns for ref in ctx.overflow)
    assert held + ctx.lifecycle.lost == 600 and ctx.lifecycle.lost > 0
    tier.reads_fail = False  # the tier answers again: the referenced turns come back
    back = pipeline.load(token, now=NOW)
    assert not back.degraded
    assert len(back.all_turns()) == held


def test_references_stay_bounded_when_segments_are_too_large_to_merge() -> None:
    """Long turns fill a segment to its size cap in a few dozen exchanges; merging
    them all is then impossible, and each spill used to append a reference until the
    token passed the hard cap and every request answered 413."""
    codec = Codec(
        Keyring.generate("k1"),
        clock=lambda: NOW,
        limits=Limits(max_decompressed_bytes=48 * 1024),
    )
    tier = FlakyTier()
    guarded = GuardedTier(tier, BreakerPolicy(fail_max=10_000), cache=SegmentCache(0))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=3800, hard_max_token_bytes=8000)
    pipeline = Pipeline(codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW)

    def long_text(i: int) -> str:  # about 2.5 KB that does not compress away
        return " ".join(hashlib.sha256(f"{i}:{n}".encode()).hexdigest() for n in range(38))

    # Count the merges packed only to be refused for the size cap: each packs up to a
    # segment's worth of turns (a megabyte at the default cap), on every spill.
    store = pipeline.segments
    assert store is not None
    write, over_cap = store.write, []

    def counting_write(*args: Any, **kwargs: Any) -> Any:
        try:
            return write(*args, **kwargs)
        except BudgetExceeded:
            over_cap.append(1)
            raise

    store.write = counting_write  # type: ignore[method-assign]
    token = None
    exchanges = 400
    for i in range(exchanges):
        ctx = pipeline.load(token, now=NOW)
        assert not ctx.degraded
        ctx.add_turn("user", long_text(i), ts=NOW)
        ctx.add_turn("assistant", long_text(-i), ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
        assert token is not None and len(token) <= 8000
    # Candidates whose text alone is over the cap are skipped without packing them.
    assert len(over_cap) <= exchanges // 20, len(over_cap)
    final = pipeline.load(token, now=NOW)
    assert len(final.overflow) <= MAX_HELD_SEGMENT_REFS
    capped = final.lifecycle.dropped.get("overflow_cap", 0)
    assert capped > 0 and final.lifecycle.lost == 0  # a policy limit, not a loss
    every = final.all_turns()
    assert len(every) + capped == 2 * exchanges
    assert [t.content for t in every[-4:]] == [
        long_text(exchanges - 2), long_text(-(exchanges - 2)),
        long_text(exchanges - 1), long_text(-(exchanges - 1)),
    ]  # fmt: skip
    # A spill the tier refuses changes no reference: the oldest is let go only once
    # the new segment is written.
    tier.refuse_writes = True
    ctx = pipeline.load(token, now=NOW)
    refs = list(ctx.overflow)
    ctx.add_turn("user", long_text(exchanges), ts=NOW)
    ctx.add_turn("assistant", long_text(-exchanges), ts=NOW)
    refused = pipeline.codec.open(pipeline.save(ctx, now=NOW).token, now=NOW)
    assert refused.overflow == refs
    assert refused.lifecycle.dropped.get("overflow_cap", 0) == capped


# -- the turn limit: no token carries more turns than a codec opens --------------------------


def turn_limited(tier: MemoryTier | None, limit: int = 60) -> Pipeline:
    """No window and no byte budget: only the codec's turn limit can move turns."""
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW, limits=Limits(max_array_len=limit))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=None)
    if tier is None:
        return Pipeline(codec, policy, clock=lambda: NOW)
    guarded = GuardedTier(tier, BreakerPolicy(reset_timeout=0.0), cache=SegmentCache(0))
    store = SegmentStore(guarded, codec, grace=600.0)
    return Pipeline(codec, policy, segments=store, clock=lambda: NOW)


def past_the_limit(turns: int) -> Context:
    """A context at the limit that a view then adds an exchange to (as a token minted
    with the app's own key can hold the limit already)."""
    ctx = Context.new(now=NOW)
    for i in range(turns):
        ctx.add_turn("user" if i % 2 == 0 else "assistant", message(i), ts=NOW)
    return ctx


def test_a_context_past_the_turn_limit_moves_its_oldest_turns_to_the_tier() -> None:
    pipeline = turn_limited(MemoryTier())
    ctx = past_the_limit(62)
    token = pipeline.save(ctx, now=NOW).token  # was ContextNotSerializable: a 500
    assert len(ctx.turns) <= 60 and ctx.overflow and not ctx.degraded
    whole = pipeline.load(token, now=NOW)
    assert [t.content for t in whole.all_turns()] == [message(i) for i in range(62)]


def test_without_a_tier_a_context_past_the_turn_limit_is_summarized_and_trimmed() -> None:
    pipeline = turn_limited(None)
    ctx = past_the_limit(62)
    token = pipeline.save(ctx, now=NOW).token
    opened = pipeline.load(token, now=NOW)
    assert len(opened.turns) == 60 and opened.turns[0].content == message(2)
    assert opened.lifecycle.dropped == {"byte_budget": 2}
    assert opened.summary.startswith("(2 earlier turns summarized)")
    assert opened.lifecycle.lost == 0 and not opened.degraded


def test_a_context_past_the_turn_limit_with_the_tier_refusing_writes_reports_the_loss() -> None:
    tier = FlakyTier()
    tier.refuse_writes = True
    pipeline = turn_limited(tier)
    ctx = past_the_limit(62)
    token = pipeline.save(ctx, now=NOW).token
    assert "data_loss" in ctx.degraded and "tier_write_failed" in ctx.degraded
    opened = pipeline.load(token, now=NOW)
    assert len(opened.turns) == 60 and opened.lifecycle.lost == 2


@pytest.mark.parametrize("limit", ["window", "token_budget"])
def test_with_a_tier_only_the_byte_budget_moves_turns_to_it(limit: str) -> None:
    """Issue 3: overflow happens only when the byte budget demands it; every other
    session stays client-held. The window and the LLM-token budget moved turns to the
    tier, so a long chat of short messages, well under its byte budget, wrote to Redis
    and was flagged degraded whenever Redis was down. They drop and summarize, as
    without a tier; while the tier refuses writes that is still a policy trim, not a
    loss, and nothing is flagged."""
    from dataclasses import replace

    from satchel.lifecycle.tokens import estimate_tokens, turn_tokens

    tier = FlakyTier()
    base = make(tier, budget=60_000, hard=60_000)
    if limit == "window":
        policy = replace(base.policy, max_turns=6)
    else:
        policy = replace(base.policy, max_llm_tokens=300, token_counter=estimate_tokens)
    pipeline = Pipeline(base.codec, policy, segments=base.segments, clock=lambda: NOW)
    token = converse(pipeline, range(12))
    ctx = pipeline.load(token, now=NOW)
    assert len(tier) == 0  # nothing written: the token fits its byte budget
    assert ctx.overflow == [] and ctx.rehydrated == []
    if limit == "window":
        assert len(ctx.turns) == 6
    else:
        assert sum(turn_tokens(t, estimate_tokens) for t in ctx.turns) <= 300
    assert len(ctx.turns) + ctx.lifecycle.dropped[limit] == 24
    assert ctx.lifecycle.summarized == ctx.lifecycle.dropped[limit]
    dropped_before = ctx.lifecycle.dropped[limit]
    tier.refuse_writes = True  # the tier down changes nothing for such a session
    for i in range(12, 16):
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", message(i), ts=NOW)
        ctx.add_turn("assistant", message(i + 1000), ts=NOW)
        result = pipeline.save(ctx, now=NOW)
        assert not ctx.degraded
        token = result.token
    ctx = pipeline.load(token, now=NOW)
    assert ctx.lifecycle.lost == 0 and "data_loss" not in ctx.lifecycle.dropped
    assert ctx.lifecycle.dropped[limit] == dropped_before + 8


def _numbered(i: int, who: str, words: int) -> str:
    """A turn that names its exchange (``m007u ...``) and does not compress away."""
    seed = f"{i}{who}".encode()
    noise = " ".join(hashlib.sha256(seed + bytes([k])).hexdigest()[:10] for k in range(words * 6))
    return f"m{i:03d}{who} {noise} and some words about the question at hand"


def _exchanges(ctx: Context) -> list[int]:
    return [int(t.content[1:4]) for t in ctx.all_turns()]


def _windowed(tier: MemoryTier) -> Pipeline:
    """The defaults' budget and window (3800 bytes, 40 turns), a hard cap of 8000."""
    from dataclasses import replace

    base = make(tier, budget=3800, hard=8000)
    policy = replace(base.policy, max_turns=40)
    return Pipeline(base.codec, policy, segments=base.segments, clock=lambda: NOW)


def _exchange(
    pipeline: Pipeline, token: str | None, i: int, words: int
) -> tuple[Context, str | None]:
    """Exchange ``i`` (``words`` sets its length) saved: the context and its token."""
    ctx = pipeline.load(token, now=NOW)
    ctx.add_turn("user", _numbered(i, "u", words), ts=NOW)
    ctx.add_turn("assistant", _numbered(i, "a", words), ts=NOW)
    return ctx, pipeline.save(ctx, now=NOW).token


def test_once_a_session_keeps_turns_in_the_tier_the_window_moves_turns_there_too() -> None:
    """Dropping what the window removes from a session whose older turns are in the
    tier left a hole: the tier's turns, then exchanges 6-27 gone, then the token's
    (the chat page drew it as one history). Once the byte budget has moved turns to
    the tier, the window's follow them."""
    pipeline, token = _windowed(MemoryTier()), None
    for i in range(80):  # 20 long exchanges (they spill), then 60 short ones
        _ctx, token = _exchange(pipeline, token, i, 6 if i < 20 else 1)
    ctx = pipeline.load(token, now=NOW)
    assert sorted(set(_exchanges(ctx))) == list(range(80))  # whole, no hole
    assert len(ctx.turns) <= 40 and "window" not in ctx.lifecycle.dropped


def test_the_windows_turns_spill_in_batches_not_one_segment_per_exchange() -> None:
    """Moving just the excess over the window wrote a segment on every exchange past
    it (279 writes for 294 short exchanges); like the byte budget, the window spills
    down to 70 % of itself, so a write comes every few exchanges."""

    class Counting(MemoryTier):
        writes = 0

        def put_unless_marked(self, key: str, value: bytes, ttl: float, *unless: Any) -> bool:
            self.writes += 1
            return super().put_unless_marked(key, value, ttl, *unless)

    tier = Counting()
    pipeline, token = _windowed(tier), None
    for i in range(6):  # 6 long exchanges: they spill
        _ctx, token = _exchange(pipeline, token, i, 12)
    assert pipeline.load(token, now=NOW).overflow  # the session keeps turns there
    writes_before = tier.writes
    for i in range(6, 106):  # then 100 short ones
        _ctx, token = _exchange(pipeline, token, i, 1)
    ctx = pipeline.load(token, now=NOW)
    assert sorted(set(_exchanges(ctx))) == list(range(106))
    assert 0 < tier.writes - writes_before <= 100 // 5


def test_while_the_tier_refuses_writes_the_windows_turns_wait_in_the_token() -> None:
    """A session with turns in the tier, the tier refusing writes for 12 exchanges: the
    window dropped the turns held back in the token as a plain policy trim, so they
    were missing once the tier was back, with no data_loss said. They wait (up to the
    hard cap) and spill when it returns."""
    tier = FlakyTier()
    pipeline, token, flags = _windowed(tier), None, set()
    for i in range(80):
        tier.refuse_writes = 40 <= i < 52
        ctx, token = _exchange(pipeline, token, i, 3)
        flags |= set(ctx.degraded)
    ctx = pipeline.load(token, now=NOW)
    assert "tier_write_failed" in flags
    lost = ctx.lifecycle.lost
    # Every exchange is present, or counted as lost (past the hard cap) and said so.
    assert len(set(range(80)) - set(_exchanges(ctx))) * 2 == lost
    assert (lost > 0) == ("data_loss" in flags)
    assert "window" not in ctx.lifecycle.dropped


def test_degraded_events_name_the_failure_underneath_then_the_open_breaker() -> None:
    """docs/operations.md: the audit logs one degraded record per reason *and cause*
    (detail: the error underneath, then breaker_open), so the breaker opening during an
    outage shows. The events carried no detail: one record per reason, whatever the
    cause."""
    from satchel.observe import Observer

    class Recorder(Observer):
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, Any]]] = []

        def event(self, name: str, /, **fields: Any) -> None:
            self.events.append((name, fields))

    class DownTier(MemoryTier):
        down: set[str] = set()  # "put", "get_many"

        def put(self, key: str, value: bytes, ttl: float) -> None:
            if "put" in self.down:
                raise TierUnavailable("cannot reach it", error="ConnectionError")
            super().put(key, value, ttl)

        def put_unless_marked(self, key: str, value: bytes, ttl: float, *unless: Any) -> bool:
            if "put" in self.down:
                raise TierUnavailable("cannot reach it", error="ConnectionError")
            return super().put_unless_marked(key, value, ttl, *unless)

        def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
            if "get_many" in self.down:
                raise TierUnavailable("cannot reach it", error="ConnectionError")
            return super().get_many(keys)

    tier = DownTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    recorder = Recorder()
    guarded = GuardedTier(
        tier, BreakerPolicy(fail_max=2, reset_timeout=3600.0), cache=SegmentCache(0)
    )
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=1500, hard_max_token_bytes=3000)
    pipeline = Pipeline(
        codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW, observer=recorder
    )
    token = converse(pipeline, range(40))
    assert pipeline.codec.open(token, now=NOW).overflow

    def details() -> set[tuple[str, Any]]:
        return {(f["reason"], f.get("detail")) for name, f in recorder.events if name == "degraded"}

    tier.down = {"put"}  # writes fail, reads work: every spill is refused
    for i in range(12):
        token = converse(pipeline, [100 + i], token)
    assert {("tier_write_failed", "ConnectionError"), ("tier_write_failed", "writes_open")} <= (
        details()
    )
    tier.down = {"put", "get_many"}
    for i in range(4):
        converse(pipeline, [200 + i], token)
    assert {("tier_unavailable", "ConnectionError"), ("tier_unavailable", "breaker_open")} <= (
        details()
    )


def test_identical_exchanges_spilled_in_one_second_come_back_twice_in_signed_mode() -> None:
    """Signed tokens have no nonce: the same exchange spilled twice in the same second
    makes the same segment bytes, so two references share a digest. Both are read (the
    exchange happened twice); refusing a repeated digest made the save a 500."""
    codec = Codec(Keyring.generate("k1"), "signed", clock=lambda: NOW)
    tier = GuardedTier(MemoryTier(), BreakerPolicy(), cache=SegmentCache(0))
    # A budget that one exchange of the text below overfills: each save spills the last.
    pipeline = Pipeline(
        codec,
        LifecyclePolicy(max_turns=None, max_token_bytes=500, hard_max_token_bytes=4000),
        segments=SegmentStore(tier, codec),
        clock=lambda: NOW,
    )
    text = pasted_blob(250, 0)
    token = None
    for _ in range(4):
        ctx = pipeline.load(token, now=NOW)
        ctx.add_turn("user", text, ts=NOW)
        ctx.add_turn("assistant", text, ts=NOW)
        token = pipeline.save(ctx, now=NOW).token
    ctx = pipeline.load(token, now=NOW)
    digests = [ref.digest for ref in ctx.overflow]
    assert len(set(digests)) < len(digests)  # the case: one digest named twice
    assert [t.content for t in ctx.all_turns()] == [text] * 8
    assert not ctx.degraded


def agent_exchange(ctx: Context, calls: int, seed: int) -> None:
    """One user turn, ``calls`` tool calls each with a 32,000-character result (the
    default per-turn cap) of prose that packs past 1 MiB in all, and the reply."""
    import random

    from satchel.context import ToolCall

    rng = random.Random(seed)
    words = "the of and to in is that for it as was with be by on not this are or".split()
    ctx.add_turn("user", f"research this ({seed})")
    for i in range(calls):
        ctx.add_turn("assistant", "", tool_calls=(ToolCall(f"c{seed}-{i}", "fetch", "{}"),))
        text = " ".join(rng.choice(words) for _ in range(12_000))[:32_000]
        ctx.add_turn("tool", text, tool_call_id=f"c{seed}-{i}")
    ctx.add_turn("assistant", f"findings ({seed})")


@pytest.mark.parametrize("writes", ["working", "refused"])
def test_an_exchange_too_large_for_any_segment_is_summarized_not_a_413(writes: str) -> None:
    """An agent's exchange over what one segment holds (1 MiB packed) raised
    BudgetExceeded with a tier (working or down): a 413 that lost the exchange and its
    reply, where the same app without a tier answered 200 and summarized it. It is
    dropped and summarized as the byte budget drops it, and the rest of the history
    (turns already in the tier, the exchanges after it) stays whole."""
    tier = FlakyTier()
    pipe = make(tier)
    token = converse(pipe, range(30))  # overflowed already: turns kept in the tier
    assert token is not None and pipe.codec.open(token, now=NOW).overflow
    tier.refuse_writes = writes == "refused"
    ctx = pipe.load(token, now=NOW)
    agent_exchange(ctx, 34, seed=1)
    result = pipe.save(ctx, now=NOW)  # raised BudgetExceeded
    assert result.token is not None
    saved = pipe.codec.open(result.token, now=NOW)
    assert saved.summary.endswith("findings (1)")
    if writes == "refused":
        # The turns waiting inline for the tier went past the hard cap with it: the
        # loss the tier's refusal causes, counted and flagged as such.
        assert ctx.degraded == ["tier_write_failed", "data_loss"]
        assert saved.lifecycle.lost >= 70
        return
    assert not ctx.degraded
    assert saved.lifecycle.dropped.get("byte_budget") == 70
    tier.refuse_writes = False
    ctx = pipe.load(result.token, now=NOW)
    ctx.add_turn("user", "and then?")
    ctx.add_turn("assistant", "then this.")
    final = pipe.load(pipe.save(ctx, now=NOW).token, now=NOW)
    contents = [t.content for t in final.all_turns()]
    assert not final.degraded
    assert contents[:60:2] == [message(i) for i in range(30)]
    assert contents[1:60:2] == [message(i + 1000) for i in range(30)]
    assert contents[60:] == ["and then?", "then this."]
    assert not any(c.startswith(("research this", "findings")) for c in contents)


def test_segments_live_as_long_as_the_token_opens_with_its_clock_skew() -> None:
    """Segments expired at created_at + max_age exactly, while the token opens for the
    30 s of clock skew after it: in those last seconds every overflowed turn read as
    segment_missing (and a spill then could turn the references into data loss)."""
    now = [NOW]
    tier = MemoryTier(clock=lambda: now[0])
    codec = Codec(Keyring.generate("k1"), clock=lambda: now[0])
    policy = LifecyclePolicy(
        max_turns=None, max_token_bytes=1500, hard_max_token_bytes=3000, max_age=3600
    )
    store = SegmentStore(GuardedTier(tier, cache=SegmentCache(0)), codec)
    pipe = Pipeline(codec, policy, segments=store, clock=lambda: now[0])
    token = converse(pipe, range(30))
    assert token is not None and codec.open(token, now=NOW).overflow
    now[0] = NOW + 3600 + 20  # past the maximum age, within the skew: the token opens
    ctx = pipe.load(token, now=now[0])
    assert not ctx.degraded
    assert len(ctx.all_turns()) == 60
