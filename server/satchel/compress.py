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
import os
import threading
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

from .errors import MalformedToken, TokenTooLarge, UnsupportedVersion

#: Dictionary ids in use. Never reuse an id for different bytes: old tokens name them.
#: Ids 1-127 are Satchel's, shipped in the package; 128-255 are for an app's own
#: dictionaries (:func:`register_dictionary`).
DICTIONARY_FILES: dict[int, str] = {1: "chat-v1.zdict"}
FIRST_APP_DICTIONARY_ID = 128
LAST_DICTIONARY_ID = 255
_ZSTD_DICT_MAGIC = b"\x37\xa4\x30\xec"
DEFAULT_DICTIONARY_ID = 1
#: zstd level 2: within about 1% of level 3 on chat payloads, for 16-25% less compression
#: time from 20 turns up (server/satchel/dictionaries/README.md, "Compression level").
DEFAULT_LEVEL = 2
DEFAULT_MAX_DECOMPRESSED = 1024 * 1024
_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
_ASCII = bytes(range(128))  # payload.translate(None, _ASCII): its non-ASCII bytes
#: How much of a payload is looked at to tell its script: its middle 256 bytes (about
#: 85 CJK characters of some turn), so the test costs about half a microsecond on every
#: seal whatever the context's size (the whole of a 5 KB payload cost 2.6 us).
_SCRIPT_SAMPLE = 256


def _mostly_not_ascii(payload: bytes) -> bool:
    """Whether a quarter or more of (a sample of) ``payload``'s bytes are not ASCII."""
    if len(payload) > _SCRIPT_SAMPLE:
        start = (len(payload) - _SCRIPT_SAMPLE) // 2
        payload = payload[start : start + _SCRIPT_SAMPLE]
    return len(payload.translate(None, _ASCII)) * 4 >= len(payload)


class Compressed(NamedTuple):  # a tuple: one is built on every seal, it must be cheap
    """A payload as it goes into the token body, and how it was made."""

    dictionary_id: int  # 0 when no dictionary was used
    compressed: bool  # False when the payload did not shrink and is stored as is
    data: bytes


# tuple.__new__ directly: a NamedTuple's own __new__ is a Python-level wrapper.
_tuple_new = tuple.__new__


_dictionaries: dict[int, zstandard.ZstdCompressionDict | None] = {}
_registered: dict[int, bytes] = {}
#: Dictionaries compressors are built with, one per (id, level), each precomputed once.
_compression_dictionaries: dict[tuple[int, int], zstandard.ZstdCompressionDict] = {}
_dict_lock = threading.Lock()


def register_dictionary(dictionary_id: int, data: bytes) -> None:
    """Make an app's own trained zstd dictionary available under ``dictionary_id``.

    ``dictionary_id`` is 128-255 (1-127 are Satchel's). Register it in every process
    that opens tokens (``SATCHEL_DICTIONARIES`` does it in ``init_app``), then seal
    with ``Codec(dictionary_id=...)`` / ``SATCHEL_DICTIONARY_ID``. As with shipped
    dictionaries, an id names one dictionary forever: tokens carry only the id, so
    registering other bytes under an id already in use raises ValueError, while
    registering the same bytes again does nothing. Train one with
    ``tools/train_dictionary.py --corpus your.jsonl --dict-id N --out your.zdict``.
    """
    if isinstance(dictionary_id, bool) or not isinstance(dictionary_id, int):
        raise TypeError("dictionary_id must be an int")
    if not FIRST_APP_DICTIONARY_ID <= dictionary_id <= LAST_DICTIONARY_ID:
        raise ValueError(
            f"app dictionary ids are {FIRST_APP_DICTIONARY_ID}-{LAST_DICTIONARY_ID}; "
            f"1-{FIRST_APP_DICTIONARY_ID - 1} are Satchel's own"
        )
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("a dictionary is bytes")  # never bytes(n): that allocates n bytes
    data = bytes(data)
    if not data.startswith(_ZSTD_DICT_MAGIC) or len(data) < 64:
        raise ValueError("not a trained zstd dictionary (no dictionary magic number)")
    with _dict_lock:
        known = _registered.get(dictionary_id)
        if known is not None:
            if known != data:
                raise ValueError(
                    f"zstd dictionary {dictionary_id} is already registered with other bytes; "
                    "give a new dictionary a new id"
                )
            return
        dictionary = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
        try:
            # Refuses a corrupt one. This object opens tokens (decompression); the ones
            # compressors use are compiled apart (compression_dictionary).
            dictionary.precompute_compress(level=DEFAULT_LEVEL)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not a usable zstd dictionary: {exc}") from None
        _registered[dictionary_id] = data
        _dictionaries[dictionary_id] = dictionary


def register_dictionaries(sources: Mapping[Any, str | os.PathLike[str] | bytes]) -> None:
    """:func:`register_dictionary` for each ``{id: path or bytes}``; ids may be strings
    (config files, the command line). Raises ValueError naming the id that failed."""
    for key, source in sources.items():
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            register_dictionary(int(key), data)
        except (OSError, TypeError, ValueError) as exc:
            raise ValueError(f"zstd dictionary {key!r}: {exc}") from None


