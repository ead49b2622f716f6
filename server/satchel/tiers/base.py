"""The overflow tier interface.

A tier stores opaque, immutable byte strings under keys that Satchel derives, with a
TTL. It is also where the small per-session records of the stricter consistency
levels live (the high-water mark of ``monotonic``, erasure tombstones) and, in
``server`` mode, the whole context.

Every method may raise :class:`~satchel.errors.TierError` (or a subclass); nothing
else may escape. Callers never talk to a tier directly: they go through
:class:`~satchel.tiers.guard.GuardedTier`, which adds the circuit breaker and the
segment cache and turns every failure into a degraded result.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a tier may take, in seconds, passed in like redis-py's socket options.

    ``read`` bounds each reply (``socket_timeout``), ``connect`` each new connection
    (``socket_connect_timeout``). The defaults suit a same-datacenter Redis: a request
    never waits more than a few tens of milliseconds for context it can live without.
    """

    read: float = 0.05
    connect: float = 0.1

    def __post_init__(self) -> None:
        # Written so that NaN fails too (every comparison with it is false).
        if not (0 < self.read < math.inf and 0 < self.connect < math.inf):
            raise ValueError("tier timeouts must be positive, finite numbers of seconds")


def hash_tag(key: str) -> str | None:
    """The Redis Cluster hash tag of ``key`` (the text between the first ``{`` and the
    next ``}``), or None when it has none. Every key of one session carries the session
    tag, so all of them live in one cluster slot and can be read with one MGET."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


#: a key written with a mark, in the same atomic step: ``(key, value, ttl)``
#: (:meth:`Tier.compare_and_set_mark_with`)
Companion: TypeAlias = tuple[str, bytes, float]


class ClaimHeld:
    """What :meth:`Tier.compare_and_set_unclaimed` returns when another holder's claim
    stopped the write (the one instance is :data:`CLAIM_HELD`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLAIM_HELD"


#: :meth:`Tier.compare_and_set_unclaimed`: a claim held by another stopped the write
CLAIM_HELD: Final = ClaimHeld()


class Tier(ABC):
    """Key-value storage for segments and per-session records."""

    #: short name for metrics and logs: "redis", "sqlite", "memory", "none"
    name: str = "tier"

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys`` in order (None where missing), in one round trip."""

    @abstractmethod
    def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (overwrites)."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; returns how many existed."""

    @abstractmethod
    def delete_session(self, session_tag: str) -> int:
        """Delete everything stored for one session (keys containing ``{session_tag}``)."""

    def shard_of(self, key: str) -> str:
        """The independent failure domain that holds ``key`` (``""``: the one there is).

        :class:`~satchel.tiers.guard.GuardedTier` keeps one circuit breaker per shard,
        so a tier made of several servers that fail on their own (Redis Cluster: one per
        master) names the server here, and one dead server opens the breaker for its
        own keys only. Called before every guarded call: it must be cheap and must not
        do I/O. The default is one shard.
        """
        return ""

    def expire_soon(self, keys: Sequence[str], ttl: float) -> None:  # noqa: B027 - optional
        """Let ``keys`` live at most ``ttl`` more seconds (keys due sooner keep their TTL).

        Used for segments a merge replaced: a retried request or a second tab may still
        hold a token that names them, so they are retired with a grace period instead
        of deleted. The default does nothing (they live out their own TTL), so a custom
        tier without it only keeps them longer.
        """

    @abstractmethod
    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        """Atomically set ``key`` to ``new`` if its value is ``expected`` (None: absent).

        Returns None on success, else the current value (the caller lost the race);
        when ``expected`` was a value but the key is absent (expired or deleted) the
        current value is returned as ``b""``, so None always means success. Used for
        the ``monotonic`` high-water mark and, in server and memory modes, for saving
        the stored context (named for its first use). Keys that carry a session tag are
        removed by :meth:`delete_session` like every other key of the session.

        Redis keeps the id of the last write next to the value, in ``<key>:w`` (so a
        retried call knows its own write): names ending in ``:w`` are the tier's, and a
        key should carry a non-empty ``{tag}`` or no braces at all (on Cluster the id
        must share the key's slot; every key Satchel writes carries its session tag).
        """

    def compare_and_set_mark_with(
        self, key: str, expected: bytes | None, new: bytes, ttl: float, companion: Companion | None
    ) -> bytes | None:
        """:meth:`compare_and_set_mark`, and when it succeeds, also store ``companion``
        (key, value, TTL; a key of the same session tag; None: nothing more).

        The ``monotonic`` guard keeps the newest token next to the mark this way, so an
        erasure cannot fall between the two writes (and leave the token behind it). The
        tiers Satchel ships do both in one atomic step, and their
        :meth:`compare_and_set_mark` is this with no companion (a subclass of one that
        changes how it compares and sets overrides this method); this default, for a
        custom tier, writes the companion after the mark and is not atomic.
        """
        current = self.compare_and_set_mark(key, expected, new, ttl)
        if current is None and companion is not None:
            self.put(*companion)
        return current

    def compare_and_set_unclaimed(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        ttl: float,
        claim: str,
        holder: bytes | None,
        companion: Companion | None = None,
    ) -> bytes | ClaimHeld | None:
        """:meth:`compare_and_set_mark_with`, unless ``claim`` holds a non-empty value
        other than ``holder`` (None: any claim stops it): then write nothing and return
        :data:`CLAIM_HELD`.

        Saves of the stored context (server and memory modes) and moves of a
        ``monotonic`` mark go this way against a streamed reply's claim, so a request
        that checked the state before the stream claimed it cannot save over it while
        the reply streams. ``claim`` carries ``key``'s session tag (one slot on
        Cluster). The tiers Satchel ships check and write in one atomic step; this
        default, for a custom tier, reads the claim and then writes, and is not atomic.
        """
        current_claim = self.get_many([claim])[0]
        if current_claim and current_claim != holder:
            return CLAIM_HELD
        return self.compare_and_set_mark_with(key, expected, new, ttl, companion)

    def put_unless_marked(
        self, key: str, value: bytes, ttl: float, mark: str, refused: bytes
    ) -> bool:
        """:meth:`put`, unless ``mark`` holds ``refused``: then write nothing and
        return False (True when written).

        Segments are written this way against the session's erasure tombstone, so an
        erasure cannot fall between a request's check and its write (and leave a
        segment behind it). ``mark`` carries ``key``'s session tag (one slot on
        Cluster). The tiers Satchel ships check and write in one atomic step; this
        default, for a custom tier, reads the mark and then writes, and is not atomic.
        """
        if self.get_many([mark])[0] == refused:
            return False
        self.put(key, value, ttl)
        return True

    def erase_session(self, session_tag: str, mark: str, tombstone: bytes, ttl: float) -> int:
        """Delete every key of the session but ``mark``, and set ``mark`` to
        ``tombstone`` for ``ttl`` seconds: one step in the tiers Satchel ships, so no
        write of the session (:meth:`put_unless_marked`) lands after the delete and
        before the tombstone.

        Returns how many keys of the session's data were deleted; ``mark`` counts when
        it held anything but ``tombstone`` (erasing twice deletes nothing the second
        time). This default, for a custom tier, is :meth:`delete_session` and then
        :meth:`put`, not atomic.
        """
        previous = self.get_many([mark])[0]
        deleted = self.delete_session(session_tag)
        self.put(mark, tombstone, ttl)
        return max(0, deleted - 1) if previous == tombstone else deleted

    @abstractmethod
    def ping(self) -> None:
        """Raise TierError unless the tier answers."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class NoTier(Tier):
    """No overflow tier: sessions over budget are trimmed and summarized only."""

    name = "none"

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    def put(self, key: str, value: bytes, ttl: float) -> None:
        from ..errors import TierUnavailable

        raise TierUnavailable("no overflow tier is configured")

    def delete(self, keys: Sequence[str]) -> int:
        return 0

    def delete_session(self, session_tag: str) -> int:
        return 0

    def expire_soon(self, keys: Sequence[str], ttl: float) -> None:
        return None

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        from ..errors import TierUnavailable

        raise TierUnavailable("no tier is configured to hold consistency marks")

    def ping(self) -> None:
        return None


__all__ = ["CLAIM_HELD", "ClaimHeld", "Companion", "NoTier", "Tier", "Timeouts", "hash_tag"]
