"""Erasure: delete what the server holds for a session, and refuse its tokens.

What it reaches: overflow segments and, in ``server``/``memory`` mode, the stored
context; with a tier, a tombstone makes ``monotonic`` routes refuse the session's
tokens from then on (410 ``token_erased``). What it cannot reach: a client-held token
is a copy in the user's browser; in ``client`` consistency it stays usable until it
expires (its turns are gone from the tier, its inline turns are not). See
docs/security.md, "Erasure".
"""

from __future__ import annotations

from typing import Any

from .codec import Codec
from .consistency import MonotonicGuard
from .errors import ConfigurationError, InvalidRequest
from .keys import Keyring
from .pipeline import session_tag


def parse_session_id(session_id: str | bytes) -> bytes:
    if isinstance(session_id, bytes) and len(session_id) == 16:
        return session_id
    try:
        raw = bytes.fromhex(session_id.decode() if isinstance(session_id, bytes) else session_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise InvalidRequest("a session id is 32 hexadecimal characters")
    return raw


def erase_with_state(state: Any, session_id: str | bytes) -> dict[str, Any]:
    """Erase using a Flask app's Satchel state (tier, segments, guard, pipeline)."""
    sid = parse_session_id(session_id)
    tag = session_tag(state.codec, sid)
    deleted = 0
    tombstone = False
    if state.tier is not None:
        deleted += state.tier.delete_session(tag)
        if state.guard is not None:
            state.guard.erase(tag)
            tombstone = True
    state.pipeline.observer.event("erased", session=tag, count=deleted)
    return {"session": tag, "deleted_keys": deleted, "tokens_refused": tombstone}


def erase_session(
    session_id: str, *, overflow_url: str, purpose: str = "satchel"
) -> dict[str, Any]:
    """Erase with keys from SATCHEL_KEYS and the tier at ``overflow_url`` (the CLI)."""
    from .tiers import tier_from_url
    from .tiers.guard import GuardedTier

    if not overflow_url:
        raise ConfigurationError(
            "nothing to erase server-side without a tier: set SATCHEL_OVERFLOW_URL"
        )
    codec = Codec(Keyring.from_env(), purpose=purpose)
    tier = GuardedTier(tier_from_url(overflow_url))
    try:
        sid = parse_session_id(session_id)
        tag = session_tag(codec, sid)
        deleted = tier.delete_session(tag)
        MonotonicGuard(tier).erase(tag)
    finally:
        tier.close()
    return {"session": tag, "deleted_keys": deleted, "tokens_refused": True}


__all__ = ["erase_session", "erase_with_state", "parse_session_id"]
