"""The SSE helper in both protocols: Satchel's own events and the AI SDK's UI stream."""

from __future__ import annotations

import json
from typing import Any

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
