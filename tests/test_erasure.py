"""Erasure is a barrier: once a session is erased, no process writes its turns to the
tier again, whatever it still caches or whatever token a client still holds."""

from __future__ import annotations

import hashlib
import re

import pytest

from satchel import Codec, Keyring
from satchel.erase import erase_in_tier
from satchel.errors import ContextErased
from satchel.lifecycle import LifecyclePolicy
from satchel.pipeline import Pipeline
from satchel.segments import SegmentStore
from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache

NOW = 1_795_000_000.0


def worker(tier: MemoryTier, codec: Codec) -> Pipeline:
    """One app process: its own breaker and segment cache over the shared tier."""
    guarded = GuardedTier(tier, BreakerPolicy(), cache=SegmentCache(1 << 20))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=1200, hard_max_token_bytes=4000)
    return Pipeline(codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW)


def text(i: int) -> str:
    # Text that does not compress away, so the conversation outgrows its budget.
    return " ".join(hashlib.sha256(f"{i}-{n}".encode()).hexdigest()[:9] for n in range(30))


def exchange(pipeline: Pipeline, token: str | None, i: int) -> str:
    ctx = pipeline.load(token, now=NOW)
    ctx.add_turn("user", text(i))
    ctx.add_turn("assistant", text(-i))
    result = pipeline.save(ctx, now=NOW)
    assert result.token is not None
    return result.token


def overflowed(tier: MemoryTier, codec: Codec) -> tuple[Pipeline, str]:
    """A worker on ``tier`` and the last token of a conversation that has overflowed."""
    app = worker(tier, codec)
    token = None
    for i in range(12):
        token = exchange(app, token, i)
    assert token is not None
    return app, token


def test_a_process_caching_an_erased_conversation_cannot_write_it_back() -> None:
    tier = MemoryTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    app, token = overflowed(tier, codec)
    ctx = codec.open(token, now=NOW)
    assert ctx.overflow, "the conversation must have overflowed"
    tag = codec.session_tag(ctx.session_id)

    # `satchel erase` runs in another process: it cannot clear this one's cache.
    erased = erase_in_tier(codec, GuardedTier(tier), ctx.session_id.hex(), refuse=True)
    assert erased["deleted_keys"] >= len(ctx.overflow)

    # The client still holds its token and keeps chatting against the same process.
    with pytest.raises(ContextErased):
        for i in range(12, 40):
            token = exchange(app, token, i)
    stored = [key for key in tier._data if f"{{{tag}}}" in key]
    assert stored == [f"satchel:{{{tag}}}:hwm"]  # only the tombstone: no turn came back


def test_erasing_twice_reports_nothing_deleted_the_second_time() -> None:
    """The second erasure counted the first one's tombstone as a deleted key: an
    operator read it as data still there."""
    tier = MemoryTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    _app, token = overflowed(tier, codec)
    session = codec.open(token, now=NOW).session_id.hex()
    first = erase_in_tier(codec, GuardedTier(tier), session, refuse=True)
    assert first["deleted_keys"] >= 1
    again = erase_in_tier(codec, GuardedTier(tier), session, refuse=True)
    assert again == {**first, "deleted_keys": 0}
    tag = codec.session_tag(bytes.fromhex(session))
    assert [key for key in tier._data if f"{{{tag}}}" in key] == [f"satchel:{{{tag}}}:hwm"]


def test_segments_cached_through_an_outage_are_not_written_back_once_erased() -> None:
    """After an outage a process writes back the segments it cached (the tier may have
    restarted empty). Not those of a session erased meanwhile."""
    tier = MemoryTier()
    codec = Codec(Keyring.generate("k1"), clock=lambda: NOW)
    guarded = GuardedTier(tier, BreakerPolicy(fail_max=1, reset_timeout=0.0))
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=1200, hard_max_token_bytes=4000)
    app = Pipeline(codec, policy, segments=SegmentStore(guarded, codec), clock=lambda: NOW)
    token = None
    for i in range(12):
        token = exchange(app, token, i)
    ctx = codec.open(token, now=NOW)
    assert ctx.overflow
    guarded.breaker.open()  # an outage: what this process cached is unconfirmed now
    assert guarded.epoch == 1
    erase_in_tier(codec, GuardedTier(tier), ctx.session_id.hex(), refuse=True)
    with pytest.raises(ContextErased):
        app.load(token, now=NOW)
    tag = codec.session_tag(ctx.session_id)
    assert [key for key in tier._data if f"{{{tag}}}" in key] == [f"satchel:{{{tag}}}:hwm"]


@pytest.mark.parametrize("consistency", ["client", "monotonic"])
def test_an_erasure_while_a_request_runs_stops_its_writes(consistency: str) -> None:
    """The erasure lands while the view waits on a model: the request's spill must not
    write the turns back (the tombstone is read right before each write), and a
    monotonic save answers 410, not a 409 that reads like a race."""
    from flask import Flask, request

    from satchel import Satchel

    tier = MemoryTier()
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring.generate("k1").to_string(),
        SATCHEL_CONSISTENCY=consistency,
        SATCHEL_MAX_TOKEN_BYTES=1200,
        SATCHEL_METRICS_ROUTE="/metrics",
    )
    satchel = Satchel(app, tier=tier)

    @app.post("/chat")
    def chat() -> dict:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        if request.args.get("erase"):
            satchel.erase(ctx.session_id)  # from another process, in real life
        ctx.add_turn("assistant", text(len(ctx.turns)))
        return {}

    client = app.test_client()
    token = None
    for i in range(3):
        headers = {"Satchel-Context": token} if token else {}
        token = client.post("/chat", json={"message": text(i)}, headers=headers).headers[
            "Satchel-Context"
        ]
    erased = None
    for i in range(3, 12):  # until a request has something to spill
        response = client.post(
            "/chat?erase=1", json={"message": text(i)}, headers={"Satchel-Context": token}
        )
        if response.status_code != 200:
            erased = response
            break
        token = response.headers["Satchel-Context"]
    assert erased is not None and erased.status_code == 410
    assert erased.get_json()["error"]["code"] == "token_erased"
    # Counted as a refusal, not as a failed seal (the alert for app bugs).
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'satchel_tokens_refused_total{reason="token_erased"}' in metrics
    assert re.findall(r"satchel_seal_failures_total\{[^}]*\} (\S+)", metrics) == ["0.0", "0.0"]
    with app.app_context():
        tag = satchel.codec.session_tag(satchel.codec.open(token).session_id)
    assert [k for k in tier._data if f"{{{tag}}}" in k] == [f"satchel:{{{tag}}}:hwm"]


def test_the_tombstone_is_written_even_when_a_save_moves_the_mark_in_between() -> None:
    """erase read the mark, a monotonic save moved it, and the compare-and-set failed
    silently: no tombstone, while erase said the session's tokens were refused."""
    from satchel.consistency import ERASED, MonotonicGuard, mark_key

    class RacingTier(MemoryTier):
        """Moves the mark once, between erase's read and its compare-and-set."""

        raced = False

        def compare_and_set_mark(self, key, expected, new, ttl):  # type: ignore[no-untyped-def]
            if new == ERASED and not self.raced:
                self.raced = True
                super().compare_and_set_mark(key, expected, b"moved by a save", ttl)
            return super().compare_and_set_mark(key, expected, new, ttl)

    tier = RacingTier()
    guard = MonotonicGuard(GuardedTier(tier))
    tier.compare_and_set_mark(mark_key("t1"), None, b"mark", 60)
    guard.erase("t1")
    assert tier.raced and tier.get_many([mark_key("t1")]) == [ERASED]
