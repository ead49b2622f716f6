"""Overflow for ``flask.session``: a session too large for its cookie goes to the tier.

::

    app.session_interface = SatchelSessionInterface(
        overflow=TierSessionOverflow("sqlite:///instance/sessions.sqlite3")
    )

When the sealed session would exceed the browser's cookie limit, the sealed token is
stored in the overflow tier under a random key and the cookie carries only a signed
reference to it (``so1.<key>.<signature>``). The reference is signed with a key derived
from the session keys, so a client can neither forge nor alter it. The stored value is
that token sealed once more (:class:`~satchel.protect.AtRest`, a subkey of its own,
the tier key as associated data): stored as is, it would be a session cookie that
whoever reads the tier (a replica, a backup) could send, and one that whoever writes
it could move under another user's reference.

The tier holds one copy per live session. A session that is replaced (modified, or
refreshed late in its lifetime) gets a new key, and the previous copy is retired: it
stays readable for ``grace`` seconds, because a concurrent request may still carry the
previous cookie, then the tier drops it. An unmodified session keeps its copy and its
cookie. Clearing the session (``session.clear()``, a logout) deletes its copy at once.

When the tier cannot be read, the session opens empty (as Flask does for any unreadable
cookie), ``session.rejected`` is ``"tier_unavailable"``, the response says
``Satchel-Degraded: session_unavailable`` and it is counted and logged. When it cannot
be written, the hook raises the tier's error: the response goes out as the view made
it and the session ends (its cookie deleted, so nothing the view removed, such as a
logged-in user, comes back), flagged ``session_not_saved``, counted and logged:
nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

from flask import Flask
from itsdangerous import BadSignature, Signer

from ..errors import BadSignature as BadReference
from ..errors import BadToken, MalformedToken, TierError
from ..protect import AtRest
from ..segments import DEFAULT_GRACE
from ..tiers import tier_from_url
from ..tiers.guard import GuardedTier

log = logging.getLogger("satchel")
PREFIX = "so1."


class StoredSessionMissing(BadToken):
    """The cookie refers to a stored session the tier no longer holds (expired, retired
    after its grace period, or deleted when the session was cleared)."""

    code = "session_missing"


class TierSessionOverflow:
    """The ``overflow`` hook of :class:`SatchelSessionInterface`, backed by a tier."""

    def __init__(
        self,
        tier: str | Any,
        *,
        key_prefix: str = "satchel:fsess",
        grace: float = DEFAULT_GRACE,
        **tier_options: Any,
    ) -> None:
        """``tier``: a tier URL or a :class:`~satchel.tiers.Tier`. ``tier_options`` go
        to :func:`~satchel.tiers.tier_from_url` with a URL (``timeouts=Timeouts(read=0.5)``
        for Redis, ``busy_timeout=`` for SQLite): the app's ``SATCHEL_TIER_*`` settings
        are not read here, since the hook is built before the app is configured."""
        if not grace >= 0:
            raise ValueError("the session overflow grace period must be >= 0 seconds")
        if tier_options and not isinstance(tier, str):
            raise TypeError("tier options go with a tier URL; configure a Tier object itself")
        tier = tier_from_url(tier, **tier_options) if isinstance(tier, str) else tier
        self.tier = tier if isinstance(tier, GuardedTier) else GuardedTier(tier)
        self.key_prefix = key_prefix
        #: seconds a replaced copy stays readable for requests still carrying its cookie
        #: (0: deleted at once)
        self.grace = float(grace)

    def _signer(self, app: Flask) -> Signer:
        interface = app.session_interface
        ring = interface.get_keyring(app)  # type: ignore[attr-defined]
        purpose = interface.get_purpose(app)  # type: ignore[attr-defined]
        secrets_ = [ring.derive(k.kid, purpose, "session-overflow") for k in ring.keys]
        return Signer(
            list(reversed(secrets_)), salt="satchel.session-overflow", digest_method=hashlib.sha256
        )

    def _at_rest(self, app: Flask) -> AtRest:
        interface = app.session_interface
        ring = interface.get_keyring(app)  # type: ignore[attr-defined]
        purpose = interface.get_purpose(app)  # type: ignore[attr-defined]
        return AtRest(ring, purpose, "session-overflow-copy")

    def __call__(self, app: Flask, session: Any, value: str, size: int, limit: int) -> str:
        """Store ``value`` in the tier; return the short cookie value. Raises the tier's
        :class:`~satchel.errors.TierError` when it refuses the write (down or full)."""
        key = f"{self.key_prefix}:{secrets.token_urlsafe(18)}"
        ttl = max(60.0, app.permanent_session_lifetime.total_seconds())
        stored = self._at_rest(app).seal(value.encode("ascii"), key.encode("ascii"))
        try:
            self.tier.put(key, stored, ttl, cache=False)
        except TierError as exc:
            # INFO: the tier's own warning (throttled) and the session's
            # (session_not_saved) say it at WARNING.
            log.info("satchel session overflow: the tier refused the write (%s)", exc.code)
            raise
        return PREFIX + self._signer(app).sign(key.encode("ascii")).decode("ascii")

    def _key(self, app: Flask, value: str) -> str:
        """The tier key a reference cookie names; raises BadReference for a forged one."""
        try:
            return self._signer(app).unsign(value[len(PREFIX) :].encode("ascii")).decode("ascii")
        except (BadSignature, UnicodeError):
            raise BadReference("the session overflow reference is forged or damaged") from None

    def resolve(self, app: Flask, value: str) -> str | None:
        """The sealed session a reference cookie names; None when ``value`` is no reference.

        Raises a :class:`~satchel.errors.SatchelError` (its code becomes
        ``session.rejected``) when the reference is forged, the copy is gone
        (``"session_missing"``) or the tier cannot be read (``"tier_unavailable"``).
        """
        if not value.startswith(PREFIX):
            return None
        key = self._key(app, value)
        fetched = self.tier.get_many([key], cache=False)
        stored = fetched.get(key)
        if stored is not None:
            limit = app.session_interface.limits.max_token_bytes + AtRest.MAX_OVERHEAD  # type: ignore[attr-defined]
            token = self._at_rest(app).open(stored, key.encode("ascii"), max_bytes=limit)
            if token is None:
                # Not a copy this ring sealed for this reference: damaged, planted, one
                # moved here from another session's key, or stored by a release before
                # copies were sealed. Refused as a damaged cookie is.
                raise MalformedToken("the stored session is not this reference's")
            return token.decode("ascii")
        if fetched.error is not None:  # "tier_unavailable", breaker open included
            # INFO: one per request while the tier is down; the tier's warning and the
            # audit's degraded record (session_unavailable) are throttled.
            log.info(
                "satchel session overflow: stored session unavailable (%s)", fetched.error.code
            )
            raise fetched.error
        raise StoredSessionMissing("the stored session has expired or was removed")

    def retire(self, app: Flask, value: str, *, at_once: bool = False) -> None:
        """Drop the copy a reference names, once the session no longer uses it.

        Replaced (``at_once=False``): it stays readable for :attr:`grace` seconds, for
        requests that left before the new cookie arrived. Cleared (``at_once=True``):
        deleted now. Best effort: a failure is logged and leaves the copy to its TTL.
        """
        if not value.startswith(PREFIX):
            return
        try:
            key = self._key(app, value)
        except BadReference:
            return  # not one of ours: nothing of ours to drop
        try:
            if at_once or self.grace <= 0:
                self.tier.delete([key])
            else:
                self.tier.expire_soon([key], self.grace)
        except TierError as exc:
            log.warning(
                "satchel session overflow: could not drop a previous session copy (%s)", exc.code
            )


__all__ = ["PREFIX", "StoredSessionMissing", "TierSessionOverflow"]
