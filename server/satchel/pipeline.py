"""The path of one request, as pure-ish steps around the codec and the overflow tier.

``load``: open (length cap, verify, expiry, bounded decompress, bounded unpack,
migrate), check the age policies, rehydrate overflowed turns.
``save``: apply lifecycle policies (turn cap, window, LLM-token budget), fit the byte
budget by overflowing (or, without a tier, trimming and summarizing), seal.

The Flask extension calls these two around the view; the benchmarks and non-Flask
callers can call them directly. Nothing here raises for a tier failure: it records a
degraded reason on the context and reports it to the observer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .app_schema import MetadataSchema
from .codec import Codec, Prepared, current_time
from .context import OVERFLOW_POLICY, Context, LifecycleAction, SegmentRef, Turn
from .errors import (
    BadToken,
    BudgetExceeded,
    InvalidContext,
    MigrationFailed,
    SatchelError,
    TierError,
)
from .lifecycle import LifecyclePolicy, apply_policies, check_age, drop_oldest, expires_at
from .lifecycle.groups import oldest_groups_covering, turn_groups
from .lifecycle.policy import apply_token_budget, llm_budget_excess
from .lifecycle.report import LifecycleReport, current_report
from .lifecycle.summarize import cut_summary, summarize
from .observe import NULL_OBSERVER, Observer, flag_degraded, tier_cause
from .schema import (
    SEQ_LIMIT,
    check_sealable,
    metadata_problem,
    values_walked_like,
    values_walked_once,
)
from .segments import TIER_UNAVAILABLE, merge_start

if TYPE_CHECKING:
    from .consistency import Claim
    from .segments import SegmentStore

Clock = Callable[[], float]

#: After an overflow the token is brought down to this share of the soft budget, so a
#: long conversation spills a chunk every few requests instead of a turn every request.
SPILL_TARGET = 0.7
MAX_FIT_ROUNDS = 12
MAX_SPILL_ROUNDS = 4
#: rounds after those that measure (bisect) instead of estimating
MEASURED_ROUNDS = 6
TAG_CACHE_SIZE = 4096
#: At most this many segment references in a token: spills merge with recent segments
#: (segments.merge_start), so references cannot grow the token in a long conversation.
MAX_SEGMENT_REFS = 6
#: References kept while they cannot be merged. When the tier does not answer reads
#: (the turns to merge are not in hand), turns past this stay inline as when the tier
#: refuses writes; when every segment is too large to merge, the oldest goes
#: (``overflow_cap``). Either way the token cannot grow by a reference per spill.
MAX_HELD_SEGMENT_REFS = 4 * MAX_SEGMENT_REFS
DEFAULT_SEGMENT_TTL = 30 * 86400.0


@dataclass(slots=True)
class SaveResult:
    token: str
    size: int
    timings: dict[str, float] = field(default_factory=dict)
    #: the context was fresh (never sealed before): this token starts its session.
    #: ``save(report_start=False)`` leaves ``session_started`` to the caller, who
    #: reports it (:meth:`Pipeline.session_started_reported`) once the token goes out.
    fresh: bool = False


def is_fresh(ctx: Context) -> bool:
    """Made by :meth:`Pipeline.new_context` and never sealed: not opened from a token
    (a 0.0 preview token may say seq 0 too) and not sealed yet in this request."""
    return ctx.seq == 0 and ctx.opened_kid is None


class Pipeline:
    """Runs the steps of one request around a view."""

    def __init__(
        self,
        codec: Codec,
        policy: LifecyclePolicy | None = None,
        *,
        segments: SegmentStore | None = None,
        observer: Observer = NULL_OBSERVER,
        clock: Clock = time.time,
        metadata_schema: MetadataSchema | None = None,
    ) -> None:
        self.codec = codec
        self.policy = policy or LifecyclePolicy()
        self.segments = segments
        #: the app's metadata version and migrations (satchel.app_schema)
        self.metadata_schema = metadata_schema or MetadataSchema()
        self.observer = observer
        self.clock = clock
        self._tags: dict[bytes, str] = {}
        # The policy a session that already keeps turns in the tier is trimmed with:
        # the window and the LLM-token budget move turns in fit_budget instead.
        self._spilling_policy = replace(self.policy, max_turns=None, max_llm_tokens=None)

    # -- naming sessions in logs without revealing them ---------------------------

    def session_tag(self, session_id: bytes) -> str:
        """A short keyed hash naming a session in logs and metrics exemplars."""
        tag = self._tags.get(session_id)
        if tag is None:
            if len(self._tags) >= TAG_CACHE_SIZE:
                self._tags.clear()  # a bounded memo; recomputing a tag is cheap
            tag = self._tags[session_id] = self.codec.session_tag(session_id)
        return tag

    # -- load -----------------------------------------------------------------------

    def new_context(self, now: float | None = None) -> Context:
        now = current_time(now, self.clock)
        ctx = Context.new(now=int(now))
        ctx.metadata_version = self.metadata_schema.version
        return ctx

    def load(
        self,
        token: str | None,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> Context:
        """Open ``token`` (or start a fresh context when there is none).

        Raises a :class:`~satchel.BadToken` subclass for a token that cannot be used.
        """
        now = current_time(now, self.clock)
        timings = {} if timings is None else timings
        if not token:
            return self.new_context(now)
        ctx = self.open_token(token, now=now, timings=timings)
        if ctx.overflow:
            self.rehydrate(ctx, timings)
        return ctx

    def _expiry_cause(self, facts: dict[str, Any]) -> str:
        """Why a token expired: ``idle``, ``max_age`` or ``token``.

        The envelope's expiry, checked first, is what the policies set at the last seal
        (:func:`~satchel.lifecycle.expires_at`): the idle TTL from then, or the maximum
        age when that came sooner. Its span from issue tells which (by the policy as it
        is now); any other span is the codec's own ``ttl``: ``token``.
        """
        reason = facts.get("reason")
        if isinstance(reason, str):  # check_age named it
            return reason
        expired_at, issued_at = facts.get("expired_at"), facts.get("issued_at")
        if not isinstance(expired_at, int) or not isinstance(issued_at, int):
            return "token"
        span = expired_at - issued_at
        idle, max_age = self.policy.idle_ttl, self.policy.max_age
        if idle is not None and abs(span - idle) <= 1:
            return "idle"
        if max_age is not None and 0 < span and (idle is None or span < idle):
            return "max_age"
        return "token"

    def open_token(self, token: str | bytes, *, now: float, timings: dict[str, float]) -> Context:
        """Open and age-check one token, reporting what happened (both modes use it)."""
        t0 = time.perf_counter()
        try:
            opened = self.codec.open_verbose(token, now=now)
            check_age(opened.context, self.policy, now, self.codec.limits.clock_skew)
            if opened.context.seq + 1 >= SEQ_LIMIT:
                # It opens, but no token can follow it: refused here, as a bad token,
                # before the view does (and a stream is paid for) what cannot be saved.
                # Only a key holder can make one: a real one would take 2**63 seals.
                raise InvalidContext("the token's sequence number is the last one a token carries")
            t1 = time.perf_counter()
            metadata_from = self.metadata_schema.upgrade(opened.context)
            if metadata_from is not None and metadata_problem(
                opened.context.metadata, self.codec.limits
            ):
                # What the app's migration returned must seal again: refused here, as a
                # failed migration (a 400, or a fresh context by policy), not after the
                # view ran, as every later request of the session would be (a 500).
                raise MigrationFailed(
                    f"the metadata migration from version {metadata_from} returned "
                    "metadata a token cannot carry (satchel.schema.metadata_problem "
                    "names the field)",
                    from_version=metadata_from,
                )
            opened.timings["migrate"] = opened.timings.get("migrate", 0.0) + (
                time.perf_counter() - t1
            )
        except BadToken as exc:
            # A refused token's response says how long opening it took too.
            timings["open"] = time.perf_counter() - t0
            if isinstance(exc, MigrationFailed):
                # The deployment's problem (a migration missing or raising), not bad
                # input: the version tells which migration to look at.
                self.observer.event(
                    # The message is Satchel's own: the versions and the error's type.
                    "refused",
                    reason=exc.code,
                    from_version=exc.facts.get("from_version"),
                    detail=exc.message,
                )
            else:
                self.observer.event("refused", reason=exc.code)
            if exc.code == "token_expired":
                self.observer.event("expired", reason=self._expiry_cause(exc.facts))
            raise
        timings.update(opened.timings)
        timings["open"] = time.perf_counter() - t0
        ctx = opened.context
        tag = self.session_tag(ctx.session_id)
        self.observer.event(
            "opened", session=tag, seq=ctx.seq, kid=opened.header.kid, mode=opened.header.mode
        )
        if ctx.opened_version != ctx.schema_version:
            self.observer.event(
                "migrated",
                session=tag,
                from_version=ctx.opened_version,
                to_version=ctx.schema_version,
            )
        if metadata_from is not None:
            self.observer.event(
                "metadata_migrated",
                session=tag,
                from_version=metadata_from,
                to_version=ctx.metadata_version,
            )
        for step in ("open", "verify", "decompress", "unpack", "migrate"):
            self.observer.timing(step, timings[step])
        return ctx

    def rehydrate(self, ctx: Context, timings: dict[str, float]) -> None:
        """Fetch overflowed turns in one round trip; on failure, flag and carry on.

        References stay in the token either way, so turns come back if the tier
        recovers before they expire.
        """
        tag = self.session_tag(ctx.session_id)
        t0 = time.perf_counter()
        if self.segments is None:
            flag_degraded(self.observer, ctx.degraded, "tier_unavailable", session=tag)
            return
        result = self.segments.read(ctx)
        timings["rehydrate"] = time.perf_counter() - t0
        self.observer.timing("rehydrate", timings["rehydrate"])
        ctx.rehydrated = list(result.turns)
        ctx.unreadable = list(result.missing)
        if result.unconfirmed:
            # The tier failed since these were cached and may have come back without
            # them: write them back, so every process (not only this one) has them.
            restored = self.segments.restore(
                ctx, result.unconfirmed, self._remaining_lifetime(ctx, self.clock())
            )
            if restored:
                self.observer.event("segments_restored", session=tag, count=restored)
        if result.turns:
            self.observer.event(
                "rehydrated", session=tag, turns=len(result.turns), from_cache=result.from_cache
            )
        for reason in dict.fromkeys(reason for _ref, reason in result.missing):
            missing = sum(ref.turns for ref, r in result.missing if r == reason)
            # The tier's failure for tier_unavailable; the others are about the segment.
            cause = {"detail": tier_cause(result.error)} if reason == TIER_UNAVAILABLE else {}
            flag_degraded(self.observer, ctx.degraded, reason, session=tag, turns=missing, **cause)

    # -- save -----------------------------------------------------------------------

    def claim(self, ctx: Context) -> Claim | None:
        """Reserve what a streamed reply will save, before its first text: only the
        server-side modes, whose saves replace one stored copy, need one (a client-held
        token's is the monotonic guard's). The claim to :meth:`release`, or None."""
        return None

    def release(self, claim: Claim) -> None:
        """Drop a claim :meth:`claim` took."""

    def renew(self, claim: Claim) -> bool:
        """Extend a claim :meth:`claim` took, while its reply still streams; whether it
        was still held."""
        return False

    def save(
        self,
        ctx: Context,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
        report_start: bool = True,
    ) -> SaveResult:
        """Apply lifecycle policies, fit the byte budget, and seal.

        ``report_start=False``: a fresh context's ``session_started`` is the caller's
        to report, once the token really goes out (the Flask extension moves a
        ``monotonic`` mark first, and a tier that refuses it sends no token)."""
        now = current_time(now, self.clock)
        timings = {} if timings is None else timings
        tag = self.session_tag(ctx.session_id)
        fresh = is_fresh(ctx)
        ctx.last_active = max(ctx.last_active, int(now))
        timer = time.perf_counter

        # In the metadata shape every replica can read (app_schema, rolling deploys).
        with (
            self.seal_failures_reported(tag),
            self.metadata_schema.writing(ctx),
            values_walked_once(ctx),
            self.malformed_turns_named(ctx),
        ):
            prepared = self._trim_and_fit(ctx, now, tag, timings)
            t2 = timer()
            token, raw_size = self.codec.seal_verbose(
                ctx, expires_at=expires_at(ctx, self.policy, now), prepared=prepared
            )
        timings["seal"] = timer() - t2
        self.observer.token(size=len(token), raw_size=raw_size, turns=len(ctx.turns))
        self.issued_reported(ctx, tag, len(token), fresh=fresh and report_start)
        for step in ("trim", "overflow", "seal"):
            self.observer.timing(step, timings[step])
        return SaveResult(token, len(token), timings, fresh=fresh)

    def issued_reported(self, ctx: Context, tag: str, size: int, *, fresh: bool) -> None:
        """``issued`` for a token just sealed, and ``session_started`` when ``ctx`` was
        :func:`is_fresh` before it: a fresh context that never gets a token (a
        read-only request without one, a page load, a bot) started nothing, and
        counting it at creation made every page load a session."""
        if fresh:
            self.session_started_reported(ctx)
        self.observer.event("issued", session=tag, seq=ctx.seq, bytes=size, turns=len(ctx.turns))

    def session_started_reported(self, ctx: Context) -> None:
        """``session_started`` for ``ctx``, whose first token goes out now."""
        self.observer.event("session_started", session=self.session_tag(ctx.session_id))

    def reseal(self, ctx: Context, *, now: float | None = None) -> SaveResult:
        """Seal ``ctx`` again, as it is, right after :meth:`save` sealed it.

        For a change that only drops fields (an unset monotonic mark): the context was
        fitted to its budget a moment ago, so no policy runs, and the token it replaces
        was never sent, so it is not counted as issued.
        """
        now = current_time(now, self.clock)
        with self.metadata_schema.writing(ctx):
            token, _raw = self.codec.seal_verbose(ctx, expires_at=expires_at(ctx, self.policy, now))
        return SaveResult(token, len(token))

    def _trim_and_fit(
        self, ctx: Context, now: float, tag: str, timings: dict[str, float]
    ) -> Prepared | None:
        """The lifecycle policies, then the byte budget; reports what each did."""
        limits_spill = self._limits_spill(ctx)
        with self.lifecycle_reported(ctx, tag, timings):
            policy = self._spilling_policy if limits_spill else self.policy
            self.apply_policies_reported(ctx, policy, now, tag, timings)
            t1 = time.perf_counter()
            prepared = self.fit_budget(ctx, now, tag, limits_spill=limits_spill)
            timings["overflow"] = time.perf_counter() - t1
        return prepared

    def _limits_spill(self, ctx: Context) -> bool:
        """Whether turns past the window or the LLM-token budget move to the tier.

        Only the byte budget starts a session's use of the tier (issue 3): a session
        with no overflowed turns, however long, drops and summarizes what the window
        and the LLM-token budget remove, and never needs the tier. Once the byte budget
        has moved turns there, the window's and the LLM budget's turns follow them: a
        dropped turn would leave a hole between the tier's turns and the token's, and
        while the tier refuses writes they wait in the token (up to the hard cap) like
        the byte budget's, and are reported as data loss only past it.
        """
        return self.segments is not None and bool(ctx.overflow)

    @contextmanager
    def malformed_turns_named(self, ctx: Context) -> Iterator[None]:
        """Around the steps that read the turns before the codec checks them (the
        policies' counters and summarizer, the budget's grouping): a turn the view built
        wrongly (a dict where a ToolCall belongs) fails in there with an AttributeError,
        raised as the ContextNotSerializable that sealing would name it with."""
        try:
            yield
        except (AttributeError, TypeError, KeyError):
            check_sealable(ctx, self.codec.limits)
            raise

    @contextmanager
    def seal_failures_reported(self, tag: str) -> Iterator[None]:
        """Around a save's policies and seal: a refusal counted as one, a failed seal
        (BudgetExceeded, ContextNotSerializable: an app bug, SatchelSealFailures) as
        that."""
        try:
            yield
        except BadToken as exc:
            # Refused, not a failed seal (an erased session's spill met its tombstone):
            # counted with the other refusals, not as an app bug.
            self.observer.event("refused", session=tag, reason=exc.code)
            raise
        except SatchelError as exc:  # no token
            self.observer.event("seal_failed", session=tag, error=exc.code)
            raise

    @contextmanager
    def lifecycle_reported(
        self, ctx: Context, tag: str, timings: dict[str, float]
    ) -> Iterator[None]:
        """Around the lifecycle steps: the summarizers' time (its own step, for an
        LLM-backed one above all), the turns summarized, and an app hook that failed
        and was replaced by its fallback (``summarizer_failed``,
        ``token_counter_failed``): flagged in the response and counted, as every
        degraded path is."""
        report = LifecycleReport()
        reset = current_report.set(report)
        summarized_before = ctx.lifecycle.summarized
        try:
            yield
        finally:
            current_report.reset(reset)
            if report.summarize_seconds:
                timings["summarize"] = sum(report.summarize_seconds)
                self.observer.timing("summarize", timings["summarize"])
            for reason, detail in report.faults.items():
                flag_degraded(self.observer, ctx.degraded, reason, session=tag, detail=detail)
        if ctx.lifecycle.summarized > summarized_before:
            self.observer.event(
                "summarized", session=tag, turns=ctx.lifecycle.summarized - summarized_before
            )

    def apply_policies_reported(
        self,
        ctx: Context,
        policy: LifecyclePolicy,
        now: float,
        tag: str,
        timings: dict[str, float],
    ) -> None:
        """The lifecycle policies, timed (``trim``), each trim reported by policy."""
        t0 = time.perf_counter()
        dropped_before = dict(ctx.lifecycle.dropped)
        apply_policies(ctx, policy, now)
        timings["trim"] = time.perf_counter() - t0
        for reason, total in ctx.lifecycle.dropped.items():
            turns = total - dropped_before.get(reason, 0)
            if turns:
                self.observer.event("trimmed", session=tag, reason=reason, turns=turns)

    def fit_budget(
        self, ctx: Context, now: float, tag: str, *, limits_spill: bool = False
    ) -> Prepared | None:
        """Bring the token under the soft byte budget (and, with ``limits_spill``, the
        window and the LLM-token budget), then make sure it is never longer than the
        hard cap.

        ``limits_spill``: the session already keeps turns in the tier
        (:meth:`_limits_spill`), so turns past the window or the LLM-token budget
        move there too, like turns past the byte budget, instead of being dropped.

        With a tier: the oldest whole groups move to a segment. If the write fails they
        stay inline up to the hard cap; past it the oldest are summarized and dropped,
        and that is reported as data loss with the count.
        Without a tier: the oldest groups are summarized and dropped (a policy, not a loss).
        Both keep the newest group in the token; only the hard cap can move it
        (:meth:`_enforce_ceiling`).

        Returns the last measurement (:meth:`Codec.prepare`) when nothing changed the
        context after it, so the seal uses the bytes that were measured; else None.
        """
        soft = self.policy.max_token_bytes
        measured: Prepared | None = None
        write_failed = self._fit_turn_limit(ctx, now, tag)
        if self.segments is None:
            if soft is not None:
                measured = self.codec.prepare(ctx)
                if measured.size > soft:
                    measured = self._drop_to(ctx, soft, now, tag, "byte_budget", measured)
            return self._enforce_ceiling(ctx, measured, now, tag, write_failed=False)
        self._forget_lost_segments(ctx, now, tag)
        window = self.policy.max_turns
        # Without a soft budget only the window moves turns: no need to measure.
        measured = self.codec.prepare(ctx) if soft is not None else None
        size = measured.size if measured is not None else 0
        target = int(soft * SPILL_TARGET) if soft is not None else 0
        rounds = MAX_SPILL_ROUNDS + MEASURED_ROUNDS if not write_failed else 0
        for round_ in range(rounds):
            over_budget = soft is not None and size > soft
            past_window = self._past_limits(ctx, window) if limits_spill else 0
            if not (over_budget or past_window > 0):
                break
            groups = turn_groups(ctx.turns)
            if not over_budget:
                estimate = 0
            elif round_ < MAX_SPILL_ROUNDS:
                estimate = self._turns_to_remove(ctx, groups, size, target)
            else:  # the estimates fell short (text that compresses unlike prose): measure
                estimate = self._turns_to_fit(ctx, groups, target)
            count = max(
                estimate,
                oldest_groups_covering(ctx.turns, past_window, groups) if past_window > 0 else 0,
            )
            count = min(count, groups[-1][0]) if groups else 0  # the newest group stays
            if not count:
                break  # only the newest group is left: nothing more can move
            if not self._spill(ctx, count, now, tag):
                write_failed = True
                break
            measured = self.codec.prepare(ctx) if soft is not None else None
            size = measured.size if measured is not None else 0
        if write_failed and limits_spill:
            # The tier refused the write: the LLM-token budget still holds (what the model
            # is sent must fit its context), but what it drops the tier would have kept:
            # counted and reported as data loss, as past the hard cap.
            lost = len(apply_token_budget(ctx, self.policy, now, reason="data_loss"))
            if lost:
                self._report_loss(ctx, lost, tag)
                measured = self.codec.prepare(ctx) if soft is not None else None
                size = measured.size if measured is not None else 0
        if write_failed and soft is not None:
            # The tier refused the write: hold turns inline up to the hard cap, then report.
            hold = self.policy.hard_max_token_bytes or soft
            if size > hold:
                measured = self._drop_to(ctx, hold, now, tag, "data_loss", measured)
        return self._enforce_ceiling(ctx, measured, now, tag, write_failed=write_failed)

    def _past_limits(self, ctx: Context, window: int | None) -> int:
        """How many of the oldest turns a session that keeps turns in the tier moves
        there for the window and the LLM-token budget: none while they hold, else down
        to ``SPILL_TARGET`` of them, as the byte budget spills down to 70 % of itself.
        Moving just the excess wrote a segment on every exchange past the window."""
        count = 0
        if window is not None and len(ctx.turns) > window:
            count = len(ctx.turns) - int(window * SPILL_TARGET)
        budget = self.policy.max_llm_tokens
        if budget is not None:
            target = int(budget * SPILL_TARGET)
            count = max(count, llm_budget_excess(ctx, self.policy, down_to=target))
        return count

    def _fit_turn_limit(self, ctx: Context, now: float, tag: str) -> bool:
        """Never more turns than a token opens with (``Limits.max_array_len``).

        Measuring such a context would refuse it (ContextNotSerializable), and the
        budgets below could not move a turn: a view that appends past the limit, or a
        token minted with the app's own key that already holds it, made the request a
        500. The oldest groups past the limit move to the tier; without one, or when it
        refuses the write, they are summarized and dropped, as the byte budget would
        (reported as data loss when the tier refused). Returns True if the tier refused.
        """
        excess = len(ctx.turns) - self.codec.limits.max_array_len
        if excess <= 0:
            return False
        count = oldest_groups_covering(ctx.turns, excess)
        if self.segments is not None and self._spill(ctx, count, now, tag):
            return False
        write_failed = self.segments is not None
        reason = "data_loss" if write_failed else "byte_budget"
        dropped = len(
            drop_oldest(ctx, count, policy=reason, summarizer=self.policy.summarizer, now=now)
        )
        if write_failed:
            ctx.lifecycle.lost += dropped
            self._report_loss(ctx, dropped, tag, counted=True)
        else:
            self.observer.event("trimmed", session=tag, reason=reason, turns=dropped)
        return write_failed

    def _spill(self, ctx: Context, count: int, now: float, tag: str) -> bool:
        """Move the oldest ``count`` turns to a segment; False if the tier refused.

        Turns that pack past what one segment holds (estimates that missed: tool-call
        arguments, text that compresses unlike prose) move in part: the older half of
        their groups, recursively; the caller measures again and moves more. One group
        too large for any segment (an agent's exchange of thirty-odd tool results of
        32,000 characters: over 1 MiB packed) is summarized and dropped as the byte
        budget drops it without a tier, and True returned: it raised BudgetExceeded,
        a 413 that lost the whole exchange and its reply, where an app without a tier
        answered 200. No token or segment can carry it; the tier being there, or
        down, changes nothing for it.
        """
        assert self.segments is not None
        spill = ctx.turns[:count]
        try:
            written = self._write_segment(ctx, spill, now, tag)
        except BudgetExceeded:
            groups = turn_groups(spill)
            if len(groups) <= 1:
                dropped = drop_oldest(
                    ctx, count, policy="byte_budget", summarizer=self.policy.summarizer, now=now
                )
                self.observer.event(
                    "trimmed", session=tag, reason="byte_budget", turns=len(dropped)
                )
                return True
            return self._spill(ctx, groups[len(groups) // 2 - 1][1], now, tag)
        if written is None:
            return False
        ref, start = written
        del ctx.turns[:count]
        # The new segment holds the turns of the references from ``start`` on, then the
        # spill: it replaces them, and their stored copies are retired (after a grace
        # period, for tokens from before the merge that are still in flight).
        replaced = ctx.overflow[start:]
        ctx.overflow = [*ctx.overflow[:start], ref]
        ctx.rehydrated = [*ctx.rehydrated, *spill]
        if replaced:
            self.segments.retire(ctx, replaced)
        # The running summary always covers what left the token.
        ctx.summary = summarize(self.policy.summarizer, spill, ctx.summary)
        ctx.lifecycle.summarized += len(spill)
        ctx.lifecycle.record(LifecycleAction(OVERFLOW_POLICY, "overflowed", len(spill), now))
        self.observer.event("overflowed", session=tag, turns=len(spill), bytes=ref.size)
        return True

    def _enforce_ceiling(
        self, ctx: Context, measured: Prepared | None, now: float, tag: str, *, write_failed: bool
    ) -> Prepared | None:
        """No token longer than the hard cap leaves here, whatever the newest exchange holds.

        The budgets above keep the newest group in the token, so one very large exchange
        (a pasted file, a long tool result) could make a token that no proxy or browser
        on the way carries: gunicorn refuses header fields over 8190 bytes and nginx
        over 8 KB before the app sees them, and a browser silently drops a cookie over
        4096. The next request would then fail outside Satchel's reach. Here the newest
        group moves too: to the tier when it takes the write (nothing is lost, the next
        request rehydrates it); otherwise it is summarized and dropped, as the byte
        budget (no tier) or as reported data loss (tier refusing writes). If the summary,
        pinned items and metadata alone are over the cap, BudgetExceeded: that is the
        app's state, not something a trim can fix.
        """
        # Never past what this codec opens either (SATCHEL_TOKEN_LIMIT): such a token
        # would be refused as token_too_large on the next request.
        limit = self.codec.limits.max_token_bytes
        hard = self.policy.hard_max_token_bytes
        hard = limit if hard is None else min(hard, limit)
        if measured is None:
            measured = self.codec.prepare(ctx)
        if measured.size <= hard:
            return self._fit_payload_cap(ctx, measured, now, tag, write_failed=write_failed)
        if self.segments is not None and not write_failed and ctx.turns:
            # Older exchanges move first, keeping the newest, as the soft budget does;
            # then, if the summary is the large part, its oldest lines go; the newest
            # exchange moves only if the token is still over the cap.
            groups = turn_groups(ctx.turns)
            older_turns = groups[-1][0] if groups else 0
            if older_turns and not self._spill(ctx, older_turns, now, tag):
                write_failed = True
            elif older_turns:
                measured = self.codec.prepare(ctx)
                if measured.size <= hard:
                    return self._fit_payload_cap(ctx, measured, now, tag, write_failed=False)
            if not write_failed and ctx.summary and self._summary_outweighs_newest(ctx):
                measured = self._shorten_summary(ctx, measured, hard, now, tag)
                if measured.size <= hard:
                    return self._fit_payload_cap(ctx, measured, now, tag, write_failed=False)
            if not write_failed and ctx.turns:
                if self._spill(ctx, len(ctx.turns), now, tag):
                    measured = self.codec.prepare(ctx)
                    if measured.size <= hard:
                        return self._fit_payload_cap(ctx, measured, now, tag, write_failed=False)
                else:
                    write_failed = True
        reason = "data_loss" if write_failed else "byte_budget"
        if len(turn_groups(ctx.turns)) > 1:
            # Older exchanges go first, before the summary is cut (which would leave
            # the token with turns whose summary no longer says what came before).
            dropped_to = self._drop_to(ctx, hard, now, tag, reason, measured)
            measured = dropped_to if dropped_to is not None else self.codec.prepare(ctx)
            if measured.size <= hard:
                return self._fit_payload_cap(ctx, measured, now, tag, write_failed=write_failed)
        if ctx.summary and self._summary_outweighs_newest(ctx):
            # The summary is what is large (an app's own summarizer): its oldest part
            # goes before the newest exchange does.
            measured = self._shorten_summary(ctx, measured, hard, now, tag)
            if measured.size <= hard:
                return self._fit_payload_cap(ctx, measured, now, tag, write_failed=write_failed)
        prepared = self._drop_to(ctx, hard, now, tag, reason, measured, keep_newest=False)
        if prepared is None:
            prepared = self.codec.prepare(ctx)
        if prepared.size > hard and ctx.summary:
            prepared = self._shorten_summary(ctx, prepared, hard, now, tag)
        if prepared.size > hard:
            raise BudgetExceeded(
                f"the context is {prepared.size} bytes with no turns left to move: its "
                f"pinned items, metadata and {len(ctx.overflow)} overflow references "
                f"alone exceed the hard cap of {hard} "
                "bytes (SATCHEL_HARD_MAX_TOKEN_BYTES, or SATCHEL_TOKEN_LIMIT if lower)",
                size=prepared.size,
                limit=hard,
            )
        return prepared

    @staticmethod
    def _summary_outweighs_newest(ctx: Context) -> bool:
        """The summary weighs at least as much in the token as the newest exchange.

        Both by :func:`_turn_weight`'s measure (prose at a third): weighed by its text
        alone, an exchange whose bytes are in opaque blocks or tool arguments ("ok",
        "Sure." and 12 KB of encrypted reasoning) lost to any summary, which was cut to
        a stub before the exchange moved anyway.
        """
        groups = turn_groups(ctx.turns)
        newest = sum(_turn_weight(t) for t in ctx.turns[groups[-1][0] :]) if groups else 0
        return len(ctx.summary) / 3 >= newest

    def _fit_payload_cap(
        self, ctx: Context, prepared: Prepared, now: float, tag: str, *, write_failed: bool
    ) -> Prepared:
        """Keep the packed context within what the codec decompresses on open.

        A token can be small and still unpack past ``Limits.max_decompressed_bytes``
        (1 MiB): thirty repetitive CSV exports of 30,000 characters make an 869-byte
        token. Sealing refused it (BudgetExceeded) while dropping an old exchange would
        have fixed it: here turns move (to the tier, else summarized and dropped, the
        newest exchange last) until it fits.
        """
        cap = self.codec.limits.max_decompressed_bytes
        if len(prepared.payload) <= cap or not ctx.turns:
            return prepared
        if self.segments is not None and not write_failed:
            for _ in range(MAX_FIT_ROUNDS):
                groups = turn_groups(ctx.turns)
                if len(prepared.payload) <= cap or not groups:
                    return prepared
                # As many of the oldest groups as the excess needs (a group at a time
                # took more rounds than there are: an imported history of fifty 30 KB
                # exports ended in turns dropped while the tier took every write), but
                # no more than half the cap at once: a segment opens with the same limits.
                count = _groups_weighing(
                    ctx.turns, groups, len(prepared.payload) - cap, ceiling=cap // 2
                )
                if len(groups) > 1:
                    count = min(count, groups[-1][0])  # the newest exchange goes last
                if not self._spill(ctx, count, now, tag):
                    write_failed = True
                    break
                prepared = self.codec.prepare(ctx)
        reason = "data_loss" if write_failed else "byte_budget"
        removed = 0
        for _ in range(len(ctx.turns)):
            if len(prepared.payload) <= cap or not ctx.turns:
                break
            dropped = drop_oldest(ctx, 1, policy=reason, summarizer=self.policy.summarizer, now=now)
            removed += len(dropped)
            if reason == "data_loss":
                ctx.lifecycle.lost += len(dropped)
            prepared = self.codec.prepare(ctx)
        if removed and reason == "data_loss":
            self._report_loss(ctx, removed, tag, counted=True)
        elif removed:
            self.observer.event("trimmed", session=tag, reason=reason, turns=removed)
        return prepared

    def _shorten_summary(
        self, ctx: Context, prepared: Prepared, hard: int, now: float, tag: str
    ) -> Prepared:
        """Keep the newest part of a summary too long for the hard cap.

        A summarizer of the app's own (an LLM asked for "a summary", no length given)
        can outgrow any budget. Refusing to seal would fail this request and every one
        after it, since the client keeps the token it sent; so the summary loses its
        oldest part instead, and the lifecycle record says how much.
        """
        original = len(ctx.summary)
        action = LifecycleAction("summary_cap", "truncated", 0, now, "")
        ctx.lifecycle.record(action)  # before measuring: the token carries the record
        for _ in range(MAX_FIT_ROUNDS):
            if prepared.size <= hard or not ctx.summary:
                break
            ctx.summary = cut_summary(ctx.summary, int(len(ctx.summary) * hard / prepared.size))
            action.detail = f"{original - len(ctx.summary)} characters"
            prepared = self.codec.prepare(ctx)
        self.observer.event("trimmed", session=tag, reason="summary_cap", turns=0)
        return prepared

    def _report_loss(self, ctx: Context, lost: int, tag: str, *, counted: bool = False) -> None:
        if not counted:
            ctx.lifecycle.lost += lost
        self.observer.event("data_loss", session=tag, turns=lost)
        flag_degraded(self.observer, ctx.degraded, "data_loss", session=tag, turns=lost)

    def _forget_lost_segments(self, ctx: Context, now: float, tag: str) -> None:
        """Drop references the tier answered for and does not have (or holds damaged).

        A reference is kept while the tier is unreachable, so its turns come back when
        it does. Once references pile up, those the tier definitely lost (missing,
        corrupt, foreign) are dropped and their turns counted and reported as lost,
        so a lost segment cannot grow the token without bound.
        """
        if len(ctx.overflow) < MAX_SEGMENT_REFS or not ctx.unreadable:
            return
        gone = [ref for ref, reason in ctx.unreadable if reason != "tier_unavailable"]
        if not gone:
            return
        ids = {id(ref) for ref in gone}
        ctx.overflow = [ref for ref in ctx.overflow if id(ref) not in ids]
        ctx.unreadable = [(r, why) for r, why in ctx.unreadable if id(r) not in ids]
        lost = sum(ref.turns for ref in gone)
        ctx.lifecycle.record(LifecycleAction("data_loss", "lost", lost, now, "segment lost"))
        self._report_loss(ctx, lost, tag)

    def _write_segment(
        self, ctx: Context, spill: list[Turn], now: float, tag: str
    ) -> tuple[SegmentRef, int] | None:
        """Write ``spill``, merged with the most recent segments when that is due.

        Returns the new reference and the index of the first existing reference it
        replaces (``len(ctx.overflow)`` when it replaces none), or None when the tier
        refused the write (flagged and reported here).
        """
        assert self.segments is not None
        ttl = self._remaining_lifetime(ctx, now)
        kept = len(ctx.overflow)
        if kept >= MAX_HELD_SEGMENT_REFS and not self._can_merge(ctx):
            # Reads failed: that is why nothing merges.
            flag_degraded(self.observer, ctx.degraded, "tier_unavailable", session=tag, refs=kept)
            return None
        try:
            if self._can_merge(ctx):
                start = merge_start([r.turns for r in ctx.overflow], len(spill), MAX_SEGMENT_REFS)
                start = self._first_mergeable(ctx, spill, start)
                while start < kept:
                    offset = sum(r.turns for r in ctx.overflow[:start])
                    try:
                        merged = [*ctx.rehydrated[offset:], *spill]
                        return self.segments.write(ctx, merged, ttl, now=now), start
                    except BudgetExceeded:
                        # Over one segment's size cap: merge fewer, the newest (and
                        # smallest) ones, before appending one more reference.
                        start += 1
            ref = self.segments.write(ctx, spill, ttl, now=now)
            if kept >= MAX_HELD_SEGMENT_REFS and self._can_merge(ctx):
                # Written: only now may the oldest go (a failed write changes nothing).
                self._forget_oldest_segment(ctx, now, tag)
            return ref, len(ctx.overflow)
        except TierError as exc:
            flag_degraded(
                self.observer,
                ctx.degraded,
                "tier_write_failed",
                session=tag,
                error=exc.code,
                detail=tier_cause(exc),
            )
            return None

    def _first_mergeable(self, ctx: Context, spill: list[Turn], start: int) -> int:
        """The first of ``ctx.overflow[start:]`` from which a merge can fit one segment.

        A merge that packs past the segment size cap raises BudgetExceeded only after
        packing megabytes of turns, and sessions of long turns meet it on every spill
        (each segment near the cap). Their text alone is a lower bound on what they pack
        to (a str's length never exceeds its UTF-8 length), so candidates certain not
        to fit are skipped here without packing them.
        """
        assert self.segments is not None
        cap = self.segments.codec.limits.max_decompressed_bytes  # what write() refuses past
        refs = ctx.overflow
        total = sum(_text_size(t) for t in spill)
        ends = [0]
        for ref in refs:
            ends.append(ends[-1] + ref.turns)
        rehydrated = ctx.rehydrated
        # From the newest reference back: the smallest start still within the cap.
        first = len(refs)
        for j in range(len(refs) - 1, start - 1, -1):
            total += sum(_text_size(t) for t in rehydrated[ends[j] : ends[j + 1]])
            if total > cap:
                break
            first = j
        return first

    def _forget_oldest_segment(self, ctx: Context, now: float, tag: str) -> None:
        """Let the oldest reference go, so the token's references stay bounded.

        Reached when every overflowed turn is in hand but nothing merges: each segment
        is near the size cap one segment may have (turns of several kilobytes fill it
        in a few dozen exchanges). The history the tier keeps for a context is then
        bounded, like the window bounds the token: the oldest segment's turns are
        covered by the running summary (written when they overflowed), recorded as
        dropped by ``overflow_cap`` (a policy, not a loss), and the segment retired.
        """
        assert self.segments is not None
        oldest = ctx.overflow.pop(0)
        if len(ctx.rehydrated) >= oldest.turns:
            ctx.rehydrated = ctx.rehydrated[oldest.turns :]
        ctx.lifecycle.record(
            LifecycleAction("overflow_cap", "dropped", oldest.turns, now, "oldest segment")
        )
        self.segments.retire(ctx, [oldest])
        self.observer.event("trimmed", session=tag, reason="overflow_cap", turns=oldest.turns)

    @staticmethod
    def _can_merge(ctx: Context) -> bool:
        """Merge when references have piled up and every overflowed turn is in hand
        (merging rewrites some of them). Until then each spill is its own segment."""
        return (
            len(ctx.overflow) >= MAX_SEGMENT_REFS
            and not ctx.unreadable
            and len(ctx.rehydrated) == ctx.overflowed_turns
        )

    def _drop_to(
        self,
        ctx: Context,
        budget: int,
        now: float,
        tag: str,
        reason: str,
        prepared: Prepared | None = None,
        *,
        keep_newest: bool = True,
    ) -> Prepared | None:
        """Summarize and drop the oldest groups until the token fits ``budget``, and
        report it: as a trim by ``reason``, or, for ``"data_loss"``, as reported loss.

        ``prepared`` is a measurement of ``ctx`` as it is now, if the caller has one.
        The newest group stays unless ``keep_newest`` is False (the hard cap).
        Returns the last measurement if it is still valid, else None (measure again).
        """
        removed = 0
        for round_ in range(MAX_FIT_ROUNDS + MEASURED_ROUNDS):
            if prepared is None:
                prepared = self.codec.prepare(ctx)
            size = prepared.size
            groups = turn_groups(ctx.turns)
            if size <= budget or len(groups) <= (1 if keep_newest else 0):
                break
            if round_ < MAX_FIT_ROUNDS:
                # Only the newest group left: it goes whole (never part of a group).
                count = self._turns_to_remove(ctx, groups, size, budget) or len(ctx.turns)
            else:  # the estimates fell short: measure instead
                count = self._turns_to_fit(ctx, groups, budget, keep_newest=keep_newest)
            dropped = len(
                drop_oldest(ctx, count, policy=reason, summarizer=self.policy.summarizer, now=now)
            )
            prepared = None  # the context changed (rounds may run out: measure again)
            removed += dropped
            if reason == "data_loss":
                # Counted before the next measure: the count is in the token too, and a
                # bigger number can make it a byte longer.
                ctx.lifecycle.lost += dropped
        if removed and reason == "data_loss":
            self._report_loss(ctx, removed, tag, counted=True)  # changes no sealed field
        elif removed:
            self.observer.event("trimmed", session=tag, reason=reason, turns=removed)
        return prepared

    def _turns_to_fit(
        self,
        ctx: Context,
        groups: list[tuple[int, int]],
        budget: int,
        *,
        keep_newest: bool = True,
    ) -> int:
        """The fewest oldest turns, in whole groups, whose removal measures within
        ``budget``: a bisection over group boundaries, each step one measurement of the
        context without them (the summary's growth is not in it: the caller measures
        again). Used when the weight estimates fall short round after round: text that
        compresses far better or worse than prose (pasted logs, CJK) misleads them.
        The newest group stays unless ``keep_newest`` is False."""
        ends = [end for _start, end in groups]
        if keep_newest:
            ends = ends[:-1]
        if not ends:
            return 0
        trial = copy.copy(ctx)
        lo, hi = 0, len(ends) - 1  # the answer is an index into ends; hi always fits or is last
        with values_walked_like(trial, ctx):  # its values are ctx's: walked already
            while lo < hi:
                mid = (lo + hi) // 2
                trial.turns = ctx.turns[ends[mid] :]
                if self.codec.prepare(trial).size <= budget:
                    hi = mid
                else:
                    lo = mid + 1
        return ends[lo]

    @staticmethod
    def _turns_to_remove(
        ctx: Context, groups: list[tuple[int, int]], size: int, target: int
    ) -> int:
        """Estimate how many oldest turns to remove to get from ``size`` to ``target``,
        weighting turns by their text length; always leaves the newest group."""
        if len(groups) <= 1:
            return 0
        weights = [_turn_weight(t) for t in ctx.turns]
        total = sum(weights)
        excess = (size - target) / size * total
        removed = 0.0
        count = 0
        last_start = groups[-1][0]
        for _start, end in groups:
            if removed >= excess or end > last_start:
                break
            removed += sum(weights[_start:end])
            count = end
        return count

    def _remaining_lifetime(self, ctx: Context, now: float) -> float:
        """How long a segment must live: as long as the session can, however active.

        The idle TTL moves with every request, so it cannot bound a segment written
        now; the maximum age can, plus the clock skew the age check allows (the token
        opens that much past it, and its segments must still be there: they expired
        exactly at the maximum age, and the session's last 30 s read them as
        missing). Without one, segments live ``DEFAULT_SEGMENT_TTL``.
        """
        if self.policy.max_age is not None:
            end = ctx.created_at + self.policy.max_age + self.codec.limits.clock_skew
            return max(60.0, end - now)
        return DEFAULT_SEGMENT_TTL


def _text_size(turn: Turn) -> int:
    """A lower bound on the bytes ``turn`` packs to: its content and opaque blocks'
    data (a str's length is at most its UTF-8 length; msgpack adds to both)."""
    return len(turn.content) + sum(len(b.data) for b in turn.blocks)


def _packed_weight(turn: Turn) -> int:
    """About the bytes ``turn`` packs to, before compression: its text, opaque blocks,
    and tool calls' ids, names and arguments (a turn of 30 KB of arguments and no text
    weighed 16 bytes, and a whole history moved into one segment too large to write)."""
    weight = 16 + _text_size(turn)
    for call in turn.tool_calls:
        args = call.arguments
        weight += 16 + len(call.id) + len(call.name)
        weight += len(args) if isinstance(args, str) else len(repr(args))
    return weight


def _turn_weight(turn: Turn) -> float:
    """A turn's rough share of the token, for estimating how many turns to move.

    Prose compresses about 3x against the dictionary; opaque blocks (signatures,
    encrypted reasoning: random bytes in base64) and tool arguments barely do. Weighing
    text alone made a context whose recent turns carry signed thinking blocks look
    lighter than it is: the estimate fell short round after round, and the rounds ran
    out with the token over its budget.
    """
    # What the turn packs to, its prose counted at a third.
    return _packed_weight(turn) - len(turn.content) * 2 / 3


def _groups_weighing(
    turns: list[Turn], groups: list[tuple[int, int]], excess: int, *, ceiling: int
) -> int:
    """How many leading turns, in whole groups, pack to about ``excess`` bytes (by
    :func:`_packed_weight`), at least one group and at most ``ceiling`` bytes unless a
    single group is larger."""
    weight = 0
    end = groups[0][1]
    for start, stop in groups:
        group = sum(_packed_weight(t) for t in turns[start:stop])
        if start and (weight >= excess or weight + group > ceiling):
            break
        weight += group
        end = stop
    return end


__all__ = ["Pipeline", "SaveResult"]
