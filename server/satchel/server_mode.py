"""Server-side modes behind the same API: ``server`` (Redis) and ``memory`` (in-process).

The context lives in a tier under a random session id; the client carries only that
id, signed with itsdangerous (``sv1.<id>.<signature>``) in the same header or cookie a
token would use. The stored bytes are the same sealed token the client mode would
send, so lifecycle, migrations and expiry work unchanged.

This is how server-side session stores (Flask-Session and friends) behave, including
their weak spot: when the store is down, the conversation is unavailable. Satchel
answers 503 ``tier_unavailable`` quickly (timeouts and the breaker) instead of a 500
or a hang. Unlike them, a save is a compare-and-set against what the request loaded:
of two concurrent requests for one session, exactly one is saved and the other
answers 409 ``stale_context`` (send it again), so no turn is lost to the last writer.
A streamed reply claims the stored state before its first text; any other request
that would save over that state meanwhile is answered 409 ``context_busy``.
``memory`` keeps contexts in one process only: a second worker or a restart does not
see them (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections.abc import Iterator
from typing import NoReturn

from itsdangerous import BadSignature as ItsBadSignature
from itsdangerous import Signer
from itsdangerous.encoding import base64_decode, base64_encode

from .app_schema import MetadataSchema
from .codec import Codec, current_time
from .consistency import (
    ERASED,
    Claim,
    mark_key,
    refuse_busy,
    refuse_erased,
    release_claim,
    renew_claim,
    session_claim_key,
    take_claim,
)
from .context import Context
from .envelope import PREFIX, SERVER_CARRIER_PREFIX
from .errors import (
    BadSignature,
    BadToken,
    ContextBusy,
    InvalidContext,
    MalformedToken,
    StaleContext,
    TierError,
    TierFull,
    TierUnavailable,
    TokenExpired,
    TokenTooLarge,
    retry_facts,
)
from .lifecycle import LifecyclePolicy, expires_at
from .limits import DEFAULT_LIMITS
from .observe import NULL_OBSERVER, Observer, tier_cause
from .pipeline import Clock, Pipeline, SaveResult, is_fresh
from .schema import values_walked_once
from .tiers.base import CLAIM_HELD
from .tiers.guard import GuardedTier

CARRIER_PREFIX = SERVER_CARRIER_PREFIX
#: Every carrier's length: the prefix, a 16-byte id in hex, a dot and the base64url
#: HMAC-SHA256 (43 characters).
CARRIER_LENGTH = len(CARRIER_PREFIX) + 32 + 1 + 43


def context_key(prefix: str, session_tag: str) -> str:
    """The store key of a session's context (the tag in braces: one Cluster slot)."""
    return f"{prefix}:{{{session_tag}}}:ctx"


