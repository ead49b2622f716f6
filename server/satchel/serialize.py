"""msgpack packing and bounded unpacking. No pickle, no extension types."""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from .errors import InvalidContext, TokenTooLarge
from .limits import DEFAULT_LIMITS, Limits

_local = threading.local()


def pack(obj: Any) -> bytes:
    """msgpack with the bin type, so bytes stay bytes and str stays str.

    One Packer per thread: ``msgpack.packb`` builds a new one on every call.
    """
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, datetime=False)
    try:
        return packer.pack(obj)
    except BaseException:
        _local.packer = None  # a failed pack may leave the buffer dirty: start afresh
        raise


def _refuse_ext(code: int, data: bytes) -> Any:
    raise InvalidContext("payload holds a msgpack extension type, which Satchel never writes")


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Unpack one msgpack value within ``limits``; anything else is refused."""
    if len(data) > limits.max_decompressed_bytes:
        raise TokenTooLarge("payload is larger than the unpack limit", size=len(data))
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_str_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except InvalidContext:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError and the limit errors are ValueErrors.
        raise InvalidContext(f"payload is not valid msgpack: {type(exc).__name__}") from None


__all__ = ["pack", "unpack"]
