"""The conversation context: plain typed data, no I/O.

A :class:`Context` is what a view reads and changes; the codec turns it into a token
and back. Everything here is in memory and deterministic given the clock passed in.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from .errors import InvalidText, InvalidTurn, InvalidValue
from .limits import DEFAULT_LIMITS, MAX_METADATA_DEPTH

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
#: the lifecycle "policy" name under which turns moved to the overflow tier are counted
OVERFLOW_POLICY = "overflow"


@dataclass(slots=True)
class ToolCall:
    """A model's request to call a tool. ``arguments`` is kept as the provider sent it:
    a JSON string (OpenAI's ``function.arguments``) or a map (Anthropic's ``input``),
    and it opens as the same type."""

    id: str
    name: str
    arguments: str | dict[str, Any] = ""


@dataclass(slots=True)
class OpaqueBlock:
    """A provider block carried exactly (signed thinking, encrypted reasoning...).

    ``data`` is bytes or str (providers send signatures and encrypted reasoning as
    base64 strings) and opens as the same type, unchanged. Satchel never looks inside
    it; trimming moves or drops the turn that holds it as a whole and never edits it.
    """

    type: str
    data: bytes | str
    provider: str = ""


@dataclass(slots=True)
class Turn:
    """One message of the conversation.

    ``tool_calls`` are on assistant turns; ``tool_call_id`` names the call a ``tool``
    turn answers. ``blocks`` are opaque provider blocks. ``ts`` is Unix seconds
    (whole seconds by default: they cost 5 bytes in the token instead of 9).
    """

    role: Role
    content: str
    ts: float = 0.0
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    blocks: tuple[OpaqueBlock, ...] = ()
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: role, content, ts, and the parts that are set (opaque
        block data as its size, never its bytes)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content, "ts": self.ts}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "name": c.name, "arguments": _jsonable(c.arguments)}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.blocks:
            out["blocks"] = [
                {
                    "type": b.type,
                    "provider": b.provider,
                    "bytes": len(b.data.encode() if isinstance(b.data, str) else b.data),
                }
                for b in self.blocks
            ]
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(slots=True)
class Pinned:
    """What trimming never drops: the system prompt and pinned facts."""

    system: str = ""
    facts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: ``{"system": ..., "facts": [...]}``."""
        return {"system": self.system, "facts": list(self.facts)}


