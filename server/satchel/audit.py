"""Structured audit events through :mod:`logging`, as an :class:`~satchel.observe.Observer`.

::

    from satchel.audit import AuditObserver, configure_json_logging

    configure_json_logging()                 # "satchel" logger -> JSON lines on stderr
    satchel = Satchel(app, observer=AuditObserver())

Each event becomes one record on the ``satchel.audit`` logger whose message is the
event name and whose ``extra`` is ``{"satchel_event": name, "satchel": {fields}}``;
:class:`JsonLinesFormatter` writes it as one JSON object per line::

    {"ts":"2024-05-01T12:00:00.123Z","level":"INFO","logger":"satchel.audit",
     "event":"issued","session":"3f9c2a7d01b4e6c8","seq":4,"bytes":1211,"turns":6}

Secrets never reach the log: only the fields in :data:`ALLOWED_FIELDS` are kept, and
only as numbers, booleans or short strings; anything else (a token, a server-mode
carrier or Flask-session reference: any string that starts like one of
:data:`TOKEN_PREFIXES`, a key, message text, a raw session id, bytes, nested data) is
dropped before the record is made, and dropped again by the formatter for records that
did not come through here.
``session`` is the short keyed session tag (16 hex characters), never the session id.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from .envelope import KNOWN_PREFIXES
from .observe import Observer

AUDIT_LOGGER = "satchel.audit"

#: Fields an audit record may carry. Everything else is dropped.
ALLOWED_FIELDS = frozenset(
    {
        "session",  # the short keyed session tag, never the session id
        "seq",
        "kid",  # key ids are public: they travel in every token header
        "mode",
        "reason",
        "policy",
        "turns",
        "bytes",
        "count",
        "deleted",
        "from_version",
        "to_version",
        "tier",
        "state",
        "op",
        "error",  # an error code, not a message
        "from_cache",
        "consistency",
        "seconds",
        "detail",
        "recovered",  # a stale refusal handed the newest token back
        "suppressed",  # like records left out since the last one (THROTTLED_EVENTS)
    }
)

#: Events logged at WARNING even when the observer's level is lower.
#: Events for metrics only: the audit log has their substance already (a degraded
#: response's reasons are each a ``degraded`` event).
METRIC_ONLY_EVENTS = frozenset({"degraded_response"})
WARNING_EVENTS = frozenset(
    {
        "data_loss",
        "fork_detected",
        "stale_refused",
        "breaker_opened",
        "seal_failed",
        "mark_lost",
        "erase_failed",
    }
)
#: Degraded paths, logged at WARNING at least but at most one record per reason (and
#: detail: the cause underneath) every ``throttle`` seconds, carrying ``suppressed``:
#: how many like it were left out. While a tier is down every request degrades; one
#: line each would bury the rest of the log, and none at the usual WARNING level hid a
#: lost conversation or a corrupt segment. The metrics count every one either way.
#: ``session_refused``: a flask.session copy the tier lost (or a forged reference): a
#: user logged out by the tier, once per lost session (its cookie is then deleted).
THROTTLED_EVENTS = frozenset({"degraded", "unavailable", "session_refused"})
#: ``refused`` reasons that are degraded paths, not bad input: the stored conversation
#: is gone (evicted, expired, the store restarted) and it starts over; a token's
#: migration failed (a migration missing or raising in this deployment: every session
#: of that version is refused, or reset under ``SATCHEL_ON_BAD_TOKEN = "fresh"``).
THROTTLED_REFUSALS = frozenset({"session_not_found", "token_migration_failed"})

MAX_STRING = 160
_MAX_THROTTLED_KEYS = 256
_SESSION_TAG_RE = re.compile(r"^[0-9a-f]{8,24}$")
#: How every credential Satchel issues starts: a token (``s1.``), a server-mode carrier
#: (``sv1.<id>.<sig>``, the bearer credential of server and memory mode) and a Flask
#: session's reference to its stored value (``so1.``). A string starting so is dropped.
#: Spelled here, not imported from server_mode and flask_ext: observers sit below the
#: request path's modules (a test checks these stay the constants those modules use).
TOKEN_PREFIXES = (*KNOWN_PREFIXES, "sv1.", "so1.")


def _safe_value(name: str, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` may be logged as field ``name``, and the value to log."""
    if value is None or isinstance(value, bool | int | float):
        return name != "session", value
    if not isinstance(value, str):
        return False, None  # bytes, lists, dicts, objects: never
    if name == "session":
        # the short keyed tag only; a raw session id (32 hex) or anything else is dropped
        return bool(_SESSION_TAG_RE.fullmatch(value)), value
    if len(value) > MAX_STRING or value.lstrip().startswith(TOKEN_PREFIXES):
        return False, None
    return True, value


