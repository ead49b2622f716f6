"""The token's byte layout: prefix, header fields, flags, canonical base64url, caps."""

from __future__ import annotations

import base64
import struct
import time

import pytest

from satchel import envelope
from satchel.envelope import (
    FLAG_CHACHA,
    FLAG_COMPRESSED,
    FLAG_SEALED,
    Header,
    authenticated_header,
    build,
    parse,
)
from satchel.errors import BadToken, MalformedToken, TokenTooLarge, UnsupportedVersion
from tests.support import timed_without_gc


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


HEADER = Header(
    version=1,
    flags=FLAG_SEALED | FLAG_COMPRESSED,
    dictionary_id=0,
    kid="k2611",
    issued_at=1767225600,
    expires_at=1767229200,
)


def test_header_packs_to_documented_layout() -> None:
    packed = HEADER.pack()
    assert packed == (
        bytes([1, 0x03, 0, 5]) + b"k2611" + struct.pack(">II", 1767225600, 1767229200)
    )
    assert len(packed) == 12 + len("k2611")
    assert authenticated_header(HEADER) == b"s1." + packed


def test_build_then_parse_round_trips_every_field() -> None:
    body = b"\xaa" * 40
    token = build(HEADER, body)
    assert token.startswith("s1.")
    assert token == "s1." + b64(HEADER.pack() + body)
    env = parse(token)
    assert env.header == HEADER
    assert env.body == body
    assert env.raw == HEADER.pack() + body
    assert env.header_bytes == authenticated_header(HEADER)
    assert parse(token.encode("ascii")).header == HEADER  # bytes are accepted too


@pytest.mark.parametrize(
    ("flags", "sealed", "compressed", "algorithm", "mode"),
    [
        (0, False, False, "hmac-sha256", "signed"),
        (FLAG_COMPRESSED, False, True, "hmac-sha256", "signed"),
        (FLAG_SEALED, True, False, "aes-256-gcm", "sealed"),
        (FLAG_SEALED | FLAG_CHACHA | FLAG_COMPRESSED, True, True, "chacha20-poly1305", "sealed"),
    ],
)
def test_flag_bits(flags: int, sealed: bool, compressed: bool, algorithm: str, mode: str) -> None:
    header = Header(1, flags, 0, "k", 0, 0)
    assert (FLAG_SEALED, FLAG_COMPRESSED, FLAG_CHACHA) == (0x01, 0x02, 0x04)
    assert header.sealed is sealed
    assert header.compressed is compressed
    assert header.algorithm == algorithm
    assert header.mode == mode


def test_unknown_flags_are_malformed() -> None:
    for bit in (0x10, 0x20, 0x80):  # 0x08 is "padded"
        header = Header(1, bit, 0, "k", 0, 0)
        with pytest.raises(MalformedToken):
            parse(build(header, b"x" * 32))


def test_unknown_prefix_versions_are_unsupported_not_malformed() -> None:
    good = build(HEADER, b"x" * 40)
    for prefix in ("s9.", "s2.", "s10."):
        with pytest.raises(UnsupportedVersion) as info:
            parse(prefix + good[3:])
        assert info.value.code == "token_unsupported_version"
    # "s" and ASCII digits only: "s\\u0661." (Arabic-Indic one) is no Satchel format.
    for prefix in ("x1.", "S1.", "s.", ".", "s1x.", "s\u0661.", "s\u00b2."):
        with pytest.raises(MalformedToken):
            parse(prefix + good[3:])
    # A version is at most 4 digits: a 5,000-digit one came back in the message.
    with pytest.raises(UnsupportedVersion):
        parse("s9999." + good[3:])
    with pytest.raises(MalformedToken) as malformed:
        parse("s" + "7" * 5000 + "." + good[3:])
    assert "7777" not in malformed.value.message


