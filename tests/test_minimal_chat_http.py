"""examples/minimal_chat over real HTTP: a werkzeug server in a child process (LiveServer)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

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
