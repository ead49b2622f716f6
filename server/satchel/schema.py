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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn

from . import serialize
from .app_schema import MAX_METADATA_DEPTH, check_version, registrar
from .context import (
    ROLES,
    SESSION_ID_BYTES,
    Context,
    Lifecycle,
    LifecycleAction,
    OpaqueBlock,
    Pinned,
    SegmentRef,
    ToolCall,
    Turn,
    binary_size,
    check_session_id,
    key_name,
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
            raise MigrationFailed(
                f"no migration from schema version {version}", from_version=version
            )
        try:
            wire = step(wire)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MigrationFailed(
                f"migrating schema {version} -> {version + 1} failed: {type(exc).__name__}",
                from_version=version,
            ) from None
        version += 1
        # The step's result is checked as the step's: a list, None, or a map without
        # its version is the migration's mistake, not a corrupt token.
        try:
            produced: int | None = version_of(wire)
        except InvalidContext:
            produced = None
        if produced != version:
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


class _Walked:
    """Within :func:`values_walked_once`: the context, and whether its values passed."""

    __slots__ = ("ctx", "passed")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.passed = False


_walked: ContextVar[_Walked | None] = ContextVar("satchel_values_walked", default=None)


@contextmanager
def values_walked_once(ctx: Context) -> Iterator[None]:
    """Within this block, ``ctx``'s metadata and its turns with tool calls or blocks
    are walked by the first :func:`to_wire` that the caller confirms with
    :func:`values_passed` (the codec's ``prepare``, once it succeeds), not again.

    For a save that measures the token several times (the byte budget, the hard cap):
    each walk is proportional to the values, and a key holder's token of a million
    empty maps made every measurement cost seconds. The caller promises not to add
    turns or change metadata inside the block; the summary, pinned items, lifecycle
    record and plain turns are still checked every time.
    """
    with _walking(_Walked(ctx)):
        yield


@contextmanager
def _walking(state: _Walked) -> Iterator[None]:
    reset = _walked.set(state)
    try:
        yield
    finally:
        _walked.reset(reset)


@contextmanager
def values_walked_like(trial: Context, original: Context) -> Iterator[None]:
    """Within this block, ``trial`` (a shallow copy of ``original`` holding some of its
    turns, to measure a context without the others) needs no walk if ``original``
    passed one inside :func:`values_walked_once`: the same metadata, a subset of the
    same turns. Else ``trial`` is walked as any context is."""
    state = _walked.get()
    if state is None or not state.passed or state.ctx is not original:
        yield
        return
    walked = _Walked(trial)
    walked.passed = True
    with _walking(walked):
        yield


def values_passed(ctx: Context) -> None:
    """``ctx`` sealed: inside :func:`values_walked_once`, its values need no new walk."""
    state = _walked.get()
    if state is not None and state.ctx is ctx:
        state.passed = True


def _values_trusted(ctx: Context) -> bool:
    state = _walked.get()
    return state is not None and state.passed and state.ctx is ctx


def to_wire(
    ctx: Context, limits: Limits = DEFAULT_LIMITS, *, next_seq: bool = False
) -> dict[str, Any]:
    """The current-version wire map of ``ctx``. Empty fields are left out.

    ``next_seq``: write ``ctx.seq + 1``, the sequence number sealing gives the token.

    Raises :class:`~satchel.errors.ContextNotSerializable`, naming the place, for what
    would not read back (see :func:`check_sealable`). The checks ride on the mapping
    itself, which reads the same fields anyway, and use the readers :func:`from_wire`
    opens them with (so the two cannot drift apart); string lengths are left to the
    caller, who sees the packed size (no string is longer than the whole payload).
    """
    trusted = _values_trusted(ctx)
    try:
        if len(ctx.turns) > limits.max_array_len:
            raise _NotSealable
        turns = [
            [_ROLE_INDEX[t.role], t.content, t.ts]
            if type(t.content) is str
            # an int is finite: one test for the usual whole-second time (add_turn's)
            and (type(t.ts) is int or (type(t.ts) is float and t.ts - t.ts == 0))
            and not (t.tool_calls or t.blocks or t.tool_call_id is not None or t.name is not None)
            else _turn_to_wire(t)
            if trusted
            else _checked_turn_to_wire(t, limits)
            for t in ctx.turns
        ]
    except (KeyError, AttributeError, TypeError, _NotSealable):  # a bad role, not a Turn...
        _refuse(ctx, limits)
    problem = _fields_problem(ctx, limits, walk_metadata=not trusted)
    if problem is not None:
        raise _not_sealable(problem)
    try:
        sid, created, active = ctx.session_id, ctx.created_at, ctx.last_active
        seq = ctx.seq + 1 if next_seq else ctx.seq
        # The check open() runs; a sealed sequence number is 1 or more.
        _check_required(sid, seq, created, active, 1 if next_seq else 0)
        wire: dict[str, Any] = {
            "v": CURRENT_VERSION,
            "i": sid,
            "q": seq,
            "c": created,
            "a": active,
            "t": turns,
        }
        if ctx.metadata_version:
            wire["mv"] = check_version(ctx.metadata_version)
        lc = ctx.lifecycle
        if lc.dropped or lc.summarized or lc.lost or lc.recent:
            wire["l"] = _lifecycle_to_wire(lc, limits)
        if ctx.overflow:
            wire["o"] = _overflow_to_wire(ctx.overflow, limits)
        if ctx.bound_user is not None:
            wire["u"] = _bin(ctx.bound_user)
        if ctx.parent is not None:
            wire["p"] = _parent(ctx.parent)
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise _not_sealable(
            _header_problem(ctx, limits, next_seq=next_seq) or "a field does not read back"
        ) from None
    if ctx.summary:
        wire["s"] = ctx.summary
    pinned = ctx.pinned
    if pinned.system or pinned.facts:
        wire["P"] = [pinned.system or "", list(pinned.facts)]
    if ctx.metadata:
        wire["m"] = ctx.metadata
    if ctx.marked or ctx.mark_id is not None:
        wire["h"] = True
    try:
        if ctx.mark_id is not None:
            # A key of its own: replicas of the release before ignore it (a rolling deploy).
            wire["H"] = _mark_id(ctx.mark_id)
        if ctx.mark_parent is not None:
            wire["Hp"] = _mark_id(ctx.mark_parent)
    except (TypeError, ValueError) as exc:
        raise _not_sealable(f"mark_id / mark_parent: {exc}") from None
    return wire


# The readers below check one field of the payload. Opening (from_wire) and sealing
# (to_wire) use the same ones, so a context seals exactly when its token would open.


def _bin(value: Any) -> bytes:
    # Never bytes(value): bytes(10**12) would allocate a terabyte.
    if type(value) is not bytes:
        raise TypeError("expected bytes (a msgpack bin)")
    return value


#: bytes in a monotonic mark id (``Context.mark_id``)
MARK_ID_BYTES = 16
#: bytes in a parent digest (``p``: the last bytes of the MAC or tag of a token)
PARENT_BYTES = 12


def _fixed_bin(value: Any, size: int, what: str) -> bytes:
    if len(_bin(value)) != size:
        raise ValueError(f"{what} is {size} bytes")
    return value


def _mark_id(value: Any) -> bytes:
    return _fixed_bin(value, MARK_ID_BYTES, "a mark id")


def _parent(value: Any) -> bytes:
    return _fixed_bin(value, PARENT_BYTES, "a parent digest")


def _num(value: Any) -> float:
    # value - value is 0 for every int and finite float, NaN for NaN and the infinities
    # (a NaN time would switch the idle and max-age checks off: NaN compares false).
    if type(value) not in (int, float) or value - value != 0:
        raise TypeError("expected a finite number, an int or float")
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("expected a str")
    return value


#: Sequence numbers are below this, in tokens and in what is sealed (a msgpack int64
#: that no reader can misread): one at 2**63 - 1 would open but could not be sealed
#: again, its next number being past the int64.
SEQ_LIMIT = 2**63 - 1


def _seq(value: Any) -> int:
    if type(value) is not int or not 0 <= value < SEQ_LIMIT:
        raise TypeError("expected a sequence number, an int from 0 to 2**63 - 2")
    return value


def _check_required(sid: Any, q: Any, c: Any, a: Any, first_seq: int = 0) -> None:
    """The required fields but the turns (``i``, ``q``, ``c``, ``a``): session id,
    sequence number (at least ``first_seq``) and the two times; TypeError.

    One call for all four, as every open and every seal runs it. The same rules, one
    field at a time (check_session_id, _seq, _num), name the field in
    :func:`_header_problem` when this refuses.
    """
    if (
        type(sid) is not bytes
        or len(sid) != SESSION_ID_BYTES
        or type(q) is not int
        or not first_seq <= q < SEQ_LIMIT
        or type(c) not in _NUMBER_TYPES
        or type(a) not in _NUMBER_TYPES
        or c - c != 0  # NaN or infinite (_num)
        or a - a != 0
    ):
        raise TypeError("the session id, sequence number or times")


def _extra_str(extra: dict[str, Any], key: str) -> str | None:
    """An optional str field of a turn's extras: absent is None; present, it is a str
    (the writer leaves out what is None, and a nil is no str: section 6 of
    docs/token-format.md refuses a field of another type, never skips it)."""
    if key not in extra:
        return None
    value = extra[key]
    if type(value) is not str:
        raise TypeError(f"the turn's {key!r} is a str")
    return value


_NUMBER_TYPES = (int, float)


def _lifecycle_to_wire(lc: Lifecycle, limits: Limits, *, full: bool = False) -> list[Any]:
    """``lc``'s wire array; ValueError, naming the part, if it would not open.

    The record as Satchel keeps it (str keys, int counts, actions of str, int and
    number) opens as it is; anything else (an app's, or a hostile token's that opened)
    is put to the msgpack limits and to the reader that opens it. ``full``: always.
    """
    wire: list[Any] = [
        lc.dropped,
        lc.summarized,
        lc.lost,
        [[a.policy, a.action, a.turns, a.ts, a.detail] for a in lc.recent],
    ]
    dropped, summarized, lost, recent = wire
    if (
        type(summarized) is int
        and type(lost) is int
        and type(dropped) is dict
        and not (
            -_COUNT_LIMIT <= summarized <= _COUNT_LIMIT
            and -_COUNT_LIMIT <= lost <= _COUNT_LIMIT
            and all(
                type(v) is not int or -_COUNT_LIMIT <= v <= _COUNT_LIMIT for v in dropped.values()
            )
            and all(type(a[2]) is not int or -_COUNT_LIMIT <= a[2] <= _COUNT_LIMIT for a in recent)
        )
    ):
        # A count the reader refuses (past 2**62: only a key holder's token gets there,
        # and a save then adds to it) is written at the limit, not sealed into a token
        # its own codec refuses on every later request.
        wire = dropped, summarized, lost, recent = [
            {k: _saturated(v) for k, v in dropped.items()},
            _saturated(summarized),
            _saturated(lost),
            [[p, a, _saturated(n), ts, d] for p, a, n, ts, d in recent],
        ]
    if (
        full
        or type(dropped) is not dict
        or type(summarized) is not int
        or type(lost) is not int
        or len(dropped) > limits.max_map_len
        or len(recent) > limits.max_array_len
        or not all(type(k) is str and type(v) is int for k, v in dropped.items())
        or not all(
            type(p) is str
            and type(a) is str
            and type(n) is int
            and type(ts) in _NUMBER_TYPES
            and ts - ts == 0  # finite
            and type(d) is str
            for p, a, n, ts, d in recent
        )
    ):
        _check_reads_back(wire, _LIFECYCLE_PARTS, "lifecycle.", limits)
        # What the reader leaves out is not written either (an app's action of other
        # types): the token holds what opens, and opens to what it holds.
        wire[3] = [a for a in recent if _is_action(a)]
    return wire


def _is_action(a: list[Any]) -> bool:
    """An action as the format has it: ``[str, str, int, finite number, str]`` (a NaN
    time would reach the app's JSON as ``NaN``, which browsers refuse to parse)."""
    return (
        len(a) == 5
        and type(a[0]) is str
        and type(a[1]) is str
        and type(a[2]) is int
        and type(a[3]) in _NUMBER_TYPES
        and a[3] - a[3] == 0  # finite: NaN and infinities are not
        and type(a[4]) is str
    )


def _actions_from_wire(recent: Any) -> list[LifecycleAction]:
    # Releases before 2026-11-28 sealed whatever an app put here. The record is a log
    # of the newest few actions: one of other types (a bin policy, a map for a detail,
    # three fields) is left out, rather than failing every later save, or opening as a
    # record that Context.to_dict cannot make JSON of (a 500 at the app's edge).
    if type(recent) is not list:  # "", b"" or {} iterated as no actions
        raise TypeError("the lifecycle actions are an array")
    actions = []
    # Strings this short pass the length check without being encoded.
    short = DEFAULT_LIMITS.max_str_bytes // 4
    for a in recent:
        if type(a) is not list:  # a str of five characters would unpack as five fields
            raise TypeError("a lifecycle action is an array")
        action = LifecycleAction(*a)  # a wrong shape is an invalid context, as before
        if _is_action(a) and (  # read without walking it (every request opens some)
            len(a[0]) + len(a[1]) + len(a[4]) <= short
            or _value_problem(a, "action", DEFAULT_LIMITS, 0) is None
        ):
            actions.append(action)
    return actions


#: Counts are held within +-2**62 when opened: what msgpack packs, with room for the
#: counts a pipeline adds before the next seal (a count at 2**64 - 1 opened, and the
#: next trim could not be sealed).
_COUNT_LIMIT = 2**62


def _saturated(value: Any) -> Any:
    """An int count within what :func:`_count` reads; anything else as it is."""
    if type(value) is int:
        return max(-_COUNT_LIMIT, min(value, _COUNT_LIMIT))
    return value


def _count(value: Any) -> int:
    """A count as docs/token-format.md section 6 reads it: an int, or a finite float
    read as an int. Never a str, bin or bool (``int()`` alone would take all three)."""
    if type(value) is float:
        value = int(value)  # ValueError / OverflowError for NaN and infinities
    elif type(value) is not int:
        raise TypeError(f"a count is an int, not {type(value).__name__}")
    if not -_COUNT_LIMIT <= value <= _COUNT_LIMIT:  # it must seal again
        raise ValueError("a count past what a token carries")
    return value


def _dropped_from_wire(dropped: Any) -> dict[str, int]:
    # Counts by policy name: anything else would fail later, in the pipeline (a 500).
    if type(dropped) is not dict or not all(type(k) is str for k in dropped):
        raise TypeError("lifecycle dropped is a map of str to int")
    return {k: _count(n) for k, n in dropped.items()}


#: The parts of the lifecycle array, and how each is read.
_LIFECYCLE_PARTS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("dropped", _dropped_from_wire),
    ("summarized", _count),
    ("lost", _count),
    ("recent", _actions_from_wire),
)


