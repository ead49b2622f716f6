"""The SSE helper in both protocols: Satchel's own events and the AI SDK's UI stream."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from flask import Flask

from satchel import Keyring, Satchel

KEYS = Keyring.generate("k1")


def make_app(deltas: tuple[str, ...] = ("Once ", "upon ", "a time.")) -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True)
    satchel = Satchel(app)

    @app.post("/stream/<protocol>")
    def stream(protocol: str) -> Any:
        ctx = satchel.context
        ctx.add_turn("user", "tell me a story")

        def done(text: str) -> None:
            ctx.add_turn("assistant", text)

        return satchel.stream(iter(deltas), on_complete=done, protocol=protocol)

    return app, satchel


def data_lines(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def test_satchel_protocol_ends_with_a_token_that_holds_the_reply() -> None:
    app, satchel = make_app()
    response = app.test_client().post("/stream/satchel")
    assert response.mimetype == "text/event-stream"
    body = response.get_data(as_text=True)
    events = [line[7:] for line in body.splitlines() if line.startswith("event: ")]
    assert events == ["delta", "delta", "delta", "satchel", "done"]
    final = json.loads(data_lines(body)[3])
    with app.app_context():
        ctx = satchel.codec.open(final["token"])
    assert [t.content for t in ctx.turns] == ["tell me a story", "Once upon a time."]
    assert final["seq"] == ctx.seq


def test_ai_sdk_protocol_speaks_the_ui_message_stream() -> None:
    app, satchel = make_app()
    response = app.test_client().post("/stream/ai-sdk")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    lines = data_lines(response.get_data(as_text=True))
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert [c["type"] for c in chunks] == [
        "start",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "data-satchel",
        "finish",
    ]
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "Once upon a time."
    part = chunks[6]
    assert part["transient"] is True
    with app.app_context():
        ctx = satchel.codec.open(part["data"]["token"])
    assert ctx.turns[-1].content == "Once upon a time."


@pytest.mark.parametrize("protocol", ["satchel", "ai-sdk"])
@pytest.mark.parametrize("interval", [0.0, 1e9])
def test_empty_deltas_send_keep_alive_comments(
    protocol: str, interval: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reasoning model can be silent for minutes; a proxy closes a response that
    sends nothing for 60 s (nginx), and a satchel-protocol stream sent no byte, not
    even its headers, before the first text. An empty delta now sends an SSE comment
    (which every reader skips): the first at once, then one per KEEPALIVE_INTERVAL."""
    import satchel.flask_ext as ext

    monkeypatch.setattr(ext, "KEEPALIVE_INTERVAL", interval)
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS)
    satchel = Satchel(app)

    @app.post("/think")
    def think() -> Any:
        ctx = satchel.context
        return satchel.stream(
            iter(["", "", "", "Done.", ""]),
            on_complete=lambda text: ctx.add_turn("assistant", text),
            protocol=protocol,
        )

    response = app.test_client().post("/think", buffered=False)
    chunks = [c.decode() if isinstance(c, bytes) else c for c in response.response]
    first = chunks[0] if protocol == "satchel" else chunks[2]  # ai-sdk: after start chunks
    assert first == ": keep-alive\n\n"  # before any text: the headers are out
    comments = [c for c in chunks if c.startswith(":")]
    assert len(comments) == (4 if interval == 0 else 1)
    body = "".join(chunks)
    with app.app_context():  # the comments change nothing else
        if protocol == "satchel":
            final = json.loads(data_lines(body)[1])
        else:
            final = json.loads(data_lines(body)[-3])["data"]
        assert satchel.codec.open(final["token"]).turns[-1].content == "Done."


