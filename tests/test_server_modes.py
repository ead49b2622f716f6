"""The server-side modes behind the same API: ``client``, ``server`` (Redis), ``memory``.

The example app's view code runs unchanged in every mode; only ``SATCHEL_MODE`` (and
the store URL) differ. Server mode on a real redis-server: a killed or SIGSTOPped
Redis gives a fast JSON 503 ``tier_unavailable`` (never a 500 or a hang), the carrier
is signed, and the store also runs on Redis Cluster.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask import request as flask_request
from flask.testing import FlaskClient

from examples.minimal_chat.app import create_app
from satchel.flask_ext import Satchel
from satchel.keys import generate_key
from satchel.server_mode import CARRIER_PREFIX
from tests.test_consistency import in_thread, start_in_thread, token_in

KEYS = generate_key("t1").to_string()
HEADER = "Satchel-Context"
FAST = 1.0  # seconds: an outage must be answered faster than this


def make_app(mode: str, **config: Any) -> Flask:
    return create_app({"SATCHEL_KEYS": KEYS, "SATCHEL_MODE": mode, "TESTING": True, **config})


def chat(client: FlaskClient, message: str, token: str | None) -> Any:
    headers = {HEADER: token} if token else {}
    return client.post("/api/chat", json={"message": message}, headers=headers)


def converse(client: FlaskClient, messages: list[str], token: str | None = None) -> list[Any]:
    responses = []
    for message in messages:
        resp = chat(client, message, token)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        token = resp.headers[HEADER]
        responses.append(resp)
    return responses


def turn_number(resp: Any) -> int:
    match = re.match(r"\(turn (\d+)\)", resp.get_json()["reply"])
    assert match, resp.get_json()
    return int(match.group(1))


def assert_tier_unavailable(resp: Any, elapsed: float) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["error"]["code"] == "tier_unavailable"
    assert body["error"]["message"]
    assert elapsed < FAST, f"took {elapsed:.2f}s"
    # When to try again: the breaker's wait while it is open (2 s by default), else 1.
    assert 1 <= int(resp.headers["Retry-After"]) <= 2


@pytest.fixture(params=["client", pytest.param("server", marks=pytest.mark.redis), "memory"])
def mode_app(request: pytest.FixtureRequest) -> tuple[str, Flask, Any]:
    mode = request.param
    redis = None
    config: dict[str, Any] = {}
    if mode == "server":
        redis = request.getfixturevalue("redis_server")
        config["SATCHEL_STORE_URL"] = redis.url
    return mode, make_app(mode, **config), redis


# ------------------------------------------------------------------ same code, each mode


def test_the_same_view_code_runs_in_every_mode(mode_app: tuple[str, Flask, Any]) -> None:
    mode, app, redis = mode_app
    client = app.test_client()
    messages = ["Plan a three day trip to Lisbon", "Add a day in Sintra", "What about food?"]
    responses = converse(client, messages)

    assert [turn_number(r) for r in responses] == [1, 2, 3]
    assert [r.get_json()["turns"] for r in responses] == [2, 4, 6]
    tokens = [r.headers[HEADER] for r in responses]
    if mode == "client":
        assert not tokens[0].startswith(CARRIER_PREFIX)
        assert len(set(tokens)) == 3  # a new token per turn: the context travels
    else:
        assert tokens[0].startswith(CARRIER_PREFIX)
        assert len(set(tokens)) == 1  # the signed session id stays; the context does not
        assert len(tokens[0]) < 120

    ctx = client.get("/api/context", headers={HEADER: tokens[-1]}).get_json()
    texts = [t["content"] for t in ctx["all_turns"]]
    assert texts[0::2] == messages
    assert all(
        r.headers["Satchel-Session"] == responses[0].headers["Satchel-Session"] for r in responses
    )

    if redis is not None:
        pipeline = Satchel.state(app).pipeline
        key = pipeline.key_for(pipeline.session_id_of(tokens[0]))
        assert redis.client().exists(key) == 1


def metric(text: str, sample: str) -> float:
    """One sample's value from a /metrics page (0 when absent)."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_every_mode_reports_trims_summaries_steps_and_token_sizes(
    mode_app: tuple[str, Flask, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The same dashboards and alerts read every mode: a window that trims is counted,
    # the summarized turns too, the trim and seal steps are timed, and the audit log
    # says what was trimmed and issued (the stored context's size and turns).
    mode, _app, redis = mode_app
    config: dict[str, Any] = {"SATCHEL_MAX_TURNS": 6, "SATCHEL_OVERFLOW_URL": ""}
    if redis is not None:
        config["SATCHEL_STORE_URL"] = redis.url
    client = make_app(mode, **config).test_client()
    with caplog.at_level(logging.INFO, logger="satchel.audit"):
        responses = converse(client, [f"Tell me about step {i}" for i in range(5)])
    assert responses[-1].get_json()["turns"] == 6  # 10 turns, the oldest 4 trimmed
    assert "summarize;dur=" in responses[-1].headers["Server-Timing"]

    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, 'satchel_trims_total{reason="window"}') == 2
    assert metric(text, 'satchel_trimmed_turns_total{reason="window"}') == 4
    assert metric(text, "satchel_summarized_turns_total") == 4
    assert metric(text, 'satchel_step_seconds_count{step="trim"}') == 5
    assert metric(text, 'satchel_step_seconds_count{step="seal"}') == 5
    assert metric(text, 'satchel_step_seconds_count{step="summarize"}') == 2
    # What travels: client mode's tokens (a carrier has no budget to watch).
    assert metric(text, "satchel_token_bytes_count") == (5 if mode == "client" else 0)
    assert metric(text, "satchel_tokens_issued_total") == 5
    audit = [(r.satchel_event, r.satchel) for r in caplog.records if r.name == "satchel.audit"]
    assert [f["turns"] for name, f in audit if name == "trimmed"] == [2, 2]
    assert [f["turns"] for name, f in audit if name == "summarized"] == [2, 2]
    issued = [f for name, f in audit if name == "issued"]
    assert [f["turns"] for f in issued] == [2, 4, 6, 6, 6]
    assert all(f["bytes"] > 0 for f in issued)


def test_every_mode_counts_a_context_that_cannot_be_sealed(
    mode_app: tuple[str, Flask, Any],
) -> None:
    # An app bug (an object in metadata): SatchelSealFailures pages on it in every mode.
    mode, _app, redis = mode_app
    config: dict[str, Any] = {"SATCHEL_STORE_URL": redis.url} if redis is not None else {}
    app = make_app(mode, **config)
    satchel = Satchel.state(app).extension

    @app.post("/broken")
    def broken() -> Any:
        satchel.context.metadata["when"] = object()
        return {}

    client = app.test_client()
    response = client.post("/broken")
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "context_not_serializable"
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, 'satchel_seal_failures_total{error="context_not_serializable"}') == 1


