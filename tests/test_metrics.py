"""PrometheusObserver: real requests through the extension move the metrics they should.

Values are read two ways: from the observer's registry and from an HTTP GET of the
``/metrics`` route added by ``register_routes``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client.values
import pytest
from flask import Flask, request
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.values import MultiProcessValue

from satchel import Satchel
from satchel.context import Context
from satchel.flask_ext.routes import register_routes
from satchel.keys import Keyring
from satchel.metrics import (
    DEGRADED_REASONS,
    MAX_LABEL_VALUES,
    STEPS,
    PrometheusObserver,
    gunicorn_child_exit,
    gunicorn_when_ready,
    metrics_response,
)
from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache
from tests.support import LiveServer, RedisServer

KEYS = Keyring.generate("k1")


# ----------------------------------------------------------------------------- helpers


def words(n: int = 40) -> str:
    """Incompressible text, so a small byte budget overflows after a few turns."""
    return " ".join(secrets.token_hex(4) for _ in range(n))


def make_app(
    obs: PrometheusObserver | None = None,
    *,
    tier: Any = None,
    routes: bool = True,
    ext: Satchel | None = None,
    **config: Any,
) -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, **config)
    if ext is None:
        ext = Satchel(observer=obs, tier=tier)
    ext.init_app(app)

    @app.post("/chat")
    def chat() -> Any:
        ctx = ext.context
        ctx.add_turn("user", request.get_json()["message"])
        ctx.add_turn("assistant", "reply: " + words(20))
        return {
            "turns": len(ctx.turns),
            "all": len(ctx.all_turns()),
            "degraded": ctx.degraded,
            "pid": os.getpid(),
        }

    if routes and obs is not None:
        ext.metrics = obs  # what the lead's init_app will set
        register_routes(app, ext, metrics_route="/metrics", health=False)
    return app, ext


class Chat:
    """A client that carries its token from one response to the next request."""

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()
        self.token: str | None = None
        self.tokens: list[str] = []
        self.sessions: set[str] = set()

    def send(self, message: str | None = None, *, token: str | None = None) -> Any:
        sent = token if token is not None else self.token
        headers = {"Satchel-Context": sent} if sent else {}
        resp = self.client.post("/chat", json={"message": message or words()}, headers=headers)
        if "Satchel-Context" in resp.headers:
            self.token = resp.headers["Satchel-Context"]
            self.tokens.append(self.token)
            self.sessions.add(resp.headers["Satchel-Session"])
        return resp


def value(obs: PrometheusObserver, name: str, **labels: str) -> float:
    got = obs.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def scrape(app: Flask, accept: str | None = None) -> tuple[Any, dict[tuple[str, tuple], float]]:
    headers = {"Accept": accept} if accept else {}
    resp = app.test_client().get("/metrics", headers=headers)
    assert resp.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return resp, samples


def tamper(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["client", "server", "memory"])
def test_a_session_is_started_when_its_first_token_is_issued(mode: str, tmp_path: Any) -> None:
    """Counted when a fresh context was made, every tokenless request was a session:
    five reads of /context (the chat page's load, a bot) counted five, and the page's
    load then its first message counted two for one conversation."""
    from satchel.tiers import SQLiteTier

    obs = PrometheusObserver()
    tier = SQLiteTier(tmp_path / "tier.db") if mode == "server" else None
    app, ext = make_app(obs, tier=tier, SATCHEL_MODE=mode)

    @app.get("/context")
    def context() -> Any:
        turns = len(ext.context.turns)
        ext.discard()
        return {"turns": turns}

    client = app.test_client()
    for _ in range(5):
        assert client.get("/context").status_code == 200
    assert value(obs, "satchel_sessions_started_total") == 0
    chat = Chat(app)
    for _ in range(3):
        assert chat.send().status_code == 200
    assert value(obs, "satchel_sessions_started_total") == 1
    assert value(obs, "satchel_tokens_issued_total") == 3


def test_each_request_counts_tokens_steps_and_sizes() -> None:
    obs = PrometheusObserver()
    app, _ = make_app(obs, SATCHEL_MAX_TURNS=4)
    chat = Chat(app)
    for _ in range(3):
        assert chat.send().status_code == 200

    assert value(obs, "satchel_sessions_started_total") == 1
    assert value(obs, "satchel_tokens_issued_total") == 3
    assert value(obs, "satchel_tokens_opened_total", mode="sealed", kid="k1") == 2
    for step in ("open", "verify", "decompress", "unpack"):
        assert value(obs, "satchel_step_seconds_count", step=step) == 2, step
    for step in ("trim", "overflow", "seal"):
        assert value(obs, "satchel_step_seconds_count", step=step) == 3, step
    assert value(obs, "satchel_step_seconds_sum", step="seal") > 0
    # sub-millisecond buckets exist and a seal fits in a second
    assert value(obs, "satchel_step_seconds_bucket", step="seal", le="0.0001") >= 0
    assert value(obs, "satchel_step_seconds_bucket", step="seal", le="1.0") == 3
    assert value(obs, "satchel_token_bytes_count") == 3
    assert value(obs, "satchel_token_bytes_sum") == sum(len(t) for t in chat.tokens)
    # 2, 4, then 6 turns cut back to the window of 4
    assert value(obs, "satchel_token_turns_sum") == 2 + 4 + 4

    # the same numbers over HTTP
    resp, samples = scrape(app)
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "version=" in resp.headers["Content-Type"]
    assert samples[("satchel_tokens_issued_total", ())] == 3
    assert samples[("satchel_sessions_started_total", ())] == 1
    assert samples[("satchel_step_seconds_count", (("step", "seal"),))] == 3


def test_byte_budget_trims_are_counted_without_a_tier() -> None:
    obs = PrometheusObserver()
    app, _ = make_app(obs, SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    chat = Chat(app)
    for _ in range(4):
        assert chat.send().status_code == 200
    trims = value(obs, "satchel_trims_total", reason="byte_budget")
    assert trims >= 1
    trimmed = value(obs, "satchel_trimmed_turns_total", reason="byte_budget")
    assert trimmed >= 2 * trims
    # what left the token went into the running summary
    assert value(obs, "satchel_summarized_turns_total") == trimmed
    _, samples = scrape(app)
    assert samples[("satchel_trims_total", (("reason", "byte_budget"),))] == trims


def test_contexts_that_cannot_be_sealed_are_counted_and_logged(caplog: Any) -> None:
    """No token is issued for them (a JSON 413 or 500 instead): the counter and a
    WARNING audit line are how an operator sees the app's mistake."""
    obs = PrometheusObserver()
    app, ext = make_app(obs, SATCHEL_MAX_TOKEN_BYTES=1500, SATCHEL_HARD_MAX_TOKEN_BYTES=2000)

    @app.post("/pin")
    def pin() -> Any:
        ext.context.pinned.facts.append(request.get_json()["fact"])
        return {"ok": True}

    @app.post("/tag")
    def tag() -> Any:
        ext.context.metadata["by_id"] = {7: "seven"}  # an int key: would not open again
        return {"ok": True}

    client = app.test_client()
    with caplog.at_level("WARNING", logger="satchel.audit"):
        too_big = client.post("/pin", json={"fact": words(400)})
        unsealable = client.post("/tag", json={})
    assert too_big.status_code == 413 and too_big.get_json()["error"]["code"] == "budget_exceeded"
    assert unsealable.status_code == 500
    assert "Satchel-Context" not in too_big.headers and "Satchel-Context" not in unsealable.headers
    assert value(obs, "satchel_seal_failures_total", error="budget_exceeded") == 1
    assert value(obs, "satchel_seal_failures_total", error="context_not_serializable") == 1
    assert [r.getMessage() for r in caplog.records].count("seal_failed") == 2


def test_window_trims_are_counted() -> None:
    obs = PrometheusObserver()
    app, _ = make_app(obs, SATCHEL_MAX_TURNS=4)
    chat = Chat(app)
    for _ in range(3):
        chat.send()
    assert value(obs, "satchel_trims_total", reason="window") == 1
    assert value(obs, "satchel_trimmed_turns_total", reason="window") == 2


@pytest.mark.parametrize("mode", ["client", "server", "memory"])
def test_a_failing_summarizer_or_token_counter_is_flagged_and_counted(
    mode: str, tmp_path: Any, caplog: Any
) -> None:
    """An app's summarizer (an LLM timing out) or token counter that fails falls back
    to the extractive summary or the estimate, so the request succeeds; before, that
    was one WARNING line per failure and nothing else: no Satchel-Degraded, and
    satchel_summarized_turns_total counted the turns as if the summary had worked, so
    an operator could not alert on an LLM summarizer failing every time."""
    from satchel.lifecycle import LifecyclePolicy
    from satchel.tiers import SQLiteTier

    def summarizer(dropped: Any, previous: str) -> str:
        raise TimeoutError("the LLM did not answer in time")

    def counter(text: str) -> int:
        raise ValueError("disallowed special token")

    obs = PrometheusObserver()
    policy = LifecyclePolicy(
        max_turns=2, max_llm_tokens=10_000, summarizer=summarizer, token_counter=counter
    )
    tier = SQLiteTier(tmp_path / "tier.db") if mode == "server" else None
    app, _ = make_app(obs, ext=Satchel(observer=obs, policy=policy, tier=tier), SATCHEL_MODE=mode)
    chat = Chat(app)
    with caplog.at_level(logging.WARNING):
        first = chat.send("hello")
        second = chat.send("again")  # 4 turns past a window of 2: the summarizer runs
    assert first.status_code == second.status_code == 200
    assert first.headers["Satchel-Degraded"] == "token_counter_failed"
    assert second.headers["Satchel-Degraded"] == "summarizer_failed, token_counter_failed"
    assert value(obs, "satchel_degraded_total", reason="summarizer_failed") == 1
    assert value(obs, "satchel_degraded_total", reason="token_counter_failed") == 2
    assert value(obs, "satchel_degraded_responses_total") == 2
    audit = [r for r in caplog.records if r.name == "satchel.audit"]
    assert {r.satchel["reason"]: r.satchel["detail"] for r in audit} == {  # type: ignore[attr-defined]
        "token_counter_failed": "ValueError",
        "summarizer_failed": "TimeoutError",
    }
    assert "LLM did not answer" not in caplog.text and "disallowed" not in caplog.text
    # The fallback did summarize: the turns are in the summary, not lost.
    assert chat.send("third").status_code == 200


def test_every_step_series_exists_before_traffic() -> None:
    obs = PrometheusObserver()
    for step in STEPS:
        assert obs.registry.get_sample_value("satchel_step_seconds_count", {"step": step}) == 0


def test_refused_and_expired_tokens_are_counted_by_reason() -> None:
    obs = PrometheusObserver()
    app, ext = make_app(obs)
    chat = Chat(app)
    chat.send()
    good = chat.token
    assert good

    assert chat.send(token=tamper(good)).status_code == 400
    assert chat.send(token="s1.not-a-token").status_code == 400

    codec = ext.state(app).codec
    # past the envelope expiry
    ctx = Context.new(now=time.time())
    expired_envelope = codec.seal(ctx, expires_at=time.time() - 3600)
    assert chat.send(token=expired_envelope).status_code == 401
    # idle longer than SATCHEL_IDLE_TTL (7 days)
    idle = codec.seal(Context.new(now=time.time() - 8 * 86400))
    assert chat.send(token=idle).status_code == 401

    assert value(obs, "satchel_tokens_refused_total", reason="token_bad_signature") == 1
    assert value(obs, "satchel_tokens_refused_total", reason="token_malformed") == 1
    assert value(obs, "satchel_tokens_refused_total", reason="token_expired") == 2
    assert value(obs, "satchel_tokens_expired_total", reason="idle") == 1
    assert value(obs, "satchel_tokens_expired_total", reason="token") == 1
    # refused requests issue nothing
    assert value(obs, "satchel_tokens_issued_total") == 1

    _, samples = scrape(app)
    assert samples[("satchel_tokens_refused_total", (("reason", "token_expired"),))] == 2


def test_envelopes_the_policies_set_to_expire_are_counted_as_idle_or_max_age() -> None:
    """The envelope's expiry is the idle TTL (or the maximum age, when sooner) and is
    checked first: every user who came back after SATCHEL_IDLE_TTL was counted as
    reason="token", and the idle series operations.md says to watch stayed at 0."""
    obs = PrometheusObserver()
    app, ext = make_app(obs, SATCHEL_IDLE_TTL=600, SATCHEL_MAX_AGE=7200)
    chat = Chat(app)
    state = ext.state(app)
    start = time.time()
    for clock in (state.codec, state.pipeline):  # the whole request path, an hour ago
        clock.clock = lambda: start - 3600
    chat.send()
    idle_token = chat.token
    fresh = Chat(app)
    for at in range(-600, 6600, 500):  # a session active every 500 s, created at -600
        for clock in (state.codec, state.pipeline):
            clock.clock = lambda at=at: start + at
        assert fresh.send().status_code == 200
    # The last, at +6,400, expires at min(+7,000, created + 7,200 = +6,600).
    max_age_token = fresh.token
    for clock in (state.codec, state.pipeline):
        clock.clock = time.time
    assert chat.send(token=idle_token).status_code == 401
    for clock in (state.codec, state.pipeline):
        clock.clock = lambda: start + 6600 + 60
    assert chat.send(token=max_age_token).status_code == 401
    assert value(obs, "satchel_tokens_expired_total", reason="idle") == 1
    assert value(obs, "satchel_tokens_expired_total", reason="max_age") == 1
    assert value(obs, "satchel_tokens_expired_total", reason="token") == 0


def test_overflow_writes_reads_and_misses() -> None:
    obs = PrometheusObserver()
    memory = MemoryTier()
    app, ext = make_app(obs, tier=memory, SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    chat = Chat(app)
    for _ in range(6):
        assert chat.send().status_code == 200
    writes = value(obs, "satchel_overflow_writes_total")
    assert writes >= 1
    assert value(obs, "satchel_overflow_write_bytes_total") > 0
    assert value(obs, "satchel_summarized_turns_total") >= 2
    # every request after the first overflow read the segments back
    assert value(obs, "satchel_overflow_reads_total") >= 1
    assert value(obs, "satchel_overflow_read_turns_total") >= 2
    assert value(obs, "satchel_overflow_misses_total", reason="segment_missing") == 0

    # the segments are gone (expired, evicted, flushed): the next read misses them
    memory.clear()
    ext.state(app).tier.cache.clear()
    resp = chat.send()
    assert resp.status_code == 200
    assert "segment_missing" in resp.get_json()["degraded"]
    assert value(obs, "satchel_overflow_misses_total", reason="segment_missing") == 1
    assert value(obs, "satchel_degraded_total", reason="segment_missing") == 1

    # the segment cache counters are read from the tier at scrape time
    _, samples = scrape(app)
    assert samples[("satchel_overflow_writes_total", ())] == value(
        obs, "satchel_overflow_writes_total"
    )
    stats = ext.state(app).tier.cache.stats()
    assert samples[("satchel_segment_cache_misses_total", (("tier", "memory"),))] == stats["misses"]
    assert samples[("satchel_segment_cache_hits_total", (("tier", "memory"),))] == stats["hits"]
    assert samples[("satchel_breaker_state", (("tier", "memory"),))] == 0


def test_breaker_gauge_follows_a_real_redis_going_down_and_back(
    redis_server: RedisServer,
) -> None:
    from satchel.tiers import RedisTier

    now = [1000.0]
    obs = PrometheusObserver()
    guarded = GuardedTier(
        RedisTier(redis_server.url),
        breaker=BreakerPolicy(fail_max=2, reset_timeout=30),
        cache=SegmentCache(max_bytes=0),  # every read goes to redis
        clock=lambda: now[0],
        on_event=lambda name, **fields: ext.observer.event(name, **fields),
    )
    ext = Satchel(observer=obs, tier=guarded)  # used as given: on_event reports to ext
    app, _ = make_app(obs, ext=ext, SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    chat = Chat(app)
    while value(obs, "satchel_overflow_writes_total") < 1:
        assert chat.send().status_code == 200
    _, samples = scrape(app)
    assert samples[("satchel_breaker_state", (("tier", "redis"),))] == 0

    redis_server.kill()
    for _ in range(3):
        resp = chat.send()
        assert resp.status_code == 200  # client mode keeps serving
        assert "tier_unavailable" in resp.get_json()["degraded"]
    assert guarded.breaker_state == "open"
    assert value(obs, "satchel_breaker_state", tier="redis") == 2
    assert value(obs, "satchel_breaker_transitions_total", tier="redis", state="open") == 1
    assert value(obs, "satchel_degraded_total", reason="tier_unavailable") >= 3
    assert value(obs, "satchel_overflow_misses_total", reason="tier_unavailable") >= 3
    # Responses, counted once each, although each carries more than one reason.
    reasons = sum(
        value(obs, "satchel_degraded_total", reason=r) or 0
        for r in ("tier_unavailable", "tier_write_failed", "data_loss")
    )
    assert value(obs, "satchel_degraded_responses_total") == 3 < reasons
    _, samples = scrape(app)
    assert samples[("satchel_breaker_state", (("tier", "redis"),))] == 2

    redis_server.restart()
    now[0] += 31  # past reset_timeout: the next call is the half-open trial
    resp = chat.send()
    assert resp.status_code == 200
    assert guarded.breaker_state == "closed"
    assert value(obs, "satchel_breaker_transitions_total", tier="redis", state="half_open") == 1
    assert value(obs, "satchel_breaker_transitions_total", tier="redis", state="closed") == 1
    assert value(obs, "satchel_breaker_state", tier="redis") == 0
    # redis came back empty: the overflowed turns are reported missing, not unavailable
    assert "segment_missing" in resp.get_json()["degraded"]


def test_a_failed_erasure_is_counted_and_logged_as_one(
    redis_server: RedisServer, caplog: Any
) -> None:
    """An erasure the tier could not carry out (Redis down) raised to its caller and
    nothing else: no metric moved, and the only log line was the error handler's
    generic one (outside a request, with the breaker open, none at all), so neither
    the dashboard nor the audit log could show a compliance operation had failed."""
    from satchel.errors import TierUnavailable
    from satchel.tiers import RedisTier

    obs = PrometheusObserver()
    guarded = GuardedTier(
        RedisTier(redis_server.url), breaker=BreakerPolicy(fail_max=1, reset_timeout=30)
    )
    app, ext = make_app(obs, ext=Satchel(observer=obs, tier=guarded))
    session = "ab" * 16
    with app.app_context():
        assert ext.erase(session)["tokens_refused"] is True
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="satchel.audit"):
            for _ in range(2):  # the failure, then the breaker refusing without a call
                with pytest.raises(TierUnavailable):
                    ext.erase(session)
    assert value(obs, "satchel_erased_total") == 1
    assert value(obs, "satchel_erase_failures_total", error="tier_unavailable") == 2
    failed = [r for r in caplog.records if r.getMessage() == "erase_failed"]
    assert [r.levelno for r in failed] == [logging.WARNING] * 2
    tag = failed[0].satchel["session"]  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f]{8,24}", tag) and session not in caplog.text
    assert failed[1].satchel["detail"] == "breaker_open"  # type: ignore[attr-defined]


def test_each_reason_counts_once_per_response_however_often_a_save_meets_it(
    redis_server: RedisServer,
) -> None:
    """satchel_degraded_total{reason} counts responses: a save that drops turns twice
    (to the hard cap with the tier down, then again at the ceiling) is one data_loss."""
    from satchel.tiers import RedisTier

    obs = PrometheusObserver()
    tier = GuardedTier(RedisTier(redis_server.url), cache=SegmentCache(max_bytes=0))
    app, _ = make_app(obs, tier=tier)
    chat = Chat(app)
    for _ in range(3):
        assert chat.send("small talk").status_code == 200
    redis_server.kill()
    rng = secrets.SystemRandom()
    seen: set[str] = set()
    for _ in range(3):
        before = {r: value(obs, "satchel_degraded_total", reason=r) for r in DEGRADED_REASONS}
        responses = value(obs, "satchel_degraded_responses_total")
        # Hard to compress (random CJK): each message alone is near the hard cap.
        big = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(7999))
        resp = chat.send(big)
        assert resp.status_code == 200
        # The header, not the body: this view answers before the save runs.
        flagged = [r.strip() for r in resp.headers.get("Satchel-Degraded", "").split(",")]
        seen.update(flagged)
        for reason in DEGRADED_REASONS:
            added = value(obs, "satchel_degraded_total", reason=reason) - before[reason]
            assert added == (1 if reason in flagged else 0), (reason, flagged)
        assert value(obs, "satchel_degraded_responses_total") == responses + 1
    assert {"tier_write_failed", "data_loss"} <= seen


