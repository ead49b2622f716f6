"""zstd: magicless frames without checksum or dictionary id, bounded decompression."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc

import pytest
import zstandard

from satchel.compress import (
    DICTIONARY_FILES,
    Compressor,
    available_dictionary_id,
    load_dictionary,
)
from satchel.errors import MalformedToken, TokenTooLarge, UnsupportedVersion

MAGIC = b"\x28\xb5\x2f\xfd"
FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
TEXT = b"The quick brown fox jumps over the lazy dog. " * 40


def test_round_trip_and_frame_shape() -> None:
    comp = Compressor(dictionary_id=0)
    packed = comp.compress(TEXT)
    assert packed.compressed and packed.dictionary_id == 0
    assert len(packed.data) < len(TEXT)
    assert not packed.data.startswith(MAGIC)  # magicless
    params = zstandard.get_frame_parameters(packed.data, format=FORMAT)
    assert params.content_size == len(TEXT)  # content size is written ...
    assert params.has_checksum is False  # ... the checksum is not (the MAC covers it)
    assert params.dict_id == 0  # nor the dictionary id (the header names it)
    assert comp.decompress(packed.data, 0) == TEXT
    # A standard zstd decoder reads it once the 4-byte magic is put back.
    assert zstandard.ZstdDecompressor().decompress(MAGIC + packed.data) == TEXT


def test_small_or_incompressible_payloads_are_stored_as_is() -> None:
    comp = Compressor(dictionary_id=0)
    for payload in (b"", b"tiny", b"x" * 31, bytes(range(256))):
        packed = comp.compress(payload)
        assert not packed.compressed
        assert packed.dictionary_id == 0
        assert packed.data == payload


def test_compression_is_deterministic() -> None:
    assert Compressor(0).compress(TEXT).data == Compressor(0).compress(TEXT).data


def test_dictionary_ids() -> None:
    assert load_dictionary(0) is None
    assert 1 in DICTIONARY_FILES  # reserved for chat-v1.zdict, never reused
    with pytest.raises(UnsupportedVersion):
        load_dictionary(200)
    with pytest.raises(UnsupportedVersion):
        Compressor(0).decompress(Compressor(0).compress(TEXT).data, 200)
    # The default is the trained dictionary when it is installed, else plain zstd.
    assert available_dictionary_id() in (0, 1)
    assert Compressor().dictionary_id == available_dictionary_id()


def _frame(size: int, *, declared: bool) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        19, format=FORMAT, write_checksum=0, write_dict_id=0, write_content_size=int(declared)
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    if declared:
        return cctx.compress(b"\0" * size)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as writer:
        remaining = size
        while remaining:
            n = min(remaining, 1 << 20)
            writer.write(b"\0" * n)
            remaining -= n
    return out.getvalue()


@pytest.mark.parametrize("declared", [True, False])
def test_cap_is_exact(declared: bool) -> None:
    comp = Compressor(0, max_decompressed=10_000)
    assert comp.decompress(_frame(10_000, declared=declared), 0) == b"\0" * 10_000
    with pytest.raises(TokenTooLarge):
        comp.decompress(_frame(10_001, declared=declared), 0)


@pytest.mark.parametrize("declared", [True, False])
def test_bomb_is_refused_fast_with_bounded_memory(declared: bool) -> None:
    bomb = _frame(50 * 1024 * 1024, declared=declared)
    assert len(bomb) < 4096
    comp = Compressor(0)  # 1 MiB cap
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(TokenTooLarge):
            comp.decompress(bomb, 0)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 4 * comp.max_decompressed


def _windowed_frame(window_log: int) -> bytes:
    """A small frame that names a window of 2**window_log bytes and no content size
    (a streaming writer's): the decoder would allocate that window."""
    params = zstandard.ZstdCompressionParameters(
        window_log=window_log, format=FORMAT, write_content_size=0, write_dict_id=0
    )
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        out, closefd=False
    ) as writer:
        writer.write(TEXT)
    frame = out.getvalue()
    assert zstandard.get_frame_parameters(frame, format=FORMAT).window_size == 1 << window_log
    return frame


def _declaring(frame: bytes) -> bytes:
    """``frame`` (no content size, not single-segment) with a 4-byte content size
    written into its header: a window that large and a declared size at once."""
    descriptor = frame[0]
    assert descriptor >> 6 == 0 and not descriptor & 0x20 and descriptor & 3 == 0
    return bytes([descriptor | 2 << 6, frame[1]]) + struct.pack("<I", len(TEXT)) + frame[2:]


