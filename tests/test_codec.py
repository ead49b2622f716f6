"""Codec.seal / Codec.open: round trips, refusals, limits, expiry, rotation, tampering."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zstandard

from satchel import (
    Codec,
    Context,
    Key,
    Keyring,
    LifecycleAction,
    OpaqueBlock,
    SegmentRef,
    ToolCall,
    Turn,
    envelope,
    peek,
    schema,
    serialize,
    token_digest,
)
from satchel.codec import NO_EXPIRY
from satchel.context import REQUEST_FIELDS, SEALED_FIELDS
from satchel.envelope import FLAG_COMPRESSED, Header
from satchel.errors import (
    BadSignature,
    BadToken,
    ContextNotSerializable,
    InvalidContext,
    InvalidText,
    MalformedToken,
    SatchelError,
    TokenExpired,
    TokenTooLarge,
    UnknownKeyId,
    UnsupportedVersion,
    WrongMode,
)
from satchel.limits import Limits

NOW = 1_767_225_600
K1 = Key("k1", bytes(range(32)))
K2 = Key("k2", bytes(range(32, 64)))
RING = Keyring([K1])
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ODD_CHARS = ".=+/ \x00\n\t~é\u2028"
MODES = [("signed", "aes-256-gcm"), ("sealed", "aes-256-gcm"), ("sealed", "chacha20-poly1305")]


def make_codec(
    mode: str = "sealed",
    algorithm: str = "aes-256-gcm",
    ring: Keyring = RING,
    *,
    now: float = NOW,
    **kwargs: object,
) -> Codec:
    return Codec(ring, mode, algorithm=algorithm, clock=lambda: now, **kwargs)  # type: ignore[arg-type]


def rich_context() -> Context:
    ctx = Context.new(now=NOW - 100, session_id=bytes(range(16)))
    ctx.pinned.system = "You are helpful."
    ctx.pinned.facts.append("The user's name is Ada.")
    ctx.summary = "(2 earlier turns summarized)\n- user: hi\n- assistant: hello"
    ctx.metadata = {"plan": "pro", "credits": 12, "flags": [True, None, 1.5], "raw": b"\x00"}
    ctx.metadata_version = 3
    ctx.add_turn("system", "Be brief.", ts=NOW - 90)
    ctx.add_turn("user", "Weather in Paris?", ts=NOW - 80)
    ctx.add_turn(
        "assistant",
        "",
        ts=NOW - 79,
        tool_calls=[ToolCall("c1", "weather", '{"city":"Paris"}')],
        blocks=[OpaqueBlock("thinking", bytes(range(256)), "anthropic")],
    )
    ctx.add_turn("tool", '{"temp": 18}', ts=NOW - 78, tool_call_id="c1", name="weather")
    ctx.add_turn("assistant", "18°C and sunny.", ts=NOW - 77)
    ctx.overflow.append(SegmentRef(b"d" * 12, 4, 900, 3, NOW - 500))
    ctx.bound_user = b"u" * 16
    ctx.marked = True
    return ctx


def assert_same_context(a: Context, b: Context) -> None:
    for name in SEALED_FIELDS:
        if name != "parent":  # the digest of the token each was last opened from
            assert getattr(a, name) == getattr(b, name), name


def test_every_context_field_is_either_sealed_or_request_scoped() -> None:
    """A new Context field must be carried by the token (to_wire/from_wire and the
    round-trip tests) or be declared a fact of one request: never silently dropped."""
    names = [f.name for f in dataclasses.fields(Context)]
    assert sorted(names) == sorted(SEALED_FIELDS + REQUEST_FIELDS)
    assert not set(SEALED_FIELDS) & set(REQUEST_FIELDS)


def refused(codec: Codec, token: str | bytes) -> BadToken:
    """Open ``token`` and return the BadToken it raised; anything else fails the test."""
    try:
        codec.open(token)
    except BadToken as exc:
        assert exc.code.startswith("token_")
        assert 400 <= exc.status < 500
        return exc
    pytest.fail(f"token was accepted: {token!r}")


def raw_of(token: str) -> bytes:
    return envelope.parse(token).raw


def encode_raw(raw: bytes) -> str:
    return "s1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def protect_payload(codec: Codec, data: bytes, *, compressed: bool, dictionary_id: int = 0) -> str:
    """A correctly authenticated token around arbitrary (already compressed) bytes."""
    header = Header(
        1,
        codec.protector.flags | (FLAG_COMPRESSED if compressed else 0),
        dictionary_id,
        codec.keyring.current.kid,
        NOW,
        0,
    )
    body = codec.protector.protect(header.kid, envelope.authenticated_header(header), data)
    return envelope.build(header, body)


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "algorithm"), MODES)
def test_round_trip_keeps_every_field(mode: str, algorithm: str) -> None:
    codec = make_codec(mode, algorithm)
    ctx = rich_context()
    token = codec.seal(ctx)
    assert ctx.seq == 1
    opened = codec.open(token)
    assert_same_context(opened, ctx)
    assert opened.turns[2].blocks[0].data == bytes(range(256))
    assert opened.opened_kid == "k1"
    assert opened.opened_version == 2
    assert opened.parent == token_digest(raw_of(token)) == ctx.parent
    header = peek(token)
    assert (header.mode, header.algorithm) == (
        mode,
        algorithm if mode == "sealed" else "hmac-sha256",
    )
    assert header.kid == "k1" and header.issued_at == NOW and header.expires_at == 0


def test_seal_counts_and_chains_parents() -> None:
    codec = make_codec()
    ctx = Context.new(now=NOW)
    first = codec.seal(ctx)
    opened = codec.open(first)
    second = codec.seal(opened)
    again = codec.open(second)
    assert again.seq == 2
    # The second token's payload names the first as its parent.
    assert codec.open_verbose(second).context.seq == 2
    assert token_digest(raw_of(first)) != token_digest(raw_of(second))
    assert again.parent == token_digest(raw_of(second))


def test_add_turn_refuses_text_that_cannot_be_sealed_and_keeps_any_real_unicode() -> None:
    codec = make_codec()
    ctx = Context.new(now=NOW)
    text = "héllo 😀 日本語 \u200d\ufeff"  # accents, an astral emoji, CJK, ZWJ, BOM
    ctx.add_turn("user", text, ts=NOW)
    for broken in ("\ud83d", "tail \ude00", "\udcff in the middle"):
        with pytest.raises(InvalidText) as info:
            ctx.add_turn("user", broken, ts=NOW)
        error = info.value
        assert isinstance(error, ValueError) and isinstance(error, SatchelError)
        assert error.code == "invalid_text" and error.status == 400
        assert "unpaired surrogate" in str(error)
    assert [t.content for t in codec.open(codec.seal(ctx)).turns] == [text]


def test_open_verbose_reports_header_digest_and_timings() -> None:
    codec = make_codec()
    token = codec.seal(rich_context())
    opened = codec.open_verbose(token)
    assert opened.header.kid == "k1"
    assert opened.digest == token_digest(raw_of(token))
    assert set(opened.timings) >= {"verify", "decompress", "unpack", "migrate"}
    assert all(v >= 0 for v in opened.timings.values())


def test_bytes_tokens_open_like_str() -> None:
    codec = make_codec()
    token = codec.seal(rich_context())
    assert codec.open(token.encode()).turns == codec.open(token).turns


@pytest.mark.parametrize(("mode", "algorithm"), MODES)
def test_measure_is_exact_even_where_the_seq_grows_a_byte(mode: str, algorithm: str) -> None:
    codec = make_codec(mode, algorithm)
    for seq in (0, 126, 127, 128, 254, 255, 256, 65534, 65535, 65536, 2**32 - 1):
        ctx = rich_context()
        ctx.seq = seq
        predicted = codec.measure(ctx)
        assert len(codec.seal(ctx)) == predicted, seq


# -- the wrong key, purpose or mode ---------------------------------------------------


@pytest.mark.parametrize(("mode", "algorithm"), MODES)
def test_another_key_with_the_same_kid_is_refused(mode: str, algorithm: str) -> None:
    token = make_codec(mode, algorithm).seal(rich_context())
    other = make_codec(mode, algorithm, Keyring([Key("k1", b"x" * 32)]))
    assert isinstance(refused(other, token), BadSignature)


@pytest.mark.parametrize(("mode", "algorithm"), MODES)
def test_another_purpose_is_refused(mode: str, algorithm: str) -> None:
    token = make_codec(mode, algorithm, purpose="app-a").seal(rich_context())
    exc = refused(make_codec(mode, algorithm, purpose="app-b"), token)
    assert isinstance(exc, BadSignature)
    assert make_codec(mode, algorithm, purpose="app-a").open(token).seq == 1


def test_unknown_kid_is_refused_before_any_crypto() -> None:
    token = make_codec(ring=Keyring([K2])).seal(rich_context())
    exc = refused(make_codec(), token)
    assert isinstance(exc, UnknownKeyId)
    assert exc.code == "token_unknown_key"
    assert exc.facts["kid"] == "k2"


@pytest.mark.parametrize(("mint", "check"), [(a, b) for a in MODES for b in MODES if a != b])
def test_mode_or_algorithm_mismatch_is_refused(
    mint: tuple[str, str], check: tuple[str, str]
) -> None:
    token = make_codec(*mint).seal(rich_context())
    exc = refused(make_codec(*check), token)
    assert isinstance(exc, WrongMode)
    assert exc.code == "token_wrong_mode"


def test_a_flag_combination_no_mode_has_is_named_as_such() -> None:
    """The ChaCha bit without the sealed bit names no mode: the refusal says which
    flags the token has, not "signed, expected signed" (which reads as no mismatch)."""
    raw = bytearray(raw_of(make_codec(mode="signed").seal(rich_context())))
    raw[1] |= 0x04  # the header's flags byte
    exc = refused(make_codec(mode="signed"), encode_raw(bytes(raw)))
    assert isinstance(exc, WrongMode)
    assert "flags" in str(exc) and "0x04" in str(exc)


def test_rotation_old_tokens_open_and_need_reseal() -> None:
    old_codec = make_codec(ring=Keyring([K1]))
    token = old_codec.seal(rich_context())
    rotated = make_codec(ring=Keyring([K2, K1]))
    ctx = rotated.open(token)
    assert ctx.opened_kid == "k1"
    assert rotated.needs_reseal(ctx)
    resealed = rotated.seal(ctx)
    assert peek(resealed).kid == "k2"
    assert not rotated.needs_reseal(rotated.open(resealed))
    assert not old_codec.needs_reseal(old_codec.open(token))
    # Once the old key is retired, its tokens are refused.
    assert isinstance(refused(make_codec(ring=Keyring([K2])), token), UnknownKeyId)
    # A fresh context was never opened: nothing to reseal.
    assert not rotated.needs_reseal(Context.new(now=NOW))


# -- what each mode reveals ---------------------------------------------------------

MARKER = "PLAINTEXT-MARKER-7c1e"


def test_sealed_payload_is_not_readable_in_the_token() -> None:
    for algorithm in ("aes-256-gcm", "chacha20-poly1305"):
        codec = make_codec("sealed", algorithm, dictionary_id=0, level=1)
        ctx = Context.new(now=NOW)
        ctx.add_turn("user", MARKER * 3, ts=NOW)
        ctx.pinned.system = MARKER
        codec.compressor.min_size = 10**9  # store uncompressed: only the AEAD may hide it
        token = codec.seal(ctx)
        raw = raw_of(token)
        assert not peek(token).compressed
        assert MARKER.encode() not in raw
        assert MARKER[:8].encode() not in raw
        assert codec.open(token).turns[0].content == MARKER * 3


def test_signed_payload_is_readable_but_not_changeable() -> None:
    codec = make_codec("signed")
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", MARKER, ts=NOW)
    ctx.metadata["credits"] = 5
    token = codec.seal(ctx)
    env = envelope.parse(token)
    payload, mac = env.body[:-32], env.body[-32:]
    if env.header.compressed:
        payload = codec.compressor.decompress(payload, env.header.dictionary_id)
    wire = msgpack.unpackb(payload, raw=False)
    assert wire["t"][0][1] == MARKER  # anyone can read a signed token
    assert wire["m"] == {"credits": 5}

    # Change the content, keep the header and the MAC: refused.
    wire["m"]["credits"] = 5000
    forged = serialize.pack(wire)
    if env.header.compressed:
        forged = codec.compressor.compress(forged).data
    header_raw = env.raw[: len(env.raw) - len(env.body)]
    assert isinstance(refused(codec, encode_raw(header_raw + forged + mac)), BadSignature)
    # Re-sign with a key of one's own under the same kid: refused.
    attacker = make_codec("signed", ring=Keyring([Key("k1", b"evil" * 8)]))
    token2, _ = attacker.seal_payload(forged)
    assert isinstance(refused(codec, token2), BadSignature)


# -- expiry --------------------------------------------------------------------------


def test_ttl_expiry_with_injected_clock_and_skew_allowance() -> None:
    codec = make_codec(ttl=3600)
    token = codec.seal(rich_context())
    assert peek(token).expires_at == NOW + 3600
    skew = codec.limits.clock_skew
    assert skew == 30
    assert codec.open(token, now=NOW + 3600).seq == 1
    assert codec.open(token, now=NOW + 3600 + skew).seq == 1  # inside the skew allowance
    with pytest.raises(TokenExpired) as info:
        codec.open(token, now=NOW + 3600 + skew + 1)
    exc = info.value
    assert exc.code == "token_expired" and exc.status == 401
    assert exc.facts["expired_at"] == NOW + 3600
    # The codec's own clock is used when no time is passed.
    late = make_codec(now=NOW + 3600 + skew + 1)
    assert isinstance(refused(late, token), TokenExpired)
    assert make_codec(now=NOW + 3600 + skew).open(token).seq == 1


def test_skew_is_configurable_and_explicit_expiry_overrides_ttl() -> None:
    codec = make_codec(ttl=3600, limits=Limits(clock_skew=0))
    token = codec.seal(rich_context(), expires_at=NOW + 10)
    assert peek(token).expires_at == NOW + 10
    assert codec.open(token, now=NOW + 10).seq == 1
    with pytest.raises(TokenExpired):
        codec.open(token, now=NOW + 11)


def test_no_ttl_means_no_expiry() -> None:
    codec = make_codec()
    token = codec.seal(rich_context())
    assert peek(token).expires_at == 0
    assert codec.open(token, now=2**32 - 1).seq == 1


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("3600", TypeError),
        (True, TypeError),
    ],
)
def test_a_ttl_that_would_make_every_token_expired_or_never_is_refused(
    ttl: object, error: type[Exception]
) -> None:
    """Codec(ttl=0) sealed tokens that were expired already; a str failed at seal."""
    with pytest.raises(error, match="ttl"):
        make_codec(ttl=ttl)


def test_no_expiry_overrides_the_codec_ttl_and_zero_is_no_expiry() -> None:
    """expires_at=0 used to be clamped to 1: a token expired since 1970, although 0 in
    the header means "no expiry", and no call could override a ttl with "never"."""
    codec = make_codec(ttl=3600)
    for never in (NO_EXPIRY, 0, 0.0):
        token = codec.seal(rich_context(), expires_at=never)
        assert peek(token).expires_at == 0
        assert codec.open(token, now=2**32 - 1).seq == 1
    # A past time is still a token expired already, never one that does not expire.
    for past in (0.5, -5, NOW - 3600):
        token = codec.seal(rich_context(), expires_at=past)
        assert peek(token).expires_at == max(1, int(past))
        assert isinstance(refused(codec, token), TokenExpired)
    assert peek(codec.seal(rich_context(), expires_at=2**40)).expires_at == 2**32 - 1


@pytest.mark.parametrize(
    ("expires_at", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (float("-inf"), ValueError),
        ("1767225600", TypeError),
        (True, TypeError),
    ],
)
def test_an_expiry_that_is_no_time_is_refused_and_changes_nothing(
    expires_at: object, error: type[Exception]
) -> None:
    codec = make_codec()
    ctx = rich_context()
    with pytest.raises(error, match="expires_at"):
        codec.seal(ctx, expires_at=expires_at)  # type: ignore[arg-type]
    assert (ctx.seq, ctx.parent, ctx.opened_kid) == (0, None, None)
    assert codec.open(codec.seal(ctx)).seq == 1


def test_expiry_is_checked_only_after_authentication() -> None:
    # An attacker cannot learn anything from, or extend, the expiry: it is authenticated.
    codec = make_codec(ttl=60)
    raw = bytearray(raw_of(codec.seal(rich_context())))
    kid_len = raw[3]
    raw[4 + kid_len + 4 : 4 + kid_len + 8] = (2**32 - 1).to_bytes(4, "big")
    assert isinstance(refused(codec, encode_raw(bytes(raw))), BadSignature)


# -- tampering: every position -------------------------------------------------------


def _tokens_to_tamper() -> list[tuple[Codec, str]]:
    small = Context.new(now=NOW, session_id=b"\x01" * 16)
    small.add_turn("user", "hi", ts=NOW)
    out = []
    for mode, algorithm in MODES:
        codec = make_codec(mode, algorithm, ttl=600)
        out.append((codec, codec.seal(small)))
    chacha = make_codec("sealed", "chacha20-poly1305")
    out.append((chacha, chacha.seal(rich_context())))  # compressed
    return out


@pytest.mark.parametrize("index", range(4))
def test_every_single_character_change_is_refused(index: int) -> None:
    codec, token = _tokens_to_tamper()[index]
    assert codec.open(token).turns
    kinds: set[type] = set()
    for i in range(len(token)):
        for c in B64_ALPHABET + ODD_CHARS:
            if c != token[i]:
                kinds.add(type(refused(codec, token[:i] + c + token[i + 1 :])))
    assert kinds <= {
        MalformedToken,
        UnsupportedVersion,
        BadSignature,
        UnknownKeyId,
        WrongMode,
    }
    assert BadSignature in kinds and MalformedToken in kinds


@pytest.mark.parametrize("index", range(4))
def test_every_truncation_and_extension_is_refused(index: int) -> None:
    codec, token = _tokens_to_tamper()[index]
    for n in range(len(token)):
        refused(codec, token[:n])
    for tail in [*B64_ALPHABET, "AA", "AAA", "AAAA", "=", "==", ".", " ", "\n", token[3:]]:
        refused(codec, token + tail)
        refused(codec, tail + token)


@pytest.mark.parametrize("index", range(4))
def test_every_decoded_byte_change_is_refused(index: int) -> None:
    codec, token = _tokens_to_tamper()[index]
    raw = raw_of(token)
    for i in range(len(raw)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF):
            changed = bytearray(raw)
            changed[i] ^= mask
            refused(codec, encode_raw(bytes(changed)))
        for value in (0x00, 0xFF):
            if raw[i] != value:
                changed = bytearray(raw)
                changed[i] = value
                refused(codec, encode_raw(bytes(changed)))
    for n in range(len(raw)):
        refused(codec, encode_raw(raw[:n]))
    for extra in (b"\x00", b"\xff", b"\x00" * 16, raw):
        refused(codec, encode_raw(raw + extra))
        refused(codec, encode_raw(extra + raw))


def test_swapping_header_and_body_between_tokens_is_refused() -> None:
    codec = make_codec("signed")
    a = raw_of(codec.seal(rich_context()))
    b = raw_of(codec.seal(Context.new(now=NOW)))
    header_len = 12 + 2
    refused(codec, encode_raw(a[:header_len] + b[header_len:]))
    refused(codec, encode_raw(b[:header_len] + a[header_len:]))


# -- decompression bombs ---------------------------------------------------------------

BOMB_SIZE = 50 * 1024 * 1024


def _bomb(with_content_size: bool) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        19,
        format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        write_checksum=0,
        write_dict_id=0,
        write_content_size=int(with_content_size),
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    if with_content_size:
        return cctx.compress(b"\0" * BOMB_SIZE)
    out = io.BytesIO()
    chunk = b"\0" * (1024 * 1024)
    with cctx.stream_writer(out, closefd=False) as writer:  # streaming: size unknown
        for _ in range(BOMB_SIZE // len(chunk)):
            writer.write(chunk)
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[bool, bytes]:
    return {declared: _bomb(declared) for declared in (True, False)}


@pytest.mark.parametrize("declared", [True, False])
@pytest.mark.parametrize(("mode", "algorithm"), MODES)
def test_decompression_bomb_is_refused_fast_with_bounded_memory(
    bombs: dict[bool, bytes], declared: bool, mode: str, algorithm: str
) -> None:
    data = bombs[declared]
    params = zstandard.get_frame_parameters(data, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    if declared:
        assert params.content_size == BOMB_SIZE
    else:
        assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    codec = make_codec(mode, algorithm, dictionary_id=0)
    token = protect_payload(codec, data, compressed=True)
    assert len(token) < codec.limits.max_token_bytes  # a legitimate, small token
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(TokenTooLarge) as info:
            codec.open(token)
        elapsed = time.perf_counter() - t0
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 4 * codec.limits.max_decompressed_bytes  # never near the 50 MB
    assert info.value.code == "token_too_large"
    assert info.value.facts["limit"] == codec.limits.max_decompressed_bytes


def test_payload_just_over_a_small_cap_is_refused_and_at_the_cap_opens() -> None:
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "x" * 5000, ts=NOW)
    size = len(serialize.pack(schema.to_wire(ctx)))
    big = make_codec(limits=Limits(max_decompressed_bytes=100_000))
    token = big.seal(ctx)
    assert peek(token).compressed
    exact = len(big.open_payload(token)[1])
    assert abs(exact - size) <= 3
    assert make_codec(limits=Limits(max_decompressed_bytes=exact)).open(token).turns
    with pytest.raises(TokenTooLarge):
        make_codec(limits=Limits(max_decompressed_bytes=exact - 1)).open(token)


def test_corrupt_but_authenticated_frames_are_malformed() -> None:
    codec = make_codec("signed")
    for data in (b"", b"\x00", b"\xff" * 40, b"not a zstd frame at all"):
        exc = refused(codec, protect_payload(codec, data, compressed=True))
        assert isinstance(exc, MalformedToken | InvalidContext | TokenTooLarge)


def test_unknown_dictionary_id_is_unsupported() -> None:
    codec = make_codec("signed")
    data = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            3, format=zstandard.FORMAT_ZSTD1_MAGICLESS
        )
    ).compress(serialize.pack({"v": 2}) * 10)
    exc = refused(codec, protect_payload(codec, data, compressed=True, dictionary_id=250))
    assert isinstance(exc, UnsupportedVersion)


# -- msgpack limits, with legitimately signed payloads ---------------------------------


def _signed_payload_token(codec: Codec, payload: bytes) -> str:
    token, _ = codec.seal_payload(payload)
    return token


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


@pytest.mark.parametrize(
    ("label", "payload"),
    [
        ("array header claiming 4G elements", b"\xdd" + _u32(2**32 - 1)),
        ("map header claiming 4G entries", b"\xdf" + _u32(2**32 - 1)),
        ("str header claiming 4 GB", b"\xdb" + _u32(2**32 - 1) + b"abc"),
        ("bin header claiming 4 GB", b"\xc6" + _u32(2**32 - 1) + b"abc"),
        ("array of 20001 nils", b"\xdd" + _u32(20_001) + b"\xc0" * 20_001),
        ("map of 2001 entries", serialize.pack({f"k{i}": 0 for i in range(2001)})),
        ("fixext 1", b"\xd4\x05\x00"),
        ("timestamp ext", b"\xd6\xff" + _u32(NOW)),
        ("ext inside the context map", b"\x81\xa1m" + b"\xd5\x01\x00\x00"),
        ("ext 8 with a large body", b"\xc7\xff\x01" + b"\x00" * 255),
        ("deep nesting", b"\x91" * 100_000 + b"\xc0"),
        ("non-string map key", b"\x81\x01\x02"),
        ("trailing data", serialize.pack({"v": 2}) + b"\xc0"),
        ("truncated", serialize.pack({"v": 2, "t": "x" * 40})[:-3]),
        ("reserved byte", b"\xc1"),
        ("not a map", serialize.pack([2, "context"])),
        ("no version", serialize.pack({"t": []})),
        ("bool version", serialize.pack({"v": True})),
        ("empty", b""),
    ],
)
def test_msgpack_limits_and_junk_are_invalid_context(label: str, payload: bytes) -> None:
    codec = make_codec("signed", limits=Limits(max_decompressed_bytes=200_000))
    token = _signed_payload_token(codec, payload)
    t0 = time.perf_counter()
    exc = refused(codec, token)
    assert time.perf_counter() - t0 < 0.5, label
    assert isinstance(exc, InvalidContext), (label, exc)
    assert exc.code == "token_invalid_context"


def test_string_limit_applies_inside_the_payload() -> None:
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "y" * 2000, ts=NOW)
    token = make_codec().seal(ctx)
    with pytest.raises(InvalidContext):
        make_codec(limits=Limits(max_str_bytes=1000)).open(token)


@pytest.mark.parametrize(
    "wire",
    [
        {"v": 2},
        {"v": 2, "i": b"short", "q": 1, "c": 0, "a": 0, "t": []},
        {"v": 2, "i": b"\x00" * 16, "q": "one", "c": 0, "a": 0, "t": []},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [[9, "x", 0]]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [[1, b"bytes", 0]]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [[1]]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [[1, "x", 0, 5]]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [], "m": [1]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [], "s": 5},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [], "P": ["x"]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [], "l": [1, 2]},
        {"v": 2, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": [], "o": [[1]]},
    ],
)
def test_well_formed_msgpack_that_is_not_a_context_is_invalid(wire: dict) -> None:
    codec = make_codec("sealed")
    exc = refused(codec, _signed_payload_token(codec, serialize.pack(wire)))
    assert isinstance(exc, InvalidContext)


def test_future_schema_version_is_unsupported() -> None:
    codec = make_codec()
    wire = {"v": 99, "i": b"\x00" * 16, "q": 1, "c": 0, "a": 0, "t": []}
    exc = refused(codec, _signed_payload_token(codec, serialize.pack(wire)))
    assert isinstance(exc, UnsupportedVersion)
    assert exc.code == "token_unsupported_version"
    assert exc.facts["schema_version"] == 99


def test_peek_reads_an_unverified_header_but_respects_the_cap() -> None:
    token = make_codec().seal(rich_context())
    assert peek(token).kid == "k1"
    with pytest.raises(TokenTooLarge):
        peek("s1." + "A" * 70_000)


def test_a_long_string_with_a_lone_surrogate_is_refused_as_not_serializable() -> None:
    """Past a quarter of max_str_bytes the seal measures the string's UTF-8 length; a
    lone surrogate there used to escape as a bare UnicodeEncodeError (an HTML 500)."""
    from satchel.errors import ContextNotSerializable

    codec = Codec(Keyring.generate())
    ctx = Context.new()
    ctx.metadata["notes"] = "a" * 200_000 + "\ud800"
    with pytest.raises(ContextNotSerializable):
        codec.seal(ctx)


# -- seal refuses what open refuses -----------------------------------------------------


def _with(**changes: object) -> Context:
    ctx = rich_context()
    for name, value in changes.items():
        target: object = ctx
        *path, last = name.split("__")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return ctx


def _dropped_int_key() -> Context:
    ctx = rich_context()
    ctx.lifecycle.dropped[1] = 1  # type: ignore[index]
    return ctx


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: _with(session_id=b"12345678"), "session_id is 8 bytes"),
        (lambda: _with(session_id="ab" * 16), "session_id is str"),
        (lambda: _with(seq=-1), "seq is -1"),
        (lambda: _with(seq=-5), "seq is -5"),
        (lambda: _with(seq=1.5), "seq is float"),
        (lambda: _with(seq="3"), "seq is str"),
        (lambda: _with(seq=2**63), "seq is 9223372036854775808"),
        (lambda: _with(seq=2**63 - 2), "would pass the largest sequence number"),
        (lambda: _with(created_at="2026-01-01"), "created_at is str"),
        (lambda: _with(last_active=None), "last_active is NoneType"),
        (lambda: _with(created_at=True), "created_at is bool"),
        (lambda: _with(metadata_version=2**31), "metadata_version is 2147483648"),
        (lambda: _with(metadata_version=-1), "metadata_version is -1"),
        (lambda: _with(metadata_version="1"), "metadata_version is str"),
        (lambda: _with(bound_user="u1"), "bound_user is str"),
        (_dropped_int_key, "lifecycle.dropped has a int key"),
        (lambda: _with(lifecycle__summarized=float("inf")), "lifecycle.summarized is float"),
        (lambda: _with(lifecycle__lost="many"), "lifecycle.lost is str"),
        (lambda: _with(lifecycle__recent=[("window", "dropped", 1, 0, "")]), "recent[0] is tuple"),
        (
            lambda: _with(lifecycle__recent=[LifecycleAction("window", "dropped", 1, {1: 2})]),
            "lifecycle.recent[0][3] has a int key",
        ),
        (lambda: _with(overflow=[(b"d" * 12, 1, 2, 3, 4)]), "overflow[0] is tuple"),
        (lambda: _with(overflow=[SegmentRef("d" * 12, 1, 2)]), "overflow[0].digest is str"),
        (lambda: _with(overflow=[SegmentRef(b"d", 1, 2, ts="now")]), "overflow[0].ts is str"),
        (lambda: _with(overflow=[SegmentRef(b"d", 1, float("nan"))]), "overflow[0].size is float"),
        (lambda: _with(turns=None), "turns is NoneType"),
    ],
)
def test_seal_refuses_what_open_would_refuse_naming_the_field(make: object, named: str) -> None:
    """Each of these sealed into a token that open() refused (token_invalid_context),
    or raised a bare error: the conversation broke on its next request, far from the
    app's mistake. And the seal had counted: ctx.seq went up for a token never used."""
    codec = make_codec()
    ctx = make()  # type: ignore[operator]
    before = (ctx.seq, ctx.parent, ctx.opened_kid)
    with pytest.raises(ContextNotSerializable) as info:
        codec.seal(ctx)
    assert info.value.code == "context_not_serializable"
    assert named in info.value.message
    assert (ctx.seq, ctx.parent, ctx.opened_kid) == before
    with pytest.raises(ContextNotSerializable):
        codec.measure(ctx)