def test_metrics_route_issues_no_token_and_negotiates_openmetrics() -> None:
    obs = PrometheusObserver()
    app, _ = make_app(obs)
    chat = Chat(app)
    chat.send()
    resp = app.test_client().get("/metrics", headers={"Satchel-Context": chat.token})
    assert resp.status_code == 200
    assert "Satchel-Context" not in resp.headers
    assert resp.headers["Cache-Control"] == "no-store"
    assert value(obs, "satchel_tokens_opened_total", mode="sealed", kid="k1") == 0
    assert value(obs, "satchel_sessions_started_total") == 1

    resp, _ = scrape(app, accept="application/openmetrics-text; version=1.0.0")
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.get_data(as_text=True).rstrip().endswith("# EOF")


def test_metrics_route_without_an_observer_is_404() -> None:
    app, ext = make_app(None, routes=False)
    ext.metrics = None
    register_routes(app, ext, metrics_route="/metrics", health=False)
    assert app.test_client().get("/metrics").status_code == 404


def test_two_apps_in_one_process_keep_separate_registries() -> None:
    obs_a, obs_b = PrometheusObserver(), PrometheusObserver()
    app_a, _ = make_app(obs_a)
    app_b, _ = make_app(obs_b)
    Chat(app_a).send()
    chat_b = Chat(app_b)
    chat_b.send()
    chat_b.send()
    assert obs_a.registry is not obs_b.registry
    assert value(obs_a, "satchel_tokens_issued_total") == 1
    assert value(obs_b, "satchel_tokens_issued_total") == 2
    _, samples = scrape(app_a)
    assert samples[("satchel_tokens_issued_total", ())] == 1


