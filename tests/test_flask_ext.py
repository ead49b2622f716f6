"""The Flask extension through Flask's test client: carriers, errors, resets, timing, SSE."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from examples.minimal_chat import app as minimal
from satchel import Codec, Context, Key, Keyring, Satchel, ToolCall, peek, serialize
from satchel.flask_ext import HEADER_CONTEXT

NOW = int(time.time())
K1 = Key("k1", bytes(range(32)))
K2 = Key("k2", bytes(range(32, 64)))
ERROR_CODES = {
    "token_malformed",
    "token_bad_signature",
    "token_unknown_key",
    "token_wrong_mode",
    "token_expired",
    "token_too_large",
    "token_unsupported_version",
    "token_invalid_context",
    "token_migration_failed",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example reads SATCHEL_* from the environment: tests start from none."""
    for key in (*minimal.ENV_KEYS, "SATCHEL_BASELINE"):
        monkeypatch.delenv(key, raising=False)


def make_app(ring: Keyring | None = None, **config: Any) -> Flask:
    settings = {"SATCHEL_KEYS": (ring or Keyring([K1])).to_string(), "TESTING": True}
    settings.update(config)
    return minimal.create_app(settings)


def codec_of(app: Flask) -> Codec:
    return Satchel.state(app).codec


def chat(client: Any, message: str, token: str | None = None, **kwargs: Any) -> Any:
    headers = {HEADER_CONTEXT: token} if token else {}
    return client.post("/api/chat", json={"message": message}, headers=headers, **kwargs)


def assert_json_error(response: Any, code: str | None = None) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, response.data
    body = response.get_json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code
    assert HEADER_CONTEXT not in response.headers  # a refused token is not replaced
    return body["error"]


# -- the round trip ------------------------------------------------------------------------


def test_chat_round_trip_over_many_turns() -> None:
    app = make_app()
    client = app.test_client()
    token = None
    for i in range(12):
        response = chat(client, f"message {i}", token)
        assert response.status_code == 200
        assert response.get_json()["reply"].startswith(f"(turn {i + 1})")
        assert response.headers["Satchel-Seq"] == str(i + 1)
        token = response.headers[HEADER_CONTEXT]
        assert "Satchel-Context" in response.headers["Access-Control-Expose-Headers"]
    ctx = codec_of(app).open(token)
    assert ctx.seq == 12
    assert [t.content for t in ctx.turns if t.role == "user"][-1] == "message 11"
    assert len({chat(client, "x", token).headers["Satchel-Session"] for _ in range(2)}) == 1


def test_server_timing_reports_each_step() -> None:
    client = make_app().test_client()
    first = chat(client, "hi")
    timing = first.headers["Server-Timing"]
    for step in ("trim", "seal", "satchel"):
        assert f"{step};dur=" in timing
    second = chat(client, "again", first.headers[HEADER_CONTEXT])
    for step in ("open", "verify", "decompress", "unpack", "migrate", "seal", "satchel"):
        assert f"{step};dur=" in second.headers["Server-Timing"]
    assert "Server-Timing" in second.headers["Access-Control-Expose-Headers"]


def test_context_route_shows_turns_summary_pinned_and_lifecycle() -> None:
    app = make_app(SATCHEL_MAX_TOKEN_BYTES=1500)
    client = app.test_client()
    # Pinned items are set by the app; mint a token with them through the app's codec.
    seed = Context.new()
    seed.pinned.system = "You are a pirate."
    seed.pinned.facts = ["The user likes parrots."]
    token = codec_of(app).seal(seed)
    for i in range(20):
        noise = hashlib.sha256(str(i).encode()).hexdigest()  # the dictionary loves chat
        response = chat(client, f"Tell me about topic number {i}: {noise}", token)
        assert response.status_code == 200
        token = response.headers[HEADER_CONTEXT]
        assert len(token) <= 1500
    data = client.get("/api/context", headers={HEADER_CONTEXT: token}).get_json()
    assert data["pinned"] == {"system": "You are a pirate.", "facts": ["The user likes parrots."]}
    assert data["summary"].startswith("(")
    assert data["lifecycle"]["dropped"]["byte_budget"] > 0
    assert data["lifecycle"]["recent"][-1]["policy"] == "byte_budget"
    assert data["turns"][-1]["role"] == "assistant"
    assert data["turns"][-2]["content"].startswith("Tell me about topic number 19")
    assert data["seq"] == 21
    assert data["schema_version"] == 2


# -- bad tokens ----------------------------------------------------------------------------


def _bad_tokens(app: Flask) -> Iterator[tuple[str, str, str]]:
    codec = codec_of(app)
    good = codec.seal(Context.new())
    yield "garbage", "not a token", "token_malformed"
    yield "tampered", good[:40] + ("A" if good[40] != "A" else "B") + good[41:], ""
    yield "truncated", good[:-5], ""
    yield "future format", "s9." + good[3:], "token_unsupported_version"
    yield "too large", "s1." + "A" * 70_000, "token_too_large"
    yield (
        "other key",
        Codec(Keyring([Key("k1", b"z" * 32)])).seal(Context.new()),
        "token_bad_signature",
    )
    yield (
        "other purpose",
        Codec(Keyring([K1]), purpose="other-app").seal(Context.new()),
        "token_bad_signature",
    )
    yield "unknown kid", Codec(Keyring([K2])).seal(Context.new()), "token_unknown_key"
    yield "signed", Codec(Keyring([K1]), "signed").seal(Context.new()), "token_wrong_mode"
    yield (
        "chacha",
        Codec(Keyring([K1]), algorithm="chacha20-poly1305").seal(Context.new()),
        "token_wrong_mode",
    )
    past = Codec(Keyring([K1]), clock=lambda: NOW - 10 * 86400, ttl=3600)
    yield "expired", past.seal(Context.new(now=NOW - 10 * 86400)), "token_expired"
    future = serialize.pack({"v": 99, "i": b"\x00" * 16, "q": 1, "c": NOW, "a": NOW, "t": []})
    yield "future schema", codec.seal_payload(future)[0], "token_unsupported_version"
    yield "not msgpack", codec.seal_payload(b"\xc1\xc1\xc1")[0], "token_invalid_context"
    broken_v1 = serialize.pack({"version": 1, "turns": []})
    yield "broken v1", codec.seal_payload(broken_v1)[0], "token_migration_failed"


def test_bad_tokens_are_json_4xx_never_500() -> None:
    app = make_app()
    client = app.test_client()
    cases = list(_bad_tokens(app))
    assert len(cases) >= 14
    for label, token, code in cases:
        for response in (
            client.get("/api/context", headers={HEADER_CONTEXT: token}),
            chat(client, "hello", token),
        ):
            error = assert_json_error(response, code or None)
            assert error["code"] in ERROR_CODES, label
            assert response.headers["Cache-Control"] == "no-store"
            if code == "token_too_large":
                assert response.status_code == 413
            elif code == "token_expired":
                assert response.status_code == 401
            else:
                assert response.status_code == 400


def test_a_ten_megabyte_token_is_refused_quickly() -> None:
    client = make_app().test_client()
    huge = "s1." + "A" * (10 * 1024 * 1024)
    t0 = time.perf_counter()
    response = client.get("/api/context", headers={HEADER_CONTEXT: huge})
    assert time.perf_counter() - t0 < 1.0
    assert_json_error(response, "token_too_large")
    assert response.status_code == 413


def test_fresh_mode_starts_over_and_says_why() -> None:
    app = make_app(SATCHEL_ON_BAD_TOKEN="fresh")
    client = app.test_client()
    for label, token, code in _bad_tokens(app):
        response = chat(client, "hello", token)
        assert response.status_code == 200, label
        reset = response.headers["Satchel-Reset"]
        assert reset in ERROR_CODES and (not code or reset == code), label
        assert "Satchel-Reset" in response.headers["Access-Control-Expose-Headers"]
        fresh = codec_of(app).open(response.headers[HEADER_CONTEXT])
        assert fresh.seq == 1 and [t.role for t in fresh.turns] == ["user", "assistant"]
    ok = chat(client, "fine", chat(client, "hi").headers[HEADER_CONTEXT])
    assert "Satchel-Reset" not in ok.headers


