"""Length padding (Codec(pad_to=...), SATCHEL_PAD_TO): token lengths fall in buckets."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from satchel import Codec, Context, Key, Keyring, envelope, padding
from satchel.envelope import FLAG_PADDED
from satchel.errors import BadSignature, ConfigurationError, MalformedToken
from satchel.protect import make_protector
from tests.test_codec import MODES, NOW, RING, encode_raw, raw_of, rich_context


def codec(mode: str = "sealed", algorithm: str = "aes-256-gcm", **kwargs: object) -> Codec:
    return Codec(RING, mode, algorithm=algorithm, clock=lambda: NOW, **kwargs)  # type: ignore[arg-type]


def context_of(text: str) -> Context:
    ctx = Context.new(now=NOW, session_id=bytes(16))
    ctx.add_turn("user", text, ts=NOW)
    return ctx


@pytest.mark.parametrize("mode, algorithm", MODES)
@pytest.mark.parametrize("pad_to", [16, 256, 1000])
def test_every_token_length_is_a_multiple_of_pad_to(mode: str, algorithm: str, pad_to: int) -> None:
    padded = codec(mode, algorithm, pad_to=pad_to)
    rng = random.Random(pad_to)
    lengths = set()
    for size in range(0, 3000, 97):
        # Text that compresses well and text that does not: both land on a bucket.
        text = "word " * (size // 5) if size % 2 else rng.randbytes(size // 2).hex()
        token = padded.seal(context_of(text))
        raw = raw_of(token)
        assert len(raw) % pad_to == 0
        assert envelope.parse(token).header.padded
        assert padded.measure(context_of(text)) == len(token)  # the budget sees padding
        assert padded.open(token).turns[0].content == text
        lengths.add(len(raw))
    assert len(lengths) < 3000 // 97  # many contexts share a length


@pytest.mark.parametrize("mode, algorithm", MODES)
def test_padded_and_unpadded_tokens_open_under_either_setting(mode: str, algorithm: str) -> None:
    ctx = rich_context()
    plain, padded = codec(mode, algorithm), codec(mode, algorithm, pad_to=512)
    for sealer in (plain, padded):
        token = sealer.seal(ctx)
        for opener in (plain, padded):
            opened = opener.open(token)
            assert opened.summary == ctx.summary and opened.metadata == ctx.metadata
    assert not envelope.parse(plain.seal(ctx)).header.padded


@pytest.mark.parametrize("mode, algorithm", MODES)
def test_padding_flag_and_bytes_are_authenticated(mode: str, algorithm: str) -> None:
    padded = codec(mode, algorithm, pad_to=256)
    raw = raw_of(padded.seal(rich_context()))
    cleared = bytes([raw[0], raw[1] & ~FLAG_PADDED]) + raw[2:]
    with pytest.raises(BadSignature):
        padded.open(encode_raw(cleared))
    tail = 32 if mode == "signed" else 16  # the MAC, or the AEAD tag
    length_field = len(raw) - tail - 2
    for index in (length_field - 1, length_field, length_field + 1):  # a pad byte, the length
        changed = bytearray(raw)
        changed[index] ^= 0x01
        with pytest.raises(BadSignature):
            padded.open(encode_raw(bytes(changed)))


def _signed_with_body(data: bytes) -> str:
    """A signed token whose payload is ``data``, MACed with the real key: only a key
    holder could make it, and the reader must still refuse bad padding inside it."""
    header = envelope.pack_header(FLAG_PADDED, 0, "k1", NOW, 0)
    protector = make_protector("signed", RING, "satchel")
    return encode_raw(header + protector.protect("k1", b"s1." + header, data))


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no room for the length field
        b"\x01",
        b"payload\x00\x01",  # n = 1: shorter than the length field itself
        b"pay\x00\x00\x00\xff",  # n = 255: longer than the data
        b"payload\x07\x00\x00\x04",  # a non-zero padding byte
    ],
)
def test_malformed_padding_inside_an_authenticated_token_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedToken, match="padding"):
        codec("signed").open(_signed_with_body(data))


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=5000))
@settings(max_examples=200, deadline=None)
def test_pad_unpad_round_trip(payload: bytes, extra: int) -> None:
    unpadded = len(payload) + extra
    data = padding.pad(payload, unpadded, 64)
    assert (unpadded + len(data) - len(payload)) % 64 == 0
    assert padding.unpad(data) == payload


@pytest.mark.parametrize("bad", [1, 15, 16385, -4, True, 2.5, "256"])
def test_pad_to_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        codec(pad_to=bad)


def test_flask_config_pads_the_tokens_it_issues() -> None:
    from flask import Flask

    from satchel import Satchel

    app = Flask("padded")
    ring = Keyring([Key("k1", os.urandom(32))])
    app.config.update(SATCHEL_KEYS=ring, SATCHEL_PAD_TO="512", TESTING=True)
    satchel = Satchel(app)

    @app.post("/say")
    def say() -> dict[str, int]:
        satchel.context.add_turn("user", "hello " * random.randint(1, 300))
        return {"turns": len(satchel.context.turns)}

    client = app.test_client()
    token = None
    for _ in range(6):
        response = client.post("/say", headers={"Satchel-Context": token} if token else {})
        assert response.status_code == 200
        token = response.headers["Satchel-Context"]
        assert len(raw_of(token)) % 512 == 0
    assert Codec(ring).open(token).turns  # an unpadded reader opens it too

    bad = Flask("bad")
    bad.config.update(SATCHEL_KEYS=ring, SATCHEL_PAD_TO=7)
    with pytest.raises(ConfigurationError, match="SATCHEL_PAD_TO"):
        Satchel(bad)