def safe_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The loggable subset of ``fields``: allow-listed names with plain, short values."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in ALLOWED_FIELDS:
            continue
        ok, clean = _safe_value(name, value)
        if ok:
            out[name] = clean
    return out


class AuditObserver(Observer):
    """Logs every Satchel event as a structured record on ``satchel.audit``.

    ``logger``: where to log (default ``logging.getLogger("satchel.audit")``);
    ``level``: the level of routine events (``data_loss``, ``fork_detected``,
    ``stale_refused``, ``breaker_opened``, ``seal_failed`` and ``mark_lost`` are
    logged at WARNING at least: :data:`WARNING_EVENTS`);
    ``events``: only log these event names (default: all); ``throttle``: seconds
    between two records of one degraded reason (:data:`THROTTLED_EVENTS`, logged at
    WARNING at least; 0 logs every one). Timings and token sizes are metrics, not
    audit events, and are not logged. Never raises.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        events: Iterable[str] | None = None,
        throttle: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not throttle >= 0:
            raise ValueError("throttle must be 0 or more seconds")
        self.logger = logger if logger is not None else logging.getLogger(AUDIT_LOGGER)
        self.level = level
        self.events = frozenset(events) if events is not None else None
        self.throttle = throttle
        self._clock = clock
        self._lock = threading.Lock()
        #: (event, reason, detail) -> [when last logged, records left out since]
        self._throttled: dict[tuple[str, str, str], list[float]] = {}

    def __repr__(self) -> str:
        return (
            f"AuditObserver(logger={self.logger.name!r}, level={logging.getLevelName(self.level)})"
        )

    def event(self, name: str, /, **fields: Any) -> None:
        try:
            if self.events is not None and name not in self.events:
                return
            if name in METRIC_ONLY_EVENTS:
                return
            throttled = name in THROTTLED_EVENTS or (
                name == "refused" and fields.get("reason") in THROTTLED_REFUSALS
            )
            warn = throttled or name in WARNING_EVENTS
            level = max(self.level, logging.WARNING) if warn else self.level
            if not self.logger.isEnabledFor(level):
                return
            record = safe_fields(fields)
            if throttled and self.throttle:
                # By cause too: the breaker opening under an outage is news.
                cause = (name, str(fields.get("reason")), str(fields.get("detail")))
                suppressed = self._suppressed_before(cause)
                if suppressed is None:
                    return
                if suppressed:
                    record["suppressed"] = suppressed
            self.logger.log(level, "%s", name, extra={"satchel_event": name, "satchel": record})
        except Exception:  # noqa: S110 - an audit hook must never break a request
            pass

    def _suppressed_before(self, cause: tuple[str, str, str]) -> int | None:
        """None to leave this record out; else how many like it were left out since
        the last one logged (which this one then reports)."""
        now = self._clock()
        with self._lock:
            seen = self._throttled.get(cause)
            if seen is not None and now - seen[0] < self.throttle:
                seen[1] += 1
                return None
            if len(self._throttled) >= _MAX_THROTTLED_KEYS:
                self._throttled.clear()  # reasons are codes: a handful, unless misused
            self._throttled[cause] = [now, 0]
            return int(seen[1]) if seen is not None else 0


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts", "level", "logger", "event", ...fields}``.

    ``event`` is the audit event name, or the message for ordinary records; fields
    come from the record's ``satchel`` extra (allow-listed again here). ``ts`` is UTC,
    ISO 8601 with milliseconds. Exceptions go in ``exc`` (one string, escaped).
    """

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "satchel_event", None)
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": event if isinstance(event, str) else record.getMessage(),
        }
        fields = getattr(record, "satchel", None)
        if isinstance(fields, Mapping):
            for key, value in safe_fields(fields).items():
                data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)


def configure_json_logging(
    logger_name: str = "satchel",
    stream: TextIO | None = None,
    *,
    level: int = logging.INFO,
    propagate: bool = False,
) -> logging.Handler:
    """Send ``logger_name`` (and its children, ``satchel.audit`` included) to ``stream``
    (default: stderr) as JSON lines. Idempotent: a handler installed by an earlier call
    is replaced. ``propagate=False`` keeps the records out of the root logger's
    (text) handlers. Returns the handler."""
    logger = logging.getLogger(logger_name)
    for old in list(logger.handlers):
        if getattr(old, "_satchel_json", False):
            logger.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLinesFormatter())
    handler._satchel_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    return handler


__all__ = [
    "ALLOWED_FIELDS",
    "AUDIT_LOGGER",
    "AuditObserver",
    "JsonLinesFormatter",
    "configure_json_logging",
    "safe_fields",
]
