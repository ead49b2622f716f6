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


def erase_in_tier(codec: Codec, tier: Any, session_id: str | bytes, *, refuse: bool) -> dict:
    """Delete every tier key of the session; with ``refuse``, leave a tombstone that
    monotonic routes answer with 410 ``token_erased``. The tombstone is written after
    the delete, which would otherwise remove it with the rest of the session."""
    tag = codec.session_tag(parse_session_id(session_id))
    deleted = tier.delete_session(tag)
    if refuse:
        MonotonicGuard(tier).erase(tag)
    return {"session": tag, "deleted_keys": deleted, "tokens_refused": refuse}


def erase_with_state(state: Any, session_id: str | bytes) -> dict[str, Any]:
    """Erase using a Flask app's Satchel state (tier, segments, guard, pipeline)."""
    if state.tier is None:
        tag = state.codec.session_tag(parse_session_id(session_id))
        result = {"session": tag, "deleted_keys": 0, "tokens_refused": False}
    else:
        result = erase_in_tier(state.codec, state.tier, session_id, refuse=state.guard is not None)
    state.pipeline.observer.event("erased", session=result["session"], count=result["deleted_keys"])
    return result


def erase_session(
    session_id: str, *, overflow_url: str, purpose: str = "satchel", store_url: str = ""
) -> dict[str, Any]:
    """Erase with keys from SATCHEL_KEYS in the tier at ``overflow_url`` and, for
    server-mode apps whose contexts live elsewhere, the store at ``store_url`` (the CLI)."""
    from .tiers import tier_from_url
    from .tiers.guard import GuardedTier

    urls = list(dict.fromkeys(u for u in (overflow_url, store_url) if u))
    if not urls:
        raise ConfigurationError(
            "nothing to erase server-side without a tier: set SATCHEL_OVERFLOW_URL "
            "(or, for server mode, SATCHEL_STORE_URL)"
        )
    codec = Codec(Keyring.from_env(), purpose=purpose)
    deleted = 0
    for url in urls:
        tier = GuardedTier(tier_from_url(url))
        try:
            erased = erase_in_tier(codec, tier, session_id, refuse=True)
        finally:
            tier.close()
        deleted += erased["deleted_keys"]
    return {**erased, "deleted_keys": deleted}


__all__ = ["erase_in_tier", "erase_session", "erase_with_state", "parse_session_id"]
