"""Erasure: delete what the server holds for a session, and leave a tombstone.

What it reaches: every key of the session in the tier (overflow segments, marks and,
in ``server``/``memory`` mode, the stored context). Every erasure with a tier then
writes a tombstone in place of the session's mark, whatever the consistency level:

* ``monotonic`` routes, and ``server``/``memory`` mode, refuse the session's tokens
  from then on (410 ``token_erased``);
* segment writes for the session are refused, so a process that still caches its
  turns, or a request that still carries its token, cannot write them back to the
  tier.

What it cannot reach: a client-held token is a copy in the user's browser; on
``client``-level routes it stays usable until it expires (its overflowed turns are
gone, its inline turns are not). See docs/security.md, "Erasure". Nor, from another
process (``satchel erase``), a ``memory://`` tier or a ``memory``-mode app's store:
both live inside the app's process, which only :func:`erase_with_state`
(``Satchel.erase``) reaches.

The result is ``{"session": tag, "deleted_keys": n, "tokens_refused": bool}``:
``tokens_refused`` says the tombstone was written (always, when there is a tier), in
the sense above: refused on ``monotonic`` and server-side routes, not on ``client``
ones.
"""

from __future__ import annotations

from typing import Any

from .codec import Codec
from .consistency import DEFAULT_MARK_TTL, ERASED, mark_key, tombstone_ttl_for
from .errors import ConfigurationError, InvalidRequest, SatchelError, TierError
from .keys import Keyring
from .observe import tier_cause


