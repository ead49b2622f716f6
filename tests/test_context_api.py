"""The Context API apps call: Context.new and add_turn check their arguments up front."""

from __future__ import annotations

from typing import Any

import pytest
from markupsafe import Markup

from satchel import Codec, Context, Keyring, OpaqueBlock, ToolCall
from satchel.errors import InvalidText, InvalidValue

NOW = 1_767_225_600
CODEC = Codec(Keyring.generate("ctx"))


# -- Context.new ---------------------------------------------------------------------------


def test_new_takes_a_16_byte_session_id_or_makes_a_random_one() -> None:
    sid = bytes(range(16))
    assert Context.new(session_id=sid).session_id == sid
    a, b = Context.new(), Context.new()
    assert len(a.session_id) == 16 and a.session_id != b.session_id


@pytest.mark.parametrize(
    ("session_id", "error", "message"),
    [
        # b"" used to get a random id silently; the others made contexts whose every
        # token open() refused (token_invalid_context).
        (b"", ValueError, "16 bytes, not 0"),
        (b"12345678", ValueError, "16 bytes, not 8"),
        (bytes(17), ValueError, "16 bytes, not 17"),
        ("ab" * 16, TypeError, r"not str \(bytes.fromhex"),
        (bytearray(16), TypeError, "not bytearray"),
        (16, TypeError, "not int"),
    ],
)
def test_new_refuses_a_session_id_no_token_can_carry(
    session_id: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Context.new(session_id=session_id)


@pytest.mark.parametrize("now", ["2026-01-01", b"1", True, [1]])
def test_new_refuses_a_time_that_is_not_a_number(now: Any) -> None:
    with pytest.raises(TypeError, match="now is Unix seconds"):
        Context.new(now=now)


def test_new_keeps_int_and_float_times() -> None:
    assert Context.new(now=NOW).created_at == NOW
    assert Context.new(now=NOW + 0.5).last_active == NOW + 0.5


# -- add_turn ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ts": "2024-01-01"}, TypeError, "ts is Unix seconds, an int or float, not str"),
        ({"ts": True}, TypeError, "ts is Unix seconds"),
        ({"tool_calls": [{"id": "c1", "name": "f"}]}, TypeError, r"tool_calls\[0\] is dict"),
        ({"tool_calls": ToolCall("c1", "f")}, TypeError, "not a single ToolCall"),
        ({"tool_calls": 3}, TypeError, "tool_calls is a list of ToolCall, not int"),
        ({"blocks": [b"raw"]}, TypeError, r"blocks\[0\] is bytes, not OpaqueBlock"),
        ({"tool_call_id": 7}, TypeError, "tool_call_id is a str or None, not int"),
        ({"name": b"fn"}, TypeError, "name is a str or None, not bytes"),
        ({"name": "\ud800"}, InvalidText, "name is not valid Unicode"),
        ({"role": "robot"}, ValueError, "role must be one of"),
        ({"content": None}, TypeError, "turn content must be a str"),
    ],
)
def test_a_refused_turn_leaves_the_context_as_it_was(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """add_turn("user", "hello", ts="2024-01-01") used to append the turn, then fail in
    max() with a bare TypeError: the half-added turn made every later seal fail."""
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "first", ts=NOW)
    args = {"role": "user", "content": "hello", **kwargs}
    with pytest.raises(error, match=message):
        ctx.add_turn(args.pop("role"), args.pop("content"), **args)
    assert [t.content for t in ctx.turns] == ["first"]
    assert ctx.last_active == NOW
    assert CODEC.open(CODEC.seal(ctx)).turns[0].content == "first"


def test_add_turn_takes_any_iterable_of_calls_and_blocks() -> None:
    ctx = Context.new(now=NOW)
    turn = ctx.add_turn(
        "assistant",
        "",
        ts=NOW + 1,
        tool_calls=(c for c in [ToolCall("c1", "f", {"x": 1})]),
        blocks=[OpaqueBlock("thinking", b"\x00\x01", "anthropic")],
    )
    assert turn.tool_calls == (ToolCall("c1", "f", {"x": 1}),)
    assert ctx.last_active == NOW + 1
    assert CODEC.open(CODEC.seal(ctx)).turns[0] == turn