def test_the_largest_sequence_number_is_sealed_and_opens() -> None:
    codec = make_codec()
    # 2**63 - 2: a token at 2**63 - 1 would open but could not be sealed again.
    assert codec.open(codec.seal(_with(seq=2**63 - 3))).seq == 2**63 - 2
    with pytest.raises(ContextNotSerializable):
        codec.seal(_with(seq=2**63 - 2))


def test_what_open_accepts_seals_even_when_it_is_not_what_satchel_writes() -> None:
    """The seal's checks are the reader's own: a value it would read (a count as a
    float) seals and opens, as it did before. An action of other types than the
    format's (a policy name that is not a str) is left out by both: it opened, and
    Context.to_dict then made no JSON of it (a 500 at an app's context route)."""
    codec = make_codec()
    ctx = rich_context()
    ctx.lifecycle.summarized = 2.0  # type: ignore[assignment]
    ctx.lifecycle.recent = [
        LifecycleAction(7, "dropped", 1, 0.5, ""),  # type: ignore[arg-type]
        LifecycleAction("window", "dropped", 1, 0.5, ""),
    ]
    ctx.overflow = [SegmentRef(b"d" * 12, 1.0, 2, 3, 4.5)]  # type: ignore[arg-type]
    opened = codec.open(codec.seal(ctx))
    assert opened.lifecycle.summarized == 2
    assert [a.policy for a in opened.lifecycle.recent] == ["window"]
    assert opened.overflow[0].turns == 1


