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

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import inspect
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import (
    Flask,
    Response,
    current_app,
    got_request_exception,
    has_request_context,
    request,
    stream_with_context,
)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import consistency
from ..app_schema import MetadataMigration, MetadataSchema
from ..codec import Algorithm, Codec, Mode
from ..consistency import (
    LEVELS,
    ForkDetector,
    MarkState,
    MonotonicGuard,
    new_mark_id,
    refuse_busy,
    stricter,
)
from ..context import Context, join_surrogate_pairs
from ..envelope import encoded_length
from ..errors import (
    BadToken,
    ConfigurationError,
    ContextErased,
    InvalidRequest,
    MalformedToken,
    MigrationFailed,
    SatchelError,
    StaleContext,
    WrongUser,
)
from ..keys import Keyring
from ..lifecycle import LifecyclePolicy
from ..lifecycle.summarize import raised_at
from ..limits import Limits
from ..observe import MultiObserver, Observer
from ..pipeline import Pipeline
from ..protect import AtRest
from .config import RESPONSE_HEADERS, SatchelConfig, configured_keys, keyring_from_config
from .errors import error_response, http_error_response, public_error, satchel_error_response
from .vary import add_vary, vary_names

if TYPE_CHECKING:
    from ..tiers import GuardedTier, Tier

log = logging.getLogger("satchel")

#: Header, AEAD or MAC, and the largest padding around a stored context's payload
#: (server and memory modes: the context is kept, it does not travel).
STORED_OVERHEAD = 64 * 1024

HEADER_CONTEXT = "Satchel-Context"


@dataclass(slots=True)
class RequestState:
    """What the extension knows about the current request."""

    context: Context | None = None
    token: str | None = None
    #: where the token came from: "header", "cookie" or "json" (None: no token)
    token_source: str | None = None
    reset: str | None = None
    fork: str | None = None
    streaming: bool = False
    discard: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    consistency: str | None = None
    committed: dict[str, str] | None = None
    #: the consistency level the context was opened at (client mode)
    opened_level: str | None = None
    mark: MarkState | None = None
    opened_digest: bytes | None = None
    #: the token finish() sealed, kept next to the monotonic mark when it moves
    issued: str | None = None
    #: held while the context is opened: a thread the view started with
    #: copy_current_request_context shares this state, and must not open a second one
    opening: threading.RLock = field(default_factory=threading.RLock)
    #: stream(): releases its claim (idempotent), and the response it built (weakly):
    #: another response going out means that one is dropped unsent
    stream_release: Callable[[], None] | None = None
    stream_response: weakref.ref[Response] | None = None
    #: the view erased the conversation this request carries: its cookie is removed
    erased: bool = False
    #: this request's response was counted in degraded_responses_total (once per
    #: response, whichever path said Satchel-Degraded first)
    degraded_counted: bool = False
    #: the app's state (Satchel.state()), looked up once for the request's hooks
    app_state: _AppState | None = None

    def first_degraded_count(self) -> bool:
        """True the first time the response is counted as degraded (and marks it): the
        extension's paths and the flask.session interface each flag responses, and a
        response is counted once in ``degraded_responses_total``."""
        first = not self.degraded_counted
        self.degraded_counted = True
        return first


#: methods that read: served while a stream answers the same token (MonotonicGuard.before)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})

#: the attribute of the request object that holds its RequestState
_STATE_ATTR = "_satchel_state"


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run at most once however often it is called (a claim released twice
    could delete a claim another request has taken since)."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return run


