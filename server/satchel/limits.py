"""Every bound applied while opening a token, in one small object passed in."""

from __future__ import annotations

from dataclasses import dataclass


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


DEFAULT_LIMITS = Limits()

__all__ = ["DEFAULT_LIMITS", "Limits"]
