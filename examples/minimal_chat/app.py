"""A minimal chat API on Satchel: the context lives in the token the client carries.

Run it::

    SATCHEL_KEYS=$(satchel keygen) flask --app examples.minimal_chat.app run

    curl -si -X POST localhost:5000/api/chat -H 'Content-Type: application/json' \
         -d '{"message": "Hello"}'            # note the Satchel-Context header
    curl -s localhost:5000/api/context -H "Satchel-Context: <that token>"

Without SATCHEL_KEYS it generates a development key in ``instance/satchel-dev-key``
and warns. ``SATCHEL_OVERFLOW_URL`` (``sqlite:///path``, ``redis://...`` or empty) and
``SATCHEL_MAX_TOKEN_BYTES`` configure the overflow tier and the byte budget.

``SATCHEL_BASELINE=1`` serves the same routes with no context handling at all (no
Satchel extension; each reply is computed from the current message only): the
baseline that ``satchel compare`` measures the modes against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from examples._config import COMMON_ENV_KEYS, MAX_BODY_BYTES, configure_logging
from examples._config import env_config as read_env
from examples._config import read_message as read_checked_message
from satchel import Satchel
from satchel.errors import SatchelError
from satchel.flask_ext import json_errors_for
from satchel.flask_ext.errors import satchel_error_response

MAX_MESSAGE_CHARS = 8000

#: Environment variables this app reads into its config.
ENV_KEYS = COMMON_ENV_KEYS


def offline_reply(message: str, turn_number: int, summary: str) -> str:
    """A deterministic stand-in for a model, so the example runs anywhere."""
    words = message.split()
    topic = " ".join(words[:6]) if words else "that"
    more = "…" if len(words) > 6 else ""
    remembered = " I also remember what we discussed earlier." if summary else ""
    return (
        f'(turn {turn_number}) You said: "{topic}{more}". Here is a thoughtful, '
        f"deterministic reply about it, with a few details so the conversation has "
        f"some weight.{remembered}"
    )


def env_config() -> dict[str, Any]:
    """SATCHEL_* settings taken from the environment, as the example apps document."""
    return read_env(ENV_KEYS)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_path=str(Path(__file__).parent / "instance"))
    app.config.update(
        SATCHEL_DEV_KEY_FILE=os.path.join(app.instance_path, "satchel-dev-key"),
        SATCHEL_METRICS_ROUTE="/metrics",
        SATCHEL_HEALTH_ROUTES=True,
        # Refuse huge bodies before they are read (a JSON 413), not after parsing them.
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    app.config.update(env_config())
    app.config.update(config or {})
    configure_logging()  # Satchel's warnings reach the server's output
    if os.environ.get("SATCHEL_BASELINE") == "1":
        return _baseline(app)
    satchel = Satchel(app)
    json_errors_for(app, "/api/")

    @app.post("/api/chat")
    def chat() -> Any:
        message = read_message()
        ctx = satchel.context
        ctx.add_turn("user", message)
        # Counted in the app's metadata: the turns held shrink once the window trims.
        exchange = exchanges_of(ctx) + 1
        ctx.metadata["exchanges"] = exchange
        reply = offline_reply(message, exchange, ctx.summary)
        ctx.add_turn("assistant", reply)
        # Seal now, so the body reports what saving found (overflow, degraded reasons).
        satchel.commit()
        return {"reply": reply, "turns": len(ctx.turns), "degraded": ctx.degraded}

    @app.get("/api/context")
    def context() -> Any:
        ctx = satchel.context
        satchel.discard()  # reading issues no new token: the client keeps the one it sent
        data = ctx.to_dict()
        data["all_turns"] = [t.to_dict() for t in ctx.all_turns()]
        return data, {"Cache-Control": "no-store"}  # one user's conversation

    return app


def exchanges_of(ctx: Any) -> int:
    """The exchanges counted so far. Metadata is the app's own, and another app that
    shares the keys and purpose could have written anything there: a count that is not
    a plain int is recounted from the turns, never a 500."""
    held = ctx.metadata.get("exchanges")
    if type(held) is int and 0 <= held < 2**31:
        return held
    return len(ctx.all_turns()) // 2


def read_message() -> str:
    """The request's ``{"message": "..."}``, checked."""
    return read_checked_message(MAX_MESSAGE_CHARS)


def _baseline(app: Flask) -> Flask:
    """The same routes with no context handling (``SATCHEL_BASELINE=1``)."""
    app.register_error_handler(SatchelError, satchel_error_response)
    json_errors_for(app, "/api/")

    @app.post("/api/chat")
    def chat() -> Any:
        message = read_message()
        turns = [message]  # only the current message: nothing is remembered
        reply = offline_reply(message, len(turns) // 2 + 1, "")
        turns.append(reply)
        return {"reply": reply, "turns": len(turns), "degraded": []}

    @app.get("/api/context")
    def context() -> Any:
        return {"turns": [], "all_turns": [], "summary": ""}

    return app


if __name__ == "__main__":  # pragma: no cover - manual runs
    create_app().run(port=int(os.environ.get("PORT", "5000")))
