"""Schema: the wire map field by field, migrations, validation, bounded msgpack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from satchel import Context, OpaqueBlock, SegmentRef, ToolCall, schema, serialize
from satchel.errors import (
    ContextNotSerializable,
    InvalidContext,
    MigrationFailed,
    TokenTooLarge,
    UnsupportedVersion,
)
from satchel.limits import Limits

SID = bytes(range(16))
NOW = 1_767_225_600


def _nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def base_wire(**extra: Any) -> dict[str, Any]:
    return {"v": 2, "i": SID, "q": 1, "c": NOW, "a": NOW, "t": [], **extra}


def v1_wire(**extra: Any) -> dict[str, Any]:
    return {"version": 1, "session_id": SID.hex(), **extra}


# -- schema 2, the current layout ---------------------------------------------------------


def test_empty_context_writes_only_the_required_short_keys() -> None:
    ctx = Context.new(now=NOW, session_id=SID)
    assert schema.to_wire(ctx) == {"v": 2, "i": SID, "q": 0, "c": NOW, "a": NOW, "t": []}
    assert schema.CURRENT_VERSION == 2


def test_every_field_has_its_documented_key_and_shape() -> None:
    ctx = Context.new(now=NOW, session_id=SID)
    ctx.parent = b"p" * 12
    ctx.summary = "sum"
    ctx.pinned.system = "sys"
    ctx.pinned.facts = ["f1"]
    ctx.metadata = {"k": 1}
    ctx.overflow = [SegmentRef(b"d" * 12, 3, 100, 2, NOW)]
    ctx.bound_user = b"u" * 16
    ctx.add_turn("user", "plain", ts=NOW)
    ctx.add_turn(
        "assistant",
        "",
        ts=NOW + 1,
        tool_calls=[ToolCall("c1", "fn", "{}")],
        blocks=[OpaqueBlock("thinking", b"\x00\xff", "anthropic")],
    )
    ctx.add_turn("tool", "42", ts=NOW + 2, tool_call_id="c1", name="fn")
    from satchel import LifecycleAction

    ctx.lifecycle.record(LifecycleAction("window", "dropped", 2, NOW + 0.7, "x"))
    ctx.lifecycle.summarized = 2
    wire = schema.to_wire(ctx)
    assert wire == {
        "v": 2,
        "i": SID,
        "q": 0,
        "c": NOW,
        "a": NOW + 2,
        "t": [
            [1, "plain", NOW],
            [
                2,
                "",
                NOW + 1,
                {"c": [["c1", "fn", "{}"]], "b": [["thinking", b"\x00\xff", "anthropic"]]},
            ],
            [3, "42", NOW + 2, {"i": "c1", "n": "fn"}],
        ],
        "p": b"p" * 12,
        "s": "sum",
        "P": ["sys", ["f1"]],
        "m": {"k": 1},
        "l": [{"window": 2}, 2, 0, [["window", "dropped", 2, NOW, "x"]]],
        "o": [[b"d" * 12, 3, 100, 2, NOW]],
        "u": b"u" * 16,
    }
    back = schema.from_wire(serialize.unpack(serialize.pack(wire)))
    assert back.turns == ctx.turns
    assert back.pinned == ctx.pinned
    assert back.lifecycle == ctx.lifecycle
    assert back.overflow == ctx.overflow
    assert back.bound_user == ctx.bound_user
    assert back.opened_version == 2


def test_role_indexes() -> None:
    for index, role in enumerate(("system", "user", "assistant", "tool")):
        assert schema.from_wire(base_wire(t=[[index, "x", 0]])).turns[0].role == role


# -- schema 1, the 0.0 preview --------------------------------------------------------------


def test_v1_migrates_field_by_field() -> None:
    old = v1_wire(
        seq=4,
        created=NOW - 10,
        updated=NOW,
        system_prompt="Be nice.",
        summary="earlier",
        metadata={"a": 1},
        turns=[
            {"role": "user", "content": "hi", "ts": NOW - 5},
            {"role": "assistant", "content": "hello"},
        ],
    )
    ctx = schema.from_wire(old)
    assert ctx.opened_version == 1
    assert ctx.schema_version == 2
    assert ctx.session_id == SID
    assert (ctx.seq, ctx.created_at, ctx.last_active) == (4, NOW - 10, NOW)
    assert ctx.pinned.system == "Be nice." and ctx.pinned.facts == []
    assert ctx.summary == "earlier"
    assert ctx.metadata == {"a": 1}
    assert [(t.role, t.content, t.ts) for t in ctx.turns] == [
        ("user", "hi", NOW - 5),
        ("assistant", "hello", 0),
    ]


def test_v1_defaults() -> None:
    ctx = schema.from_wire(v1_wire(created=NOW))
    assert (ctx.seq, ctx.created_at, ctx.last_active, ctx.turns) == (0, NOW, NOW, [])


@pytest.mark.parametrize(
    "old",
    [
        {"version": 1},  # no session id
        v1_wire(session_id="not hex"),
        v1_wire(session_id=12),
        v1_wire(turns=[{"content": "no role"}]),
        v1_wire(turns=[{"role": "user"}]),  # no content
        v1_wire(turns=[{"role": "wizard", "content": "x"}]),
        v1_wire(turns=["not a map"]),
        v1_wire(turns=5),
    ],
)
def test_v1_missing_or_broken_required_fields_fail_migration(old: dict[str, Any]) -> None:
    with pytest.raises(MigrationFailed) as info:
        schema.from_wire(old)
    assert info.value.code == "token_migration_failed"
    assert info.value.facts["from_version"] == 1


@pytest.mark.parametrize("version", [0, -1, 3, 99, 2**40])
def test_unknown_versions_are_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        schema.from_wire(base_wire(v=version))
    assert info.value.code == "token_unsupported_version"


@pytest.mark.parametrize("wire", [[], "v2", {"v": "2"}, {"v": True}, {"t": []}, {"v": None}])
def test_no_usable_version_is_invalid_context(wire: Any) -> None:
    with pytest.raises(InvalidContext):
        schema.from_wire(wire)


def test_migration_chain_runs_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding schema 3 is one function registered for version 2; older tokens chain."""
    seen: list[int] = []
    original = schema.MIGRATIONS[1]

    def one_to_two(w: dict[str, Any]) -> dict[str, Any]:
        seen.append(1)
        return original(w)

    def two_to_three(w: dict[str, Any]) -> dict[str, Any]:
        seen.append(2)
        return {**w, "v": 3, "new": True}

    monkeypatch.setattr(schema, "CURRENT_VERSION", 3)
    monkeypatch.setitem(schema.MIGRATIONS, 1, one_to_two)
    monkeypatch.setitem(schema.MIGRATIONS, 2, two_to_three)
    wire, original_version = schema.migrate(v1_wire())
    assert original_version == 1
    assert seen == [1, 2]
    assert wire["v"] == 3 and wire["new"] is True