class Satchel:
    """Client-held chat context for a Flask app (``init_app`` and ``SATCHEL_*`` config).

    ``mode`` is where the context lives: ``"client"`` (default: in the token the client
    carries), ``"server"`` (in the store at ``SATCHEL_STORE_URL``; a signed session id
    travels) or ``"memory"`` (in this process; one process only). Given here it wins
    over ``SATCHEL_MODE``. The view code is the same in every mode. ``keyring``,
    ``policy``, ``observer`` and ``tier`` likewise replace what the config would build.

    The app's own state in ``ctx.metadata`` is versioned by ``SATCHEL_METADATA_VERSION``;
    register its migrations with :meth:`metadata_migration`, and for a rolling deploy
    its downgrades with :meth:`metadata_downgrade` (satchel.app_schema).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        mode: str | None = None,
        keyring: Keyring | None = None,
        policy: LifecyclePolicy | None = None,
        observer: Observer | None = None,
        tier: Tier | GuardedTier | None = None,
    ) -> None:
        if isinstance(tier, str):
            # TierSessionOverflow takes a URL; this took one too, and failed in
            # init_app with an AttributeError ('str' object has no attribute 'name').
            raise ConfigurationError(
                "tier= takes a tier object (satchel.tiers.tier_from_url(url) makes one); "
                "for a URL set SATCHEL_OVERFLOW_URL (or SATCHEL_STORE_URL)"
            )
        self._mode = mode
        self._keyring = keyring
        self._policy = policy
        self._tier = tier
        self.observer = MultiObserver([observer] if observer else [])
        #: migrations of the app's ``ctx.metadata`` (see :meth:`metadata_migration`)
        self.metadata = MetadataSchema()
        #: the Prometheus observer (its ``.registry`` is what /metrics serves)
        from ..metrics import PrometheusObserver

        self.metrics: PrometheusObserver | None = None

        if isinstance(observer, PrometheusObserver):
            self.metrics = observer
        #: views that demand ``monotonic`` (:meth:`consistency`), checked against the
        #: tier at start-up rather than on their first request
        self._monotonic_routes: set[str] = set()
        #: views that demand ``server``: only an app whose context is server-side (server
        #: or memory mode) can serve them
        self._server_routes: set[str] = set()
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()  # not kept alive by us
        if app is not None:
            self.init_app(app)

    # -- setup --------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read ``SATCHEL_*`` from ``app.config``, build the codec, pipeline and tier,
        and install the request hooks (and, when configured, /metrics and health routes).
        Configuration mistakes raise :class:`~satchel.errors.ConfigurationError` here,
        at start-up, not on the first request."""
        if "satchel" in app.extensions:
            # A second set of hooks would run every request's steps twice: two
            # Server-Timing headers, and under monotonic every request refused 409
            # (its own first save moved the mark its second save then checked).
            raise ConfigurationError(
                "Satchel is already installed on this app (init_app called twice, or two "
                "Satchel objects): one per app"
            )
        config = SatchelConfig.from_app(app, mode=self._mode)
        keyring = keyring_from_config(app, config, given=self._keyring)
        limits = Limits(max_token_bytes=config.token_limit)
        if config.mode != "client":
            # The client sends only a signed session id (capped on its own); the stored
            # context never travels, so it is held to the payload cap, not the token cap.
            stored_cap = encoded_length(limits.max_decompressed_bytes + STORED_OVERHEAD)
            limits = dataclasses.replace(
                limits, max_token_bytes=max(config.token_limit, stored_cap)
            )
        config.register_dictionaries()  # before the codec: it may write with one of them
        codec = Codec(
            keyring,
            mode=cast(Mode, config.token_mode),  # both checked by SatchelConfig
            purpose=config.purpose,
            limits=limits,
            algorithm=cast(Algorithm, config.aead),
            pad_to=config.pad_to,
            dictionary_id=config.dictionary_id,
        )
        policy = config.fit_policy(self._policy) if self._policy else config.lifecycle_policy()
        if policy.max_llm_tokens is not None:
            policy.counter()  # tiktoken loads (or downloads) its encoding now, not in a request
        metadata_schema = self.metadata
        if config.metadata_version is not None or config.metadata_write_version is not None:
            version = config.metadata_version
            try:
                metadata_schema = self.metadata.with_version(
                    self.metadata.version if version is None else version,
                    config.metadata_write_version,
                )
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"SATCHEL_METADATA_VERSION / SATCHEL_METADATA_WRITE_VERSION: {exc}"
                ) from None
        tier = self._build_tier(config)
        segments = None
        if config.mode == "client":
            if tier is not None:
                from ..segments import SegmentStore

                segments = SegmentStore(tier, codec, grace=config.segment_grace)
            pipeline: Pipeline = Pipeline(
                codec,
                policy,
                segments=segments,
                observer=self.observer,
                metadata_schema=metadata_schema,
            )
        else:
            from ..server_mode import ServerSidePipeline

            if tier is None:
                raise ConfigurationError(
                    "SATCHEL_MODE='server' needs SATCHEL_STORE_URL or SATCHEL_OVERFLOW_URL "
                    "(for example redis://127.0.0.1:6379/0)"
                )
            # No byte budget server-side: nothing travels. A copy: the caller's policy
            # object may serve other apps.
            policy = dataclasses.replace(policy, max_token_bytes=None)
            pipeline = ServerSidePipeline(
                codec,
                policy,
                store=tier,
                mode=config.mode,
                observer=self.observer,
                metadata_schema=metadata_schema,
                max_carrier_bytes=config.token_limit,
            )
        if config.mode == "client":  # routes decorated before init_app
            # Every route marked on this instance, registered here yet or not: a
            # factory registers its blueprints after init_app, and an app that cannot
            # serve one of them must not start (its requests would all fail).
            _check_route_levels(self._server_routes, self._monotonic_routes, tier is not None)
        guard = None
        if tier is not None and config.mode == "client":
            guard = MonotonicGuard(
                tier,
                tier_down_policy=config.tier_down_policy,
                observer=self.observer,
                mark_ids=config.mark_ids,
                keep_newest=config.keep_newest,
                max_age=policy.max_age,  # the policy the pipeline renews tokens under
                idle_ttl=policy.idle_ttl,
                other_anchor_tags=codec.session_tags_under_other_anchors,
                open_token=codec.open,
                at_rest=AtRest(codec.keyring, codec.purpose, "newest-record"),
            )
        elif config.mode == "client" and config.consistency == "monotonic":
            raise ConfigurationError(
                "monotonic consistency needs a tier for its marks: set "
                "SATCHEL_OVERFLOW_URL (sqlite:///path or redis://...)"
            )
        self._apps.add(app)
        app.extensions["satchel"] = _AppState(
            self,
            config,
            codec,
            pipeline,
            tier,
            segments,
            guard,
            ForkDetector(),
            exposed=(config.header, *RESPONSE_HEADERS[1:]),
            development_key=self._keyring is None and not configured_keys(app),
            per_process_store=_per_process_store(config, tier),
        )
        from .session import SatchelSessionInterface

        if isinstance(app.session_interface, SatchelSessionInterface):
            # Its settings, now rather than per request; once installed, so it finds
            # the ring this extension uses, as it will on every request.
            try:
                app.session_interface.check(app)
            except ConfigurationError:
                del app.extensions["satchel"]
                self._apps.discard(app)
                raise
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        got_request_exception.connect(self._release_on_exception, app, weak=False)
        app.register_error_handler(SatchelError, self.handle_error)
        self._register_extras(app, config)

    def _build_tier(self, config: SatchelConfig) -> Any:
        from ..tiers.base import Timeouts
        from ..tiers.guard import BreakerPolicy, GuardedTier, SegmentCache

        tier = self._tier
        # SATCHEL_STORE_URL is the server-side modes' store (falling back to the overflow
        # URL); client mode's tier is the overflow URL alone (a store URL left in its
        # environment silently swapped the shared Redis tier for another, or for
        # per-process memory).
        url: str | None
        if config.mode != "client" and config.store_url:
            url, setting = config.store_url, "SATCHEL_STORE_URL"
        else:
            url, setting = config.overflow_url, "SATCHEL_OVERFLOW_URL"
            if config.mode == "client" and config.store_url:
                log.warning(
                    "SATCHEL_STORE_URL is set but SATCHEL_MODE is 'client': it is the "
                    "store of the server and memory modes, and is not used (client mode's "
                    "tier is SATCHEL_OVERFLOW_URL)"
                )
        if config.mode == "memory" and tier is None:
            # The store is this process's memory; SATCHEL_STORE_URL may size it
            # (memory://?max_bytes=...&evict=true), and may not name another store.
            url = config.store_url or "memory://"
            if not url.lower().startswith("memory://"):
                raise ConfigurationError(
                    "SATCHEL_MODE='memory' keeps contexts in this process: "
                    "SATCHEL_STORE_URL may only be memory:// (with max_bytes= and "
                    "evict= options); for a Redis store use SATCHEL_MODE='server'"
                )
        if tier is None and url:
            from ..tiers import tier_from_url, tier_scheme

            options: dict[str, Any] = {}
            scheme = tier_scheme(url, setting=setting)
            if scheme in ("redis", "rediss") or scheme.startswith("redis+"):
                options["timeouts"] = Timeouts(
                    read=config.tier_read_timeout, connect=config.tier_connect_timeout
                )
            elif scheme == "sqlite" and "busy_timeout" not in url:
                # A write-locked file must not hold a request for SQLite's default 1 s.
                options["busy_timeout"] = max(0.05, 4 * config.tier_read_timeout)
            tier = tier_from_url(url, setting=setting, **options)
        if tier is None or getattr(tier, "name", "") == "none":
            return None
        if isinstance(tier, GuardedTier):
            tier.on_event = self._tier_event
            return tier
        return GuardedTier(
            tier,
            breaker=BreakerPolicy(config.breaker_fail_max, config.breaker_reset_timeout),
            cache=SegmentCache(config.segment_cache_bytes),
            on_event=self._tier_event,
        )

    def _tier_event(self, name: str, **fields: Any) -> None:
        self.observer.event(name, **fields)

    def _register_extras(self, app: Flask, config: SatchelConfig) -> None:
        """Metrics and audit observers, and the optional /metrics and health routes."""
        from ..audit import AuditObserver
        from ..metrics import PrometheusObserver
        from .routes import register_routes

        if self.metrics is None:
            self.metrics = PrometheusObserver()
            self.observer.add(self.metrics)
        if not any(isinstance(o, AuditObserver) for o in self.observer.observers):
            self.observer.add(AuditObserver())
        register_routes(
            app, self, metrics_route=config.metrics_route, health=bool(config.health_routes)
        )

    # -- per-app state --------------------------------------------------------------------

    @staticmethod
    def state(app: Flask | None = None) -> _AppState:
        """The per-app state ``init_app`` built (default: the current app)."""
        app = app or current_app
        try:
            return app.extensions["satchel"]
        except KeyError:
            raise ConfigurationError("Satchel is not initialised on this app") from None

    def _state_for(self, rs: RequestState) -> _AppState:
        """:meth:`state` for the request ``rs`` belongs to, looked up once: it goes
        through the ``current_app`` proxy, a microsecond or two each time, and the
        request's hooks and steps ask for it half a dozen times."""
        app_state = rs.app_state
        if app_state is None:
            app_state = rs.app_state = self.state()
        return app_state

    @property
    def codec(self) -> Codec:
        """The current app's :class:`~satchel.codec.Codec` (seal and open by hand)."""
        return self.state().codec

    @property
    def pipeline(self) -> Pipeline:
        """The current app's :class:`~satchel.pipeline.Pipeline` (the request steps)."""
        return self.state().pipeline

    @property
    def keyring(self) -> Keyring:
        """The current app's key ring."""
        return self.state().codec.keyring

    # -- request hooks --------------------------------------------------------------------

    def _before_request(self) -> None:
        # Starts the request's clock; keeps what an app hook that ran first (registered
        # before init_app) did with the context.
        app_state = self._state_for(self._request_state())
        if not app_state.multiprocess_checked:
            app_state.multiprocess_checked = True
            _warn_if_store_is_per_worker(app_state, request.environ)

    @staticmethod
    def _current_state() -> RequestState | None:
        """This request's state, if it has one. Kept on the request object itself, not
        on ``g``: ``g`` belongs to the app context, which requests pushed inside one
        (a test fixture's ``with app.app_context()``) share, and an app hook that
        answers early keeps this extension's hook from starting a new one there."""
        return vars(request._get_current_object()).get(_STATE_ATTR)  # type: ignore[attr-defined]

    @staticmethod
    def _request_state() -> RequestState:
        attrs: dict[str, Any] = request._get_current_object().__dict__  # type: ignore[attr-defined]
        state: RequestState | None = attrs.get(_STATE_ATTR)
        if state is None:  # setdefault: of two threads of one request, one state wins
            state = attrs.setdefault(_STATE_ATTR, RequestState())
        return state

    def read_token(self) -> str | None:
        """The token the client sent: header first, then cookie, then JSON field."""
        rs = self._request_state()
        config = self._state_for(rs).config
        token = request.headers.get(config.header)
        rs.token_source = "header" if token else None
        if not token and config.cookie:
            token = request.cookies.get(config.cookie)
            rs.token_source = "cookie" if token else None
        if not token and config.json_field and request.is_json:
            body = json_body()
            field = body.get(config.json_field) if isinstance(body, dict) else None
            if isinstance(field, str):
                token = field
                rs.token_source = "json"
            elif field is not None:
                # A number or an object where the token belongs is a client bug; taking
                # it for "no token" would restart the conversation without a word.
                self.observer.event("refused", reason=MalformedToken.code)
                raise MalformedToken(
                    f"the JSON field {config.json_field!r} must hold the token as a string "
                    f"(or null for a new conversation), not {type(field).__name__}"
                )
        if token and "," in token and rs.token_source == "header":
            # No token holds a comma: two headers joined by the WSGI server (a proxy or
            # a client that added it twice) would otherwise read as "not base64url".
            self.observer.event("refused", reason=MalformedToken.code)
            raise MalformedToken(
                f"the {config.header} header holds more than one value (sent twice, or "
                "joined by a proxy): send exactly one token"
            )
        return token.strip() if token else None

    @property
    def context(self) -> Context:
        """The current request's context, opened on first access."""
        return self.get_context()

    def get_context(self) -> Context:
        """The current request's context, opened (verified, migrated, rehydrated) on the
        first call; a bad token raises a :class:`~satchel.errors.BadToken` subclass,
        which the extension answers as JSON 4xx (or a fresh context, by policy)."""
        rs = self._request_state()
        ctx = rs.context
        if ctx is None:
            with rs.opening:
                if rs.context is None:
                    rs.context = self._open_context(rs)
                ctx = rs.context
        return ctx

    def _open_context(self, rs: RequestState) -> Context:
        app_state = self._state_for(rs)
        config = app_state.config
        pipeline = app_state.pipeline
        token = None
        try:
            token = rs.token = self.read_token()
            ctx = pipeline.load(token, timings=rs.timings)
        except BadToken as exc:
            ctx, token = self._fresh_instead(rs, exc, config, pipeline), None
        for notice in ctx.notices:
            if notice.startswith("reset:") and rs.reset is None:
                rs.reset = notice.split(":", 1)[1]
        rs.opened_digest = ctx.parent if token else None
        self._check_binding(ctx, config, pipeline)
        if ctx.stream_answering and request.method not in _READS:
            # Server and memory modes: a reply streaming for this stored state will save
            # over it. Refused before the view (and its model call) runs; a read is
            # served, and refused at its save only if it changed the context.
            refuse_busy(self.observer, pipeline.session_tag(ctx.session_id))
        if config.mode == "client":
            tag = pipeline.session_tag(ctx.session_id)
            # The route's level comes from its view function as registered, not only
            # from the view wrapper, which runs too late when a before_request hook
            # (or an outer decorator) opens the context first.
            level = stricter(stricter(config.consistency, rs.consistency), _route_level())
            rs.opened_level = level
            if level == "server":  # a view marked by hand: init_app checks the decorator's
                _check_route_levels({repr(request.endpoint)}, set(), True)
            if level == "monotonic":
                if app_state.guard is None:
                    raise ConfigurationError("monotonic consistency needs a tier")
                reading = request.method in _READS
                try:
                    rs.mark = app_state.guard.before(ctx, tag, fresh=not token, reading=reading)
                except ContextErased as exc:
                    # Erased: found by the mark, after the token opened. The policy
                    # for a bad token applies as it does in server and memory mode.
                    ctx, token = self._fresh_instead(rs, exc, config, pipeline), None
                    rs.opened_digest = None
                    self._check_binding(ctx, config, pipeline)
                    tag = pipeline.session_tag(ctx.session_id)
                    rs.mark = app_state.guard.before(ctx, tag, fresh=True, reading=reading)
            # After the mark's check: a replay it refuses (409) is not also a fork,
            # which counts branches that were served. The header says so now; the
            # count waits for a token made from it (finish, or _move_mark under a
            # mark: the loser of a race passes the mark's check too, and is refused
            # when it saves). A read that issues none (discard(), a failed request)
            # makes no branch: a stale tab reloading counted one on every load.
            if token:
                rs.fork = app_state.forks.check(ctx)
        return ctx

    @staticmethod
    def _fresh_instead(
        rs: RequestState, exc: BadToken, config: SatchelConfig, pipeline: Pipeline
    ) -> Context:
        """A new context in place of a refused token under ``SATCHEL_ON_BAD_TOKEN=fresh``
        (flagged with the refusal's code); otherwise the refusal is raised."""
        if isinstance(exc, MigrationFailed):
            # Not the client's fault: this deployment cannot read that version (its
            # message is Satchel's own: the versions and the error's type, no content).
            # INFO, as it comes on every such request: the audit's refused record says
            # it at WARNING, throttled per message.
            log.info(
                "satchel: %s, %s: %s",
                exc.code,
                "a fresh context instead" if config.on_bad_token == "fresh" else "refused",
                exc.message,
            )
        if config.on_bad_token != "fresh":
            log.info("satchel refused a token: %s", exc.code)
            raise exc
        log.info("satchel started a fresh context instead of a bad token: %s", exc.code)
        rs.reset = exc.code
        ctx = pipeline.new_context()
        ctx.notices.append(f"reset:{exc.code}")
        return ctx

    def _check_binding(self, ctx: Context, config: SatchelConfig, pipeline: Pipeline) -> None:
        """Tie the context to the authenticated user, if the app gave a hook."""
        if config.user_binding is None:
            return
        user_id = config.user_binding()
        if user_id is None:
            if ctx.bound_user is not None:
                # A conversation bound to an account is not served to a request with
                # no account: a stolen token must not work logged out.
                self.observer.event("refused", reason="token_wrong_user")
                raise WrongUser("this conversation belongs to a signed-in user")
            return
        key = pipeline.codec.keyring.anchored(pipeline.codec.purpose, "user-binding")
        bound = hmac.new(key, str(user_id).encode(), hashlib.sha256).digest()[:16]
        if ctx.bound_user is None:
            ctx.bound_user = bound
        elif not hmac.compare_digest(ctx.bound_user, bound):
            self.observer.event("refused", reason="token_wrong_user")
            raise WrongUser("this conversation belongs to another user")

    def metadata_migration(
        self, from_version: int
    ) -> Callable[[MetadataMigration], MetadataMigration]:
        """Register a migration of the app's ``ctx.metadata`` from ``from_version`` to
        the next, run when a token with that version is opened::

            @satchel.metadata_migration(from_version=0)    # SATCHEL_METADATA_VERSION = 1
            def tone_becomes_a_preference(meta: dict) -> dict:
                meta["prefs"] = {"tone": meta.pop("tone", "neutral")}
                return meta

        Works before or after ``init_app``. See :mod:`satchel.app_schema`.
        """
        return self.metadata.migration(from_version)

    def metadata_downgrade(
        self, from_version: int
    ) -> Callable[[MetadataMigration], MetadataMigration]:
        """Register a downgrade of the app's ``ctx.metadata`` from ``from_version`` to
        the one before, run on a copy whenever tokens are written in an older shape
        (``SATCHEL_METADATA_WRITE_VERSION``, the first deploy of a shape change, so
        replicas still on the previous release can read every token)::

            @satchel.metadata_downgrade(from_version=1)   # reads 1, writes 0
            def preference_becomes_tone(meta: dict) -> dict:
                meta["tone"] = meta.pop("prefs", {}).get("tone", "neutral")
                return meta

        Works before or after ``init_app``. See :mod:`satchel.app_schema`.
        """
        return self.metadata.downgrade(from_version)

    def consistency(self, level: str) -> Callable[[F], F]:
        """Demand a stricter consistency level for one route::

        @app.post("/api/spend")
        @satchel.consistency("monotonic")
        def spend(): ...
        """
        if level not in LEVELS:
            raise ValueError(f"consistency level must be one of {LEVELS}")

        def decorate(view: F) -> F:
            # Marked on the function itself: whichever of it and the wrapper is the
            # registered view (the decorators in either order), _open_context sees it.
            marked = stricter(level, getattr(view, "_satchel_consistency", None))
            target: Any = getattr(view, "__func__", view)  # a bound method: its function
            with contextlib.suppress(AttributeError):  # a builtin takes no attributes
                target._satchel_consistency = marked
            name = getattr(view, "__qualname__", repr(view))
            server = {name} if level == "server" else set()
            monotonic = {name} if level == "monotonic" else set()
            self._server_routes |= server
            self._monotonic_routes |= monotonic
            for app in self._apps:  # decorated after init_app: check now
                state: _AppState = app.extensions["satchel"]
                if state.config.mode == "client":
                    _check_route_levels(server, monotonic, state.guard is not None)

            def demand() -> None:
                rs = self._request_state()
                rs.consistency = stricter(level, rs.consistency)
                opened = rs.opened_level
                if rs.context is not None and opened is not None:
                    if stricter(opened, level) != opened:
                        # Opened under a weaker level (the view is not the route's
                        # registered one): the check it demands did not run.
                        raise ConfigurationError(
                            f"the context was opened at {opened!r} consistency before "
                            f"{name} demanded {level!r}"
                        )

            wrapper: Any
            if inspect.iscoroutinefunction(view):
                # An async view stays one: Flask awaits what it registered only if it is
                # a coroutine function (a plain wrapper returned an unawaited coroutine,
                # and every request was a 500).
                @functools.wraps(view)
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    demand()
                    return await view(*args, **kwargs)

            else:

                @functools.wraps(view)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    demand()
                    return view(*args, **kwargs)

            wrapper._satchel_consistency = marked
            return wrapper

        return decorate

    def erase(self, session_id: str | bytes) -> dict[str, Any]:
        """Delete a session's server-side data and, with a tier, refuse its tokens.

        Erasing the conversation the request itself carries (a Delete chat route)
        issues no new token, and removes the token's cookie when it came in one: the
        cookie is HttpOnly, and page code could not drop a token of an erased chat.
        """
        from ..erase import erase_with_state, parse_session_id

        result = erase_with_state(self.state(), session_id)
        rs = self._current_state() if has_request_context() else None
        ctx = rs.context if rs is not None else None
        if rs is not None and ctx is not None and ctx.session_id == parse_session_id(session_id):
            rs.discard = True
            rs.erased = True
        return result

    def commit(self) -> dict[str, str]:
        """Run the save now (trim, overflow, seal) instead of after the view.

        A view that reports the context's final state in its body (``degraded``
        reasons found while saving, the token size, what overflowed) calls this before
        building its response; the headers are then written from the same result. Do
        not change the context after committing: the token is already sealed.
        """
        rs = self._request_state()
        self.get_context()
        if rs.committed is None:
            rs.committed = self.finish(rs)
        return rs.committed

    def discard(self) -> None:
        """Do not issue a new token for this request (for read-only routes).

        Not with :meth:`stream`, whose reply ends with the next token: RuntimeError
        (a streamed read-only reply is a plain ``Response`` of its own).
        """
        rs = self._request_state()
        if rs.streaming:
            raise RuntimeError("discard() after stream(): a streamed reply ends with a token")
        rs.discard = True

    def _after_request(self, response: Response) -> Response:
        rs = self._current_state()
        if rs is None:
            return response
        if rs.stream_release is not None and (
            rs.stream_response is None or rs.stream_response() is not response
        ):
            self._release_unsent_stream(rs)
        if rs.context is None or rs.streaming:
            if "Server-Timing" not in response.headers:
                # Every response says how long the app took, context or not, and the
                # steps that ran: a refused token's open, a stream's before its headers (open,
                # rehydrate: the rest is in its final event's timing, as the headers
                # are gone by then).
                total = time.perf_counter() - rs.started
                response.headers["Server-Timing"] = server_timing(rs.timings, total)
            return response
        if rs.discard or (rs.committed is None and response.status_code >= 400):
            # No new token: a read-only route (discard), or a failed request, whose
            # half-made changes are not sealed (the client keeps the token it sent).
            # What opening found is still said: a degraded read, a fresh start.
            self._describe_unsealed(response, rs, rs.context)
            config = self.state().config
            if rs.erased and config.cookie and config.cookie in request.cookies:
                _delete_token_cookie(response, config)
            return response
        if rs.committed is not None:
            # Sealed by commit(): the tier already holds what this token references (and
            # a monotonic mark names it), so it goes out whatever the status.
            headers = rs.committed
        else:
            try:
                headers = self.finish(rs)
            except SatchelError as exc:
                # In place of the view's response, which may carry CORS headers already
                # (a CORS hook registered after init_app runs before this one): kept,
                # or a page on another origin cannot read the error (nor the newest
                # token a 409 stale_context hands back), only "Failed to fetch".
                error = _with_cors_of(response, self.handle_error(exc))
                # Described as when commit() fails in the view: the steps that ran,
                # and what opening found (degraded reasons, a reset, a fork).
                self._describe_unsealed(error, rs, rs.context)
                return error
        response.headers.extend(headers)
        self._expose_headers(response, rs)
        config = self._state_for(rs).config
        # The response carries a credential made for this client from what it sent: a
        # cache must neither serve it to anyone else nor replay it to this client later
        # (an old token sent again is a fork), so no-store whatever the view set
        # (send_file's no-cache still lets a cache store it). Vary, as Flask's session.
        _vary_on_token(response, config)
        if "Cache-Control" not in response.headers:
            # The usual case, set directly: werkzeug's parsed cache_control object
            # costs microseconds a response on this hot path.
            response.headers.add("Cache-Control", "no-store")
        else:
            response.cache_control.no_store = True
        if config.cookie:
            _set_token_cookie(response, headers[config.header], config)
        return response

    def finish(self, rs: RequestState, *, move_mark: bool = True) -> dict[str, str]:
        """Seal the request's context and return the response headers to send.

        ``move_mark=False`` leaves a ``monotonic`` mark where it is, for the caller to
        move with :meth:`_move_mark` once the token has been handed to the client.
        """
        app_state = self._state_for(rs)
        ctx = rs.context
        assert ctx is not None
        pipeline = app_state.pipeline
        if pipeline.codec.needs_reseal(ctx):
            self.observer.event(
                "resealed",
                session=pipeline.session_tag(ctx.session_id),
                kid=pipeline.codec.keyring.current.kid,
            )
        # The session's first mark: if the tier then fails to take it, the token must
        # not say its session has one (the next request would report a lost mark).
        first_mark = rs.mark is not None and rs.mark.checked and not ctx.marked
        if rs.mark is not None and rs.mark.checked:
            ctx.marked = True  # sealed in, so a tier that loses the mark is noticed
            # This save becomes the newest: its token, and every token made from it
            # at any level, carries the id the mark will hold (MonotonicGuard.after),
            # and the id it was checked against, in case the tier fails that write.
            if app_state.guard is not None and app_state.guard.mark_ids:
                ctx.mark_parent = rs.mark.mark_id
                ctx.mark_id = new_mark_id()
        opened_as = (ctx.seq, ctx.parent)  # what the token sent carried
        # A fresh context's session starts when its token goes out: below, once the
        # mark has moved (a tier that refuses it under fail_closed sends none).
        result = pipeline.save(ctx, timings=rs.timings, report_start=False)
        starts_session = result.fresh
        rs.issued = result.token
        if (
            move_mark
            and not self._move_mark(rs)
            and first_mark
            and not (rs.mark is not None and rs.mark.unconfirmed)
        ):
            # fail_open served it, and no mark was set (the tier refused the write, or
            # the breaker kept it from the tier): seal the token unmarked, as the
            # successor of the token sent (the first seal never leaves the server).
            # A write that timed out may still land, naming the token sealed above:
            # that token goes out as it is, or every later request of the session
            # would be refused as not descending from it. At worst (it did not land)
            # the next request reports the mark lost, as after a stream, whose mark
            # moves after its token is sent (docs/consistency.md).
            ctx.marked, ctx.mark_id, ctx.mark_parent = False, None, None
            ctx.seq, ctx.parent = opened_as
            result = pipeline.reseal(ctx)
        if starts_session:
            pipeline.session_started_reported(ctx)
        # With a mark, _move_mark reports the fork once the mark has moved: it ran
        # above (move_mark), so a fork found only now is reported here; or it runs
        # after the stream's final event (deferred) and reports whatever rs.fork is then.
        reported_by_mark = rs.mark is not None and (rs.fork is not None or not move_mark)
        if app_state.config.mode == "client":
            late = app_state.forks.record(ctx, rs.opened_digest)
            rs.fork = rs.fork or late  # a sibling saved while this request ran
        if rs.fork and not reported_by_mark:  # a branch was made: this token
            self.observer.event(
                "fork_detected", session=pipeline.session_tag(ctx.session_id), detail=rs.fork
            )
        headers = {
            # SATCHEL_HEADER names the token's header both ways: clients send back
            # what they were given.
            app_state.config.header: result.token,
            "Satchel-Seq": str(ctx.seq),
            "Satchel-Session": app_state.pipeline.session_tag(ctx.session_id),
        }
        if ctx.degraded:
            headers["Satchel-Degraded"] = _degraded_header(ctx.degraded)
            self._count_degraded_response(rs)
        if rs.reset:
            headers["Satchel-Reset"] = rs.reset
        if rs.fork:
            headers["Satchel-Fork"] = rs.fork
        headers["Server-Timing"] = server_timing(rs.timings, time.perf_counter() - rs.started)
        return headers

    def _move_mark(self, rs: RequestState, *, settling: bool = False) -> bool:
        """Move the ``monotonic`` mark to the token just sealed (StaleContext if another
        request with the same token moved it first). False if the tier failed the write
        and ``fail_open`` let the request through (MonotonicGuard.after)."""
        app_state = self._state_for(rs)
        if rs.mark is not None and app_state.guard is not None and rs.context is not None:
            tag = app_state.pipeline.session_tag(rs.context.session_id)
            try:
                moved = app_state.guard.after(
                    rs.context, tag, rs.mark, rs.issued, settling=settling
                )
            except StaleContext:
                rs.fork = None  # refused, not served: no branch was made
                raise
            if rs.fork:
                self.observer.event("fork_detected", session=tag, detail=rs.fork)
            return moved
        return True

    def _count_degraded_response(self, rs: RequestState) -> None:
        """``degraded_responses_total``: once per response that says Satchel-Degraded,
        whatever the reasons and however many paths said it (a stream's headers, then
        its final event; the flask.session interface's flags)."""
        if rs.first_degraded_count():
            self.observer.event("degraded_response")

    def _describe_unsealed(self, response: Response, rs: RequestState, ctx: Context) -> None:
        """Headers for a response that carries no new token: the steps' timings, and
        what opening the context found (degraded reasons, a reset, a fork)."""
        if "Server-Timing" not in response.headers:
            total = time.perf_counter() - rs.started
            response.headers["Server-Timing"] = server_timing(rs.timings, total)
        # Made from the token the request carried (GET /api/context: the conversation
        # itself): a cache may keep it only per token (and per cookie), never one copy
        # served to every client asking for the URL.
        _vary_on_token(response, self.state().config)
        if ctx.degraded:
            response.headers["Satchel-Degraded"] = _degraded_header(ctx.degraded)
            self._count_degraded_response(rs)
        if rs.reset:
            response.headers["Satchel-Reset"] = rs.reset
        if rs.fork:
            response.headers["Satchel-Fork"] = rs.fork
        self._expose_headers(response)

    def _expose_headers(self, response: Response, rs: RequestState | None = None) -> None:
        app_state = self.state() if rs is None else self._state_for(rs)
        _expose(response, app_state.exposed)

    def handle_error(self, exc: SatchelError) -> Response:
        """The JSON error response for a Satchel error, as the extension's own handler
        makes it: with the newest token a 409 ``stale_context`` hands back, and a bad
        token's cookie removed. Register it for a blueprint whose catch-all handler
        would otherwise take Satchel's errors (docs/lifecycle.md)."""
        response = satchel_error_response(exc)
        self._expose_headers(response)
        rs = self._current_state()
        config = self.state().config
        if isinstance(exc, StaleContext) and exc.newest_token is not None:
            self._hand_back_newest(response, exc, config)
        unusable = isinstance(exc, BadToken) and not isinstance(exc, WrongUser)
        if unusable and rs is not None and rs.token_source == "cookie":
            # The cookie is HttpOnly: page code cannot remove a token that will never
            # open, and every later request would be refused the same way. Not for
            # another user's (or a signed-out user's) token: signing in again opens it.
            _delete_token_cookie(response, config)
        return response

    def _hand_back_newest(
        self, response: Response, exc: StaleContext, config: SatchelConfig
    ) -> None:
        """A 409 for the token the session's newest was made from: its response was
        lost on the way (MonotonicGuard._newest_for). The newest token goes out the way
        a token always does, so the client adopts it and the conversation goes on; the
        request itself was not served (its view did not run to the end), so the body
        stays the error."""
        token = exc.newest_token
        assert token is not None
        response.headers[config.header] = token
        # What the guard says of it (an app raising StaleContext itself may say less).
        if "newest_seq" in exc.facts:
            response.headers["Satchel-Seq"] = str(exc.facts["newest_seq"])
        if "session" in exc.facts:
            response.headers["Satchel-Session"] = str(exc.facts["session"])
        _vary_on_token(response, config)
        if config.cookie:
            _set_token_cookie(response, token, config)

    # -- streaming ------------------------------------------------------------------------

    def _release_unsent_stream(self, rs: RequestState) -> None:
        release, rs.stream_release = rs.stream_release, None
        if release is not None:
            release()

    def _release_on_exception(self, sender: Flask, **_: Any) -> None:
        """``got_request_exception``: the view (or a hook) raised after stream() built
        its response, which will not be sent; with PROPAGATE_EXCEPTIONS no error
        response passes _after_request to tell."""
        rs = self._current_state()
        if rs is not None:
            self._release_unsent_stream(rs)

    def stream(
        self,
        deltas: Iterable[str],
        *,
        on_complete: Callable[[str], object] | None = None,
        protocol: str = "satchel",
    ) -> Response:
        """A server-sent-events response: text deltas, then the next token.

        ``deltas`` yields text pieces; when it is exhausted, ``on_complete`` receives the
        whole text (typically to add the assistant turn), the context is sealed, and a
        final event carries the token so streamed replies keep the context.

        ``protocol="satchel"`` sends ``delta`` events, a ``satchel`` event and ``done``
        (what ``client.stream()`` reads). ``protocol="ai-sdk"`` speaks the Vercel AI
        SDK's UI message stream (``text-delta`` chunks) and carries the token in a
        transient ``data-satchel`` part, for ``useChat`` frontends (docs/client-js.md).

        With ``SATCHEL_COOKIE`` the cookie is not updated (the headers leave before the
        reply exists): clients send the final event's token back in the header.
        RuntimeError after :meth:`discard` (a streamed reply always saves).
        """
        if protocol not in ("satchel", "ai-sdk"):
            raise ValueError("protocol must be 'satchel' or 'ai-sdk'")
        rs = self._request_state()
        if rs.discard:
            # The stream's save would run anyway (the token in its final event, the
            # stored context, the mark): what discard() promised not to do.
            raise RuntimeError("stream() after discard(): a streamed reply ends with a token")
        self.get_context()
        rs.streaming = True
        ai_sdk = protocol == "ai-sdk"

        guard = self.state().guard
        # Of requests sent at once with one token (monotonic) or for one stored session
        # (server and memory modes, whose saves are a compare-and-set), only one may
        # stream the reply: the others are refused here (409 context_busy) before any
        # text goes out, not with an error event after the whole (paid-for) reply.
        release: Callable[[], None] | None = None
        renew: Callable[[], bool] | None = None
        pipeline = self.state().pipeline
        claimer: MonotonicGuard | Pipeline = pipeline
        claim = None
        if guard is not None and rs.mark is not None and rs.context is not None:
            claimer = guard
            claim = guard.claim(rs.context, pipeline.session_tag(rs.context.session_id), rs.mark)
        elif rs.context is not None:
            claim = pipeline.claim(rs.context)
        if claim is not None:
            release = _once(functools.partial(claimer.release, claim))
            renew = functools.partial(claimer.renew, claim)
        renewed_at = time.monotonic()

        def keep_claim() -> None:
            """Renew the claim every quarter of its TTL while text flows: a reply that
            streams past the TTL (a slow reasoning model) lost it, and a request sent
            meanwhile was answered and saved first (the stream then ended in an error
            event after its whole reply). One tier call per 30 s of streaming."""
            nonlocal renewed_at
            if renew is None or time.monotonic() - renewed_at < consistency.CLAIM_TTL / 4:
                return
            renewed_at = time.monotonic()
            if not renew():
                log.info("satchel stream: its claim could not be renewed")

        # Under fail_open the mark moves only once the final event is out (below): a
        # client gone mid-stream never gets this token and must not be locked out of
        # the conversation by a mark that names it. Under fail_closed nothing goes out
        # unchecked: the mark moves first, and if it cannot, the stream ends in an
        # error event with no token (a client that leaves then has a stale token).
        defer_mark = guard is None or guard.tier_down_policy != "fail_closed"

        def finish_metadata() -> dict[str, Any]:
            headers = self.finish(rs, move_mark=not defer_mark)
            return {
                "token": headers[self.state().config.header],
                "seq": int(headers["Satchel-Seq"]),
                "session": headers["Satchel-Session"],
                "degraded": _split(headers.get("Satchel-Degraded")),
                "reset": headers.get("Satchel-Reset"),
                "fork": headers.get("Satchel-Fork"),
                "timing": headers["Server-Timing"],
            }

        def settle_mark() -> list[str] | None:
            """Move a deferred mark. The response's degraded reasons when that added
            one (the tier failed the write under fail_open: ``consistency_unchecked``),
            for a second final event; else None."""
            ctx = rs.context
            if not defer_mark or ctx is None:
                return None
            before = len(ctx.degraded)
            try:
                self._move_mark(rs, settling=True)
            except SatchelError as exc:
                # Too late for an error status: the client holds the token. If the mark
                # did not move, that token is still accepted by the id it was checked
                # against (Context.mark_parent); a lost race was reported by the guard.
                log.info("satchel stream: the monotonic mark was not moved (%s)", exc.code)
            if len(ctx.degraded) == before:
                return None
            self._count_degraded_response(rs)
            return list(dict.fromkeys(ctx.degraded))

        def settle() -> list[str] | None:
            """After the final event: move a deferred mark (settle_mark), then release
            the claim, whose work is done once the mark names this reply's token."""
            late = settle_mark()
            if release is not None:
                release()
            return late

        def events() -> Iterator[str]:
            try:
                yield from reply()
            finally:  # however the stream ends: done, failed, or the client left
                if release is not None:
                    release()

        def reply() -> Iterator[str]:
            parts: list[str] = []
            if ai_sdk:
                yield ai_chunk({"type": "start"})
                yield ai_chunk({"type": "text-start", "id": "t0"})
            sent_at = -math.inf  # nothing out yet: a first empty delta sends at once
            try:
                for delta in deltas:
                    keep_claim()
                    if delta:
                        parts.append(delta)
                        if ai_sdk:
                            yield ai_chunk({"type": "text-delta", "id": "t0", "delta": delta})
                        else:
                            yield sse("delta", {"text": delta})
                        sent_at = time.monotonic()
                    elif time.monotonic() - sent_at >= KEEPALIVE_INTERVAL:
                        yield SSE_KEEPALIVE
                        sent_at = time.monotonic()
                if on_complete is not None:
                    on_complete(join_surrogate_pairs("".join(parts)))
                metadata = finish_metadata()
                if release is not None and claimer is pipeline:
                    # Saved (server and memory modes): the stored copy holds the reply
                    # now, so the next message may go. Released here, not after the
                    # done event: a client moves on as soon as it reads the final event.
                    release()
            except SatchelError as exc:
                public = public_error(exc)  # what an error response would say
                if ai_sdk:
                    yield ai_chunk(
                        {"type": "error", "errorText": f"{public['code']}: {public['message']}"}
                    )
                else:
                    yield sse("error", public)
                return
            except Exception as exc:
                # Type and place only, at any level: the app's generator (an LLM call)
                # may raise with the prompt in its message or its traceback's locals.
                log.error("satchel stream failed (%s at %s)", type(exc).__name__, raised_at(exc))
                if ai_sdk:
                    yield ai_chunk({"type": "error", "errorText": "stream_failed"})
                else:
                    yield sse("error", {"code": "stream_failed", "message": "the reply failed"})
                return
            # The mark moves once the token is written out (the client has it). If that
            # flags the response, the final event is sent again with the flag: the
            # second supersedes the first (same token), so the client is told.
            if ai_sdk:
                yield ai_chunk({"type": "text-end", "id": "t0"})
                yield ai_chunk({"type": "data-satchel", "data": metadata, "transient": True})
                late = settle()
                if late is not None:
                    metadata = {**metadata, "degraded": late}
                    yield ai_chunk({"type": "data-satchel", "data": metadata, "transient": True})
                yield ai_chunk({"type": "finish"})
                yield "data: [DONE]\n\n"
            else:
                yield sse("satchel", metadata)
                late = settle()
                if late is not None:
                    yield sse("satchel", {**metadata, "degraded": late})
                yield sse("done", {})

        response = Response(stream_with_context(events()), mimetype="text/event-stream")
        if release is not None:
            # A body never read (a HEAD request, an after_request hook that failed, a
            # client gone before the first byte) never runs events()' finally: release
            # when the server closes the response; when another response goes out in
            # its place (the view raised after building it, a hook failed: see
            # _after_request and _release_on_exception); and, last, when it is freed.
            # Else the claim would refuse the conversation's next message until it
            # expired: a traceback keeps a dropped response in a cycle until the
            # garbage collector happens to run.
            response.call_on_close(release)
            weakref.finalize(response, release)
            rs.stream_release = release
            rs.stream_response = weakref.ref(response)
        if rs.context is not None and rs.context.degraded:
            # What opening found (overflowed turns unreadable, the tier down) is known
            # before the first byte: said in the headers too, for clients that read
            # them. The final event carries every reason, these and later ones.
            response.headers["Satchel-Degraded"] = _degraded_header(rs.context.degraded)
            # Counted now: a reply that then fails ends in an error event, and never
            # reaches finish(), but its response carried the header.
            self._count_degraded_response(rs)
        response.headers["Cache-Control"] = "no-store"
        _vary_on_token(response, self.state().config)  # as for a response with a token
        response.headers["X-Accel-Buffering"] = "no"
        if ai_sdk:
            response.headers["x-vercel-ai-ui-message-stream"] = "v1"
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
    guard: MonotonicGuard | None
    forks: ForkDetector
    #: the response headers a browser may read (SATCHEL_HEADER renames the token's),
    #: worked out once: they go on every response
    exposed: tuple[str, ...] = RESPONSE_HEADERS
    #: running on a generated development key file (no SATCHEL_KEYS): /readyz says so
    development_key: bool = False
    #: what keeps state in this process only (memory mode, a memory:// tier), or None
    per_process_store: str | None = None
    #: the first request's WSGI environ was checked for several worker processes
    multiprocess_checked: bool = False