def test_labels_never_carry_a_session_and_stay_bounded() -> None:
    obs = PrometheusObserver()
    app, _ = make_app(obs, SATCHEL_MAX_TURNS=2)
    chats = [Chat(app) for _ in range(3)]
    for chat in chats:
        chat.send()
        chat.send()
    sessions = set().union(*(c.sessions for c in chats))
    assert len(sessions) == 3

    # hostile or buggy values: session tags, tokens, free text, unbounded variety
    tag = next(iter(sessions))
    obs.event("refused", reason=chats[0].token, session=tag)
    obs.event("degraded", reason="a reason with spaces", session=tag)
    obs.event("trimmed", reason=b"bytes", turns="many")
    for i in range(MAX_LABEL_VALUES + 20):
        obs.event("refused", reason=f"code_{i}")
    obs.timing("seal", -1.0)
    obs.token(size=10, raw_size=0, turns=1)

    label_values: set[str] = set()
    for family in obs.registry.collect():
        for sample in family.samples:
            label_values.update(sample.labels.values())
    for session in sessions:
        assert session not in label_values
    assert not any(v.startswith("s1.") for v in label_values)
    assert value(obs, "satchel_tokens_refused_total", reason="other") >= 3
    reasons = {
        s.labels["reason"]
        for f in obs.registry.collect()
        for s in f.samples
        if s.name == "satchel_tokens_refused_total"
    }
    assert len(reasons) <= MAX_LABEL_VALUES + 1

    _, samples = scrape(app)
    text = " ".join(str(k) for k in samples)
    for session in sessions:
        assert session not in text


