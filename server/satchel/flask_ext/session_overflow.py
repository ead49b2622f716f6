"""Overflow for ``flask.session``: a session too large for its cookie goes to the tier.

::

    app.session_interface = SatchelSessionInterface(
        overflow=TierSessionOverflow("sqlite:///instance/sessions.sqlite3")
    )

When the sealed session would exceed the browser's cookie limit, the sealed token is
stored in the overflow tier under a random key and the cookie carries only a signed
reference to it (``so1.<key>.<signature>``). The stored value is the same sealed token,
so it stays encrypted and authenticated at rest; the reference is signed with a key
derived from the session keys, so a client can neither forge nor alter it.

When the tier cannot be read, the session opens empty (as Flask does for any unreadable
cookie) and a warning is logged; when it cannot be written, the request fails with
:class:`~satchel.flask_ext.session.SessionTooLarge`, as it would without overflow:
nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

from flask import Flask
from itsdangerous import BadSignature, Signer

from ..errors import TierError
from ..tiers import tier_from_url
from ..tiers.guard import GuardedTier

log = logging.getLogger("satchel")
PREFIX = "so1."


class TierSessionOverflow:
    """The ``overflow`` hook of :class:`SatchelSessionInterface`, backed by a tier."""

    def __init__(self, tier: str | Any, *, key_prefix: str = "satchel:fsess") -> None:
        tier = tier_from_url(tier) if isinstance(tier, str) else tier
        self.tier = tier if isinstance(tier, GuardedTier) else GuardedTier(tier)
        self.key_prefix = key_prefix

    def _signer(self, app: Flask) -> Signer:
        interface = app.session_interface
        ring = interface.get_keyring(app)  # type: ignore[attr-defined]
        purpose = interface.get_purpose(app)  # type: ignore[attr-defined]
        secrets_ = [ring.derive(k.kid, purpose, "session-overflow") for k in ring.keys]
        return Signer(
            list(reversed(secrets_)), salt="satchel.session-overflow", digest_method=hashlib.sha256
        )

    def __call__(self, app: Flask, session: Any, value: str, size: int, limit: int) -> str | None:
        """Store ``value`` in the tier; return the short cookie value (None: cannot)."""
        key = f"{self.key_prefix}:{secrets.token_urlsafe(18)}"
        ttl = max(60.0, app.permanent_session_lifetime.total_seconds())
        try:
            self.tier.put(key, value.encode("ascii"), ttl, cache=False)
        except TierError as exc:
            log.warning("satchel session overflow: the tier refused the write (%s)", exc.code)
            return None
        return PREFIX + self._signer(app).sign(key.encode("ascii")).decode("ascii")

    def resolve(self, app: Flask, value: str) -> str | None:
        """The sealed session a cookie refers to; the cookie itself when it is no reference."""
        if not value.startswith(PREFIX):
            return value
        try:
            key = self._signer(app).unsign(value[len(PREFIX) :].encode("ascii")).decode("ascii")
        except (BadSignature, UnicodeError):
            return ""  # a forged or damaged reference: an empty session
        fetched = self.tier.get_many([key], cache=False)
        stored = fetched.get(key)
        if stored is None:
            log.warning(
                "satchel session overflow: stored session unavailable (%s)",
                fetched.reason(key) or "missing",
            )
            return ""
        return stored.decode("ascii")


__all__ = ["TierSessionOverflow"]