def test_version_byte_must_match_prefix() -> None:
    header = Header(2, 0, 0, "k", 0, 0)
    with pytest.raises(MalformedToken, match="does not match its prefix"):
        parse("s1." + b64(header.pack() + b"x" * 32))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "s1",
        "s1.",
        "s1.AAAA",
        "no-dot-at-all",
        "s1.AQAAAA",  # kid length 0
        "s1." + b64(bytes([1, 0, 0, 17]) + b"k" * 17 + b"\0" * 9),  # kid length 17
        "s1." + b64(bytes([1, 0, 0, 5]) + b"ab"),  # header cut inside the kid
        "s1." + b64(bytes([1, 0, 0, 1, 0xC3]) + b"\0" * 8 + b"x"),  # kid not ASCII
    ],
)
def test_short_or_broken_headers_are_malformed(token: str) -> None:
    with pytest.raises(MalformedToken):
        parse(token)


def test_only_canonical_unpadded_base64url_is_accepted() -> None:
    token = build(HEADER, b"\xfb\xff" * 20 + b"\x01")  # exercises - and _
    data = token[3:]
    assert "-" in data or "_" in data
    for bad in (
        data + "=",  # padding
        data.replace("-", "+").replace("_", "/"),  # standard alphabet
        data[:10] + " " + data[10:],  # whitespace
        data[:10] + "\n" + data[10:],
        data + "A" * ((1 - len(data)) % 4 or 4),  # a length of 1 mod 4 is never valid
    ):
        assert bad != data
        with pytest.raises(BadToken):
            parse("s1." + bad)
    # A non-canonical final character (unused bits set) decodes to the same bytes in
    # lenient decoders; here it is refused, so a token has exactly one spelling.
    raw = HEADER.pack() + b"\x00" * 32  # 49 bytes: len % 3 == 1 -> 2 trailing chars, 4 unused bits
    canonical = b64(raw)
    assert len(canonical) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(canonical[-1])
    for unused in range(1, 16):
        variant = canonical[:-1] + alphabet[last | unused]
        with pytest.raises(MalformedToken):
            parse("s1." + variant)


def test_non_ascii_tokens_are_malformed() -> None:
    token = build(HEADER, b"x" * 40)
    with pytest.raises(MalformedToken):
        parse(token[:-1] + "é")
    with pytest.raises(MalformedToken):
        parse(token.encode()[:-1] + b"\xff")
    with pytest.raises(MalformedToken):
        parse(12345)  # type: ignore[arg-type]


def test_length_cap_comes_first_and_is_fast() -> None:
    huge = "s1." + "A" * (10 * 1024 * 1024)
    for token in (huge, huge.encode(), "\xff" * (10 * 1024 * 1024), b"\xff" * (10 * 1024 * 1024)):
        with timed_without_gc(), pytest.raises(TokenTooLarge) as info:
            t0 = time.perf_counter()
            try:
                parse(token)
            finally:
                elapsed = time.perf_counter() - t0
        # Refused before any decoding: far under what base64-decoding 10 MB would take.
        assert elapsed < 0.05
        assert info.value.code == "token_too_large"
        assert info.value.status == 413
        assert info.value.facts["limit"] == envelope.DEFAULT_MAX_TOKEN_BYTES


def test_cap_is_inclusive_and_configurable() -> None:
    token = build(HEADER, b"x" * 40)
    assert parse(token, max_token_bytes=len(token)).body == b"x" * 40
    with pytest.raises(TokenTooLarge):
        parse(token, max_token_bytes=len(token) - 1)


def test_header_times_are_uint32_big_endian() -> None:
    header = Header(1, 0, 0, "k", 2**32 - 1, 1)
    env = parse(build(header, b"x" * 32))
    assert (env.header.issued_at, env.header.expires_at) == (2**32 - 1, 1)


@pytest.mark.parametrize("kid", ["k.", "a b", "k/1", "é"])
def test_a_key_id_outside_its_alphabet_is_malformed(kid: str) -> None:
    """docs/token-format.md: a key id is A-Z a-z 0-9 _ -; no key can be named otherwise,
    so such a header is not a token's (not an unknown key)."""
    raw = b"\x01\x00\x00" + bytes([len(kid.encode())]) + kid.encode() + b"\x00" * 8 + b"x" * 32
    with pytest.raises(MalformedToken):
        parse("s1." + b64(raw))