def test_a_migration_that_skips_a_version_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.MIGRATIONS, 1, lambda w: {"v": 7})
    with pytest.raises(MigrationFailed):
        schema.migrate(v1_wire())
    monkeypatch.delitem(schema.MIGRATIONS, 1)
    with pytest.raises(MigrationFailed):
        schema.migrate(v1_wire())


@pytest.mark.parametrize(
    "returns",
    [lambda w: [1, 2], lambda w: None, lambda w: {"turns": []}, lambda w: {**w, "v": True}],
    ids=["a list", "None", "no version", "a bool version"],
)
def test_a_migration_that_returns_the_wrong_shape_failed_as_a_migration(
    monkeypatch: pytest.MonkeyPatch, returns: Callable[[Any], Any]
) -> None:
    # Reported as a corrupt token (token_invalid_context) before: the developer was sent
    # to look at the token, not at their migration.
    monkeypatch.setitem(schema.MIGRATIONS, 1, returns)
    with pytest.raises(MigrationFailed, match="did not produce version 2"):
        schema.migrate(v1_wire())


def test_registering_a_version_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        schema.migration(from_version=1)(lambda w: w)


# -- validation of authenticated payloads ---------------------------------------------------


@pytest.mark.parametrize(
    ("label", "wire"),
    [
        ("session id as a huge int", base_wire(i=10**15)),
        ("session id as int 16", base_wire(i=16)),
        ("session id as a list", base_wire(i=list(range(16)))),
        ("session id too short", base_wire(i=b"x")),
        ("seq as infinity", base_wire(q=float("inf"))),
        ("seq as a huge float", base_wire(q=1e300)),
        ("seq as a string", base_wire(q="1")),
        ("seq out of range", base_wire(q=2**64 - 1)),
        ("negative seq", base_wire(q=-1)),
        ("created as a string", base_wire(c="yesterday")),
        ("last active as nil", base_wire(a=None)),
        ("turn ts as a map", base_wire(t=[[1, "x", {}]])),
        ("tool call id as a list", base_wire(t=[[3, "x", 0, {"i": [1]}]])),
        ("name as a map", base_wire(t=[[3, "x", 0, {"n": {}}]])),
        ("block data as a huge int", base_wire(t=[[2, "x", 0, {"b": [["t", 10**15, "p"]]}]])),
        ("block data as a list", base_wire(t=[[2, "x", 0, {"b": [["t", ["text"], "p"]]}]])),
        ("overflow digest as int", base_wire(o=[[10**15, 1, 1, 1, 0]])),
        ("overflow ts as str", base_wire(o=[[b"d" * 12, 1, 1, 1, "now"]])),
        ("overflow count as infinity", base_wire(o=[[b"d" * 12, float("inf"), 1, 1, 0]])),
        ("bound user as int", base_wire(u=10**15)),
        ("summary as bytes", base_wire(s=b"x")),
        ("metadata as list", base_wire(m=[1])),
        ("lifecycle counters as infinity", base_wire(l=[{}, float("inf"), 0, []])),
        ("turns as a map", base_wire(t={"a": 1})),
        ("turn content as bytes", base_wire(t=[[1, b"x", 0]])),
        # Counts are ints (a float reads as an int), never coerced from str, bin or bool.
        ("lifecycle count as a str", base_wire(l=[{}, "3", 0, []])),
        ("lifecycle count as bin", base_wire(l=[{}, 0, b"4", []])),
        ("lifecycle count as a bool", base_wire(l=[{}, True, 0, []])),
        ("dropped count as a str", base_wire(l=[{"window": "2"}, 0, 0, []])),
        ("overflow count as a str", base_wire(o=[[b"d" * 12, "7", 1, 1, 0]])),
        ("overflow size as bin", base_wire(o=[[b"d" * 12, 1, b"9", 1, 0]])),
        ("overflow seq as a bool", base_wire(o=[[b"d" * 12, 1, 1, True, 0]])),
        # Past what msgpack packs: it opened, then could not be sealed again.
        ("lifecycle count past 2**64", base_wire(l=[{}, 1e30, 0, []])),
        ("dropped count past 2**64", base_wire(l=[{"window": 1e30}, 0, 0, []])),
        ("overflow count past 2**64", base_wire(o=[[b"d" * 12, 1e30, 1, 1, 0]])),
        # Found by an HTTP fuzz with the app's own key: each opened, then every save
        # of the conversation failed (a 500).
        ("a count with no room to grow", base_wire(l=[{}, 2**64 - 1, 0, []])),
        ("a sequence number that cannot be incremented", base_wire(q=2**63 - 1)),
        ("metadata nested 65 deep", base_wire(m={"x": _nested(64)})),
        (
            "tool arguments nested 65 deep",
            base_wire(t=[[2, "", 0, {"c": [["c1", "f", _nested(65)]]}]]),
        ),
        # Held to their types, not coerced: True and 1.0 hash as 1 (a dict lookup found
        # the role), and any iterable of the right length unpacked as an entry.
        ("turn role as true", base_wire(t=[[True, "x", 0]])),
        ("turn role as a float", base_wire(t=[[1.0, "x", 0]])),
        ("turn role as true, with extras", base_wire(t=[[True, "x", 0, {"n": "a"}]])),
        ("tool call as a str of three", base_wire(t=[[2, "x", 0, {"c": ["abc"]}]])),
        (
            "tool call as a map of three",
            base_wire(t=[[2, "x", 0, {"c": [{"a": 1, "b": 2, "c": 3}]}]]),
        ),
        ("block as a str of three", base_wire(t=[[2, "x", 0, {"b": ["abc"]}]])),
        ("lifecycle action as a str of five", base_wire(l=[{}, 0, 0, ["abcde"]])),
        # Map keys are str: a bin key opens through msgpack's strict_map_key, but a
        # context holding one could not be sealed again.
        ("metadata with a bin key", base_wire(m={b"k": 1})),
        ("nested metadata with a bin key", base_wire(m={"a": [{"b": {b"k": 1}}]})),
        (
            "tool arguments with a bin key",
            base_wire(t=[[2, "", 0, {"c": [["c1", "f", {b"k": 1}]]}]]),
        ),
    ],
)
def test_authenticated_but_invalid_payloads_are_invalid_context(
    label: str, wire: dict[str, Any]
) -> None:
    # Without these checks, bytes(10**15) tries to allocate a petabyte and int(inf)
    # raises OverflowError: a 500, not a 4xx.
    with pytest.raises(InvalidContext):
        schema.from_wire(serialize.unpack(serialize.pack(wire)))


