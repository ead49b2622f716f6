"""The segment store: turns moved out of an oversized token into the overflow tier.

A segment is a list of turns, packed like the token's turns, compressed and
MAC'd or sealed with the same :class:`~satchel.codec.Codec` (so it is as private and
tamper-proof as the token), and stored under a key the server derives::

    <prefix>:{<tag>}:seg:<mac>

* ``tag`` = first 16 hex chars of HMAC-SHA256(derive(anchor, purpose, "session-tag"),
  session_id), ``anchor`` being the key ring's anchor key (``Keyring.anchor``).
  A Redis Cluster hash tag: every key of a session is in one slot, so all
  of a context's segments are read with one MGET. Also the session's name in logs.
* ``mac`` = base64url of the first 16 bytes of HMAC-SHA256(derive(anchor, purpose,
  "segment-key"), session_id || digest), where ``digest`` is the BLAKE2b-128 of the
  stored bytes (kept in the token's :class:`~satchel.context.SegmentRef`).

The token holds only the digest; the key is recomputed from the session id inside the
(authenticated) token, so a client cannot name another session's segment, and a
changed digest names a key that does not exist. On read, each value is checked against
its digest, opened by the codec, and its embedded session id compared with the
context's, so a foreign or damaged value is reported, never used.

Names are keyed with the ring's anchor key, not the current one, so promoting a new
key changes no name: segments survive rotation, every key of a session stays in one
Redis Cluster slot, and reads are one MGET. Only retiring the anchor re-anchors names
(its segments then read as missing, covered by the summary; docs/operations.md).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import sys
from dataclasses import dataclass, field
from typing import Any, Final

from . import envelope, serialize
from .codec import Codec
from .consistency import ERASED, mark_key
from .context import Context, SegmentRef, Turn
from .errors import (
    BadToken,
    BudgetExceeded,
    ContextErased,
    SatchelError,
    TierError,
    TokenExpired,
)
from .keys import b64url_encode
from .schema import CURRENT_VERSION, turn_to_wire, turns_from_wire
from .tiers.base import Tier
from .tiers.guard import GuardedTier

SEGMENT_DIGEST_SIZE: Final = 16

#: seconds a segment replaced by a merge stays readable: a retry or a second tab that
#: still holds the token from before the merge must find its turns.
DEFAULT_GRACE: Final = 600.0

#: why a referenced segment could not be used
TIER_UNAVAILABLE: Final = "tier_unavailable"  # the tier failed or its breaker is open
SEGMENT_MISSING: Final = "segment_missing"  # expired, evicted, erased, or never existed
SEGMENT_CORRUPT: Final = "segment_corrupt"  # bytes do not match the digest or do not open
SEGMENT_FOREIGN: Final = "segment_foreign"  # opened fine but belongs to another session
REASONS: Final = (TIER_UNAVAILABLE, SEGMENT_MISSING, SEGMENT_CORRUPT, SEGMENT_FOREIGN)


def _unpacked_weight(payload_size: int, turn_wires: list[Any]) -> int:
    """What a segment's unpacked turns take in memory, over- rather than under-counted.

    A plain turn is a list, a str and a float: about 160 bytes besides its text. A str
    is stored at the width of its widest character, not in UTF-8: one emoji makes every
    character of the text 4 bytes (a review measured a cache holding 3.3 times its
    bound when its text was weighed by the payload), so plain text is weighed by
    ``sys.getsizeof`` (exact, and O(1)). Maps (tool-call arguments, extras) take many
    times their packed size in dicts and small objects: a segment holding any is
    weighed at 24 times its payload (20 times was measured for one of tool-call turns
    with map arguments).
    """
    if not all(len(w) == 3 for w in turn_wires):
        return 24 * payload_size + 200 * len(turn_wires)
    return sum(sys.getsizeof(w[1]) for w in turn_wires) + 200 * len(turn_wires)


def _unshare(turns: list[Turn]) -> None:
    """Give each turn its own copy of the containers it shares with the cached wire
    (tool-call arguments given as a map): an app that changes one must not change the
    cached segment, and with it every later request's turns."""
    for turn in turns:
        for call in turn.tool_calls:
            if type(call.arguments) is dict:
                call.arguments = copy.deepcopy(call.arguments)


