"""Every bound applied while opening a token, in one small object passed in."""

from __future__ import annotations

from dataclasses import dataclass

#: Containers nested this deep in metadata or tool-call arguments are refused: the
#: sealer says so with the place named (satchel.schema), add_turn refuses such
#: arguments as they enter, and a metadata downgrade's copy stops there.
MAX_METADATA_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits checked before work proportional to them is done.

    The defaults suit chat contexts: a 64 KiB token, 1 MiB once decompressed.
    """

    #: raw token length, checked before anything else
    max_token_bytes: int = 64 * 1024
    #: decompressed payload, checked against the frame header and while streaming
    max_decompressed_bytes: int = 1024 * 1024
    #: longest single string or binary value inside the payload
    max_str_bytes: int = 512 * 1024
    #: most elements in one msgpack array (turns, facts, references)
    max_array_len: int = 20_000
    #: most entries in one msgpack map (metadata)
    max_map_len: int = 2_000
    #: clock skew allowed when checking expiry, in seconds
    clock_skew: int = 30

    def __post_init__(self) -> None:
        # The token's own structure must fit: a top-level map of up to about twenty
        # fields, fixed arrays of up to five items, 16-byte ids. Limits below these
        # floors would let a codec seal tokens it then refuses to open.
        for name, floor in _FLOORS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Limits.{name} is an int, not {type(value).__name__}")
            if value < floor:
                raise ValueError(
                    f"Limits.{name} must be at least {floor} (the token's own structure "
                    f"needs it), not {value}"
                )


#: The smallest value of each limit: what a token's own fields need, with room.
_FLOORS = {
    "max_token_bytes": 64,
    "max_decompressed_bytes": 64,
    "max_str_bytes": 64,
    "max_array_len": 16,
    "max_map_len": 32,
    "clock_skew": 0,
}


DEFAULT_LIMITS = Limits()

__all__ = ["DEFAULT_LIMITS", "MAX_METADATA_DEPTH", "Limits"]