# -- serialize: msgpack with limits ------------------------------------------------------


def test_pack_keeps_bytes_and_str_apart_and_writes_no_ext() -> None:
    packed = serialize.pack({"s": "text", "b": b"bin"})
    assert serialize.unpack(packed) == {"s": "text", "b": b"bin"}
    assert b"\xc4\x03bin" in packed  # bin 8
    assert b"\xa4text" in packed  # fixstr


def _limits() -> Limits:
    return Limits(max_str_bytes=100, max_array_len=16, max_map_len=32)


@pytest.mark.parametrize(
    "data",
    [
        serialize.pack("x" * 101),
        serialize.pack(b"x" * 101),
        serialize.pack(list(range(17))),
        serialize.pack({str(i): i for i in range(33)}),
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4G elements, no body
        b"\xdf\xff\xff\xff\xff",
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp extension
        b"\xd4\x01\x00",  # application extension
        msgpack.packb({1: 2}),  # non-str key
        msgpack.packb(1) + msgpack.packb(2),  # trailing data
        b"\x91" * 5000 + b"\xc0",  # nesting depth
        b"\xc1",  # never used byte
        b"",
    ],
)
def test_unpack_refuses_what_the_limits_forbid(data: bytes) -> None:
    with pytest.raises(InvalidContext):
        serialize.unpack(data, _limits())