@pytest.mark.parametrize("commit", [True, False], ids=["commit-in-view", "save-after-view"])
def test_a_failed_save_still_says_what_ran_and_what_opening_found(commit: bool) -> None:
    # Whether the save fails in the view (commit) or after it, the error response has
    # the same headers: the steps that ran, and the fresh start opening made.
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), SATCHEL_ON_BAD_TOKEN="fresh")
    satchel = Satchel(app)

    @app.post("/chat")
    def view() -> Any:
        satchel.context.add_turn("user", "hi")
        satchel.context.pinned.system = os.urandom(9000).hex()  # over the hard cap
        if commit:
            satchel.commit()
        return {}

    response = app.test_client().post("/chat", headers={HEADER_CONTEXT: "s1.garbage"})
    assert_json_error(response, "budget_exceeded")
    assert response.headers["Satchel-Reset"] == "token_malformed"
    steps = [part.split(";")[0] for part in response.headers["Server-Timing"].split(", ")]
    assert {"trim", "satchel"} <= set(steps)
    assert HEADER_CONTEXT not in response.headers


def test_invalid_requests_are_json_400() -> None:
    client = make_app().test_client()
    for body in ({}, {"message": ""}, {"message": 5}, {"message": "x" * 9000}):
        assert_json_error(client.post("/api/chat", json=body), "invalid_request")
    response = client.post("/api/chat", data="{not json", content_type="application/json")
    assert_json_error(response)
    assert_json_error(client.get("/api/nope"), "not_found")
    assert_json_error(client.get("/api"), "not_found")  # the prefix without its slash
    assert client.get("/apix").mimetype == "text/html"  # not the API's: werkzeug's page
    # A body far beyond any message is refused before it is read: a JSON 413.
    huge = json.dumps({"message": "x" * (minimal.MAX_BODY_BYTES + 1)})
    response = client.post("/api/chat", data=huge, content_type="application/json")
    assert response.status_code == 413
    assert_json_error(response, "request_entity_too_large")


def test_http_error_codes_do_not_follow_werkzeugs_reason_phrases() -> None:
    """The codes of werkzeug's errors are part of the HTTP contract: they were made
    from the reason phrase, so a werkzeug that renamed 413 "Content Too Large" (RFC
    9110's name) would have changed a documented code. A status the table does not
    name (an app's own HTTPException) still gets a code from its name."""
    from flask import Flask
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    from satchel.flask_ext import json_errors_for

    class ContentTooLarge(RequestEntityTooLarge):
        name = "Content Too Large"

    class ClientClosed(HTTPException):
        code = 499
        name = "Client Closed Request"

    app = Flask(__name__)
    json_errors_for(app, "/api/")

    @app.post("/api/upload")
    def upload() -> None:
        raise ContentTooLarge()

    @app.get("/api/gone")
    def gone() -> None:
        raise ClientClosed()

    client = app.test_client()
    response = client.post("/api/upload")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"
    assert client.get("/api/gone").get_json()["error"]["code"] == "client_closed_request"


@pytest.mark.parametrize("cookie", [False, True])
def test_a_response_made_from_a_token_without_a_new_one_varies_on_it(cookie: bool) -> None:
    """GET /api/context (discard(): no new token) answered one user's conversation with
    neither Vary nor Cache-Control: a cache keyed on the URL could serve it to anyone.
    The extension says what the response depends on; the example says no-store."""
    app = make_app(**({"SATCHEL_COOKIE": "satchel"} if cookie else {}))
    client = app.test_client()
    token = chat(client, "my private question").headers[HEADER_CONTEXT]
    response = client.get("/api/context", headers={HEADER_CONTEXT: token})
    assert response.status_code == 200 and "my private question" in response.get_data(as_text=True)
    assert HEADER_CONTEXT not in response.headers
    expected = {HEADER_CONTEXT, "Cookie"} if cookie else {HEADER_CONTEXT}
    assert set(response.vary) == expected
    assert response.cache_control.no_store


def test_add_vary_merges_every_vary_header_and_adds_nothing_for_no_names() -> None:
    from flask import Response

    from satchel.flask_ext.vary import add_vary

    response = Response()
    add_vary(response)  # an error replacing a response with no Vary: none, not "Vary: "
    assert "Vary" not in response.headers
    add_vary(response, "Satchel-Context", "Cookie", "Satchel-Context")
    assert response.headers.getlist("Vary") == ["Satchel-Context, Cookie"]
    response.headers.add("Vary", "origin, ")
    add_vary(response, "Origin", "Accept-Language")
    assert response.headers.getlist("Vary") == ["Satchel-Context, Cookie, origin, Accept-Language"]
    response.headers["Vary"] = "*"
    add_vary(response, "Cookie")
    assert response.headers.getlist("Vary") == ["*"]


@pytest.mark.parametrize("path", ["/read", "/write"])
def test_vary_keeps_every_name_of_every_vary_header(path: str) -> None:
    """werkzeug's response.vary reads only the first Vary header: adding Satchel's
    through it dropped a CORS hook's second one (Vary: Origin), so a cache could serve
    one origin's answer to another."""
    app = Flask("vary")
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), TESTING=True)
    satchel = Satchel(app)

    @app.get("/read")
    def read() -> Any:
        satchel.context  # noqa: B018 - opened, nothing issued
        satchel.discard()
        return {"ok": True}, {"Vary": "Accept-Language"}

    @app.get("/write")
    def write() -> Any:
        satchel.context.add_turn("user", "hi")
        return {"ok": True}, {"Vary": "Accept-Language"}

    @app.after_request  # registered after Satchel's hook: Flask runs it first
    def cors(response: Any) -> Any:
        response.headers.add("Vary", "Origin")
        return response

    response = app.test_client().get(path)
    assert response.status_code == 200
    names = [n.strip() for v in response.headers.getlist("Vary") for n in v.split(",")]
    assert sorted(names) == sorted(["Accept-Language", "Origin", HEADER_CONTEXT])


def test_unpaired_surrogate_is_a_json_400_even_in_a_view_that_does_not_check() -> None:
    """JSON may carry "\\ud800" (half an emoji); a view written like the README's
    quickstart, which hands the message straight to add_turn, answers 400, not 500."""
    app = Flask("quickstart")
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), TESTING=True)
    satchel = Satchel(app)

    @app.post("/api/chat")
    def chat_view() -> Any:
        from flask import request

        satchel.context.add_turn("user", request.json["message"])  # type: ignore[index]
        return {"ok": True}

    client = app.test_client()
    body = '{"message": "half an emoji: \\ud83d"}'
    response = client.post("/api/chat", data=body, content_type="application/json")
    error = assert_json_error(response, "invalid_text")
    assert "unpaired surrogate" in error["message"] and response.status_code == 400
    whole = '{"message": "a whole emoji: \\ud83d\\ude00"}'
    response = client.post("/api/chat", data=whole, content_type="application/json")
    assert response.status_code == 200 and HEADER_CONTEXT in response.headers


@pytest.mark.parametrize(
    ("tool_input", "code"),
    [
        ('{"q": "cut \\ud83d"}', "invalid_text"),
        ('{"id": 123456789012345678901234567890}', "invalid_value"),
        ('{"q": "fine", "n": 3, "f": 1.5, "b": true, "z": null, "l": [1, "\\u00e9"]}', None),
    ],
)
def test_tool_arguments_from_a_request_body_are_checked_where_they_enter(
    tool_input: str, code: str | None
) -> None:
    """Anthropic's tool_use input is a map; a view that records it from the request body
    took an unpaired surrogate or an integer past 64 bits in it, and the request then
    failed at seal with a 500 context_not_serializable. Refused as the same text in a
    str argument is: a JSON 400."""
    app = Flask("tools")
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), TESTING=True)
    satchel = Satchel(app)

    @app.post("/api/tool")
    def tool_view() -> Any:
        from flask import request

        block = request.json["tool_use"]  # type: ignore[index]
        call = ToolCall(block["id"], block["name"], block["input"])
        satchel.context.add_turn("assistant", "", tool_calls=[call])
        return {"ok": True}

    body = '{"tool_use": {"id": "toolu_1", "name": "search", "input": ' + tool_input + "}}"
    response = app.test_client().post("/api/tool", data=body, content_type="application/json")
    if code is None:
        assert response.status_code == 200 and HEADER_CONTEXT in response.headers
        with app.app_context():
            opened = satchel.codec.open(response.headers[HEADER_CONTEXT])
        assert opened.turns[0].tool_calls[0].arguments == json.loads(tool_input)
    else:
        assert response.status_code == 400
        assert_json_error(response, code)