def _per_process_store(config: SatchelConfig, tier: Any) -> str | None:
    """What of this app's state lives in this process alone, in words for a warning."""
    if config.mode == "memory":
        return "SATCHEL_MODE='memory' keeps every conversation in this worker process"
    if tier is not None and getattr(tier, "name", "") == "memory":
        if config.mode != "client":  # the store of every conversation, not an overflow
            return "the memory:// store keeps every conversation in this worker process"
        return "the memory:// tier keeps overflowed turns in this worker process"
    return None


def _warn_if_store_is_per_worker(app_state: _AppState, environ: dict[str, Any]) -> None:
    """Once per process, on its first request: the WSGI server says it runs several
    worker processes (gunicorn sets ``wsgi.multiprocess`` when ``-w`` is over 1), and
    state this app needs lives in one of them. Requests that reach another worker
    start over (memory mode: ``session_not_found``) or miss their overflowed turns
    (``segment_missing``), flagged, but with no word at start-up it looks like a bug."""
    if app_state.per_process_store and environ.get("wsgi.multiprocess"):
        log.warning(
            "%s, but the server runs several worker processes (wsgi.multiprocess): a "
            "conversation whose requests reach another worker starts over or misses its "
            "overflowed turns. Run one worker process (threads are fine), route each "
            "conversation to one worker, or keep the state in Redis (docs/scaling.md)",
            app_state.per_process_store,
        )