def load_dictionary(dictionary_id: int) -> zstandard.ZstdCompressionDict | None:
    """The dictionary with this id, or None for id 0. Unknown ids raise."""
    if dictionary_id == 0:
        return None
    if dictionary_id in _dictionaries:
        return _dictionaries[dictionary_id]
    name = DICTIONARY_FILES.get(dictionary_id)
    if name is None:
        whose = (
            "registered" if dictionary_id >= FIRST_APP_DICTIONARY_ID else "known to this release"
        )
        raise UnsupportedVersion(
            f"token needs zstd dictionary {dictionary_id}, not {whose}",
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


def compression_dictionary(dictionary_id: int, level: int) -> zstandard.ZstdCompressionDict | None:
    """The dictionary ``dictionary_id`` compiled for compressing at ``level``, or None
    for id 0. Made once per (id, level) and never compiled again.

    Why a separate object per level, never shared: ``precompute_compress`` frees the
    compiled dictionary the object held, and every ``ZstdCompressor`` built from it
    earlier still points at the freed memory (a use after free: a review saw workers
    crash with conversation text where zstd's parameters belong). So a dictionary
    object that a compressor may use is compiled exactly once, before any compressor
    sees it.
    """
    if dictionary_id == 0:
        return None
    key = (dictionary_id, level)
    found = _compression_dictionaries.get(key)
    if found is not None:
        return found
    base = load_dictionary(dictionary_id)  # takes _dict_lock itself: not under it here
    assert base is not None
    with _dict_lock:
        found = _compression_dictionaries.get(key)
        if found is None:
            found = zstandard.ZstdCompressionDict(
                base.as_bytes(), dict_type=zstandard.DICT_TYPE_FULLDICT
            )
            found.precompute_compress(level=level)
            _compression_dictionaries[key] = found
    return found


def available_dictionary_id() -> int:
    """The default dictionary if it is installed, else 0 (plain zstd)."""
    try:
        load_dictionary(DEFAULT_DICTIONARY_ID)
    except UnsupportedVersion:
        return 0
    return DEFAULT_DICTIONARY_ID


#: zstd's fastest level (ZSTD_minCLevel: -(1 << 17)); MAX_COMPRESSION_LEVEL the slowest
MIN_LEVEL = -(1 << 17)


class Compressor:
    """Compresses payloads with one dictionary; opens payloads made with any known one.

    zstandard's (de)compressor objects are not safe to share between threads, so each
    thread gets its own, built once from the precomputed dictionary.

    ``plain_fallback``: a payload mostly not ASCII (a language other than the English
    the shipped dictionary was trained on) is also compressed without the dictionary,
    and the smaller kept. The header's dictionary id (0) then says so in the clear:
    the codec turns it off for sealed tokens, whose header must say nothing of what
    they hide (docs/security.md).
    """

    def __init__(
        self,
        dictionary_id: int | None = None,
        level: int = DEFAULT_LEVEL,
        max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
        min_size: int = 32,
        *,
        plain_fallback: bool = True,
    ) -> None:
        if (
            isinstance(level, bool)
            or not isinstance(level, int)
            or not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL
            or level == 0
        ):
            # zstd clamps a level out of range without a word (99 ran as 22), a str
            # failed deep in zstandard with a TypeError, and 0 (zstd's "default")
            # failed at the first seal, when the dictionary is compiled for it.
            raise ValueError(
                f"level is a zstd level, 1 to {zstandard.MAX_COMPRESSION_LEVEL} (or "
                f"{MIN_LEVEL} to -1: faster, larger), not {level!r}"
            )
        self.dictionary_id = available_dictionary_id() if dictionary_id is None else dictionary_id
        self.level = level
        self.plain_fallback = plain_fallback
        self.max_decompressed = max_decompressed
        #: Payloads shorter than this are stored as they are: zstd cannot win there.
        self.min_size = min_size
        self._local = threading.local()
        #: the decoder's window limit for this cap (max_window_for), worked out once
        self._max_window = max_window_for(max_decompressed)
        # Compiled now, so that an unknown id or level fails here, not on the first seal.
        compression_dictionary(self.dictionary_id, level)

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                dict_data=compression_dictionary(self.dictionary_id, self.level),
                compression_params=self._params(),
            )
        return cctx

    def _plain_compressor(self) -> zstandard.ZstdCompressor:
        """A compressor without the dictionary, for payloads the dictionary does not fit."""
        cctx = getattr(self._local, "plain", None)
        if cctx is None:
            cctx = self._local.plain = zstandard.ZstdCompressor(compression_params=self._params())
        return cctx

    def _params(self) -> zstandard.ZstdCompressionParameters:
        """The frame as the token carries it: magicless, no checksum (the MAC or AEAD
        covers it), no dictionary id (the header has it), the content size declared."""
        return zstandard.ZstdCompressionParameters.from_level(
            self.level,
            format=_FORMAT,
            write_checksum=0,
            write_dict_id=0,
            write_content_size=1,
        )

    def _decompressor(self, dictionary_id: int) -> zstandard.ZstdDecompressor:
        cache = getattr(self._local, "dctx", None)
        if cache is None:
            cache = self._local.dctx = {}
        dctx = cache.get(dictionary_id)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor(
                dict_data=load_dictionary(dictionary_id),
                format=_FORMAT,
                max_window_size=self._max_window,
            )
            cache[dictionary_id] = dctx
        return dctx

    def compress(self, payload: bytes) -> Compressed:
        if len(payload) >= self.min_size:
            data = self._compressor().compress(payload)
            dictionary_id = self.dictionary_id
            if dictionary_id and self.plain_fallback and _mostly_not_ascii(payload):
                # A quarter or more of the bytes are not ASCII (Hebrew, Arabic, Japanese,
                # Russian...): the shipped dictionary, trained on English chat, made such
                # payloads 10-33% larger than zstd without it. Keep the smaller.
                plain = self._plain_compressor().compress(payload)
                if len(plain) < len(data):
                    data, dictionary_id = plain, 0
            if len(data) < len(payload):
                return _tuple_new(Compressed, (dictionary_id, True, data))
        return _tuple_new(Compressed, (0, False, payload))

    def decompress(self, data: bytes, dictionary_id: int) -> bytes:
        """Decompress at most ``max_decompressed`` bytes; more is refused, not produced."""
        cap = self.max_decompressed
        dctx = self._decompressor(dictionary_id)
        try:
            frame = zstandard.get_frame_parameters(data, format=_FORMAT)
        except zstandard.ZstdError:
            raise MalformedToken("compressed payload has no valid zstd frame header") from None
        declared = frame.content_size
        if frame.window_size > self._max_window:
            # Refused from the header whatever the frame declares: the decoder's own
            # limit only bites on the stream path (one-shot decoding skips it).
            raise MalformedToken("compressed payload asks for a decoding window over the limit")
        if declared > cap and declared != zstandard.CONTENTSIZE_UNKNOWN:
            raise TokenTooLarge(
                f"payload declares {declared} bytes decompressed; the limit is {cap}",
                size=declared,
                limit=cap,
            )
        if 0 < declared <= cap:
            try:
                # allow_extra_data=False: the payload is exactly one frame; zstandard
                # raises for any input left after it (what _frame_end finds otherwise).
                whole: bytes = dctx.decompress(data, allow_extra_data=False)
            except zstandard.ZstdError:
                raise MalformedToken(
                    "compressed payload is corrupt or has bytes after its zstd frame"
                ) from None
            return whole
        try:
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
        if _frame_end(data) != len(data):
            raise MalformedToken("compressed payload has bytes after its zstd frame")
        return bytes(out)