# -- rotation ------------------------------------------------------------------------------


def test_tokens_under_an_older_key_are_resealed_under_the_newest() -> None:
    old_app = make_app(Keyring([K1]))
    token = chat(old_app.test_client(), "before rotation").headers[HEADER_CONTEXT]
    assert peek(token).kid == "k1"
    new_app = make_app(Keyring([K2, K1]))
    response = chat(new_app.test_client(), "after rotation", token)
    assert response.status_code == 200
    resealed = response.headers[HEADER_CONTEXT]
    assert peek(resealed).kid == "k2"
    ctx = codec_of(new_app).open(resealed)
    assert [t.content for t in ctx.turns if t.role == "user"] == [
        "before rotation",
        "after rotation",
    ]
    # Once k1 is retired, only the resealed token still works.
    retired = make_app(Keyring([K2])).test_client()
    assert chat(retired, "x", resealed).status_code == 200
    assert_json_error(chat(retired, "x", token), "token_unknown_key")


# -- carriers ------------------------------------------------------------------------------


def test_cookie_carrier() -> None:
    app = make_app(SATCHEL_COOKIE="satchel")
    client = app.test_client()
    first = chat(client, "cookie one", base_url="https://chat.example")
    (set_cookie,) = first.headers.getlist("Set-Cookie")
    assert set_cookie.startswith("satchel=" + first.headers[HEADER_CONTEXT])
    for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in set_cookie
    second = chat(client, "cookie two", base_url="https://chat.example")  # no header sent
    assert second.get_json()["turns"] == 4
    data = client.get("/api/context", base_url="https://chat.example").get_json()
    assert [t["content"] for t in data["turns"] if t["role"] == "user"] == [
        "cookie one",
        "cookie two",
    ]
    # The header wins over the cookie.
    other = chat(app.test_client(), "other").headers[HEADER_CONTEXT]
    data = client.get(
        "/api/context", base_url="https://chat.example", headers={HEADER_CONTEXT: other}
    ).get_json()
    assert [t["content"] for t in data["turns"] if t["role"] == "user"] == ["other"]


def test_json_field_carrier() -> None:
    app = make_app(SATCHEL_JSON_FIELD="satchel")
    client = app.test_client()
    token = chat(client, "first").headers[HEADER_CONTEXT]
    response = client.post("/api/chat", json={"message": "second", "satchel": token})
    assert response.status_code == 200 and response.get_json()["turns"] == 4
    bad = client.post("/api/chat", json={"message": "x", "satchel": token[:-3]})
    assert_json_error(bad)
    # Not a string: refused, not taken for "no token" (that would restart the
    # conversation without a word); null is a new conversation.
    wrong_type = client.post("/api/chat", json={"message": "x", "satchel": 123})
    assert wrong_type.status_code == 400
    assert_json_error(wrong_type, "token_malformed")
    assert "must hold the token as a string" in wrong_type.get_json()["error"]["message"]
    fresh = client.post("/api/chat", json={"message": "x", "satchel": None})
    assert fresh.get_json()["turns"] == 2
    forgiving = make_app(SATCHEL_JSON_FIELD="satchel", SATCHEL_ON_BAD_TOKEN="fresh")
    reset = forgiving.test_client().post("/api/chat", json={"message": "x", "satchel": [1]})
    assert reset.status_code == 200 and reset.headers["Satchel-Reset"] == "token_malformed"
    # Without the setting the body field is not read.
    plain = make_app().test_client()
    response = plain.post("/api/chat", json={"message": "x", "satchel": token})
    assert response.get_json()["turns"] == 2


# -- streaming -----------------------------------------------------------------------------


def stream_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), **config)
    satchel = Satchel(app)

    @app.post("/api/stream")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", "tell me a story")

        def deltas() -> Iterator[str]:
            yield from ("Once ", "upon ", "", "a time.")

        def complete(text: str) -> None:
            ctx.add_turn("assistant", text)

        return satchel.stream(deltas(), on_complete=complete, protocol=app.config["PROTOCOL"])

    return app


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = fields["data"]
        events.append(
            (fields.get("event", "message"), None if data == "[DONE]" else json.loads(data))
        )
    return events


def test_stream_sends_deltas_then_a_token_holding_the_streamed_turn() -> None:
    app = stream_app(PROTOCOL="satchel")
    client = app.test_client()
    response = client.post("/api/stream")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    assert HEADER_CONTEXT not in response.headers  # the token travels in the stream
    events = parse_sse(response.get_data(as_text=True))
    names = [name for name, _ in events]
    assert names == ["delta", "delta", "delta", "satchel", "done"]
    assert [data["text"] for name, data in events if name == "delta"] == [
        "Once ",
        "upon ",
        "a time.",
    ]
    meta = events[3][1]
    assert meta["seq"] == 1 and "seal;dur=" in meta["timing"]
    ctx = codec_of(app).open(meta["token"])
    assert [(t.role, t.content) for t in ctx.turns] == [
        ("user", "tell me a story"),
        ("assistant", "Once upon a time."),
    ]
    # The streamed token carries on like any other.
    again = parse_sse(
        client.post("/api/stream", headers={HEADER_CONTEXT: meta["token"]}).get_data(as_text=True)
    )
    assert len(codec_of(app).open(again[-2][1]["token"]).turns) == 4


def test_a_stream_response_header_names_the_steps_that_ran_before_it() -> None:
    """Server-Timing on every response, so dev tools show the steps: a stream's said only
    the total, although opening the token had run (and was timed) before its headers."""
    app = stream_app(PROTOCOL="satchel")
    client = app.test_client()
    first = client.post("/api/stream")
    token = parse_sse(first.get_data(as_text=True))[-2][1]["token"]
    assert first.headers["Server-Timing"].startswith("satchel;dur=")  # nothing opened
    timing = client.post("/api/stream", headers={HEADER_CONTEXT: token}).headers["Server-Timing"]
    steps = [part.split(";")[0] for part in timing.split(", ")]
    assert steps[-1] == "satchel"
    assert {"open", "verify", "decompress", "unpack", "migrate"} <= set(steps)
    assert "seal" not in steps  # sealed after the reply: in the final event's timing


def test_a_refused_token_s_response_names_the_steps_that_ran_and_one_total() -> None:
    """A 400 for a tampered token carried only "app;dur=...", although opening it had
    run; and the total was "app" there and "satchel" on every other response."""
    app = stream_app(PROTOCOL="satchel")
    client = app.test_client()
    token = parse_sse(client.post("/api/stream").get_data(as_text=True))[-2][1]["token"]
    i = len(token) // 2
    tampered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    refused = client.post("/api/stream", headers={HEADER_CONTEXT: tampered})
    assert refused.status_code == 400
    steps = [part.split(";")[0] for part in refused.headers["Server-Timing"].split(", ")]
    assert steps == ["open", "satchel"]


def test_stream_ai_sdk_protocol_carries_the_token_in_a_data_part() -> None:
    app = stream_app(PROTOCOL="ai-sdk")
    response = app.test_client().post("/api/stream")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    chunks = [data for _, data in parse_sse(response.get_data(as_text=True))]
    assert chunks[-1] is None  # [DONE]
    deltas = [c["delta"] for c in chunks if c and c["type"] == "text-delta"]
    assert "".join(deltas) == "Once upon a time."
    (part,) = [c for c in chunks if c and c["type"] == "data-satchel"]
    assert part["transient"] is True
    assert codec_of(app).open(part["data"]["token"]).turns[-1].content == "Once upon a time."


def test_stream_with_a_bad_token_is_a_json_error_before_streaming() -> None:
    client = stream_app(PROTOCOL="satchel").test_client()
    assert_json_error(client.post("/api/stream", headers={HEADER_CONTEXT: "junk"}))


# -- keys ----------------------------------------------------------------------------------


