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


def streamed_reply(satchel: Satchel) -> None:
    """The natural on_complete (add_turn returns the Turn) and the metrics observer."""
    from flask import Response

    from satchel.metrics import PrometheusObserver

    ctx = satchel.context
    response = satchel.stream(iter(["a"]), on_complete=lambda text: ctx.add_turn("assistant", text))
    assert_type(response, Response)
    assert_type(satchel.metrics, PrometheusObserver | None)


# A misspelt name must be an error, not ``object``/``Any`` from the lazy __getattr__s.
import satchel as _satchel_module  # noqa: E402
import satchel.tiers as _tiers_module  # noqa: E402

_misspelt = _satchel_module.Sachel  # type: ignore[attr-defined]
_misspelt_tier = _tiers_module.RedisTeir  # type: ignore[attr-defined]