@pytest.mark.parametrize(
    "action",
    [
        [b"window", "dropped", 3, 1.0, ""],  # a bin policy
        ["window", "dropped", 3, 1.0, b"detail"],  # a bin detail
        [{"k": b"x"}, None, None],  # a map, nils, three fields
        ["window", "dropped", True, 1.0, ""],  # a bool count
    ],
)
def test_an_action_of_other_types_in_a_minted_token_is_left_out(action: list) -> None:
    """Releases before 2026-11-28 sealed whatever an app put in the record; such a
    token opened with the action in it, and Context.to_dict then raised TypeError."""
    import json

    from satchel import serialize
    from satchel.schema import to_wire

    codec = Codec(Keyring.generate("k1"), mode="signed")
    ctx = Context.new()
    ctx.add_turn("user", "hi")
    wire = to_wire(ctx)
    wire["l"] = [{}, 0, 0, [action, ["window", "dropped", 2, 1.0, ""]]]
    token, _ = codec.seal_payload(serialize.pack(wire))
    opened = codec.open(token)
    assert [a.turns for a in opened.lifecycle.recent] == [2]
    json.dumps(opened.to_dict())


@pytest.mark.parametrize("key", ["i", "n"])
def test_a_nil_tool_call_id_or_name_is_refused_not_skipped(key: str) -> None:
    """docs/token-format.md section 6: a field of another type is token_invalid_context,
    never coerced or skipped; the writer leaves out a field that is None."""
    from satchel import serialize
    from satchel.schema import to_wire

    codec = Codec(Keyring.generate("k1"), mode="signed")
    ctx = Context.new()
    ctx.add_turn("user", "hi")
    wire = to_wire(ctx)
    wire["t"] = [[1, "hi", 1.0, {key: None}]]
    token, _ = codec.seal_payload(serialize.pack(wire))
    with pytest.raises(BadToken) as info:
        codec.open(token)
    assert info.value.code == "token_invalid_context"