def test_without_keys_a_dev_key_file_is_created_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "instance" / "satchel-dev-key"
    with caplog.at_level(logging.WARNING, logger="satchel"):
        app = minimal.create_app({"SATCHEL_DEV_KEY_FILE": str(key_file), "TESTING": True})
    assert key_file.exists()
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SATCHEL_KEYS is not set" in r.getMessage() for r in warnings)
    (kid,) = Keyring.from_string(key_file.read_text().strip()).kids
    # Each dev key has a kid of its own: after the file is deleted, an old token is
    # token_unknown_key (a lost key), not token_bad_signature (tampering).
    assert re.fullmatch(r"dev-[0-9a-f]{6}", kid)
    secret_b64 = key_file.read_text().strip().split(":", 1)[1]
    assert all(secret_b64 not in r.getMessage() for r in caplog.records)  # no key in logs
    token = chat(app.test_client(), "hi").headers[HEADER_CONTEXT]
    # The next start reuses the file (tokens survive restarts), and warns again: an app
    # restarted or redeployed without SATCHEL_KEYS still runs on the development key.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="satchel"):
        again = minimal.create_app({"SATCHEL_DEV_KEY_FILE": str(key_file), "TESTING": True})
    (warning,) = [r for r in caplog.records if "SATCHEL_KEYS is not set" in r.getMessage()]
    assert "made by an earlier start" in warning.getMessage()
    assert secret_b64 not in warning.getMessage()
    assert chat(again.test_client(), "again", token).get_json()["turns"] == 4


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"dev-1:c2hvcnQ", b"\xff\xfe not text"],
    ids=["empty", "garbage", "short key", "not UTF-8"],
)
def test_a_damaged_dev_key_file_is_named_with_the_way_out(tmp_path: Path, content: bytes) -> None:
    """ "the key ring is empty" about a ring the user never configured, or a
    UnicodeDecodeError traceback."""
    from satchel.errors import ConfigurationError

    key_file = tmp_path / "satchel-dev-key"
    key_file.write_bytes(content)
    with pytest.raises(ConfigurationError) as info:
        minimal.create_app({"SATCHEL_DEV_KEY_FILE": str(key_file), "TESTING": True})
    assert f"SATCHEL_DEV_KEY_FILE={str(key_file)!r}" in info.value.message
    assert "delete it" in info.value.message