class SessionCarriers:
    """The signed session id a server-mode client carries (``sv1.<id>.<signature>``)
    in place of a token, and the store key it names. Tools (``satchel inspect``) use
    it without a store; :class:`ServerSidePipeline` uses it for every request."""

    def __init__(
        self,
        codec: Codec,
        prefix: str = "satchel",
        *,
        max_carrier_bytes: int = DEFAULT_LIMITS.max_token_bytes,
    ) -> None:
        self.codec = codec
        self.prefix = prefix
        # The client-facing cap (a token's, SATCHEL_TOKEN_LIMIT): the codec's own is
        # raised in server mode to fit the stored context, which never travels.
        self.max_carrier_bytes = max_carrier_bytes
        keyring = codec.keyring
        # itsdangerous tries every key, newest last; subkeys keep purposes apart.
        secrets = [keyring.derive(k.kid, codec.purpose, "server-session-id") for k in keyring.keys]
        self.signer = Signer(
            list(reversed(secrets)),
            salt="satchel.server-session",
            digest_method=hashlib.sha256,
        )

    def sign(self, session_id: bytes) -> str:
        return CARRIER_PREFIX + self.signer.sign(session_id.hex().encode()).decode()

    def session_id_of(self, carrier: str) -> bytes:
        """The session id ``carrier`` names; MalformedToken unless it verifies.

        The same length cap as a token's comes first (TokenTooLarge, 413), so a client
        sees one answer to an oversized header in every mode.
        """
        cap = self.max_carrier_bytes
        if len(carrier) > cap:
            raise TokenTooLarge(
                f"token is {len(carrier)} bytes; the limit is {cap}",
                size=len(carrier),
                limit=cap,
            )
        if carrier.startswith(PREFIX):
            # A context token: a client kept it across a switch from client mode, or
            # sent it to another app.
            raise MalformedToken(
                f"this is a context token ({PREFIX}), not a server-side session id: this "
                "app keeps contexts server-side (server or memory mode); drop it to start "
                "afresh"
            )
        # A real carrier is ~80 characters: anything much longer is not one.
        if not carrier.startswith(CARRIER_PREFIX) or len(carrier) > 256:
            raise MalformedToken("not a server-side session id")
        try:
            signed = carrier[len(CARRIER_PREFIX) :].encode("ascii")
        except UnicodeError:
            raise MalformedToken("the session id is not valid") from None
        if b"." not in signed:
            raise MalformedToken("the session id carries no signature")
        try:
            raw = self.signer.unsign(signed)
        except ItsBadSignature:
            # Well formed, signed by no key of this ring and purpose: altered, forged,
            # or another app's: reported (and alerted on) like a token's bad MAC.
            raise BadSignature("the session id's signature does not verify") from None
        try:
            session_id = bytes.fromhex(raw.decode("ascii"))
        except (ValueError, UnicodeError):
            raise MalformedToken("the session id is not valid") from None
        # itsdangerous decodes base64 leniently: a changed last character can decode to
        # the same signature. Only the one canonical spelling is accepted.
        signature = signed.rpartition(b".")[2]
        if not hmac.compare_digest(base64_encode(base64_decode(signature)), signature):
            raise BadSignature("the session id's signature does not verify")  # altered
        if len(session_id) != 16:
            raise MalformedToken("the session id is not valid")
        return session_id

    def key_for(self, session_id: bytes) -> str:
        return context_key(self.prefix, self.codec.session_tag(session_id))


