"""The Flask extension: open the context before the view, seal it after.

::

    app = Flask(__name__)
    satchel = Satchel(app)          # or satchel.init_app(app) in a factory

    @app.post("/api/chat")
    def chat():
        ctx = satchel.context       # opened, migrated, rehydrated on first access
        ctx.add_turn("user", request.json["message"])
        ...
        return {"reply": reply}     # the next token goes out in Satchel-Context

Per request: the token is read from the ``Satchel-Context`` header (or a cookie or
JSON body field when configured), opened lazily on first access, and after the view
the lifecycle policies run, the context is sealed, and the next token is written to
the response with ``Server-Timing`` for each step. A bad token becomes a JSON 4xx (or,
with ``SATCHEL_ON_BAD_TOKEN = "fresh"``, a fresh context and a ``Satchel-Reset`` header).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, g, request, stream_with_context
from werkzeug.exceptions import HTTPException

from ..codec import Codec
from ..context import Context
from ..errors import BadToken, ConfigurationError, SatchelError
from ..keys import Keyring
from ..lifecycle import LifecyclePolicy
from ..limits import Limits
from ..observe import MultiObserver, Observer
from ..pipeline import Pipeline
from .config import SatchelConfig, keyring_from_config
from .errors import error_response, http_error_response, satchel_error_response

log = logging.getLogger("satchel")

HEADER_CONTEXT = "Satchel-Context"
RESPONSE_HEADERS = (
    "Satchel-Context",
    "Satchel-Seq",
    "Satchel-Session",
    "Satchel-Degraded",
    "Satchel-Reset",
    "Satchel-Fork",
    "Server-Timing",
)


@dataclass(slots=True)
class RequestState:
    """What the extension knows about the current request."""

    context: Context | None = None
    token: str | None = None
    reset: str | None = None
    fork: str | None = None
    streaming: bool = False
    discard: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    consistency: str | None = None


class Satchel:
    """Client-held chat context for a Flask app (``init_app`` and ``SATCHEL_*`` config)."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        keyring: Keyring | None = None,
        policy: LifecyclePolicy | None = None,
        observer: Observer | None = None,
        tier: Any = None,
    ) -> None:
        self._keyring = keyring
        self._policy = policy
        self._tier = tier
        self.observer = MultiObserver([observer] if observer else [])
        if app is not None:
            self.init_app(app)

    # -- setup --------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        config = SatchelConfig.from_app(app)
        keyring = self._keyring or keyring_from_config(app, config)
        limits = Limits(max_token_bytes=config.token_limit)
        codec = Codec(
            keyring,
            mode=config.token_mode,
            purpose=config.purpose,
            limits=limits,
            algorithm=config.aead,
        )
        policy = self._policy or config.lifecycle_policy()
        segments, tier = self._build_tier(app, config, codec)
        pipeline = Pipeline(codec, policy, segments=segments, observer=self.observer)
        app.extensions["satchel"] = _AppState(self, config, codec, pipeline, tier, segments)

        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(SatchelError, self._handle_error)
        self._register_extras(app)

    def _build_tier(self, app: Flask, config: SatchelConfig, codec: Codec) -> tuple[Any, Any]:
        tier = self._tier
        if tier is None and config.overflow_url:
            from ..tiers import tier_from_url

            tier = tier_from_url(config.overflow_url)
        if tier is None:
            return None, None
        from ..segments import SegmentStore
        from ..tiers.guard import GuardedTier

        guarded = (
            tier if isinstance(tier, GuardedTier) else GuardedTier(tier, on_event=self._tier_event)
        )
        return SegmentStore(guarded, codec), guarded

    def _tier_event(self, name: str, **fields: Any) -> None:
        self.observer.event(name, **fields)

    def _register_extras(self, app: Flask) -> None:
        """Optional routes (metrics, health) are added by their modules when enabled."""
        hooks: Iterable[Callable[[Flask, Satchel], None]] = getattr(self, "_extra_hooks", ())
        for hook in hooks:
            hook(app, self)

    # -- per-app state --------------------------------------------------------------------

    @staticmethod
    def state(app: Flask | None = None) -> _AppState:
        app = app or current_app
        try:
            return app.extensions["satchel"]
        except KeyError:
            raise ConfigurationError("Satchel is not initialised on this app") from None

    @property
    def codec(self) -> Codec:
        return self.state().codec

    @property
    def pipeline(self) -> Pipeline:
        return self.state().pipeline

    @property
    def keyring(self) -> Keyring:
        return self.state().codec.keyring

    # -- request hooks --------------------------------------------------------------------

    def _before_request(self) -> None:
        g._satchel = RequestState()

    @staticmethod
    def _request_state() -> RequestState:
        state = g.get("_satchel")
        if state is None:
            state = g._satchel = RequestState()
        return state

    def read_token(self) -> str | None:
        """The token the client sent: header first, then cookie, then JSON field."""
        config = self.state().config
        token = request.headers.get(config.header)
        if not token and config.cookie_name:
            token = request.cookies.get(config.cookie_name)
        if not token and config.json_field and request.is_json:
            body = request.get_json(silent=True)
            if isinstance(body, dict) and isinstance(body.get(config.json_field), str):
                token = body[config.json_field]
        return token.strip() if token else None

    @property
    def context(self) -> Context:
        """The current request's context, opened on first access."""
        return self.get_context()

    def get_context(self) -> Context:
        rs = self._request_state()
        if rs.context is None:
            app_state = self.state()
            token = self.read_token()
            rs.token = token
            try:
                rs.context = app_state.pipeline.load(token, timings=rs.timings)
            except BadToken as exc:
                if app_state.config.on_bad_token != "fresh":
                    log.info("satchel refused token: %s", exc.code)
                    raise
                log.info("satchel started a fresh context: %s", exc.code)
                rs.reset = exc.code
                rs.context = app_state.pipeline.new_context()
                rs.context.notices.append(f"reset:{exc.code}")
        return rs.context

    def discard(self) -> None:
        """Do not issue a new token for this request (for read-only routes)."""
        self._request_state().discard = True

    def _after_request(self, response: Response) -> Response:
        rs: RequestState | None = g.get("_satchel")
        if rs is None or rs.context is None or rs.streaming or rs.discard:
            return response
        if response.status_code >= 500:
            return response  # a failed view issues no token: the client keeps its own
        try:
            headers = self.finish(rs)
        except SatchelError as exc:
            return satchel_error_response(exc)
        response.headers.extend(headers)
        self._expose_headers(response)
        config = self.state().config
        if config.cookie_name:
            response.set_cookie(
                config.cookie_name,
                headers[HEADER_CONTEXT],
                max_age=config.cookie_max_age,
                secure=config.cookie_secure,
                httponly=True,
                samesite=config.cookie_samesite,
                path=config.cookie_path,
            )
        return response

    def finish(self, rs: RequestState) -> dict[str, str]:
        """Seal the request's context and return the response headers to send."""
        app_state = self.state()
        ctx = rs.context
        assert ctx is not None
        result = app_state.pipeline.save(ctx, timings=rs.timings)
        headers = {
            HEADER_CONTEXT: result.token,
            "Satchel-Seq": str(ctx.seq),
            "Satchel-Session": app_state.pipeline.session_tag(ctx.session_id),
        }
        if ctx.degraded:
            headers["Satchel-Degraded"] = ", ".join(dict.fromkeys(ctx.degraded))
        if rs.reset:
            headers["Satchel-Reset"] = rs.reset
        if rs.fork:
            headers["Satchel-Fork"] = rs.fork
        headers["Server-Timing"] = server_timing(rs.timings, time.perf_counter() - rs.started)
        return headers

    @staticmethod
    def _expose_headers(response: Response) -> None:
        existing = response.headers.get("Access-Control-Expose-Headers")
        names = ", ".join(RESPONSE_HEADERS)
        response.headers["Access-Control-Expose-Headers"] = (
            f"{existing}, {names}" if existing else names
        )

    def _handle_error(self, exc: SatchelError) -> Response:
        response = satchel_error_response(exc)
        self._expose_headers(response)
        return response

    # -- streaming ------------------------------------------------------------------------

    def stream(
        self,
        deltas: Iterable[str],
        *,
        on_complete: Callable[[str], None] | None = None,
    ) -> Response:
        """A server-sent-events response: ``delta`` events, then the next token.

        ``deltas`` yields text pieces; when it is exhausted, ``on_complete`` receives the
        whole text (typically to add the assistant turn), the context is sealed, and a
        final ``satchel`` event carries the token so streamed replies keep the context.
        """
        rs = self._request_state()
        self.get_context()
        rs.streaming = True

        def events() -> Iterator[str]:
            parts: list[str] = []
            try:
                for delta in deltas:
                    if delta:
                        parts.append(delta)
                        yield sse("delta", {"text": delta})
                if on_complete is not None:
                    on_complete("".join(parts))
                headers = self.finish(rs)
            except SatchelError as exc:
                yield sse("error", exc.to_dict())
                return
            except Exception:
                log.exception("satchel stream failed")
                yield sse("error", {"code": "stream_failed", "message": "the reply failed"})
                return
            yield sse(
                "satchel",
                {
                    "token": headers[HEADER_CONTEXT],
                    "seq": int(headers["Satchel-Seq"]),
                    "session": headers["Satchel-Session"],
                    "degraded": _split(headers.get("Satchel-Degraded")),
                    "reset": headers.get("Satchel-Reset"),
                    "fork": headers.get("Satchel-Fork"),
                    "timing": headers["Server-Timing"],
                },
            )
            yield sse("done", {})

        response = Response(stream_with_context(events()), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"
        self._expose_headers(response)
        return response


@dataclass(slots=True)
class _AppState:
    extension: Satchel
    config: SatchelConfig
    codec: Codec
    pipeline: Pipeline
    tier: Any
    segments: Any


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def server_timing(timings: dict[str, float], total: float) -> str:
    """``Server-Timing`` for the steps of this request, in milliseconds."""
    parts = [f"{step};dur={seconds * 1000:.3f}" for step, seconds in timings.items()]
    parts.append(f"satchel;dur={total * 1000:.3f}")
    return ", ".join(parts)


def json_errors_for(app: Flask, prefix: str = "/api/") -> None:
    """Make werkzeug's HTTP errors JSON under ``prefix`` (bad JSON body, 404, 405...)."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response | HTTPException:
        if request.path.startswith(prefix):
            return http_error_response(exc)
        return exc


__all__ = [
    "HEADER_CONTEXT",
    "Satchel",
    "error_response",
    "json_errors_for",
    "server_timing",
    "sse",
]
