"""``SATCHEL_*`` configuration keys, read once in ``init_app``.

=============================== ============== ==============================================
key                             default        meaning
=============================== ============== ==============================================
SATCHEL_KEYS                    env            ``kid:secret,...`` (newest first) or a Keyring;
                                               falls back to the SATCHEL_KEYS env variable
SATCHEL_ANCHOR_KID              env, else      the key that names sessions (tags, segment
                                last key       keys, marks); falls back to the
                                               SATCHEL_ANCHOR_KID env variable, as the
                                               CLI reads it; see docs/operations.md
SATCHEL_DEV_KEY_FILE            None           when no keys are set: generate and keep a
                                               development key in this file (with a warning)
SATCHEL_TOKEN_MODE              "sealed"       "sealed" (AEAD) or "signed" (HMAC)
SATCHEL_AEAD                    "aes-256-gcm"  or "chacha20-poly1305"
SATCHEL_PURPOSE                 "satchel"      scopes derived keys: tokens of another purpose
                                               are refused
SATCHEL_DICTIONARIES            None           the app's own zstd dictionaries, {id: path
                                               or bytes} with ids 128-255, registered in
                                               init_app (compress.register_dictionary);
                                               as a str (the environment): "200=a.zdict,
                                               201=b.zdict"
SATCHEL_DICTIONARY_ID           shipped (1)    dictionary new tokens are compressed with
SATCHEL_METADATA_VERSION        0              version of the shape of ctx.metadata; tokens
                                               with an older one are migrated on read
                                               (Satchel.metadata_migration)
SATCHEL_METADATA_WRITE_VERSION  the version    the shape tokens are written in; below
                                               SATCHEL_METADATA_VERSION for the first of
                                               two deploys of a shape change, so replicas
                                               still on the old release can read them
                                               (Satchel.metadata_downgrade)
SATCHEL_PAD_TO                  None           round every token up to a multiple of this
                                               many bytes (16..16384), so a sealed token's
                                               length hides how well it compressed
SATCHEL_HEADER                  Satchel-Context request and response header (releases before
                                               2026-11-27 answered in Satchel-Context
                                               whatever this said); not a standard
                                               header, nor one the extension writes
                                               (Satchel-Seq, Access-Control-*, ...),
                                               nor one fetch() refuses to send
                                               (Sec-*, Proxy-*, Via, ...) or proxies
                                               append to (X-Forwarded-For, ...)
SATCHEL_COOKIE                  None           cookie name: also read and write a cookie
                                               (not SESSION_COOKIE_NAME; __Secure- and
                                               __Host- names need what browsers ask;
                                               empty: none)
SATCHEL_COOKIE_SECURE           True
SATCHEL_COOKIE_SAMESITE         "Lax"          "Strict", "Lax", "None" (any case), or None/""
                                               to leave the attribute out; "None" needs
                                               SATCHEL_COOKIE_SECURE (browsers drop it)
SATCHEL_COOKIE_PATH             "/"
SATCHEL_COOKIE_PARTITIONED      False          add Partitioned (CHIPS): a cookie set by an
                                               API on another site than the page's, which
                                               browsers that block third-party cookies
                                               store only partitioned; needs Secure
SATCHEL_COOKIE_MAX_AGE          None           cookie Max-Age in seconds (None: a cookie
                                               that ends with the browser session; at
                                               most 400 days)
SATCHEL_JSON_FIELD              None           also read the token from this JSON body field
                                               (a string; null or absent: a new context;
                                               anything else is token_malformed; the
                                               key empty: none)
SATCHEL_ON_BAD_TOKEN            "error"        "error" (JSON 4xx) or "fresh" (new context,
                                               ``Satchel-Reset`` header says why)
SATCHEL_TOKEN_LIMIT             65536          raw token length cap, checked first; (client
                                               mode) at least 1024, (server, memory mode) at
                                               least 80, a carrier; caps below left at their
                                               defaults are lowered to it, and one set above
                                               it is refused (the app could not open the
                                               tokens it issues)
SATCHEL_MAX_TOKEN_BYTES         3800           soft byte budget (fits a 4 KB cookie)
SATCHEL_HARD_MAX_TOKEN_BYTES    8000           no token is longer (fits 8 KB header limits;
                                               the budget, if larger, when unset); with
                                               SATCHEL_COOKIE, at most what a cookie holds
SATCHEL_MAX_TURNS               40             rolling window (None: off)
SATCHEL_MAX_LLM_TOKENS          None           LLM-token budget (None: off)
SATCHEL_MAX_TURN_CHARS          32000          per-turn text cap
SATCHEL_IDLE_TTL                604800         seconds without use before a token expires
SATCHEL_MAX_AGE                 2592000        absolute context lifetime, seconds
SATCHEL_SUMMARIZER              extractive     callable (dropped_turns, summary) -> summary,
                                               or "extractive"
SATCHEL_OVERFLOW_URL            None           redis://, rediss://, redis+sentinel://,
                                               redis+cluster://, sqlite:///path, memory://
SATCHEL_MODE                    "client"       "client" (token), "server" (context in the
                                               store, signed id travels), "memory"
SATCHEL_STORE_URL               overflow URL   where "server" mode keeps contexts (not
                                               read in "client" mode: a warning)
SATCHEL_TIER_READ_TIMEOUT       0.05           seconds per tier reply (Redis socket_timeout;
                                               SQLite waits 4x this for a locked file)
SATCHEL_TIER_CONNECT_TIMEOUT    0.1            seconds per new tier connection (either
                                               timeout: at most 3600)
SATCHEL_BREAKER_FAIL_MAX        5              consecutive failures that open the breaker
SATCHEL_BREAKER_RESET_TIMEOUT   2.0            seconds open before one trial call (a short
                                               blip must not refuse writes for long)
SATCHEL_SEGMENT_CACHE_BYTES     8 MiB          in-process cache of recently read segments
SATCHEL_SEGMENT_GRACE           600            seconds a segment replaced by a merge stays
                                               readable, so a retried request or a second
                                               tab with the token before the merge still
                                               finds its turns (0: delete at once)
SATCHEL_CONSISTENCY             "client"       "client", "monotonic" (needs a tier), "server"
SATCHEL_TIER_DOWN_POLICY        "fail_open"    monotonic with the tier down: "fail_open"
                                               (accept, flag) or "fail_closed" (503)
SATCHEL_MARK_IDS                True           monotonic saves mint mark ids (a token must
                                               descend from the newest save); False for
                                               the first deploy over a release before
                                               2026-11-27, whose replicas drop them
                                               (docs/consistency.md)
SATCHEL_KEEP_NEWEST             True           monotonic saves keep their token next to
                                               the mark, and a 409 stale_context for the
                                               token it was made from (its response was
                                               lost) hands it back; False keeps no more
                                               (docs/consistency.md)
SATCHEL_USER_BINDING            None           callable of no arguments returning the
                                               user id, or None
SATCHEL_METRICS_ROUTE           None           e.g. "/metrics" (Prometheus text format)
SATCHEL_HEALTH_ROUTES           False          add /healthz and /readyz
=============================== ============== ==============================================

Everything is checked in ``init_app``, and a value that would fail every request
instead (a header name that is not one, or a standard header such as Content-Type; a
SameSite value werkzeug refuses; NaN or a negative timeout) is a
:class:`~satchel.errors.ConfigurationError` naming its key. Booleans from the
environment are ``1/true/yes/on`` or ``0/false/no/off`` (or empty); anything else is
refused, not taken as true.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flask import Flask

from ..compress import load_dictionary, register_dictionaries
from ..errors import ConfigurationError, UnsupportedVersion
from ..keys import KEY_PURPOSE_RULE, Keyring, generate_key, is_key_purpose
from ..lifecycle import DEFAULT_HARD_MAX_TOKEN_BYTES, ExtractiveSummarizer, LifecyclePolicy
from ..lifecycle.policy import limit_problem
from ..padding import bucket_too_long, check_pad_to
from ..server_mode import CARRIER_LENGTH

log = logging.getLogger("satchel")

#: Browsers are only bound to keep a cookie whose whole Set-Cookie value, attributes
#: included, fits in 4096 bytes (RFC 6265, 6.1); a larger one may be dropped without an
#: error, on either side. werkzeug warns past 4093 (Flask's MAX_COOKIE_SIZE): that.
COOKIE_MAX_BYTES = 4093


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def parse_flag(value: Any) -> bool:
    """A boolean from config or the environment: ``1/true/yes/on`` or ``0/false/no/off``
    (or empty). Anything else is a ValueError: ``maybe`` was silently true."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(value)
    if value is None or isinstance(value, bool | int):
        return bool(value)
    raise TypeError(value)