@pytest.mark.parametrize("value", [None, {}, "s1.token", rich_context().turns])
def test_seal_of_something_other_than_a_context_is_a_type_error(value: object) -> None:
    codec = make_codec()
    for call in (codec.seal, codec.measure, codec.prepare):
        with pytest.raises(TypeError, match="seal takes a satchel Context, not"):
            call(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "lifecycle",
    [
        [{"window": "many"}, 0, 0, []],  # a count that is not a number
        [{7: 1}, 0, 0, []],  # a policy name that is not a str
    ],
)
def test_a_payload_signed_with_the_real_key_still_opens_only_if_it_is_valid(
    lifecycle: list,
) -> None:
    """Only the holder of the key can make these, but opening them must still end in
    a BadToken (a JSON 4xx), not in a context the pipeline fails on later (a 500)."""
    from satchel import serialize
    from satchel.schema import to_wire

    codec = Codec(Keyring.generate("k1"), mode="signed")
    ctx = Context.new()
    ctx.add_turn("user", "hi")
    wire = to_wire(ctx)
    wire["l"] = lifecycle
    token, _ = codec.seal_payload(serialize.pack(wire))
    with pytest.raises(BadToken) as info:
        codec.open(token)
    assert info.value.code == "token_invalid_context"


def _wire_of_a_small_context() -> dict:
    from satchel.schema import to_wire

    ctx = Context.new()
    ctx.add_turn("user", "hi")
    ctx.parent = b"p" * 12
    return to_wire(ctx)


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda wire: wire.__setitem__(key, value)