F = TypeVar("F", bound=Callable[..., Any])


def _delete_token_cookie(response: Response, config: SatchelConfig) -> None:
    """Remove the token's cookie, with the attributes it was set with."""
    assert config.cookie is not None
    response.delete_cookie(
        config.cookie,
        path=config.cookie_path,
        secure=config.cookie_secure,
        httponly=True,
        samesite=config.cookie_samesite,
        partitioned=config.cookie_partitioned,
    )


def _set_token_cookie(response: Response, token: str, config: SatchelConfig) -> None:
    assert config.cookie is not None
    response.set_cookie(
        config.cookie,
        token,
        max_age=config.cookie_max_age,
        secure=config.cookie_secure,
        httponly=True,
        samesite=config.cookie_samesite,
        path=config.cookie_path,
        partitioned=config.cookie_partitioned,
    )


#: An SSE comment line, which every event-stream reader skips: what an empty delta from
#: the app's generator (its "still thinking") sends, so the response's headers leave
#: before the model's first text, and a proxy that closes a silent response (nginx:
#: 60 s) keeps it open through a long reasoning pause.
SSE_KEEPALIVE = ": keep-alive\n\n"
#: at most one keep-alive comment per this many seconds (the first goes at once)
KEEPALIVE_INTERVAL = 10.0


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event named ``event`` with ``data`` as compact JSON; JSON escapes
    newlines, so the data always fits the one ``data:`` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def ai_chunk(chunk: dict[str, Any]) -> str:
    """One chunk of the AI SDK's UI message stream (a bare ``data:`` line)."""
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def _expose(response: Response, names: Sequence[str]) -> None:
    """Add ``names`` to the response's ``Access-Control-Expose-Headers``, each once,
    after what a CORS hook listed there already."""
    existing = response.headers.get("Access-Control-Expose-Headers")
    if not existing:  # the common case
        response.headers["Access-Control-Expose-Headers"] = ", ".join(names)
        return
    listed = {n.strip().lower() for n in existing.split(",")}
    missing = [n for n in names if n.lower() not in listed]
    if missing:  # none: an error response passes here twice (handler, after_request)
        response.headers["Access-Control-Expose-Headers"] = f"{existing}, {', '.join(missing)}"