def test_workers_starting_at_once_share_one_dev_key(tmp_path: Path) -> None:
    """gunicorn -w N starts its workers together: each creates the dev key file if it
    is missing, and all of them must end up with the one key in the file (else a token
    sealed by one worker is token_unknown_key at the next). Processes, released by one
    barrier, race for real."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(4):  # a lost race is likely, not certain, in any one start
        key_file = tmp_path / f"instance{attempt}" / "satchel-dev-key"
        barrier = ctx.Barrier(8)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_dev_key_worker, args=(key_file, barrier, results)) for _ in range(8)
        ]
        for p in procs:
            p.start()
        kids = {results.get(timeout=30) for _ in procs}
        for p in procs:
            p.join(timeout=30)
        assert kids == set(Keyring.from_string(key_file.read_text().strip()).kids)
        assert len(kids) == 1
        assert [p.name for p in key_file.parent.iterdir()] == ["satchel-dev-key"]


def _dev_key_worker(key_file: Path, barrier: Any, results: Any) -> None:
    from satchel.flask_ext.config import dev_keyring

    barrier.wait(timeout=30)
    results.put(dev_keyring(key_file).current.kid)


@pytest.mark.parametrize(
    "mistake",
    [
        {"tags": {"a", "b"}},  # a set: msgpack cannot carry it
        {"by_id": {7: "seven"}},  # packs, but an int map key is refused on open
    ],
    ids=["set", "int key"],
)
def test_unserializable_metadata_is_a_json_error_not_a_crash(
    mistake: dict[str, Any], caplog: Any
) -> None:
    """Both are refused when sealing. The int key used to be sealed into a token that
    every next request refused: the app's mistake broke the user's conversation. The
    details (the app's field names) go to the log, not to whoever sent the request."""
    from satchel.flask_ext.errors import INTERNAL_MESSAGE

    app = make_app()

    @app.post("/api/bad")
    def bad() -> dict[str, str]:
        satchel = app.extensions["satchel"].extension
        satchel.context.metadata.update(mistake)
        return {"ok": "yes"}

    with caplog.at_level(logging.ERROR, logger="satchel"):
        response = app.test_client().post("/api/bad")
    assert response.status_code == 500
    assert response.get_json()["error"] == {
        "code": "context_not_serializable",
        "message": INTERNAL_MESSAGE,
    }
    assert HEADER_CONTEXT not in response.headers
    assert "metadata[" in caplog.text and "context_not_serializable" in caplog.text


def test_a_committed_token_goes_out_even_when_the_view_then_fails() -> None:
    app = make_app()
    ext = app.extensions["satchel"].extension

    @app.post("/api/commit-then-fail")
    def commit_then_fail() -> tuple[dict[str, str], int]:
        ext.context.add_turn("user", "kept")
        ext.commit()  # sealed: the client must get this token, or it holds a stale one
        return {"error": "later failure"}, 422

    @app.post("/api/fail")
    def fail() -> tuple[dict[str, str], int]:
        ext.context.add_turn("user", "not kept")
        return {"error": "failure"}, 422

    client = app.test_client()
    committed = client.post("/api/commit-then-fail")
    assert committed.status_code == 422
    with app.app_context():
        assert ext.codec.open(committed.headers[HEADER_CONTEXT]).turns[-1].content == "kept"
    failed = client.post("/api/fail")
    assert failed.status_code == 422 and HEADER_CONTEXT not in failed.headers


# -- the hard cap agrees with the budget and with what carries the token ------------------


def policy_of(app: Flask) -> Any:
    return Satchel.state(app).pipeline.policy


def test_the_hard_cap_defaults_to_what_8_kb_header_limits_accept() -> None:
    policy = policy_of(make_app())
    assert (policy.max_token_bytes, policy.hard_max_token_bytes) == (3800, 8000)


def test_a_larger_budget_raises_an_unset_hard_cap_with_it() -> None:
    policy = policy_of(make_app(SATCHEL_MAX_TOKEN_BYTES=20000))
    assert (policy.max_token_bytes, policy.hard_max_token_bytes) == (20000, 20000)


def test_a_budget_over_an_explicit_hard_cap_is_a_configuration_error() -> None:
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SATCHEL_HARD_MAX_TOKEN_BYTES"):
        make_app(SATCHEL_MAX_TOKEN_BYTES=9000, SATCHEL_HARD_MAX_TOKEN_BYTES=8000)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SATCHEL_MAX_TOKEN_BYTES": "abc"}, "SATCHEL_MAX_TOKEN_BYTES must be an integer"),
        ({"SATCHEL_TIER_READ_TIMEOUT": "fast"}, "SATCHEL_TIER_READ_TIMEOUT must be a number"),
        ({"SATCHEL_TOKEN_LIMIT": "64k"}, "SATCHEL_TOKEN_LIMIT must be an integer"),
        ({"SATCHEL_MAX_TURNS": -1}, "SATCHEL_MAX_TURNS .* must be 0 or more"),
        ({"SATCHEL_IDLE_TTL": 0}, "SATCHEL_IDLE_TTL .* must be positive"),
        ({"SATCHEL_MAX_AGE": "-5"}, "SATCHEL_MAX_AGE .* must be positive"),
        ({"SATCHEL_HARD_MAX_TOKEN_BYTES": 0}, "SATCHEL_HARD_MAX_TOKEN_BYTES .* must be positive"),
        ({"SATCHEL_SEGMENT_GRACE": "-1"}, "SATCHEL_SEGMENT_GRACE must be a finite number"),
        ({"SATCHEL_SEGMENT_GRACE": "nan"}, "SATCHEL_SEGMENT_GRACE must be a finite number"),
        ({"SATCHEL_SEGMENT_GRACE": "inf"}, "SATCHEL_SEGMENT_GRACE must be a finite number"),
        # Each of these started, then failed every request: a 413 blaming the context,
        # a 500 from werkzeug's cookie code, an HTML 500 from gunicorn, a token read
        # from Content-Type; or failed at start naming no key.
        ({"SATCHEL_TOKEN_LIMIT": "100"}, "SATCHEL_TOKEN_LIMIT must be at least 1024"),
        (
            {"SATCHEL_TOKEN_LIMIT": "4000", "SATCHEL_HARD_MAX_TOKEN_BYTES": "8000"},
            r"SATCHEL_TOKEN_LIMIT \(4000\) is below",
        ),
        ({"SATCHEL_COOKIE": "sc", "SATCHEL_COOKIE_SAMESITE": "bogus"}, "SATCHEL_COOKIE_SAMESITE"),
        ({"SATCHEL_COOKIE": "s" * 500}, "SATCHEL_COOKIE must be a cookie name"),
        ({"SATCHEL_COOKIE": "my cookie"}, "SATCHEL_COOKIE must be a cookie name"),
        ({"SATCHEL_HEADER": "Bad Header"}, "SATCHEL_HEADER must be an HTTP header name"),
        ({"SATCHEL_HEADER": ""}, "SATCHEL_HEADER must be an HTTP header name"),
        ({"SATCHEL_HEADER": "X-Ctx\r\nEvil: 1"}, "SATCHEL_HEADER must be an HTTP header name"),
        ({"SATCHEL_HEADER": "content-type"}, "is a header with a meaning of its own"),
        # fetch() never sends these: every request would start a new conversation.
        ({"SATCHEL_HEADER": "Sec-Satchel"}, "is a header with a meaning of its own"),
        ({"SATCHEL_HEADER": "Via"}, "is a header with a meaning of its own"),
        ({"SATCHEL_HEADER": "Accept-Charset"}, "is a header with a meaning of its own"),
        ({"SATCHEL_HEADER": "Proxy-Token"}, "is a header with a meaning of its own"),
        # Proxies append to these: the token would arrive as "tok, 1.1 proxy".
        ({"SATCHEL_HEADER": "X-Forwarded-For"}, "is a header with a meaning of its own"),
        ({"SATCHEL_HEADER": "If-None-Match"}, "is a header with a meaning of its own"),
        ({"SATCHEL_AEAD": "bogus"}, "SATCHEL_AEAD must be"),
        ({"SATCHEL_TIER_DOWN_POLICY": "bogus"}, "SATCHEL_TIER_DOWN_POLICY must be"),
        ({"SATCHEL_BREAKER_FAIL_MAX": "0"}, "SATCHEL_BREAKER_FAIL_MAX must be at least 1"),
        ({"SATCHEL_BREAKER_RESET_TIMEOUT": "nan"}, "SATCHEL_BREAKER_RESET_TIMEOUT must be"),
        ({"SATCHEL_BREAKER_RESET_TIMEOUT": "-1"}, "SATCHEL_BREAKER_RESET_TIMEOUT must be"),
        ({"SATCHEL_TIER_READ_TIMEOUT": "nan"}, "SATCHEL_TIER_READ_TIMEOUT must be a positive"),
        ({"SATCHEL_TIER_CONNECT_TIMEOUT": "0"}, "SATCHEL_TIER_CONNECT_TIMEOUT must be"),
        ({"SATCHEL_SEGMENT_CACHE_BYTES": "-1"}, "SATCHEL_SEGMENT_CACHE_BYTES must be"),
        ({"SATCHEL_METRICS_ROUTE": "metrics"}, "SATCHEL_METRICS_ROUTE must be a path"),
        ({"SATCHEL_COOKIE_SECURE": "maybe"}, "SATCHEL_COOKIE_SECURE must be true or false"),
        ({"SATCHEL_HEALTH_ROUTES": "bogus"}, "SATCHEL_HEALTH_ROUTES must be true or false"),
        ({"SATCHEL_SUMMARIZER": "llm"}, "SATCHEL_SUMMARIZER must be a callable"),
        # These passed init_app and then failed (or silently broke) every request:
        ({"SATCHEL_USER_BINDING": "current_user"}, "SATCHEL_USER_BINDING must be a function"),
        ({"SATCHEL_COOKIE": "sc", "SATCHEL_COOKIE_PATH": 123}, "SATCHEL_COOKIE_PATH must be"),
        ({"SATCHEL_COOKIE": "sc", "SATCHEL_COOKIE_PATH": "api"}, "SATCHEL_COOKIE_PATH must be"),
        ({"SATCHEL_COOKIE": "sc", "SATCHEL_COOKIE_MAX_AGE": -10}, "SATCHEL_COOKIE_MAX_AGE must"),
        ({"SATCHEL_JSON_FIELD": 123}, "SATCHEL_JSON_FIELD must be a JSON field name"),
        ({"SATCHEL_MAX_TURNS": 2.7}, "SATCHEL_MAX_TURNS must be an integer"),
        ({"SATCHEL_MAX_TURNS": True}, "SATCHEL_MAX_TURNS must be an integer"),
        ({"SATCHEL_TOKEN_LIMIT": 9000.5}, "SATCHEL_TOKEN_LIMIT must be an integer"),
        ({"SATCHEL_KEYS": "garbage"}, "^SATCHEL_KEYS: "),
        ({"SATCHEL_KEYS": "k1:short"}, "^SATCHEL_KEYS: "),
        ({"SATCHEL_ANCHOR_KID": "nope"}, "^SATCHEL_ANCHOR_KID: "),
        # Accepted, then every request failed (werkzeug's expiry date, redis-py's socket):
        ({"SATCHEL_COOKIE": "sc", "SATCHEL_COOKIE_MAX_AGE": 10**12}, "SATCHEL_COOKIE_MAX_AGE"),
        ({"SATCHEL_TIER_READ_TIMEOUT": 10**10}, "SATCHEL_TIER_READ_TIMEOUT must be"),
        ({"SATCHEL_TIER_CONNECT_TIMEOUT": "7200"}, "SATCHEL_TIER_CONNECT_TIMEOUT must be"),
        ({"SATCHEL_USER_BINDING": lambda user: user}, "SATCHEL_USER_BINDING must be"),
        # Cookies a browser drops, or Flask's own session cookie:
        ({"SATCHEL_COOKIE": "session"}, "SATCHEL_COOKIE='session' is Flask's session"),
        ({"SATCHEL_COOKIE": "__Secure-ctx", "SATCHEL_COOKIE_SECURE": "0"}, "SATCHEL_COOKIE="),
        ({"SATCHEL_COOKIE": "__Host-ctx", "SATCHEL_COOKIE_PATH": "/api"}, "__Host- cookie"),
        # Raw exceptions at start-up, or a probe quietly replaced:
        ({"SATCHEL_OVERFLOW_URL": 5}, "SATCHEL_OVERFLOW_URL must be a URL string"),
        ({"SATCHEL_TOKEN_LIMIT": 10, "SATCHEL_MODE": "memory"}, "SATCHEL_TOKEN_LIMIT must be"),
        ({"SATCHEL_DEV_KEY_FILE": "/", "SATCHEL_KEYS": ""}, "SATCHEL_DEV_KEY_FILE='/'"),
        (
            {"SATCHEL_HEALTH_ROUTES": True, "SATCHEL_METRICS_ROUTE": "/healthz"},
            "SATCHEL_METRICS_ROUTE='/healthz' is a health route",
        ),
        (
            {
                "SATCHEL_COOKIE": "c",
                "SATCHEL_COOKIE_PARTITIONED": "1",
                "SATCHEL_COOKIE_SECURE": "0",
            },
            "SATCHEL_COOKIE_PARTITIONED needs",
        ),
        # The extension's own response headers: the token was overwritten by their value.
        ({"SATCHEL_HEADER": "Satchel-Seq"}, "SATCHEL_HEADER='Satchel-Seq'"),
        ({"SATCHEL_HEADER": "satchel-reset"}, "SATCHEL_HEADER='satchel-reset'"),
        ({"SATCHEL_HEADER": "Access-Control-Expose-Headers"}, "SATCHEL_HEADER="),
    ],
)
def test_a_bad_limit_is_refused_at_start_up_naming_its_key(
    config: dict[str, Any], message: str
) -> None:
    """Not a bare ValueError from int(), and not a policy that breaks every request."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        make_app(**config)


def test_whole_numbers_written_as_floats_are_integer_settings() -> None:
    """7 * DAY (DAY is 86400.0) and timedelta(...).total_seconds() are the natural way
    to write a lifetime: refusing floats stopped such apps at start-up."""
    from datetime import timedelta

    from satchel.lifecycle.policy import DAY

    app = make_app(SATCHEL_IDLE_TTL=7 * DAY, SATCHEL_MAX_AGE=timedelta(days=30).total_seconds())
    policy = Satchel.state(app).pipeline.policy
    assert (policy.idle_ttl, policy.max_age) == (7 * 86400, 30 * 86400)


def test_a_window_of_zero_keeps_only_the_newest_exchange() -> None:
    policy = policy_of(make_app(SATCHEL_MAX_TURNS=0, SATCHEL_MAX_LLM_TOKENS="0"))
    assert (policy.max_turns, policy.max_llm_tokens) == (0, 0)
    assert policy_of(make_app(SATCHEL_MAX_TURNS="none")).max_turns is None


def test_a_cookie_caps_both_limits_at_what_a_browser_keeps(caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="satchel"):
        policy = policy_of(
            make_app(
                SATCHEL_COOKIE="chat",
                SATCHEL_MAX_TOKEN_BYTES=6000,
                SATCHEL_HARD_MAX_TOKEN_BYTES=16000,
            )
        )
    # The whole Set-Cookie value, attributes included, within 4093 bytes (RFC 6265's
    # 4096 less werkzeug's margin): "chat=", then "; Secure; HttpOnly; Path=/;
    # SameSite=Lax" (39 bytes) around the token.
    cookie_limit = 4093 - len("chat=; Secure; HttpOnly; Path=/; SameSite=Lax")
    assert policy.max_token_bytes == policy.hard_max_token_bytes == cookie_limit
    assert "does not fit a cookie" in caplog.text
    # The defaults fit already: the hard cap comes down without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="satchel"):
        policy = policy_of(make_app(SATCHEL_COOKIE="chat"))
    assert (policy.max_token_bytes, policy.hard_max_token_bytes) == (3800, cookie_limit)
    assert "cookie" not in caplog.text


def test_a_cookie_carried_token_never_outgrows_the_cookie() -> None:
    """A browser drops a cookie over 4096 bytes without an error, and the next request
    would carry the previous token: a silent rollback. The cap prevents it."""
    app = make_app(SATCHEL_COOKIE="chat", SATCHEL_COOKIE_SECURE=False)
    client = app.test_client()
    blob = hashlib.sha512(b"x").hexdigest() * 110  # 14,080 characters that do not shrink
    response = chat(client, blob[:7900])
    assert response.status_code == 200
    cookie = client.get_cookie("chat")
    assert cookie is not None and len("chat=" + cookie.value) <= 4096
    assert len(response.headers["Set-Cookie"]) <= 4093  # attributes included
    assert response.headers[HEADER_CONTEXT] == cookie.value


def test_padding_that_no_token_fits_under_the_budget_is_a_configuration_error() -> None:
    """One bucket of 4096 bytes is a 5,465-character token: over the default 3,800
    budget, every request would cut the conversation to its newest exchange."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="at most 2847"):
        make_app(SATCHEL_PAD_TO=4096)
    assert policy_of(make_app(SATCHEL_PAD_TO=2847)).max_token_bytes == 3800
    # A budget raised to hold it makes it fine (the hard cap follows the budget).
    assert policy_of(make_app(SATCHEL_PAD_TO=4096, SATCHEL_MAX_TOKEN_BYTES=6000))


