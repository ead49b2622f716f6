"""examples/minimal_chat over real HTTP: a werkzeug server in a child process (LiveServer)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from satchel import Codec, Context, Key, Keyring, peek
from tests.support import HttpResponse, LiveServer, wait_until

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


# -- the edges of the HTTP contract ------------------------------------------------------


def test_json_nested_past_the_recursion_limit_is_a_json_400(server: LiveServer) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    response = server.post("/api/chat", data=deep, headers={"Content-Type": "application/json"})
    assert_json_error(response, "invalid_request")


def test_a_message_is_kept_exactly_as_sent(server: LiveServer) -> None:
    pasted = "    def add(a, b):\n        return a + b\n\n"
    response = post_chat(server, pasted)
    assert response.status == 200, response.text
    context = server.get("/api/context", headers={HEADER: response.headers[HEADER]}).json()
    assert context["turns"][0]["content"] == pasted
    assert_json_error(post_chat(server, " \n\t "), "invalid_request")


def test_a_wrong_method_is_a_json_405_that_says_what_is_allowed(server: LiveServer) -> None:
    response = server.get("/api/chat")
    assert_json_error(response, "method_not_allowed", status=405)
    assert "POST" in response.headers["Allow"]


def test_read_only_and_failed_responses_still_carry_server_timing(server: LiveServer) -> None:
    token = post_chat(server, "hello").headers[HEADER]
    read = server.get("/api/context", headers={HEADER: token})
    assert read.status == 200 and read.headers.get(HEADER) is None
    steps = read.headers["Server-Timing"]
    assert "open;dur=" in steps and "satchel;dur=" in steps
    refused = post_chat(server, "hello", token[:-4] + "AAAA")
    assert refused.status == 400 and "Server-Timing" in refused.headers


def test_a_read_only_route_says_it_started_afresh(fresh_server: LiveServer) -> None:
    response = fresh_server.get("/api/context", headers={HEADER: "s1.garbage"})
    assert response.status == 200 and response.json()["turns"] == []
    assert response.headers["Satchel-Reset"] == "token_malformed"


@pytest.fixture(scope="module")
def cookie_server() -> Iterator[LiveServer]:
    # The transport options come from the environment like every other setting.
    yield from _server(SATCHEL_COOKIE="chat", SATCHEL_COOKIE_SECURE="0")


def test_cookie_transport_from_the_environment_and_a_bad_cookie_is_cleared(
    cookie_server: LiveServer,
) -> None:
    first = post_chat(cookie_server, "remember the blue door")
    cookie = next(c for c in first.cookies if c.startswith("chat="))
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert value == first.headers[HEADER] and "HttpOnly" in cookie
    second = cookie_server.post(
        "/api/chat", json_body={"message": "which door?"}, headers={"Cookie": f"chat={value}"}
    )
    assert second.status == 200 and second.json()["turns"] == 4
    # A cookie that will never open is removed: page code cannot, it is HttpOnly.
    tampered = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    refused = cookie_server.post(
        "/api/chat", json_body={"message": "hi"}, headers={"Cookie": f"chat={tampered}"}
    )
    assert refused.status == 400
    cleared = next(c for c in refused.cookies if c.startswith("chat="))
    assert "Max-Age=0" in cleared or "expires=Thu, 01 Jan 1970" in cleared


def test_a_chunked_body_over_the_limit_is_a_413_like_one_with_a_length(
    server: LiveServer,
) -> None:
    body = json.dumps({"message": "x" * 300_000}).encode()
    host, port = server.url.split("//", 1)[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        chunks = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
        conn.request(
            "POST",
            "/api/chat",
            body=chunks,
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_entity_too_large"
    finally:
        conn.close()


def test_the_example_app_reports_warnings_in_its_output(server: LiveServer) -> None:
    """Under a plain server (or gunicorn) nothing configures the ``satchel`` logger;
    the example does, so a fork (or data loss) is not reported to nobody."""
    first = post_chat(server, "one")
    token = first.headers[HEADER]
    assert post_chat(server, "two", token).status == 200
    assert post_chat(server, "two again", token).headers["Satchel-Fork"] == "behind=1"
    line = wait_until(
        lambda: next((x for x in server.logs().splitlines() if "fork_detected" in x), None),
        timeout=5,
        message="a fork_detected record in the server's log",
    )
    record = json.loads(line)
    assert record["level"] == "WARNING" and record["event"] == "fork_detected"
    assert "two" not in line and token not in line  # never content, never a token


def test_every_plain_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: the example apps read the SATCHEL_* keys from the environment; the AEAD,
    an app's own dictionary (ID=PATH pairs) and the metadata version were ignored."""
    from importlib import resources

    from examples.minimal_chat.app import create_app
    from satchel.compress import DICTIONARY_FILES

    shipped = resources.files("satchel").joinpath("dictionaries", DICTIONARY_FILES[1])
    env = {
        "SATCHEL_KEYS": Keyring.generate("env1").to_string(),
        "SATCHEL_AEAD": "chacha20-poly1305",
        "SATCHEL_DICTIONARIES": f"231={shipped}",
        "SATCHEL_DICTIONARY_ID": "231",
        "SATCHEL_METADATA_VERSION": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app({"TESTING": True})
    response = app.test_client().post("/api/chat", json={"message": "hello " * 40})
    assert response.status_code == 200, response.get_json()
    header = peek(response.headers[HEADER])
    assert header.algorithm == "chacha20-poly1305"
    assert header.dictionary_id == 231
    with app.app_context():
        assert app.extensions["satchel"].codec.open(response.headers[HEADER]).metadata_version == 3


def test_the_example_apps_read_every_setting_of_the_config_table_from_the_environment() -> None:
    """The README sends readers to the table in satchel.flask_ext.config and says the
    example apps read those keys from the environment: SATCHEL_COOKIE_MAX_AGE was left
    out (a cookie with no Max-Age, and a bad value accepted silently)."""
    import re

    from examples._config import COMMON_ENV_KEYS
    from satchel.flask_ext import config

    table = set(re.findall(r"^(SATCHEL_[A-Z_]+)", config.__doc__ or "", re.MULTILINE))
    callables = {"SATCHEL_SUMMARIZER", "SATCHEL_USER_BINDING"}  # set in create_app's config
    assert table - callables == set(COMMON_ENV_KEYS)


def test_a_cookie_max_age_from_the_environment_reaches_the_cookie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from examples.minimal_chat.app import create_app
    from satchel.errors import ConfigurationError

    monkeypatch.setenv("SATCHEL_KEYS", RING.to_string())
    monkeypatch.setenv("SATCHEL_COOKIE", "ctx")
    monkeypatch.setenv("SATCHEL_COOKIE_MAX_AGE", "3600")
    response = (
        create_app({"TESTING": True}).test_client().post("/api/chat", json={"message": "hello"})
    )
    assert "Max-Age=3600" in response.headers["Set-Cookie"]
    monkeypatch.setenv("SATCHEL_COOKIE_MAX_AGE", "abc")
    with pytest.raises(ConfigurationError, match="SATCHEL_COOKIE_MAX_AGE"):
        create_app({"TESTING": True})


def test_a_damaged_sqlite_tier_file_degrades_gunicorn_workers_instead_of_stopping_them(
    tmp_path: Any,
) -> None:
    """The start-up check refused a file that is not an SQLite database. When the tier's
    own file was damaged while the app ran, the next worker gunicorn booted (a restart
    after max_requests, a crash, a timeout) failed in create_app, and gunicorn stopped
    the master: connection refused for everyone, over an optional tier. Workers now
    boot, answer (degraded), log the problem, and recover once the file is removed."""
    import os
    import signal

    from satchel.bench.compare import children

    db = tmp_path / "overflow.db"
    db.write_bytes(b"GARBAGEGARBAGE!!" + os.urandom(4096))  # a damaged tier file
    env = {
        "SATCHEL_KEYS": RING.to_string(),
        "SATCHEL_OVERFLOW_URL": f"sqlite:///{db}",
        "SATCHEL_MAX_TOKEN_BYTES": "1200",
        "SATCHEL_BREAKER_RESET_TIMEOUT": "0.2",
    }
    with LiveServer(APP, server="gunicorn", workers=2, env=env) as server:
        token = None
        flagged: set[str] = set()
        for i in range(6):  # turns that do not compress: the conversation must spill
            response = post_chat(server, f"message {i}: " + os.urandom(150).hex(), token)
            assert response.status == 200, response.text
            token = response.headers[HEADER]
            flagged.update(response.json()["degraded"])
        assert "tier_write_failed" in flagged
        assert "is not an SQLite database" in server.logs()

        assert server.pid is not None
        workers = children(server.pid)
        os.kill(workers[0], signal.SIGTERM)  # a worker restarts with the file still bad
        wait_until(
            lambda: len(children(server.pid)) == 2 and workers[0] not in children(server.pid),
            timeout=20,
            message="gunicorn to boot a replacement worker",
        )
        assert server.running, server.logs()

        db.unlink()  # the operator clears the damaged file: the workers recover

        def spills_cleanly() -> bool:
            nonlocal token
            response = post_chat(server, "again: " + os.urandom(150).hex(), token)
            assert response.status == 200, response.text
            token = response.headers[HEADER]
            return response.json()["degraded"] == [] and db.exists()

        wait_until(spills_cleanly, timeout=15, message="a spill to the new file")


MALFORMED_CHUNKED = (
    b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hex
    b"3\r\nabcXX",  # a chunk without its CRLF
    b"10;\x01\r\n",  # a bad chunk extension
)


@pytest.mark.parametrize("wsgi_server", ["gunicorn", "werkzeug"])
def test_a_malformed_chunked_body_is_a_json_400_on_either_server(wsgi_server: str) -> None:
    """gunicorn raises its own exceptions (InvalidChunkSize...) while the app reads such
    a body; they escaped json_body() as a 500 with a traceback in the log: with a JSON
    Content-Type first, then with any other (read by the chunked body's size check).
    werkzeug's server raises its 400 (ClientDisconnected), which answered bad_request:
    one kind of client error, one code, whichever server runs the app."""
    import socket

    env = {"SATCHEL_KEYS": RING.to_string()}
    with LiveServer(APP, server=wsgi_server, env=env) as server:
        for content_type in (b"application/json", b"text/plain", None):
            for chunked in MALFORMED_CHUNKED:
                typed = b"Content-Type: " + content_type + b"\r\n" if content_type else b""
                with socket.create_connection((server.host, server.port), timeout=10) as sock:
                    sock.sendall(
                        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
                        + typed
                        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                        + chunked
                    )
                    sock.shutdown(socket.SHUT_WR)
                    raw = b""
                    while chunk := sock.recv(65536):
                        raw += chunk
                head, _, body = raw.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                assert status == 400, (content_type, chunked, raw)
                error = json.loads(body)["error"]
                assert error["code"] == "invalid_request", (content_type, chunked, raw)
                assert "could not be read" in error["message"]
        assert "Traceback" not in server.logs()


def test_a_token_at_the_turn_limit_is_served_with_the_tier_and_without(
    server: LiveServer, tmp_path: Any
) -> None:
    """A token minted with the app's own key holding 20,000 turns (what a token opens
    with): the reply's exchange took it past the limit, and the request was a 500
    with a tier (the save measured a context no token can carry), after seconds of
    summarizing either way."""
    ctx = Context.new()
    for i in range(20_000):
        ctx.add_turn("user" if i % 2 == 0 else "assistant", f"message {i}.")
    token = Codec(RING).seal(ctx)
    tiered = LiveServer(
        APP,
        env={
            "SATCHEL_KEYS": RING.to_string(),
            "SATCHEL_MAX_TOKEN_BYTES": "1500",
            "SATCHEL_OVERFLOW_URL": f"sqlite:///{tmp_path}/tier.db",
        },
    )
    try:
        for live in (tiered.start(), server):
            response = post_chat(live, "one more", token)
            assert response.status == 200, response.text
            after = Codec(RING).open(response.headers[HEADER])
            assert len(after.turns) <= 40 and after.summary
            assert response.json()["degraded"] == []
    finally:
        tiered.cleanup()


def test_the_reply_counts_exchanges_past_the_window() -> None:
    """The "(turn N)" label counted the turns held: once the window trimmed, every
    reply said the same number, and with a byte budget it went backwards."""
    from examples.minimal_chat.app import create_app
    from satchel.keys import generate_key

    app = create_app(
        {"SATCHEL_KEYS": generate_key("k1").to_string(), "SATCHEL_MAX_TURNS": 4, "TESTING": True}
    )
    client, token, numbers = app.test_client(), None, []
    for i in range(8):
        resp = client.post(
            "/api/chat",
            json={"message": f"message number {i}"},
            headers={"Satchel-Context": token} if token else {},
        )
        token = resp.headers["Satchel-Context"]
        numbers.append(int(resp.get_json()["reply"].split(")")[0].removeprefix("(turn ")))
    assert numbers == list(range(1, 9))


def test_a_long_chat_under_its_byte_budget_never_touches_the_redis_tier(
    redis_server: Any, live_server_factory: Any
) -> None:
    """Issue 3: only a session whose token outgrows its byte budget spills; every other
    session stays client-held. With the default window (40 turns) the window moved
    turns to Redis: 30 short exchanges, far under the budget, wrote segments, and were
    flagged degraded while Redis was down."""
    server = live_server_factory(
        APP, env={"SATCHEL_KEYS": RING.to_string(), "SATCHEL_OVERFLOW_URL": redis_server.url}
    )
    token = None
    for i in range(30):
        response = post_chat(server, f"short message {i}", token)
        assert response.status == 200, response.text
        token = response.headers[HEADER]
    body = server.get("/api/context", headers={HEADER: token}).json()
    assert body["overflow"] == [] and len(body["turns"]) <= 40
    assert redis_server.client().dbsize() == 0
    redis_server.kill()
    for i in range(30, 34):
        response = post_chat(server, f"short message {i}", token)
        assert response.status == 200, response.text
        assert "Satchel-Degraded" not in response.headers
        assert response.json()["degraded"] == []
        token = response.headers[HEADER]


@pytest.mark.parametrize("held", ["7", float("nan"), [1], 1e308, -3, True])
def test_a_count_in_metadata_that_is_not_a_plain_int_is_recounted(held: Any) -> None:
    """The example trusted its own metadata: an authenticated token (another app with
    the same keys and purpose) whose "exchanges" was a string, NaN or a list made
    POST /api/chat a 500."""
    from examples.minimal_chat.app import create_app

    ring = Keyring.generate("k1")
    app = create_app({"SATCHEL_KEYS": ring.to_string(), "TESTING": True})
    ctx = Context.new()
    ctx.add_turn("user", "hello")
    ctx.add_turn("assistant", "hi")
    ctx.metadata["exchanges"] = held
    token = Codec(ring).seal(ctx)
    resp = app.test_client().post(
        "/api/chat", json={"message": "and again"}, headers={"Satchel-Context": token}
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["reply"].startswith("(turn 2)")