def _lifecycle_from_wire(wire: Any) -> Lifecycle:
    dropped, summarized, lost, recent = wire
    return Lifecycle(
        _dropped_from_wire(dropped), _count(summarized), _count(lost), _actions_from_wire(recent)
    )


def _overflow_to_wire(
    refs: list[SegmentRef], limits: Limits, *, full: bool = False
) -> list[list[Any]]:
    """The overflow references' wire arrays, checked as :func:`_lifecycle_to_wire` is."""
    wire: list[list[Any]] = [[r.digest, r.turns, r.size, r.seq, r.ts] for r in refs]
    if (
        full
        or len(wire) > limits.max_array_len
        or not all(
            type(d) is bytes
            and type(n) is int
            and type(size) is int
            and type(q) is int
            and type(ts) in _NUMBER_TYPES
            and ts - ts == 0
            for d, n, size, q, ts in wire
        )
    ):
        for j, ref in enumerate(wire):
            _check_reads_back(ref, _SEGMENT_REF_PARTS, f"overflow[{j}].", limits)
    _check_reference_count(len(wire))
    return wire


def _segment_ref_from_wire(ref: Any) -> SegmentRef:
    d, n, s, q, ts = ref
    return SegmentRef(_bin(d), _count(n), _count(s), _count(q), _num(ts))