def test_compression_ratio_and_other_events() -> None:
    obs = PrometheusObserver(namespace="chat")
    obs.token(size=1000, raw_size=3000, turns=6)
    obs.token(size=800, raw_size=0, turns=4)  # unknown payload size: no ratio
    for name, fields in [
        ("migrated", {"from_version": 1, "to_version": 2}),
        ("fork_detected", {}),
        ("stale_refused", {}),
        ("busy_refused", {}),
        ("data_loss", {"turns": 3}),
        ("resealed", {}),
        ("erased", {}),
        ("expired", {"reason": "max_age"}),
    ]:
        obs.event(name, session="0123456789abcdef", **fields)
    get = obs.registry.get_sample_value
    assert get("chat_token_compression_ratio_count") == 1
    assert get("chat_token_compression_ratio_sum") == 3.0
    assert get("chat_token_turns_sum") == 10
    assert get("chat_migrations_total", {"from_version": "1"}) == 1
    assert get("chat_forks_total") == 1
    assert get("chat_stale_refused_total") == 1
    assert get("chat_busy_refused_total") == 1
    assert get("chat_data_loss_total") == 1
    assert get("chat_data_loss_turns_total") == 3
    assert get("chat_tokens_resealed_total") == 1
    assert get("chat_erased_total") == 1
    assert get("chat_tokens_expired_total", {"reason": "max_age"}) == 1
    assert get("satchel_tokens_issued_total") is None