def _degraded_header(reasons: Sequence[str]) -> str:
    """The ``Satchel-Degraded`` value: the reasons, each once, in order."""
    return ", ".join(dict.fromkeys(reasons))


def _vary_on_token(response: Response, config: SatchelConfig) -> None:
    """Vary on what carries the token: its header, and Cookie with ``SATCHEL_COOKIE``."""
    if config.cookie:
        add_vary(response, config.header, "Cookie")
    else:
        add_vary(response, config.header)


def _with_cors_of(original: Response, replacement: Response) -> Response:
    """``replacement`` with the CORS headers (``Access-Control-*``) and ``Vary`` values
    ``original`` carried; exposed header lists are merged."""
    for name, value in original.headers.items():
        lower = name.lower()
        if lower == "access-control-expose-headers":
            _expose(replacement, [n.strip() for n in value.split(",") if n.strip()])
        elif lower.startswith("access-control-") and name not in replacement.headers:
            replacement.headers[name] = value
    add_vary(replacement, *vary_names(original.headers))
    return replacement


def _check_route_levels(server: set[str], monotonic: set[str], has_tier: bool) -> None:
    """ConfigurationError for routes a client-held app cannot serve at the level they
    demand: ``server`` ever, ``monotonic`` without a tier for its marks."""
    for routes, level, problem in (
        (
            server,
            "'server'",
            "but this app keeps the context in the token (SATCHEL_MODE=client): one route "
            "cannot take its context off the wire. Use 'monotonic' for a route whose "
            "values must not roll back, or run the app with SATCHEL_MODE=server",
        ),
        (
            set() if has_tier else monotonic,
            "monotonic",
            "which needs a tier for its marks: set SATCHEL_OVERFLOW_URL "
            "(sqlite:///path or redis://...)",
        ),
    ):
        if routes:
            names = sorted(routes)
            demand = "demands" if len(names) == 1 else "demand"
            raise ConfigurationError(f"{', '.join(names)} {demand} {level} consistency, {problem}")