_SEGMENT_REF_PARTS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("digest", _bin),
    ("turns", _count),
    ("size", _count),
    ("seq", _count),
    ("ts", _num),
)


def _overflow_from_wire(wire: Any) -> list[SegmentRef]:
    if type(wire) is not list:  # "", b"" or {} iterated as no references
        raise TypeError("the overflow references are an array")
    _check_reference_count(len(wire))
    return [_segment_ref_from_wire(ref) for ref in wire]


#: The most overflow references a token holds. Satchel keeps at most 24
#: (pipeline.MAX_HELD_SEGMENT_REFS; before 2026-11-28, while segments could not be read,
#: a few more). A key holder's token naming one segment 20,000 times rehydrated it
#: 20,000 times: 277 characters made a 172 MB response. Each reference is read, so a
#: segment named twice is allowed (two identical exchanges spilled in one second make
#: the same bytes in signed mode, which has no nonce), but not without bound.
MAX_OVERFLOW_REFS = 64


def _check_reference_count(count: int) -> None:
    if count > MAX_OVERFLOW_REFS:
        raise ValueError(f"more than {MAX_OVERFLOW_REFS} overflow references")


def _check_reads_back(
    wire: list[Any], parts: tuple[tuple[str, Callable[[Any], Any]], ...], at: str, limits: Limits
) -> None:
    """ValueError naming the first part of ``wire`` that msgpack's bounded unpack or
    the part's reader (the one opening uses) would refuse."""
    for (name, read), value in zip(parts, wire, strict=True):
        problem = _value_problem(value, at + name, limits, 0)
        if problem is not None:
            raise ValueError(problem)
        try:
            read(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"{at}{name} is {_describe(value)}, which does not read back"
            ) from None


