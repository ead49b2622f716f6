"""``flask.session`` kept client-side in a Satchel token.

:class:`SatchelSessionInterface` is a drop-in for ``app.session_interface``::

    from satchel.flask_ext.session import SatchelSessionInterface

    app.session_interface = SatchelSessionInterface()

It behaves like Flask's default :class:`~flask.sessions.SecureCookieSessionInterface`
(the same ``SESSION_COOKIE_*`` settings, ``permanent``, ``modified``, ``accessed``,
``Vary: Cookie``, ``SESSION_REFRESH_EACH_REQUEST``, the same value types through
Flask's tagged JSON), but the cookie is a Satchel token:

* sealed (AEAD, the default) or signed (HMAC), with keys derived per purpose
  (``"flask-session"``), so a session cookie is never accepted as a chat token or
  the other way round;
* compressed with zstd (with the Satchel dictionary when it is installed);
* key-rotating: the newest key seals, every listed key opens, and a cookie sealed
  with an older key is re-issued with the newest one on the next response, even when
  the session was not modified, so a rotation never logs anyone out;
* versioned: the payload is the msgpack map ``{"v": 1, "k": "flask-session",
  "d": <tagged JSON bytes>}``;
* bounded: a cookie past ``MAX_COOKIE_SIZE`` raises :class:`SessionTooLarge` instead
  of being silently dropped by the browser.

Keys, read on every request so that a change applies at once:

1. ``app.extensions["satchel"].keyring`` when the Satchel extension is installed;
2. else ``app.config["SATCHEL_KEYS"]`` (``"kid:secret,..."``, newest first, or a
   :class:`~satchel.keys.Keyring`);
3. else ``SECRET_KEY`` (sealing) and ``SECRET_KEY_FALLBACKS`` (opening only);
4. else no session: Flask's null session, which refuses writes.

See docs/flask-session.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from flask.sessions import SecureCookieSession, SessionInterface, session_json_serializer
from werkzeug.http import dump_cookie

from .. import serialize
from ..codec import Codec, Mode
from ..envelope import Header
from ..errors import (
    ConfigurationError,
    InvalidContext,
    SatchelError,
    TierError,
    TokenExpired,
    UnsupportedVersion,
    WrongMode,
)
from ..keys import KEY_PURPOSE_RULE, Keyring, is_key_purpose
from ..limits import DEFAULT_LIMITS, Limits
from ..lru import BoundedLRU
from ..observe import NULL_OBSERVER, Observer, tier_cause
from ..padding import bucket_too_long, check_pad_to
from .vary import add_vary

if TYPE_CHECKING:  # pragma: no cover
    from flask import Flask
    from flask.sessions import SessionMixin
    from flask.wrappers import Request, Response


__all__ = [
    "DEFAULT_MODE",
    "DEFAULT_PURPOSE",
    "PAYLOAD_KIND",
    "PAYLOAD_VERSION",
    "SatchelSession",
    "SatchelSessionInterface",
    "SessionTooLarge",
]

log = logging.getLogger("satchel.session")

#: The payload format version written into every session token (``"v"``).
PAYLOAD_VERSION = 1
#: What the payload is (``"k"``): a Flask session, not a chat context.
PAYLOAD_KIND = "flask-session"
#: Key-derivation purpose; ``SATCHEL_SESSION_PURPOSE`` overrides it.
DEFAULT_PURPOSE = "flask-session"
#: ``"sealed"`` (AEAD: unreadable and unchangeable by the client) or ``"signed"``.
DEFAULT_MODE = "sealed"
_MODES = ("sealed", "signed")
_UINT32_MAX = 2**32 - 1
_CACHE_SIZE = 16

#: ``overflow(app, session, value, size, limit) -> str | None``: see
#: :attr:`SatchelSessionInterface.overflow`.
OverflowHook = Callable[["Flask", "SatchelSession", str, int, int], "str | None"]
#: An unmodified session held by the overflow hook is re-stored (to slide its expiry)
#: only once this fraction of PERMANENT_SESSION_LIFETIME has passed since it was
#: sealed, not on every request: each re-store is a tier write plus a retired copy.
OVERFLOW_REFRESH_FRACTION = 0.5


#: ``Satchel-Degraded`` reasons of the overflow tier behind flask.session: its stored
#: copy could not be read (the session opened empty), or this request's session could
#: not be stored (the session ends: its cookie is deleted).
SESSION_UNAVAILABLE = "session_unavailable"
SESSION_NOT_SAVED = "session_not_saved"


def _ring_of_secrets(secrets: tuple[str | bytes, ...]) -> Keyring:
    """Flask's secrets as a ring, with a warning (once per ring: it is cached) for any
    shorter than a key should be: Flask takes them, and so does the ring, stretched,
    but a short secret is one an attacker can guess, and forge sessions with."""
    ring = Keyring.from_secrets(secrets)
    short = sum(
        1 for secret in secrets if len(secret.encode() if isinstance(secret, str) else secret) < 16
    )
    if short:
        log.warning(
            "satchel session: %d of SECRET_KEY and SECRET_KEY_FALLBACKS %s shorter than 16 "
            "bytes: a short secret can be guessed and sessions forged with it; use "
            "secrets.token_hex(32), or SATCHEL_KEYS ('satchel keygen')",
            short,
            "is" if short == 1 else "are",
        )
    return ring


class SessionTooLarge(SatchelError):
    """The session cookie would be larger than browsers accept."""

    code = "session_too_large"
    status = 500


class SatchelSession(SecureCookieSession):
    """Flask's cookie session (``modified``/``accessed`` tracking) plus what the token said.

    The extra attributes are informational; only :attr:`reissue` changes behaviour.
    """

    #: True when no readable cookie came with the request.
    new = False
    #: Re-issue the cookie even if unmodified: it was sealed with an older key or in the
    #: other mode.
    reissue = False
    #: The key id the incoming cookie was sealed with, or None.
    kid: str | None = None
    #: The incoming token's expiry (Unix seconds), kept when a cookie is only re-issued.
    token_expires_at: int | None = None
    #: The payload the cookie opened to: tells a session no view changed from one
    #: changed in place (``session["items"].append(...)`` sets no ``modified``). Held,
    #: not hashed: it is compared only when a re-issue would not fit the cookie.
    opened_payload: bytes | None = None
    #: When the incoming token was sealed (Unix seconds), or None.
    token_issued_at: int | None = None
    #: Why the incoming cookie was refused (a :class:`SatchelError` code), or None.
    rejected: str | None = None
    #: The incoming cookie when it was a reference the overflow hook resolved (or tried
    #: to): the stored copy this session came from, retired once it is replaced.
    overflow_ref: str | None = None
    #: Set when saving raised SessionTooLarge: Flask saves the session again after its
    #: error handler ran, and that second save must not repeat the failure (nor the
    #: overflow hook's tier write).
    save_failed = False
    #: The overflow tier could not be read (``"tier_unavailable"``): the session opened
    #: empty, and the response says ``Satchel-Degraded`` (a tier outage, not a bad cookie).
    tier_failure: TierError | None = None
    #: The incoming cookie was a reference no request can use again (its stored copy is
    #: gone, or it is forged): the cookie is deleted when the session is saved empty.
    dead_reference = False
    #: Set by :meth:`clear` (a logout): the stored copy this session came from is
    #: deleted at once when it is saved, even if the view wrote to it again after
    #: clearing (``flash("logged out")``), not retired for the grace period.
    cleared = False

    def clear(self) -> None:
        self.cleared = True
        super().clear()


class SatchelSessionInterface(SessionInterface):
    """Keeps ``flask.session`` in a compressed, sealed (or signed) Satchel token.

    All arguments are optional; the ``SATCHEL_SESSION_*`` config keys win over them
    when set. ``clock`` returns Unix seconds and exists so tests control time.
    """

    session_class = SatchelSession
    #: The same tagged JSON as Flask's default interface (tuple, bytes, Markup, UUID,
    #: datetime, ...); register extra tags on it exactly as with Flask's.
    serializer = session_json_serializer
    pickle_based = False

    def __init__(
        self,
        *,
        mode: str | None = None,
        purpose: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        dictionary_id: int | None = None,
        pad_to: int | None = None,
        overflow: OverflowHook | None = None,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise ConfigurationError(f"session mode must be 'sealed' or 'signed', not {mode!r}")
        if purpose is not None and not is_key_purpose(purpose):
            raise ConfigurationError(f"session purpose must be {KEY_PURPOSE_RULE}, not {purpose!r}")
        if dictionary_id is not None and (
            isinstance(dictionary_id, bool) or not isinstance(dictionary_id, int)
        ):
            # Whether it is registered is checked by check() (an app may register its
            # dictionary after building the interface); its type can be checked now.
            raise ConfigurationError(f"dictionary_id must be an int, not {dictionary_id!r}")
        self.mode = mode
        self.purpose = purpose
        self.limits = limits
        self.dictionary_id = dictionary_id
        self.pad_to = check_pad_to(pad_to)
        #: Called when the ``Set-Cookie`` header would exceed ``MAX_COOKIE_SIZE``, as
        #: ``overflow(app, session, value, size, limit)``. Return a shorter cookie value
        #: (a reference into a server-side tier, say) to send instead, or None to raise
        #: :class:`SessionTooLarge`; a :class:`~satchel.errors.TierError` it raises (its
        #: store down or full) ends the session (its cookie deleted), flagged
        #: ``session_not_saved``. If the
        #: hook also has ``resolve(app, value)``, it is asked first on every request to
        #: map a cookie value back to the full token (returning None for values that
        #: are not its references, or raising a :class:`SatchelError` whose code
        #: becomes ``session.rejected``). If it has ``retire(app, value, *, at_once)``,
        #: it is told when a reference it issued is no longer the session's cookie:
        #: replaced (``at_once=False``: a concurrent request may still carry it) or
        #: cleared (``at_once=True``). See docs/flask-session.md.
        self.overflow: OverflowHook | None = overflow
        self.clock = clock
        #: Where the overflow tier's failures are reported: ``degraded`` events
        #: (``satchel_degraded_total{reason="session_unavailable"|"session_not_saved"}``),
        #: each response counted once in ``satchel_degraded_responses_total``. None: the
        #: Satchel extension's observer when the app has one.
        self.observer = observer
        self._rings = BoundedLRU(_CACHE_SIZE)
        self._codecs = BoundedLRU(_CACHE_SIZE)

    # -- configuration -------------------------------------------------------------

    def get_mode(self, app: Flask) -> str:
        """``"sealed"`` or ``"signed"``: ``SATCHEL_SESSION_MODE``, else the constructor's."""
        mode = app.config.get("SATCHEL_SESSION_MODE") or self.mode or DEFAULT_MODE
        if mode not in _MODES:
            raise ConfigurationError(
                f"SATCHEL_SESSION_MODE must be 'sealed' or 'signed', not {mode!r}"
            )
        return mode

    def get_purpose(self, app: Flask) -> str:
        """The key-derivation purpose of session cookies (``SATCHEL_SESSION_PURPOSE``)."""
        purpose = app.config.get("SATCHEL_SESSION_PURPOSE") or self.purpose or DEFAULT_PURPOSE
        if not is_key_purpose(purpose):
            raise ConfigurationError(
                f"SATCHEL_SESSION_PURPOSE must be {KEY_PURPOSE_RULE}, not {purpose!r}"
            )
        return purpose

    def check(self, app: Flask) -> None:
        """Raise :class:`~satchel.errors.ConfigurationError` now for settings that would
        fail every request that touches ``flask.session`` (the interface reads them per
        request, so a rotation applies at once, and has no start-up hook of its own):
        call it where the app is built. ``Satchel.init_app`` calls it when this
        interface is already the app's ``session_interface``."""
        self.get_mode(app)
        self.get_purpose(app)
        self._check_pad_fits_cookie(app, self.get_pad_to(app))
        # Building the codec checks the rest (an unregistered dictionary_id, say), which
        # would otherwise surface as a 500 on the first request, not here.
        self.get_codec(app)

    def get_keyring(self, app: Flask) -> Keyring | None:
        """The ring for this request, or None when no key is configured at all."""
        ring = self._extension_keyring(app)
        if ring is not None:
            return ring
        configured = app.config.get("SATCHEL_KEYS")
        if isinstance(configured, Keyring):
            return configured
        if isinstance(configured, str) and configured.strip():
            text = configured.strip()
            try:
                return self._rings.get_or_make(("keys", text), lambda: Keyring.from_string(text))
            except ConfigurationError as exc:  # the message never holds key material
                raise ConfigurationError(f"SATCHEL_KEYS: {exc.message}") from None
        if configured:
            raise ConfigurationError("SATCHEL_KEYS must be a 'kid:secret,...' string or a Keyring")
        if not app.secret_key:
            return None
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or ()
        if isinstance(fallbacks, str | bytes | bytearray):
            # A list was meant: iterated, "old-secret" is one key per character, and a
            # one-character secret is anyone's to guess (forged sessions).
            raise ConfigurationError(
                "SECRET_KEY_FALLBACKS is a list of old secret keys, not one key: write [old_key]"
            )
        # Flask lists fallbacks oldest first; the ring wants the current key first. A
        # None or an empty one is no key ([os.environ.get("OLD_KEY", "")] with the
        # variable unset): skipped, not a 500 on every request, and above all not a key:
        # an empty secret stretched is one anyone can compute, and forge sessions with.
        older = [key for key in reversed(list(fallbacks)) if key]
        # bytes, not bytearray: the secrets are the ring cache's key, so they must hash
        # (Flask accepts a bytearray SECRET_KEY, and so does Keyring.from_secrets).
        secrets = tuple(
            bytes(key) if isinstance(key, bytearray) else key for key in (app.secret_key, *older)
        )
        return self._rings.get_or_make(("secrets", secrets), lambda: _ring_of_secrets(secrets))

    @staticmethod
    def _extension_keyring(app: Flask) -> Keyring | None:
        """The Satchel extension's ring: ``.keyring``, else ``.codec.keyring``, else None."""
        ext = app.extensions.get("satchel")
        if ext is None:
            return None
        ring = getattr(ext, "keyring", None)
        if ring is None:
            ring = getattr(getattr(ext, "codec", None), "keyring", None)
        if ring is not None and not isinstance(ring, Keyring):
            raise ConfigurationError("app.extensions['satchel'] holds no satchel Keyring")
        return ring

    def get_pad_to(self, app: Flask) -> int | None:
        """Pad session cookies to a multiple of this many bytes (``SATCHEL_SESSION_PAD_TO``)."""
        value = app.config.get("SATCHEL_SESSION_PAD_TO", self.pad_to)
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None  # as SATCHEL_PAD_TO reads it: off
        try:
            return check_pad_to(int(value) if isinstance(value, str) else value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"SATCHEL_SESSION_PAD_TO: {exc}") from None

    def _check_pad_fits_cookie(self, app: Flask, pad_to: int | None) -> None:
        """Over ``MAX_COOKIE_SIZE``, every non-empty session would raise SessionTooLarge."""
        limit = app.config.get("MAX_COOKIE_SIZE") or 0
        if pad_to and limit:
            problem = bucket_too_long(pad_to, limit - len(self.get_cookie_name(app)) - 1)
            if problem is not None:
                raise ConfigurationError(
                    f"SATCHEL_SESSION_PAD_TO={pad_to} {problem} (MAX_COOKIE_SIZE={limit} "
                    "with the cookie's name)"
                )

    def get_codec(self, app: Flask, mode: str | None = None) -> Codec | None:
        """The codec for this request's keys, mode, purpose and padding (cached), or None."""
        ring = self.get_keyring(app)
        if ring is None:
            return None
        mode = mode or self.get_mode(app)
        purpose = self.get_purpose(app)
        pad_to = self.get_pad_to(app)

        def make() -> tuple[Keyring, Codec]:
            # Checked once per codec, not per request: a new padding makes a new codec.
            self._check_pad_fits_cookie(app, pad_to)
            codec = Codec(
                ring,
                cast(Mode, mode),  # get_mode checked it
                purpose=purpose,
                limits=self.limits,
                dictionary_id=self.dictionary_id,
                pad_to=pad_to,
                clock=self.clock,
            )
            return ring, codec

        # Keyed by the ring's identity: rings built from SATCHEL_KEYS or the secrets are
        # cached above, so one configuration maps to one ring. Each entry holds its ring,
        # so the id cannot be reused by another ring while the entry exists.
        _ring, codec = self._codecs.get_or_make((id(ring), mode, purpose, pad_to), make)
        return codec

    # -- payload -------------------------------------------------------------------

    def dumps(self, data: Mapping[str, Any]) -> bytes:
        """The session dict as the versioned msgpack payload."""
        return self._wrap(self._inner(data))

    def _inner(self, data: Mapping[str, Any]) -> bytes:
        """The session's tagged JSON: the payload's one bin."""
        return self.serializer.dumps(dict(data)).encode("utf-8")

    @staticmethod
    def _wrap(inner: bytes) -> bytes:
        return serialize.pack({"v": PAYLOAD_VERSION, "k": PAYLOAD_KIND, "d": inner})

    def _check_opens(self, session: SessionMixin, name: str, inner: bytes) -> None:
        """Refuse a session the next request could not open (the limits :meth:`loads`
        applies): a compressible 600 KB value made a 167-byte cookie that was then
        refused, and the session dropped without a word."""
        limits = self.limits
        # The session's JSON is one msgpack bin, held to max_str_bytes; the whole
        # payload (that bin and a few dozen bytes around it) to what the codec
        # decompresses at most.
        size = len(inner)
        limit = min(limits.max_str_bytes, limits.max_decompressed_bytes - 64)
        if size > limit:
            self._mark_failed(session)
            raise SessionTooLarge(
                f"the session {name!r} serializes to {size} bytes; a session opens with at "
                f"most {limit} (Limits.max_str_bytes). Store less in flask.session.",
                size=size,
                limit=limit,
            )

    def loads(self, payload: bytes) -> dict[str, Any]:
        """The inverse of :meth:`dumps`; raises :class:`~satchel.BadToken` subclasses."""
        obj = serialize.unpack(payload, self.limits)
        if not isinstance(obj, dict) or obj.get("k") != PAYLOAD_KIND:
            raise InvalidContext("the token does not hold a Flask session")
        version = obj.get("v")
        if type(version) is not int or version != PAYLOAD_VERSION:
            raise UnsupportedVersion(
                f"session payload version {version!r} is not supported",
                payload_version=version,
            )
        inner = obj.get("d")
        if not isinstance(inner, bytes):
            raise InvalidContext("the session payload has no data")
        try:
            data = self.serializer.loads(inner.decode("utf-8"))
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            StopIteration,  # Flask's TagDict on an empty tagged map
            RecursionError,  # JSON nested deeper than Python recurses
        ) as exc:
            raise InvalidContext(
                f"the session data is not tagged JSON: {type(exc).__name__}"
            ) from None
        if not isinstance(data, dict):
            raise InvalidContext("the session data is not a mapping")
        return data

    # -- open ----------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> SatchelSession | None:
        codec = self.get_codec(app)
        if codec is None:
            return None  # Flask substitutes its null session, which refuses writes
        value = request.cookies.get(self.get_cookie_name(app))
        resolve = getattr(self.overflow, "resolve", None)
        ref: str | None = None
        session: SatchelSession | None = None
        if value and resolve is not None:
            try:
                resolved = resolve(app, value)
            except SatchelError as exc:
                # Its reference, unreadable (the tier is down, the copy is gone, the
                # signature is wrong): an empty session that says why. Kept as the
                # session's reference so that replacing or clearing it retires the copy.
                session, ref = self._refused(exc), value
                if isinstance(exc, TierError):  # an outage: flagged and counted at save
                    session.tier_failure = exc
                else:
                    # The copy is gone (expired, retired, evicted by a Redis at
                    # allkeys-lru, lost in a restart) or the reference is forged:
                    # counted (satchel_session_refused_total{reason}) and logged (a
                    # throttled WARNING), so a tier that drops sessions does not log
                    # users out unseen; the dead cookie is deleted at save, so each
                    # lost session counts once, not once per request. Not a missing
                    # copy under grace=0: a request that replaced the session deleted
                    # it at once, and one still in flight with the old cookie must not
                    # delete the new cookie that request just set (with a grace period
                    # the copy outlives any such race).
                    grace = getattr(self.overflow, "grace", 0)
                    missing = exc.code == "session_missing"
                    session.dead_reference = not missing or grace > 0
                    self.get_observer(app).event("session_refused", reason=exc.code)
            else:
                if resolved is not None and resolved != value:
                    ref, value = value, resolved
        if session is None:
            if not value:
                session = self._new_session()
            else:
                try:
                    session = self._open(app, codec, value)
                except SatchelError as exc:
                    session = self._refused(exc)
        session.overflow_ref = ref
        return session

    def _refused(self, exc: SatchelError) -> SatchelSession:
        """An empty session that says why the cookie could not be used."""
        log.debug("session cookie refused: %s", exc.code)
        return self._new_session(rejected=exc.code)

    def _new_session(self, rejected: str | None = None) -> SatchelSession:
        session = self.session_class()
        session.new = True
        session.rejected = rejected
        return session

    def _open(self, app: Flask, codec: Codec, value: str) -> SatchelSession:
        now = self.clock()
        reissue = False
        try:
            env, payload = codec.open_payload(value, now=now)
        except WrongMode:
            # The mode was switched: accept the other mode's (equally authenticated)
            # tokens and re-issue them in the configured one.
            other = "signed" if codec.mode == "sealed" else "sealed"
            other_codec = self.get_codec(app, other)
            assert other_codec is not None  # same keys as ``codec``
            env, payload = other_codec.open_payload(value, now=now)
            reissue = True
        header: Header = env.header
        # Like Flask's max_age check: a lowered PERMANENT_SESSION_LIFETIME applies at once.
        lifetime = app.permanent_session_lifetime.total_seconds()
        if now - header.issued_at > lifetime + self.limits.clock_skew:
            raise TokenExpired(
                "session is older than PERMANENT_SESSION_LIFETIME",
                expired_at=int(header.issued_at + lifetime),
                now=int(now),
            )
        if header.issued_at > now + self.limits.clock_skew:
            # Issued by a clock that runs ahead: it would stay valid for that offset on
            # top of its lifetime. Flask's signer refuses a negative age too.
            raise TokenExpired(
                "session was issued in the future (a server clock is wrong)",
                issued_at=header.issued_at,
                now=int(now),
            )
        session = self.session_class(self.loads(payload))
        session.opened_payload = payload
        session.kid = header.kid
        session.token_expires_at = header.expires_at or None
        session.token_issued_at = header.issued_at
        session.reissue = reissue or header.kid != codec.keyring.current.kid
        return session

    # -- save ----------------------------------------------------------------------

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        return super().should_set_cookie(app, session) or bool(getattr(session, "reissue", False))

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        if session.permanent:
            return datetime.fromtimestamp(self._expires_at(app, self.clock()), UTC)
        return None

    def _expires_at(self, app: Flask, now: float) -> int:
        lifetime = app.permanent_session_lifetime.total_seconds()
        return max(1, min(int(now + lifetime), _UINT32_MAX))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if session is None:
            # open_session raised (a configuration error): Flask still finalizes the
            # request with no session, and its 500 must not gain a second traceback.
            return
        failed_before = getattr(session, "save_failed", False)
        self._save(app, session, response)
        tier_failure: TierError | None = getattr(session, "tier_failure", None)
        if tier_failure is not None and not failed_before:
            self._flag(app, response, SESSION_UNAVAILABLE, tier_failure)

    def _save(self, app: Flask, session: SessionMixin, response: Response) -> None:
        name = self.get_cookie_name(app)
        # The attributes every Set-Cookie of the session carries, a deletion's included:
        # a browser drops a cookie only for the domain and path it was set with.
        attributes: dict[str, Any] = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "partitioned": self.get_cookie_partitioned(app),
            "samesite": self.get_cookie_samesite(app),
            "httponly": self.get_cookie_httponly(app),
        }

        if session.accessed:
            add_vary(response, "Cookie")
        if getattr(session, "save_failed", False):
            # Flask's error handling saves the session a second time: the first save
            # already raised, and the client keeps the cookie it has.
            return
        ref: str | None = getattr(session, "overflow_ref", None)

        # Emptied: remove the cookie. Empty and untouched: nothing to send, but for a
        # dead reference (its copy gone): every later request would look it up again.
        if not session:
            if session.modified or getattr(session, "dead_reference", False):
                response.delete_cookie(name, **attributes)
                add_vary(response, "Cookie")
                if ref is not None:
                    # Logging out must not leave the session readable in the tier.
                    self._retire(app, ref, at_once=True)
            return

        if not self.should_set_cookie(app, session):
            return
        if ref is not None and self._keeps_overflow_ref(app, session):
            return  # the cookie already points at this unchanged session

        codec = self.get_codec(app)
        if codec is None:
            raise ConfigurationError(
                "cannot save the session: no SATCHEL_KEYS, Satchel extension keyring or "
                "SECRET_KEY is configured"
            )
        now = self.clock()
        refreshed = session.modified or (
            session.permanent and app.config["SESSION_REFRESH_EACH_REQUEST"]
        )
        kept = getattr(session, "token_expires_at", None)
        # Flask's hook for the expiry, asked for every session as Flask's own interface
        # does: a date is the cookie's Expires (a subclass's "remember me" on a session
        # that is not permanent too), None a browser-session cookie (a permanent one
        # too). The default says now + lifetime for permanent sessions, else None.
        chosen = self.get_expiration_time(app, session)
        sealed_at = now
        if kept and not refreshed:
            expires_at = kept  # a cookie re-issued only for a new key keeps its expiry
            # and its age: PERMANENT_SESSION_LIFETIME, lowered later, is measured from
            # when the session was written, as Flask's signer measures it.
            sealed_at = getattr(session, "token_issued_at", None) or now
        elif chosen is not None:
            if chosen.tzinfo is None:
                # Naive is UTC, as werkzeug's dump_cookie writes the Expires of it;
                # .timestamp() would read local time, and east of UTC seal a token
                # expired already (datetime.utcnow() + delta, Flask's style before 2.3).
                chosen = chosen.replace(tzinfo=UTC)
            expires_at = max(1, min(int(chosen.timestamp()), _UINT32_MAX))
        else:
            # No Expires on the cookie, but the token still expires after the lifetime
            # (Flask's signer likewise refuses a cookie older than max_age).
            expires_at = self._expires_at(app, now)
        inner = self._inner(session)
        self._check_opens(session, name, inner)
        payload = self._wrap(inner)
        value, _raw = codec.seal_payload(payload, now=sealed_at, expires_at=expires_at)
        if len(value) > self.limits.max_token_bytes:
            # Past what opening accepts (step 1, the length cap): a session of random
            # bytes, which do not compress, was stored by the overflow hook with a 200
            # and refused on the next request (token_too_large), lost without a word.
            self._mark_failed(session)
            raise SessionTooLarge(
                f"the session {name!r} seals to a {len(value)}-byte token; a session opens "
                f"with at most {self.limits.max_token_bytes} (Limits.max_token_bytes). "
                "Store less in flask.session.",
                size=len(value),
                limit=self.limits.max_token_bytes,
            )
        expires = datetime.fromtimestamp(expires_at, UTC) if chosen is not None else None

        def header_for(cookie_value: str) -> str:
            return dump_cookie(
                name,
                cookie_value,
                expires=expires,
                max_size=0,  # checked below, as an error rather than a warning
                **attributes,
            )

        header = header_for(value)
        limit = response.max_cookie_size
        if limit and len(header) > limit:
            size = len(header)
            replacement = None
            opened = getattr(session, "opened_payload", None)
            unchanged = not session.modified and opened == payload
            refused: TierError | None = None  # the hook's store refused the write
            if self.overflow is not None:
                try:
                    replacement = self.overflow(app, session, value, size, limit)  # type: ignore[arg-type]
                except TierError as exc:
                    refused = exc
                    if not unchanged:
                        # The store is down or full: this request's session cannot be
                        # kept anywhere. The response goes out as the view made it (its
                        # other work is done: Flask's 500, or a 503 saying "retry",
                        # would have a user repeat what already happened), and the
                        # session ends: its cookie is deleted. Keeping the client's
                        # previous cookie would undo what the view took away (a logout
                        # by session.pop("user"), a role dropped, a CSRF token
                        # rotated) behind a 200. Flagged, counted and logged (INFO
                        # here: the audit's degraded record and the tier's warning are
                        # the throttled WARNINGs), never silent; the stored copy the
                        # client referred to expires at its TTL.
                        self._mark_failed(session)
                        response.delete_cookie(name, **attributes)
                        add_vary(response, "Cookie")
                        self._flag(app, response, SESSION_NOT_SAVED, exc)
                        log.info(
                            "satchel session: the overflow store refused the session "
                            "(%s); the session ends (its cookie deleted)",
                            exc.code,
                        )
                        return
            if replacement is None and unchanged:
                # Only a re-issue (a new key, the other mode) or a refresh of a session
                # no view changed: the cookie the client holds still opens. Raising
                # would fail every request of that browser, a 404 included, because
                # the client keeps that cookie and each request would re-issue it.
                # Nothing is lost, so nothing is flagged; INFO when the store refused it
                # (the tier's own warning is throttled), else WARNING: the app's sessions
                # outgrow the cookie with no overflow hook to take them.
                log.log(
                    logging.INFO if refused is not None else logging.WARNING,
                    "satchel session: re-issuing the unchanged session cookie %r would "
                    "make it %d bytes, over MAX_COOKIE_SIZE (%d)%s; the client keeps the "
                    "one it has (it opens until its key leaves the ring or it expires)",
                    name,
                    size,
                    limit,
                    f", and the overflow store refused the write ({refused.code})"
                    if refused is not None
                    else ", and the overflow hook declined it"
                    if self.overflow is not None
                    else "",
                )
                return
            if replacement is None:
                self._mark_failed(session)
                # Only a hook that declined (returned None) gets here with one: its
                # store refusing the write (a TierError) ended the session above.
                remedy = (
                    "The session overflow hook returned None (it declined to store the "
                    "session); the session cannot go in a cookie meanwhile."
                    if self.overflow is not None
                    else "Browsers drop cookies past about 4 KB, so store less in flask.session."
                )
                raise SessionTooLarge(
                    f"the session cookie {name!r} would be {size} bytes (a {len(value)}-byte "
                    f"token plus attributes); the limit is {limit} bytes (MAX_COOKIE_SIZE, "
                    f"attributes included). {remedy}",
                    size=size,
                    limit=limit,
                    token_size=len(value),
                )
            header = header_for(replacement)
            value = replacement
            if len(header) > limit:
                self._mark_failed(session)
                raise SessionTooLarge(
                    f"the overflow hook's session cookie {name!r} is still {len(header)} "
                    f"bytes; the limit is {limit} bytes (MAX_COOKIE_SIZE)",
                    size=len(header),
                    limit=limit,
                )
        response.headers.add("Set-Cookie", header)
        add_vary(response, "Cookie")
        if ref is not None and ref != value:
            # Replaced by a new copy or a plain cookie. Retired after the new cookie is
            # set, never before: a failed save leaves the client on the old reference.
            # A cleared session (a logout that then flashed a message) deletes it now.
            self._retire(app, ref, at_once=getattr(session, "cleared", False))

    def _keeps_overflow_ref(self, app: Flask, session: SessionMixin) -> bool:
        """An unmodified session from the overflow hook keeps its stored copy.

        Only a refresh (``SESSION_REFRESH_EACH_REQUEST``) would write it again, and
        re-storing on every request multiplies tier writes and retired copies. It is
        refreshed once its token is past :data:`OVERFLOW_REFRESH_FRACTION` of the
        lifetime, so a user seen at least every half-lifetime stays logged in.
        """
        if session.modified or getattr(session, "reissue", False):
            return False
        issued = getattr(session, "token_issued_at", None)
        if issued is None:
            return False
        span = app.permanent_session_lifetime.total_seconds()
        expires = getattr(session, "token_expires_at", None)
        if expires:
            # The token's own span when it is shorter: a lifetime raised since it was
            # stored, or get_expiration_time giving a sliding expiry of its own. Waiting
            # for half the lifetime let an active user's token expire.
            span = min(span, expires - issued)
        return self.clock() - issued < span * OVERFLOW_REFRESH_FRACTION

    def _retire(self, app: Flask, ref: str, *, at_once: bool) -> None:
        retire = getattr(self.overflow, "retire", None)
        if retire is None:
            return
        try:
            retire(app, ref, at_once=at_once)
        except Exception:
            # Cleanup after the response's cookie is decided: a failure only leaves the
            # stored copy to its TTL, and must not turn the response into an error.
            log.exception("satchel session overflow: retiring the previous copy failed")

    @staticmethod
    def _mark_failed(session: SessionMixin) -> None:
        try:
            session.save_failed = True  # type: ignore[attr-defined]
        except AttributeError:  # a session class with __slots__: saved twice, as before
            pass

    def get_observer(self, app: Flask) -> Observer:
        """:attr:`observer`, else the Satchel extension's (its metrics and audit log),
        else one that does nothing."""
        if self.observer is not None:
            return self.observer
        state = app.extensions.get("satchel")
        observer = getattr(getattr(state, "pipeline", None), "observer", None)
        return observer if isinstance(observer, Observer) else NULL_OBSERVER

    def _flag(self, app: Flask, response: Response, reason: str, exc: TierError) -> None:
        """Say ``reason`` on the response (``Satchel-Degraded``, beside any reason the
        chat extension gave) and count it, the response once in all."""
        from . import first_degraded_count  # the extension imports this module

        present = [r.strip() for r in response.headers.get("Satchel-Degraded", "").split(",")]
        present = [r for r in present if r]
        if reason in present:
            return
        response.headers["Satchel-Degraded"] = ", ".join([*present, reason])
        observer = self.get_observer(app)
        observer.event("degraded", reason=reason, detail=tier_cause(exc))
        if first_degraded_count():
            observer.event("degraded_response")