@pytest.mark.parametrize("declared", [False, True], ids=["stream", "declared size"])
def test_a_frame_asking_for_a_window_past_the_limit_is_malformed(declared: bool) -> None:
    # 128 MiB of address space per thread for a 130-character token, kept with the
    # thread's decoder, under libzstd's own limit. Refused from the header either way
    # (one-shot decoding of a declared size skips the decoder's own limit).
    shape = _declaring if declared else (lambda frame: frame)
    comp = Compressor(0)  # 1 MiB cap: windows up to 8 MiB (zstd level 19's)
    assert comp.decompress(shape(_windowed_frame(23)), 0) == TEXT
    for window_log in (24, 27):
        with pytest.raises(MalformedToken):
            comp.decompress(shape(_windowed_frame(window_log)), 0)
    # An app that raised the cap past 8 MiB may be sent frames with windows that large.
    assert Compressor(0, max_decompressed=20 << 20).decompress(_windowed_frame(25), 0) == TEXT


def test_corrupt_frames_are_malformed() -> None:
    comp = Compressor(0)
    good = comp.compress(TEXT).data
    for bad in (b"", b"\xff" * 8, good[:5], good[:-4], MAGIC + good):
        with pytest.raises((MalformedToken, TokenTooLarge)):
            comp.decompress(bad, 0)


def test_empty_frame_with_declared_size_zero() -> None:
    cctx = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            3, format=FORMAT, write_content_size=1
        )
    )
    assert Compressor(0).decompress(cctx.compress(b""), 0) == b""


@pytest.mark.parametrize("content_size", [True, False])
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("payload", [b"x" * 100, bytes(range(256)) * 40, b"turn " * 60_000])
def test_the_payload_is_exactly_one_frame(
    content_size: bool, checksum: bool, payload: bytes
) -> None:
    """zstandard decompresses a payload's first frame and drops what follows: junk, or a
    second frame, after it must not pass unseen (docs/token-format.md: one frame)."""
    from satchel.compress import _FORMAT

    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=_FORMAT, write_checksum=int(checksum), write_content_size=int(content_size)
    )
    frame = zstandard.ZstdCompressor(compression_params=params).compress(payload)
    c = Compressor(0)
    assert c.decompress(frame, 0) == payload
    for extra in (b"\x00", b"junk" * 3, frame):
        with pytest.raises(MalformedToken):  # "after its zstd frame", or "corrupt"
            c.decompress(frame + extra, 0)


# A Compressor built later must never recompile a dictionary object an earlier one
# compresses with: python-zstandard's precompute_compress frees the compiled form that
# existing ZstdCompressors still point at (a use after free that crashed workers).
# The cffi backend shows the compiled form as an attribute, so the test can watch it.
_NO_RECOMPILE = """
import sys
import zstandard
assert zstandard.backend == "cffi", zstandard.backend
from satchel import Codec, Context, Keyring
from satchel import compress

ring = Keyring.generate()
first = Codec(ring)
ctx = Context.new()
ctx.add_turn("user", "hello there, how are you today? " * 40)
first.seal(ctx)  # builds the first codec's thread-local compressor


def dictionaries():
    compiled = getattr(compress, "_compression_dictionaries", {})
    return [d for d in [*compress._dictionaries.values(), *compiled.values()] if d is not None]


held = {id(d): d._cdict for d in dictionaries() if d._cdict is not None}
for level in (2, 3, 2, 1):
    Codec(ring, level=level).seal(ctx)
changed = [d for d in dictionaries() if id(d) in held and d._cdict is not held[id(d)]]
assert not changed, f"{len(changed)} dictionaries recompiled under a live compressor"
assert first.open(first.seal(ctx)).turns[0].content == ctx.turns[0].content
print("ok")
"""


def test_a_later_codec_never_recompiles_a_dictionary_in_use() -> None:
    import os
    import subprocess
    import sys

    pytest.importorskip("cffi")
    env = dict(os.environ, PYTHON_ZSTANDARD_IMPORT_POLICY="cffi")
    done = subprocess.run(
        [sys.executable, "-c", _NO_RECOMPILE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