def test_a_custom_header_name_is_used_both_ways() -> None:
    """SATCHEL_HEADER renames the token's header in requests and responses alike: a
    client that sends X-Chat-Token must also find the next token there."""
    app = make_app(SATCHEL_HEADER="X-Chat-Token")
    client = app.test_client()
    token = None
    for turns in (2, 4, 6):
        headers = {"X-Chat-Token": token} if token else {}
        response = client.post("/api/chat", json={"message": "hello"}, headers=headers)
        assert response.status_code == 200
        assert response.get_json()["turns"] == turns
        assert HEADER_CONTEXT not in response.headers
        token = response.headers["X-Chat-Token"]
        exposed = response.headers["Access-Control-Expose-Headers"]
        assert "X-Chat-Token" in exposed and HEADER_CONTEXT not in exposed


def test_settings_that_are_spelled_loosely_are_normalized() -> None:
    app = make_app(
        SATCHEL_COOKIE="sc",
        SATCHEL_COOKIE_SAMESITE="strict",
        SATCHEL_COOKIE_SECURE="off",
        SATCHEL_HEALTH_ROUTES="YES",
    )
    config = Satchel.state(app).config
    assert (config.cookie_samesite, config.cookie_secure, config.health_routes) == (
        "Strict",
        False,
        True,
    )
    response = chat(app.test_client(), "hi")
    assert "SameSite=Strict" in response.headers["Set-Cookie"]
    unset = make_app(SATCHEL_COOKIE="sc", SATCHEL_COOKIE_SAMESITE="")
    assert Satchel.state(unset).config.cookie_samesite is None


def test_a_duplicated_context_header_is_named_as_such() -> None:
    """Two Satchel-Context headers (a proxy adding its copy) are joined with a comma by
    the WSGI server; the answer said only "not (canonical) base64url"."""
    client = make_app().test_client()
    token = chat(client, "hi").headers[HEADER_CONTEXT]
    response = client.post(
        "/api/chat",
        json={"message": "again"},
        headers=[(HEADER_CONTEXT, token), (HEADER_CONTEXT, token)],
    )
    error = assert_json_error(response, "token_malformed")
    assert "more than one value" in error["message"]


def test_the_summarizer_may_be_named_as_the_config_table_names_the_default() -> None:
    from satchel.lifecycle import ExtractiveSummarizer

    app = make_app(SATCHEL_SUMMARIZER="extractive")
    assert isinstance(Satchel.state(app).pipeline.policy.summarizer, ExtractiveSummarizer)


def test_a_low_token_limit_lowers_default_caps_and_server_mode_has_no_minimum() -> None:
    """SATCHEL_TOKEN_LIMIT=4096 with the caps left at their defaults, and 512 in server
    mode (its carriers are 80 bytes), ran before; they must still start."""
    config = Satchel.state(make_app(SATCHEL_TOKEN_LIMIT="4096")).config
    assert config.hard_max_token_bytes == 4096 and config.max_token_bytes == 3800
    server = Satchel.state(make_app(SATCHEL_TOKEN_LIMIT="512", SATCHEL_MODE="memory")).config
    assert server.token_limit == 512
    assert Satchel.state(make_app(SATCHEL_TOKEN_LIMIT="80", SATCHEL_MODE="memory")).config


@pytest.mark.parametrize("limit", ["64", "79"])
def test_a_token_limit_below_a_carrier_is_refused_at_start_up(limit: str) -> None:
    """64 to 79 passed: the first message was served, and every conversation's second
    was a 413, its carrier (80 bytes) over the limit."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="at least 80 bytes"):
        make_app(SATCHEL_TOKEN_LIMIT=limit, SATCHEL_MODE="memory")


def test_caps_lowered_to_the_token_limit_are_held_to_the_pad_size() -> None:
    """The caps were lowered to SATCHEL_TOKEN_LIMIT after the SATCHEL_PAD_TO check: an
    app started whose every padded token was over its caps (413 on every request)."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SATCHEL_PAD_TO=1024"):
        make_app(SATCHEL_TOKEN_LIMIT="1100", SATCHEL_PAD_TO="1024")


@pytest.mark.parametrize("purpose", ["", "app\x00mac", "caf\udce9"])
def test_a_purpose_that_cannot_scope_keys_is_refused_at_start_up(purpose: str) -> None:
    from satchel.errors import ConfigurationError

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring.generate().to_string(), SATCHEL_PURPOSE=purpose)
    with pytest.raises(ConfigurationError, match="SATCHEL_PURPOSE"):
        Satchel(app)


# -- integration with the app's own hooks and views ------------------------------------------


def test_an_async_view_with_a_stricter_level_stays_a_coroutine_function(tmp_path: Path) -> None:
    """@satchel.consistency returned a plain wrapper around an async view: Flask called
    it without awaiting, and every request to the route was a 500."""
    import asyncio
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(), SATCHEL_OVERFLOW_URL=f"sqlite:///{tmp_path}/t.db"
    )
    satchel = Satchel(app)

    @satchel.consistency("monotonic")
    async def spend() -> dict[str, Any]:
        await asyncio.sleep(0)
        satchel.context.metadata["spent"] = True
        return {"level": satchel._request_state().consistency}

    assert inspect.iscoroutinefunction(spend)

    def call() -> Any:
        # In a thread of its own: an earlier test (Playwright's sync API) may leave an
        # event loop running in this one, where asyncio.run refuses to start.
        with app.test_request_context("/spend", method="POST"):
            return asyncio.run(spend())

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(call).result(timeout=10) == {"level": "monotonic"}


def _app_with_a_hook_before_init(tmp_path: Path) -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), TESTING=True)
    satchel = Satchel()

    @app.before_request  # registered before init_app: it runs before the extension's hook
    def hook() -> Any:
        from flask import request

        if request.path == "/ping":
            return {"pong": True}  # answers early: the extension's hook never runs
        if request.path == "/hooked":
            satchel.context.metadata["from_hook"] = True
        return None

    satchel.init_app(app)

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", "a secret turn")
        return {"turns": len(satchel.context.turns)}

    @app.post("/hooked")
    def hooked() -> Any:
        return {"from_hook": satchel.context.metadata.get("from_hook")}

    return app, satchel


