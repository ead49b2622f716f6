"""The overflow tier: where oversized sessions spill their oldest turns.

``tier_from_url`` builds one from configuration:

=====================================================  =================================
``redis://host:6379/0``, ``rediss://...``               :class:`RedisTier`, one server
``redis+sentinel://h1:26379,h2:26379/mymaster?db=0``    :class:`RedisTier` via Sentinel
``redis+cluster://h1:7000,h2:7001``                     :class:`RedisTier` on Redis Cluster
``sqlite:///relative/path.db``, ``sqlite:////abs.db``   :class:`SQLiteTier`
``memory://``                                           :class:`MemoryTier` (one process)
``""`` or ``None``                                      :class:`NoTier` (trim only)
=====================================================  =================================

Wrap the tier in :class:`GuardedTier` (breaker + cache) before use; see
docs/overflow.md.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..errors import ConfigurationError
from .base import NoTier, Tier, Timeouts, hash_tag
from .guard import (
    MISSING,
    TIER_UNAVAILABLE,
    BreakerPolicy,
    Fetched,
    GuardedTier,
    SegmentCache,
)
from .memory import MemoryTier
from .sqlite import OPTION_RULES, SQLiteTier, option_problem

if TYPE_CHECKING:  # redis is an optional dependency: imported on first use
    from .redis import RedisTier, default_retry


if not TYPE_CHECKING:  # a module __getattr__ would type every misspelt name as Any

    def __getattr__(name: str) -> Any:
        if name in ("RedisTier", "default_retry"):
            try:
                from . import redis as _redis
            except ModuleNotFoundError as exc:
                if exc.name != "redis":
                    raise
                # The hint tier_from_url gives, not a bare "No module named 'redis'".
                raise ModuleNotFoundError(
                    f"satchel.tiers.{name} needs redis-py: pip install 'satchel[redis]'",
                    name="redis",
                ) from None
            return getattr(_redis, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")
SCHEMES_HELP = (
    "redis://, rediss://, redis+sentinel://, redis+cluster://, sqlite:///, memory:// "
    "or leave it empty for no tier"
)
# Query parameters whose value is a secret, whatever the backend calls them
# (password, sentinel_password, auth_token, ssl_keyfile_password...).
_SECRET_PARAM = re.compile(
    r"([?&;][^=&#;]*(?:pass|pwd|secret|token|auth|credential)[^=&#;]*=)[^&#;]*", re.IGNORECASE
)
_SQLITE_PARAMS: dict[str, type] = {"busy_timeout": float, "max_bytes": int, "purge_every": int}


def redact_url(url: str) -> str:
    """``url`` with its password and every password-like query parameter as ``***``.

    Text-based rather than :func:`urllib.parse.urlsplit`-based: it must also work on
    the URLs that do not parse (an unclosed ``[``), which are the ones errors print.
    The userinfo ends at the last ``@``: a password with an unencoded ``@`` or ``/``
    is hidden whole, at the price of hiding a little more of an odd URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    return scheme + sep + _SECRET_PARAM.sub(r"\1***", rest)


def _sqlite_option(url: str, key: str, text: str) -> float | int:
    """A query parameter of a SQLite tier URL, converted and checked."""
    try:
        value: float | int = _SQLITE_PARAMS[key](text)
    except ValueError:
        problem: str | None = OPTION_RULES[key]
    else:
        problem = option_problem(key, value)
    if problem is not None:
        raise ConfigurationError(f"tier URL {redact_url(url)!r}: {key} {problem}, not {text!r}")
    return value


def _memory_option(url: str, key: str, text: str) -> int | bool:
    """A query parameter of a memory tier URL (``max_bytes=``, ``evict=``), checked."""
    if key == "max_bytes":
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise ConfigurationError(
                f"tier URL {redact_url(url)!r}: max_bytes is a positive integer, not {text!r}"
            )
        return value
    if key == "evict":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigurationError(
                f"tier URL {redact_url(url)!r}: evict is true or false, not {text!r}"
            )
        return text.lower() in ("1", "true", "yes", "on")
    raise ConfigurationError(
        f"tier URL {redact_url(url)!r}: unknown parameter {key!r}; a memory tier URL "
        "takes max_bytes, evict"
    )


def tier_from_url(
    url: str | None, *, setting: str | None = None, create: bool = True, **options: Any
) -> Tier:
    """The tier ``url`` names; ``options`` go to its constructor (``timeouts=``,
    ``retry=``, ``prefix=`` for Redis; ``busy_timeout=``, ``max_bytes=``,
    ``purge_every=`` for SQLite; ``max_bytes=``, ``evict=`` for memory); an option the
    URL's tier does not take is a ConfigurationError that names those it does.

    Every problem the URL certainly has (a bad number, an unknown parameter, a SQLite
    file that is not a database) raises :class:`~satchel.errors.ConfigurationError`
    here, at start-up, with the URL's secrets redacted; ``setting`` (for example
    ``"SATCHEL_OVERFLOW_URL"``) prefixes the message to say where the URL came from.

    ``create=False``: a SQLite file must already exist. Tools that work on an app's
    tier (``satchel erase``) pass it, so that a relative path resolved from another
    directory is an error instead of a new, empty tier.
    """
    if url is None or not url.strip():
        return NoTier()
    url = url.strip()
    try:
        return _tier_from_url(url, create=create, options=options)
    except ConfigurationError as exc:
        message = scrub_url_secrets(url, exc.message)
        if setting is None and message == exc.message:
            raise
        where = f"{setting}: " if setting else ""
        raise ConfigurationError(f"{where}{message}", **exc.facts) from None


# Where a parser cuts a URL it cannot read as intended: the pieces it quotes start
# and end at these characters (or at the message's quotes, or its ends).
_URL_CUTS = ":/?#[]@,;&="
_EDGES = frozenset(_URL_CUTS + "'\"`")
# Shorter pieces are not masked on their own: "1" or "db" would mask a port or a word,
# and saying which would tell their owner's password apart.
_MIN_PIECE = 3


def _pieces(form: str) -> set[str]:
    """``form`` and every run of it between two of its URL delimiters (or its ends)
    that a parser may quote, without the delimiters at its ends, 3+ characters."""
    cuts = sorted(
        {0, len(form)} | {i + d for i, c in enumerate(form) if c in _URL_CUTS for d in (0, 1)}
    )
    return {
        piece
        for k, a in enumerate(cuts)
        for b in cuts[k + 1 :]
        if len(piece := form[a:b]) >= _MIN_PIECE
        and piece[0] not in _URL_CUTS
        and piece[-1] not in _URL_CUTS
    }


def scrub_url_secrets(url: str, message: str) -> str:
    """``message`` with ``url``'s userinfo (what comes before its last ``@``), and every
    piece of it, replaced by ``***`` where the message quotes them.

    A URL that does not parse as intended (a password with an unencoded ``/``, ``?`` or
    ``#``, a scheme typo) makes parsers report pieces of it: "not 'retPw9@h:1/0'",
    "port 'Sec'". :func:`redact_url` hides the password in the URL an error shows; this
    hides what the error says about it. A URL without userinfo is left as it is; a
    value with neither a scheme nor an ``@`` is hidden like a userinfo (a secret pasted
    into the wrong setting).

    What is masked is the secret itself, whole, percent-decoded or -encoded, escaped as
    ``repr`` quotes it, and the pieces (3 characters or more) a parser cuts it into at
    URL delimiters; each only where it stands alone: from a delimiter, a quote or the
    message's start to one of those or its end, as a parser quotes it. Never part of a
    word of the message's own text: masking that would tell which words share
    characters with the password. The URL as :func:`redact_url` shows it (password
    already hidden) is left as it is.
    """
    _scheme, sep, rest = url.partition("://")
    if not sep:
        rest = url  # a scheme typo (redis:/...), or a secret pasted in the wrong place
    at = rest.rfind("@")
    secret = rest[:at] if at >= 0 else ("" if sep else url)
    if not secret:
        return message
    user, _, password = secret.partition(":")
    forms = {secret, user, password}
    forms |= {unquote(form) for form in tuple(forms)}
    forms |= {quote(form, safe="") for form in tuple(forms)}
    forms |= {repr(form)[1:-1] for form in tuple(forms)}
    candidates = {piece for form in forms for piece in _pieces(form)}
    shown = redact_url(url)
    kept = (
        [(m.start(), m.end()) for m in re.finditer(re.escape(shown), message)]
        if shown != url
        else []  # nothing was hidden in it: a pasted secret, not a URL
    )
    n = len(message)
    masked = [False] * n
    for candidate in candidates:
        for m in re.finditer(f"(?={re.escape(candidate)})", message):
            i, j = m.start(), m.start() + len(candidate)
            if (i > 0 and message[i - 1] not in _EDGES) or (j < n and message[j] not in _EDGES):
                continue
            if any(a <= i and j <= b for a, b in kept):
                continue
            masked[i:j] = [True] * (j - i)
    out: list[str] = []
    i = 0
    while i < n:
        if masked[i]:
            while i < n and masked[i]:
                i += 1
            out.append("***")
        else:
            out.append(message[i])
            i += 1
    return "".join(out)


def tier_scheme(url: str, *, setting: str | None = None) -> str:
    """The scheme of tier ``url``, lower case (RFC 3986: schemes are case-insensitive).

    ConfigurationError (prefixed with ``setting``, passwords redacted) when the URL
    does not parse.
    """
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        where = f"{setting}: " if setting else ""
        raise ConfigurationError(f"{where}bad tier URL {redact_url(url)!r}: {exc}") from None


def is_in_process_url(url: str) -> bool:
    """``memory://`` (any case, as tier_from_url reads it): a tier inside one process,
    which no other process (``satchel erase``, ``satchel inspect``) can see. False for
    a malformed URL: tier_from_url names its problem."""
    try:
        return tier_scheme(url) == "memory"
    except ConfigurationError:
        return False


T = TypeVar("T")


def _named_options(cls: type) -> list[str]:
    """The options ``cls`` names in its signature (the URL or path it is given apart)."""
    return [
        name
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and name not in ("url", "path")
    ]


def _construct(cls: type[T], scheme: str, options: dict[str, Any], *args: Any, **fixed: Any) -> T:
    """``cls(*args, **fixed, **options)``, with an option its scheme does not take a
    ConfigurationError that says which it does: ``timeouts=`` (Redis's) given with a
    sqlite:// URL was a bare TypeError from the constructor. A tier that passes the
    options it does not name on (Redis: to redis-py) still refuses the other tiers' own
    (``busy_timeout=`` with a redis:// URL), which its client would call a URL
    parameter, or (Sentinel) fail every call with."""
    taken = [name for name in _named_options(cls) if name not in fixed]
    passes_rest_on = any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()
    )
    unknown = set(options) - set(taken)
    if passes_rest_on:
        unknown &= {
            name
            for tier in (SQLiteTier, MemoryTier)
            if tier is not cls
            for name in _named_options(tier)
        }
    if unknown:
        rest = " and its client's own connection options" if passes_rest_on else ""
        raise ConfigurationError(
            f"a {scheme}:// tier takes no {', '.join(f'{n}=' for n in sorted(unknown))}; "
            f"its options are {', '.join(f'{n}=' for n in taken)}{rest}"
        )
    return cls(*args, **fixed, **options)