#: The largest window a payload's frame may ask for (bytes), whatever the cap: what
#: zstd at level 19 asks for when it does not know the payload's size. The stream
#: decoder allocates the window the frame header names, and keeps it with the
#: thread's decoder: libzstd's own limit (128 MiB) let a 130-character token reserve
#: 128 MiB of address space per thread. Past it: token_malformed.
MAX_WINDOW_BYTES = 8 << 20


def max_window_for(cap: int) -> int:
    """The decoder's window limit for a decompression cap: MAX_WINDOW_BYTES, or the
    cap (rounded up to a power of two) when an app raised it past that."""
    return max(MAX_WINDOW_BYTES, 1 << max(cap - 1, 1).bit_length())


_FCS_BYTES = (0, 2, 4, 8)  # frame content size field, by the descriptor's top two bits
_DICT_ID_BYTES = (0, 1, 2, 4)  # dictionary id field, by its bottom two bits


def _frame_end(data: bytes) -> int:
    """Where the (magicless) zstd frame that starts ``data`` ends (RFC 8878, 3.1.1).

    The payload is exactly one frame: zstandard decompresses the first one and ignores
    what follows, so the bytes after it are found here. Called only after the frame
    decompressed, so its block headers are known to be sound; -1 if they run out.
    """
    descriptor = data[0]
    single_segment = (descriptor >> 5) & 1
    pos = (
        1
        + (0 if single_segment else 1)  # window descriptor
        + _DICT_ID_BYTES[descriptor & 3]
        + (_FCS_BYTES[descriptor >> 6] or single_segment)
    )
    size = len(data)
    while True:
        if pos + 3 > size:
            return -1
        block = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        pos += 3 + (1 if (block >> 1) & 3 == 1 else block >> 3)  # an RLE block is 1 byte
        if block & 1:  # the last block
            break
    return pos + 4 if descriptor & 4 else pos  # the content checksum


__all__ = [
    "DEFAULT_DICTIONARY_ID",
    "DEFAULT_MAX_DECOMPRESSED",
    "DICTIONARY_FILES",
    "FIRST_APP_DICTIONARY_ID",
    "Compressed",
    "Compressor",
    "available_dictionary_id",
    "load_dictionary",
    "register_dictionaries",
    "register_dictionary",
]
