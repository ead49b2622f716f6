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

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

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
from .sqlite import SQLiteTier

if TYPE_CHECKING:  # redis is an optional dependency: imported on first use
    from .redis import RedisTier, default_retry


def __getattr__(name: str) -> Any:
    if name in ("RedisTier", "default_retry"):
        from . import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tier_from_url(url: str | None, **options: Any) -> Tier:
    """The tier ``url`` names; ``options`` go to its constructor (``timeouts=``,
    ``retry=``, ``prefix=`` for Redis; ``busy_timeout=``, ``max_bytes=`` for SQLite;
    ``max_bytes=``, ``evict=`` for memory)."""
    if url is None or not url.strip():
        return NoTier()
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster"):
        try:
            from .redis import RedisTier
        except ImportError:
            raise ConfigurationError(
                "a Redis tier needs redis-py: pip install 'satchel[redis]'"
            ) from None
        return RedisTier(url, **options)
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
        for key, values in parse_qs(query).items():
            if key in ("busy_timeout", "max_bytes", "purge_every"):
                options.setdefault(key, (float if key == "busy_timeout" else int)(values[-1]))
        return SQLiteTier(path, **options)
    if scheme == "memory":
        return MemoryTier(**options)
    raise ConfigurationError(
        f"unknown tier URL scheme {scheme!r}: use redis://, rediss://, redis+sentinel://, "
        "redis+cluster://, sqlite:///, memory:// or leave it empty for no tier"
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
    "tier_from_url",
]