def _tier_from_url(url: str, *, create: bool, options: dict[str, Any]) -> Tier:
    scheme = tier_scheme(url)
    if scheme in REDIS_SCHEMES:
        try:
            from .redis import RedisTier
        except ImportError:
            raise ConfigurationError(
                "a Redis tier needs redis-py: pip install 'satchel[redis]'"
            ) from None
        return _construct(RedisTier, scheme, options, url)
    if scheme == "sqlite":
        if not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(
                "a SQLite tier URL is sqlite:///relative/path or sqlite:////absolute/path"
            )
        path, _, query = url[len("sqlite:///") :].partition("?")
        if not path or path == ":memory:":
            raise ConfigurationError(
                "the SQLite tier needs a file shared by the worker processes; "
                "use memory:// for an in-process tier"
            )
        for key, text in parse_qsl(query, keep_blank_values=True):
            if key not in _SQLITE_PARAMS:
                raise ConfigurationError(
                    f"tier URL {redact_url(url)!r}: unknown parameter {key!r}; a SQLite "
                    f"tier URL takes {', '.join(_SQLITE_PARAMS)}"
                )
            value = _sqlite_option(url, key, text)
            options.setdefault(key, value)  # an explicit option wins over the URL
        return _construct(SQLiteTier, scheme, options, path, create=create)
    if scheme == "memory":
        for key, text in parse_qsl(urlsplit(url).query, keep_blank_values=True):
            options.setdefault(key, _memory_option(url, key, text))  # explicit options win
        return _construct(MemoryTier, scheme, options)
    raise ConfigurationError(
        f"unknown tier URL scheme {scheme!r} in {redact_url(url)!r}: use {SCHEMES_HELP}"
    )


__all__ = [
    "MISSING",
    "TIER_UNAVAILABLE",
    "BreakerPolicy",
    "Fetched",
    "GuardedTier",
    "MemoryTier",
    "NoTier",
    "RedisTier",
    "SQLiteTier",
    "SegmentCache",
    "Tier",
    "Timeouts",
    "default_retry",
    "hash_tag",
    "is_in_process_url",
    "redact_url",
    "tier_from_url",
    "tier_scheme",
]
