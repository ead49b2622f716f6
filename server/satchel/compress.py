"""zstd compression with dictionaries chosen by id, and bounded decompression.

Frames are written magicless, without checksum or dictionary id: the token header
already names the dictionary, and the MAC or AEAD tag already guards integrity, so
those bytes would be paid on every request for nothing.

Decompression is bounded: zstandard's ``decompress(max_output_size=...)`` does *not*
bound a frame that declares its own content size, so the declared size is checked
against the cap first, and frames that do not declare one are read through a stream
reader that stops at the cap. Only authenticated bytes ever reach this module.
"""

from __future__ import annotations

import io
import threading
from importlib import resources
from typing import NamedTuple

import zstandard

from .errors import MalformedToken, TokenTooLarge, UnsupportedVersion

#: Dictionary ids in use. Never reuse an id for different bytes: old tokens name them.
DICTIONARY_FILES: dict[int, str] = {1: "chat-v1.zdict"}
DEFAULT_DICTIONARY_ID = 1
DEFAULT_LEVEL = 3
DEFAULT_MAX_DECOMPRESSED = 1024 * 1024
_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS


class Compressed(NamedTuple):  # a tuple: one is built on every seal, it must be cheap
    """A payload as it goes into the token body, and how it was made."""

    dictionary_id: int  # 0 when no dictionary was used
    compressed: bool  # False when the payload did not shrink and is stored as is
    data: bytes


# tuple.__new__ directly: a NamedTuple's own __new__ is a Python-level wrapper.
_tuple_new = tuple.__new__


_dictionaries: dict[int, zstandard.ZstdCompressionDict | None] = {}
_dict_lock = threading.Lock()


def load_dictionary(dictionary_id: int) -> zstandard.ZstdCompressionDict | None:
    """The dictionary with this id, or None for id 0. Unknown ids raise."""
    if dictionary_id == 0:
        return None
    if dictionary_id in _dictionaries:
        return _dictionaries[dictionary_id]
    name = DICTIONARY_FILES.get(dictionary_id)
    if name is None:
        raise UnsupportedVersion(
            f"token needs zstd dictionary {dictionary_id}, unknown to this release",
            dictionary_id=dictionary_id,
        )
    with _dict_lock:
        try:
            data = resources.files("satchel").joinpath("dictionaries", name).read_bytes()
        except FileNotFoundError:
            raise UnsupportedVersion(
                f"zstd dictionary {name} is not installed", dictionary_id=dictionary_id
            ) from None
        _dictionaries[dictionary_id] = zstandard.ZstdCompressionDict(
            data, dict_type=zstandard.DICT_TYPE_FULLDICT
        )
    return _dictionaries[dictionary_id]


def available_dictionary_id() -> int:
    """The default dictionary if it is installed, else 0 (plain zstd)."""
    try:
        load_dictionary(DEFAULT_DICTIONARY_ID)
    except UnsupportedVersion:
        return 0
    return DEFAULT_DICTIONARY_ID


class Compressor:
    """Compresses payloads with one dictionary; opens payloads made with any known one.

    zstandard's (de)compressor objects are not safe to share between threads, so each
    thread gets its own, built once from the precomputed dictionary.
    """

    def __init__(
        self,
        dictionary_id: int | None = None,
        level: int = DEFAULT_LEVEL,
        max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
        min_size: int = 32,
    ) -> None:
        self.dictionary_id = available_dictionary_id() if dictionary_id is None else dictionary_id
        self.level = level
        self.max_decompressed = max_decompressed
        #: Payloads shorter than this are stored as they are: zstd cannot win there.
        self.min_size = min_size
        self._local = threading.local()
        dictionary = load_dictionary(self.dictionary_id)
        if dictionary is not None:
            dictionary.precompute_compress(level=level)

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level,
                format=_FORMAT,
                write_checksum=0,
                write_dict_id=0,
                write_content_size=1,
            )
            cctx = zstandard.ZstdCompressor(
                dict_data=load_dictionary(self.dictionary_id), compression_params=params
            )
            self._local.cctx = cctx
        return cctx

    def _decompressor(self, dictionary_id: int) -> zstandard.ZstdDecompressor:
        cache = getattr(self._local, "dctx", None)
        if cache is None:
            cache = self._local.dctx = {}
        dctx = cache.get(dictionary_id)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor(
                dict_data=load_dictionary(dictionary_id), format=_FORMAT
            )
            cache[dictionary_id] = dctx
        return dctx

    def compress(self, payload: bytes) -> Compressed:
        if len(payload) >= self.min_size:
            data = self._compressor().compress(payload)
            if len(data) < len(payload):
                return _tuple_new(Compressed, (self.dictionary_id, True, data))
        return _tuple_new(Compressed, (0, False, payload))

    def decompress(self, data: bytes, dictionary_id: int) -> bytes:
        """Decompress at most ``max_decompressed`` bytes; more is refused, not produced."""
        cap = self.max_decompressed
        dctx = self._decompressor(dictionary_id)
        try:
            declared = zstandard.get_frame_parameters(data, format=_FORMAT).content_size
        except zstandard.ZstdError:
            raise MalformedToken("compressed payload has no valid zstd frame header") from None
        if declared > cap and declared != zstandard.CONTENTSIZE_UNKNOWN:
            raise TokenTooLarge(
                f"payload declares {declared} bytes decompressed; the limit is {cap}",
                size=declared,
                limit=cap,
            )
        try:
            if 0 < declared <= cap:
                return dctx.decompress(data)
            # No declared size: read through a bounded stream, one byte past the cap.
            with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
                out = bytearray()
                while len(out) <= cap:
                    chunk = reader.read(cap + 1 - len(out))
                    if not chunk:
                        break
                    out += chunk
        except zstandard.ZstdError:
            raise MalformedToken("compressed payload is corrupt") from None
        if len(out) > cap:
            raise TokenTooLarge(f"payload decompresses past the limit of {cap} bytes", limit=cap)
        return bytes(out)


__all__ = [
    "DEFAULT_DICTIONARY_ID",
    "DEFAULT_MAX_DECOMPRESSED",
    "DICTIONARY_FILES",
    "Compressed",
    "Compressor",
    "available_dictionary_id",
    "load_dictionary",
]
