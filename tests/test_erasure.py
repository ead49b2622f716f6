"""Erasure is a barrier: once a session is erased, no process writes its turns to the
tier again, whatever it still caches or whatever token a client still holds."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from satchel import Codec, Keyring
from satchel.erase import erase_in_tier
from satchel.errors import ContextErased
from satchel.lifecycle import LifecyclePolicy
from satchel.pipeline import Pipeline
from satchel.segments import SegmentStore
from satchel.tiers import (
    BreakerPolicy,
    GuardedTier,
    MemoryTier,
    SegmentCache,
    SQLiteTier,
    Tier,
    tier_from_url,
)

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
    from satchel.erase import erase_with_state

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
            # As another process would (satchel.erase of the request's own conversation
            # also drops its token: nothing would be saved to meet the tombstone).
            erase_with_state(Satchel.state(app), ctx.session_id)
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
    assert re.findall(r"satchel_seal_failures_total\{[^}]*\} (\S+)", metrics) == ["0.0"] * 3
    with app.app_context():
        tag = satchel.codec.session_tag(satchel.codec.open(token).session_id)
    assert [k for k in tier._data if f"{{{tag}}}" in k] == [f"satchel:{{{tag}}}:hwm"]


def _real_tier(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Tier:
    if kind == "sqlite":
        return SQLiteTier(tmp_path / "tier.db")
    return tier_from_url(request.getfixturevalue("redis_server").url)


def _chat_app(tier: Tier, consistency: str, **config: Any) -> tuple[Any, Any, Codec]:
    from flask import Flask, request

    from satchel import Satchel

    app = Flask(__name__)
    app.config.update(
        {
            "SATCHEL_KEYS": Keyring.generate("k1").to_string(),
            "SATCHEL_CONSISTENCY": consistency,
            "SATCHEL_MAX_TOKEN_BYTES": 1200,
            **config,
        }
    )
    satchel = Satchel(app, tier=tier)

    @app.post("/chat")
    def chat() -> dict:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        ctx.add_turn("assistant", text(-len(ctx.turns)))
        return {"session": ctx.session_id.hex()}

    return app, satchel, Satchel.state(app).codec


def _send(client: Any, token: str | None, i: int) -> Any:
    headers = {"Satchel-Context": token} if token else {}
    return client.post("/chat", json={"message": text(i)}, headers=headers)


def _overflowed_session(client: Any) -> tuple[str, str]:
    token = None
    for i in range(8):
        response = _send(client, token, i)
        assert response.status_code == 200
        token = response.headers["Satchel-Context"]
    assert token is not None
    return token, response.get_json()["session"]


def _segments_left(tier: Tier, codec: Codec, session: str) -> list[str]:
    tag = codec.session_tag(bytes.fromhex(session))
    if isinstance(tier, SQLiteTier):
        rows = tier._conn().execute("SELECT key FROM satchel_kv WHERE tag = ?", (tag,))
        keys = [k for (k,) in rows]
    else:
        keys = [k.decode() for k in tier.client.keys(f"*{{{tag}}}*")]
    return sorted(k for k in keys if ":seg:" in k or k.endswith((":newest", ":ctx")))


@pytest.mark.parametrize("consistency", ["client", "monotonic"])
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_spill_right_after_an_erasures_delete_is_refused(
    kind: str, consistency: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Erasure deleted the session's keys and then wrote its tombstone: a spill that
    came in between found no tombstone, wrote its segment, and erase still said the
    session was gone. The delete and the tombstone are one step now."""
    tier = _real_tier(kind, request, tmp_path)
    app, satchel, codec = _chat_app(tier, consistency)
    client = app.test_client()
    token, session = _overflowed_session(client)
    racing: list[Any] = []

    def then_the_next_message(original: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            result = original(*args)
            if not racing:  # the user's next message arrives right after it
                racing.append(_send(app.test_client(), token, 100))
            return result

        return wrapped

    for name in ("delete_session", "erase_session"):
        setattr(tier, name, then_the_next_message(getattr(tier, name)))
    with app.app_context():
        erased = satchel.erase(session)
    assert erased["tokens_refused"] and erased["deleted_keys"] > 0
    assert racing and racing[0].status_code == 410, racing[0].get_data(as_text=True)
    assert racing[0].get_json()["error"]["code"] == "token_erased"
    assert _segments_left(tier, codec, session) == []
    tier.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_an_erasure_between_a_spills_check_and_its_write_leaves_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A spill read the tombstone (none yet) and then wrote its segment: an erasure
    that ran between the two left that segment in the tier for its whole TTL. The
    check is part of the write now."""
    tier = _real_tier(kind, request, tmp_path)
    app, _satchel, codec = _chat_app(tier, "client")
    client = app.test_client()
    token, session = _overflowed_session(client)
    erased: list[dict] = []

    def erase_first(original: Any) -> Any:
        def wrapped(key: str, *args: Any) -> Any:
            if ":seg:" in key and not erased:  # another process erases right now
                erased.append(erase_in_tier(codec, GuardedTier(tier), session, refuse=True))
            return original(key, *args)

        return wrapped

    for name in ("put", "put_unless_marked"):
        setattr(tier, name, erase_first(getattr(tier, name)))
    response = _send(client, token, 100)
    assert erased and erased[0]["tokens_refused"]
    assert response.status_code == 410, response.get_data(as_text=True)
    assert _segments_left(tier, codec, session) == []
    tier.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_erasure_reaches_the_segments_kept_under_a_previous_anchor(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An unpinned ring whose last key changed names the session's keys under a new
    anchor; erase wrote tombstones under the old anchor's tag but left the segments
    stored there."""
    from flask import Flask

    from satchel import Satchel

    tier = _real_tier(kind, request, tmp_path)
    old_ring = Keyring.generate("k1").to_string()
    app, _satchel, codec = _chat_app(tier, "monotonic", SATCHEL_KEYS=old_ring)
    _token, session = _overflowed_session(app.test_client())
    before = _segments_left(tier, codec, session)
    assert any(":seg:" in k for k in before)

    # The next deploy appends a key without pinning the anchor (the app warns).
    grown = Flask(__name__)
    grown.config.update(
        SATCHEL_KEYS=f"{old_ring},{Keyring.generate('k0').to_string()}",
        SATCHEL_MAX_TOKEN_BYTES=1200,
    )
    grown_satchel = Satchel(grown, tier=tier)
    with grown.app_context():
        erased = grown_satchel.erase(session)
    assert erased["deleted_keys"] >= len(before)
    assert _segments_left(tier, codec, session) == []
    assert _segments_left(tier, Satchel.state(grown).codec, session) == []
    tier.close()


@pytest.mark.redis
@pytest.mark.parametrize("after_eviction", ["nothing", "a new spill"])
def test_erasure_finds_the_segments_whose_index_redis_evicted(
    after_eviction: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Under maxmemory-policy allkeys-lru (docs/overflow.md) Redis evicts the session's
    index set like any key, and the segments survive it. Erasure deleted only what the
    index listed: it answered {'erased': True, 'deleted_keys': 0} and left every
    segment readable for the session's maximum age. (The eviction is made here by
    deleting the index, as Redis would: the same state, without waiting on LRU.)"""
    tier = _real_tier("redis", request, tmp_path)
    app, satchel, codec = _chat_app(tier, "client")
    client = app.test_client()
    token, session = _overflowed_session(client)
    tag = codec.session_tag(bytes.fromhex(session))
    assert tier.client.delete(f"satchel:{{{tag}}}:idx") == 1  # evicted
    if after_eviction == "a new spill":  # a new index, listing only the newest segment
        for i in range(8, 12):
            response = _send(client, token, i)
            token = response.headers["Satchel-Context"]
        assert tier.client.scard(f"satchel:{{{tag}}}:idx") >= 1
    before = _segments_left(tier, codec, session)
    assert len([k for k in before if ":seg:" in k]) >= 2
    with app.app_context():
        erased = satchel.erase(session)
    assert erased["deleted_keys"] >= len(before)
    assert _segments_left(tier, codec, session) == []
    tier.close()