def test_an_app_hook_registered_before_init_app_keeps_its_change_to_the_context(
    tmp_path: Path,
) -> None:
    """The extension's own before_request hook replaced the request's state, so what an
    earlier hook did with the context was neither seen by the view nor sealed."""
    app, _ = _app_with_a_hook_before_init(tmp_path)
    response = app.test_client().post("/hooked")
    assert response.get_json() == {"from_hook": True}
    assert codec_of(app).open(response.headers[HEADER_CONTEXT]).metadata == {"from_hook": True}


def test_requests_sharing_an_app_context_never_share_a_context(tmp_path: Path) -> None:
    """Requests pushed inside one app context (a test fixture's app_context()) share
    ``g``: a request answered early by an app hook got the previous request's context
    sealed onto its response, secret turn and all."""
    app, _ = _app_with_a_hook_before_init(tmp_path)
    client = app.test_client()
    with app.app_context():
        first = client.post("/chat")
        assert first.get_json() == {"turns": 1}
        ping = client.get("/ping")
        assert ping.get_json() == {"pong": True}
        assert HEADER_CONTEXT not in ping.headers
        again = client.post("/chat")  # a new conversation, not the first one's
        assert again.get_json() == {"turns": 1}


def test_a_response_carrying_a_token_is_never_cached_for_anyone_else() -> None:
    """Responses with a token had neither Vary nor Cache-Control: a shared cache could
    serve one client's token to another (send_file responses are cacheable by
    heuristics), or a browser cache replay an old token to its own client."""
    client = make_app(SATCHEL_COOKIE="ctx").test_client()
    response = chat(client, "hello")
    assert HEADER_CONTEXT in response.headers
    assert {"satchel-context", "cookie"} <= {v.lower() for v in response.vary}
    assert response.headers["Cache-Control"] == "no-store"


def test_a_file_response_carrying_a_token_is_not_stored_either(tmp_path: Path) -> None:
    """send_file sets Cache-Control: no-cache itself, which lets a cache keep a copy
    (revalidated, then served with the token in it): no-store is added over it."""
    from flask import send_file

    (tmp_path / "notes.txt").write_text("hello")
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string())
    satchel = Satchel(app)

    @app.get("/notes")
    def notes() -> Any:
        satchel.context.add_turn("user", "downloaded the notes")
        return send_file(tmp_path / "notes.txt")

    response = app.test_client().get("/notes")
    assert HEADER_CONTEXT in response.headers
    assert response.cache_control.no_store


def test_a_thread_of_the_request_shares_its_one_context() -> None:
    """A copy_current_request_context thread touching the context at the moment the
    view did (both the request's first access) could open a second Context, and its
    change was silently not sealed (355 of 1,000 requests in a review run)."""
    import threading

    from flask import copy_current_request_context

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string())
    satchel = Satchel(app)

    @app.post("/both")
    def both() -> Any:
        go = threading.Barrier(2)
        seen: dict[str, int] = {}

        @copy_current_request_context
        def work() -> None:
            go.wait()
            seen["worker"] = id(satchel.context)
            satchel.context.metadata["worker"] = True

        worker = threading.Thread(target=work)
        worker.start()
        go.wait()
        seen["view"] = id(satchel.context)
        satchel.context.add_turn("user", "hi")
        worker.join()
        return {"same": seen["worker"] == seen["view"]}

    client = app.test_client()
    for _ in range(60):
        response = client.post("/both")
        assert response.get_json() == {"same": True}
        assert codec_of(app).open(response.headers[HEADER_CONTEXT]).metadata == {"worker": True}


def test_a_misspelled_setting_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """README: every key is checked at start-up; a misspelled one was ignored silently
    and the default it meant to change applied."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(),
        SATCHEL_OVERFLOW="sqlite:///nowhere.db",  # meant SATCHEL_OVERFLOW_URL
        SATCHEL_MAX_TOKENS_BYTES=1200,  # meant SATCHEL_MAX_TOKEN_BYTES
        SATCHEL_MODEL_NAME="an app's own setting",  # like no Satchel key: left alone
        # Guesses by shape: spelling alone pointed the first at SATCHEL_COOKIE_SAMESITE
        # (whose advice was itself refused) and missed the other two.
        SATCHEL_COOKIE_NAME="chat",  # as SESSION_COOKIE_NAME; meant SATCHEL_COOKIE
        SATCHEL_METRICS=False,  # meant SATCHEL_METRICS_ROUTE
        SATCHEL_HEALTH=False,  # meant SATCHEL_HEALTH_ROUTES
        SATCHEL_MAX_TURN=40,  # a letter away from SATCHEL_MAX_TURNS, not SATCHEL_MAX_TURN_CHARS
        SATCHEL_TOKEN="an app's own",  # _MODE or _LIMIT? a guess: left alone
        SATCHEL_SESSION="an app's own",  # _MODE, _PAD_TO or _PURPOSE? left alone too
        # A word short of SATCHEL_SEGMENT_CACHE_BYTES; by similarity it was "meant"
        # SATCHEL_SEGMENT_GRACE, three letters away, and 16 MiB of seconds taken.
        SATCHEL_SEGMENT_CACHE=16 * 1024 * 1024,
        # A word short, and two letters from another key: that one was named, and its
        # advice refused (SATCHEL_AEAD) or ignored (SATCHEL_KEYS).
        SATCHEL_PAD=256,  # meant SATCHEL_PAD_TO
        SATCHEL_KEEP=False,  # meant SATCHEL_KEEP_NEWEST
    )
    with caplog.at_level(logging.WARNING, logger="satchel"):
        Satchel(app)
    warned = [r.getMessage() for r in caplog.records if "not a Satchel setting" in r.getMessage()]
    assert sorted(w.split(";")[1].split("(")[0].strip() for w in warned) == [
        f"did you mean {k}?"
        for k in sorted(
            [
                "SATCHEL_COOKIE",
                "SATCHEL_HEALTH_ROUTES",
                "SATCHEL_KEEP_NEWEST",
                "SATCHEL_MAX_TOKEN_BYTES",
                "SATCHEL_MAX_TURNS",
                "SATCHEL_METRICS_ROUTE",
                "SATCHEL_OVERFLOW_URL",
                "SATCHEL_PAD_TO",
                "SATCHEL_SEGMENT_CACHE_BYTES",
            ]
        )
    ], warned


def test_a_store_url_in_client_mode_does_not_replace_the_overflow_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SATCHEL_STORE_URL is the server-side modes' store; in client mode it took over
    the overflow tier without a word (a leftover memory:// swapped a shared tier for
    per-process memory)."""
    from satchel.tiers import SQLiteTier

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(),
        SATCHEL_OVERFLOW_URL=f"sqlite:///{tmp_path / 'overflow.db'}",
        SATCHEL_STORE_URL="memory://",
    )
    with caplog.at_level(logging.WARNING, logger="satchel"):
        Satchel(app)
    assert isinstance(Satchel.state(app).tier.tier, SQLiteTier)
    assert any("SATCHEL_STORE_URL is set" in r.getMessage() for r in caplog.records)


def test_a_samesite_none_cookie_that_is_not_secure_is_refused_at_start_up() -> None:
    """Browsers drop a SameSite=None cookie without Secure: the token never came back
    and every request started a new conversation, with no error anywhere."""
    from satchel.errors import ConfigurationError

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(),
        SATCHEL_COOKIE="ctx",
        SATCHEL_COOKIE_SAMESITE="none",
        SATCHEL_COOKIE_SECURE=False,
    )
    with pytest.raises(ConfigurationError, match="SATCHEL_COOKIE_SECURE"):
        Satchel(app)
    app.config["SATCHEL_COOKIE_SECURE"] = True
    Satchel(app)  # Secure: fine