def parse_session_id(session_id: str | bytes) -> bytes:
    """The 16-byte session id from those bytes themselves or their hex (32 characters,
    as ``Context.session`` and the logs write it, str or ASCII bytes); anything else is
    InvalidRequest (400)."""
    if isinstance(session_id, bytes) and len(session_id) == 16:
        return session_id
    try:
        raw = bytes.fromhex(session_id.decode() if isinstance(session_id, bytes) else session_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise InvalidRequest("a session id is 32 hexadecimal characters")
    return raw


def erase_in_tier(
    codec: Codec,
    tier: Any,
    session_id: str | bytes,
    *,
    refuse: bool,
    tombstone_ttl: float = DEFAULT_MARK_TTL,
) -> dict:
    """Delete every tier key of the session; with ``refuse``, leave the tombstone (see
    the module docstring) for ``tombstone_ttl`` seconds
    (:func:`~satchel.consistency.tombstone_ttl_for`).

    The tombstone takes the mark's place in the same step as the delete
    (:meth:`~satchel.tiers.Tier.erase_session`), and every segment write checks it in
    the write itself (:meth:`~satchel.tiers.Tier.put_unless_marked`): a request that
    spills while the erasure runs either lands before it (and is deleted) or after it
    (and is refused), never in between.
    """
    sid = parse_session_id(session_id)
    tag = codec.session_tag(sid)
    if not refuse:
        return {"session": tag, "deleted_keys": tier.delete_session(tag), "tokens_refused": False}
    deleted = tier.erase_session(tag, mark_key(tag), ERASED, tombstone_ttl)
    # An unpinned ring's anchor moves with the end of the ring, and the session's keys
    # are named by the anchor (MonotonicGuard._mirror keeps its mark under each key's
    # name, segments are tagged by it): the data under every other key's tag goes too,
    # and a tombstone takes each mark, so no instance anchored elsewhere takes the
    # session's tokens or keeps its turns.
    for other in codec.session_tags_under_other_anchors(sid):
        deleted += tier.erase_session(other, mark_key(other), ERASED, tombstone_ttl)
    return {"session": tag, "deleted_keys": deleted, "tokens_refused": True}


def erase_with_state(state: Any, session_id: str | bytes) -> dict[str, Any]:
    """Erase using a Flask app's Satchel state (tier, segments, guard, pipeline).

    The tombstone is written whenever there is a tier, not only when the app has a
    monotonic guard: server and memory modes have none, and the segment writes of
    every mode must meet it (and ``satchel erase`` always wrote it).
    """
    observer = state.pipeline.observer
    tag = state.codec.session_tag(parse_session_id(session_id))
    if state.tier is None:
        result = {"session": tag, "deleted_keys": 0, "tokens_refused": False}
    else:
        policy = state.pipeline.policy
        try:
            result = erase_in_tier(
                state.codec,
                state.tier,
                session_id,
                refuse=True,
                tombstone_ttl=tombstone_ttl_for(policy.max_age),
            )
        except TierError as exc:
            # An erasure is a compliance operation: that one failed must show in the
            # metrics and the audit log, not only as the caller's 503 (and, outside a
            # request, with the breaker open, nowhere at all). The caller retries.
            observer.event("erase_failed", session=tag, error=exc.code, detail=tier_cause(exc))
            raise
    observer.event("erased", session=result["session"], count=result["deleted_keys"])
    # What `satchel erase` prints, key for key: the key the session's names hang on.
    return {**result, "anchor_kid": state.codec.keyring.anchor.kid}


#: What ``satchel erase`` says when the data it was asked about lives in the app's
#: process: the way that does reach it.
IN_PROCESS_HINT = (
    "erase through the running app instead: Satchel.erase(session_id), for example "
    "from an admin route (docs/operations.md, Erasure)"
)


def erase_session(
    session_id: str,
    *,
    overflow_url: str,
    purpose: str = "satchel",
    store_url: str = "",
    mode: str = "",
    max_age: float | None = None,
) -> dict[str, Any]:
    """Erase with keys from SATCHEL_KEYS in the tier at ``overflow_url`` and, for
    server-mode apps whose contexts live elsewhere, the store at ``store_url`` (the CLI).

    The tiers must exist already: a SQLite file is never created here (a relative path
    resolves from the current directory, which need not be the app's; erasing a new,
    empty file would report success and leave the real rows). Every URL is checked
    before anything is erased.

    ``mode`` is the app's ``SATCHEL_MODE``. A ``memory``-mode app, or a ``memory://``
    URL, keeps its data in the app's own process: a tier opened here would be a new,
    empty one, and the tombstone written in it (or in the app's Redis, which a
    memory-mode app never reads) would report ``tokens_refused`` while the app kept
    serving the session. Both are a :class:`ConfigurationError`.

    ``max_age``: the app's maximum session age, when known (the CLI reads
    ``SATCHEL_MAX_AGE``); the tombstone outlives it
    (:func:`~satchel.consistency.tombstone_ttl_for`).
    """
    from .tiers import is_in_process_url, redact_url, tier_from_url
    from .tiers.guard import GuardedTier

    parse_session_id(session_id)  # a malformed id is said to be one, before any setting
    if mode.strip().lower() not in ("", "client", "server", "memory"):
        # No app runs with such a mode (the app refuses to start with it): this is not
        # an app's environment. (Read leniently, case and spaces aside, as before.)
        raise ConfigurationError(
            f"SATCHEL_MODE must be 'client', 'server' or 'memory', not {mode!r}"
        )
    if mode.strip().lower() == "memory":
        raise ConfigurationError(
            "SATCHEL_MODE=memory: the contexts live in the app's own process, which "
            "this command cannot reach (nor does such an app read a tombstone left in "
            f"a tier); {IN_PROCESS_HINT}"
        )
    settings: dict[str, str] = {}  # url -> where it came from, for errors
    for url, setting in (
        (overflow_url, "--overflow-url ($SATCHEL_OVERFLOW_URL)"),
        (store_url, "--store-url ($SATCHEL_STORE_URL)"),
    ):
        if not url:
            continue
        if is_in_process_url(url):
            raise ConfigurationError(
                f"{setting}: memory:// is a tier inside the app's own process; this "
                f"command would erase a new, empty one of its own; {IN_PROCESS_HINT}"
            )
        settings.setdefault(url, setting)
    if not settings:
        raise ConfigurationError(
            "nothing to erase server-side without a tier: set SATCHEL_OVERFLOW_URL "
            "(or, for server mode, SATCHEL_STORE_URL)"
        )
    codec = Codec(Keyring.from_env(require_anchor=True), purpose=purpose)
    parse_session_id(session_id)  # a bad id is refused before any tier is opened
    tiers: list[GuardedTier] = []
    try:
        for url, setting in settings.items():
            tiers.append(GuardedTier(tier_from_url(url, setting=setting, create=False)))
        deleted = 0
        done: list[str] = []
        for tier, (url, setting) in zip(tiers, settings.items(), strict=True):
            try:
                erased = erase_in_tier(
                    codec,
                    tier,
                    session_id,
                    refuse=True,
                    tombstone_ttl=tombstone_ttl_for(max_age),
                )
            except SatchelError as exc:
                # Say what was erased already and which tier failed: erasing again
                # once it answers finishes the job (erasure is idempotent).
                before = f"; already erased in {', '.join(done)}" if done else ""
                raise type(exc)(
                    f"{setting} {redact_url(url)}: {exc.message}{before}; run it again "
                    "once that tier answers",
                    **exc.facts,
                ) from None
            deleted += erased["deleted_keys"]
            done.append(f"{setting} {redact_url(url)}")
    finally:
        for tier in tiers:
            tier.close()
    return {**erased, "deleted_keys": deleted, "anchor_kid": codec.keyring.anchor.kid}


__all__ = [
    "IN_PROCESS_HINT",
    "erase_in_tier",
    "erase_session",
    "erase_with_state",
    "parse_session_id",
]