@dataclass(slots=True)
class SegmentRef:
    """A reference to turns moved to the overflow tier.

    The storage key is not stored: it is a keyed MAC of the session id and ``digest``,
    so a client cannot point a token at another session's segment. ``seq`` is the
    context sequence number at which the segment was written.
    """

    digest: bytes
    turns: int
    size: int
    seq: int = 0
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the digest as hex)."""
        return {
            "digest": self.digest.hex(),
            "turns": self.turns,
            "size": self.size,
            "seq": self.seq,
            "ts": self.ts,
        }


@dataclass(slots=True)
class LifecycleAction:
    """One thing a lifecycle policy did, for example ``window`` dropping 3 turns."""

    policy: str
    action: str
    turns: int = 0
    ts: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of this action."""
        return {
            "policy": self.policy,
            "action": self.action,
            "turns": self.turns,
            "ts": self.ts,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Lifecycle:
    """What the lifecycle policies did: running totals and the most recent actions."""

    #: turns removed from the token so far, by reason (window, token_budget, ...)
    dropped: dict[str, int] = field(default_factory=dict)
    #: turns summarized into the running summary so far
    summarized: int = 0
    #: turns lost without a copy anywhere (reported as data loss when it happens)
    lost: int = 0
    #: the last few actions, newest last (bounded, so the token stays small)
    recent: list[LifecycleAction] = field(default_factory=list)

    MAX_RECENT = 6

    def record(self, action: LifecycleAction) -> None:
        """Add ``action`` to the totals and to the bounded list of recent actions."""
        action.ts = int(action.ts)  # whole seconds: 5 bytes in the token, not 9
        if action.action in ("dropped", "overflowed", "lost") and action.turns:
            # Overflowed turns are kept under the "overflow" key: moved, not dropped.
            self.dropped[action.policy] = self.dropped.get(action.policy, 0) + action.turns
        self.recent.append(action)
        del self.recent[: -self.MAX_RECENT]

    @property
    def overflowed(self) -> int:
        """Turns moved to the overflow tier so far (kept there, not dropped)."""
        return self.dropped.get(OVERFLOW_POLICY, 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: totals by reason, overflowed, summarized, lost, recent."""
        return {
            "dropped": {k: v for k, v in self.dropped.items() if k != OVERFLOW_POLICY},
            "overflowed": self.overflowed,
            "summarized": self.summarized,
            "lost": self.lost,
            "recent": [a.to_dict() for a in self.recent],
        }


#: A session id is 16 bytes (32 hex characters in logs, ``Context.session``).
SESSION_ID_BYTES = 16


def new_session_id() -> bytes:
    """A fresh random session id: 16 bytes from ``os.urandom``."""
    return os.urandom(SESSION_ID_BYTES)


def check_session_id(value: object) -> bytes:
    """``value`` if it is a session id (16 bytes); else TypeError or ValueError.

    The one check behind :meth:`Context.new`, sealing and opening (the ``i`` of the
    payload), so no context can be made or sealed with an id its token would not
    open with.
    """
    if type(value) is not bytes:
        hint = (
            " (bytes.fromhex() turns 32 hex characters into one)" if isinstance(value, str) else ""
        )
        raise TypeError(
            f"a session id is {SESSION_ID_BYTES} bytes, not {type(value).__name__}{hint}"
        )
    if len(value) != SESSION_ID_BYTES:
        raise ValueError(f"a session id is {SESSION_ID_BYTES} bytes, not {len(value)}")
    return value


@dataclass(slots=True, eq=False)
class Context:
    """A conversation's state: turns, running summary, pinned items, app metadata.

    ``seq`` counts seals; ``parent`` is the digest of the token this context was last
    opened from or sealed to, so forks (two children of one token) are detectable.
    """

    session_id: bytes = field(default_factory=new_session_id)
    seq: int = 0
    parent: bytes | None = None
    created_at: float = 0.0
    last_active: float = 0.0
    schema_version: int = 0  # set by the schema module; the current version after a read
    turns: list[Turn] = field(default_factory=list)
    summary: str = ""
    pinned: Pinned = field(default_factory=Pinned)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: version of the shape of ``metadata`` (the app's; see satchel.app_schema)
    metadata_version: int = 0
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    overflow: list[SegmentRef] = field(default_factory=list)
    #: keyed hash of the user id this context is bound to, if any
    bound_user: bytes | None = None
    #: a ``monotonic`` route has set this session's high-water mark in the tier, so a
    #: token that says so and finds no mark there shows the tier lost it (a restart
    #: without persistence, an eviction): reported as ``consistency_reset``
    marked: bool = False
    #: the id of the newest ``monotonic`` save this token descends from (16 random
    #: bytes, minted by each such save and kept in the tier's mark). Routes at every
    #: level carry it forward unchanged, so a ``monotonic`` route can tell a token
    #: that descends from the newest save from an older one that another route took
    #: to a higher sequence number (which would otherwise roll the mark back)
    mark_id: bytes | None = None
    #: the mark id the save that minted ``mark_id`` was checked against: still
    #: accepted while the tier holds it, i.e. when that save could not move the mark
    #: (the tier failed the write and ``fail_open`` served the request anyway)
    mark_parent: bytes | None = None

    # Request-scoped facts, never serialized.
    #: key id the token was opened with (a different one than the current means reseal)
    opened_kid: str | None = field(default=None, repr=False)
    #: the parent digest the opened token carried (the token it was made from), before
    #: ``parent`` became the opened token's own: a token made from the one a monotonic
    #: mark names descends from it, whatever mark ids it carries
    opened_parent: bytes | None = field(default=None, repr=False)
    #: schema version the token had before migrations ran
    opened_version: int | None = field(default=None, repr=False)
    #: reasons this request was served degraded (tier down, segment missing, ...)
    degraded: list[str] = field(default_factory=list, repr=False)
    #: turns rehydrated from the overflow tier this request (not part of ``turns``)
    rehydrated: list[Turn] = field(default_factory=list, repr=False)
    #: notices for the app (fresh context started and why, migrations, forks)
    notices: list[str] = field(default_factory=list, repr=False)
    #: overflow references that could not be read this request, with the reason
    unreadable: list[tuple[SegmentRef, str]] = field(default_factory=list, repr=False)
    #: server-side modes: the stored bytes this context was loaded from (None: nothing
    #: was stored), so saving is a compare-and-set and no concurrent request's turns
    #: are overwritten
    stored_as: bytes | None = field(default=None, repr=False)
    #: server-side modes: a streamed reply held its claim on the stored state when this
    #: context was loaded, so this request may read it but not save over it
    stream_answering: bool = field(default=False, repr=False)
    #: server-side modes: the id of the claim this request's streamed reply holds on
    #: the stored state (its save passes it; any other save is refused meanwhile)
    claim_holder: bytes | None = field(default=None, repr=False)

    @classmethod
    def new(cls, *, now: float | None = None, session_id: bytes | None = None) -> Context:
        """A fresh, empty context: a random session id unless ``session_id`` (16 bytes)
        is given, created and last active at ``now`` (Unix seconds; default: now).

        Raises TypeError or ValueError for an id or time its token could not carry,
        here rather than on the first seal.
        """
        from .schema import CURRENT_VERSION  # schema depends on context, not the reverse

        if now is None:
            ts: float = int(time.time())
        else:
            ts = _check_time(now, "now")
        return cls(
            session_id=new_session_id() if session_id is None else check_session_id(session_id),
            created_at=ts,
            last_active=ts,
            schema_version=CURRENT_VERSION,
        )

    @property
    def session(self) -> str:
        """The session id as 32 hex characters."""
        return self.session_id.hex()

    def add_turn(
        self,
        role: Role,
        content: str,
        *,
        ts: float | None = None,
        tool_calls: Iterable[ToolCall] = (),
        tool_call_id: str | None = None,
        blocks: Iterable[OpaqueBlock] = (),
        name: str | None = None,
    ) -> Turn:
        """Append a turn and return it.

        Every argument is checked before anything changes, so a refused turn leaves the
        context as it was. Raises ValueError for an unknown role, TypeError for an
        argument of the wrong type, except a user turn's content that is not a str:
        :class:`~satchel.errors.InvalidTurn` (a TypeError and a ValueError, and a JSON
        400 ``invalid_turn`` at the HTTP edge, as that text most often comes straight
        from a request body); and :class:`~satchel.errors.InvalidText` (a
        ValueError, and a JSON 400 ``invalid_text`` at the HTTP edge) for text that is
        not valid Unicode; tool-call arguments given as a map are walked for it too, and
        an integer past 64 bits or nesting past 64 levels in them is
        :class:`~satchel.errors.InvalidValue` (400 ``invalid_value``). A str subclass
        (``markupsafe.Markup``, say) is stored as the plain str it holds: that is what
        the token carries and opens as.
        """
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str) and role == "user":
            # What a request body sent as its message ({"message": null}): the client's
            # mistake, a 400. Other roles' content is the app's own (a model's reply),
            # so a wrong type there stays a TypeError: a 500, logged, not blamed on the
            # request.
            raise InvalidTurn(
                f"turn content must be a str (the user's message), not {type(content).__name__}"
            )
        if not isinstance(content, str):
            raise TypeError(
                f"turn content must be a str (the turn's text), not {type(content).__name__}; "
                "carry other provider content parts (images, documents, thinking) as "
                "blocks=[OpaqueBlock(type, data, provider)]"
            )
        content = plain_str(content)
        if not content.isascii():
            check_text(content, "turn content")
        ts = int(time.time()) if ts is None else _check_time(ts, "ts")
        calls = _items_of(tool_calls, ToolCall, "tool_calls")
        opaque = _items_of(blocks, OpaqueBlock, "blocks")
        tool_call_id = _optional_text(tool_call_id, "tool_call_id")
        name = _optional_text(name, "name")
        last_active = max(self.last_active, ts)  # before the append: nothing half done
        turn = Turn(
            role=ROLES[ROLES.index(role)],  # the plain str, whatever str subclass came in
            content=content,
            ts=ts,
            tool_calls=calls,
            tool_call_id=tool_call_id,
            blocks=opaque,
            name=name,
        )
        self.turns.append(turn)
        self.last_active = last_active
        return turn

    def all_turns(self) -> list[Turn]:
        """Rehydrated overflow turns followed by the turns held in the token."""
        return [*self.rehydrated, *self.turns] if self.rehydrated else list(self.turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    @property
    def overflowed_turns(self) -> int:
        """Turns this context holds in the overflow tier (the sum over its references)."""
        return sum(ref.turns for ref in self.overflow)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for apps and ``satchel inspect`` (opaque bytes as sizes;
        bytes in metadata and tool arguments as hex, NaN and infinities as None)."""
        return {
            "session_id": self.session,
            "seq": self.seq,
            "parent": self.parent.hex() if self.parent else None,
            "created_at": self.created_at,
            "last_active": self.last_active,
            "schema_version": self.schema_version,
            "turns": [t.to_dict() for t in self.turns],
            "summary": self.summary,
            "pinned": self.pinned.to_dict(),
            "metadata": _jsonable(self.metadata),
            "metadata_version": self.metadata_version,
            "lifecycle": self.lifecycle.to_dict(),
            "overflow": [r.to_dict() for r in self.overflow],
            "overflowed_turns": self.overflowed_turns,
            "marked": self.marked,
            "mark_id": self.mark_id.hex() if self.mark_id else None,
            "mark_parent": self.mark_parent.hex() if self.mark_parent else None,
            "rehydrated_turns": len(self.rehydrated),
            "degraded": list(self.degraded),
        }


#: The fields of a :class:`Context` that its token carries (``schema.to_wire``) ...
SEALED_FIELDS: tuple[str, ...] = (
    "session_id",
    "seq",
    "parent",
    "created_at",
    "last_active",
    "schema_version",
    "turns",
    "summary",
    "pinned",
    "metadata",
    "metadata_version",
    "lifecycle",
    "overflow",
    "bound_user",
    "marked",
    "mark_id",
    "mark_parent",
)
#: ... and those that are facts of one request only, never sealed.
REQUEST_FIELDS: tuple[str, ...] = (
    "opened_parent",
    "stored_as",
    "stream_answering",
    "claim_holder",
    "opened_kid",
    "opened_version",
    "degraded",
    "rehydrated",
    "notices",
    "unreadable",
)


def check_text(text: str, what: str = "text") -> None:
    """Raise :class:`~satchel.errors.InvalidText` if ``text`` cannot be encoded as UTF-8.

    A JSON body may carry an unpaired surrogate (``"\\ud800"``, for example half an
    emoji cut by a client-side slice); Python decodes it into a str that no token,
    log line or model API can encode. Refusing it where it enters the context names
    the real cause (a JSON 400 ``invalid_text`` at the HTTP edge), instead of failing
    later when the context is sealed.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidText(
            f"{what} is not valid Unicode text: it holds an unpaired surrogate "
            f"at position {exc.start}",
            position=exc.start,
        ) from None


def join_surrogate_pairs(text: str) -> str:
    """``text`` with each high surrogate followed by a low one joined into its character.

    A streamed reply arrives in pieces, and JSON lets a provider split an emoji across
    two of them (``"\\ud83d"``, then ``"\\ude00"``): put together, the two halves are
    still two code points, which :func:`check_text` refuses. A lone surrogate stays
    lone (and is refused there). Text that encodes already comes back as it is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return text


def plain_str(text: str) -> str:
    """``text`` as a plain str: a str subclass (``markupsafe.Markup``...) would not come
    back as itself from a token, so it goes in as the str it holds."""
    return text if type(text) is str else str.__str__(text)


def _check_time(value: Any, what: str) -> float:
    """``value`` as the plain, finite int or float a token carries (bool refused: the
    reader takes it for no number); TypeError for anything else, ValueError for NaN
    and the infinities (the reader refuses them: a NaN time disables age checks)."""
    if type(value) is int:
        if not _MIN_PACKED_INT <= value <= _MAX_PACKED_INT:
            raise ValueError(f"{what} is {value}: past the integers a token carries")
        return value
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{what} is Unix seconds, an int or float, not {type(value).__name__}")
        value = float(value) if isinstance(value, float) else int(value)  # numpy.float64...
    if value - value != 0:
        raise ValueError(f"{what} is {value}: a time is a finite number of Unix seconds")
    if type(value) is int and not _MIN_PACKED_INT <= value <= _MAX_PACKED_INT:
        raise ValueError(f"{what} is {value}: past the integers a token carries")
    return value


#: msgpack's integer range: a larger int packs to nothing at all.
_MIN_PACKED_INT = -(2**63)
_MAX_PACKED_INT = 2**64 - 1


def _items_of(items: Iterable[Any], kind: type, what: str) -> tuple[Any, ...]:
    if isinstance(items, (str, bytes, kind)):
        raise TypeError(f"{what} is a list of {kind.__name__}, not a single {type(items).__name__}")
    try:
        out = tuple(items)
    except TypeError:
        raise TypeError(
            f"{what} is a list of {kind.__name__}, not {type(items).__name__}"
        ) from None
    for i, item in enumerate(out):
        if not isinstance(item, kind):
            raise TypeError(f"{what}[{i}] is {type(item).__name__}, not {kind.__name__}")
        _check_part(item, f"{what}[{i}]")
    return out


def _check_part(part: object, where: str) -> None:
    """The text fields of a tool call or provider block, checked as add_turn checks its
    own: a wrong type or an unpaired surrogate found here, not when sealing fails."""
    if isinstance(part, ToolCall):
        texts = {"id": part.id, "name": part.name}
        if isinstance(part.arguments, str):
            texts["arguments"] = part.arguments
        elif type(part.arguments) is not dict:  # a subclass would open as a plain dict
            raise TypeError(
                f"{where}.arguments is a JSON str or a dict, not {type(part.arguments).__name__}"
            )
        else:
            _check_arguments(part.arguments, f"{where}.arguments")
    else:
        assert isinstance(part, OpaqueBlock)
        texts = {"type": part.type, "provider": part.provider}
        if isinstance(part.data, str):
            texts["data"] = part.data
        elif type(part.data) is not bytes:  # bytearray, memoryview: bytes(data) first
            raise TypeError(f"{where}.data is bytes or str, not {type(part.data).__name__}")
    for field_name, text in texts.items():
        if not isinstance(text, str):
            raise TypeError(f"{where}.{field_name} is a str, not {type(text).__name__}")
        if not text.isascii():
            check_text(text, f"{where}.{field_name}")


#: msgpack's integers: int64 and uint64
_INT_MIN, _INT_LIMIT = -(2**63), 2**64
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")


def binary_size(value: bytes | bytearray | memoryview) -> int:
    """Bytes in ``value``: a memoryview's ``len()`` counts its items, not its bytes."""
    return value.nbytes if isinstance(value, memoryview) else len(value)


def key_name(key: str, position: int) -> str:
    """A map key for an error message, which the HTTP edge logs: a field-like name as
    it is (the app's schema: ``metadata['credits']``), anything else by position only
    (a key can be content: a user's own label, a document's title)."""
    return repr(key) if _FIELD_NAME.fullmatch(key) else f"<key #{position}>"


def _check_arguments(arguments: dict[str, Any], where: str) -> None:
    """Tool-call arguments given as a map (Anthropic's ``input``), walked as a str is
    checked: they come from a provider or a request body, so what no token could carry
    (an unpaired surrogate, an integer past 64 bits, a string, list or map past what
    a token opens with at the default :class:`~satchel.limits.Limits`, nesting past
    :data:`~satchel.limits.MAX_METADATA_DEPTH`) is refused here as bad input (a JSON
    400 at the HTTP edge), not found out when sealing fails with a 500. Each value
    keeps only a link to its container (its trail); the place is spelled out for an
    error alone."""
    limits = DEFAULT_LIMITS
    # (value, depth, trail); a trail is None or (parent trail, key or index, position)
    stack: list[tuple[Any, int, Any]] = [(arguments, 0, None)]
    while stack:
        value, depth, trail = stack.pop()
        if value is None or isinstance(value, bool | float):
            continue
        if isinstance(value, int):
            if not _INT_MIN <= value < _INT_LIMIT:
                _refuse_argument(
                    where, trail, "holds an integer outside the 64 bits a token carries"
                )
        elif isinstance(value, str):
            # UTF-8 is at most 4 bytes a character: encoded only when it may be too long.
            if len(value) * 4 > limits.max_str_bytes and (
                len(value.encode("utf-8", "surrogatepass")) > limits.max_str_bytes
            ):
                _refuse_argument(where, trail, _TOO_LONG)
            if not value.isascii():
                check_text(value, _argument_place(where, trail))
        elif isinstance(value, bytes | bytearray | memoryview):
            if isinstance(value, memoryview) and not value.contiguous:
                _refuse_argument(where, trail, "is a memoryview that is not contiguous")
            if binary_size(value) > limits.max_str_bytes:
                _refuse_argument(where, trail, _TOO_LONG)
        elif isinstance(value, list | tuple | dict):
            if depth >= MAX_METADATA_DEPTH:
                _refuse_argument(where, trail, f"is nested deeper than {MAX_METADATA_DEPTH} levels")
            if isinstance(value, dict):
                if len(value) > limits.max_map_len:
                    _refuse_argument(where, trail, f"has more than {limits.max_map_len} entries")
                for n, (key, item) in enumerate(value.items()):
                    if type(key) is not str:  # a str subclass would open as a plain str
                        raise TypeError(
                            f"{_argument_place(where, trail)} has a {type(key).__name__} "
                            "key: keys are str"
                        )
                    if not key.isascii():
                        check_text(key, f"{_argument_place(where, trail)} key #{n}")
                    stack.append((item, depth + 1, (trail, key, n)))
            else:
                if len(value) > limits.max_array_len:
                    _refuse_argument(where, trail, f"has more than {limits.max_array_len} items")
                stack.extend((item, depth + 1, (trail, i, i)) for i, item in enumerate(value))
        else:
            raise TypeError(
                f"{_argument_place(where, trail)} is {type(value).__name__}: arguments take "
                "str, int, float, bool, None, bytes, and lists and str-keyed dicts of those"
            )


_TOO_LONG = f"is longer than the {DEFAULT_LIMITS.max_str_bytes} bytes a token opens with"


def _argument_place(where: str, trail: Any) -> str:
    """``where`` and the path of ``trail``: ``tool_calls[0].arguments['rows'][3]`` (a
    key that could be content by its position only, as :func:`key_name` says)."""
    parts: list[str] = []
    while trail is not None:
        trail, key, position = trail
        parts.append(f"[{key}]" if isinstance(key, int) else f"[{key_name(key, position)}]")
    return where + "".join(reversed(parts))


def _refuse_argument(where: str, trail: Any, problem: str) -> NoReturn:
    raise InvalidValue(f"{_argument_place(where, trail)} {problem}")


def _optional_text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} is a str or None, not {type(value).__name__}")
    value = plain_str(value)
    if not value.isascii():
        check_text(value, what)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):  # all three seal (and open as bytes)
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity: json.dumps writes them bare, and a browser's
        # JSON.parse refuses the whole body. The token carries them; the view says null.
        return None
    return value


__all__ = [
    "REQUEST_FIELDS",
    "ROLES",
    "SEALED_FIELDS",
    "Context",
    "Lifecycle",
    "LifecycleAction",
    "OpaqueBlock",
    "Pinned",
    "Role",
    "SegmentRef",
    "ToolCall",
    "Turn",
    "check_session_id",
    "check_text",
    "join_surrogate_pairs",
    "new_session_id",
    "plain_str",
]
