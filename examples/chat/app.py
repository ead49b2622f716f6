"""A complete chat web app on Satchel: the browser carries each conversation's context.

Run it with ``make demo`` (or ``python -m examples.chat``) and open the printed URL.

Routes:

=========================== ==========================================================
``GET  /``                  the chat page (conversation list, thread, composer, status)
``POST /api/chat``          ``{"message": ...}`` -> ``{"reply": ..., ...}`` (JSON)
``POST /api/chat/stream``   the same, as server-sent events (``satchel.stream``): ``delta``
                            events, then ``satchel`` (the next token), then ``done``
``POST /api/chat/ai-sdk``   the same for a Vercel AI SDK frontend (``satchelAISDK``): the
                            UI message stream, the token in a ``data-satchel`` part
``GET  /api/context``       the context as JSON: every turn (overflowed ones read back
                            from the tier), summary, counts, token size; issues no token
``DELETE /api/context``     erase what the server keeps of the conversation (Delete chat)
``GET  /static/satchel/*``  the browser client (``client_js/src``, or an installed
                            satchel's copy), served as-is (``client_js_blueprint``)
``GET  /assets/*``          the page's own script and stylesheet
=========================== ==========================================================

Configuration comes from the environment (see docs/chat-example.md): ``SATCHEL_KEYS``
(else a development key in ``examples/chat/instance/``), ``SATCHEL_OVERFLOW_URL``
(default: a SQLite file in the instance folder; empty for none),
``SATCHEL_MAX_TOKEN_BYTES``, ``SATCHEL_MODE``, ``SATCHEL_CONSISTENCY``... and the model
from ``SATCHEL_MODEL_BASE_URL`` / ``SATCHEL_MODEL_API_KEY`` / ``SATCHEL_MODEL_NAME``
(default: the offline model). ``create_app(config)`` overrides any of them; ``CHAT_MODEL``
takes a model object (see ``models.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import mimetypes
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, render_template

from examples._config import COMMON_ENV_KEYS, MAX_BODY_BYTES, configure_logging, env_flag
from examples._config import env_config as read_env
from examples._config import read_message as read_checked_message
from satchel import Satchel
from satchel.errors import SatchelError
from satchel.flask_ext import json_body, json_errors_for
from satchel.flask_ext.client_js import client_js_blueprint, client_js_dir

from .llm_summarizer import LLMSummarizer
from .models import (
    DEFAULT_SYSTEM_PROMPT,
    ChatModel,
    ModelError,
    OfflineModel,
    build_messages,
    model_from_env,
)

log = logging.getLogger("satchel.examples.chat")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
#: The browser client's sources, served as-is at /static/satchel/ (no build step): the
#: checkout's client_js/src, or the copy an installed satchel carries.
CLIENT_JS_DIR = client_js_dir()
MAX_MESSAGE_CHARS = 8000

#: Environment variables read into the Flask config (see docs/chat-example.md).
ENV_KEYS = COMMON_ENV_KEYS

#: Everything the page loads comes from this app: no CDN, no web font, no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'; object-src 'none'"
)


class ModelUnavailable(SatchelError):
    """The model backend failed; the conversation is unchanged, try again."""

    code = "model_unavailable"
    status = 502


def _model_unavailable(exc: ModelError) -> ModelUnavailable:
    """The browser gets the short message; the log gets the provider's error type and
    code too (ModelError.detail), never its message or the conversation."""
    log.warning("chat model failed: %s%s", exc, f" ({exc.detail})" if exc.detail else "")
    return ModelUnavailable(str(exc))


def env_config() -> dict[str, Any]:
    """SATCHEL_* settings taken from the environment."""
    return read_env(ENV_KEYS)


def sqlite_tier_available() -> bool:
    """Whether ``satchel.tiers.sqlite`` (the embedded overflow tier) can be imported."""
    try:
        return importlib.util.find_spec("satchel.tiers.sqlite") is not None
    except (ImportError, ValueError):
        return False


def default_overflow_url(instance_path: str) -> str:
    """``sqlite:///<instance>/overflow.sqlite3`` when the SQLite tier exists, else none."""
    if not sqlite_tier_available():
        log.warning("satchel.tiers.sqlite is not available: running without an overflow tier")
        return ""
    return "sqlite:///" + os.path.join(instance_path, "overflow.sqlite3")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The chat app. ``config`` overrides the environment (``SATCHEL_*``, ``CHAT_*``)."""
    app = Flask(
        __name__,
        instance_path=str(HERE / "instance"),
        static_folder="static",
        static_url_path="/assets",
    )
    app.config.update(
        SATCHEL_DEV_KEY_FILE=os.path.join(app.instance_path, "satchel-dev-key"),
        SATCHEL_METRICS_ROUTE="/metrics",
        SATCHEL_HEALTH_ROUTES=True,
        CHAT_SYSTEM_PROMPT=DEFAULT_SYSTEM_PROMPT,
        CHAT_CLIENT_JS_DIR=str(CLIENT_JS_DIR),
        CHAT_MAX_MESSAGE_CHARS=MAX_MESSAGE_CHARS,
        # A chat message is a few KiB: refuse huge bodies before they are read (a JSON
        # 413 on /api/ routes), instead of parsing megabytes to refuse them after.
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        CHAT_LLM_SUMMARIZER=env_flag("SATCHEL_LLM_SUMMARIZER"),
    )
    app.config.update(env_config())
    app.config.update(config or {})
    configure_logging()  # Satchel's warnings reach the server's output
    if "SATCHEL_OVERFLOW_URL" not in app.config:
        url = default_overflow_url(app.instance_path)
        if url:
            os.makedirs(app.instance_path, exist_ok=True)
        app.config["SATCHEL_OVERFLOW_URL"] = url or None

    model: ChatModel = app.config.get("CHAT_MODEL") or model_from_env()
    app.config["CHAT_MODEL"] = model
    if app.config["CHAT_LLM_SUMMARIZER"] and "SATCHEL_SUMMARIZER" not in app.config:
        if isinstance(model, OfflineModel):
            log.warning("SATCHEL_LLM_SUMMARIZER is set but the model is offline: ignored")
        else:
            app.config["SATCHEL_SUMMARIZER"] = LLMSummarizer(model)

    satchel = Satchel(app)
    json_errors_for(app, "/api/")
    system_prompt: str = app.config["CHAT_SYSTEM_PROMPT"]
    max_chars = int(app.config["CHAT_MAX_MESSAGE_CHARS"])

    def read_message() -> str:
        return read_checked_message(max_chars)

    def stream_reply(ctx: Any, *, protocol: str) -> Response:
        """The model's reply to ``ctx`` streamed; the reply is saved as it completes."""
        messages = build_messages(ctx, default_prompt=system_prompt)

        def deltas() -> Any:
            try:
                yield from model.stream(messages)
            except ModelError as exc:
                # Becomes an error event; no token is issued, the client keeps its own.
                raise _model_unavailable(exc) from None

        def on_complete(text: str) -> None:
            if text:
                ctx.add_turn("assistant", text)

        return satchel.stream(deltas(), on_complete=on_complete, protocol=protocol)

    # -- the page ----------------------------------------------------------------------

    @app.get("/")
    def index() -> Response:
        html = render_template(
            "index.html",
            model_name=model.name,
            max_chars=max_chars,
            # SATCHEL_HEADER: the page's client sends and reads the token there.
            header_name=Satchel.state(app).config.header,
            # Where the conversation lives, for the page's own words about it.
            mode=Satchel.state(app).config.mode,
        )
        response = Response(html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    # The browser client's files (CHAT_CLIENT_JS_DIR: the checkout's client_js/src, or
    # the installed package's copy), read on each request.
    app.register_blueprint(
        client_js_blueprint(app.config["CHAT_CLIENT_JS_DIR"]), url_prefix="/static/satchel"
    )

    # -- the API -----------------------------------------------------------------------

    @app.post("/api/chat")
    def chat() -> Any:
        message = read_message()
        ctx = satchel.context
        _hold_user_turn(ctx, message, None)
        try:
            reply = model.complete(build_messages(ctx, default_prompt=system_prompt))
        except ModelError as exc:
            raise _model_unavailable(exc) from None
        if reply:
            ctx.add_turn("assistant", reply)
        satchel.commit()  # seal now, so the body reports what saving found
        return {
            "reply": reply,
            "turns": len(ctx.turns),
            "overflowed_turns": ctx.overflowed_turns,
            "degraded": ctx.degraded,
        }

    @app.post("/api/chat/stream")
    def chat_stream() -> Response:
        message = read_message()
        ctx = satchel.context
        _hold_user_turn(ctx, message, None)
        return stream_reply(ctx, protocol="satchel")

    @app.post("/api/chat/ai-sdk")
    def chat_ai_sdk() -> Response:
        """The same chat for a Vercel AI SDK frontend (``useChat`` with
        ``DefaultChatTransport`` and ``satchelAISDK(client)``, docs/client-js.md): the
        adapter sends only the newest user message, and the reply is the SDK's UI
        message stream with the token in a ``data-satchel`` part."""
        message = read_message()
        body = json_body()
        user_message_id = body.get("userMessageId")
        if not (isinstance(user_message_id, str) and _MESSAGE_ID.fullmatch(user_message_id)):
            user_message_id = None  # an older adapter, or not an id the SDK makes
        ctx = satchel.context
        turns = ctx.turns
        if body.get("trigger") == "regenerate-message" and _holds_as_last_user_turn(
            ctx, user_message_id, message
        ):
            # regenerate() of the message the context's last user turn holds: answer it
            # again, in place of its reply if it has one (an empty reply left none),
            # instead of holding the question twice. By id, not by text: after a failed
            # reply to a repeated "continue", the token still ends with the earlier
            # "continue" and its reply, and the regenerate is for the new one.
            if turns[-1].role == "assistant":
                del turns[-1]
            _note_user_turn(ctx, user_message_id)  # this save is the turn's newest
        else:
            _hold_user_turn(ctx, message, user_message_id)
        return stream_reply(ctx, protocol="ai-sdk")

    @app.get("/api/context")
    def context() -> Any:
        ctx = satchel.context
        satchel.discard()  # reading issues no new token: the client keeps the one it sent
        # A token refused and replaced by a fresh context (SATCHEL_ON_BAD_TOKEN=fresh, or
        # a server-mode session the store no longer has; the response says Satchel-Reset)
        # is not this chat's token any more: the chat holds none.
        reset = any(n.startswith("reset:") for n in ctx.notices)
        token = "" if reset else satchel.read_token() or ""
        state = Satchel.state()
        # Turns that left the token without a copy in the tier: only the summary has them.
        # Those a policy dropped (the window, say) are routine; those lost while the tier
        # refused them (data_loss) are a loss, said apart for as long as the chat lasts.
        lost = ctx.lifecycle.lost
        removed = sum(n for policy, n in ctx.lifecycle.dropped.items() if policy != "overflow")
        data = ctx.to_dict()
        data.update(
            all_turns=[t.to_dict() for t in ctx.all_turns()],
            held_turns=len(ctx.turns),
            rehydrated_turns=len(ctx.rehydrated),
            summarized_only_turns=max(0, removed - lost),
            lost_turns=lost,
            token_bytes=len(token.encode()),
            max_token_bytes=state.config.max_token_bytes,
            overflow_tier=_scheme(state.config.overflow_url),
            model=model.name,
        )
        return data, {"Cache-Control": "no-store"}  # one user's conversation

    @app.delete("/api/context")
    def erase_context() -> Any:
        """Delete chat: erase what the server keeps of this conversation (server and
        memory mode: all of it; client mode: its overflowed turns), and refuse its
        tokens where the server checks them (docs/consistency.md, erasure). The page
        forgets its token after this; the holder of a token could do as much anyway."""
        ctx = satchel.context
        satchel.discard()  # no new token for a conversation being erased
        reset = any(n.startswith("reset:") for n in ctx.notices)
        no_store = {"Cache-Control": "no-store"}  # about one user's conversation
        if reset or not satchel.read_token():
            return {"erased": False, "deleted_keys": 0}, no_store  # nothing was ever saved
        result = satchel.erase(ctx.session_id)
        return {"erased": True, "deleted_keys": result["deleted_keys"]}, no_store

    return app


#: ``ctx.metadata`` key: the AI SDK id of the message the last user turn holds
LAST_USER_KEY = "ai_sdk_user"
#: what an AI SDK message id looks like (its generators make short ASCII ids)
_MESSAGE_ID = re.compile(r"[!-~]{1,128}")


def _hold_user_turn(ctx: Any, message: str, message_id: str | None) -> None:
    """Add the user's turn, and record which AI SDK message it holds (none: a message
    from another route, or an adapter that sends no id), for a later
    ``regenerate-message``."""
    ctx.add_turn("user", message)
    _note_user_turn(ctx, message_id)


def _note_user_turn(ctx: Any, message_id: str | None) -> None:
    """Record that the context's last user turn holds AI SDK message ``message_id``,
    with the sequence number of the context it was saved from: the next token has the
    one after it, so a save by any other writer in between (a replica of an older
    release that adds turns without clearing the record, during a rolling deploy)
    shows, whatever the text or the second it was sent in."""
    if message_id is None:
        ctx.metadata.pop(LAST_USER_KEY, None)
    else:
        ctx.metadata[LAST_USER_KEY] = {"id": message_id, "seq": ctx.seq}


def _holds_as_last_user_turn(ctx: Any, message_id: str | None, message: str) -> bool:
    """Whether the context ends with the user turn that holds AI SDK message
    ``message_id`` (``message``), answered or not yet (a reply right after it)."""
    held = ctx.metadata.get(LAST_USER_KEY)
    turns = ctx.turns
    if turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    if message_id is None or not isinstance(held, dict) or not turns:
        return False
    last = turns[-1]
    held_seq = held.get("seq")
    return (
        held.get("id") == message_id
        and isinstance(held_seq, int)
        and ctx.seq == held_seq + 1  # no save by anyone else since
        and last.role == "user"
        and last.content == message
    )


def _scheme(url: str | None) -> str | None:
    """The tier kind only: a Redis URL may carry a password."""
    if not url:
        return None
    return urlsplit(url).scheme or None


mimetypes.add_type("text/javascript", ".js")  # some systems map .js to text/plain


__all__ = ["ENV_KEYS", "ModelUnavailable", "create_app", "env_config"]