def test_unpack_refuses_input_larger_than_the_decompressed_cap() -> None:
    with pytest.raises(TokenTooLarge):
        serialize.unpack(b"\xc0" * 65, Limits(max_decompressed_bytes=64))


def test_unpack_at_the_limits_succeeds() -> None:
    limits = _limits()
    assert serialize.unpack(serialize.pack("x" * 100), limits) == "x" * 100
    assert serialize.unpack(serialize.pack(list(range(16))), limits) == list(range(16))
    assert len(serialize.unpack(serialize.pack({str(i): i for i in range(32)}), limits)) == 32


def test_check_sealable_names_a_field_the_reader_refuses() -> None:
    """check_sealable (the pipeline's way to name a seal failure) covers the context's
    own fields too, not only turns, text and metadata."""
    from satchel.errors import ContextNotSerializable
    from satchel.schema import check_sealable

    ctx = Context.new(now=NOW, session_id=SID)
    check_sealable(ctx)
    ctx.metadata_version = 2**31
    with pytest.raises(ContextNotSerializable, match="metadata_version is 2147483648"):
        check_sealable(ctx)


def test_float_counts_read_as_ints_everywhere_the_format_has_counts() -> None:
    """docs/token-format.md section 6: a float count is read as an int, in the
    dropped-by-reason map as in the other counts."""
    ctx = schema.from_wire(
        serialize.unpack(
            serialize.pack(
                base_wire(
                    l=[{"window": 2.0, "byte_budget": 2.7}, 1.5, 0.0, []],
                    o=[[b"d" * 12, 4.0, 90.0, 3.0, 0]],
                )
            )
        )
    )
    assert ctx.lifecycle.dropped == {"window": 2, "byte_budget": 2}
    assert (ctx.lifecycle.summarized, ctx.lifecycle.lost) == (1, 0)
    ref = ctx.overflow[0]
    assert (ref.turns, ref.size, ref.seq) == (4, 90, 3)
    assert all(type(n) is int for n in (ref.turns, ref.size, ref.seq))