def merge_start(sizes: list[int], spill: int, max_refs: int) -> int:
    """Which references a new spill of ``spill`` turns should be merged with.

    Called when the token already holds ``max_refs`` references (before that, each
    spill is written on its own). ``sizes`` are the turns of the references, oldest
    first. Returns the index of the first one to merge: the new segment replaces
    ``sizes[start:]`` and holds their turns followed by the spill; the result never
    holds more than ``max_refs`` references.

    Size-tiered, like an LSM tree's compaction: references stay roughly geometrically
    decreasing from oldest to newest, so a merge rewrites mostly small, recent
    segments and an old turn is rewritten a few times over the whole conversation,
    not on every merge. The ratio grows with the history (``(total / spill) ** (1 /
    (max_refs - 1))``, at least 1), which is what lets ``max_refs`` references cover
    any length. Merging everything whenever references pile up would rewrite the whole
    history each time: bytes written quadratic in the length of the conversation.
    """
    if max_refs < 2:
        return 0
    total = sum(sizes) + spill
    ratio = max(1.0, (total / max(spill, 1)) ** (1.0 / (max_refs - 1)))
    start, merged = len(sizes), spill
    # Merge while the next older segment is not much larger than what is being
    # written, and always enough that the references stay within max_refs.
    while start > 0 and (sizes[start - 1] <= ratio * merged or start > max_refs - 1):
        start -= 1
        merged += sizes[start]
    return start


def segment_digest(stored: bytes) -> bytes:
    """The digest a SegmentRef records: BLAKE2b-128 of the stored bytes."""
    return hashlib.blake2b(stored, digest_size=SEGMENT_DIGEST_SIZE).digest()