def _set_turn(value: object) -> Callable[[dict], None]:
    return lambda wire: wire.__setitem__("t", [value])


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (_set("t", {"0": [1, "hi", 0]}), "turns as a map"),
        (_set("v", 2.0), "version as a float"),
        (_set("c", float("nan")), "created at NaN (it switched the max-age check off)"),
        (_set("a", float("inf")), "last active infinite"),
        (_set("p", b"p" * 11), "a parent of 11 bytes"),
        (_set("P", [1, []]), "a system prompt that is not a str"),
        (_set("P", ["s", [2]]), "a pinned fact that is not a str"),
        (_set("P", ["s", "facts"]), "pinned facts that are not an array"),
        (_set_turn([1, "hi", 0, {}, "x"]), "a turn of 5 fields"),
        (_set_turn([1, "hi", 0, {"z": 1}]), "an unknown key in a turn's extras"),
        (_set_turn([2, "", 0, {"c": [["id", "fn", 5]]}]), "tool-call arguments of 5"),
        (_set_turn([2, "", 0, {"c": [[1, "fn", "{}"]]}]), "a tool-call id of 1"),
        (_set_turn([2, "", 0, {"b": [["t", b"x", 3]]}]), "a block provider of 3"),
        (_set_turn([2, "", 0, {"c": {"a": 1}}]), "tool calls as a map"),
    ],
)
def test_the_reader_takes_every_field_as_the_spec_types_it(
    change: Callable[[dict], None], what: str
) -> None:
    """docs/token-format.md, schema 2: a payload signed with the real key (only its
    holder can make one) that breaks a field's type is token_invalid_context, not read
    by coercion (5 became '5') or by ignoring what does not fit."""
    from satchel import serialize

    codec = Codec(Keyring.generate("k1"), mode="signed")
    wire = _wire_of_a_small_context()
    assert codec.open(codec.seal_payload(serialize.pack(wire))[0]).turns[0].content == "hi"
    change(wire)
    token, _ = codec.seal_payload(serialize.pack(wire))
    with pytest.raises(BadToken) as info:
        codec.open(token)
    assert info.value.code == "token_invalid_context", what


