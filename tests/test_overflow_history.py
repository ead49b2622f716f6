"""The history stays one piece and every turn is accounted for, whatever the limits
and the tier do: seeded random conversations through the pipeline with a tier that
refuses writes, refuses reads and loses segments on a schedule.

After every save, a clean read of the token must give each turn sent at most once,
in order; every turn sent must be present, in a segment reported unreadable, or
counted in ``lifecycle.dropped`` (``lost`` being its ``data_loss``); a loss must be
flagged ``data_loss`` when it happens; and no turn may be missing from between the
present ones beyond what unreadable segments and losses explain (a hole: the window
once dropped turns newer than the tier's).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import pytest

from satchel import Codec, Keyring
from satchel.context import ToolCall
from satchel.errors import TierUnavailable
from satchel.lifecycle import LifecyclePolicy
from satchel.pipeline import Pipeline
from satchel.segments import SegmentStore
from satchel.tiers import BreakerPolicy, GuardedTier, SegmentCache
from tests.test_overflow_pipeline import FlakyTier

NOW = 1_795_000_000.0
MARK = re.compile(r"M(\d{4})\.(\d)")
SEGMENT_REASONS = {"segment_missing", "segment_corrupt", "segment_foreign", "tier_unavailable"}


class Flaky(FlakyTier):
    """A real in-memory tier that can refuse writes or reads, or lose a segment."""

    refuse_reads = False

    def get_many(self, keys: Any) -> Any:
        if self.refuse_reads:
            raise TierUnavailable("reads refused")
        return super().get_many(keys)

    def lose_one(self, rng: random.Random) -> None:
        with self._lock:
            if self._data:
                self._remove(rng.choice(sorted(self._data)))


def _text(rng: random.Random, i: int, k: int, big: int) -> str:
    """Turn ``k`` of exchange ``i``, marked ``M0007.1``, of random length."""
    words = rng.choice([1, 2, 5, 10, 30, 80, big])
    noise = " ".join(
        hashlib.sha256(f"{i}.{k}.{w}".encode()).hexdigest()[: rng.choice([4, 8, 12])]
        for w in range(words)
    )
    return f"M{i:04d}.{k} {noise}"


def _pipeline(rng: random.Random, tier: Flaky) -> Pipeline:
    soft = rng.choice([None, 700, 1000, 1500, 2500, 3800])
    hard = rng.choice([None, 3000, 4096, 8000])
    if soft is not None and hard is not None and hard < soft:
        hard = soft
    policy = LifecyclePolicy(
        max_turns=rng.choice([None, 0, 2, 4, 6, 10, 20, 40]),
        max_llm_tokens=rng.choice([None, None, 40, 150, 600, 2000]),
        max_token_bytes=soft,
        hard_max_token_bytes=hard,
        max_turn_chars=rng.choice([None, 2000, 32000]),
    )
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    cache = SegmentCache(rng.choice([0, 0, 8 << 20]))
    guarded = GuardedTier(tier, BreakerPolicy(reset_timeout=0.0), cache=cache)
    store = SegmentStore(guarded, codec, grace=rng.choice([0.0, 600.0]))
    return Pipeline(codec, policy, segments=store, clock=lambda: NOW)


def _exchange(rng: random.Random, ctx: Any, i: int, big: int) -> list[tuple[int, int]]:
    """A plain exchange, or (one in seven) a tool call with its result."""
    ctx.add_turn("user", _text(rng, i, 0, big), ts=NOW)
    if rng.random() < 0.15:
        call = ToolCall(f"c{i}", "lookup", {"q": "x" * rng.choice([1, 50, 500])})
        ctx.add_turn("assistant", _text(rng, i, 1, big), ts=NOW, tool_calls=[call])
        ctx.add_turn("tool", _text(rng, i, 2, big), ts=NOW, tool_call_id=call.id)
        ctx.add_turn("assistant", _text(rng, i, 3, big), ts=NOW)
        return [(i, 0), (i, 1), (i, 2), (i, 3)]
    ctx.add_turn("assistant", _text(rng, i, 1, big), ts=NOW)
    return [(i, 0), (i, 1)]


@pytest.mark.parametrize("seed", range(24))
def test_the_history_is_one_piece_and_every_turn_is_accounted_for(seed: int) -> None:
    rng = random.Random(seed)
    tier = Flaky()
    pipe = _pipeline(rng, tier)
    big = rng.choice([10, 60, 200, 600])
    token, sent = None, []
    writes_down = reads_down = 0
    for i in range(rng.choice([15, 40, 80])):
        if writes_down == 0 and rng.random() < 0.08:
            writes_down = rng.choice([1, 3, 8, 20])
        if reads_down == 0 and rng.random() < 0.04:
            reads_down = rng.choice([1, 3, 8])
        tier.refuse_writes, tier.refuse_reads = writes_down > 0, reads_down > 0
        writes_down, reads_down = max(0, writes_down - 1), max(0, reads_down - 1)
        if rng.random() < 0.03:
            tier.lose_one(rng)
        ctx = pipe.load(token, now=NOW)
        lost_before = ctx.lifecycle.lost
        mine = _exchange(rng, ctx, i, big)
        token = pipe.save(ctx, now=NOW).token
        sent += mine
        if ctx.lifecycle.lost > lost_before:
            assert "data_loss" in ctx.degraded, i

        reads, tier.refuse_reads = tier.refuse_reads, False  # a clean read to check
        seen = pipe.load(token, now=NOW)
        tier.refuse_reads = reads
        present = []
        for turn in seen.all_turns():
            mark = MARK.match(turn.content)
            assert mark, turn.content[:30]
            present.append((int(mark[1]), int(mark[2])))
        assert present == sorted(set(present)), i  # once each, in order
        unread = sum(ref.turns for ref, _ in seen.unreadable)
        assert not unread or set(seen.degraded) & SEGMENT_REASONS, i
        dropped = {k: n for k, n in seen.lifecycle.dropped.items() if k != "overflow"}
        lost = seen.lifecycle.lost
        assert lost == dropped.get("data_loss", 0), i
        assert len(sent) - len(set(present) & set(sent)) - unread - sum(dropped.values()) == 0, i
        if present:  # no hole after the oldest turn still held
            holes = [s for s in sent if s > present[0] and s not in set(present)]
            assert len(holes) <= unread + lost, (i, holes[:4], dropped)
