"""AuditObserver + JSON lines: every event is logged, and no secret ever is.

Requests go through a real Flask app; the log is captured as the JSON lines an
operator would ship, and searched in full for tokens, key material and message text.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, request

from satchel import Satchel
from satchel.audit import (
    ALLOWED_FIELDS,
    AuditObserver,
    JsonLinesFormatter,
    configure_json_logging,
    safe_fields,
)
from satchel.context import Context
from satchel.keys import Keyring
from satchel.observe import MultiObserver
from satchel.tiers import MemoryTier

KEYS = Keyring.generate("audit1")
KEYS_STRING = KEYS.to_string()
SECRET = KEYS_STRING.partition(":")[2]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The "satchel" logger as JSON lines into a buffer; restored afterwards."""
    logger = logging.getLogger("satchel")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    configure_json_logging("satchel", stream=stream)
    try:
        yield stream
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
    return [json.loads(line) for line in lines]


def audit_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [r for r in records(stream) if r["logger"] == "satchel.audit"]


def words(n: int = 30) -> str:
    return " ".join(secrets.token_hex(4) for _ in range(n))


def make_app(**config: Any) -> tuple[Flask, Satchel]:
    tier = config.pop("tier", None)
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS_STRING, **config)
    ext = Satchel(app, observer=AuditObserver(), tier=tier)

    @app.post("/chat")
    def chat() -> Any:
        ctx = ext.context
        ctx.add_turn("user", request.get_json()["message"])
        ctx.add_turn("assistant", "echo " + request.get_json()["message"])
        return {"turns": len(ctx.turns), "degraded": ctx.degraded}

    return app, ext


