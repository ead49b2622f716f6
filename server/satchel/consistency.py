"""Consistency levels: what happens when two tokens of one conversation disagree.

* ``client`` (default): the token is the truth and the last writer wins. Forks (two
  tokens made from one parent, or a token older than one already issued) are detected
  from the sequence number and parent digest, reported, never merged. Detection here
  is in-process and free: it sees forks within one server process.
* ``monotonic``: a tiny high-water mark per session (sequence number, digest and a
  random id minted by the newest monotonic save, which its token carries and every
  later token inherits) lives in the tier. A token that does not carry the mark's id
  (an older one, a sibling, or an older one taken further through ``client``-level
  routes) is refused with 409 ``stale_context``, so values such as credits, quotas or
  consent cannot be rolled back by replaying an old token. The mark moves with an
  atomic compare-and-set when the next token is issued, so of two concurrent requests
  carrying one token exactly one succeeds. When the tier is down, ``fail_open``
  accepts and flags the response; ``fail_closed`` answers 503 ``tier_unavailable``.
  When the tier is up but has lost the mark (a Redis restart without persistence, an
  eviction), a token that says its session was marked (``Context.marked``) shows it:
  the request is served, flagged ``consistency_reset``, counted and logged, and the
  mark starts again from that token. No policy can refuse it: nothing is left to tell
  the newest token from an older one. The newest token is also kept next to the mark
  (until it expires) and handed back, with the 409, to a request that sends the very
  token it was made from: the client whose response was lost on its way (a dropped
  connection, a stream stopped at its end) catches up instead of being locked out.
* ``server``: the whole context lives server-side (``SATCHEL_MODE = "server"``).

See docs/consistency.md.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

import msgpack

from .context import Context
from .errors import (
    BadToken,
    ContextBusy,
    ContextErased,
    StaleContext,
    TierError,
    TierFull,
    TierUnavailable,
    retry_facts,
)
from .lru import BoundedLRU
from .observe import NULL_OBSERVER, Observer, flag_degraded
from .protect import AtRest
from .schema import MARK_ID_BYTES
from .tiers.base import CLAIM_HELD

if TYPE_CHECKING:
    from .tiers.guard import Fetched

log = logging.getLogger("satchel.consistency")

LEVELS = ("client", "monotonic", "server")
STRICTNESS = {"client": 0, "monotonic": 1, "server": 2}
ERASED = b"\x00erased"
#: how long a mark lives without a maximum age (a session kept alive by its idle TTL has
#: no end to outlive), and the least an erasure tombstone lives
DEFAULT_MARK_TTL = 31 * 86400.0
#: a mark outlives the session it guards by this much (the codec's clock skew
#: allowance, and clocks of app and tier that disagree)
MARK_TTL_MARGIN = 600.0


def mark_ttl_for(created_at: float, max_age: float | None, now: float) -> float:
    """How long a session's mark must live after a save: until the session's maximum
    age has passed, plus a margin. Not the idle TTL from the save: requests at the
    ``client`` level renew any branch of the session (an older token included) without
    touching the mark, up to the maximum age, so a mark gone before then let such a
    branch undo a spend. Without a maximum age, :data:`DEFAULT_MARK_TTL`.

    (A fixed 31 days kept the marks of a 150-second session for a month, and let those
    of a 90-day one expire while its tokens still opened.)
    """
    if max_age is None:
        return DEFAULT_MARK_TTL
    return max(60.0, created_at + max_age - now) + MARK_TTL_MARGIN


def tombstone_ttl_for(max_age: float | None) -> float:
    """How long an erasure tombstone lives: past any session's maximum age (the erased
    session's creation time is not known), and at least :data:`DEFAULT_MARK_TTL`."""
    if max_age is None:
        return DEFAULT_MARK_TTL
    return max(DEFAULT_MARK_TTL, max_age + MARK_TTL_MARGIN)


def stricter(a: str, b: str | None) -> str:
    """The stricter of two levels (a route may demand more than the app default)."""
    if b is None:
        return a
    return a if STRICTNESS[a] >= STRICTNESS[b] else b


def mark_key(tag: str, prefix: str = "satchel") -> str:
    """The key of the session's consistency mark (its high-water mark, or after an
    erasure the tombstone), in the session's hash tag: one Cluster slot with its keys."""
    return f"{prefix}:{{{tag}}}:hwm"


def newest_key(tag: str, prefix: str = "satchel") -> str:
    """The key of the session's newest monotonic token (:meth:`MonotonicGuard.after`),
    in the session's hash tag, so erasure deletes it with the rest."""
    return f"{prefix}:{{{tag}}}:newest"


def encode_newest(mark_id: bytes, parent: bytes, token: str | bytes, seq: int) -> bytes:
    """The stored newest token: ``[mark_id, parent digest, token, seq]``; the token as
    :class:`~satchel.protect.AtRest` sealed it (bytes), or as it is (str) for a guard
    given none."""
    return msgpack.packb([mark_id, parent, token, seq], use_bin_type=True)


def decode_newest(raw: bytes) -> tuple[bytes, bytes, str | bytes, int] | None:
    """``(mark_id, parent, token, seq)``, or None for a record that is not one. The
    token it holds is unsealed and opened (verified) by the codec before it is handed
    back."""
    fields = _unpack_record(raw, max_len=_MAX_NEWEST_BYTES)
    if fields is not None and len(fields) == 4:
        mark_id, parent, token, seq = fields
        if _is_name(mark_id) and _is_name(parent) and type(token) in (str, bytes) and _is_seq(seq):
            return mark_id, parent, token, seq
    return None  # unreadable: nothing to hand back, the refusal stands as it is