def turns_from_wire(wires: list[Any]) -> list[Turn]:
    """Turns from their wire arrays, checked like :func:`_turn_from_wire`.

    Most turns are plain ``[role, content, ts]``; they are built inline, without a
    call per turn, because opening a token builds every turn it holds.
    """
    return [
        Turn(_ROLE_OF[w[0]], w[1], w[2])
        if len(w) == 3
        and type(w[0]) is int  # True and 1.0 are keys of _ROLE_OF too (they hash as 1)
        and type(w[1]) is str
        # an int is finite: one test for the usual whole-second time
        and (type(w[2]) is int or (type(w[2]) is float and w[2] - w[2] == 0))
        else _turn_from_wire(w)
        for w in wires
    ]


#: the keys of a turn's extras map (docs/token-format.md)
_EXTRA_KEYS = frozenset({"c", "i", "b", "n"})


def _turn_from_wire(w: list[Any]) -> Turn:
    if type(w) is not list or len(w) not in (3, 4):
        raise ValueError("a turn is an array of 3 or 4")
    content = w[1]
    if type(content) is not str:
        raise TypeError("turn content")
    if type(w[0]) is not int:  # True and 1.0 would find a role: held to the type
        raise TypeError("turn role is an int")
    if len(w) == 3:
        return Turn(_ROLE_OF[w[0]], content, _turn_time(w[2]))
    extra = w[3]
    if type(extra) is not dict or not extra.keys() <= _EXTRA_KEYS:
        raise TypeError("turn extras")
    return Turn(
        _ROLE_OF[w[0]],
        content,
        _turn_time(w[2]),
        tool_calls=tuple(
            ToolCall(_str(i), _str(n), _arguments(a)) for i, n, a in _triples(extra, "c")
        ),
        tool_call_id=_extra_str(extra, "i"),
        blocks=tuple(
            OpaqueBlock(_str(t), d if type(d) is str else _bin(d), _str(p))
            for t, d, p in _triples(extra, "b")
        ),
        name=_extra_str(extra, "n"),
    )