def test_str_subclasses_go_in_as_plain_str_and_round_trip() -> None:
    """add_turn took markupsafe.Markup as it was; the seal then refused it
    ("turns[0].content is Markup, not str")."""

    class Role(str):
        pass

    ctx = Context.new(now=NOW)
    turn = ctx.add_turn(
        Role("tool"),  # type: ignore[arg-type]
        Markup("<b>18°C</b>"),
        ts=NOW,
        tool_call_id=Markup("c1"),
        name=Markup("weather"),
    )
    for value in (turn.role, turn.content, turn.tool_call_id, turn.name):
        assert type(value) is str
    assert turn.content == "<b>18°C</b>"
    opened = CODEC.open(CODEC.seal(ctx)).turns[0]
    assert (opened.role, opened.content, opened.tool_call_id, opened.name) == (
        "tool",
        "<b>18°C</b>",
        "c1",
        "weather",
    )


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), float("-inf")])
def test_a_turn_time_that_is_no_time_is_refused(ts: float) -> None:
    """The reader refuses non-finite times (a NaN time disables the age checks), so
    add_turn does, where the mistake is made."""
    from satchel import Context

    ctx = Context.new()
    with pytest.raises(ValueError, match="finite"):
        ctx.add_turn("user", "hi", ts=ts)
    with pytest.raises(ValueError, match="finite"):
        Context.new(now=ts)
    assert ctx.turns == []


@pytest.mark.parametrize(
    ("part", "error", "named"),
    [
        ("ToolCall('c1', 'f', '\\ud800')", "InvalidText", r"tool_calls\[0\].arguments"),
        ("ToolCall(1, 'f')", "TypeError", r"tool_calls\[0\].id"),
        ("ToolCall('c1', None)", "TypeError", r"tool_calls\[0\].name"),
        ("ToolCall('c1', 'f', 3)", "TypeError", r"tool_calls\[0\].arguments"),
        ("OpaqueBlock('thinking', bytearray(b'x'))", "TypeError", r"blocks\[0\].data"),
        ("OpaqueBlock('think\\udc00ing', b'x')", "InvalidText", r"blocks\[0\].type"),
        ("OpaqueBlock('thinking', b'x', provider=7)", "TypeError", r"blocks\[0\].provider"),
        # Anthropic's input map, as a request body can carry it: walked like a str.
        ("ToolCall('c1', 'f', {'q': 'cut \\ud83d'})", "InvalidText", r"arguments\['q'\]"),
        ("ToolCall('c1', 'f', {'a': [{'\\udc00': 1}]})", "InvalidText", r"\['a'\]\[0\] key"),
        ("ToolCall('c1', 'f', {'n': 2**64})", "InvalidValue", r"arguments\['n'\].*64 bits"),
        ("ToolCall('c1', 'f', {'n': [-(2**63) - 1]})", "InvalidValue", r"arguments\['n'\]\[0\]"),
        ("ToolCall('c1', 'f', deep(70))", "InvalidValue", r"nested deeper than 64"),
        ("ToolCall('c1', 'f', {1: 'x'})", "TypeError", r"arguments has a int key"),
        # What the token's reader refuses at the default Limits: refused as it enters.
        ("ToolCall('c1', 'f', {str(i): i for i in range(2001)})", "InvalidValue", "2000 entr"),
        ("ToolCall('c1', 'f', {'rows': [0] * 20_001})", "InvalidValue", r"\['rows'\] has more"),
        ("ToolCall('c1', 'f', {'doc': 'é' * 300_000})", "InvalidValue", r"\['doc'\] is longer"),
        ("ToolCall('c1', 'f', {Markup('k'): 1})", "TypeError", "Markup key"),
        # A memoryview by its bytes, not its items; a strided one msgpack cannot pack.
        (
            "ToolCall('c1', 'f', {'v': memoryview(array('q', bytes(560_000)))})",
            "InvalidValue",
            "longer",
        ),
        ("ToolCall('c1', 'f', {'v': memoryview(b'abcdef')[::2]})", "InvalidValue", "contiguous"),
        ("ToolCall('c1', 'f', {'when': object()})", "TypeError", r"arguments\['when'\] is object"),
    ],
)
def test_add_turn_checks_the_fields_of_tool_calls_and_blocks(
    part: str, error: str, named: str
) -> None:
    """They were taken as they came, and the context then refused to seal: a 500 far
    from the mistake instead of a 400 invalid_text where it happened."""

    def deep(levels: int) -> dict:
        value: dict = {}
        for _ in range(levels):
            value = {"x": value}
        return value

    from array import array

    from markupsafe import Markup

    names = {
        "ToolCall": ToolCall,
        "OpaqueBlock": OpaqueBlock,
        "deep": deep,
        "Markup": Markup,
        "array": array,
    }
    made = eval(part, names)
    kind = {"InvalidText": InvalidText, "InvalidValue": InvalidValue, "TypeError": TypeError}[error]
    ctx = Context.new()
    where = {"tool_calls": [made]} if isinstance(made, ToolCall) else {"blocks": [made]}
    with pytest.raises(kind, match=named):
        ctx.add_turn("assistant", "", **where)  # type: ignore[arg-type]
    assert not ctx.turns