def test_str_keyed_metadata_and_tool_arguments_still_open() -> None:
    wire = base_wire(
        m={"a": [{"b": {"c": b"bytes value"}}], "n": None},
        t=[[2, "", 0, {"c": [["c1", "f", {"q": [{"x": 1}]}]]}]],
    )
    ctx = schema.from_wire(serialize.unpack(serialize.pack(wire)))
    assert ctx.metadata == {"a": [{"b": {"c": b"bytes value"}}], "n": None}
    assert ctx.turns[0].tool_calls[0].arguments == {"q": [{"x": 1}]}


def test_metadata_as_deep_as_the_writer_seals_opens_and_seals_again() -> None:
    from satchel import Codec, Keyring

    ctx = schema.from_wire(serialize.unpack(serialize.pack(base_wire(m={"x": _nested(63)}))))
    Codec(Keyring.generate()).seal(ctx)  # 64 levels with the metadata map: sealable


def test_a_lifecycle_action_the_writer_would_not_seal_is_left_out_when_opened() -> None:
    """The record of recent actions is a log; releases before 2026-11-28 sealed what an
    app put there. An action that would not seal again is dropped, not kept to fail
    every later save (a 500) or the app's JSON of the context."""
    from satchel import Codec, Keyring

    recent = [["w", "dropped", 2, NOW, {b"k": 1}], ["w", "dropped", 2, NOW, "kept"]]
    ctx = schema.from_wire(serialize.unpack(serialize.pack(base_wire(l=[{}, 1, 0, recent]))))
    assert [a.detail for a in ctx.lifecycle.recent] == ["kept"]
    Codec(Keyring.generate()).seal(ctx)
    ctx.to_dict()


def test_a_lifecycle_action_at_a_time_that_is_not_finite_is_neither_read_nor_written() -> None:
    # A NaN time reached the app's JSON of the context as NaN (no browser parses it).
    import json

    from satchel import Codec, Keyring
    from satchel.context import LifecycleAction

    times = [float("nan"), float("inf"), -float("inf"), NOW, NOW + 0.5]
    recent = [["w", "dropped", 1, ts, str(i)] for i, ts in enumerate(times)]
    ctx = schema.from_wire(serialize.unpack(serialize.pack(base_wire(l=[{}, 1, 0, recent]))))
    assert [a.detail for a in ctx.lifecycle.recent] == ["3", "4"]
    codec = Codec(Keyring.generate())
    ctx.lifecycle.recent.append(LifecycleAction("w", "dropped", 1, float("nan"), "app's"))
    opened = codec.open(codec.seal(ctx))
    assert [a.detail for a in opened.lifecycle.recent] == ["3", "4"]
    json.loads(json.dumps(opened.to_dict(), allow_nan=False))


@pytest.mark.parametrize("chars", [1, 3])  # 4 bytes a character in UTF-8: over, or not
def test_a_lifecycle_action_is_kept_exactly_while_its_detail_would_open_again(
    chars: int,
) -> None:
    """Opening reads the usual actions without walking them; a detail past what a token
    opens with is still left out (the quick read must not take it)."""
    from satchel.limits import DEFAULT_LIMITS

    room = DEFAULT_LIMITS.max_str_bytes
    fits = "a" * (room - 8) + "\U0001f600" * 2  # room bytes exactly, len < room
    over = "a" * (room - 4 * chars) + "\U0001f600" * chars + "b"  # room + 1 bytes
    assert len(fits.encode()) == room and len(over.encode()) == room + 1
    recent = [["w", "dropped", 2, NOW, fits], ["w", "dropped", 2, NOW, over]]
    # Past the payload cap as a whole: the wire as unpacking would give it, uncapped.
    ctx = schema.from_wire(msgpack.unpackb(serialize.pack(base_wire(l=[{}, 1, 0, recent]))))
    assert [a.detail for a in ctx.lifecycle.recent] == [fits]