#: RFC 9110 field names (and RFC 6265 cookie names): one or more "tchar".
_TOKEN_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: The headers a response of the extension may carry (the token's first: its name is
#: SATCHEL_HEADER's default), exposed to pages on other origins.
RESPONSE_HEADERS = (
    "Satchel-Context",
    "Satchel-Seq",
    "Satchel-Session",
    "Satchel-Degraded",
    "Satchel-Reset",
    "Satchel-Fork",
    "Server-Timing",
    # Not CORS-safelisted: without it a page on another origin cannot see how long a
    # 409 context_busy or a 503 asks it to wait.
    "Retry-After",
)
#: Headers a token must never travel in: their values mean something else to every
#: server, proxy and browser on the way (a Content-Type read as a token...), or the
#: extension writes them itself (a token in Satchel-Seq was overwritten by the seq).
_RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Accept", "Authorization", "Cache-Control", "Connection", "Content-Encoding",
        "Content-Length", "Content-Type", "Cookie", "Date", "Host", "Keep-Alive",
        "Location", "Proxy-Authorization", "Proxy-Connection", "Server", "Server-Timing",
        "Set-Cookie", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Vary",
        "Access-Control-Expose-Headers", "Access-Control-Allow-Headers",
        "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
        "Origin", "X-Accel-Buffering", *RESPONSE_HEADERS[1:],
        # Headers a browser's fetch() refuses to send (the Fetch standard's forbidden
        # request headers): the token would never arrive, and every request would
        # start a new conversation.
        "Accept-Charset", "Accept-Encoding", "Cookie2", "DNT", "Expect", "Referer",
        "Via", "X-HTTP-Method", "X-HTTP-Method-Override", "X-Method-Override",
        # Headers proxies write or append to (a token would arrive as "tok, 1.1 proxy").
        "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
        "X-Forwarded-Port", "X-Real-IP", "Max-Forwards",
        # Other standard headers, which caches, servers and clients read themselves.
        "Accept-Language", "Accept-Ranges", "Age", "Allow", "Content-Disposition",
        "Content-Language", "Content-Location", "Content-Range", "ETag", "Expires",
        "If-Match", "If-Modified-Since", "If-None-Match", "If-Range",
        "If-Unmodified-Since", "Last-Modified", "Link", "Pragma", "Priority", "Range",
        "Refresh", "Retry-After", "User-Agent", "Warning", "WWW-Authenticate",
        "Content-Security-Policy", "Strict-Transport-Security", "X-Frame-Options",
        "X-Content-Type-Options", "Referrer-Policy", "Permissions-Policy",
    )
)  # fmt: skip
#: Prefixes of header families that are not an app's to use: fetch() refuses Sec-* and
#: Proxy-*, and Access-Control-* is CORS's.
_RESERVED_HEADER_PREFIXES = ("sec-", "proxy-", "access-control-")
_SAMESITE = {"strict": "Strict", "lax": "Lax", "none": "None"}
#: The smallest SATCHEL_TOKEN_LIMIT: a new context's token is a few hundred bytes.
MIN_TOKEN_LIMIT = 1024
#: The longest tier timeout: a socket refuses past ~9.2e9 s (OverflowError inside
#: redis-py on every call), and a request that waits an hour for its tier is down.
MAX_TIER_TIMEOUT = 3600.0
#: Browsers keep a cookie 400 days at most (RFC 6265bis); werkzeug cannot even write
#: an expiry past year 9999 (every response a 500).
MAX_COOKIE_MAX_AGE = 400 * 86400


