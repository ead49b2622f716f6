"""Checked by mypy (``make lint``, ``make test``), never run: the public API as an app
uses it must type-check, including the names ``satchel`` loads lazily."""

from __future__ import annotations

from typing import assert_type

from flask import Flask

from satchel import (
    BadToken,
    Codec,
    Context,
    Keyring,
    Role,
    Satchel,
    SatchelSessionInterface,
    Turn,
)


def build_app() -> Flask:
    app = Flask(__name__)
    satchel = Satchel(app)
    assert_type(satchel, Satchel)
    app.session_interface = SatchelSessionInterface()

    @app.post("/chat")
    def chat() -> dict[str, int]:
        ctx = satchel.context
        assert_type(ctx, Context)
        role: Role = "user"
        ctx.add_turn(role, "hello")
        satchel.commit()
        return {"turns": len(ctx.turns)}

    return app


def round_trip() -> str:
    codec = Codec(Keyring.generate(), mode="signed")
    ctx = Context.new()
    ctx.add_turn("user", "Hello!")
    token = codec.seal(ctx)
    assert_type(token, str)
    try:
        opened = codec.open(token)
    except BadToken as exc:
        return exc.code
    first: Turn = opened.turns[0]
    return first.role + first.content
