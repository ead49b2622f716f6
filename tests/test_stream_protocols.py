"""The SSE helper in both protocols: Satchel's own events and the AI SDK's UI stream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask

from satchel import Keyring, Satchel

KEYS = Keyring.generate("k1")


def make_app() -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True)
    satchel = Satchel(app)

    @app.post("/stream/<protocol>")
    def stream(protocol: str) -> Any:
        ctx = satchel.context
        ctx.add_turn("user", "tell me a story")

        def done(text: str) -> None:
            ctx.add_turn("assistant", text)

        return satchel.stream(
            iter(["Once ", "upon ", "a time."]), on_complete=done, protocol=protocol
        )

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