@pytest.mark.parametrize("ts", [float("nan"), float("inf")])
def test_a_turn_time_an_older_release_sealed_as_nan_opens_as_zero(ts: float) -> None:
    """add_turn took NaN and infinity before 2026-11-28, and every token it sealed must
    open: the turn reads with time 0 (shown, never checked), and seals again."""
    from satchel import serialize

    codec = Codec(Keyring.generate("k1"), mode="signed")
    wire = _wire_of_a_small_context()
    wire["t"] = [[1, "hi", ts]]
    ctx = codec.open(codec.seal_payload(serialize.pack(wire))[0])
    assert ctx.turns[0].ts == 0 and ctx.turns[0].content == "hi"
    assert codec.open(codec.seal(ctx)).turns[0].ts == 0


def test_a_context_the_reader_would_refuse_is_refused_at_seal() -> None:
    """The seal side of the same rules: a NaN time or a short parent never reaches a token."""
    codec = make_codec()
    for change, named in (
        (lambda c: setattr(c, "created_at", float("nan")), "created_at"),
        (lambda c: setattr(c, "parent", b"short"), "parent"),
        (lambda c: setattr(c.turns[0], "ts", float("inf")), "ts"),
    ):
        ctx = Context.new()
        ctx.add_turn("user", "hi")
        change(ctx)
        with pytest.raises(ContextNotSerializable, match=named):
            codec.seal(ctx)