def _turn_time(value: Any) -> float:
    # A NaN or infinite turn time: releases before 2026-11-28 sealed what add_turn was
    # given. It opens, as 0 (a turn's time is shown, never checked); sealing refuses it.
    if type(value) is float and value - value != 0:
        return 0
    return _num(value)


def _list(extra: dict[str, Any], key: str) -> list[Any]:
    value = extra.get(key, [])
    if type(value) is not list:
        raise TypeError(f"turn extras {key!r} is an array")
    return value


def _triples(extra: dict[str, Any], key: str) -> list[list[Any]]:
    """The entries of ``extra[key]``, each an array of 3 (a tool call, a block). Any
    other iterable of 3 (a str, a map) would unpack too, and open coerced."""
    entries = _list(extra, key)
    for entry in entries:
        if type(entry) is not list or len(entry) != 3:
            raise TypeError(f"turn extras {key!r} holds arrays of 3")
    return entries


def _arguments(value: Any) -> str | dict[str, Any]:
    # Tool-call arguments are a str (JSON text, as most providers send them) or a map.
    if type(value) is str:
        return value
    if type(value) is not dict:
        raise TypeError("tool-call arguments are a str or a map")
    return _str_keyed(value)


def _str_keyed(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if every map in it has str keys; TypeError otherwise.

    msgpack's ``strict_map_key`` lets bin keys through as well as str. The format has
    str keys only (docs/token-format.md), and a context holding a bytes key could not
    be sealed again (``check_sealable``), so it is refused here, when it opens.
    """
    # Nesting too: the writer refuses containers MAX_METADATA_DEPTH deep (_value_problem)
    # and a reader walking such a value recurses (to_dict), so neither opens.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_METADATA_DEPTH:
            raise ValueError("nested deeper than the writer seals")
        if type(item) is dict:
            for key, inner in item.items():
                if type(key) is not str:
                    raise TypeError("map keys are str")
                if type(inner) is dict or type(inner) is list:
                    stack.append((inner, depth + 1))
        else:  # a list
            stack.extend((x, depth + 1) for x in item if type(x) is dict or type(x) is list)
    return value


# -- what can be sealed ---------------------------------------------------------------


class _NotSealable(Exception):
    """A turn failed its check inside the mapping; :func:`_refuse` finds and names it."""


def _not_sealable(problem: str) -> ContextNotSerializable:
    return ContextNotSerializable(f"the context cannot be sealed: {problem}")


#: The context field each key of the wire map holds (docs/token-format.md section 6).
_WIRE_FIELDS = {
    "v": "schema_version",
    "i": "session_id",
    "q": "seq",
    "c": "created_at",
    "a": "last_active",
    "t": "turns",
    "mv": "metadata_version",
    "l": "lifecycle",
    "o": "overflow",
    "u": "bound_user",
    "p": "parent",
    "s": "summary",
    "P": "pinned",
    "m": "metadata",
    "h": "marked",
    "H": "mark_id",
    "Hp": "mark_parent",
}
_TURN_FIELDS = ("role", "content", "ts")
_EXTRA_FIELDS = {"c": "tool_calls", "i": "tool_call_id", "b": "blocks", "n": "name"}


def unpackable_part(wire: dict[str, Any]) -> str | None:
    """Where msgpack refuses ``wire`` (what :func:`to_wire` made), as the context field
    at fault (``turns[3].tool_calls[0].arguments['city']``) with msgpack's reason; None
    if it packs. For the error message of a seal that failed: the slow path only."""
    for key, value in wire.items():
        name = _WIRE_FIELDS.get(key, key)
        if key == "t" and type(value) is list:
            for i, turn in enumerate(value):
                for j, part in enumerate(turn):
                    if j < len(_TURN_FIELDS):
                        found = _unpackable(part, f"turns[{i}].{_TURN_FIELDS[j]}")
                    else:  # the extras map
                        found = None
                        for extra_key, extra in part.items():
                            where = f"turns[{i}].{_EXTRA_FIELDS.get(extra_key, extra_key)}"
                            found = found or _unpackable(extra, where)
                    if found is not None:
                        return found
            continue
        found = _unpackable(value, name)
        if found is not None:
            return found
    return None


def _unpackable(value: Any, where: str) -> str | None:
    try:
        serialize.pack(value)
        return None
    except (TypeError, ValueError, OverflowError) as exc:
        reason = str(exc)
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unpackable(item, f"{where}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for n, (key, item) in enumerate(value.items()):
            named = key_name(key, n) if isinstance(key, str) else f"<key #{n}>"
            found = _unpackable(key, f"{where}: key {named}") or _unpackable(
                item, f"{where}[{named}]"
            )
            if found is not None:
                return found
    return f"{where}: {reason}"


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
    trusted = _values_trusted(ctx)
    for i, t in enumerate(turns):
        where = f"turns[{i}]"
        if trusted and isinstance(t, Turn):
            problem = _turn_problem(t, where, limits)  # its text; not its extras again
        else:
            problem = _one_turn_problem(t, where, limits)
        if problem is not None:
            return problem
    return _fields_problem(ctx, limits, walk_metadata=not trusted) or _header_problem(ctx, limits)


def _one_turn_problem(t: Any, where: str, limits: Limits) -> str | None:
    """What in one turn would not read back, or None."""
    if not isinstance(t, Turn):
        return f"{where} is {type(t).__name__}, not Turn"
    return _turn_problem(t, where, limits) or _extras_problem(t, where, limits)


def _describe(value: Any) -> str:
    """A value for an error message: ints as they are (counts, times, versions), the
    rest by type (and bytes by length), never content."""
    if type(value) is int:
        return str(value)
    if type(value) is bytes:
        return f"{len(value)} bytes"
    return type(value).__name__


#: The byte fields to_wire writes when they are set, and their readers.
_OPTIONAL_BIN_FIELDS: tuple[tuple[str, Callable[[Any], bytes]], ...] = (
    ("bound_user", _bin),
    ("parent", _parent),
    ("mark_id", _mark_id),
    ("mark_parent", _mark_id),
)


def _header_problem(ctx: Context, limits: Limits, *, next_seq: bool = False) -> str | None:
    """What in the context's own fields (id, sequence number, times, versions, user
    binding, lifecycle record, overflow references) would not read back, or None.

    The slow path of :func:`to_wire`: each field through its reader again, to name it.
    """
    readers: list[tuple[str, Callable[[Any], Any]]] = [
        ("session_id", check_session_id),
        ("seq", _seq),
        ("created_at", _num),
        ("last_active", _num),
    ]
    # The optional fields, when to_wire writes them.
    if ctx.metadata_version:
        readers.append(("metadata_version", check_version))
    readers += [(n, r) for n, r in _OPTIONAL_BIN_FIELDS if getattr(ctx, n) is not None]
    for name, read in readers:
        value = getattr(ctx, name)
        try:
            read(value)
        except (TypeError, ValueError) as exc:
            return f"{name} is {_describe(value)}: {exc}"
    if next_seq and ctx.seq + 1 >= SEQ_LIMIT:
        return f"seq is {ctx.seq}: sealing would pass the largest sequence number"
    lc = ctx.lifecycle
    if not isinstance(lc, Lifecycle):
        return f"lifecycle is {type(lc).__name__}, not Lifecycle"
    if lc.dropped or lc.summarized or lc.lost or lc.recent:  # else not written (to_wire)
        if not isinstance(lc.recent, list | tuple):
            return f"lifecycle.recent is {type(lc.recent).__name__}, not a list"
        for j, action in enumerate(lc.recent):
            if not isinstance(action, LifecycleAction):
                return f"lifecycle.recent[{j}] is {type(action).__name__}, not LifecycleAction"
        try:
            _lifecycle_to_wire(lc, limits, full=True)
        except ValueError as exc:
            return str(exc)
    if ctx.overflow:
        if not isinstance(ctx.overflow, list | tuple):
            return f"overflow is {type(ctx.overflow).__name__}, not a list"
        if len(ctx.overflow) > limits.max_array_len:
            return f"overflow has more than {limits.max_array_len} references"
        for j, ref in enumerate(ctx.overflow):
            if not isinstance(ref, SegmentRef):
                return f"overflow[{j}] is {type(ref).__name__}, not SegmentRef"
        try:
            _overflow_to_wire(ctx.overflow, limits, full=True)
        except ValueError as exc:
            return str(exc)
    return None


_LIST_OR_TUPLE = (list, tuple)  # a tuple: ``list | tuple`` builds a union on every call


def _fields_problem(ctx: Context, limits: Limits, *, walk_metadata: bool = True) -> str | None:
    """Everything but the turns: summary, pinned items, metadata (``walk_metadata``:
    False once :func:`values_walked_once` has seen it pass)."""
    # None reads as "" (empty fields are left out of the token). An empty str, the
    # usual summary and system prompt, passes _str_problem: not called for it.
    summary = ctx.summary
    if summary is not None and (type(summary) is not str or summary):
        problem = _str_problem(summary, "summary", limits)
        if problem is not None:
            return problem
    pinned = ctx.pinned
    if not isinstance(pinned, Pinned):
        return f"pinned is {type(pinned).__name__}, not Pinned"
    system = pinned.system
    if system is not None and (type(system) is not str or system):
        problem = _str_problem(system, "pinned.system", limits)
        if problem is not None:
            return problem
    facts = pinned.facts
    if not isinstance(facts, _LIST_OR_TUPLE):
        return f"pinned.facts is {type(facts).__name__}, not a list"
    if facts:
        if len(facts) > limits.max_array_len:
            return f"pinned.facts has more than {limits.max_array_len} items"
        for i, fact in enumerate(facts):
            problem = _str_problem(fact, f"pinned.facts[{i}]", limits)
            if problem is not None:
                return problem
    if ctx.metadata and walk_metadata:
        if not isinstance(ctx.metadata, dict):
            return f"metadata is {type(ctx.metadata).__name__}, not dict"
        return _value_problem(ctx.metadata, "metadata", limits, 0)
    return None


def _turn_problem(t: Turn, where: str, limits: Limits) -> str | None:
    if t.role not in _ROLE_INDEX:
        return f"{where}.role is {t.role!r}, not one of {', '.join(ROLES)}"
    if type(t.ts) not in _NUMBER_TYPES or t.ts - t.ts != 0:
        return f"{where}.ts is {_describe(t.ts)}, not a finite number"
    return _str_problem(t.content, f"{where}.content", limits)


def _extras_problem(t: Turn, where: str, limits: Limits) -> str | None:
    for items, name in ((t.tool_calls, "tool_calls"), (t.blocks, "blocks")):
        if not isinstance(items, tuple | list):
            return f"{where}.{name} is {type(items).__name__}, not a tuple"
        if len(items) > limits.max_array_len:
            return f"{where}.{name} has more than {limits.max_array_len} items"
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


def metadata_problem(metadata: Any, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``metadata`` could not be sealed and opened again as it is (the reason names
    the place and type at fault, never a value), or None."""
    if not isinstance(metadata, dict):
        return f"metadata is {type(metadata).__name__}, not a dict"
    return _value_problem(metadata, "metadata", limits, 0)