def _callable_without_arguments(fn: Any) -> bool:
    """Whether ``fn`` can be called with no arguments (a function of one argument
    passed, then every request was a 500 TypeError). A callable whose signature
    Python cannot read (some builtins) is taken as it is."""
    if not callable(fn):
        return False
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read
        return True
    return True


def _optional_int(value: Any) -> int | None:
    if value is None or value == "" or str(value).lower() == "none":
        return None
    return _whole(value)


def _whole(value: Any) -> int:
    """An integer setting: an int, a whole float (``7 * DAY``, ``timedelta(...)
    .total_seconds()``), or a str of one. Not a bool (True would be 1) nor a fraction
    (int(2.7) is 2: a typo would pass as another number)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _dictionaries_from_text(text: str) -> dict[int, str]:
    """``SATCHEL_DICTIONARIES`` as the environment spells it: ``ID=PATH`` pairs, comma
    separated (the form ``satchel bench codec --dictionary`` takes)."""
    out: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        dict_id, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise ConfigurationError(
                f"SATCHEL_DICTIONARIES: {item!r} is not ID=PATH (for example 200=app.zdict)"
            )
        try:
            out[int(dict_id)] = path.strip()
        except ValueError:
            raise ConfigurationError(
                f"SATCHEL_DICTIONARIES: the id in {item!r} is not an integer"
            ) from None
    return out


#: SATCHEL_* keys read outside SatchelConfig's fields (the key ring, the session
#: interface, dictionaries).
OTHER_KEYS = frozenset(
    {
        "SATCHEL_KEYS",
        "SATCHEL_ANCHOR_KID",
        "SATCHEL_DEV_KEY_FILE",
        "SATCHEL_DICTIONARIES",
        "SATCHEL_SESSION_MODE",
        "SATCHEL_SESSION_PAD_TO",
        "SATCHEL_SESSION_PURPOSE",
    }
)


def known_keys() -> frozenset[str]:
    """Every ``SATCHEL_*`` config key Satchel reads."""
    return OTHER_KEYS | {"SATCHEL_" + f.name.upper() for f in fields(SatchelConfig)}


def warn_misspelled_keys(config: Mapping[str, Any]) -> list[str]:
    """Warn about each ``SATCHEL_*`` key Satchel does not read that looks like one it
    does (``SATCHEL_OVERFLOW`` for ``SATCHEL_OVERFLOW_URL``): a misspelled setting is
    otherwise ignored without a word, and the default it meant to change applies.
    Keys like no known one are left alone (an app's own ``SATCHEL_*`` settings).
    Returns the warnings."""
    known = known_keys()
    warnings = []
    for key in config:
        if not isinstance(key, str) or not key.startswith("SATCHEL_") or key in known:
            continue
        meant = _meant_key(key, known)
        if meant:
            warnings.append(f"{key} is not a Satchel setting; did you mean {meant}?")
    for warning in warnings:
        log.warning("satchel: %s (it is ignored)", warning)
    return warnings


#: Words a guessed setting name ends with where Satchel's has none (SATCHEL_COOKIE_NAME,
#: as SESSION_COOKIE_NAME, for SATCHEL_COOKIE).
_GUESSED_SUFFIXES = ("_NAME", "_URL", "_ENABLED", "_ENABLE", "_ON", "_PATH", "_ROUTE", "_ROUTES")


def _meant_key(key: str, known: Collection[str]) -> str | None:
    """The known key ``key`` most likely meant, or None.

    A key within two letters (``SATCHEL_MAX_TURN``); else, before looser spelling, the
    shape of a guess: a known key with a word more (``SATCHEL_METRICS`` for
    ``SATCHEL_METRICS_ROUTE``), or with a word less (``SATCHEL_COOKIE_NAME`` for
    ``SATCHEL_COOKIE``): spelling alone pointed the latter at
    ``SATCHEL_COOKIE_SAMESITE``, a wrong key whose advice was itself refused.
    """
    typos = sorted((d, k) for k in known if (d := _edits(key, k)) is not None)
    if typos and typos[0][0] <= 1:  # a letter away (SATCHEL_MAX_TURN): spelling says it
        return typos[0][1]
    # One known key that is this one and a word more; with several (SATCHEL_TOKEN:
    # _MODE or _LIMIT?) or words more, the guess would be a guess, and none is made.
    # Before two letters of spelling: SATCHEL_PAD is SATCHEL_PAD_TO cut short, not
    # SATCHEL_AEAD, and SATCHEL_KEEP is SATCHEL_KEEP_NEWEST, not SATCHEL_KEYS (advice
    # that was itself refused, or ignored).
    longer = [k for k in known if k.startswith(key + "_") and "_" not in k[len(key) + 1 :]]
    if longer:
        return longer[0] if len(longer) == 1 else None
    if typos:  # two letters away
        return typos[0][1]
    for suffix in _GUESSED_SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in known:
            return key[: -len(suffix)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
    return close[0] if close else None


def _edits(a: str, b: str, limit: int = 2) -> int | None:
    """How many inserted, deleted or changed letters make ``a`` into ``b``, if at most
    ``limit`` (a similarity ratio sent SATCHEL_SEGMENT_CACHE to SATCHEL_SEGMENT_GRACE,
    three letters away, over SATCHEL_SEGMENT_CACHE_BYTES); else None."""
    if abs(len(a) - len(b)) > limit:
        return None
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if min(row) > limit:
            return None
        previous = row
    return previous[-1] if previous[-1] <= limit else None


def _converted(values: dict[str, Any], names: tuple[str, ...], convert: Any, what: str) -> None:
    """Convert ``values[name]`` in place; a bad value names its SATCHEL_* key."""
    for name in names:
        if name in values:
            try:
                values[name] = convert(values[name])
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"SATCHEL_{name.upper()} must be {what}, not {values[name]!r}"
                ) from None


@dataclass(slots=True)
class SatchelConfig:
    token_mode: str = "sealed"
    aead: str = "aes-256-gcm"
    purpose: str = "satchel"
    pad_to: int | None = None
    dictionaries: Any = None
    dictionary_id: int | None = None
    metadata_version: int | None = None
    metadata_write_version: int | None = None
    header: str = "Satchel-Context"
    cookie: str | None = None  # SATCHEL_COOKIE: the cookie's name
    cookie_secure: bool = True
    cookie_samesite: str | None = "Lax"  # None: the attribute is left out
    cookie_partitioned: bool = False
    cookie_path: str = "/"
    cookie_max_age: int | None = None
    json_field: str | None = None
    on_bad_token: str = "error"
    token_limit: int = 64 * 1024
    max_token_bytes: int | None = 3800
    hard_max_token_bytes: int | None = DEFAULT_HARD_MAX_TOKEN_BYTES
    max_turns: int | None = 40
    max_llm_tokens: int | None = None
    max_turn_chars: int | None = 32_000
    idle_ttl: int | None = 7 * 86400
    max_age: int | None = 30 * 86400
    summarizer: Any = None
    overflow_url: str | None = None
    store_url: str | None = None
    tier_read_timeout: float = 0.05
    tier_connect_timeout: float = 0.1
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 2.0
    segment_cache_bytes: int = 8 * 1024 * 1024
    segment_grace: float = 600.0
    consistency: str = "client"
    tier_down_policy: str = "fail_open"
    mark_ids: bool = True
    keep_newest: bool = True
    mode: str = "client"
    metrics_route: str | None = None
    health_routes: bool = False
    user_binding: Any = None

    def _check_cookie_prefix(self) -> None:
        """Browsers drop a ``__Secure-`` cookie set without Secure, and a ``__Host-``
        one set without Secure or with a path other than / (RFC 6265bis), without a
        word: the token would never come back."""
        name = (self.cookie or "").lower()
        if name.startswith(("__secure-", "__host-")) and not self.cookie_secure:
            raise ConfigurationError(
                f"SATCHEL_COOKIE={self.cookie!r}: a cookie with this prefix needs "
                "SATCHEL_COOKIE_SECURE (browsers drop it otherwise)"
            )
        if name.startswith("__host-") and self.cookie_path != "/":
            raise ConfigurationError(
                f"SATCHEL_COOKIE={self.cookie!r}: a __Host- cookie needs "
                f"SATCHEL_COOKIE_PATH='/', not {self.cookie_path!r} (browsers drop it otherwise)"
            )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SatchelConfig:
        """``SATCHEL_*`` settings given outside an app (the CLI's environment, a bench's
        knobs), parsed and checked exactly as :meth:`from_app` checks an app's config."""
        from flask import Flask

        holder = Flask("satchel-settings")
        holder.config.update(settings)
        return cls.from_app(holder)

    @classmethod
    def from_app(cls, app: Flask, **overrides: Any) -> SatchelConfig:
        """The app's ``SATCHEL_*`` keys, checked; ``overrides`` (field names, for example
        ``mode="memory"`` from ``Satchel(app, mode=...)``) win over the config."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = "SATCHEL_" + f.name.upper()
            if key in app.config:
                values[f.name] = app.config[key]
        warn_misspelled_keys(app.config)
        values.update({k: v for k, v in overrides.items() if v is not None})
        optional_ints = (
            "max_token_bytes",
            "hard_max_token_bytes",
            "max_turns",
            "max_llm_tokens",
            "max_turn_chars",
            "idle_ttl",
            "max_age",
            "cookie_max_age",
            "pad_to",
            "dictionary_id",
            "metadata_version",
            "metadata_write_version",
        )
        _converted(values, optional_ints, _optional_int, "an integer (empty or None: off)")
        # "0", "false" from the environment
        flags = ("health_routes", "cookie_secure", "cookie_partitioned", "mark_ids", "keep_newest")
        _converted(values, flags, parse_flag, "true or false (1/0, yes/no, on/off)")
        # Empty is off for the optional names, as for the URLs: SATCHEL_COOKIE= in an
        # environment file (a carrier switched off) was a ConfigurationError.
        for name in ("metrics_route", "cookie", "json_field"):
            if name in values and isinstance(values[name], str) and not values[name].strip():
                values[name] = None
        ints = ("token_limit", "breaker_fail_max", "segment_cache_bytes")
        _converted(values, ints, _whole, "an integer")
        seconds = (
            "tier_read_timeout",
            "tier_connect_timeout",
            "breaker_reset_timeout",
            "segment_grace",
        )
        _converted(values, seconds, float, "a number of seconds")
        config = cls(**values)
        config._check_values()
        session_cookie = app.config.get("SESSION_COOKIE_NAME")
        if config.cookie and config.cookie == session_cookie:
            # Both written on one response, and the token read back from Flask's
            # session cookie: every request after a login was 400 token_malformed.
            raise ConfigurationError(
                f"SATCHEL_COOKIE={config.cookie!r} is Flask's session cookie "
                "(SESSION_COOKIE_NAME): use a name of its own"
            )
        if not 0 <= config.segment_grace < math.inf:  # nan compares false too
            raise ConfigurationError(
                "SATCHEL_SEGMENT_GRACE must be a finite number of seconds >= 0 "
                f"(0: delete replaced segments at once), not {config.segment_grace!r}"
            )
        if config.token_mode not in ("sealed", "signed"):
            raise ConfigurationError("SATCHEL_TOKEN_MODE must be 'sealed' or 'signed'")
        try:
            config.pad_to = check_pad_to(config.pad_to)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"SATCHEL_PAD_TO: {exc}") from None
        if config.on_bad_token not in ("error", "fresh"):
            raise ConfigurationError("SATCHEL_ON_BAD_TOKEN must be 'error' or 'fresh'")
        if config.consistency not in ("client", "monotonic", "server"):
            raise ConfigurationError(
                "SATCHEL_CONSISTENCY must be 'client', 'monotonic' or 'server'"
            )
        if config.consistency == "server" and config.mode == "client":
            if "mode" in values:  # said so (SATCHEL_MODE, Satchel(app, mode=...))
                raise ConfigurationError(
                    "SATCHEL_CONSISTENCY='server' keeps the context server-side, but the "
                    "mode is set to 'client' (SATCHEL_MODE or Satchel(app, mode=...)): "
                    "set the mode to 'server' or 'memory', or use consistency 'monotonic' "
                    "to keep the context in the token"
                )
            config.mode = "server"  # the strictest level is the server-side mode
        if config.mode not in ("client", "server", "memory"):
            raise ConfigurationError("SATCHEL_MODE must be 'client', 'server' or 'memory'")
        for name in ("max_token_bytes", "hard_max_token_bytes"):  # before comparing them
            problem = limit_problem(name, getattr(config, name))
            if problem is not None:
                raise ConfigurationError(problem)
        config._fit_token_caps(
            hard_set="hard_max_token_bytes" in values, soft_set="max_token_bytes" in values
        )
        return config

    def _check_values(self) -> None:
        """Refuse, at start-up, values that would fail every request instead (a 500 from
        werkzeug's cookie code, an HTML 500 from gunicorn's header check, every seal
        refused), naming the SATCHEL_* key."""
        if not is_key_purpose(self.purpose):
            raise ConfigurationError(
                f"SATCHEL_PURPOSE must be {KEY_PURPOSE_RULE} (it scopes every derived key), "
                f"not {self.purpose!r}"
            )
        if not (isinstance(self.header, str) and _TOKEN_NAME.fullmatch(self.header)):
            raise ConfigurationError(
                f"SATCHEL_HEADER must be an HTTP header name (letters, digits, -), "
                f"not {self.header!r}"
            )
        if self.header.lower() in _RESERVED_HEADERS or self.header.lower().startswith(
            _RESERVED_HEADER_PREFIXES
        ):
            raise ConfigurationError(
                f"SATCHEL_HEADER={self.header!r} is a header with a meaning of its own (a "
                "standard one, or one the extension writes itself); use a name of your own "
                "(the default is Satchel-Context)"
            )
        if self.cookie is not None and not (
            isinstance(self.cookie, str)
            and _TOKEN_NAME.fullmatch(self.cookie)
            and len(self.cookie) <= 128
        ):
            raise ConfigurationError(
                "SATCHEL_COOKIE must be a cookie name of at most 128 letters, digits, - "
                f"or _, not {self.cookie!r}"
            )
        samesite = self.cookie_samesite
        if samesite in (None, ""):
            self.cookie_samesite = None
        elif isinstance(samesite, str) and samesite.lower() in _SAMESITE:
            self.cookie_samesite = _SAMESITE[samesite.lower()]
        else:
            raise ConfigurationError(
                f"SATCHEL_COOKIE_SAMESITE must be 'Strict', 'Lax' or 'None', not {samesite!r}"
            )
        if self.cookie and self.cookie_partitioned and not self.cookie_secure:
            raise ConfigurationError(
                "SATCHEL_COOKIE_PARTITIONED needs SATCHEL_COOKIE_SECURE=True: browsers "
                "refuse a Partitioned cookie that is not Secure"
            )
        if self.cookie and self.cookie_samesite == "None" and not self.cookie_secure:
            # Browsers drop such a cookie without a word: the token never comes back,
            # and every request starts a new conversation.
            raise ConfigurationError(
                "SATCHEL_COOKIE_SAMESITE='None' needs SATCHEL_COOKIE_SECURE=True: browsers "
                "refuse a SameSite=None cookie that is not Secure"
            )
        client_held = self.mode == "client" and self.consistency != "server"
        if client_held and self.token_limit < MIN_TOKEN_LIMIT:  # a carrier is 80 bytes
            raise ConfigurationError(
                f"SATCHEL_TOKEN_LIMIT must be at least {MIN_TOKEN_LIMIT} bytes (it is the "
                f"length cap for opening a token), not {self.token_limit}"
            )
        if self.aead not in ("aes-256-gcm", "chacha20-poly1305"):
            raise ConfigurationError(
                f"SATCHEL_AEAD must be 'aes-256-gcm' or 'chacha20-poly1305', not {self.aead!r}"
            )
        if self.tier_down_policy not in ("fail_open", "fail_closed"):
            raise ConfigurationError(
                "SATCHEL_TIER_DOWN_POLICY must be 'fail_open' or 'fail_closed', "
                f"not {self.tier_down_policy!r}"
            )
        for name in ("tier_read_timeout", "tier_connect_timeout"):
            if not 0 < getattr(self, name) <= MAX_TIER_TIMEOUT:  # nan compares false too
                raise ConfigurationError(
                    f"SATCHEL_{name.upper()} must be a positive number of seconds, at most "
                    f"{MAX_TIER_TIMEOUT:.0f}, not {getattr(self, name)!r}"
                )
        if not 0 <= self.breaker_reset_timeout < math.inf:
            raise ConfigurationError(
                "SATCHEL_BREAKER_RESET_TIMEOUT must be a finite number of seconds >= 0, "
                f"not {self.breaker_reset_timeout!r}"
            )
        if self.breaker_fail_max < 1:
            raise ConfigurationError(
                f"SATCHEL_BREAKER_FAIL_MAX must be at least 1, not {self.breaker_fail_max}"
            )
        if self.segment_cache_bytes < 0:
            raise ConfigurationError(
                "SATCHEL_SEGMENT_CACHE_BYTES must be a number of bytes >= 0 (0: no cache), "
                f"not {self.segment_cache_bytes}"
            )
        if not (isinstance(self.cookie_path, str) and self.cookie_path.startswith("/")):
            # Browsers ignore a cookie path that is not absolute (and werkzeug raises on
            # one that is not a str): the cookie would never come back.
            raise ConfigurationError(
                f"SATCHEL_COOKIE_PATH must be a path starting with /, not {self.cookie_path!r}"
            )
        if self.cookie_max_age is not None and self.cookie_max_age <= 0:
            raise ConfigurationError(
                "SATCHEL_COOKIE_MAX_AGE must be a positive number of seconds (unset: a "
                f"cookie for the browser session), not {self.cookie_max_age}: the browser "
                "would delete the cookie at once"
            )
        if self.cookie_max_age is not None and self.cookie_max_age > MAX_COOKIE_MAX_AGE:
            raise ConfigurationError(
                f"SATCHEL_COOKIE_MAX_AGE must be at most {MAX_COOKIE_MAX_AGE} seconds (400 "
                f"days: browsers keep a cookie no longer), not {self.cookie_max_age}"
            )
        self._check_cookie_prefix()
        if self.json_field is not None and not (
            isinstance(self.json_field, str) and self.json_field
        ):
            raise ConfigurationError(
                f"SATCHEL_JSON_FIELD must be a JSON field name, not {self.json_field!r}"
            )
        if self.user_binding is not None and not _callable_without_arguments(self.user_binding):
            raise ConfigurationError(
                "SATCHEL_USER_BINDING must be a function of no arguments returning the "
                "current user's id (or None), not "
                f"{type(self.user_binding).__name__} {self.user_binding!r}"
            )
        if self.metrics_route is not None and not (
            isinstance(self.metrics_route, str) and self.metrics_route.startswith("/")
        ):
            raise ConfigurationError(
                f"SATCHEL_METRICS_ROUTE must be a path starting with /, not {self.metrics_route!r}"
            )
        if self.health_routes and self.metrics_route in ("/healthz", "/readyz"):
            # It replaced the probe: a liveness check then scraped the metrics.
            raise ConfigurationError(
                f"SATCHEL_METRICS_ROUTE={self.metrics_route!r} is a health route "
                "(SATCHEL_HEALTH_ROUTES): use another path, such as /metrics"
            )
        for name in ("overflow_url", "store_url"):
            value = getattr(self, name)
            if value not in (None, False) and not isinstance(value, str):  # False: none
                raise ConfigurationError(
                    f"SATCHEL_{name.upper()} must be a URL string (or empty for none), "
                    f"not {type(value).__name__}"
                )
        if self.token_limit < CARRIER_LENGTH:  # a session carrier (server, memory mode)
            raise ConfigurationError(
                f"SATCHEL_TOKEN_LIMIT must be at least {CARRIER_LENGTH} bytes, the length "
                f"of a session carrier, not {self.token_limit}"
            )

    def _fit_token_caps(self, *, hard_set: bool, soft_set: bool = True) -> None:
        """Make the byte budget and the hard cap agree with each other and the carrier.

        An unset hard cap follows a larger budget (whoever raised the budget raised the
        header limits on the way too). With SATCHEL_COOKIE, the cookie carries the token
        and a browser may drop one over 4096 bytes (attributes included) silently: both
        caps are held under that (:meth:`cookie_token_limit`).
        """
        soft, hard = self.max_token_bytes, self.hard_max_token_bytes
        if not hard_set and soft is not None and hard is not None and soft > hard:
            hard = soft
        if self.cookie and self.mode == "client":
            cookie_limit = self.cookie_token_limit()
            if soft is not None and soft > cookie_limit:
                log.warning(
                    "SATCHEL_MAX_TOKEN_BYTES=%d does not fit a cookie: SATCHEL_COOKIE=%r "
                    "holds at most %d bytes of token, so the budget is %d",
                    soft,
                    self.cookie,
                    cookie_limit,
                    cookie_limit,
                )
                soft = cookie_limit
            if hard is None or hard > cookie_limit:
                if hard_set:
                    log.warning(
                        "SATCHEL_HARD_MAX_TOKEN_BYTES=%s does not fit a cookie: "
                        "SATCHEL_COOKIE=%r caps it at %d",
                        hard,
                        self.cookie,
                        cookie_limit,
                    )
                hard = cookie_limit
        if self.mode == "client":
            # A cap left at its default follows a lower SATCHEL_TOKEN_LIMIT (the app must
            # open every token it issues); one set above it is a contradiction.
            token_limit = self.token_limit
            if hard is not None and hard > token_limit and not hard_set:
                hard = token_limit
            if soft is not None and soft > token_limit and not soft_set:
                soft = token_limit
            largest = max((c for c in (soft, hard) if c is not None), default=None)
            if largest is not None and largest > self.token_limit:
                raise ConfigurationError(
                    f"SATCHEL_TOKEN_LIMIT ({self.token_limit}) is below the tokens the app "
                    f"may issue ({largest} bytes, SATCHEL_HARD_MAX_TOKEN_BYTES or "
                    "SATCHEL_MAX_TOKEN_BYTES): it could not open its own tokens"
                )
        if soft is not None and hard is not None and soft > hard:
            raise ConfigurationError(
                f"SATCHEL_MAX_TOKEN_BYTES ({soft}) must not exceed "
                f"SATCHEL_HARD_MAX_TOKEN_BYTES ({hard})"
            )
        if self.pad_to and self.mode == "client":
            # Over the budget, every conversation would be cut to its newest exchange on
            # every request.
            for name, limit in (
                ("SATCHEL_MAX_TOKEN_BYTES", soft),
                ("SATCHEL_HARD_MAX_TOKEN_BYTES", hard),
            ):
                problem = bucket_too_long(self.pad_to, limit) if limit is not None else None
                if problem is not None:
                    raise ConfigurationError(
                        f"SATCHEL_PAD_TO={self.pad_to} {problem} ({name}), or raise the budget"
                    )
        self.max_token_bytes, self.hard_max_token_bytes = soft, hard

    def register_dictionaries(self) -> None:
        """Register ``SATCHEL_DICTIONARIES`` ({id: path or bytes}) with the compressor,
        and check that ``SATCHEL_DICTIONARY_ID`` names a dictionary that exists."""
        self._register_app_dictionaries()
        if self.dictionary_id is not None:
            try:
                load_dictionary(self.dictionary_id)
            except UnsupportedVersion as exc:
                raise ConfigurationError(f"SATCHEL_DICTIONARY_ID: {exc}") from None

    def _register_app_dictionaries(self) -> None:
        if not self.dictionaries:
            return
        if isinstance(self.dictionaries, str):  # from the environment: "200=a.zdict,201=b"
            self.dictionaries = _dictionaries_from_text(self.dictionaries)
        if not isinstance(self.dictionaries, Mapping):
            raise ConfigurationError("SATCHEL_DICTIONARIES must map ids to paths or bytes")
        try:
            register_dictionaries(self.dictionaries)
        except ValueError as exc:
            raise ConfigurationError(f"SATCHEL_DICTIONARIES: {exc}") from None

    def cookie_token_limit(self) -> int:
        """The longest token the cookie can carry: what is left of
        :data:`COOKIE_MAX_BYTES` once the name and every attribute it is sent with
        (measured as werkzeug writes them) are counted."""
        from werkzeug.http import dump_cookie

        empty = dump_cookie(
            self.cookie or "",
            "",
            max_age=self.cookie_max_age,
            path=self.cookie_path,
            secure=self.cookie_secure,
            httponly=True,
            samesite=self.cookie_samesite,
            partitioned=self.cookie_partitioned,
        )
        return COOKIE_MAX_BYTES - len(empty.encode("latin-1"))

    def fit_policy(self, policy: LifecyclePolicy) -> LifecyclePolicy:
        """A policy passed in code (``Satchel(app, policy=...)``), held to what the
        token's carrier holds as the config's own caps are: with SATCHEL_COOKIE, both
        byte caps under what a browser keeps (a copy; the caller's policy object may
        serve other apps)."""
        if not (self.cookie and self.mode == "client"):
            return policy
        cookie_limit = self.cookie_token_limit()
        soft, hard = policy.max_token_bytes, policy.hard_max_token_bytes
        soft_over = soft is not None and soft > cookie_limit
        hard_over = hard is None or hard > cookie_limit
        if not (soft_over or hard_over):
            return policy
        # As for the config's caps: a hard cap left at its default is held under the
        # cookie without a word; one chosen above it, or a budget above it, is told.
        if soft_over or hard not in (None, DEFAULT_HARD_MAX_TOKEN_BYTES):
            log.warning(
                "the policy's byte caps (%s, hard %s) do not fit a cookie: SATCHEL_COOKIE=%r "
                "holds at most %d bytes of token, so both are held under it",
                soft,
                hard,
                self.cookie,
                cookie_limit,
            )
        return dataclasses.replace(
            policy,
            max_token_bytes=None if soft is None else min(soft, cookie_limit),
            hard_max_token_bytes=cookie_limit if hard is None else min(hard, cookie_limit),
        )

    def lifecycle_policy(self) -> LifecyclePolicy:
        """The LifecyclePolicy the SATCHEL_* limits describe, with SATCHEL_SUMMARIZER's
        callable or the extractive default (that default's name, ``"extractive"``, is stored
        back as None). A bad value is a ConfigurationError."""
        summarizer = self.summarizer
        if isinstance(summarizer, str) and summarizer.strip().lower() in ("", "extractive"):
            summarizer = None  # the table's name for the default
        if summarizer is not None and not callable(summarizer):
            raise ConfigurationError(
                "SATCHEL_SUMMARIZER must be a callable (dropped_turns, summary) -> summary, "
                f"or 'extractive' (the default), not {summarizer!r}"
            )
        self.summarizer = summarizer
        try:
            return LifecyclePolicy(
                max_turns=self.max_turns,
                max_llm_tokens=self.max_llm_tokens,
                max_token_bytes=self.max_token_bytes,
                hard_max_token_bytes=self.hard_max_token_bytes,
                max_turn_chars=self.max_turn_chars,
                idle_ttl=self.idle_ttl,
                max_age=self.max_age,
                summarizer=self.summarizer or ExtractiveSummarizer(),
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None


def configured_keys(app: Flask) -> Any:
    """``SATCHEL_KEYS`` from the config, then the environment; falsy if neither has it
    (the extension then runs on a development key file)."""
    return app.config.get("SATCHEL_KEYS") or os.environ.get("SATCHEL_KEYS")


def keyring_from_config(
    app: Flask, config: SatchelConfig | None = None, *, given: Keyring | None = None
) -> Keyring:
    """Keys from ``given`` (``Satchel(app, keyring=...)``), else ``SATCHEL_KEYS``
    (config, then environment), else a dev key file; anchored at
    ``SATCHEL_ANCHOR_KID`` when set, whichever way the ring came."""
    value = given if given is not None else configured_keys(app)
    anchor = app.config.get("SATCHEL_ANCHOR_KID") or os.environ.get("SATCHEL_ANCHOR_KID") or None
    if isinstance(value, Keyring):
        ring = _anchored(value, anchor)
    elif value:
        try:
            parsed = Keyring.from_string(str(value))
        except ConfigurationError as exc:  # the messages never hold key material
            raise ConfigurationError(f"SATCHEL_KEYS: {exc.message}") from None
        ring = _anchored(parsed, anchor)
    else:
        ring = _dev_keyring(app)
    if len(ring) > 1 and not ring.anchor_pinned:
        log.warning(
            "SATCHEL_KEYS holds %d keys and SATCHEL_ANCHOR_KID is not set: session names "
            "(overflow segments, server-mode sessions, consistency marks, user "
            "binding) are keyed by the last key, now %r, and change whenever the end "
            "of the ring does. Pin the key that anchored until now: for a ring that "
            "had one key, that key (%r if the new one was added at the end, %r if it "
            "was added in front); else the last key of the previous ring "
            "(docs/operations.md, Key rotation, step 2).",
            len(ring),
            ring.anchor.kid,
            ring.kids[0],
            ring.kids[-1],
        )
    return ring


def _anchored(ring: Keyring, anchor: str | None) -> Keyring:
    """``ring`` (a Keyring object) pinned at ``anchor``, the setting: left as it is when
    unset or already pinned there; refused when the object pins another key (two
    sources naming two anchors: neither can be guessed right)."""
    if anchor is None or (ring.anchor_pinned and ring.anchor.kid == anchor):
        return ring
    if ring.anchor_pinned:
        raise ConfigurationError(
            f"SATCHEL_ANCHOR_KID: {anchor!r} differs from the anchor the key ring was "
            f"built with ({ring.anchor.kid!r}); set one of them"
        )
    try:
        return Keyring(ring.keys, anchor_kid=anchor)
    except ConfigurationError as exc:
        raise ConfigurationError(f"SATCHEL_ANCHOR_KID: {exc.message}") from None


def _dev_keyring(app: Flask) -> Keyring:
    """The development key file's ring (``SATCHEL_DEV_KEY_FILE``), or why there is none."""
    dev_file = app.config.get("SATCHEL_DEV_KEY_FILE")
    if dev_file:
        if not isinstance(dev_file, str | os.PathLike):
            raise ConfigurationError(
                f"SATCHEL_DEV_KEY_FILE must be a file path, not {type(dev_file).__name__}"
            )
        try:
            return dev_keyring(Path(dev_file))
        except OSError as exc:  # a directory, a folder it cannot create, no permission
            raise ConfigurationError(
                f"SATCHEL_DEV_KEY_FILE={os.fspath(dev_file)!r} cannot be read or written: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        except (ConfigurationError, UnicodeDecodeError) as exc:
            # Emptied, truncated or overwritten: named, with the way out (the message
            # never holds key material). Not "the key ring is empty" about a ring the
            # user never configured.
            why = exc.message if isinstance(exc, ConfigurationError) else "not UTF-8 text"
            raise ConfigurationError(
                f"SATCHEL_DEV_KEY_FILE={os.fspath(dev_file)!r} does not hold a usable key "
                f"({why}): delete it to make a new development key (tokens sealed with "
                "the old one will not open), or set SATCHEL_KEYS"
            ) from None
    raise ConfigurationError(
        "no Satchel keys: set SATCHEL_KEYS (run `satchel keygen` to make one) "
        "or SATCHEL_DEV_KEY_FILE for local development"
    )


def dev_keyring(path: Path) -> Keyring:
    """A development key kept in ``path`` (created on first use, mode 0600).

    Warns on every start, not only the first: an app restarted or redeployed without
    SATCHEL_KEYS keeps running on this key, and a warning only at the key's creation
    scrolled out of sight long before anyone deployed that way.
    """
    if path.exists():
        ring = Keyring.from_string(path.read_text().strip())
        _warn_dev_key("using the development key in %s (made by an earlier start)", path)
        return ring
    path.parent.mkdir(parents=True, exist_ok=True)
    # A kid of its own: a token sealed with a deleted dev key then reads as
    # token_unknown_key, not as token_bad_signature (which means tampering).
    ring = Keyring([generate_key(f"dev-{secrets.token_hex(3)}")])
    # Written whole to a file of this process's own, then linked into place: link()
    # fails when the file exists, so of several workers starting at once (gunicorn -w
    # 4) exactly one key wins and every worker reads it, never a half-written file.
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(ring.to_string() + "\n")
        os.link(draft, path)
    except FileExistsError:
        ring = Keyring.from_string(path.read_text().strip())  # another worker's key
        _warn_dev_key("using the development key in %s (made by another worker)", path)
        return ring
    finally:
        draft.unlink(missing_ok=True)
    _warn_dev_key("generated a development key in %s", path)
    return ring


def _warn_dev_key(what: str, path: Path) -> None:
    log.warning(
        "SATCHEL_KEYS is not set: " + what + ". Never deploy that way: set SATCHEL_KEYS "
        "(see `satchel keygen`); /readyz says keyring.development is true until then.",
        path,
    )


__all__ = [
    "RESPONSE_HEADERS",
    "SatchelConfig",
    "configured_keys",
    "dev_keyring",
    "keyring_from_config",
    "parse_flag",
]