def test_events_are_logged_as_json_lines_without_secrets(log_stream: io.StringIO) -> None:
    app, ext = make_app(tier=MemoryTier(), SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    client = app.test_client()
    messages: list[str] = []
    tokens: list[str] = []
    token = None
    for i in range(6):
        message = f"my secret plan number {i}: " + words()
        messages.append(message)
        headers = {"Satchel-Context": token} if token else {}
        resp = client.post("/chat", json={"message": message}, headers=headers)
        assert resp.status_code == 200
        token = resp.headers["Satchel-Context"]
        tokens.append(token)
    session_tag = resp.headers["Satchel-Session"]
    session_id = ext.state(app).codec.open(token).session_id

    # refused: tampered, then expired
    i = len(token) // 2
    tampered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    assert (
        client.post(
            "/chat", json={"message": "x"}, headers={"Satchel-Context": tampered}
        ).status_code
        == 400
    )
    expired = ext.state(app).codec.seal(Context.new(now=time.time() - 8 * 86400))
    tokens.append(expired)
    assert (
        client.post(
            "/chat", json={"message": "x"}, headers={"Satchel-Context": expired}
        ).status_code
        == 401
    )

    events = audit_events(log_stream)
    names = [e["event"] for e in events]
    for expected in (
        "session_started",
        "issued",
        "opened",
        "overflowed",
        "rehydrated",
        "summarized",
        "refused",
        "expired",
    ):
        assert expected in names, expected

    for e in events:
        assert set(e) >= {"ts", "level", "logger", "event"}
        assert e["ts"].endswith("Z")
        assert set(e) - {"ts", "level", "logger", "event"} <= ALLOWED_FIELDS

    issued = [e for e in events if e["event"] == "issued"]
    assert [e["seq"] for e in issued] == list(range(1, 7))
    assert issued[-1] == {
        "ts": issued[-1]["ts"],
        "level": "INFO",
        "logger": "satchel.audit",
        "event": "issued",
        "session": session_tag,
        "seq": 6,
        "bytes": len(tokens[5]),
        "turns": issued[-1]["turns"],
    }
    opened = [e for e in events if e["event"] == "opened"]
    assert opened[0]["kid"] == "audit1" and opened[0]["mode"] == "sealed"
    refused = [e["reason"] for e in events if e["event"] == "refused"]
    assert refused == ["token_bad_signature", "token_expired"]
    assert [e["reason"] for e in events if e["event"] == "expired"] == ["idle"]

    # the whole log, audit and ordinary records alike
    text = log_stream.getvalue()
    plain = [r for r in records(log_stream) if r["logger"] == "satchel"]
    assert any("token_bad_signature" in r["event"] for r in plain)  # the extension's own log
    for tok in [*tokens, tampered]:
        assert tok not in text
        assert tok[3:40] not in text
    assert SECRET not in text and KEYS_STRING not in text
    for message in messages:
        assert message not in text
        for word in message.split()[5:]:
            assert word not in text
    assert "echo" not in text and "secret plan" not in text
    assert session_id.hex() not in text


def test_observer_drops_everything_outside_the_allow_list(log_stream: io.StringIO) -> None:
    obs = AuditObserver()
    obs.event(
        "issued",
        session="0123456789abcdef",
        seq=3,
        token="s1.AAAA" + "x" * 200,
        key=SECRET,
        secret=b"raw-bytes",
        message="hello there",
        content="the whole conversation",
        detail="s1.looks-like-a-token",
        reason="x" * 500,
        tier={"nested": "dict"},
        kid="k1",
    )
    obs.event("opened", session="0123456789abcdef0123456789abcdef")  # a raw 16-byte id
    obs.event("data_loss", session="0123456789abcdef", turns=3)
    events = audit_events(log_stream)
    assert events[0] == {
        "ts": events[0]["ts"],
        "level": "INFO",
        "logger": "satchel.audit",
        "event": "issued",
        "session": "0123456789abcdef",
        "seq": 3,
        "kid": "k1",
    }
    assert "session" not in events[1]
    assert events[2]["level"] == "WARNING" and events[2]["turns"] == 3
    text = log_stream.getvalue()
    for leaked in ("s1.", SECRET, "raw-bytes", "hello there", "conversation", "xxxx", "nested"):
        assert leaked not in text


def test_every_credential_satchel_issues_is_dropped_as_a_token() -> None:
    """Only s1. was known: a server-mode carrier (sv1.<id>.<sig>, the bearer credential
    of server and memory mode) and a Flask-session reference (so1.) were logged."""
    from satchel.envelope import KNOWN_PREFIXES
    from satchel.flask_ext.session_overflow import PREFIX as SESSION_REF_PREFIX
    from satchel.server_mode import CARRIER_PREFIX

    carrier = f"{CARRIER_PREFIX}ae6990c2b71902b30559ad8816b03547.n93Ljc6f1pX0mEZ9vS2rGq4T8w"
    reference = f"{SESSION_REF_PREFIX}c2F0Y2hlbDpmc2Vzcw.abc"
    looks_like = [carrier, reference, *(f"{p}AQMBA29sZGsL8BcAAAAA3ySCCyt" for p in KNOWN_PREFIXES)]
    fields = {"detail": "kept", "reason": carrier, "error": reference}
    assert safe_fields(fields) == {"detail": "kept"}
    for value in looks_like:
        assert safe_fields({"detail": value}) == {}, value
        record = logging.LogRecord("satchel.audit", logging.INFO, __file__, 1, "x", None, None)
        record.satchel = {"detail": value, "reason": "r"}  # type: ignore[attr-defined]
        line = JsonLinesFormatter().format(record)
        assert value not in line and json.loads(line)["reason"] == "r", line


def captured(name: str, level: int) -> tuple[logging.Logger, list[logging.LogRecord]]:
    """A logger of its own at ``level``, and the records it has handled."""
    logger = logging.getLogger(name)
    logger.propagate = False
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger.addHandler(Capture())
    logger.setLevel(level)
    return logger, seen


def test_record_shape_for_plain_handlers_and_level_filtering() -> None:
    logger, seen = captured("satchel.audit.shape-test", logging.INFO)
    AuditObserver(logger, level=logging.DEBUG).event("opened", seq=1)  # below the logger level
    obs = AuditObserver(logger, events={"refused"})
    obs.event("issued", seq=1)  # not selected
    obs.event("refused", reason="token_expired", token="s1.abc")
    assert len(seen) == 1
    record = seen[0]
    assert record.getMessage() == "refused"
    assert record.satchel_event == "refused"  # type: ignore[attr-defined]
    assert record.satchel == {"reason": "token_expired"}  # type: ignore[attr-defined]
    assert record.levelno == logging.INFO


def test_formatter_filters_records_that_bypassed_the_observer() -> None:
    record = logging.LogRecord("satchel", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    record.satchel = {"reason": "r", "token": "s1.zzz", "session": "nothex"}
    data = json.loads(JsonLinesFormatter().format(record))
    assert data["event"] == "boom x" and data["level"] == "ERROR"
    assert data["reason"] == "r" and "token" not in data and "session" not in data
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonLinesFormatter().format(record)
    assert "\n" not in line and "line two" in json.loads(line)["exc"]


def test_configure_json_logging_is_idempotent() -> None:
    logger = logging.getLogger("satchel.audit.idem-test")
    first, second = io.StringIO(), io.StringIO()
    configure_json_logging(logger.name, stream=first)
    handler = configure_json_logging(logger.name, stream=second)
    assert [h for h in logger.handlers if h is handler] == [handler]
    assert len(logger.handlers) == 1 and not logger.propagate
    AuditObserver(logger).event("erased", session="0123456789abcdef", count=2)
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["count"] == 2
    logger.removeHandler(handler)


def test_a_failing_audit_never_breaks_a_request(log_stream: io.StringIO) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("disk full")

        def handleError(self, record: logging.LogRecord) -> None:
            raise RuntimeError("still broken")

    logger = logging.getLogger("satchel.audit.broken-test")
    logger.propagate = False
    logger.addHandler(Broken())
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS_STRING)
    ext = Satchel(app, observer=MultiObserver([AuditObserver(logger)]))

    @app.get("/n")
    def n() -> Any:
        return {"seq": ext.context.seq}

    resp = app.test_client().get("/n")
    assert resp.status_code == 200 and "Satchel-Context" in resp.headers


def test_safe_fields() -> None:
    assert safe_fields({"turns": 2, "bytes": 10, "from_cache": 0, "tier": "redis"}) == {
        "turns": 2,
        "bytes": 10,
        "from_cache": 0,
        "tier": "redis",
    }
    assert safe_fields({"session": 5, "user": "alice", "keys": "k1:abc"}) == {}


def test_failing_app_code_is_logged_without_the_content_it_quotes(
    log_stream: io.StringIO,
) -> None:
    """A summarizer or a reply generator (an LLM call) may raise with the prompt in its
    message; the log says which exception and where, not what it quotes, at any level
    (log pipelines keep DEBUG too)."""
    secret_text = "my card number is 4111 1111 1111 1111"
    logging.getLogger("satchel").setLevel(logging.DEBUG)

    def llm_summarizer(dropped: Any, previous: str) -> str:
        raise RuntimeError(f"model rejected the prompt: {dropped[0].content!r}")

    app, ext = make_app(SATCHEL_MAX_TURNS=2, SATCHEL_SUMMARIZER=llm_summarizer)

    @app.post("/stream")
    def stream() -> Any:
        ctx = ext.context
        ctx.add_turn("user", secret_text)

        def deltas() -> Iterator[str]:
            yield "partial "
            raise ValueError(f"upstream failed on {secret_text!r}")

        return ext.stream(deltas())

    client = app.test_client()
    token = None
    for _ in range(3):  # the window of 2 makes the summarizer run
        r = client.post(
            "/chat",
            json={"message": secret_text},
            headers={"Satchel-Context": token} if token else {},
        )
        assert r.status_code == 200
        token = r.headers["Satchel-Context"]
    assert "summarized" in [e["event"] for e in audit_events(log_stream)]
    body = client.post("/stream", headers={"Satchel-Context": token}).get_data(as_text=True)
    assert "stream_failed" in body
    text = log_stream.getvalue()
    assert "4111" not in text and "card number" not in text
    plain = [r["event"] for r in records(log_stream) if r["logger"] == "satchel"]
    assert any(
        re.fullmatch(
            r"satchel summarizer failed \(RuntimeError at test_audit\.py:\d+\); "
            r"used the extractive fallback",
            line,
        )
        for line in plain
    ), plain
    assert any(
        re.fullmatch(r"satchel stream failed \(ValueError at test_audit\.py:\d+\)", line)
        for line in plain
    ), plain


def test_a_session_tag_with_a_trailing_newline_is_dropped() -> None:
    """The pattern's $ matched before a final newline: such a value is not a tag."""
    from satchel.audit import safe_fields

    assert safe_fields({"session": "0123456789abcdef"}) == {"session": "0123456789abcdef"}
    assert safe_fields({"session": "0123456789abcdef\n"}) == {}


def test_unconfigured_logging_prints_the_extensions_warnings_but_not_audit_events(tmp_path):
    """An app that configures no logging still sees the extension's warnings (a
    generated development key here) on stderr, through Python's last-resort handler;
    the audit events (a fork, at WARNING) stay silent until the app attaches a handler."""
    import subprocess
    import sys

    script = f"""
from flask import Flask
from satchel import Satchel, Context
from satchel.audit import AuditObserver
app = Flask("plain")
app.config["SATCHEL_DEV_KEY_FILE"] = {str(tmp_path / "dev-key")!r}
satchel = Satchel(app, observer=AuditObserver())

@app.post("/chat")
def chat():
    satchel.context.add_turn("user", "hello")
    return {{}}

client = app.test_client()
token = client.post("/chat").headers["Satchel-Context"]
client.post("/chat", headers={{"Satchel-Context": token}})
client.post("/chat", headers={{"Satchel-Context": token}})  # a fork: fork_detected
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "generated a development key" in done.stderr
    assert "fork_detected" not in done.stderr


def test_degraded_paths_are_warnings_one_record_per_reason_per_throttle_window() -> None:
    """At the usual WARNING level a lost conversation or a corrupt segment left no log
    line (degraded events were INFO); logged for every request of an outage, they would
    bury the rest of the log. One record per reason per window, with a count."""
    logger, seen = captured("satchel.audit.throttle-test", logging.WARNING)
    now = [100.0]
    obs = AuditObserver(logger, throttle=10, clock=lambda: now[0])
    for t in (100.0, 101.0, 109.0):
        now[0] = t
        obs.event("degraded", session="ab" * 8, reason="segment_missing", turns=4)
    obs.event("degraded", reason="segment_corrupt")  # another reason: its own window
    obs.event("unavailable", reason="tier_unavailable", mode="server")
    obs.event("refused", reason="session_not_found", mode="server")  # the store lost it
    obs.event("refused", reason="token_bad_signature")  # bad input: INFO, not shown here
    now[0] = 110.0
    obs.event("degraded", reason="segment_missing")
    shown = [(r.getMessage(), r.satchel.get("reason"), r.satchel.get("suppressed")) for r in seen]  # type: ignore[attr-defined]
    assert shown == [
        ("degraded", "segment_missing", None),
        ("degraded", "segment_corrupt", None),
        ("unavailable", "tier_unavailable", None),
        ("refused", "session_not_found", None),
        ("degraded", "segment_missing", 2),  # the two left out since
    ]
    assert all(r.levelno == logging.WARNING for r in seen)
    seen.clear()
    every = AuditObserver(logger, throttle=0)
    for _ in range(3):
        every.event("degraded", reason="tier_unavailable")
    assert len(seen) == 3
    with pytest.raises(ValueError):
        AuditObserver(logger, throttle=-1)


def test_a_lost_segment_is_logged_at_warning_through_the_app(log_stream: io.StringIO) -> None:
    tier = MemoryTier()
    app, _ext = make_app(tier=tier, SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    logging.getLogger("satchel").setLevel(logging.WARNING)
    client = app.test_client()
    token = None
    for _ in range(6):
        headers = {"Satchel-Context": token} if token else {}
        token = client.post("/chat", json={"message": words()}, headers=headers).headers[
            "Satchel-Context"
        ]
    tier.clear()  # the store restarted empty: the spilled turns are gone
    # Another worker (this one's segment cache still holds them).
    other, _ = make_app(tier=tier, SATCHEL_MAX_TOKEN_BYTES=700, SATCHEL_MAX_TURNS=None)
    resp = other.test_client().post(
        "/chat", json={"message": "x"}, headers={"Satchel-Context": token}
    )
    assert resp.status_code == 200 and "segment_missing" in resp.get_json()["degraded"]
    warned = [
        e for e in audit_events(log_stream) if e["event"] == "degraded" and e["level"] == "WARNING"
    ]
    assert [e["reason"] for e in warned] == ["segment_missing"]


def test_the_audit_knows_every_credential_prefix_satchel_issues() -> None:
    from satchel import audit, envelope, server_mode
    from satchel.flask_ext import session_overflow

    issued = {*envelope.KNOWN_PREFIXES, server_mode.CARRIER_PREFIX, session_overflow.PREFIX}
    assert issued <= set(audit.TOKEN_PREFIXES)


def test_the_documented_audit_fields_are_the_allowed_ones() -> None:
    """docs/operations.md lists the fields an audit record may carry; it left out two
    that real records carry (recovered, suppressed)."""
    from pathlib import Path

    from satchel.audit import ALLOWED_FIELDS

    doc = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    listed = doc.split("**What is never logged.** Audit records keep only allow-listed fields (")[1]
    listed = listed.split(")", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == set(ALLOWED_FIELDS)
