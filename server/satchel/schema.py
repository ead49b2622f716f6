"""Schema versions, the migration registry, and the mapping between Context and wire.

The payload of a token is a msgpack map whose ``"v"`` (or, in schema 1, ``"version"``)
names its schema version. On read, migrations run in order, N -> N+1, until the
current version, so a token minted by any earlier release opens under this one.

Adding a schema version is one migration function plus one golden fixture under
tests/fixtures/ (see docs/lifecycle.md, "Migrations").

History:

* 1 (0.0 preview): long field names, turns as maps, ``system_prompt`` string.
* 2 (0.1): short keys, turns as arrays, tool calls, opaque blocks, pinned facts,
  lifecycle record, overflow references, user binding; later, the optional ``mv``
  (the app's metadata version, satchel.app_schema: absent means 0, so earlier
  version 2 payloads read unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app_schema import check_version
from .context import (
    ROLES,
    Context,
    Lifecycle,
    LifecycleAction,
    OpaqueBlock,
    Pinned,
    SegmentRef,
    ToolCall,
    Turn,
)
from .errors import InvalidContext, MigrationFailed, UnsupportedVersion

CURRENT_VERSION = 2
Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}
_ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}
_ROLE_OF = dict(enumerate(ROLES))


def migration(from_version: int) -> Callable[[Migration], Migration]:
    """Register ``fn`` as the migration from ``from_version`` to ``from_version + 1``."""

    def register(fn: Migration) -> Migration:
        if from_version in MIGRATIONS:
            raise ValueError(f"a migration from version {from_version} is already registered")
        MIGRATIONS[from_version] = fn
        return fn

    return register


def version_of(wire: Any) -> int:
    if not isinstance(wire, dict):
        raise InvalidContext("payload is not a map")
    version = wire.get("v", wire.get("version"))
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidContext("payload has no schema version")
    return version


def migrate(wire: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Upgrade ``wire`` to the current version. Returns it and the version it had."""
    original = version = version_of(wire)
    if version > CURRENT_VERSION or version < 1:
        raise UnsupportedVersion(
            f"context schema version {version} is not supported by this release "
            f"(current is {CURRENT_VERSION})",
            schema_version=version,
        )
    while version < CURRENT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise MigrationFailed(f"no migration from schema version {version}", version=version)
        try:
            wire = step(wire)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MigrationFailed(
                f"migrating schema {version} -> {version + 1} failed: {type(exc).__name__}",
                from_version=version,
            ) from None
        version += 1
        if version_of(wire) != version:
            raise MigrationFailed(
                f"migration from {version - 1} did not produce version {version}",
                from_version=version - 1,
            )
    return wire, original


@migration(from_version=1)
def _v1_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    """0.0 preview -> 0.1: short keys, turns as arrays, the system prompt becomes pinned."""
    turns = []
    for t in old.get("turns", []):
        turns.append([_ROLE_INDEX[t["role"]], t["content"], t.get("ts", 0)])
    new: dict[str, Any] = {
        "v": 2,
        "i": bytes.fromhex(old["session_id"]),
        "q": old.get("seq", 0),
        "c": old.get("created", 0),
        "a": old.get("updated", old.get("created", 0)),
        "t": turns,
    }
    if old.get("summary"):
        new["s"] = old["summary"]
    if old.get("system_prompt"):
        new["P"] = [old["system_prompt"], []]
    if old.get("metadata"):
        new["m"] = old["metadata"]
    return new


# -- Context <-> wire (current version) -----------------------------------------------


def _turn_to_wire(t: Turn) -> list[Any]:
    w: list[Any] = [_ROLE_INDEX[t.role], t.content, t.ts]
    if t.tool_calls or t.tool_call_id is not None or t.blocks or t.name is not None:
        extra: dict[str, Any] = {}
        if t.tool_calls:
            extra["c"] = [[c.id, c.name, c.arguments] for c in t.tool_calls]
        if t.tool_call_id is not None:
            extra["i"] = t.tool_call_id
        if t.blocks:
            extra["b"] = [[b.type, b.data, b.provider] for b in t.blocks]
        if t.name is not None:
            extra["n"] = t.name
        w.append(extra)
    return w