# ---------------------------------------------------------- several gunicorn workers


def create_live_app() -> Flask:
    """A chat app for LiveServer (imported in the server process)."""
    obs = PrometheusObserver()
    app, _ = make_app(obs)
    return app


def test_gunicorn_workers_aggregate_in_multiprocess_mode(tmp_path: Path) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "SATCHEL_KEYS": KEYS.to_string()}
    with LiveServer(
        "tests.test_metrics:create_live_app",
        env=env,
        server="gunicorn",
        workers=2,
    ) as server:
        pids: list[int] = []
        while len(pids) < 6 or (len(set(pids)) < 2 and len(pids) < 100):
            resp = server.post("/chat", json_body={"message": "hello"})
            assert resp.status == 200
            pids.append(resp.json()["pid"])
        print(f"requests per worker: { {p: pids.count(p) for p in set(pids)} }")
        for _ in range(4):  # whichever worker answers reports the total of all
            resp = server.get("/metrics")
            assert resp.status == 200
            issued = re.search(r"^satchel_tokens_issued_total (\S+)$", resp.text, re.M)
            assert issued and float(issued.group(1)) == len(pids)
    assert any(multiproc.iterdir())


# ------------------------------------------------- a dead worker in multiprocess mode

DEAD_PID, LIVE_PID = 999_999_001, 999_999_002  # not this process, not any live one