class ServerSidePipeline(Pipeline):
    """``load`` and ``save`` for contexts stored server-side, keyed by a signed id."""

    def __init__(
        self,
        codec: Codec,
        policy: LifecyclePolicy | None = None,
        *,
        store: GuardedTier,
        mode: str = "server",
        observer: Observer = NULL_OBSERVER,
        clock: Clock = time.time,
        prefix: str = "satchel",
        metadata_schema: MetadataSchema | None = None,
        max_carrier_bytes: int = DEFAULT_LIMITS.max_token_bytes,
    ) -> None:
        super().__init__(
            codec,
            policy,
            segments=None,
            observer=observer,
            clock=clock,
            metadata_schema=metadata_schema,
        )
        self.store = store
        self.mode = mode
        self.prefix = prefix
        self.carriers = SessionCarriers(codec, prefix, max_carrier_bytes=max_carrier_bytes)

    def key_for(self, session_id: bytes) -> str:
        """The store key of the session's context, named by its session tag."""
        return context_key(self.prefix, self.session_tag(session_id))  # the tag is cached

    def carrier(self, session_id: bytes) -> str:
        """What the client carries in place of a token: the session id, signed but not
        encrypted (``sv1.<hex id>.<signature>``)."""
        return self.carriers.sign(session_id)

    def session_id_of(self, carrier: str) -> bytes:
        """The session id ``carrier`` names (:meth:`SessionCarriers.session_id_of`):
        TokenTooLarge past the length cap, MalformedToken unless it verifies."""
        return self.carriers.session_id_of(carrier)

    def load(
        self,
        token: str | None,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> Context:
        now = current_time(now, self.clock)
        timings = {} if timings is None else timings
        if not token:
            return self.new_context(now)
        try:
            session_id = self.session_id_of(token)
        except BadToken as exc:
            self.observer.event("refused", reason=exc.code)
            raise
        key = self.key_for(session_id)
        tag = self.session_tag(session_id)
        # The erasure tombstone and a streamed reply's claim share the session's slot:
        # one round trip reads all three.
        tombstone = mark_key(tag)
        claim = session_claim_key(tag, self.prefix)
        fetched = self.store.get_many([key, tombstone, claim], cache=False)
        if fetched.reason(key) == "tier_unavailable":
            self._store_unavailable(fetched.error)
        if fetched.get(tombstone) == ERASED:
            # Erased: the id must not come back to life as a new, empty conversation.
            refuse_erased(self.observer, tag)
        stored = fetched.get(key)
        ctx = None
        expired = False
        if stored is not None:
            # Bytes, not decoded here: whatever is stored (a foreign write, corruption)
            # is refused by the envelope parser as a BadToken, never a UnicodeDecodeError.
            try:
                ctx = self.open_token(stored, now=now, timings=timings)
            except TokenExpired:
                # Kept past its token's expiry (a store with a coarser TTL, replicas
                # whose clocks differ): the session is over, as if the store had
                # forgotten it; server mode answers an expiry with a fresh start.
                # (Counted and logged as expired by open_token, not counted again.)
                expired = True
        if ctx is None:
            # Expired or evicted server-side: start over, under a *new* id. Kept, the
            # old id would follow the user into every later conversation: a carrier
            # stolen (or planted, "session fixation") once would read them all.
            ctx = self.new_context(now)
            ctx.notices.append("reset:session_not_found")
            # Counted and logged (satchel_tokens_refused_total{reason=session_not_found},
            # the audit log): a store that evicts or loses conversations shows up there,
            # next to sessions that simply expired.
            if not expired:
                self.observer.event("refused", reason="session_not_found", mode=self.mode)
            return ctx
        assert stored is not None
        if not hmac.compare_digest(ctx.session_id, session_id):
            # A context stored under another session's key (written there by whoever can
            # write the store, which the key ring does not guard): served, it would hand
            # this carrier another user's conversation and, at the save, that user's
            # carrier. Refused as overflow segments of another session are
            # (segment_foreign): never used.
            self.observer.event("refused", reason="token_invalid_context", mode=self.mode)
            raise InvalidContext("the stored context belongs to another session")
        ctx.stored_as = stored  # what the save compares against
        # A reply streaming for this state will save over it when it ends: this request
        # may read it, but a save of its own would win the compare-and-set and leave
        # that stream (whole reply sent) to end in an error event. save() refuses it.
        ctx.stream_answering = fetched.get(claim) is not None
        return ctx

    def claim(self, ctx: Context) -> Claim | None:
        """Reserve the one save the stored state this request loaded may get, before a
        streamed reply starts (:func:`~satchel.consistency.take_claim`, next to the
        context; :meth:`release` when the stream ends).

        ContextBusy when another request holds it; TierFull or TierUnavailable when the
        store refuses or cannot answer (in server mode an outage is an outage). A new
        session takes one too, though no other request can hold it: with the store
        down, the client gets a JSON 503 before the reply is generated and streamed,
        not a whole (paid-for) reply that ends in an error event because nothing can
        save it.
        """
        tag = self.session_tag(ctx.session_id)
        with self._store_errors("claim", "the session store is unavailable; retry shortly"):
            claim = take_claim(self.store, session_claim_key(tag, self.prefix), self.observer, tag)
        ctx.claim_holder = claim.holder  # the stream's own save passes its claim
        if ctx.stored_as is None:
            return claim  # a new session: no answer can have replaced a stored state
        # A request that loaded the state while another stream of it was still being
        # answered takes the claim as soon as that one releases it, by which time its
        # save has replaced the state: look again, now that no other answer can start.
        stored = self.key_for(ctx.session_id)
        fetched = self.store.get_many([stored], cache=False)
        if fetched.error is not None or fetched.get(stored) != ctx.stored_as:
            self.release(claim)
            if fetched.error is not None:
                self._store_unavailable(fetched.error)
            self.observer.event("busy_refused", session=tag)
            raise ContextBusy(
                "another request for this conversation was answered while this one "
                "waited; send it again"
            )
        # Loaded while another reply streamed (a read let through), which ended since
        # without a save: the state is as loaded, and now this request's to answer.
        ctx.stream_answering = False
        return claim

    def release(self, claim: Claim) -> None:
        release_claim(self.store, claim)

    def renew(self, claim: Claim) -> bool:
        return renew_claim(self.store, claim)

    def _store_unavailable(self, error: Exception | None) -> NoReturn:
        """A read the store could not answer: counted, and a 503 (in server mode an
        outage of the store is an outage of the app)."""
        self.observer.event(
            "unavailable", reason="tier_unavailable", mode=self.mode, detail=tier_cause(error)
        )
        raise TierUnavailable(
            "the session store is unavailable; retry shortly", mode=self.mode, **retry_facts(error)
        )

    @contextlib.contextmanager
    def _store_errors(self, op: str, unavailable: str) -> Iterator[None]:
        """A store write's TierError as the client should read it: a full store refused
        for certain (``tier_full``, nothing was saved); anything else is ``unavailable``
        (whose wording says what the client can know), counted either way."""
        try:
            yield
        except TierError as exc:
            self.observer.event(
                "unavailable", reason=exc.code, op=op, mode=self.mode, detail=tier_cause(exc)
            )
            if isinstance(exc, TierFull):
                raise TierFull(
                    "the session store is full and refused the write; nothing was saved",
                    mode=self.mode,
                ) from exc
            if exc.facts.get("unsent"):  # the breaker is open: no socket was touched
                raise TierUnavailable(
                    "the session store is unavailable and nothing was saved; retry shortly",
                    mode=self.mode,
                    **retry_facts(exc),
                ) from exc
            raise TierUnavailable(unavailable, mode=self.mode, **retry_facts(exc)) from exc

    def _seal_within_limits(self, ctx: Context, now: float, exp: float | None) -> str:
        """Seal the stored context, within what the codec opens again.

        No byte budget applies here (nothing travels but the carrier), but the stored
        bytes are opened with the same limits as a token: past ``Limits.max_array_len``
        turns or ``max_decompressed_bytes`` packed (1 MiB), sealing refused it, and
        every later message of the conversation was refused 413 ``budget_exceeded``
        for good. As in client mode, the oldest groups are summarized and dropped
        until it fits (``byte_budget`` in the lifecycle record), the newest last.
        """
        tag = self.session_tag(ctx.session_id)
        self._fit_turn_limit(ctx, now, tag)  # no tier here: summarized and dropped
        with values_walked_once(ctx):  # measured until it fits: its values walked once
            prepared = self.codec.prepare(ctx)
            prepared = self._fit_payload_cap(ctx, prepared, now, tag, write_failed=False)
            token, _raw_size = self.codec.seal_verbose(ctx, expires_at=exp, prepared=prepared)
        return token

    def save(
        self,
        ctx: Context,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
        report_start: bool = True,
    ) -> SaveResult:
        now = current_time(now, self.clock)
        timings = {} if timings is None else timings
        if ctx.stream_answering:
            # Refused before the view by the extension unless the request is a read
            # (GET, HEAD, OPTIONS); a read that changed the context is refused here.
            refuse_busy(self.observer, self.session_tag(ctx.session_id))
        fresh = is_fresh(ctx)
        ctx.last_active = max(ctx.last_active, int(now))
        tag = self.session_tag(ctx.session_id)
        # Reported as in client mode (trims, summaries, failed seals, the trim and seal
        # steps), so the same dashboards and alerts read every mode.
        with (
            self.seal_failures_reported(tag),
            self.lifecycle_reported(ctx, tag, timings),
            self.malformed_turns_named(ctx),
        ):
            self.apply_policies_reported(ctx, self.policy, now, tag, timings)
            t1 = time.perf_counter()
            exp = expires_at(ctx, self.policy, now)
            with self.metadata_schema.writing(ctx):  # every replica must read it
                token = self._seal_within_limits(ctx, now, exp)
        # Kept while the token inside still opens (its expiry plus the clock skew the
        # codec allows), not a moment longer: then the store forgets it, as server-side
        # session stores do, and the next request starts afresh (session_not_found).
        # (A 60 s floor here kept short-lived contexts past that: 401 token_expired for
        # a while, then a fresh start: two answers for one expiry.)
        # The token's expiry is sealed in whole seconds, rounded down (int(exp)): the
        # TTL runs to that second, or a save at .9 s outlived its token by 0.9 s.
        skew = self.codec.limits.clock_skew
        ttl = max(1.0, int(exp) - now + skew) if exp is not None else 30 * 86400.0
        data = token.encode("ascii")
        # A write that timed out may still land (a stalled Redis runs the command it had
        # already read once it resumes): the message says so, or a resend saves it twice.
        unconfirmed = (
            "the session store did not confirm the write, which may still have been "
            "saved: reload the conversation before sending this again"
            if ctx.stored_as is not None
            # A new conversation: the client holds no carrier, so a write that landed
            # anyway is one nobody can reach, and sending again starts it afresh.
            else "the session store is unavailable; this new conversation was not "
            "started: send it again shortly"
        )
        with self._store_errors("save", unconfirmed):
            # Only over what this request loaded (nothing, for a new session): another
            # request that saved meanwhile would otherwise lose its turns to this one.
            # And not while another request streams a reply to that state: one that
            # loaded it a moment before the stream claimed it would otherwise save over
            # it, and the stream end in an error event after its whole reply.
            current = self.store.compare_and_set_unclaimed(
                self.key_for(ctx.session_id),
                ctx.stored_as,
                data,
                ttl,
                session_claim_key(tag, self.prefix),
                ctx.claim_holder,
            )
        if current is CLAIM_HELD:
            refuse_busy(self.observer, tag)
        if current == b"" and ctx.stored_as is not None:
            # Gone between this request's read and its write: erased, expired or
            # evicted. Not a race with another request (no newer state exists), and not
            # written back: an erasure in between must not be undone, and is said so.
            erased = self.store.get_many([mark_key(tag)], cache=False)
            if erased.get(mark_key(tag)) == ERASED:
                refuse_erased(self.observer, tag)
            self.observer.event("refused", reason="session_not_found", mode=self.mode)
            raise StaleContext(
                "this conversation left the session store while the request ran (expired "
                "or evicted); send the message again to start over"
            )
        if current is not None:
            self.observer.event("stale_refused", session=tag, detail="race")
            raise StaleContext(
                "another request for this conversation was saved first; send this one again"
            )
        ctx.stored_as = data
        timings["seal"] = time.perf_counter() - t1  # the store's write included
        carrier = self.carrier(ctx.session_id)
        # Not observer.token: satchel_token_bytes and its alerts are about what travels
        # (a carrier here), and a stored context has no byte budget to stay under.
        self.issued_reported(ctx, tag, len(token), fresh=fresh and report_start)
        for step in ("trim", "seal"):
            self.observer.timing(step, timings[step])
        return SaveResult(carrier, len(token), timings, fresh=fresh)


__all__ = ["CARRIER_LENGTH", "CARRIER_PREFIX", "ServerSidePipeline"]