@pytest.mark.parametrize("protocol", ["satchel", "ai-sdk"])
def test_a_stream_carries_the_degraded_reasons_known_before_it_starts(protocol: str) -> None:
    """A context whose overflowed turns could not be read was flagged only in the final
    event: a client reading headers (curl, a proxy's log, useChat's fetch) never saw
    Satchel-Degraded on a streamed reply. The reasons known when the stream starts are
    now in its headers too; the final event still carries them all."""
    from satchel.metrics import PrometheusObserver
    from satchel.tiers import MemoryTier

    tier = MemoryTier()
    metrics = PrometheusObserver()
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        TESTING=True,
        SATCHEL_MAX_TOKEN_BYTES=1500,
        SATCHEL_SEGMENT_CACHE_BYTES=0,  # the tier alone holds the segments
    )
    satchel = Satchel(app, tier=tier, observer=metrics)

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", secrets.token_urlsafe(300))  # incompressible
        satchel.context.add_turn("assistant", secrets.token_urlsafe(300))
        return {}

    @app.post("/stream")
    def stream() -> Any:
        ctx = satchel.context
        return satchel.stream(
            iter(["hi"]), on_complete=lambda t: ctx.add_turn("assistant", t), protocol=protocol
        )

    @app.post("/failing-stream")
    def failing_stream() -> Any:
        def deltas() -> Any:
            yield "partial "
            raise RuntimeError("the model failed")

        return satchel.stream(deltas(), on_complete=lambda t: None, protocol=protocol)

    def degraded_responses() -> float:
        return metrics.registry.get_sample_value("satchel_degraded_responses_total") or 0

    client = app.test_client()
    token = None
    for _ in range(8):
        resp = client.post("/chat", headers={"Satchel-Context": token} if token else {})
        token = resp.headers["Satchel-Context"]
    plain = client.post("/stream", headers={"Satchel-Context": token})
    assert "Satchel-Degraded" not in plain.headers  # nothing degraded: no header
    plain.get_data()
    tier.clear()  # the overflowed turns are gone
    resp = client.post("/stream", headers={"Satchel-Context": token})
    assert resp.headers["Satchel-Degraded"] == "segment_missing"
    body = resp.get_data(as_text=True)
    assert "segment_missing" in body  # and in the final event
    assert degraded_responses() == 1  # one response, said in its headers and its end

    # A reply that fails after its headers went out still carried Satchel-Degraded:
    # counted, though no final event (and no finish) follows.
    failed = client.post("/failing-stream", headers={"Satchel-Context": token})
    assert failed.headers["Satchel-Degraded"] == "segment_missing"
    assert "error" in failed.get_data(as_text=True)
    assert degraded_responses() == 2


def test_stream_and_discard_refuse_each_other() -> None:
    """A view that called discard() and then streamed had its context saved anyway (a
    token in the final event, a turn stored in memory mode): what discard() promised
    not to do. Either order is the app's mistake, said at once."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=Keyring.generate().to_string(), SATCHEL_MODE="memory")
    satchel = Satchel(app)
    seen: list[str] = []

    @app.post("/discard-then-stream")
    def discard_then_stream() -> Any:
        satchel.context.add_turn("user", "scratch, must not be kept")
        satchel.discard()
        try:
            return satchel.stream(iter(["x"]))
        except RuntimeError as exc:
            seen.append(str(exc))
            return {"ok": False}

    @app.post("/stream-then-discard")
    def stream_then_discard() -> Any:
        response = satchel.stream(iter(["x"]))
        try:
            satchel.discard()
        except RuntimeError as exc:
            seen.append(str(exc))
        return response

    client = app.test_client()
    refused = client.post("/discard-then-stream")
    assert refused.get_json() == {"ok": False} and "Satchel-Context" not in refused.headers
    streamed = client.post("/stream-then-discard")
    assert "event: satchel" in streamed.get_data(as_text=True)
    assert seen == [
        "stream() after discard(): a streamed reply ends with a token",
        "discard() after stream(): a streamed reply ends with a token",
    ]


def test_a_surrogate_pair_split_across_two_deltas_is_saved_as_its_character() -> None:
    """A provider's JSON chunks can split an emoji ("\\ud83d" then "\\ude00"): the
    client joins them and shows it, and the reply was refused invalid_text at the save,
    after all of it had streamed. A lone surrogate is still refused."""
    app, satchel = make_app(("A \ud83d", "\ude00 B"))
    body = app.test_client().post("/stream/satchel").get_data(as_text=True)
    final = json.loads(data_lines(body)[-2])
    with app.app_context():
        assert satchel.codec.open(final["token"]).turns[-1].content == "A \U0001f600 B"
    app, _ = make_app(("A \ud83d", " B"))
    lone = app.test_client().post("/stream/satchel").get_data(as_text=True)
    assert "event: error" in lone and "invalid_text" in lone