def test_the_apps_erase_returns_what_the_cli_prints(tmp_path: Path) -> None:
    """docs/operations.md's admin route returns satchel.erase(); it lacked the CLI's
    anchor_kid."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(),
        SATCHEL_OVERFLOW_URL=f"sqlite:///{tmp_path / 'overflow.db'}",
    )
    satchel = Satchel(app)
    with app.app_context():
        result = satchel.erase("0" * 32)
    assert set(result) == {"session", "deleted_keys", "tokens_refused", "anchor_kid"}
    assert result["anchor_kid"] == K1.kid


@pytest.mark.parametrize("where", ["config", "constructor"])
def test_the_anchor_setting_pins_a_keyring_given_as_an_object(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A Keyring object (SATCHEL_KEYS set to one, or Satchel(app, keyring=...)) was used
    as it was: SATCHEL_ANCHOR_KID was ignored without a word, so the documented rollout
    (new key appended, anchor pinned) re-anchored every session name and reset every
    server-mode conversation. The setting now pins the object's anchor; an anchor the
    object already pins differently is refused; an unpinned ring of several keys warns."""
    from satchel import Keyring
    from satchel.errors import ConfigurationError
    from satchel.keys import generate_key

    monkeypatch.delenv("SATCHEL_ANCHOR_KID", raising=False)
    ring = Keyring([generate_key("k1"), generate_key("k2")])  # unpinned: anchors at k2

    def build(keyring: Keyring = ring, **config: Any) -> Flask:
        app = Flask(__name__)
        app.config.update(TESTING=True, **config)
        if where == "config":
            app.config["SATCHEL_KEYS"] = keyring
            Satchel(app)
        else:
            Satchel(app, keyring=keyring)
        return app

    app = build(SATCHEL_ANCHOR_KID="k1")
    used = Satchel.state(app).codec.keyring
    assert used.anchor.kid == "k1" and used.anchor_pinned
    assert used.kids == ring.kids  # same keys, same order: k1 still seals
    with pytest.raises(ConfigurationError, match=r"^SATCHEL_ANCHOR_KID: "):
        build(SATCHEL_ANCHOR_KID="k9")
    pinned = Keyring(ring.keys, anchor_kid="k2")
    with pytest.raises(ConfigurationError, match=r"^SATCHEL_ANCHOR_KID: .*'k2'"):
        build(SATCHEL_ANCHOR_KID="k1", keyring=pinned)
    assert Satchel.state(build(SATCHEL_ANCHOR_KID="k2", keyring=pinned)).codec.keyring is pinned
    with caplog.at_level(logging.WARNING, logger="satchel"):
        build()
    assert "SATCHEL_ANCHOR_KID is not set" in caplog.text


def test_a_policy_passed_in_code_is_held_to_what_a_cookie_holds(caplog: Any) -> None:
    """Only the config's own caps were held under the cookie's 4096 bytes: a policy
    passed as Satchel(app, policy=...) was used as it was, and the Set-Cookie grew past
    what browsers keep (silently dropped: every later request a new conversation)."""
    from satchel.lifecycle import LifecyclePolicy

    given = LifecyclePolicy(max_token_bytes=20_000, hard_max_token_bytes=None)
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), SATCHEL_COOKIE="ctx", TESTING=True)
    with caplog.at_level(logging.WARNING, logger="satchel"):
        satchel = Satchel(app, policy=given)
    assert "do not fit a cookie" in caplog.text
    policy = Satchel.state(app).pipeline.policy
    assert policy.max_token_bytes is not None and policy.max_token_bytes <= 4096
    assert policy.hard_max_token_bytes is not None and policy.hard_max_token_bytes <= 4096
    assert given.max_token_bytes == 20_000  # the caller's object is left alone
    caplog.clear()
    quiet = Flask(__name__)
    quiet.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), SATCHEL_COOKIE="ctx")
    with caplog.at_level(logging.WARNING, logger="satchel"):
        Satchel(quiet, policy=LifecyclePolicy(max_turns=20))  # default caps: held quietly
    assert "do not fit a cookie" not in caplog.text
    assert Satchel.state(quiet).pipeline.policy.hard_max_token_bytes <= 4096

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.add_turn("user", os.urandom(600).hex())  # incompressible
        return {}

    client = app.test_client()
    for _ in range(12):
        resp = client.post("/chat")
        assert resp.status_code == 200
        cookie = resp.headers["Set-Cookie"].split(";")[0]
        assert len(cookie) <= 4096, len(cookie)


@pytest.mark.parametrize("hook_order", ["after_init_app", "before_init_app"])
def test_an_error_raised_while_sealing_keeps_the_responses_cors_headers(hook_order: str) -> None:
    """A CORS hook registered after init_app runs first (Flask runs after_request hooks
    last-registered first) and sets its headers on the view's response; an error raised
    while sealing then went out in a new response without them, and a page on another
    origin read only "Failed to fetch" (not the error, nor a handed-back token)."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring([K1]).to_string(), TESTING=True)

    def cors(response: Any) -> Any:
        response.headers["Access-Control-Allow-Origin"] = "http://localhost:5173"
        exposed = response.headers.get("Access-Control-Expose-Headers")
        response.headers["Access-Control-Expose-Headers"] = ", ".join(
            [*([exposed] if exposed else []), "X-App"]
        )
        response.vary.add("Origin")
        return response

    if hook_order == "before_init_app":
        app.after_request(cors)
    satchel = Satchel(app)
    if hook_order == "after_init_app":
        app.after_request(cors)

    @app.post("/chat")
    def chat_view() -> Any:
        satchel.context.metadata["when"] = object()  # fails when the token is sealed
        return {"ok": True}

    resp = app.test_client().post("/chat", headers={"Origin": "http://localhost:5173"})
    assert resp.status_code == 500
    assert resp.get_json()["error"]["code"] == "context_not_serializable"
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    exposed = {n.strip() for n in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-App", "Satchel-Context", "Retry-After"} <= exposed
    assert "Origin" in resp.vary


def test_a_partitioned_cookie_for_an_api_on_another_site() -> None:
    """A cookie set by an API on another site than the page's is stored by browsers
    that block third-party cookies only when Partitioned (CHIPS): without the option
    the cookie transport silently started a new conversation on every request."""
    app = make_app(
        SATCHEL_COOKIE="ctx", SATCHEL_COOKIE_SAMESITE="None", SATCHEL_COOKIE_PARTITIONED="1"
    )
    client = app.test_client()
    first = client.post("/api/chat", json={"message": "hi"})
    cookie = first.headers["Set-Cookie"]
    assert "Partitioned" in cookie and "Secure" in cookie and "SameSite=None" in cookie
    client.set_cookie("ctx", "s1.tampered")  # refused: the cookie is removed, partitioned too
    refused = client.post("/api/chat", json={"message": "again"})
    assert refused.status_code == 400
    removal = refused.headers["Set-Cookie"]
    assert removal.startswith("ctx=;") and "Partitioned" in removal
    plain = make_app(SATCHEL_COOKIE="ctx").test_client().post("/api/chat", json={"message": "x"})
    assert "Partitioned" not in plain.headers["Set-Cookie"]


def test_the_status_table_lists_every_error_code_an_app_can_meet() -> None:
    """STATUS_BY_CODE is public, "for reference and docs": invalid_value was added as an
    error without an entry (a KeyError for code that looks a code up there)."""
    from satchel import errors
    from satchel.flask_ext.errors import STATUS_BY_CODE

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    # The library's errors (flask.session's StoredSessionMissing, for one, never reaches
    # the HTTP edge: the session opens empty).
    for cls in subclasses(errors.SatchelError):
        if cls.__module__ != errors.__name__:
            continue
        if cls.status < 500 and cls.code != errors.SatchelError.code:
            assert STATUS_BY_CODE.get(cls.code) == cls.status, cls.__name__


def test_an_empty_cookie_or_json_field_setting_is_off() -> None:
    """SATCHEL_COOKIE= (an environment file switching the carrier off) was a
    ConfigurationError at start-up, where the URL keys take empty as none."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=Keyring([K1]).to_string(), SATCHEL_COOKIE="", SATCHEL_JSON_FIELD=" "
    )
    ext = Satchel(app)

    @app.post("/chat")
    def chat() -> dict[str, int]:
        ext.context.add_turn("user", "hi")
        return {"turns": len(ext.context.turns)}

    response = app.test_client().post("/chat", json={"satchel": "ignored"})
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers
    assert ext.state(app).config.cookie is None and ext.state(app).config.json_field is None


def test_a_tier_url_given_as_tier_is_a_configuration_error() -> None:
    """Satchel(tier="redis://...") type-checked (tier was Any) and failed in init_app
    with an AttributeError."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SATCHEL_OVERFLOW_URL"):
        Satchel(tier="memory://")  # type: ignore[arg-type]