def _route_level() -> str | None:
    """The consistency level the current route's registered view demands, if any."""
    endpoint = request.endpoint
    view = current_app.view_functions.get(endpoint) if endpoint else None
    return getattr(view, "_satchel_consistency", None)


def json_body() -> Any:
    """The request's JSON body, or None when it is absent or does not parse.

    ``request.get_json(silent=True)`` catches ``ValueError`` only: a body nested deeper
    than Python's recursion limit (``[[[[...]]]]``, a few hundred kilobytes) raises
    ``RecursionError``, a 500. Here it is a JSON 400 ``invalid_request``. A chunked
    body past ``MAX_CONTENT_LENGTH`` is a 413, as one with a ``Content-Length`` is.
    """
    if request.is_json:  # get_json() reads nothing else
        _body_bytes()
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
    limit = request.max_content_length
    if body is None and request.content_length is None and limit is not None:
        # A chunked body is cut at MAX_CONTENT_LENGTH without a word, and the cut JSON
        # does not parse: say it was too large (413), as with a Content-Length.
        if len(_body_bytes()) >= limit:
            raise RequestEntityTooLarge()
    return body


def _body_bytes() -> bytes:
    """The request body, read once (cached); a body the server cannot read is a 400."""
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise  # 413 past MAX_CONTENT_LENGTH
    except Exception:
        # gunicorn raises its own exceptions (InvalidChunkSize, NoMoreData...) for a
        # malformed chunked body while the app reads it: a 500 unless caught here,
        # whatever the Content-Type (a text/plain one is read by the size check).
        # werkzeug's server raises a 400 (ClientDisconnected) for the same body: one
        # code for both.
        raise InvalidRequest(
            "the request body could not be read (malformed chunked encoding, or cut short?)"
        ) from None