def newest_context(mark_id: bytes, parent: bytes) -> bytes:
    """What a kept newest token is sealed for (AtRest's associated data): its record's
    mark id and parent, so a tier writer cannot pair one record's token with another's."""
    return b"newest\x00" + mark_id + b"\x00" + parent


#: How long a streamed reply holds its claim on the token it answers, at most. It is
#: released when the stream ends, however it ends (a release the tier fails is retried
#: in the background until it answers: LateReleases); the TTL only bounds a worker that
#: died mid-stream (that token then waits this long before it can be sent again).
CLAIM_TTL = 120.0


def claim_key(tag: str, token_digest: bytes, prefix: str = "satchel") -> str:
    """The key of a streamed reply's claim on one token (the session's hash tag, so it
    shares the mark's Cluster slot)."""
    return f"{prefix}:{{{tag}}}:claim:{token_digest.hex()}"


def session_claim_key(tag: str, prefix: str = "satchel") -> str:
    """The key of a streamed reply's claim on a session's stored state (server and
    memory modes, where one session has one state at a time): it does not depend on
    that state, so a request reads it with the state, in the same round trip."""
    return f"{prefix}:{{{tag}}}:claim"


@dataclass(frozen=True, slots=True)
class Claim:
    """A streamed reply's claim: the key it holds and the random id it wrote there, so
    a release retried late removes this claim only, never one a later stream took."""

    key: str
    holder: bytes


def take_claim(tier: Any, key: str, observer: Observer, tag: str) -> Claim:
    """Take the claim ``key`` (set if absent, for ``CLAIM_TTL``), or raise ContextBusy:
    another request answering the same state holds it. TierError propagates: what a
    tier failure means depends on who claims (a monotonic route's policy, server
    mode's outage)."""
    holder = new_mark_id()
    if tier.compare_and_set_mark(key, None, holder, CLAIM_TTL) is not None:
        refuse_busy(observer, tag)
    return Claim(key, holder)


def refuse_busy(observer: Observer, tag: str) -> NoReturn:
    """Report and refuse a request for a token another request is answering right now.

    Not stale (409 stale_context would tell a browser client its token is dead): busy
    (409 ``context_busy``). The same token works again once that reply has ended.
    """
    # Its own event: not a stale token (nothing replayed or rolled back; a client that
    # stops a stream and sends again at once meets this), so not counted with those.
    observer.event("busy_refused", session=tag)
    raise ContextBusy(
        "another request for this conversation is being answered right now; send it "
        "again once that reply has ended"
    )


def release_claim(tier: Any, claim: Claim) -> None:
    """Drop a stream's claim, if its key still holds it: a stream whose claim expired
    (a model silent past ``CLAIM_TTL``) must not delete the claim another stream took
    since, which would let a third request save under that stream's reply. A tier that
    fails the release (the very outage that ended the stream, most often) would leave
    it to hold the conversation for ``CLAIM_TTL``: every send refused 409
    ``context_busy`` for two minutes after the tier was back. The release is retried
    in the background until the tier answers."""
    try:
        _release_if_held(tier, claim)
    except TierError:
        log.info("satchel: a stream's claim could not be released; retrying in the background")
        LATE_RELEASES.add(tier, claim)


def renew_claim(tier: Any, claim: Claim) -> bool:
    """Give ``claim`` a fresh ``CLAIM_TTL`` if its key still holds it, so a reply that
    streams for longer than the TTL (a slow reasoning model) keeps it to the end. False
    when the key holds something else (the claim expired meanwhile) or the tier failed:
    the stream goes on, and its save's compare-and-set still decides."""
    try:
        return tier.compare_and_set_mark(claim.key, claim.holder, claim.holder, CLAIM_TTL) is None
    except TierError:
        return False


def _release_if_held(tier: Any, claim: Claim) -> None:
    """Remove ``claim`` if its key still holds it (TierError if the tier fails). The
    tier has no conditional delete: a compare-and-set first swaps this claim's id for
    an empty value (a key holding another id, taken once this claim expired, is left
    alone), which no stream can claim over, then the key is deleted. Should the delete
    fail, the empty value expires within ``_RELEASED_TTL``."""
    if tier.compare_and_set_mark(claim.key, claim.holder, b"", _RELEASED_TTL) is None:
        tier.delete([claim.key])


#: How long a claim swapped for an empty value by a late release may outlive a failed
#: delete (it refuses streams as busy meanwhile).
_RELEASED_TTL = 5.0