def test_a_refused_metadata_value_is_named_by_field_never_by_content_keys() -> None:
    """The message is logged at the HTTP edge: a field-like key is the app's schema and
    helps its developers; a key that is content (a user's own label) is withheld."""
    codec = make_codec()
    ctx = Context.new()
    ctx.metadata = {"credits": {"a set": {1, 2}}}
    with pytest.raises(ContextNotSerializable) as info:
        codec.seal(ctx)
    assert "metadata['credits'][<key #0>] is set" in info.value.message
    assert "a set" not in info.value.message


# -- a seal never issues a token its own codec refuses (a review's findings) ----------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_str_bytes", 8),
        ("max_array_len", 2),
        ("max_map_len", 5),
        ("max_decompressed_bytes", 10),
        ("max_token_bytes", 0),
        ("clock_skew", -1),
        ("max_map_len", 12.5),
        ("max_array_len", True),
    ],
)
def test_limits_below_what_the_token_itself_needs_are_refused(field: str, value: object) -> None:
    """Limits that the token's own fields break (a top-level map of up to ~20 keys,
    16-byte ids) made every token seal and then fail to open."""
    with pytest.raises((ValueError, TypeError), match=f"Limits.{field}"):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_the_smallest_limits_still_seal_tokens_that_open() -> None:
    floor = Limits(
        max_token_bytes=64 * 1024,
        max_str_bytes=64,
        max_array_len=16,
        max_map_len=32,
    )
    codec = make_codec(limits=floor)
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "hi", ts=NOW)
    ctx.summary = "earlier: greetings"
    ctx.pinned.system = "be brief"
    ctx.metadata = {"lang": "en", "plan": "pro"}
    ctx.metadata_version = 1
    ctx.bound_user = b"u" * 16
    for _ in range(3):  # the second seal adds the parent digest: one more top-level key
        ctx = codec.open(codec.seal(ctx))
    assert ctx.summary == "earlier: greetings" and ctx.seq == 3