def test_lifecycle_counts_past_what_a_token_carries_are_written_saturated() -> None:
    """Counts of 2**62 opened, a save added to them, and the token sealed with 2**62 + 1
    was refused by its own codec (token_invalid_context) on every later request: the
    conversation locked out. A count is written at most the reader's limit."""
    from satchel import Codec, Keyring
    from satchel.context import LifecycleAction

    codec = Codec(Keyring.generate())
    ctx = Context.new()
    limit = 2**62
    ctx.lifecycle.summarized = limit + 1
    ctx.lifecycle.lost = -(2**70)
    ctx.lifecycle.dropped["window"] = 2**63
    ctx.lifecycle.recent.append(LifecycleAction("window", "dropped", limit * 3))
    opened = codec.open(codec.seal(ctx))
    assert opened.lifecycle.summarized == limit
    assert opened.lifecycle.lost == -limit
    assert opened.lifecycle.dropped == {"window": limit}
    assert opened.lifecycle.recent[-1].turns == limit


@pytest.mark.parametrize("empty", ["", b"", {}], ids=["str", "bin", "map"])
@pytest.mark.parametrize("field", ["o", "l3"])
def test_an_empty_value_of_the_wrong_type_is_refused_not_read_as_none(
    field: str, empty: Any
) -> None:
    """docs/token-format.md section 6: a field of another type is token_invalid_context,
    never coerced or skipped. An empty str, bin or map as the overflow references (or
    as the lifecycle record's actions) opened as none, where a non-empty one was
    refused."""
    wire = schema.to_wire(Context.new())
    if field == "o":
        wire["o"] = empty
    else:
        wire["l"] = [{}, 0, 0, empty]
    with pytest.raises(InvalidContext):
        schema.from_wire(wire)


def test_references_past_what_satchel_keeps_are_refused_both_ways() -> None:
    """A 277-character token naming one 6 KB segment 20,000 times rehydrated it 20,000
    times (a 172 MB response). A segment may be named twice (signed mode writes the same
    bytes for the same exchange in the same second), but a token holds at most
    MAX_OVERFLOW_REFS references, well past the 24 the pipeline keeps."""
    from satchel.pipeline import MAX_HELD_SEGMENT_REFS

    assert MAX_HELD_SEGMENT_REFS < schema.MAX_OVERFLOW_REFS
    ref = SegmentRef(b"d" * 12, 2, 300, 1, 1_767_225_600)
    ctx = Context.new()
    ctx.overflow = [ref] * schema.MAX_OVERFLOW_REFS  # named again and again: allowed
    wire = schema.to_wire(ctx)
    assert schema.from_wire(wire).overflow == [ref] * schema.MAX_OVERFLOW_REFS
    wire["o"] = [*wire["o"], wire["o"][0]]
    with pytest.raises(InvalidContext):
        schema.from_wire(wire)
    ctx.overflow.append(ref)
    with pytest.raises(ContextNotSerializable, match="overflow references"):
        schema.to_wire(ctx)


def test_a_memoryview_in_metadata_is_measured_in_bytes_and_must_be_contiguous() -> None:
    """len() of a memoryview counts items: 70,000 int64s (560,000 bytes) passed the
    512 KiB string check and sealed a token its codec refused; a strided view raised a
    bare BufferError from msgpack at seal (a 500 without the place named)."""
    from array import array

    ctx = Context.new()
    ctx.metadata["wide"] = memoryview(array("q", bytes(560_000)))
    with pytest.raises(ContextNotSerializable, match=r"wide.*longer"):
        schema.to_wire(ctx)
    ctx.metadata["wide"] = memoryview(b"abcdef")[::2]
    with pytest.raises(ContextNotSerializable, match=r"wide.*contiguous"):
        schema.to_wire(ctx)