@dataclass(slots=True)
class SegmentRead:
    """The outcome of :meth:`SegmentStore.read`.

    ``turns``: the turns of every segment that was read and verified, in reference
    order. ``missing``: ``(ref, reason)`` for every other reference, ``reason`` one of
    :data:`REASONS`. ``from_cache``: how many segments came from the in-process cache.
    ``unconfirmed``: ``(key, stored bytes)`` of verified segments served from the cache
    that the tier may have lost in an outage since (:meth:`SegmentStore.restore`).
    ``error``: the tier failure behind any ``tier_unavailable``.
    """

    turns: list[Turn] = field(default_factory=list)
    missing: list[tuple[SegmentRef, str]] = field(default_factory=list)
    from_cache: int = 0
    error: TierError | None = None
    unconfirmed: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every referenced segment was read and verified."""
        return not self.missing

    @property
    def reasons(self) -> list[str]:
        """The distinct reasons, in first-seen order (for ``ctx.degraded``)."""
        return list(dict.fromkeys(reason for _, reason in self.missing))

    @property
    def lost_turns(self) -> int:
        """How many turns the missing segments held (as their references record)."""
        return sum(ref.turns for ref, _ in self.missing)


class SegmentStore:
    """Writes and reads a session's overflow segments through a :class:`GuardedTier`."""

    def __init__(
        self,
        tier: GuardedTier | Tier,
        codec: Codec,
        *,
        prefix: str = "satchel",
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if not isinstance(tier, GuardedTier):
            tier = GuardedTier(tier)
        if not prefix or any(c in prefix for c in "{}"):
            raise ValueError("the segment key prefix must be non-empty and hold no braces")
        if not grace >= 0:
            raise ValueError("the segment grace period must be >= 0 seconds")
        self.tier = tier
        self.codec = codec
        self.prefix = prefix
        #: seconds a segment replaced by a merge stays readable (0: deleted at once)
        self.grace = float(grace)

    def __repr__(self) -> str:
        return f"SegmentStore(prefix={self.prefix!r}, tier={self.tier!r})"

    @property
    def max_segment_bytes(self) -> int:
        """The largest stored segment that is opened (larger ones are corrupt)."""
        return self.codec.limits.max_decompressed_bytes + 1024

    # -- names ---------------------------------------------------------------------------

    def session_tag(self, session_id: bytes) -> str:
        """The session's tag: its hash tag in tier keys and its name in logs."""
        return self.codec.session_tag(session_id)

    def key_for(self, session_id: bytes, digest: bytes) -> str:
        """The tier key of the segment with ``digest`` in session ``session_id``."""
        key = self.codec.keyring.anchored(self.codec.purpose, "segment-key")
        mac = hmac.digest(key, session_id + digest, "sha256")
        tag = self.session_tag(session_id)
        return f"{self.prefix}:{{{tag}}}:seg:{b64url_encode(mac[:16])}"

    # -- write ---------------------------------------------------------------------------

    def write(self, ctx: Context, turns: list[Turn], ttl: float, *, now: float) -> SegmentRef:
        """Store ``turns`` as one segment of ``ctx``'s session for ``ttl`` seconds.

        Returns the reference to keep in the token. Raises TierError (tier down or
        breaker open: TierUnavailable; out of memory: TierFull), BudgetExceeded when
        the turns are too large to ever be opened again, and ContextNotSerializable
        for a turn that could not be read back (as sealing does).
        """
        payload = serialize.pack(
            {
                "v": CURRENT_VERSION,
                "i": ctx.session_id,
                "t": [turn_to_wire(t, self.codec.limits) for t in turns],
            }
        )
        if len(payload) > self.codec.limits.max_decompressed_bytes:
            raise BudgetExceeded(
                "the turns are too large for one overflow segment",
                size=len(payload),
                limit=self.codec.limits.max_decompressed_bytes,
            )
        _, stored = self.codec.seal_payload(payload, now=now, expires_at=now + ttl)
        digest = segment_digest(stored)
        # Checked in the write itself, even when this request read the mark when it
        # opened the context: an erasure may have come while the view waited on a
        # model, or come between a separate check and the write.
        tag = self.session_tag(ctx.session_id)
        key = self.key_for(ctx.session_id, digest)
        if not self.tier.put_unless_marked(key, stored, ttl, mark_key(tag), ERASED):
            self.tier.cache.discard_tag(tag)
            raise ContextErased("this conversation was erased")
        return SegmentRef(digest=digest, turns=len(turns), size=len(stored), seq=ctx.seq, ts=now)

    # -- read ----------------------------------------------------------------------------

    def read(self, ctx: Context) -> SegmentRead:
        """Fetch every segment ``ctx.overflow`` names in one tier call, verify, decode.

        Never raises for tier or segment problems: they are reported in ``missing``.
        """
        refs = list(ctx.overflow)
        if not refs:
            return SegmentRead()
        keys = [self.key_for(ctx.session_id, ref.digest) for ref in refs]
        fetched = self.tier.get_many(keys)
        result = SegmentRead(error=fetched.error)
        for ref, key in zip(refs, keys, strict=True):
            stored = fetched.get(key)
            if stored is None:
                reason = fetched.reason(key)
                result.missing.append(
                    (ref, TIER_UNAVAILABLE if reason == TIER_UNAVAILABLE else SEGMENT_MISSING)
                )
                continue
            if key in fetched.cached:
                result.from_cache += 1
            turns, reason = self._decode(ctx, ref, stored, key)
            if reason is not None:
                if key in fetched.cached:
                    self.tier.cache.discard((key,))
                result.missing.append((ref, reason))
            else:
                result.turns.extend(turns)
                if key in fetched.unconfirmed:
                    result.unconfirmed.append((key, stored))
        return result

    def restore(self, ctx: Context, unconfirmed: list[tuple[str, bytes]], ttl: float) -> int:
        """Write segments this process still caches back to a tier that may have lost
        them in an outage (best effort); returns how many were written.

        Raises ContextErased when the session was erased meanwhile: its cached copies
        are dropped, never written back.
        """
        tag = self.session_tag(ctx.session_id)
        try:
            return self.tier.restore(unconfirmed, ttl, unless=(mark_key(tag), ERASED))
        except ContextErased:
            self.tier.cache.discard_tag(tag)
            raise

    def _open(self, stored: bytes) -> tuple[envelope.Envelope, bytes, Any]:
        """Stored segment bytes through the codec's authenticated path: the envelope,
        the verified payload and its bounded unpack (a BadToken subclass otherwise)."""
        env = envelope.parse_raw(stored)
        payload = self.codec.open_envelope(env)
        return env, payload, serialize.unpack(payload, self.codec.limits)

    def _mismatch_reason(self, ctx: Context, stored: bytes) -> str:
        """Why bytes that fail the reference's size or digest check are refused:
        ``segment_foreign`` when they are a genuine segment of another session (only
        someone with write access to the tier can put one under this session's key),
        else ``segment_corrupt``. Opened through the codec's authenticated path, so no
        byte that is not ours reaches the decompressor; this costs work only on this
        failure path, never on a good read."""
        if len(stored) > self.max_segment_bytes:
            return SEGMENT_CORRUPT
        try:
            _env, _payload, wire = self._open(stored)
        except BadToken:  # TokenExpired included: whoever wrote them, they are not ours
            return SEGMENT_CORRUPT
        session_id = wire.get("i") if isinstance(wire, dict) else None
        if isinstance(session_id, bytes) and session_id != ctx.session_id:
            return SEGMENT_FOREIGN
        return SEGMENT_CORRUPT

    def _decode(
        self, ctx: Context, ref: SegmentRef, stored: bytes, key: str
    ) -> tuple[list[Turn], str | None]:
        cache = self.tier.cache
        # These bytes (same digest) opened before in this process: reuse their unpacked
        # turns instead of decrypting, decompressing and unpacking again on every
        # request of a long conversation. Only the checks that depend on now or on the
        # asking context run again.
        opened = cache.opened(key, ref.digest) if cache.max_bytes else None
        # The size and digest checks come first: only bytes this session wrote go on.
        # The very bytes object verified when they were opened (the cache hands out
        # the one it holds) needs no second hash: bytes do not change.
        if (opened is None or opened[0] is not stored) and (
            len(stored) > self.max_segment_bytes
            or not hmac.compare_digest(segment_digest(stored), ref.digest)
        ):
            return [], self._mismatch_reason(ctx, stored)
        if opened is not None:
            _verified, session_id, expires_at, turn_wires = opened
            if expires_at and self.codec.clock() > expires_at + self.codec.limits.clock_skew:
                return [], SEGMENT_MISSING
        else:
            try:
                env, payload, wire = self._open(stored)
            except TokenExpired:
                return [], SEGMENT_MISSING
            except BadToken:
                return [], SEGMENT_CORRUPT
            version = wire.get("v") if isinstance(wire, dict) else None
            if type(version) is not int or version != CURRENT_VERSION:  # 2.0 is not 2
                return [], SEGMENT_CORRUPT
            session_id, expires_at, turn_wires = wire.get("i"), env.header.expires_at, wire.get("t")
        if session_id != ctx.session_id:
            return [], SEGMENT_FOREIGN
        try:
            turns = turns_from_wire(turn_wires)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, SatchelError):
            return [], SEGMENT_CORRUPT
        if len(turns) != ref.turns:
            return [], SEGMENT_CORRUPT
        if cache.max_bytes:
            _unshare(turns)
            if opened is None:
                cache.attach(
                    key,
                    ref.digest,
                    (stored, session_id, expires_at, turn_wires),
                    _unpacked_weight(len(payload), turn_wires),
                )
        return turns, None

    def retire(self, ctx: Context, refs: list[SegmentRef]) -> None:
        """Retire segments a merged one replaced (best effort).

        They are not deleted at once: a retried request, or a second tab, may still
        carry the token from before the merge, and in ``client`` consistency that token
        is valid and must find its turns. They stay readable for ``grace`` seconds, then
        the tier drops them (kept until their own TTL, they would multiply storage). A
        failure only leaves them to that TTL.
        """
        keys = [self.key_for(ctx.session_id, ref.digest) for ref in refs]
        if not keys:
            return
        try:
            if self.grace > 0:
                self.tier.expire_soon(keys, self.grace)
            else:
                self.tier.delete(keys)
        except TierError:
            pass  # they expire at their TTL

    # -- erase ---------------------------------------------------------------------------

    def erase(self, session_id: bytes) -> int:
        """Delete every key of the session; returns how many.

        Raises TierError when the tier cannot be reached (the caller must retry or
        record the erasure elsewhere).
        """
        return self.tier.delete_session(self.session_tag(session_id))


__all__ = [
    "DEFAULT_GRACE",
    "REASONS",
    "SEGMENT_CORRUPT",
    "SEGMENT_FOREIGN",
    "SEGMENT_MISSING",
    "TIER_UNAVAILABLE",
    "SegmentRead",
    "SegmentStore",
    "merge_start",
    "segment_digest",
]