@pytest.mark.parametrize("where", ["metadata", "nested metadata", "tool arguments"])
def test_a_map_key_longer_than_a_token_opens_is_refused_at_seal(where: str) -> None:
    """Only string values were measured: a long key sealed into a small token (it
    compresses well) that every later request refused as not valid msgpack."""
    codec = make_codec()
    key = "k" * (codec.limits.max_str_bytes + 1)
    ctx = Context.new(now=NOW)
    if where == "metadata":
        ctx.metadata = {key: 1}
    elif where == "nested metadata":
        ctx.metadata = {"outer": [{"inner": {key: 1}}]}
    else:
        ctx.add_turn("assistant", "", ts=NOW, tool_calls=[ToolCall("c1", "f", {key: 1})])
    with pytest.raises(ContextNotSerializable, match=r"key <key #0>.*longer than"):
        codec.seal(ctx)


def test_a_seal_that_msgpack_refuses_names_the_field() -> None:
    """The message blamed metadata for any packing failure; it names the field now."""
    codec = make_codec()
    ctx = Context.new(now=NOW)
    ctx.summary = "cut emoji \ud83d"
    with pytest.raises(ContextNotSerializable, match=r"sealed: summary: .*surrogates"):
        codec.seal(ctx)
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "fine", ts=NOW)
    ctx.metadata = {"plan": {"seats": 2**64}}
    with pytest.raises(ContextNotSerializable, match=r"sealed: metadata\['plan'\]\['seats'\]"):
        codec.seal(ctx)
    ctx = Context.new(now=NOW)
    ctx.turns.append(Turn("tool", "x", NOW, tool_call_id="c\udc00"))
    with pytest.raises(ContextNotSerializable, match=r"sealed: turns\[0\].tool_call_id"):
        codec.seal(ctx)


def test_a_malformed_mark_id_is_refused_as_not_serializable() -> None:
    ctx = Context.new(now=NOW)
    ctx.mark_id = b"abc"
    with pytest.raises(ContextNotSerializable, match="mark_id"):
        make_codec().seal(ctx)


@pytest.mark.parametrize("when", [2**64, -(2**63) - 1])
def test_a_time_past_the_integers_a_token_carries_is_refused_where_it_enters(when: int) -> None:
    with pytest.raises(ValueError, match="past the integers"):
        Context.new(now=when)
    ctx = Context.new(now=NOW)
    with pytest.raises(ValueError, match="past the integers"):
        ctx.add_turn("user", "hi", ts=when)
    assert not ctx.turns
    # The edges themselves seal and open.
    edge = Context.new(now=2**64 - 1)
    assert make_codec().open(make_codec().seal(edge)).created_at == 2**64 - 1


def test_codec_refuses_arguments_that_would_fail_later() -> None:
    """Each of these built a codec whose first open or seal failed with an error no
    caller expects (AttributeError, a token's UnsupportedVersion), or was ignored."""
    import satchel
    from satchel.errors import ConfigurationError

    with pytest.raises(TypeError, match=r"Keyring\.from_string"):
        Codec("k1:" + "A" * 43)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keyring is a Keyring"):
        Codec(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="limits is a Limits"):
        Codec(RING, limits={"max_token_bytes": 1000})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="applies to sealed tokens"):
        Codec(RING, "signed", algorithm="chacha20-poly1305")
    with pytest.raises(ConfigurationError, match="dictionary_id=99") as refused:
        Codec(RING, dictionary_id=99)
    assert not isinstance(refused.value, BadToken)
    # The errors the docs name are importable from the package itself.
    for name in ("ConfigurationError", "ContextNotSerializable", "ContextBusy", "InvalidRequest"):
        assert name in satchel.__all__ and issubclass(getattr(satchel, name), SatchelError)
    assert satchel.Header is Header and isinstance(peek(Codec(RING).seal(Context.new())), Header)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, "1700000000", True])
def test_a_now_that_is_not_a_finite_time_is_refused_not_ignored(now: object) -> None:
    """open(now=nan) opened an expired token: NaN compares false with the expiry, so the
    check passed (and Pipeline.load's idle and age limits with it). A time that is not a
    finite number is the caller's mistake, refused as such before any token check."""
    codec = make_codec(ttl=10)
    token = codec.seal(rich_context())
    with pytest.raises((ValueError, TypeError), match=r"^now is Unix seconds"):
        codec.open(token, now=now)  # type: ignore[arg-type]
    with pytest.raises(TokenExpired):
        codec.open(token, now=NOW + 3600)
    assert codec.open(token, now=NOW + 5).seq == 1  # an int is a time
    assert codec.open(token, now=float(NOW)).seq == 1
    # Any real number is (numpy's int64 and float32 were, before the check, and Decimal).
    import decimal
    import fractions

    assert codec.open(token, now=decimal.Decimal(NOW)).seq == 1
    assert codec.open(token, now=fractions.Fraction(NOW)).seq == 1


@pytest.mark.parametrize("level", [99, -200000, "3", True, 2.0, 0])
def test_a_zstd_level_out_of_range_is_refused_where_it_is_given(level: Any) -> None:
    """zstd clamps a level out of range without a word (99 ran as 22), a str failed
    deep inside zstandard with a TypeError, and 0 failed at the first seal."""
    with pytest.raises(ValueError, match="zstd level"):
        Codec(Keyring.generate(), level=level)
    for fine in (-5, 1, 22):
        assert Codec(Keyring.generate(), level=fine).compressor.level == fine