def _value_problem(value: Any, where: str, limits: Limits, depth: int) -> str | None:
    """What makes ``value`` (metadata, tool arguments) not come back as it went in."""
    if value is None or isinstance(value, bool | int | float):
        return None
    if isinstance(value, str):
        return _str_problem(str(value), where, limits)
    if isinstance(value, bytes | bytearray | memoryview):
        if isinstance(value, memoryview) and not value.contiguous:
            return f"{where} is a memoryview that is not contiguous (msgpack cannot pack it)"
        if binary_size(value) > limits.max_str_bytes:
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
        for n, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                return (
                    f"{where} has a {type(key).__name__} key: map keys must be str, or the "
                    "token does not open again"
                )
            problem = _str_problem(key, f"{where}: key {key_name(key, n)}", limits)
            if problem is None:
                problem = _value_problem(item, f"{where}[{key_name(key, n)}]", limits, depth + 1)
            if problem is not None:
                return problem
        return None
    return (
        f"{where} is {type(value).__name__}: metadata takes str, int, float, bool, None, "
        "bytes, and lists and str-keyed dicts of those"
    )


def from_wire(wire: Any) -> Context:
    """A Context from a wire map of any supported version (migrations run first)."""
    if type(wire) is dict and wire.get("v") == CURRENT_VERSION and type(wire["v"]) is int:
        original = CURRENT_VERSION  # the common case: nothing to migrate
    else:
        wire, original = migrate(wire)
    try:
        sid, seq, created, active, turns = wire["i"], wire["q"], wire["c"], wire["a"], wire["t"]
        _check_required(sid, seq, created, active)
        if type(turns) is not list:
            raise TypeError("the turns are an array")
        ctx = Context(
            session_id=sid,
            seq=seq,
            parent=_parent(wire["p"]) if "p" in wire else None,
            created_at=created,
            last_active=active,
            schema_version=CURRENT_VERSION,
            turns=turns_from_wire(turns),
            summary=wire.get("s", ""),
        )
        if "P" in wire:
            system, facts = wire["P"]
            if type(facts) is not list:
                raise TypeError("pinned facts")
            ctx.pinned = Pinned(_str(system), [_str(f) for f in facts])
        if "m" in wire:
            if type(wire["m"]) is not dict:
                raise TypeError("metadata")
            ctx.metadata = _str_keyed(wire["m"])
        if "mv" in wire:
            ctx.metadata_version = check_version(wire["mv"])
        if "l" in wire:
            ctx.lifecycle = _lifecycle_from_wire(wire["l"])
        if "o" in wire:
            ctx.overflow = _overflow_from_wire(wire["o"])
        if "u" in wire:
            ctx.bound_user = _bin(wire["u"])
        if "h" in wire:
            if type(wire["h"]) is not bool:
                raise TypeError("marked")
            ctx.marked = wire["h"]
        if "H" in wire:
            ctx.mark_id = _mark_id(wire["H"])
        if "Hp" in wire:
            ctx.mark_parent = _mark_id(wire["Hp"])
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
        OverflowError,
        RecursionError,  # a reader walking a payload nested deeper than Python recurses
    ) as exc:
        raise InvalidContext(f"payload is not a valid context: {type(exc).__name__}") from None
    if not isinstance(ctx.summary, str):
        raise InvalidContext("payload is not a valid context")
    ctx.opened_version = original
    return ctx


__all__ = [
    "CURRENT_VERSION",
    "MIGRATIONS",
    "check_sealable",
    "from_wire",
    "metadata_problem",
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