class LateReleases:
    """Claims whose release the tier failed, retried every ``interval`` seconds by one
    daemon thread (started on demand, so after a fork each worker runs its own) until
    the tier answers or the claim has expired anyway (``CLAIM_TTL``)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, Claim, float]] = []
        self._thread: threading.Thread | None = None
        #: set each time the pending list empties (tests wait on it)
        self.drained = threading.Event()
        self.drained.set()
        # A forked child (gunicorn --preload) starts empty: the parent's claims are the
        # parent's to release, its thread does not exist here, and a lock its thread
        # held at the fork would never be let go (the child's first add() hung).
        forget = weakref.WeakMethod(self._forget)

        def after_fork_in_child() -> None:
            method = forget()
            if method is not None:
                method()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pending = []
        self._thread = None
        self.drained = threading.Event()
        self.drained.set()

    def add(self, tier: Any, claim: Claim) -> None:
        """Queue ``claim`` (held on ``tier``) for release, tried every ``interval``
        seconds for ``CLAIM_TTL`` (by then it has expired anyway); starts the thread if
        none is running."""
        with self._lock:
            self._pending.append((tier, claim, time.monotonic() + CLAIM_TTL))
            self.drained.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="satchel-claim-release", daemon=True
                )
                self._thread.start()

    def pending(self) -> int:
        """How many claims still wait for their release."""
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)  # a fixed cadence: nothing to wait for but time
            with self._lock:
                batch = list(self._pending)
            done = []
            for item in batch:
                tier, claim, deadline = item
                try:
                    if time.monotonic() < deadline:
                        _release_if_held(tier, claim)
                except TierError:
                    continue  # still down: next round
                except Exception as exc:  # a tier bug must not kill the thread
                    log.warning("satchel: releasing a claim failed (%s)", type(exc).__name__)
                done.append(item)
            with self._lock:
                for item in done:
                    self._pending.remove(item)
                if not self._pending:
                    self._thread = None
                    self.drained.set()
                    return


#: The process's late releases (one thread at most, only while some are pending).
LATE_RELEASES = LateReleases()


def refuse_erased(observer: Observer, tag: str) -> NoReturn:
    """Report and refuse a token of an erased session (410 ``token_erased``)."""
    observer.event("refused", session=tag, reason="token_erased")
    raise ContextErased("this conversation was erased")


def new_mark_id() -> bytes:
    """A fresh id for the mark a ``monotonic`` save sets (``Context.mark_id``)."""
    return secrets.token_bytes(MARK_ID_BYTES)


def encode_mark(seq: int, digest: bytes, mark_id: bytes | None = None) -> bytes:
    """The stored mark: ``[seq, digest]``, and the mark id when there is one."""
    fields: list[Any] = [seq, digest] if mark_id is None else [seq, digest, mark_id]
    return msgpack.packb(fields, use_bin_type=True)


def decode_mark(raw: bytes) -> tuple[int, bytes, bytes | None] | None:
    """``(seq, digest, mark_id)``; ``mark_id`` is None in marks of releases before
    mark ids (``[seq, digest]``)."""
    if raw == ERASED:
        return None
    fields = _unpack_record(raw, max_len=_MAX_MARK_BYTES)
    if fields is not None and _is_seq(fields[0]) and all(map(_is_name, fields[1:])):
        if len(fields) == 2:
            return fields[0], fields[1], None
        if len(fields) == 3:
            return fields[0], fields[1], fields[2]
    return None  # unreadable mark: treat as absent rather than lock a user out


# Marks and newest-token records are the server's own, in the tier, not authenticated:
# whoever can write the tier can delete them anyway (docs/security.md). They are read
# with a bounded, strict parser, so a damaged or planted record is "no record", never
# a 500 or a huge allocation (bytes(2**31) of zeros from an int where a digest goes).
_MAX_MARK_BYTES = 128
_MAX_NEWEST_BYTES = 1 << 20
_MAX_NAME_BYTES = 32  # digests (12 bytes) and mark ids (16)


def _unpack_record(raw: bytes, *, max_len: int) -> list[Any] | None:
    """The stored array, unpacked with limits; None for anything else."""
    if not isinstance(raw, bytes) or len(raw) > max_len:
        return None
    try:
        fields = msgpack.unpackb(
            raw,
            raw=False,
            # Names are checked for their length after (_is_name); a kept newest token,
            # sealed, is bytes as long as the record allows.
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=4,
            max_map_len=0,
            max_ext_len=0,
            strict_map_key=True,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        return None
    return fields if type(fields) is list and fields else None


def _is_name(value: object) -> bool:
    return type(value) is bytes and 0 < len(value) <= _MAX_NAME_BYTES


def _is_seq(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**63


class ForkDetector:
    """In-process memory of the newest token issued per session (bounded LRU).

    A request whose token is older than one this process already issued for the same
    session, or a sibling of it, is a fork: reported, not refused (``client`` level).
    """

    def __init__(self, max_sessions: int = 50_000) -> None:
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._issued: OrderedDict[bytes, tuple[int, bytes, bytes | None]] = OrderedDict()

    def check(self, ctx: Context) -> str | None:
        """A short description of the fork, or None. Call right after opening."""
        with self._lock:
            seen = self._issued.get(ctx.session_id)
        if seen is None or ctx.parent is None:
            return None
        seq, digest, _parent = seen
        if seq > ctx.seq:
            return f"behind={seq - ctx.seq}"
        if seq == ctx.seq and not hmac.compare_digest(digest, ctx.parent):
            return "sibling"
        return None

    def record(self, ctx: Context, previous_digest: bytes | None) -> str | None:
        """Remember the token just issued for ``ctx`` (seq and digest are the new ones).

        Returns a fork's description when this process issued another token of the
        session, as new or newer, since this request's :meth:`check`: two requests in
        flight at once with one token both passed the check, and this save is the
        second of two siblings (reported like one found at the check).
        """
        if ctx.parent is None:
            return None
        fork = None
        with self._lock:
            seen = self._issued.get(ctx.session_id)
            if seen is not None and seen[0] >= ctx.seq and seen[1] != ctx.parent:
                seq, _digest, parent = seen
                same_parent = (
                    parent is not None
                    and previous_digest is not None
                    and hmac.compare_digest(parent, previous_digest)
                )
                fork = "sibling" if same_parent else f"behind={seq - ctx.seq + 1}"
            self._issued[ctx.session_id] = (ctx.seq, ctx.parent, previous_digest)
            self._issued.move_to_end(ctx.session_id)
            while len(self._issued) > self.max_sessions:
                self._issued.popitem(last=False)
        return fork


#: how many sessions a process remembers having reported a lost mark for
LOST_REPORTED_MAX = 10_000


@dataclass(slots=True)
class MarkState:
    """What ``before`` saw, so ``after`` can compare-and-set against it."""

    key: str
    expected: bytes | None
    checked: bool = True
    #: the id in the mark the token was checked against (None: no mark, or one of the
    #: release before mark ids); the next token names it as its ``mark_parent``
    mark_id: bytes | None = None
    #: the mark ids the opened token carried (its own and its parent's)
    opened_ids: tuple[bytes | None, bytes | None] = (None, None)
    #: the digest of the token the opened token was made from (Context.opened_parent)
    opened_parent: bytes | None = None
    #: the digest of the token the request opened (None: it sent none)
    opened_digest: bytes | None = None
    #: a streamed reply was answering the same token when this request opened it
    busy: bool = False
    #: after() failed, and its write may still have landed (the tier says so: a Redis
    #: timeout, whose stalled server runs the command it had read once it resumes)
    unconfirmed: bool = False


class MonotonicGuard:
    """Reads and moves the per-session high-water mark in the tier."""

    def __init__(
        self,
        tier: Any,
        *,
        tier_down_policy: str = "fail_open",
        observer: Observer = NULL_OBSERVER,
        mark_ttl: float = DEFAULT_MARK_TTL,
        max_age: float | None = None,
        idle_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        mark_ids: bool = True,
        keep_newest: bool = True,
        other_anchor_tags: Callable[[bytes], list[str]] | None = None,
        open_token: Callable[[str], Context] | None = None,
        at_rest: AtRest | None = None,
    ) -> None:
        if tier_down_policy not in ("fail_open", "fail_closed"):
            raise ValueError("tier_down_policy must be 'fail_open' or 'fail_closed'")
        self.tier = tier
        #: saves mint mark ids (False: marks as the release before them wrote them,
        #: for the first deploy over it, whose replicas would drop the ids)
        self.mark_ids = mark_ids
        self.tier_down_policy = tier_down_policy
        self.observer = observer
        #: how long marks live without a maximum age, and tombstones (:meth:`erase`)
        self.mark_ttl = mark_ttl
        #: the sessions' maximum age: a mark lives until it has passed (mark_ttl_for)
        self.max_age = max_age
        #: the tokens' idle TTL: how long a kept newest token is of use (keep_newest)
        self.idle_ttl = idle_ttl
        #: keep each save's token next to the mark and hand it back to a request that
        #: sends that token's parent (its response was lost): the 409 carries it
        self.keep_newest = keep_newest
        self.clock = clock
        #: the session's tags under the ring's other keys as anchor (Codec.
        #: session_tags_under_other_anchors), looked at before a token is called stale
        self.other_anchor_tags = other_anchor_tags
        #: verifies a kept newest token before it is handed back (Codec.open): the
        #: record is the tier's, not authenticated. None hands it back as it is kept.
        self.open_token = open_token
        #: seals a kept newest token in the tier (AtRest): kept as it is, whoever can
        #: read the tier (a replica, a backup) holds each session's newest token, a
        #: bearer credential. None keeps it as it is.
        self.at_rest = at_rest
        #: sessions whose lost mark this process has counted (until a save sets it)
        self._lost_reported = BoundedLRU(LOST_REPORTED_MAX)

    def _tier_down(
        self, ctx: Context, tag: str, exc: TierError, *, may_have_landed: bool = False
    ) -> None:
        """The mark could not be read or moved: refuse (fail_closed) or flag (fail_open).

        ``may_have_landed``: the failed call was the mark's compare-and-set for a
        token the client holds. One that timed out may still run (a stalled Redis runs
        the command it had read once it resumes), moving the mark to this exchange:
        the 503 then says to reload before sending again, as server mode's does, since
        "retry" would ask for the message twice.

        A full tier (Redis ``maxmemory`` with ``noeviction``, a full disk) answers but
        refuses the write. It is reported as full, code ``tier_full`` (503 like
        ``tier_unavailable``), not as an outage: the operator's fix is memory or space,
        and waiting does not help. The event's ``error`` says which it was; the flag
        stays ``consistency_unchecked``, which is what it means to the client either
        way (this exchange is not protected against a replay).
        """

        # What failed underneath (TimeoutError, ConnectionError...): a timeout with a
        # healthy tier means workers starved of CPU (docs/consistency.md).
        cause = exc.facts.get("error") or ("breaker_open" if "breaker" in exc.facts else None)
        if self.tier_down_policy == "fail_closed":
            # Refused, not served degraded: counted as such (satchel_unavailable_total).
            self.observer.event(
                "unavailable", session=tag, reason=exc.code, consistency="monotonic", detail=cause
            )
            if isinstance(exc, TierFull):
                raise TierFull(
                    "the consistency store is full and this app fails closed; it needs "
                    "more memory or space before this conversation can go on",
                    reason=exc.code,
                    **retry_facts(exc),
                ) from None
            if may_have_landed and not exc.facts.get("unsent"):
                raise TierUnavailable(
                    "the consistency store did not confirm this exchange, which may still "
                    "have been saved: reload the conversation before sending it again",
                    reason=exc.code,
                    **retry_facts(exc),
                ) from None
            raise TierUnavailable(
                "the consistency store is unavailable and this app fails closed; retry shortly",
                reason=exc.code,
                **retry_facts(exc),
            ) from None
        # Once per response: a stream's claim, then its mark, can both meet it.
        flag_degraded(
            self.observer,
            ctx.degraded,
            "consistency_unchecked",
            session=tag,
            error=exc.code,
            detail=cause,
        )

    def _mark_lost(self, ctx: Context, tag: str) -> None:
        # The token was issued after a mark was set, and the mark is gone: the tier
        # lost data. Replays of older tokens went unchecked since then; say so.
        # The mark is set again by the session's next save (not by a read-only
        # request: after the loss nothing tells which token is the newest, and
        # pinning it to the first one read, an older tab's, locked the newest out).
        # Until then every request of the session is flagged, but the loss is
        # counted once in this process, not again on every page load.
        if self._lost_reported.add(tag):
            self.observer.event("mark_lost", session=tag, seq=ctx.seq)
        flag_degraded(self.observer, ctx.degraded, "consistency_reset", session=tag)

    def before(self, ctx: Context, tag: str, *, fresh: bool, reading: bool = False) -> MarkState:
        """Refuse a stale, replayed or rolled-back token. ``fresh``: no token was sent.

        Also refuse (409 ``context_busy``) a token a streamed reply is answering right
        now (its claim, read in the same call as the mark): a second answer to it, at
        a route that takes no claim of its own, would make a sibling of the stream's
        token, which the mark then refuses for good (two devices with one token).
        ``reading``: the request is a read (GET, HEAD, OPTIONS), served meanwhile (a
        page reloading the chat right after a Stop); it is refused only if it saves.
        """
        key = mark_key(tag)
        claim = claim_key(tag, ctx.parent) if not fresh and ctx.parent is not None else None
        fetched = self.tier.get_many([key] if claim is None else [key, claim], cache=False)
        if fetched.reason(key) == "tier_unavailable":
            self._tier_down(ctx, tag, fetched.error or TierUnavailable())
            return MarkState(key, None, checked=False)
        raw = fetched.get(key)
        if raw is None and not fresh and ctx.marked:
            self._mark_lost(ctx, tag)
        if raw == ERASED:
            refuse_erased(self.observer, tag)
        mark = decode_mark(raw) if raw is not None else None
        if mark is not None and not fresh:
            if not self._descends(ctx, *mark) and not self._anchor_changed(ctx, tag):
                seq = mark[0]
                self._refuse_stale(
                    ctx,
                    tag,
                    mark[2],
                    ctx.parent,
                    f"this token (seq {ctx.seq}) does not descend from the newest one "
                    f"the server has seen for this route (seq {seq}); use the newest token",
                    detail=f"mark={seq}",
                    newest_seq=seq,
                )
        busy = claim is not None and fetched.get(claim) is not None
        if busy and not reading:
            refuse_busy(self.observer, tag)
        return MarkState(
            key,
            raw,
            mark_id=mark[2] if mark is not None else None,
            opened_ids=(ctx.mark_id, ctx.mark_parent),
            opened_parent=None if fresh else ctx.opened_parent,
            opened_digest=None if fresh else ctx.parent,
            busy=busy,
        )

    def _refuse_stale(
        self,
        ctx: Context,
        tag: str,
        mark_id: bytes | None,
        presented: bytes | None,
        message: str,
        *,
        detail: str,
        newest_seq: int | None = None,
    ) -> NoReturn:
        """Raise StaleContext, with the newest token when ``presented`` (the digest of
        the token the request sent) is its parent."""
        newest = self._newest_for(tag, mark_id, presented)
        self.observer.event(
            "stale_refused", session=tag, seq=ctx.seq, detail=detail, recovered=newest is not None
        )
        facts: dict[str, Any] = {"seq": ctx.seq}
        if newest_seq is not None:
            facts["newest_seq"] = newest_seq
        if newest is None:
            raise StaleContext(message, **facts)
        facts.update(newest_seq=newest[1], session=tag)
        raise StaleContext(
            # Either this client's own earlier response was lost (the newest holds
            # it), or another request with the same token won a race (the newest
            # holds that one's, not this message): the message says both.
            message + "; this response carries the newest token, made from the one sent: "
            "it holds what the request that was saved did (a lost response of yours, or "
            "another request's); send this one again with it if it is not there",
            newest_token=newest[0],
            **facts,
        )

    def _newest_for(
        self, tag: str, mark_id: bytes | None, presented: bytes | None
    ) -> tuple[str, int] | None:
        """The session's newest token and its seq, if it was made from the very token
        the request sent (digest ``presented``) and still is the newest (it carries the
        id of the mark, ``mark_id``); else None.

        Whoever holds that parent could have sent the request that made it, so handing
        it back gives nothing new away, and undoes nothing: it is the newest state. A
        token two saves behind, or a sibling, gets no token (docs/consistency.md).
        """
        if not self.keep_newest or mark_id is None or presented is None:
            return None
        key = newest_key(tag)
        fetched = self.tier.get_many([key], cache=False)
        raw = fetched.get(key) if fetched.error is None else None
        record = decode_newest(raw) if raw is not None else None
        if record is None:
            return None
        kept_id, parent, kept, seq = record
        if hmac.compare_digest(kept_id, mark_id) and hmac.compare_digest(parent, presented):
            token = self._unsealed(kept, kept_id, parent)
            if token is None:
                return None  # not sealed by this ring for this record: none to give
            if self.open_token is not None and not self._made_from(token, presented, seq):
                return None  # not a token of ours made from the one sent: none to give
            return token, seq
        return None

    def _unsealed(self, kept: str | bytes, mark_id: bytes, parent: bytes) -> str | None:
        """The token a record keeps: unsealed with ``at_rest`` when it was kept sealed
        (bytes), or as it is (a str: kept by a release before records were sealed, or
        by a guard without ``at_rest``). With ``open_token`` either goes through
        :meth:`_made_from` next, so a plain record gives nothing a sealed one would
        not: refusing it locked out, for good, each client whose response was lost
        across the upgrade. A guard that seals but cannot check takes sealed ones only."""
        if isinstance(kept, str):
            # Unchecked only for a guard that checks nothing (no at_rest, no open_token:
            # one built by hand), as before records were sealed.
            return kept if self.open_token is not None or self.at_rest is None else None
        if self.at_rest is None:
            return None
        token = self.at_rest.open(
            kept, newest_context(mark_id, parent), max_bytes=_MAX_NEWEST_BYTES
        )
        # What it opens is what _newest_record sealed: a token, ASCII.
        return token.decode("ascii") if token is not None else None

    def _made_from(self, token: str, presented: bytes, seq: int) -> bool:
        """Whether ``token`` opens (our key, unexpired) as the save at ``seq`` made from
        the token whose digest is ``presented``: what the record claims it is."""
        assert self.open_token is not None
        try:
            made = self.open_token(token)
        except BadToken:
            return False
        parent = made.opened_parent
        return made.seq == seq and parent is not None and hmac.compare_digest(parent, presented)

    def _anchor_changed(self, ctx: Context, tag: str) -> bool:
        """Whether ``ctx``'s token descends from this session's mark under another key
        of the ring as anchor: the anchor changed (an unpinned ring whose last key
        changed, or a fleet half way through such a change), not the token.

        Marks are named with the anchor key. When it changes, the mark under the new
        anchor is missing (a lost mark: consistency_reset) or, if the anchor changes
        back, an old one no current token descends from: without this look every
        conversation of the session would be refused 409 for good. Served, flagged
        ``consistency_reset`` like a lost mark (replays since the change went
        unchecked), and the mark under the current anchor moves on from this token.
        """
        if ctx.mark_id is None and not ctx.marked:
            return False
        for _tag, key, fetched in self._marks_under_other_anchors(ctx.session_id):
            raw = fetched.get(key)
            if raw is None or raw == ERASED:
                continue
            mark = decode_mark(raw)
            if mark is not None and self._descends(ctx, *mark):
                flag_degraded(
                    self.observer,
                    ctx.degraded,
                    "consistency_reset",
                    session=tag,
                    detail="anchor_changed",
                )
                return True
        return False

    @staticmethod
    def _descends(ctx: Context, seq: int, digest: bytes, mark_id: bytes | None) -> bool:
        """Whether ``ctx``'s token descends from the newest monotonic save.

        Every monotonic save mints a mark id, seals it into its token and stores it in
        the mark; every route carries it forward. So a token descends from the newest
        save exactly when it carries that id. A sequence number alone does not say it:
        an older token taken through a ``client``-level route a few times climbs past
        the mark on a branch of its own (and would roll back what the save protected).
        """
        if mark_id is not None:
            # Its own id, or the id its save started from when that save could not
            # move the mark (the tier failed the write and fail_open served it anyway:
            # its token names an id the tier never got, and must not be locked out).
            if any(
                held is not None and hmac.compare_digest(held, mark_id)
                for held in (ctx.mark_id, ctx.mark_parent)
            ):
                return True
            # Or it was made from the very token the mark names. A stream moves its mark
            # only after its token went out: a tab that sent that token at once was
            # checked against the mark before it, so its save named the older id as its
            # parent, and its own token, sent at once again, met the moved mark and was
            # refused for good. A child of the newest save descends from it.
            opened_from = ctx.opened_parent
            return opened_from is not None and hmac.compare_digest(digest, opened_from)
        # A mark of the release before mark ids: the sequence-number rule it used.
        same = ctx.parent is not None and hmac.compare_digest(digest, ctx.parent)
        return not (seq > ctx.seq or (seq == ctx.seq and not same))

    def after(
        self,
        ctx: Context,
        tag: str,
        state: MarkState,
        token: str | None = None,
        *,
        settling: bool = False,
    ) -> bool:
        """Move the mark to the token just issued; lose the race -> StaleContext.

        False when the tier failed the write and ``fail_open`` served the request
        anyway: the mark is where it was (or, for a session's first, nowhere).
        ``settling``: a stream's deferred move, after its token went out. Losing the
        race then refuses nothing (the client already holds the token, typically
        sending its next message with it): reported (``mark_superseded``), not counted
        as a refusal, and False; the token is checked when it is next used.
        ``token``, the token just issued, is kept next to the mark (``keep_newest``),
        in the same atomic write, so an erasure cannot come between the two.
        """
        if not state.checked:
            return True
        if state.busy:  # a read that saves after all (before() let reads through)
            refuse_busy(self.observer, tag)
        assert ctx.parent is not None
        mark = encode_mark(ctx.seq, ctx.parent, ctx.mark_id if self.mark_ids else None)
        ttl = self._ttl(ctx)
        newest = self._newest_record(ctx, state, token)

        def move(key: str, expected: bytes | None, companion_key: str) -> bytes | None:
            companion = None if newest is None else (companion_key, *newest)
            return self.tier.compare_and_set_mark_with(key, expected, mark, ttl, companion)

        # Not while another request streams a reply to the token this one opened: one
        # that passed before() a moment before the stream claimed the token would move
        # the mark under it, and the stream, its whole reply sent, would end on a
        # sibling whose message the conversation never keeps. Checked in the same
        # atomic step as the move; the stream's own save passes its claim.
        claim = None if state.opened_digest is None else claim_key(tag, state.opened_digest)

        def move_own(expected: bytes | None) -> bytes | None:
            if claim is None:
                return move(state.key, expected, own)
            companion = None if newest is None else (own, *newest)
            current = self.tier.compare_and_set_unclaimed(
                state.key, expected, mark, ttl, claim, ctx.claim_holder, companion
            )
            if current is CLAIM_HELD:
                refuse_busy(self.observer, tag)
            return cast(bytes | None, current)

        own = newest_key(tag)
        try:
            current = move_own(state.expected)
            if current and current != ERASED and self._moved_to_own_parent(current, state):
                current = move_own(current)
            if current == b"" and state.expected is not None:
                # The mark vanished while the request ran (evicted, expired), which is
                # not another request winning: report it as a lost mark and set it
                # afresh. An erasure cannot be undone here: its tombstone is this key.
                self._mark_lost(ctx, tag)
                current = move_own(None)
        except TierError as exc:
            # Only a tier that says so (a Redis timeout or lost reply): SQLite's writes
            # are synchronous, and one that failed never lands later.
            state.unconfirmed = bool(exc.facts.get("may_have_landed")) and not exc.facts.get(
                "unsent"
            )
            # A new conversation's client holds no token: a mark that landed anyway
            # names a token nobody has, and sending again starts afresh.
            self._tier_down(ctx, tag, exc, may_have_landed=state.opened_digest is not None)
            return False
        if current is None:
            self._lost_reported.discard(tag)  # set again: a later loss is a new one
        if current == ERASED:  # erased while this request ran
            refuse_erased(self.observer, tag)
        if current is not None and settling:
            self.observer.event("mark_superseded", session=tag, seq=ctx.seq)
            return False
        if current is not None:
            rival = decode_mark(current)
            # The rival kept its token with its mark: hand it back to this request,
            # which sent the same parent.
            self._refuse_stale(
                ctx,
                tag,
                rival[2] if rival is not None else None,
                state.opened_digest,
                "another request with the same token finished first; use the newest token",
                detail="race",
            )
        self._mirror(ctx, move)
        return True

    def _newest_record(
        self, ctx: Context, state: MarkState, token: str | None
    ) -> tuple[bytes, float] | None:
        """The stored newest token (value, TTL) this save keeps next to its mark, for
        a client whose response is lost (:meth:`_newest_for`), until the token expires;
        None when there is nothing to keep."""
        if token is None or not (self.keep_newest and self.mark_ids) or ctx.mark_id is None:
            return None
        if state.opened_digest is None:
            return None  # a new conversation: a client that lost it holds no token to send
        now = self.clock()
        candidates = [self._ttl(ctx)]
        if self.idle_ttl is not None:
            candidates.append(self.idle_ttl + MARK_TTL_MARGIN)
        if self.max_age is not None:
            candidates.append(ctx.created_at + self.max_age - now + MARK_TTL_MARGIN)
        kept: str | bytes = token
        if self.at_rest is not None:
            context = newest_context(ctx.mark_id, state.opened_digest)
            kept = self.at_rest.seal(token.encode("ascii"), context)
        value = encode_newest(ctx.mark_id, state.opened_digest, kept, ctx.seq)
        return value, max(60.0, min(candidates))

    def _ttl(self, ctx: Context) -> float:
        if self.max_age is None:
            return self.mark_ttl
        return mark_ttl_for(ctx.created_at, self.max_age, self.clock())

    def _mirror(self, ctx: Context, move: Callable[[str, bytes | None, str], bytes | None]) -> None:
        """Copy the mark (and the newest token kept with it) under the session's tags
        for the ring's other keys as anchor (an unpinned ring only: its anchor moves
        with the end of the ring). An instance whose ring anchors elsewhere (half way
        through a rollout) then finds this save where it looks. Best effort: each is
        set against what it held, never over an erasure's tombstone; a failure is only
        a later consistency_reset."""
        try:
            for tag, key, fetched in self._marks_under_other_anchors(ctx.session_id):
                held = fetched.get(key)
                if fetched.error is None and held != ERASED:
                    move(key, held, newest_key(tag))
        except TierError:
            return

    def _marks_under_other_anchors(self, session_id: bytes) -> Iterator[tuple[str, str, Fetched]]:
        """Each tag and mark key of the session under the ring's other keys as anchor
        (an unpinned ring only), with what the tier holds there: one read per key, each
        tag being a Cluster slot of its own."""
        if self.other_anchor_tags is None:
            return
        for other in self.other_anchor_tags(session_id):
            key = mark_key(other)
            yield other, key, self.tier.get_many([key], cache=False)

    @staticmethod
    def _moved_to_own_parent(current: bytes, state: MarkState) -> bool:
        """Whether the mark moved, since this request read it, to the save that issued
        the very token this request opened: no rival's save, but that token's own
        stream settling its mark after it sent the token (the mark moves only once the
        client has it). A browser tab that sends as soon as the token arrives meets
        this; refusing it locked the conversation out. A rival's save, with the same
        token, leaves a mark id of its own, which this token does not carry."""
        mark = decode_mark(current)
        if mark is None or mark[2] is None:
            return False
        mark_id = mark[2]
        opened = state.opened_ids
        if any(held is not None and hmac.compare_digest(held, mark_id) for held in opened):
            return True
        # Or to the token the opened one was made from, whose stream settled only now:
        # the case _descends accepts by the parent digest. Its mark move must then go
        # on from there, or the reply it streamed is kept while its parent stays valid.
        made_from = state.opened_parent
        return made_from is not None and hmac.compare_digest(mark[1], made_from)

    def claim(self, ctx: Context, tag: str, state: MarkState) -> Claim | None:
        """Reserve the one answer a token may get, before a streamed reply starts.

        The mark moves only when the reply is complete, so without a claim every request
        sent at once with one token streamed the whole reply (the paid-for part) and
        only the mark's compare-and-set, at the end, told them apart. The first claim
        of a token wins (set if absent); the others are refused with ContextBusy (409
        ``context_busy``) before any text goes out, and the winner looks at the mark
        again (StaleContext if a save moved it meanwhile). Returns the claim, to
        :meth:`release` when the stream ends; None when there is nothing to claim (a new
        conversation, an unchecked mark) or the tier failed and ``fail_open`` lets the
        stream through.
        """
        digest = ctx.parent
        if not state.checked or digest is None:
            return None
        try:
            claim = take_claim(self.tier, claim_key(tag, digest), self.observer, tag)
        except TierError as exc:
            self._tier_down(ctx, tag, exc)  # fail_closed raises: a 503 before any text
            return None
        ctx.claim_holder = claim.holder  # the stream's own mark move passes its claim
        # A request that passed before() while another stream of this token was still
        # being answered takes the claim as soon as that one releases it, by which time
        # its save has moved the mark: look again, now that no other answer can start.
        fetched = self.tier.get_many([state.key], cache=False)
        if fetched.error is not None:
            # Unchecked now: fail_closed answers 503 before any text (without its
            # claim), fail_open streams flagged consistency_unchecked.
            try:
                self._tier_down(ctx, tag, fetched.error)
            except BaseException:
                self.release(claim)
                raise
            return claim
        raw = fetched.get(state.key)
        if raw != state.expected:
            mark = decode_mark(raw) if raw is not None and raw != ERASED else None
            if raw == ERASED or (mark is not None and not self._descends(ctx, *mark)):
                self.release(claim)
                if raw == ERASED:
                    refuse_erased(self.observer, tag)
                assert mark is not None
                self._refuse_stale(
                    ctx,
                    tag,
                    mark[2],
                    state.opened_digest,
                    f"this token (seq {ctx.seq}) was answered by another request while this "
                    f"one waited (the newest is seq {mark[0]}); use the newest token",
                    detail="race",
                    newest_seq=mark[0],
                )
        # Checked while another reply of this token streamed (a read let through), which
        # has ended without moving the mark: now this request's claim to answer.
        state.busy = False
        return claim

    def release(self, claim: Claim) -> None:
        """Drop a claim :meth:`claim` took, if its key still holds it. Never raises
        TierError: a release the tier fails is retried in the background
        (:data:`LATE_RELEASES`)."""
        release_claim(self.tier, claim)

    def renew(self, claim: Claim) -> bool:
        """Give ``claim`` a fresh ``CLAIM_TTL`` while its reply still streams. False
        when it was lost (expired, another took it) or the tier failed; the stream goes
        on either way, and its save's compare-and-set still decides."""
        return renew_claim(self.tier, claim)


__all__ = [
    "CLAIM_TTL",
    "DEFAULT_MARK_TTL",
    "ERASED",
    "LATE_RELEASES",
    "LEVELS",
    "MARK_TTL_MARGIN",
    "Claim",
    "ForkDetector",
    "LateReleases",
    "MarkState",
    "MonotonicGuard",
    "claim_key",
    "decode_mark",
    "decode_newest",
    "encode_mark",
    "encode_newest",
    "mark_key",
    "mark_ttl_for",
    "new_mark_id",
    "newest_context",
    "newest_key",
    "refuse_busy",
    "refuse_erased",
    "release_claim",
    "renew_claim",
    "session_claim_key",
    "stricter",
    "take_claim",
    "tombstone_ttl_for",
]