def observer_as(pid: int, monkeypatch: pytest.MonkeyPatch) -> PrometheusObserver:
    """A PrometheusObserver whose multiprocess files are written as worker ``pid``
    (prometheus_client picks the value class, and so the pid, when a metric is made)."""
    monkeypatch.setattr(prometheus_client.values, "ValueClass", MultiProcessValue(lambda: pid))
    return PrometheusObserver()


def multiprocess_values(path: Path, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """What /metrics reports across workers: prometheus_client's MultiProcessCollector."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    }


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    return tmp_path


def test_child_exit_forgets_a_dead_workers_open_breaker(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that died with its breaker open used to keep satchel_breaker_state at 2
    (its gauge_livemax_<pid>.db) until the directory was wiped at the next deploy."""
    observer_as(DEAD_PID, monkeypatch).event("breaker_opened", tier="redis")
    observer_as(LIVE_PID, monkeypatch).event("breaker_closed", tier="redis")
    assert multiprocess_values(multiproc_dir, "satchel_breaker_state") == {
        (("tier", "redis"),): 2.0
    }

    gunicorn_child_exit(None, SimpleNamespace(pid=DEAD_PID))

    assert not list(multiproc_dir.glob(f"gauge_*_{DEAD_PID}.db"))
    assert multiprocess_values(multiproc_dir, "satchel_breaker_state") == {
        (("tier", "redis"),): 0.0
    }
    # Its counters stay: they are totals, and the dead worker's part of them happened.
    transitions = multiprocess_values(multiproc_dir, "satchel_breaker_transitions_total")
    assert transitions[(("state", "open"), ("tier", "redis"))] == 1.0


def test_when_ready_forgets_the_preloading_masters_open_breaker(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn --preload: the master opened its breaker at start-up (the tier was down
    when the app warmed up); its gauge file kept satchel_breaker_state at 2 while every
    worker's breaker was closed, for as long as the master ran."""
    master = os.getpid()
    observer_as(master, monkeypatch).event("breaker_opened", tier="redis")
    observer_as(LIVE_PID, monkeypatch).event("breaker_closed", tier="redis")
    assert multiprocess_values(multiproc_dir, "satchel_breaker_state") == {
        (("tier", "redis"),): 2.0
    }

    gunicorn_when_ready(None)

    assert multiprocess_values(multiproc_dir, "satchel_breaker_state") == {
        (("tier", "redis"),): 0.0
    }


def test_child_exit_is_a_no_op_without_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    with caplog.at_level(logging.DEBUG, logger="satchel.metrics"):
        gunicorn_child_exit(None, SimpleNamespace(pid=DEAD_PID))
    assert not caplog.records  # not a warning per worker exit on every plain deploy


def test_child_exit_never_raises_into_gunicorns_master(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception escaping child_exit ends gunicorn's main loop (every worker stops)."""

    def fail(pid: int, path: str | None = None) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(prometheus_multiprocess, "mark_process_dead", fail)
    with caplog.at_level(logging.WARNING, logger="satchel.metrics"):
        gunicorn_child_exit(None, SimpleNamespace(pid=DEAD_PID))
    assert "mark_process_dead" in caplog.text


def test_the_documented_gunicorn_config_line_sets_the_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/operations.md's gunicorn.conf.py line, loaded the way gunicorn loads it."""
    from gunicorn.app.base import Application

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    line = "from satchel.metrics import gunicorn_child_exit as child_exit"
    assert line in doc
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(line + "\n")
    monkeypatch.delitem(sys.modules, "__config__", raising=False)  # gunicorn sets it

    class ConfigOnly(Application):
        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load_config(self) -> None:
            self.load_config_from_file(str(conf))

        def load(self) -> Any:
            raise AssertionError("no app is loaded here")

    assert ConfigOnly().cfg.child_exit is gunicorn_child_exit


# ------------------------------------------------------------------------------- docs


def exported_names(obs: PrometheusObserver) -> set[str]:
    names: set[str] = set()
    for family in obs.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/grafana-dashboard.json"])
def test_docs_and_dashboard_only_use_real_metric_names(doc: str) -> None:
    path = Path(__file__).resolve().parents[1] / doc
    text = path.read_text()
    if doc.endswith(".json"):
        dashboard = json.loads(text)
        assert dashboard["panels"] and dashboard["title"] == "Satchel"
    used = set(re.findall(r"\bsatchel_[a-z0-9_]*[a-z0-9]\b", text)) - {"satchel_event"}
    assert used, doc
    unknown = used - exported_names(PrometheusObserver())
    assert not unknown, f"{doc} names metrics that do not exist: {sorted(unknown)}"


def test_a_label_value_with_a_trailing_newline_is_other() -> None:
    from satchel.metrics import PrometheusObserver

    obs = PrometheusObserver()
    obs.event("refused", reason="token_expired\n")
    assert obs.registry.get_sample_value("satchel_tokens_refused_total", {"reason": "other"}) == 1


def test_the_series_alerts_watch_exist_from_the_start_at_zero() -> None:
    """increase() over a series that first appears at 1 is 0 in Prometheus: the first
    corrupt segment or failed seal would page nobody unless the series is already 0."""
    from satchel.metrics import PrometheusObserver

    registry = PrometheusObserver().registry
    for name, labels in (
        ("satchel_overflow_misses_total", {"reason": "segment_corrupt"}),
        ("satchel_degraded_total", {"reason": "data_loss"}),
        ("satchel_seal_failures_total", {"error": "context_not_serializable"}),
        ("satchel_seal_failures_total", {"error": "configuration_error"}),
        ("satchel_unavailable_total", {"reason": "tier_full"}),
        ("satchel_erase_failures_total", {"error": "tier_unavailable"}),
        ("satchel_erase_failures_total", {"error": "tier_full"}),
    ):
        assert registry.get_sample_value(name, labels) == 0.0, (name, labels)


def test_a_scrape_skips_the_file_a_worker_is_still_creating(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's metrics file is empty between its creation and its first write; a
    scrape that read it then raised struct.error, and /metrics answered an HTML 500."""
    observer_as(LIVE_PID, monkeypatch).event("breaker_opened", tier="redis")
    (multiproc_dir / f"counter_{DEAD_PID}.db").touch()  # a worker starting up
    with Flask(__name__).test_request_context("/metrics"):
        response = metrics_response(CollectorRegistry())
    assert response.status_code == 200
    assert 'satchel_breaker_state{tier="redis"} 2.0' in response.get_data(as_text=True)


def test_a_multiproc_dir_set_after_prometheus_client_was_imported_keeps_the_metrics(
    multiproc_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn.conf.py's documented hook line imports prometheus_client in the master,
    before gunicorn applies ``--env``/``raw_env``: the workers' metrics then live in
    memory (not in PROMETHEUS_MULTIPROC_DIR), and /metrics, reading the empty
    directory, answered 200 with an empty body: every metric gone, silently."""
    assert prometheus_client.values.ValueClass is prometheus_client.values.MutexValue
    from satchel import metrics

    monkeypatch.setattr(metrics, "_late_dir_warned", False)  # once per process: not yet
    obs = PrometheusObserver()
    obs.event("issued")
    app = Flask(__name__)
    with app.test_request_context("/metrics"), caplog.at_level(logging.WARNING):
        text = metrics_response(obs.registry).get_data(as_text=True)
    assert "satchel_tokens_issued_total 1.0" in text
    assert "PROMETHEUS_MULTIPROC_DIR" in caplog.text
