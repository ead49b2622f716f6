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
  version 2 payloads read unchanged); later still, the optional ``h`` (true once a
  ``monotonic`` route has set the session's high-water mark; absent means false).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from .app_schema import check_version, registrar
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
from .errors import ContextNotSerializable, InvalidContext, MigrationFailed, UnsupportedVersion
from .limits import DEFAULT_LIMITS, Limits

CURRENT_VERSION = 2
Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}
_ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}
_ROLE_OF = dict(enumerate(ROLES))


def migration(from_version: int) -> Callable[[Migration], Migration]:
    """Register ``fn`` as the migration from ``from_version`` to ``from_version + 1``."""
    return registrar(MIGRATIONS, from_version, "migration")


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


def to_wire(ctx: Context, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The current-version wire map of ``ctx``. Empty fields are left out.

    Raises :class:`~satchel.errors.ContextNotSerializable`, naming the place, for what
    would not read back (see :func:`check_sealable`). The turn checks ride on the
    mapping itself, which reads the same fields anyway; string lengths are left to the
    caller, who sees the packed size (no string is longer than the whole payload).
    """
    if len(ctx.turns) > limits.max_array_len:
        _refuse(ctx, limits)
    try:
        turns = [
            [_ROLE_INDEX[t.role], t.content, t.ts]
            if type(t.content) is str
            and type(t.ts) in _NUMBER_TYPES
            and not (t.tool_calls or t.blocks or t.tool_call_id is not None or t.name is not None)
            else _checked_turn_to_wire(t, limits)
            for t in ctx.turns
        ]
    except (KeyError, AttributeError, TypeError, _NotSealable):  # a bad role, not a Turn...
        _refuse(ctx, limits)
    problem = _fields_problem(ctx, limits)
    if problem is not None:
        raise _not_sealable(problem)
    wire: dict[str, Any] = {
        "v": CURRENT_VERSION,
        "i": ctx.session_id,
        "q": ctx.seq,
        "c": ctx.created_at,
        "a": ctx.last_active,
        "t": turns,
    }
    if ctx.parent is not None:
        wire["p"] = ctx.parent
    if ctx.summary:
        wire["s"] = ctx.summary
    pinned = ctx.pinned
    if pinned.system or pinned.facts:
        wire["P"] = [pinned.system or "", list(pinned.facts)]
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
    if ctx.marked:
        wire["h"] = True
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
        tool_calls=tuple(ToolCall(str(i), str(n), _arguments(a)) for i, n, a in extra.get("c", ())),
        tool_call_id=_opt_str(extra.get("i")),
        blocks=tuple(
            OpaqueBlock(str(t), d if type(d) is str else _bin(d), str(p))
            for t, d, p in extra.get("b", ())
        ),
        name=_opt_str(extra.get("n")),
    )


def _arguments(value: Any) -> str | dict[str, Any]:
    # A map stays a map; anything else was a string (str() keeps early tokens opening).
    return value if type(value) is dict or type(value) is str else str(value)


# -- what can be sealed ---------------------------------------------------------------


class _NotSealable(Exception):
    """A turn failed its check inside the mapping; :func:`_refuse` finds and names it."""


def _not_sealable(problem: str) -> ContextNotSerializable:
    return ContextNotSerializable(f"the context cannot be sealed: {problem}")


def _checked_turn_to_wire(t: Turn, limits: Limits) -> list[Any]:
    if _one_turn_problem(t, "turn", limits) is not None:
        raise _NotSealable
    return _turn_to_wire(t)


def _refuse(ctx: Context, limits: Limits) -> NoReturn:
    check_sealable(ctx, limits)  # raises, naming the turn (with its index) at fault
    raise _not_sealable("a turn cannot be carried")


def check_sealable(ctx: Context, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a context whose token its own codec could not open again.

    msgpack packs more than the reader accepts: a map with int keys packs but is
    refused by the bounded unpack (``strict_map_key``); a str opaque block packs where
    a bin was expected; a string past ``limits.max_str_bytes`` packs and is refused on
    the way back; a dict where a ToolCall belongs fails half way through. Sealing any
    of these would issue a token that breaks the conversation on its next request, so
    it is refused here, where the app's mistake is, with the place named. Raises
    :class:`~satchel.errors.ContextNotSerializable`.
    """
    problem = _context_problem(ctx, limits)
    if problem is not None:
        raise _not_sealable(problem)


def _context_problem(ctx: Context, limits: Limits) -> str | None:
    turns = ctx.turns
    if type(turns) is not list:
        return f"turns is {type(turns).__name__}, not list"
    if len(turns) > limits.max_array_len:
        return f"{len(turns)} turns, more than the {limits.max_array_len} a token opens with"
    for i, t in enumerate(turns):
        problem = _one_turn_problem(t, f"turns[{i}]", limits)
        if problem is not None:
            return problem
    return _fields_problem(ctx, limits)


def _one_turn_problem(t: Any, where: str, limits: Limits) -> str | None:
    """What in one turn would not read back, or None."""
    if not isinstance(t, Turn):
        return f"{where} is {type(t).__name__}, not Turn"
    return _turn_problem(t, where, limits) or _extras_problem(t, where, limits)


def _fields_problem(ctx: Context, limits: Limits) -> str | None:
    """Everything but the turns: summary, pinned items, metadata."""
    # None reads as "" (empty fields are left out of the token).
    if ctx.summary is not None:
        problem = _str_problem(ctx.summary, "summary", limits)
        if problem is not None:
            return problem
    pinned = ctx.pinned
    if not isinstance(pinned, Pinned):
        return f"pinned is {type(pinned).__name__}, not Pinned"
    if pinned.system is not None:
        problem = _str_problem(pinned.system, "pinned.system", limits)
        if problem is not None:
            return problem
    if not isinstance(pinned.facts, list | tuple):
        return f"pinned.facts is {type(pinned.facts).__name__}, not a list"
    for i, fact in enumerate(pinned.facts):
        problem = _str_problem(fact, f"pinned.facts[{i}]", limits)
        if problem is not None:
            return problem
    if ctx.metadata:
        if not isinstance(ctx.metadata, dict):
            return f"metadata is {type(ctx.metadata).__name__}, not dict"
        return _value_problem(ctx.metadata, "metadata", limits, 0)
    return None


def _turn_problem(t: Turn, where: str, limits: Limits) -> str | None:
    if t.role not in _ROLE_INDEX:
        return f"{where}.role is {t.role!r}, not one of {', '.join(ROLES)}"
    if type(t.ts) not in _NUMBER_TYPES:
        return f"{where}.ts is {type(t.ts).__name__}, not a number"
    return _str_problem(t.content, f"{where}.content", limits)


def _extras_problem(t: Turn, where: str, limits: Limits) -> str | None:
    for j, call in enumerate(t.tool_calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, ToolCall):
            return f"{at} is {type(call).__name__}, not ToolCall"
        problem = _str_problem(call.id, f"{at}.id", limits) or _str_problem(
            call.name, f"{at}.name", limits
        )
        if problem is not None:
            return problem
        if type(call.arguments) is dict:
            problem = _value_problem(call.arguments, f"{at}.arguments", limits, 0)
        else:
            problem = _str_problem(call.arguments, f"{at}.arguments (str or dict)", limits)
        if problem is not None:
            return problem
    for j, block in enumerate(t.blocks):
        at = f"{where}.blocks[{j}]"
        if not isinstance(block, OpaqueBlock):
            return f"{at} is {type(block).__name__}, not OpaqueBlock"
        data = block.data
        if type(data) is bytes:
            problem = None if len(data) <= limits.max_str_bytes else f"{at}.data is too long"
        else:
            problem = _str_problem(data, f"{at}.data (bytes or str)", limits)
        problem = (
            problem
            or _str_problem(block.type, f"{at}.type", limits)
            or _str_problem(block.provider, f"{at}.provider", limits)
        )
        if problem is not None:
            return problem
    for value, name in ((t.tool_call_id, "tool_call_id"), (t.name, "name")):
        if value is not None:
            problem = _str_problem(value, f"{where}.{name}", limits)
            if problem is not None:
                return problem
    return None


def _str_problem(value: Any, where: str, limits: Limits) -> str | None:
    if type(value) is not str:
        return f"{where} is {type(value).__name__}, not str"
    if len(value) * 4 > limits.max_str_bytes:  # shorter, no str can pass it in UTF-8
        # surrogatepass: only the length matters here; the packer refuses a lone
        # surrogate itself, as ContextNotSerializable.
        if len(value.encode("utf-8", "surrogatepass")) > limits.max_str_bytes:
            return f"{where} is longer than the {limits.max_str_bytes} bytes a token opens with"
    return None


#: Deeper than this, msgpack's packer refuses anyway; say so with the place named.
MAX_METADATA_DEPTH = 64


def _value_problem(value: Any, where: str, limits: Limits, depth: int) -> str | None:
    """What makes ``value`` (metadata, tool arguments) not come back as it went in."""
    if value is None or isinstance(value, bool | int | float):
        return None
    if isinstance(value, str):
        return _str_problem(str(value), where, limits)
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > limits.max_str_bytes:
            return f"{where} is longer than the {limits.max_str_bytes} bytes a token opens with"
        return None
    if depth >= MAX_METADATA_DEPTH:
        return f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels"
    if isinstance(value, list | tuple):
        if len(value) > limits.max_array_len:
            return f"{where} has more than {limits.max_array_len} items"
        for i, item in enumerate(value):
            problem = _value_problem(item, f"{where}[{i}]", limits, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        if len(value) > limits.max_map_len:
            return f"{where} has more than {limits.max_map_len} entries"
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"{where} has a {type(key).__name__} key: map keys must be str, or the "
                    "token does not open again"
                )
            problem = _value_problem(item, f"{where}[{key!r}]", limits, depth + 1)
            if problem is not None:
                return problem
        return None
    return (
        f"{where} is {type(value).__name__}: metadata takes str, int, float, bool, None, "
        "bytes, and lists and str-keyed dicts of those"
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
        if "h" in wire:
            if type(wire["h"]) is not bool:
                raise TypeError("marked")
            ctx.marked = wire["h"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise InvalidContext(f"payload is not a valid context: {type(exc).__name__}") from None
    if len(ctx.session_id) != 16 or not isinstance(ctx.summary, str):
        raise InvalidContext("payload is not a valid context")
    ctx.opened_version = original
    return ctx


__all__ = [
    "CURRENT_VERSION",
    "MIGRATIONS",
    "check_sealable",
    "from_wire",
    "migrate",
    "migration",
    "to_wire",
]


def turn_to_wire(t: Turn, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """One turn's wire array, checked as :func:`to_wire` checks the token's (the overflow
    segment store packs turns the same way the token does)."""
    problem = _one_turn_problem(t, "turn", limits)
    if problem is not None:
        raise ContextNotSerializable(f"the turn cannot be stored: {problem}")
    return _turn_to_wire(t)


turn_from_wire = _turn_from_wire