@pytest.mark.parametrize("mode", [pytest.param("server", marks=pytest.mark.redis), "memory"])
def test_two_concurrent_requests_for_one_session_lose_no_turn(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """Both load the same stored context; the save is a compare-and-set, so one is
    stored and the other answers 409 stale_context instead of overwriting it. Sent
    again, it lands on top: both turns are kept."""
    config: dict[str, Any] = {}
    if mode == "server":
        config["SATCHEL_STORE_URL"] = request.getfixturevalue("redis_server").url
    app = create_app({"SATCHEL_KEYS": KEYS, "SATCHEL_MODE": mode, "TESTING": True, **config})
    barrier: list[threading.Barrier] = [threading.Barrier(2)]

    @app.post("/api/slow-chat")
    def slow_chat() -> Any:
        ctx = Satchel.state(app).extension.context
        message = flask_request.get_json()["message"]
        ctx.add_turn("user", message)
        if barrier:
            barrier[0].wait(timeout=5)  # both requests have loaded before either saves
        ctx.add_turn("assistant", f"reply to {message}")
        return {"ok": True}

    carrier = converse(app.test_client(), ["first"])[0].headers[HEADER]
    results: dict[str, Any] = {}

    def send(message: str) -> None:
        results[message] = app.test_client().post(
            "/api/slow-chat", json={"message": message}, headers={HEADER: carrier}
        )

    threads = [threading.Thread(target=send, args=(m,)) for m in ("tab one", "tab two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(r.status_code for r in results.values()) == [200, 409]
    loser = next(m for m, r in results.items() if r.status_code == 409)
    assert results[loser].get_json()["error"]["code"] == "stale_context"
    barrier.clear()  # alone now
    send(loser)
    assert results[loser].status_code == 200
    ctx = app.test_client().get("/api/context", headers={HEADER: carrier}).get_json()
    users = [t["content"] for t in ctx["all_turns"] if t["role"] == "user"]
    assert users[0] == "first" and sorted(users[1:]) == ["tab one", "tab two"]


def test_a_stored_value_that_is_not_a_token_is_a_json_4xx(redis_server: Any) -> None:
    """Whatever sits at the context's key (a foreign write, corruption, not even ASCII)
    is refused as a bad token: never a 500."""
    app = make_app("server", SATCHEL_STORE_URL=redis_server.url)
    carrier = converse(app.test_client(), ["hello"])[0].headers[HEADER]
    pipeline = Satchel.state(app).pipeline
    key = pipeline.key_for(pipeline.session_id_of(carrier))
    for junk in (b"\xff\xfe not ascii", b"s1.not-a-token"):
        redis_server.client().set(key, junk)
        resp = chat(app.test_client(), "again", carrier)
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert resp.get_json()["error"]["code"] == "token_malformed"


@pytest.mark.parametrize(
    ("minted_in", "sent_to", "says"),
    [
        ("client", "memory", ("context token", "server-side")),
        ("memory", "client", ("server-side session id", "client mode")),
    ],
)
def test_a_credential_of_the_other_mode_is_refused_saying_what_it_is(
    minted_in: str, sent_to: str, says: tuple[str, str]
) -> None:
    """Refused, saying what was sent: a client that kept its token or session id across
    a switch of SATCHEL_MODE (or sent it to another app) is told to drop it, not "not
    a session id" or "unknown prefix"."""
    credential = converse(make_app(minted_in).test_client(), ["hello"])[0].headers[HEADER]
    resp = chat(make_app(sent_to).test_client(), "again", credential)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "token_malformed"
    assert all(words in error["message"] for words in says)


@pytest.mark.parametrize(
    ("config", "multiprocess", "warned"),
    [
        ({"SATCHEL_MODE": "memory"}, True, True),
        ({"SATCHEL_MODE": "memory"}, False, False),  # one worker (threads are fine)
        ({"SATCHEL_MODE": "client", "SATCHEL_OVERFLOW_URL": "memory://"}, True, True),
        ({"SATCHEL_MODE": "server", "SATCHEL_STORE_URL": "memory://"}, True, True),
        ({"SATCHEL_MODE": "client", "SATCHEL_OVERFLOW_URL": ""}, True, False),
    ],
)
def test_state_kept_per_process_under_several_workers_is_warned_about_once(
    config: dict[str, str],
    multiprocess: bool,
    warned: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn -w 2 with memory mode: every other request started over, flagged
    session_not_found but with no word at start-up. gunicorn says it runs several
    workers in each request's environ (wsgi.multiprocess = workers > 1)."""
    client = create_app({"SATCHEL_KEYS": KEYS, "TESTING": True, **config}).test_client()
    caplog.set_level(logging.WARNING, logger="satchel")
    # The example app logs to stderr without propagating: let caplog see it too.
    monkeypatch.setattr(logging.getLogger("satchel"), "propagate", True)
    token = None
    for text in ("hello", "again", "and again"):
        resp = client.post(
            "/api/chat",
            json={"message": text},
            headers={HEADER: token} if token else {},
            environ_overrides={"wsgi.multiprocess": multiprocess},
        )
        assert resp.status_code == 200
        token = resp.headers[HEADER]
    warnings = [r.getMessage() for r in caplog.records if "several worker" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:  # what the store holds: every conversation, or overflowed turns only
        holds_all = config["SATCHEL_MODE"] != "client"
        assert ("keeps every conversation" in warnings[0]) == holds_all


# ------------------------------------------------------------------------ signed carrier


def _tampered(carrier: str) -> list[str]:
    body = carrier[len(CARRIER_PREFIX) :]
    session_hex, _, signature = body.partition(".")
    flip = "0" if session_hex[0] != "0" else "1"
    sig_flip = "A" if signature[-1] != "A" else "B"
    return [
        CARRIER_PREFIX + flip + session_hex[1:] + "." + signature,  # another session id
        CARRIER_PREFIX + session_hex + "." + signature[:-1] + sig_flip,  # bad signature
        CARRIER_PREFIX + session_hex,  # no signature
        CARRIER_PREFIX + session_hex + "." + signature + "x" * 300,  # oversized
    ]


@pytest.mark.parametrize("mode", [pytest.param("server", marks=pytest.mark.redis), "memory"])
def test_a_tampered_carrier_is_refused(mode: str, request: pytest.FixtureRequest) -> None:
    config = {}
    if mode == "server":
        config["SATCHEL_STORE_URL"] = request.getfixturevalue("redis_server").url
    client = make_app(mode, **config).test_client()
    carrier = converse(client, ["remember the number 42"])[0].headers[HEADER]
    # Altered or forged signatures read as a bad signature (as a token's MAC does, for
    # the same alert); what is not a signed id at all is malformed.
    codes = ["token_bad_signature", "token_bad_signature", "token_malformed", "token_malformed"]
    for bad, code in zip(_tampered(carrier), codes, strict=True):
        resp = chat(client, "what was the number?", bad)
        assert resp.status_code in (400, 401), bad
        assert resp.get_json()["error"]["code"] == code, bad
    other = create_app(
        {"SATCHEL_KEYS": generate_key("t9").to_string(), "SATCHEL_MODE": mode, **config}
    ).test_client()
    resp = chat(other, "a different key ring", carrier)
    assert resp.get_json()["error"]["code"] == "token_bad_signature"
    assert chat(client, "still fine", carrier).status_code == 200


@pytest.mark.parametrize("mode", ["client", "memory"])
def test_an_oversized_header_is_token_too_large_in_every_mode(mode: str) -> None:
    client = make_app(mode).test_client()
    carrier = converse(client, ["hello"])[0].headers[HEADER]
    cap = 64 * 1024  # Limits.max_token_bytes's default
    resp = chat(client, "again", carrier + "A" * cap)
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "token_too_large"
    # The configured cap, not the codec's (raised server-side to fit stored contexts).
    small = make_app(mode, SATCHEL_TOKEN_LIMIT=8192).test_client()
    carrier = converse(small, ["hello"])[0].headers[HEADER]
    assert chat(small, "again", carrier + "A" * 9000).status_code == 413


# ------------------------------------------------------------------------------ outages


def test_server_mode_answers_503_fast_when_redis_is_killed(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app("server", SATCHEL_STORE_URL=redis_server.url)
    client = app.test_client()
    carrier = converse(client, ["one", "two"])[0].headers[HEADER]

    redis_server.kill()
    caplog.set_level(logging.WARNING, logger="satchel.audit")
    for request in (
        lambda: chat(client, "three", carrier),  # load fails
        lambda: chat(client, "a new conversation", None),  # save fails
        lambda: client.get("/api/context", headers={HEADER: carrier}),
    ):
        t0 = time.perf_counter()
        resp = request()
        assert_tier_unavailable(resp, time.perf_counter() - t0)

    # Counted as refused, not as served degraded (operations.md).
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'satchel_unavailable_total{reason="tier_unavailable"} 3.0' in metrics
    assert not re.search(r"satchel_degraded_total\{[^}]*\} [1-9]", metrics)
    # The audit names the cause (operations.md: one record per reason and cause).
    causes = {
        r.satchel.get("detail")  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "satchel.audit" and r.getMessage() == "unavailable"
    }
    assert causes and None not in causes, causes

    # Back, but empty (no persistence): the conversation starts over, and says so.
    redis_server.restart()
    resp = chat(client, "four", carrier)
    assert resp.status_code == 200
    assert resp.headers["Satchel-Reset"] == "session_not_found"
    assert turn_number(resp) == 1
    # A fresh context under a new session id: the old carrier, had it been stolen or
    # planted (session fixation), must not follow the user into the new conversation.
    assert resp.headers[HEADER] != carrier
    assert turn_number(chat(client, "five", resp.headers[HEADER])) == 2
    stale = chat(client, "six", carrier)
    assert stale.headers["Satchel-Reset"] == "session_not_found"
    assert stale.headers[HEADER] not in (carrier, resp.headers[HEADER])


def test_a_write_that_never_left_says_nothing_was_saved(redis_server: Any) -> None:
    """Every failed save said the write "may still have been saved: reload the
    conversation", even with the breaker open (no socket touched), and for a new
    conversation, which has nothing to reload. (For a stored one a refused connection
    stays uncertain: the retry policy may have sent the command once already.)"""
    client = make_app("server", SATCHEL_STORE_URL=redis_server.url).test_client()
    redis_server.kill()
    messages = []
    for _ in range(7):  # refused five times (fail_max), then the breaker is open
        resp = chat(client, "a new conversation", None)
        assert resp.status_code == 503
        messages.append(resp.get_json()["error"]["message"])
    # A new conversation has no carrier to reload, whatever reached the store.
    assert all("was not started: send it again" in m for m in messages[:5])
    assert all("nothing was saved" in m and "reload" not in m for m in messages[5:])


def test_retry_after_is_the_breakers_wait_while_it_is_open(redis_server: Any) -> None:
    """Every 503 said Retry-After: 1, while the open breaker refused every call for its
    whole reset timeout (30 s here): clients retried into it thirty times over."""
    client = make_app(
        "server", SATCHEL_STORE_URL=redis_server.url, SATCHEL_BREAKER_RESET_TIMEOUT=30
    ).test_client()
    carrier = converse(client, ["one"])[0].headers[HEADER]
    redis_server.kill()
    waits = []
    for request in [lambda: chat(client, "two", carrier)] * 6 + [
        lambda: chat(client, "a new conversation", None),  # its save, refused unsent
    ]:
        resp = request()
        assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "tier_unavailable"
        waits.append(int(resp.headers["Retry-After"]))
    assert waits[0] == 1  # the breaker still closed: a short retry
    assert 20 <= waits[-2] <= 30 and 20 <= waits[-1] <= 30, waits


def test_server_mode_answers_503_fast_when_redis_is_paused(redis_server: Any) -> None:
    app = make_app("server", SATCHEL_STORE_URL=redis_server.url)
    client = app.test_client()
    carrier = converse(client, ["one", "two"])[0].headers[HEADER]

    redis_server.pause()  # SIGSTOP: connections hang, replies never come
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            resp = chat(client, "three", carrier)
            assert_tier_unavailable(resp, time.perf_counter() - t0)
    finally:
        redis_server.resume()

    resp = chat(client, "three", carrier)  # nothing was lost: the turn continues
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert "Satchel-Reset" not in resp.headers
    assert turn_number(resp) == 3


def test_client_mode_never_needs_redis_under_budget(redis_server: Any) -> None:
    """The same outage, client mode with the overflow tier configured: no effect."""
    client = make_app("client", SATCHEL_OVERFLOW_URL=redis_server.url).test_client()
    token = converse(client, ["one", "two"])[-1].headers[HEADER]
    redis_server.kill()
    responses = converse(client, ["three", "four"], token)
    assert [turn_number(r) for r in responses] == [3, 4]
    assert all("Satchel-Degraded" not in r.headers for r in responses)


# ------------------------------------------------------------------------------ cluster


def test_server_mode_on_redis_cluster(redis_cluster: Any) -> None:
    redis_cluster.flushall()
    host, port = redis_cluster.addresses[0]
    app = make_app("server", SATCHEL_STORE_URL=f"redis+cluster://{host}:{port}")
    client = app.test_client()
    carriers: list[str] = []
    for n in range(10):  # several sessions: their keys spread over the masters
        responses = converse(client, [f"conversation {n}, first", f"conversation {n}, second"])
        assert turn_number(responses[-1]) == 2
        carriers.append(responses[0].headers[HEADER])
    ctx = client.get("/api/context", headers={HEADER: carriers[0]}).get_json()
    assert [t["content"] for t in ctx["all_turns"]][0::2] == [
        "conversation 0, first",
        "conversation 0, second",
    ]
    pipeline = Satchel.state(app).pipeline
    cluster = redis_cluster.client()
    try:
        keys = [pipeline.key_for(pipeline.session_id_of(c)) for c in carriers]
        assert all(cluster.exists(k) == 1 for k in keys)
        nodes = {cluster.get_node_from_key(k).port for k in keys}
        assert len(nodes) >= 2, nodes
    finally:
        cluster.close()


# ------------------------------------------------------------- the mode as an argument


def _app_with_extension(**kwargs: Any) -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True)
    satchel = Satchel(app, **kwargs)

    @app.post("/chat")
    def chat_view() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", "hello")
        return {"turns": len(ctx.turns)}

    return app, satchel


@pytest.mark.parametrize("mode", ["client", "memory"])
def test_mode_keyword_selects_where_the_context_lives(mode: str) -> None:
    app, _ = _app_with_extension(mode=mode)
    client = app.test_client()
    token = None
    for expected in (1, 2, 3):
        resp = client.post("/chat", headers={HEADER: token} if token else {})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["turns"] == expected
        token = resp.headers[HEADER]
        # memory mode sends only a signed session id; client mode the whole context
        assert token.startswith(CARRIER_PREFIX) == (mode == "memory"), token


def test_mode_keyword_wins_over_config_and_is_checked() -> None:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_MODE="client")
    Satchel(app, mode="memory")
    assert app.extensions["satchel"].config.mode == "memory"
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SATCHEL_MODE"):
        Satchel(Flask(__name__), mode="disk")


def test_server_consistency_implies_server_mode_unless_the_mode_says_client() -> None:
    from satchel.errors import ConfigurationError

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS, SATCHEL_CONSISTENCY="server", SATCHEL_STORE_URL="memory://"
    )
    Satchel(app)
    assert app.extensions["satchel"].config.mode == "server"
    # A mode set to client, in config or in code, contradicts it: refused, not switched
    # over (the overflow tier quietly became the session store).
    for mode_in_config, mode_argument in (("client", None), (None, "client")):
        app = Flask(__name__)
        app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_CONSISTENCY="server")
        if mode_in_config:
            app.config["SATCHEL_MODE"] = mode_in_config
        with pytest.raises(ConfigurationError, match="SATCHEL_CONSISTENCY='server'"):
            Satchel(app, mode=mode_argument)


def test_a_context_larger_than_the_client_token_cap_lives_server_side() -> None:
    """SATCHEL_TOKEN_LIMIT (64 KiB) caps what a client may send; the context a server
    mode keeps never travels, so it is not held to it. It used to be: a conversation
    past 64 KiB was stored, then refused on its next read (token_too_large)."""
    import base64
    import hashlib

    client = make_app("memory", SATCHEL_MAX_TURNS=400).test_client()
    token = None
    for i in range(14):  # 14 x 7,900 characters that do not compress: ~110 KB of context
        blob = b"".join(hashlib.sha512(f"{i}:{j}".encode()).digest() for j in range(93))
        resp = chat(client, base64.b64encode(blob).decode()[:7900], token)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        token = resp.headers[HEADER]
    data = client.get("/api/context", headers={HEADER: token}).get_json()
    assert len(data["turns"]) == 28 and data["degraded"] == []


def test_a_conversation_the_store_loses_mid_request_is_named_and_counted() -> None:
    """Evicted between a request's read and its write, a conversation was answered 409
    "another request was saved first" (there was no other request), and a conversation
    the store no longer had started over with nothing counted or logged."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_METRICS_ROUTE="/metrics", TESTING=True)
    satchel = Satchel(app, mode="memory")
    evict = [False]

    @app.post("/chat")
    def chat_view() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", flask_request.get_json()["message"])
        if evict[0]:  # the store drops the session while this request runs
            pipeline = Satchel.state(app).pipeline
            pipeline.store.delete([pipeline.key_for(ctx.session_id)])
        return {"turns": len(ctx.turns)}

    client = app.test_client()
    carrier = client.post("/chat", json={"message": "one"}).headers[HEADER]
    evict[0] = True
    lost = client.post("/chat", json={"message": "two"}, headers={HEADER: carrier})
    assert lost.status_code == 409
    error = lost.get_json()["error"]
    assert error["code"] == "stale_context" and "left the session store" in error["message"]
    evict[0] = False
    again = client.post("/chat", json={"message": "two"}, headers={HEADER: carrier})
    assert again.status_code == 200 and again.headers["Satchel-Reset"] == "session_not_found"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'satchel_tokens_refused_total{reason="session_not_found"} 2.0' in metrics


def test_a_full_store_says_nothing_was_saved() -> None:
    """A store that refuses the write for want of memory refused it for certain; the 503
    said "may still have been saved" (the timeout's message) and code tier_unavailable."""
    from satchel.errors import TierFull
    from satchel.tiers import MemoryTier

    class FullTier(MemoryTier):
        full = False

        def compare_and_set_mark(self, key, expected, new, ttl):  # type: ignore[no-untyped-def]
            if self.full:
                raise TierFull("OOM command not allowed", tier="memory", op="cas")
            return super().compare_and_set_mark(key, expected, new, ttl)

        def compare_and_set_mark_with(self, key, expected, new, ttl, companion):  # type: ignore[no-untyped-def]
            if self.full:
                raise TierFull("OOM command not allowed", tier="memory", op="cas")
            return super().compare_and_set_mark_with(key, expected, new, ttl, companion)

    store = FullTier()
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_MODE="server", TESTING=True)
    satchel = Satchel(app, tier=store)

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "hi")
        return {}

    @app.post("/stream")
    def stream_view() -> Any:
        return satchel.stream(iter(["hi"]))

    client = app.test_client()
    carrier = client.post("/chat").headers[HEADER]
    store.full = True
    for path in ("/chat", "/stream"):  # a stream's claim meets the full store first
        refused = client.post(path, headers={HEADER: carrier})
        assert refused.status_code == 503, path
        error = refused.get_json()["error"]
        assert error["code"] == "tier_full" and "nothing was saved" in error["message"]


def test_a_new_conversations_stream_meets_the_store_down_before_its_reply(
    redis_server: Any,
) -> None:
    """A new conversation took no claim (nothing stored): with the store down its
    stream answered 200 and streamed the whole (paid-for) reply, then ended in an error
    event, nothing saved; the JSON route answered a fast 503. Now both do, before the
    model is asked: with the breaker still closed (a refused connection) and open."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_MODE="server", SATCHEL_STORE_URL=redis_server.url)
    satchel = Satchel(app)
    asked = []

    @app.post("/stream")
    def stream_view() -> Any:
        def deltas() -> Iterator[str]:
            asked.append(True)
            yield "a paid reply"

        return satchel.stream(deltas())

    client = app.test_client()
    first = client.post("/stream")
    assert first.status_code == 200 and "event: satchel" in first.get_data(as_text=True)
    redis_server.kill()
    asked.clear()
    for _ in range(7):  # refused connections, then the breaker open (fail_max 5)
        t0 = time.perf_counter()
        refused = client.post("/stream")
        assert_tier_unavailable(refused, time.perf_counter() - t0)
    assert not asked


def _stream_app(
    mode: str, request: pytest.FixtureRequest, observer: Any = None
) -> tuple[Flask, Satchel]:
    """A bare app in ``mode`` (server mode on the test's own redis-server)."""
    config: dict[str, Any] = {"SATCHEL_KEYS": KEYS, "SATCHEL_MODE": mode, "TESTING": True}
    if mode == "server":
        config["SATCHEL_STORE_URL"] = request.getfixturevalue("redis_server").url
    app = Flask(__name__)
    app.config.update(config)
    return app, Satchel(app, observer=observer)


def assert_busy(resp: Any) -> None:
    assert resp.status_code == 409, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "context_busy"


def finish_stream(release: threading.Event, streaming: Any, chunks: Any) -> str:
    """Let a held stream end (set ``release``) and read the rest of it: it must end
    with its token, not an error event."""
    release.set()
    body = "".join(c.decode() for c in chunks)
    streaming.close()
    assert "event: satchel" in body and "event: error" not in body, body
    return body


def held_stream(client: FlaskClient, headers: dict[str, str], first: str) -> tuple[Any, Any]:
    """POST /stream and read its first delta (``first``): the reply is then held open
    (at the test's gate); the response and the iterator of the rest."""
    streaming = client.post("/stream", headers=headers, buffered=False)
    chunks = iter(streaming.response)
    assert first in next(chunks).decode()
    return streaming, chunks


def _gated_stream(app: Flask, satchel: Satchel) -> threading.Event:
    """Add ``POST /stream``: it streams "the paid ", then waits for the returned gate
    (set by the test; open at most 5 s) before the rest of the reply."""
    gate = threading.Event()

    @app.post("/stream")
    def stream_view() -> Any:
        ctx = satchel.context

        def deltas() -> Any:
            yield "the paid "
            gate.wait(5)
            yield "reply"

        return satchel.stream(deltas(), on_complete=lambda text: ctx.add_turn("assistant", text))

    return gate


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_two_streams_for_one_stored_session_stream_one_reply(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """Both streamed the whole (paid-for) reply, and the one whose save lost ended in an
    error event: the same view code did what a client-mode monotonic route refuses up
    front. The second is now a JSON 409 context_busy before any text."""
    app, satchel = _stream_app(mode, request)
    gate = _gated_stream(app, satchel)

    client = app.test_client()
    gate.set()
    first = client.post("/stream").get_data(as_text=True)
    carrier = token_in(first)
    gate.clear()
    winner = client.post("/stream", headers={HEADER: carrier}, buffered=False)
    chunks = iter(winner.response)
    assert "the paid" in next(chunks).decode()
    loser = in_thread(lambda: app.test_client().post("/stream", headers={HEADER: carrier}))
    assert loser.status_code == 409
    assert loser.get_json()["error"]["code"] == "context_busy"
    gate.set()
    body = "".join(c.decode() for c in chunks)
    winner.close()
    assert "event: satchel" in body and "event: error" not in body
    again = client.post("/stream", headers={HEADER: carrier})  # the claim was released
    assert again.status_code == 200 and "event: satchel" in again.get_data(as_text=True)


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_stream_that_waited_past_the_winners_save_is_busy(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """The second of two streams loaded the stored state while the first was still
    answering and took the claim the moment the first released it, after the first
    had saved: it streamed its whole reply, then ended in an error event. Now the
    claim looks at the stored state again: 409 context_busy, before any text."""
    app, satchel = _stream_app(mode, request)
    loaded, go = threading.Event(), threading.Event()

    @app.post("/stream")
    def stream_view() -> Any:
        ctx = satchel.context
        if flask_request.headers.get("X-Late"):
            loaded.set()
            go.wait(5)
        return satchel.stream(
            iter(["the paid reply"]), on_complete=lambda text: ctx.add_turn("assistant", text)
        )

    client = app.test_client()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    late = start_in_thread(
        lambda: app.test_client().post(
            "/stream", headers={HEADER: carrier, "X-Late": "1"}, buffered=True
        )
    )
    assert loaded.wait(5)
    first = client.post("/stream", headers={HEADER: carrier}).get_data(as_text=True)
    assert "event: satchel" in first and "event: error" not in first
    go.set()
    busy = late()
    assert busy.status_code == 409, busy.get_data(as_text=True)
    assert busy.get_json()["error"]["code"] == "context_busy"
    again = client.post("/stream", headers={HEADER: carrier})  # sent again: answered
    assert again.status_code == 200 and "event: satchel" in again.get_data(as_text=True)


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_json_save_while_a_stream_answers_the_same_state_is_busy(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """A plain JSON request for a session whose reply is streaming (a second tab, a
    retry) was answered 200, and the stream then ended in an error event after its whole
    (paid-for) reply: the JSON save had won the compare-and-set. Now the JSON request
    sees the stream's claim (read with the stored state) and is refused 409
    context_busy before its view runs; a read is served meanwhile unless it saves."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, satchel = _stream_app(mode, request, metrics)
    gate = _gated_stream(app, satchel)
    views_run: list[str] = []

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "sent meanwhile")
        views_run.append("chat")
        return {"ok": True}

    @app.get("/peek")
    def peek() -> Any:
        ctx = satchel.context
        satchel.discard()
        return {"turns": len(ctx.turns)}

    @app.get("/peek-and-save")
    def peek_and_save() -> Any:
        satchel.context.metadata["seen"] = True  # a GET that changes the context
        return {}

    client = app.test_client()
    gate.set()  # the first stream runs through (it waited out the gate's 5 s)
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    headers = {HEADER: carrier}
    gate.clear()
    streaming, chunks = held_stream(client, headers, "the paid")  # held open at the gate
    other = in_thread(lambda: app.test_client().post("/chat", headers=headers))
    assert other.status_code == 409, other.get_data(as_text=True)
    assert other.get_json()["error"]["code"] == "context_busy"
    assert other.headers["Retry-After"] == "1"
    assert views_run == []  # refused before the view (and its model call) ran
    read = in_thread(lambda: app.test_client().get("/peek", headers=headers))
    assert read.status_code == 200 and read.get_json() == {"turns": 1}
    assert_busy(in_thread(lambda: app.test_client().get("/peek-and-save", headers=headers)))
    finish_stream(gate, streaming, chunks)
    # Counted as busy, not with stale tokens (replays, rollbacks, lost races).
    assert metrics.registry.get_sample_value("satchel_busy_refused_total") == 2
    assert metrics.registry.get_sample_value("satchel_stale_refused_total") == 0
    again = client.post("/chat", headers=headers)  # once the stream has ended
    assert again.status_code == 200, again.get_data(as_text=True)
    assert views_run == ["chat"]
    assert client.get("/peek", headers=headers).get_json() == {"turns": 3}


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_json_request_loaded_before_a_stream_claimed_cannot_save_over_it(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """A JSON request loaded the stored state a moment before a stream of the same state
    took its claim (the claim found the state unchanged, so it streamed), then saved:
    its compare-and-set against what it loaded won, and the stream ended in an error
    event after its whole (paid-for) reply. A save now also checks the claim, in the
    same atomic step: the JSON request is refused 409 context_busy and the stream ends
    with its token."""
    app, satchel = _stream_app(mode, request)
    gate = _gated_stream(app, satchel)
    loaded, go = threading.Event(), threading.Event()

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "sent from another tab")
        loaded.set()  # loaded and checked: no stream held the state yet
        go.wait(5)
        return {"ok": True}

    client = app.test_client()
    gate.set()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    headers = {HEADER: carrier}
    json_save = start_in_thread(lambda: app.test_client().post("/chat", headers=headers))
    assert loaded.wait(5)
    gate.clear()
    streaming, chunks = held_stream(client, headers, "the paid")  # claimed: the state was as loaded
    go.set()
    assert_busy(json_save())
    finish_stream(gate, streaming, chunks)
    again = client.post("/chat", headers=headers)  # sent again once the reply ended
    assert again.status_code == 200, again.get_data(as_text=True)


@pytest.mark.redis
def test_a_claim_the_store_could_not_release_is_released_once_it_is_back(
    request: pytest.FixtureRequest,
) -> None:
    """Redis stalled while a reply streamed: the save failed (an error event, as it
    should) and so did the claim's release, and the claim then held the conversation
    for its whole TTL: every send was 409 context_busy for two minutes after Redis was
    back. The release is now retried in the background until the store answers."""
    from satchel.consistency import LATE_RELEASES

    app, satchel = _stream_app("server", request)
    redis = request.getfixturevalue("redis_server")
    gate = _gated_stream(app, satchel)

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "sent after the outage")
        return {"ok": True}

    client = app.test_client()
    gate.set()  # the first stream runs through (it waited out the gate's 5 s)
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    gate.clear()
    streaming, chunks = held_stream(client, {HEADER: carrier}, "the paid")  # the claim is taken
    redis.pause()
    try:
        gate.set()
        body = "".join(c.decode() for c in chunks)
        streaming.close()  # the release runs here, and fails: Redis does not answer
        assert "event: error" in body and "tier_unavailable" in body, body
        assert LATE_RELEASES.pending() >= 1
    finally:
        redis.resume()
    assert LATE_RELEASES.drained.wait(15), "the claim was never released"
    after = client.post("/chat", headers={HEADER: carrier})
    assert after.status_code == 200, after.get_data(as_text=True)


@pytest.mark.parametrize(
    "mode", ["memory", pytest.param("server", marks=pytest.mark.redis), "client-monotonic"]
)
def test_a_reply_streaming_past_the_claims_ttl_keeps_its_claim(
    mode: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The claim expired after its TTL even while its reply was still streaming (a slow
    reasoning model): a request sent then was answered and saved first, and the stream
    ended in an error event after its whole reply. It is renewed while text flows."""
    from satchel import consistency

    ttl = 0.6
    monkeypatch.setattr(consistency, "CLAIM_TTL", ttl)
    if mode == "client-monotonic":  # the token's claim, next to its mark in the tier
        app = Flask(__name__)
        app.config.update(
            SATCHEL_KEYS=KEYS,
            SATCHEL_CONSISTENCY="monotonic",
            SATCHEL_OVERFLOW_URL=f"sqlite:///{tmp_path / 'tier.sqlite3'}",
        )
        satchel = Satchel(app)
    else:
        app, satchel = _stream_app(mode, request)
    done = threading.Event()

    @app.post("/stream")
    def stream_view() -> Any:
        ctx = satchel.context

        def deltas() -> Any:
            while not done.wait(0.05):  # a word every 50 ms until the test is done
                yield "word "

        return satchel.stream(deltas(), on_complete=lambda text: ctx.add_turn("assistant", text))

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "sent meanwhile")
        return {"ok": True}

    client = app.test_client()
    done.set()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    done.clear()
    streaming = client.post("/stream", headers={HEADER: carrier}, buffered=False)
    chunks = iter(streaming.response)
    start = time.monotonic()
    while time.monotonic() - start < 2.5 * ttl:  # read the reply well past the TTL
        assert "word" in next(chunks).decode()
    assert_busy(in_thread(lambda: app.test_client().post("/chat", headers={HEADER: carrier})))
    finish_stream(done, streaming, chunks)


def test_a_stream_whose_body_is_never_read_releases_its_claim() -> None:
    """The claim was released when the streamed body ended, and a body never read (a
    HEAD request, an after_request hook that failed) never ends: the conversation's
    next stream was refused (409 context_busy) for two minutes."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_MODE="memory", TESTING=True)
    satchel = Satchel(app)

    @app.get("/stream")
    def stream_view() -> Any:
        ctx = satchel.context
        return satchel.stream(iter(["hi"]), on_complete=lambda t: ctx.add_turn("assistant", t))

    client = app.test_client()
    first = client.get("/stream").get_data(as_text=True)
    carrier = token_in(first)
    head = client.head("/stream", headers={HEADER: carrier})
    assert head.status_code == 200
    head.close()  # what a WSGI server does with a body it does not send
    after = client.get("/stream", headers={HEADER: carrier})
    assert after.status_code == 200 and "event: satchel" in after.get_data(as_text=True)


@pytest.mark.parametrize("failure", ["the view raises", "an after_request hook fails"])
@pytest.mark.parametrize("propagate", [False, True])
@pytest.mark.parametrize("mode", ["memory", "client, monotonic"])
def test_a_stream_built_but_never_sent_releases_its_claim_at_once(
    failure: str, propagate: bool, mode: str, tmp_path: Path
) -> None:
    """A view that built its stream and then raised (or an after_request hook that
    failed) dropped the response unsent: its claim went only when the garbage collector
    freed it (the traceback holds it in a cycle) or after its 120 s TTL, and every
    message of the conversation was 409 context_busy meanwhile."""
    import gc

    from flask import request as current_request

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, PROPAGATE_EXCEPTIONS=propagate)
    if mode == "memory":
        app.config["SATCHEL_MODE"] = "memory"
    else:
        app.config["SATCHEL_CONSISTENCY"] = "monotonic"
        app.config["SATCHEL_OVERFLOW_URL"] = f"sqlite:///{tmp_path / 'tier.db'}"
    satchel = Satchel(app)

    @app.post("/stream")
    def stream_view() -> Any:
        ctx = satchel.context
        response = satchel.stream(iter(["hi"]), on_complete=lambda t: ctx.add_turn("assistant", t))
        if current_request.args.get("fail") == "the view raises":
            raise RuntimeError("the view failed after building its stream")
        return response

    @app.after_request
    def hook(response: Any) -> Any:
        if current_request.args.get("fail") == "an after_request hook fails":
            raise RuntimeError("an after_request hook failed")
        return response

    client = app.test_client()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    gc.disable()  # only the fix may release it, not a collection that happens to run
    try:
        if propagate:
            with pytest.raises(RuntimeError):
                client.post("/stream", query_string={"fail": failure}, headers={HEADER: carrier})
        else:
            failed = client.post(
                "/stream", query_string={"fail": failure}, headers={HEADER: carrier}
            )
            assert failed.status_code == 500
        after = client.post("/stream", headers={HEADER: carrier})
        assert after.status_code == 200, after.get_data(as_text=True)
        assert "event: satchel" in after.get_data(as_text=True)
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_stored_context_past_the_payload_cap_drops_its_oldest_turns(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """No byte budget applies to a stored context, but it is opened with the same limits
    as a token (1 MiB packed). Past it every later message was refused 413
    budget_exceeded, for good; now the oldest turns are summarized and dropped."""
    import random

    config: dict[str, Any] = {"SATCHEL_MAX_TURNS": None}
    if mode == "server":
        config["SATCHEL_STORE_URL"] = request.getfixturevalue("redis_server").url
    client = make_app(mode, **config).test_client()
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]

    def export(i: int) -> str:  # 7,900 characters of a CSV-like paste (the app's cap: 8,000)
        rows = [",".join(rng.choice(words) for _ in range(6)) for _ in range(240)]
        return f"export {i}:\n" + "\n".join(rows)[:7_880]

    token = None
    for i in range(150):  # 150 x 7,900 characters: over 1 MiB packed
        resp = chat(client, export(i), token)
        assert resp.status_code == 200, (i, resp.get_data(as_text=True)[:300])
        token = resp.headers[HEADER]
    context = client.get("/api/context", headers={HEADER: token}).get_json()
    users = [t["content"] for t in context["turns"] if t["role"] == "user"]
    assert users[-1].startswith("export 149:")
    assert not users[0].startswith("export 0:")  # the oldest went
    assert context["lifecycle"]["dropped"].get("byte_budget", 0) > 0
    assert context["summary"]


def test_memory_modes_store_is_sized_by_its_url() -> None:
    """The memory store's bound (64 MiB by default) is set with SATCHEL_STORE_URL; when
    it is full a new conversation gets a JSON 503 tier_full, or with evict=true the
    least recently used conversation is dropped (and starts over)."""
    import random

    from satchel.errors import ConfigurationError

    def fill(client: FlaskClient, count: int) -> list[Any]:
        # Pasted hashes: 6,000 characters that compress to about half.
        pastes = [random.Random(i).randbytes(3000).hex() for i in range(count)]
        return [chat(client, paste, None) for paste in pastes]

    small = make_app("memory", SATCHEL_STORE_URL="memory://?max_bytes=20000").test_client()
    ready = small.get("/readyz").get_json()
    assert ready["status"] == "ready" and ready["tier"]["full"] is False
    statuses = [r.status_code for r in fill(small, 40)]
    assert 200 in statuses and 503 in statuses, statuses
    refused = fill(small, 1)[0]
    assert refused.get_json()["error"]["code"] == "tier_full"
    # A full store refuses every new conversation for up to the idle TTL: the probe
    # said "ready" throughout.
    ready = small.get("/readyz").get_json()
    assert ready["status"] == "degraded" and ready["tier"]["full"] is True

    evicting = make_app(
        "memory", SATCHEL_STORE_URL="memory://?max_bytes=20000&evict=true"
    ).test_client()
    responses = fill(evicting, 40)
    assert all(r.status_code == 200 for r in responses)
    first = chat(evicting, "and again", responses[0].headers[HEADER])
    assert first.status_code == 200
    assert first.headers["Satchel-Reset"] == "session_not_found"

    with pytest.raises(ConfigurationError, match="SATCHEL_MODE='server'"):
        make_app("memory", SATCHEL_STORE_URL="redis://127.0.0.1:1/0")


@pytest.mark.parametrize("idle_ttl", [5, 3600])
def test_a_stored_context_lives_exactly_as_long_as_its_token_opens(idle_ttl: int) -> None:
    """The store kept a context at least 60 s: with a short idle TTL one expiry was
    first a 401 token_expired, then a fresh start. Now the store forgets a context once
    its token stops opening (expiry plus clock skew), and not before."""
    from satchel.codec import Codec
    from satchel.keys import Keyring
    from satchel.lifecycle import LifecyclePolicy
    from satchel.server_mode import ServerSidePipeline
    from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache
    from tests.support.clock import FakeClock

    now = 1_767_225_600.0
    clock = FakeClock(now)
    store = GuardedTier(MemoryTier(clock=clock), BreakerPolicy(), cache=SegmentCache(0))
    policy = LifecyclePolicy(idle_ttl=idle_ttl, max_turns=None, max_token_bytes=None)
    pipe = ServerSidePipeline(
        Codec(Keyring.generate(), clock=clock), policy, store=store, clock=clock
    )
    ctx = pipe.load(None)
    ctx.add_turn("user", "remember me", ts=now)
    carrier = pipe.save(ctx).token
    skew = pipe.codec.limits.clock_skew

    clock.advance(idle_ttl + skew - 1)  # expired, within the skew: still served
    assert [t.content for t in pipe.load(carrier).turns] == ["remember me"]
    clock.advance(2)  # past it: forgotten, a fresh start
    fresh = pipe.load(carrier)
    assert fresh.turns == [] and "reset:session_not_found" in fresh.notices


@pytest.mark.parametrize("idle_ttl", [1, 60])
def test_a_stored_context_whose_token_expired_is_a_fresh_start_not_a_401(idle_ttl: int) -> None:
    """A token's expiry is sealed in whole seconds (rounded down), while the store's
    TTL ran from the exact time: a save at .9 s left the context stored for up to a
    second after its token stopped opening, and that second answered 401 token_expired
    where docs/scaling.md promises a 200 fresh start (session_not_found)."""
    from satchel.codec import Codec
    from satchel.keys import Keyring
    from satchel.lifecycle import LifecyclePolicy
    from satchel.server_mode import ServerSidePipeline
    from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache
    from tests.support.clock import FakeClock

    now = 1_767_225_600.9
    clock = FakeClock(now)
    tier = MemoryTier(clock=clock)
    store = GuardedTier(tier, BreakerPolicy(), cache=SegmentCache(0))
    policy = LifecyclePolicy(idle_ttl=idle_ttl, max_turns=None, max_token_bytes=None)
    pipe = ServerSidePipeline(
        Codec(Keyring.generate(), clock=clock), policy, store=store, clock=clock
    )
    ctx = pipe.load(None)
    ctx.add_turn("user", "remember me", ts=int(now))
    carrier = pipe.save(ctx).token
    skew = pipe.codec.limits.clock_skew

    clock.advance(idle_ttl + skew - 1.0)  # 0.1 s before the token stops opening
    assert [t.content for t in pipe.load(carrier).turns] == ["remember me"]
    clock.advance(0.5)  # the token no longer opens: the store has forgotten it too
    assert (
        pipe.store.get_many([pipe.key_for(ctx.session_id)], cache=False).get(
            pipe.key_for(ctx.session_id)
        )
        is None
    )
    fresh = pipe.load(carrier)
    assert fresh.turns == [] and "reset:session_not_found" in fresh.notices


def test_a_stored_context_that_outlived_its_token_is_a_fresh_start() -> None:
    """Whatever keeps a stored context past its token's expiry (a store with a coarser
    TTL, replicas whose clocks differ), the session is over: a fresh start, as when the
    store has forgotten it, not a 401 the server mode never otherwise answers."""
    from satchel.codec import Codec
    from satchel.keys import Keyring
    from satchel.lifecycle import LifecyclePolicy
    from satchel.server_mode import ServerSidePipeline
    from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache
    from tests.support.clock import FakeClock

    clock = FakeClock(1_767_225_600.0)
    store_clock = FakeClock(1_767_225_600.0)  # the store's clock, which runs behind
    store = GuardedTier(MemoryTier(clock=store_clock), BreakerPolicy(), cache=SegmentCache(0))
    policy = LifecyclePolicy(idle_ttl=60, max_turns=None, max_token_bytes=None)
    pipe = ServerSidePipeline(
        Codec(Keyring.generate(), clock=clock), policy, store=store, clock=clock
    )
    ctx = pipe.load(None)
    ctx.add_turn("user", "remember me")
    carrier = pipe.save(ctx).token
    clock.advance(60 + pipe.codec.limits.clock_skew + 5)
    fresh = pipe.load(carrier)
    assert fresh.turns == [] and "reset:session_not_found" in fresh.notices
    assert fresh.session_id != ctx.session_id


def test_a_carrier_signed_by_a_key_missing_from_the_ring_is_a_bad_signature() -> None:
    """docs/scaling.md: a carrier names no key id, so a replica whose ring lacks the key
    that signed it answers ``token_bad_signature`` (not ``token_unknown_key`` as for a
    token); the ring of the rollout's first step (new key at the end) opens it."""
    from satchel import BadToken, Codec, Keyring
    from satchel.server_mode import SessionCarriers

    k1, k2 = generate_key("k1"), generate_key("k2")
    session_id = bytes(range(16))
    carrier = SessionCarriers(Codec(Keyring([k2, k1]))).sign(session_id)
    with pytest.raises(BadToken) as refused:
        SessionCarriers(Codec(Keyring([k1]))).session_id_of(carrier)
    assert refused.value.code == "token_bad_signature"
    assert SessionCarriers(Codec(Keyring([k1, k2]))).session_id_of(carrier) == session_id


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_read_stream_that_waited_out_a_failed_stream_saves_its_reply(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """A GET stream (an EventSource) loaded the state while another stream held it, so
    it was let through as a read; that stream then failed without saving, and the GET
    stream took the claim and streamed its whole reply, only to be refused
    context_busy at its save: the flag it loaded with was never cleared."""
    app, satchel = _stream_app(mode, request)
    failing, loaded, go = threading.Event(), threading.Event(), threading.Event()
    released = threading.Event()

    @app.post("/stream")
    def post_stream() -> Any:
        ctx = satchel.context

        def deltas() -> Any:
            yield "first "
            if failing.is_set():
                go.wait(5)
                raise RuntimeError("the model failed")
            yield "reply"

        return satchel.stream(deltas(), on_complete=lambda t: ctx.add_turn("assistant", t))

    @app.get("/events")
    def get_stream() -> Any:
        ctx = satchel.context
        loaded.set()
        # The other stream fails and releases its claim meanwhile (waited for: a claim
        # taken a moment before that release is context_busy, a race on a busy host).
        released.wait(5)
        return satchel.stream(iter(["read"]), on_complete=lambda t: ctx.add_turn("assistant", t))

    client = app.test_client()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    failing.set()
    streaming, chunks = held_stream(client, {HEADER: carrier}, "first")  # holds the claim
    reading = start_in_thread(
        lambda: app.test_client().get("/events", headers={HEADER: carrier}, buffered=True)
    )
    assert loaded.wait(5)
    go.set()
    failed = "".join(c.decode() for c in chunks)
    streaming.close()
    released.set()
    assert "event: error" in failed  # no save: the state is as the GET stream loaded it
    body = reading().get_data(as_text=True)
    assert "event: satchel" in body and "event: error" not in body, body


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_a_session_erased_while_its_reply_streams_says_erased(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """The stream's save found the stored state gone and said it had expired or been
    evicted ("send the message again to start over"): it was erased, which is 410
    token_erased, as every later request with the carrier is told."""
    app, satchel = _stream_app(mode, request)
    gate = _gated_stream(app, satchel)
    client = app.test_client()
    gate.set()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    gate.clear()
    streaming, chunks = held_stream(client, {HEADER: carrier}, "the paid")
    with app.app_context():
        satchel.erase(satchel.pipeline.session_id_of(carrier))
    gate.set()
    body = "".join(c.decode() for c in chunks)
    streaming.close()
    assert "event: error" in body and "token_erased" in body, body
    assert client.post("/stream", headers={HEADER: carrier}).status_code == 410


@pytest.mark.parametrize("mode", ["memory", pytest.param("server", marks=pytest.mark.redis)])
def test_the_next_message_may_go_as_soon_as_the_final_event_arrives(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """The claim was released only when the server asked the finished generator for
    more, after the done event: a client that sent its next message on the final event
    (the browser client frees its lock there) met 409 context_busy in about one round
    of five, and waited a Retry-After second. The save is done before that event goes
    out: the claim goes with it."""
    app, satchel = _stream_app(mode, request)

    @app.post("/stream")
    def stream_view() -> Any:
        ctx = satchel.context
        return satchel.stream(
            iter(["a reply"]), on_complete=lambda text: ctx.add_turn("assistant", text)
        )

    client = app.test_client()
    carrier = token_in(client.post("/stream").get_data(as_text=True))
    for _ in range(3):
        streaming = client.post("/stream", headers={HEADER: carrier}, buffered=False)
        chunks = iter(streaming.response)
        seen = ""
        while "event: satchel" not in seen:  # the final event; the stream is not over
            seen += next(chunks).decode()
        carrier = token_in(seen)
        following = app.test_client().post("/stream", headers={HEADER: carrier})
        assert following.status_code == 200, following.get_data(as_text=True)
        carrier = token_in(following.get_data(as_text=True))
        streaming.close()


def test_a_context_stored_under_another_sessions_key_is_refused_not_served() -> None:
    """Whoever can write the store (no key needed) copied Alice's sealed context over
    the key Mallory's carrier names: Mallory's request opened it, served Alice's turns,
    and its save wrote into Alice's key and handed Mallory Alice's carrier. Refused, as
    an overflow segment of another session is."""
    from satchel.codec import Codec
    from satchel.errors import InvalidContext
    from satchel.keys import Keyring
    from satchel.server_mode import ServerSidePipeline
    from satchel.tiers import GuardedTier, MemoryTier

    raw = MemoryTier()
    pipe = ServerSidePipeline(Codec(Keyring.generate("k1")), store=GuardedTier(raw))
    alice = pipe.load(None)
    alice.add_turn("user", "my account number is 1234-5678")
    carrier_alice = pipe.save(alice).token
    mallory = pipe.load(None)
    mallory.add_turn("user", "hi")
    carrier_mallory = pipe.save(mallory).token
    assert carrier_alice and carrier_mallory
    key_alice = pipe.key_for(pipe.session_id_of(carrier_alice))
    key_mallory = pipe.key_for(pipe.session_id_of(carrier_mallory))
    raw.put(key_mallory, raw.get_many([key_alice])[0] or b"", 3600)
    with pytest.raises(InvalidContext, match="another session"):
        pipe.load(carrier_mallory)
    assert [t.content for t in pipe.load(carrier_alice).turns] == ["my account number is 1234-5678"]
