"""Length padding: round a token's length up to a multiple of a bucket size.

Compression runs before encryption, so a sealed token's length says how well its
content compressed. With padding (``Codec(pad_to=...)``, ``SATCHEL_PAD_TO``), every
token's raw length is a multiple of ``pad_to`` bytes, so its length only says which
bucket the context falls in.

The padding sits inside the authenticated payload, after the stored payload ``P``::

    P || 0x00 * (n - 2) || n (uint16, big-endian)        2 <= n <= 65535

and the header's ``padded`` flag says it is there. It is checked and removed after
verification and before decompression; nothing here ever sees unauthenticated bytes.
"""

from __future__ import annotations

from .envelope import encoded_length
from .errors import MalformedToken

#: Bytes of the trailing length field.
LENGTH_SIZE = 2
MIN_PAD_TO = 16
MAX_PAD_TO = 16384


def check_pad_to(pad_to: int | None) -> int | None:
    """Validate a ``pad_to`` setting (None or 0 turns padding off)."""
    if not pad_to:
        return None
    if isinstance(pad_to, bool) or not isinstance(pad_to, int):
        raise TypeError("pad_to must be an int number of bytes")
    if not MIN_PAD_TO <= pad_to <= MAX_PAD_TO:
        raise ValueError(f"pad_to must be between {MIN_PAD_TO} and {MAX_PAD_TO} bytes")
    return pad_to


def padded_length(unpadded: int, pad_to: int) -> int:
    """The raw token length for ``unpadded`` bytes of token without padding.

    At least :data:`LENGTH_SIZE` bytes are added, so the length field always fits.
    """
    return -(-(unpadded + LENGTH_SIZE) // pad_to) * pad_to


def largest_pad_within(max_token_chars: int) -> int:
    """The largest ``pad_to`` whose one-bucket token is at most ``max_token_chars``
    characters long (0 if none is): what a budget of that many characters allows."""
    raw = max(0, (max_token_chars - encoded_length(0)) * 3 // 4)
    while raw and encoded_length(raw) > max_token_chars:
        raw -= 1
    return raw if raw >= MIN_PAD_TO else 0


def bucket_too_long(pad_to: int, max_token_chars: int) -> str | None:
    """Why ``pad_to`` cannot be used under a limit of ``max_token_chars``, or None.

    A padded token is at least one bucket long: over the limit, every token would be.
    """
    smallest = encoded_length(pad_to)
    if smallest <= max_token_chars:
        return None
    return (
        f"makes every token at least {smallest} bytes, over {max_token_chars}: pad to at "
        f"most {largest_pad_within(max_token_chars)}"
    )


def pad(payload: bytes, unpadded: int, pad_to: int) -> bytes:
    """``payload`` followed by padding that brings the token to a multiple of ``pad_to``.

    ``unpadded`` is the length the whole raw token (header, payload, MAC or nonce and
    tag) would have without padding.
    """
    n = padded_length(unpadded, pad_to) - unpadded
    return payload + bytes(n - LENGTH_SIZE) + n.to_bytes(LENGTH_SIZE, "big")


def unpad(data: bytes) -> bytes:
    """The payload inside authenticated, padded ``data``; malformed padding is refused.

    Only a holder of the key could have made such data, but it is checked strictly
    anyway (the same as every other field): a wrong length or a non-zero pad byte is a
    :class:`~satchel.errors.MalformedToken`.
    """
    size = len(data)
    if size < LENGTH_SIZE:
        raise MalformedToken("token padding is missing")
    n = int.from_bytes(data[-LENGTH_SIZE:], "big")
    if not LENGTH_SIZE <= n <= size or data.count(0, size - n, size - LENGTH_SIZE) != (
        n - LENGTH_SIZE
    ):
        raise MalformedToken("token padding is invalid")
    return data[: size - n]


__all__ = [
    "MAX_PAD_TO",
    "MIN_PAD_TO",
    "bucket_too_long",
    "check_pad_to",
    "largest_pad_within",
    "pad",
    "padded_length",
    "unpad",
]
