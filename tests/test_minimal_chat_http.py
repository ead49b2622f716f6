"""examples/minimal_chat over real HTTP: a werkzeug server in a child process (LiveServer)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from satchel import Codec, Context, Key, Keyring, peek
from tests.support import HttpResponse, LiveServer

APP = "examples.minimal_chat.app:create_app"
RING = Keyring([Key("http1", hashlib.sha256(b"minimal-chat-http-test-key").digest())])
HEADER = "Satchel-Context"


def _server(**env: str) -> Iterator[LiveServer]:
    server = LiveServer(
        APP,
        env={"SATCHEL_KEYS": RING.to_string(), "SATCHEL_MAX_TOKEN_BYTES": "1500", **env},
    )
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    yield from _server()


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[LiveServer]:
    yield from _server(SATCHEL_ON_BAD_TOKEN="fresh")


def post_chat(server: LiveServer, message: str, token: str | None = None) -> HttpResponse:
    headers = {HEADER: token} if token else {}
    return server.post("/api/chat", json_body={"message": message}, headers=headers)


def assert_json_error(response: HttpResponse, code: str, status: int = 400) -> None:
    assert response.status == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.get(HEADER) is None


def test_chat_round_trip_over_real_http(server: LiveServer) -> None:
    token = None
    for i in range(16):
        noise = hashlib.sha256(str(i).encode()).hexdigest()
        response = post_chat(server, f"Message {i} about {noise}", token)
        assert response.status == 200, response.text
        assert response.json()["reply"].startswith("(turn ")
        token = response.headers[HEADER]
        assert response.headers["Satchel-Seq"] == str(i + 1)
        assert len(token) <= 1500  # the byte budget holds over the wire
        assert "seal;dur=" in response.headers["Server-Timing"]
        assert "Satchel-Context" in response.headers["Access-Control-Expose-Headers"]
    assert "verify;dur=" in response.headers["Server-Timing"]
    data = server.get("/api/context", headers={HEADER: token}).json()
    assert data["seq"] == 16
    assert data["turns"][-2]["content"].startswith("Message 15 about")
    assert data["summary"].startswith("(")  # older turns were summarized ...
    assert data["lifecycle"]["dropped"]["byte_budget"] > 0  # ... and it says why
    assert data["pinned"] == {"system": "", "facts": []}
    assert Codec(RING).open(token).seq == 16  # the same keys open it outside the server


def test_bad_tokens_are_json_errors_over_real_http(server: LiveServer) -> None:
    good = post_chat(server, "hello").headers[HEADER]
    tampered = good[:30] + ("B" if good[30] == "A" else "A") + good[31:]
    assert_json_error(post_chat(server, "x", tampered), "token_bad_signature")
    assert_json_error(post_chat(server, "x", "garbage"), "token_malformed")
    assert_json_error(post_chat(server, "x", "s9." + good[3:]), "token_unsupported_version")
    other = Codec(Keyring([Key("http1", b"o" * 32)])).seal(Context.new())
    assert_json_error(server.get("/api/context", headers={HEADER: other}), "token_bad_signature")
    past = int(time.time()) - 7200
    expired = Codec(RING, clock=lambda: past, ttl=60).seal(Context.new(now=past))
    assert_json_error(post_chat(server, "x", expired), "token_expired", status=401)
    assert_json_error(server.post("/api/chat", json_body={}), "invalid_request")
    # json.dumps sends the lone surrogate as the escape "\\ud800": valid JSON, not text
    assert_json_error(post_chat(server, "\ud800 broken"), "invalid_text")


def test_fresh_mode_over_real_http(fresh_server: LiveServer) -> None:
    response = post_chat(fresh_server, "hello", "s1.tampered-token")
    assert response.status == 200
    assert response.headers["Satchel-Reset"] == "token_malformed"
    token = response.headers[HEADER]
    assert peek(token).kid == "http1"
    follow = post_chat(fresh_server, "again", token)
    assert follow.status == 200 and follow.headers.get("Satchel-Reset") is None
    assert follow.json()["turns"] == 4


def pasted_blob(n: int) -> str:
    """``n`` characters that do not compress: a pasted key, hex dump or minified file."""
    out = ""
    while len(out) < n:
        out += base64.b64encode(hashlib.sha512(str(len(out)).encode()).digest()).decode()
    return out[:n]


@pytest.mark.parametrize("tier", ["none", "sqlite"])
def test_one_huge_message_does_not_break_the_conversation_behind_gunicorn(
    tier: str, tmp_path: Any
) -> None:
    """gunicorn with its default limits refuses a header field over 8190 bytes with an
    HTML 431, before the app sees it. A message the example accepts (8,000 characters
    that do not compress) used to make a token that large, so the conversation's next
    request failed outside Satchel's reach. The hard cap (8,000 by default) keeps every
    token under that limit: the exchange goes to the tier, or into the summary."""
    env = {"SATCHEL_KEYS": RING.to_string()}
    if tier == "sqlite":
        env["SATCHEL_OVERFLOW_URL"] = f"sqlite:///{tmp_path / 'overflow.db'}"
    with LiveServer(APP, server="gunicorn", env=env) as server:
        first = post_chat(server, "Please keep this key for later.")
        assert first.status == 200, first.text
        blob = pasted_blob(7990)
        big = post_chat(server, blob, first.headers[HEADER])
        assert big.status == 200, big.text
        assert len(big.headers[HEADER]) <= 8000
        after = post_chat(server, "What did I paste?", big.headers[HEADER])
        assert after.status == 200, after.text
        assert after.headers["Content-Type"].startswith("application/json")
        data = server.get("/api/context", headers={HEADER: after.headers[HEADER]}).json()
        contents = [t["content"] for t in data["all_turns"]]
        if tier == "sqlite":  # moved to the tier whole, and read back whole
            assert contents[2] == blob and data["degraded"] == []
            assert data["lifecycle"]["overflowed"] >= 4
        else:  # summarized: the policy says so, nothing is silently gone
            assert blob not in contents
            assert blob[:40] in data["summary"]
            assert data["lifecycle"]["dropped"]["byte_budget"] >= 2
        assert contents[-2] == "What did I paste?"