def first_degraded_count() -> bool:
    """:meth:`RequestState.first_degraded_count` for this request (the flask.session
    interface's, which has no state of its own; a stream's save, after its headers,
    flags the same response again)."""
    return Satchel._request_state().first_degraded_count()


def server_timing(timings: dict[str, float], total: float) -> str:
    """``Server-Timing`` for the steps of this request, in milliseconds."""
    return ", ".join([*_timing_parts(timings), f"satchel;dur={total * 1000:.3f}"])


def _timing_parts(timings: dict[str, float]) -> list[str]:
    return [f"{step};dur={seconds * 1000:.3f}" for step, seconds in timings.items()]


def json_errors_for(app: Flask, prefix: str = "/api/") -> None:
    """Make werkzeug's HTTP errors JSON under ``prefix`` (bad JSON body, 404, 405...),
    the prefix itself without its trailing slash included (``/api`` for ``/api/``)."""
    root = prefix.rstrip("/")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response | HTTPException:
        path = request.path
        if path.startswith(prefix) or (root and path == root):
            return http_error_response(exc)
        return exc


# The drop-in flask.session interface lives beside the extension: importable from here too.
from .session import SatchelSession, SatchelSessionInterface, SessionTooLarge  # noqa: E402

__all__ = [
    "HEADER_CONTEXT",
    "Satchel",
    "SatchelSession",
    "SatchelSessionInterface",
    "SessionTooLarge",
    "error_response",
    "json_body",
    "json_errors_for",
    "server_timing",
    "sse",
]
