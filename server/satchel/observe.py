"""Observation hooks: metrics and audit events, called from the steps, never the reverse.

The pipeline and the Flask extension report through an :class:`Observer`. The
default does nothing; :mod:`satchel.metrics` provides one backed by prometheus_client
and :mod:`satchel.audit` one that writes structured audit events through logging.
Observers must never raise into the request path and must never receive key material
or message content: events carry a short keyed session tag, counts, sizes and codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Observer:
    """Receives events and step timings. Subclass and override what you need."""

    def event(self, name: str, /, **fields: Any) -> None:
        """An audit-worthy event: issued, opened, migrated, metadata_migrated, trimmed,
        summarized, overflowed, rehydrated, segments_restored, expired, refused,
        seal_failed, degraded, data_loss, fork_detected, stale_refused, busy_refused,
        mark_lost, resealed, session_started, session_refused, breaker_opened,
        breaker_closed,
        breaker_half_open, erased, erase_failed; and, for metrics only,
        degraded_response (once per response that carries ``Satchel-Degraded``)."""

    def timing(self, step: str, seconds: float) -> None:
        """Time spent in one step: open, verify, decompress, unpack, migrate,
        rehydrate, trim, summarize, overflow, seal."""

    def token(self, *, size: int, raw_size: int, turns: int) -> None:
        """Facts about a token just issued: its length, payload length, turns held."""


class MultiObserver(Observer):
    """Fans out to several observers; one failing never stops the others or the request.

    Timings and token facts arrive several times per request; they go only to the
    observers that override :meth:`Observer.timing` / :meth:`Observer.token`, so an
    audit log (which ignores them) costs nothing there.
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: list[Observer] = []
        self._timers: list[Observer] = []
        self._token_watchers: list[Observer] = []
        for observer in observers:
            self.add(observer)

    def add(self, observer: Observer) -> None:
        """Send events to ``observer`` from now on; timings and token facts too if it
        overrides :meth:`Observer.timing` / :meth:`Observer.token` (decided here, once)."""
        self.observers.append(observer)
        if _overrides(observer, "timing"):
            self._timers.append(observer)
        if _overrides(observer, "token"):
            self._token_watchers.append(observer)

    def event(self, name: str, /, **fields: Any) -> None:
        for obs in self.observers:
            try:
                obs.event(name, **fields)
            except Exception:  # noqa: S112 - observation must never break a request
                continue

    def timing(self, step: str, seconds: float) -> None:
        for obs in self._timers:
            try:
                obs.timing(step, seconds)
            except Exception:  # noqa: S112
                continue

    def token(self, *, size: int, raw_size: int, turns: int) -> None:
        for obs in self._token_watchers:
            try:
                obs.token(size=size, raw_size=raw_size, turns=turns)
            except Exception:  # noqa: S112
                continue


def tier_cause(exc: Exception | None) -> str | None:
    """An event's ``detail`` for a tier failure: ``breaker_open`` when a breaker
    refused the call without touching the tier, else the error underneath (its type,
    as the tier names it: ``ConnectionError``, ``TimeoutError``), else the code. The
    audit throttles degraded records per reason and cause, so the breaker opening in
    an outage is logged, not folded into the failures before it."""
    if exc is None:
        return None
    facts = getattr(exc, "facts", None) or {}
    if facts.get("unsent"):
        return "writes_open" if facts.get("breaker") == "writes_open" else "breaker_open"
    error = facts.get("error")
    return error if isinstance(error, str) else getattr(exc, "code", type(exc).__name__)


def flag_degraded(observer: Observer, degraded: list[str], reason: str, /, **fields: Any) -> None:
    """Add ``reason`` to a response's ``degraded`` list and report it, once per response.

    ``satchel_degraded_total{reason}`` counts responses served degraded for a reason,
    and one save can meet the same reason twice (turns dropped to the hard cap, then
    more by the ceiling; a stream's claim, then its mark): only the first is reported.
    What each occurrence cost is in its own event (``data_loss`` carries the turns).
    """
    if reason in degraded:
        return
    degraded.append(reason)
    observer.event("degraded", reason=reason, **fields)


def _overrides(observer: Observer, method: str) -> bool:
    """True unless ``observer``'s ``method`` is :class:`Observer`'s no-op."""
    bound = getattr(observer, method, None)
    return getattr(bound, "__func__", bound) is not getattr(Observer, method)


NULL_OBSERVER = Observer()

__all__ = ["NULL_OBSERVER", "MultiObserver", "Observer", "flag_degraded"]