def to_wire(ctx: Context) -> dict[str, Any]:
    """The current-version wire map of ``ctx``. Empty fields are left out."""
    wire: dict[str, Any] = {
        "v": CURRENT_VERSION,
        "i": ctx.session_id,
        "q": ctx.seq,
        "c": ctx.created_at,
        "a": ctx.last_active,
        "t": [
            [_ROLE_INDEX[t.role], t.content, t.ts]
            if not (t.tool_calls or t.blocks or t.tool_call_id is not None or t.name is not None)
            else _turn_to_wire(t)
            for t in ctx.turns
        ],
    }
    if ctx.parent is not None:
        wire["p"] = ctx.parent
    if ctx.summary:
        wire["s"] = ctx.summary
    pinned = ctx.pinned
    if pinned.system or pinned.facts:
        wire["P"] = [pinned.system, list(pinned.facts)]
    if ctx.metadata:
        wire["m"] = ctx.metadata
    if ctx.metadata_version:
        wire["mv"] = ctx.metadata_version
    lc = ctx.lifecycle
    if lc.dropped or lc.summarized or lc.lost or lc.recent:
        wire["l"] = [
            lc.dropped,
            lc.summarized,
            lc.lost,
            [[a.policy, a.action, a.turns, a.ts, a.detail] for a in lc.recent],
        ]
    if ctx.overflow:
        wire["o"] = [[r.digest, r.turns, r.size, r.seq, r.ts] for r in ctx.overflow]
    if ctx.bound_user is not None:
        wire["u"] = ctx.bound_user
    return wire


def _bin(value: Any) -> bytes:
    # Never bytes(value): bytes(10**12) would allocate a terabyte.
    if type(value) is not bytes:
        raise TypeError("expected a msgpack bin")
    return value


def _num(value: Any) -> float:
    if type(value) not in (int, float):
        raise TypeError("expected a number")
    return value


def _seq(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise TypeError("expected a sequence number")
    return value


def _opt_str(value: Any) -> str | None:
    if value is not None and type(value) is not str:
        raise TypeError("expected a str or nil")
    return value


_NUMBER_TYPES = (int, float)


def turns_from_wire(wires: list[Any]) -> list[Turn]:
    """Turns from their wire arrays, checked like :func:`_turn_from_wire`.

    Most turns are plain ``[role, content, ts]``; they are built inline, without a
    call per turn, because opening a token builds every turn it holds.
    """
    return [
        Turn(_ROLE_OF[w[0]], w[1], w[2])
        if len(w) == 3 and type(w[1]) is str and type(w[2]) in _NUMBER_TYPES
        else _turn_from_wire(w)
        for w in wires
    ]


def _turn_from_wire(w: list[Any]) -> Turn:
    content = w[1]
    if type(content) is not str:
        raise TypeError("turn content")
    if len(w) == 3:
        return Turn(_ROLE_OF[w[0]], content, _num(w[2]))
    extra = w[3]
    return Turn(
        _ROLE_OF[w[0]],
        content,
        _num(w[2]),
        tool_calls=tuple(ToolCall(str(i), str(n), str(a)) for i, n, a in extra.get("c", ())),
        tool_call_id=_opt_str(extra.get("i")),
        blocks=tuple(OpaqueBlock(str(t), _bin(d), str(p)) for t, d, p in extra.get("b", ())),
        name=_opt_str(extra.get("n")),
    )


def from_wire(wire: Any) -> Context:
    """A Context from a wire map of any supported version (migrations run first)."""
    if type(wire) is dict and wire.get("v") == CURRENT_VERSION:
        original = CURRENT_VERSION  # the common case: nothing to migrate
    else:
        wire, original = migrate(wire)
    try:
        ctx = Context(
            session_id=_bin(wire["i"]),
            seq=_seq(wire["q"]),
            parent=wire.get("p"),
            created_at=_num(wire["c"]),
            last_active=_num(wire["a"]),
            schema_version=CURRENT_VERSION,
            turns=turns_from_wire(wire["t"]),
            summary=wire.get("s", ""),
        )
        if "P" in wire:
            system, facts = wire["P"]
            ctx.pinned = Pinned(str(system), [str(f) for f in facts])
        if "m" in wire:
            if not isinstance(wire["m"], dict):
                raise TypeError("metadata")
            ctx.metadata = wire["m"]
        if "mv" in wire:
            ctx.metadata_version = check_version(wire["mv"])
        if "l" in wire:
            dropped, summarized, lost, recent = wire["l"]
            ctx.lifecycle = Lifecycle(
                dict(dropped), int(summarized), int(lost), [LifecycleAction(*a) for a in recent]
            )
        if "o" in wire:
            ctx.overflow = [
                SegmentRef(_bin(d), int(n), int(s), int(q), _num(ts))
                for d, n, s, q, ts in wire["o"]
            ]
        if "u" in wire:
            ctx.bound_user = _bin(wire["u"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise InvalidContext(f"payload is not a valid context: {type(exc).__name__}") from None
    if len(ctx.session_id) != 16 or not isinstance(ctx.summary, str):
        raise InvalidContext("payload is not a valid context")
    ctx.opened_version = original
    return ctx


__all__ = ["CURRENT_VERSION", "MIGRATIONS", "from_wire", "migrate", "migration", "to_wire"]


# Public names for the turn wire helpers (the overflow segment store packs turns the
# same way the token does).
turn_to_wire = _turn_to_wire
turn_from_wire = _turn_from_wire