def test_to_dict_is_json_even_with_nan_in_metadata_or_tool_arguments() -> None:
    """json.dumps wrote NaN and Infinity bare, which a browser's JSON.parse refuses: the
    chat page could not read its own /api/context."""
    import json
    import math

    ctx = Context.new()
    ctx.metadata["score"] = math.nan
    ctx.metadata["bounds"] = [-math.inf, 1.5]
    ctx.add_turn("assistant", "", tool_calls=[ToolCall("c1", "f", {"x": math.inf})])
    text = json.dumps(ctx.to_dict(), allow_nan=False)  # raises on NaN or infinity
    view = json.loads(text)
    assert view["metadata"] == {"score": None, "bounds": [None, 1.5]}
    assert view["turns"][0]["tool_calls"][0]["arguments"] == {"x": None}


def test_to_dict_is_json_with_bytearray_or_memoryview_in_metadata() -> None:
    """seal() takes bytearray and memoryview (they open as bytes); to_dict(), "JSON-ready",
    wrote only bytes as hex, and a view returning it answered 500."""
    import json

    ctx = Context.new()
    ctx.metadata["a"] = bytearray(b"\x01\x02")
    ctx.metadata["m"] = [memoryview(b"\xff")]
    assert json.loads(json.dumps(ctx.to_dict()))["metadata"] == {"a": "0102", "m": ["ff"]}


def test_join_surrogate_pairs_joins_halves_and_leaves_lone_ones() -> None:
    """Shared by satchel.stream and the chat example's model: an emoji split across two
    deltas is joined; a lone half stays (check_text refuses it); plain text is kept."""
    from satchel.context import check_text, join_surrogate_pairs

    assert join_surrogate_pairs("hi \ud83d" + "\ude00!") == "hi \U0001f600!"
    check_text(join_surrogate_pairs("\ud83d\ude00"))
    assert join_surrogate_pairs("lone \ud83d") == "lone \ud83d"
    text = "plain é"
    assert join_surrogate_pairs(text) is text


@pytest.mark.parametrize("content", [None, 5, ["hi"], {"text": "hi"}])
def test_a_user_turn_that_is_not_text_is_invalid_turn(content: Any) -> None:
    """A user turn's text often comes straight from a request body: refused with a type
    of its own (a 400 at the HTTP edge), still the TypeError it was."""
    from satchel.errors import InvalidRequest, InvalidTurn

    ctx = Context.new()
    with pytest.raises(InvalidTurn) as refused:
        ctx.add_turn("user", content)
    assert isinstance(refused.value, InvalidRequest)
    assert isinstance(refused.value, TypeError)
    assert isinstance(refused.value, ValueError)
    assert refused.value.code == "invalid_turn" and refused.value.status == 400
    assert ctx.turns == []


@pytest.mark.parametrize(
    ("role", "content", "error"),
    [("assistant", None, TypeError), ("tool", 5, TypeError), ("assistent", "hi", ValueError)],
)
def test_the_apps_own_turns_of_the_wrong_type_are_no_request_error(
    role: Any, content: Any, error: type[Exception]
) -> None:
    """A model's reply that is None, a role typo: the app's bug, a 500 with its
    traceback, not a 400 blaming the request (nor InvalidTurn's handler, which logs
    nothing)."""
    from satchel.errors import SatchelError

    with pytest.raises(error) as refused:
        Context.new().add_turn(role, content)
    assert not isinstance(refused.value, SatchelError)
