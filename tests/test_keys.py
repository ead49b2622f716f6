"""Keyring: parsing, rotation order, per-purpose HKDF derivation, no secrets in reprs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import Any

import pytest

from satchel import Codec, Context, Key, Keyring
from satchel.errors import BadSignature, ConfigurationError, UnknownKeyId
from satchel.keys import b64url_decode, b64url_encode, generate_key

SECRET = bytes(range(32))


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out, to check the derivation independently of `cryptography`."""
    prk = hmac.digest(salt, ikm, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def test_derivation_is_hkdf_sha256_with_documented_salt_and_info() -> None:
    ring = Keyring([Key("tv", SECRET)])
    for use in ("mac", "aes-256-gcm", "chacha20-poly1305"):
        expected = hkdf_sha256(SECRET, b"satchel/v1", b"satchel\x00" + use.encode())
        assert ring.derive("tv", "satchel", use) == expected


def test_subkeys_differ_per_purpose_use_and_key() -> None:
    ring = Keyring([Key("a", SECRET), Key("b", SECRET[::-1])])
    derived = {
        ring.derive(kid, purpose, use)
        for kid in ("a", "b")
        for purpose in ("satchel", "other-app")
        for use in ("mac", "aes-256-gcm", "chacha20-poly1305")
    }
    assert len(derived) == 12
    assert SECRET not in derived and SECRET[::-1] not in derived


def test_purpose_and_use_cannot_be_confused_by_concatenation() -> None:
    # info = purpose NUL use: ("ab", "c") and ("a", "bc") must not share a subkey.
    ring = Keyring([Key("k", SECRET)])
    assert ring.derive("k", "ab", "c") != ring.derive("k", "a", "bc")
    # A NUL inside either would let ("a\0b", "c") and ("a", "b\0c") share an info.
    for purpose, use in (("a\x00b", "c"), ("a", "b\x00c")):
        with pytest.raises(ValueError, match="NUL"):
            ring.derive("k", purpose, use)
    with pytest.raises(ValueError, match="NUL"):
        Codec(ring, purpose="app\x00mac")


def test_current_key_is_first_and_every_key_opens() -> None:
    old, new = Key("old", b"o" * 32), Key("new", b"n" * 32)
    ring = Keyring([new, old])
    assert ring.current is new
    assert ring.kids == ["new", "old"]
    assert ring.get("old") is old
    assert len(ring) == 2


def test_unknown_kid_raises_bad_token_subclass() -> None:
    ring = Keyring([Key("k1", SECRET)])
    with pytest.raises(UnknownKeyId) as info:
        ring.get("k9")
    assert info.value.code == "token_unknown_key"
    assert info.value.facts == {"kid": "k9"}


def test_from_string_round_trip_and_whitespace() -> None:
    ring = Keyring([Key("k2", b"2" * 32), Key("k1", b"1" * 32)])
    text = ring.to_string()
    assert text == f"k2:{b64url_encode(b'2' * 32)},k1:{b64url_encode(b'1' * 32)}"
    again = Keyring.from_string(" " + text.replace(",", " , ") + ", ")
    assert again.kids == ["k2", "k1"]
    assert again.get("k1").secret == b"1" * 32


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty ring
        "nosecret",  # no colon
        "k1:" + b64url_encode(b"short"),  # under 16 bytes
        "bad kid!:" + b64url_encode(b"x" * 32),  # kid alphabet
        "k" * 17 + ":" + b64url_encode(b"x" * 32),  # kid too long
        "k1:" + b64url_encode(b"x" * 32) + ",k1:" + b64url_encode(b"y" * 32),  # duplicate
        "k1:a",  # not valid base64url
    ],
)
def test_bad_key_strings_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Keyring.from_string(text)


@pytest.mark.parametrize(
    "secret",
    [
        "abc!!@@def" + b64url_encode(SECRET),  # stray characters: were skipped
        b64url_encode(SECRET)[:20] + " " + b64url_encode(SECRET)[20:],  # inner space
        b64url_encode(SECRET) + ";k2:" + b64url_encode(SECRET),  # the wrong separator
        b64url_encode(SECRET)[:-1] + "=",  # a padding that does not fit the length
        b64url_encode(SECRET) + "AB",  # a length no base64 has (1 mod 4)
    ],
)
def test_a_secret_that_is_not_strict_base64url_is_refused_naming_only_the_kid(
    secret: str,
) -> None:
    """The secret was decoded by a decoder that skips what it does not know, so a
    typo or a paste gone wrong silently became another key."""
    with pytest.raises(ConfigurationError) as info:
        Keyring.from_string(f"k2:{b64url_encode(b'2' * 32)}, k1:{secret}")
    exc = info.value
    assert "'k1'" in exc.message and exc.facts == {"kid": "k1"}
    assert secret not in exc.message and secret[:8] not in exc.message


def test_a_secret_cut_short_is_taken_with_a_warning_naming_only_the_kid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A secret cut short by a character when pasted decodes to another secret (its
    last character carries bits no encoder writes): every token the other instances
    seal is then a bad signature here, with nothing said at start. It still loads (a
    ring that worked must not stop an upgraded app from starting), with a warning."""
    cut = b64url_encode(SECRET)[:-1]
    with caplog.at_level(logging.WARNING, logger="satchel.keys"):
        ring = Keyring.from_string(f"k1:{cut}")
    assert ring.current.secret == SECRET[:31]
    [record] = [r for r in caplog.records if r.name == "satchel.keys"]
    assert "'k1'" in record.getMessage() and "cut short" in record.getMessage()
    assert cut[:8] not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="satchel.keys"):
        Keyring.from_string(f"k1:{b64url_encode(SECRET)}, k2:{base64.b64encode(SECRET).decode()}")
    assert not caplog.records  # well-formed keys, unpadded or padded: nothing said


def test_a_secret_given_as_text_is_refused_when_the_key_is_made() -> None:
    """``Key("k1", "a str")`` was accepted, and every seal and open then raised a
    TypeError from HKDF: not a BadToken, which is all Codec.open() documents."""
    text = b64url_encode(SECRET)
    with pytest.raises(ConfigurationError) as info:
        Key("k1", text)  # type: ignore[arg-type]
    assert "bytes, not str" in info.value.message and text not in info.value.message
    with pytest.raises(ConfigurationError):
        Key("k1", bytearray(SECRET))  # type: ignore[arg-type]


def test_standard_base64_secrets_are_accepted() -> None:
    """`openssl rand -base64 32` writes '+' and '/': unambiguous, so still taken."""
    secret = b"\xfb\xff" * 16
    standard = base64.b64encode(secret).decode()
    assert "+" in standard or "/" in standard
    assert Keyring.from_string(f"k1:{standard}").current.secret == secret


def test_padded_base64url_secrets_are_accepted() -> None:
    padded = base64.urlsafe_b64encode(SECRET).decode()
    assert padded.endswith("=")
    assert Keyring.from_string(f"k1:{padded}").current.secret == SECRET


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SATCHEL_KEYS", "k1:" + b64url_encode(SECRET))
    assert Keyring.from_env().current.secret == SECRET
    monkeypatch.setenv("SATCHEL_KEYS", "  ")
    with pytest.raises(ConfigurationError):
        Keyring.from_env()


def test_secrets_never_appear_in_repr_or_str() -> None:
    key = Key("k1", SECRET)
    ring = Keyring([key])
    for text in (repr(key), str(key), repr(ring), str(ring), repr(Codec(ring))):
        assert SECRET.hex() not in text
        assert b64url_encode(SECRET) not in text
        assert repr(SECRET) not in text


def test_generate_and_rotate() -> None:
    ring = Keyring.generate()
    assert len(ring.current.secret) == 32
    assert Keyring.generate().current.secret != ring.current.secret
    rotated = ring.rotated(generate_key("k2new"))
    assert rotated.current.kid == "k2new"
    assert rotated.kids[1:] == ring.kids
    assert len(rotated.rotated(keep=2)) == 2


def test_from_secrets_stretches_short_secrets_and_ids_are_stable() -> None:
    ring = Keyring.from_secrets(["dev", "a-long-enough-flask-secret-key"])
    assert len(ring) == 2
    assert ring.current.secret == hashlib.sha256(b"satchel-short-secret" + b"dev").digest()
    assert Keyring.from_secrets(["dev"]).kids[0] == ring.kids[0]
    assert all(kid.startswith("f") and len(kid) == 7 for kid in ring.kids)


def test_b64url_helpers_round_trip() -> None:
    for n in range(0, 40):
        data = bytes(range(n))
        text = b64url_encode(data)
        assert "=" not in text and "+" not in text and "/" not in text
        assert b64url_decode(text) == data


def test_same_kid_different_secret_is_a_bad_signature() -> None:
    ctx = Context.new(now=1000)
    token = Codec(Keyring([Key("k1", b"a" * 32)])).seal(ctx)
    with pytest.raises(BadSignature):
        Codec(Keyring([Key("k1", b"b" * 32)])).open(token)


def test_a_key_written_secret_first_never_echoes_the_secret() -> None:
    secret = b64url_encode(SECRET)
    for text in (f"{secret}:k1", f"{secret}:k!"):
        with pytest.raises(ConfigurationError) as info:
            Keyring.from_string(text)
        exc = info.value
        assert secret[:8] not in exc.message and secret[:8] not in repr(exc.facts)
        assert "kid:secret" in exc.message


def test_a_key_id_with_a_trailing_newline_is_refused() -> None:
    """The pattern's $ matched before a final newline: such a key sealed tokens that its
    own codec refuses (a key id is A-Z a-z 0-9 _ -, docs/token-format.md)."""
    from satchel.errors import ConfigurationError
    from satchel.keys import Key

    with pytest.raises(ConfigurationError, match="a key id is"):
        Key("k1\n", b"\x00" * 32)


def test_a_derived_key_of_another_length_is_derived_not_taken_from_the_cache() -> None:
    """derive() cached by (kid, purpose, use): a 16-byte subkey asked first was handed
    out for a later 32-byte request (AES-128 where AES-256 was meant), and the other
    way round."""
    ring = Keyring.generate("k1")
    short = ring.derive("k1", "app", "x", length=16)
    assert len(short) == 16
    assert len(ring.derive("k1", "app", "x")) == 32
    assert len(ring.derive("k1", "app", "y")) == 32
    assert len(ring.derive("k1", "app", "y", length=64)) == 64


def test_a_purpose_that_is_not_utf8_is_refused_where_it_is_given() -> None:
    """os.environ makes a byte that is not UTF-8 a lone surrogate ("caf\\udce9"): such a
    purpose was accepted, then every seal and open raised UnicodeEncodeError (not a
    BadToken; an HTML 500 in Flask). Refused where it is given, as NUL is."""
    ring = Keyring([Key("k", SECRET)])
    with pytest.raises(ValueError, match="UTF-8"):
        Codec(ring, purpose="caf\udce9")
    with pytest.raises(ValueError, match="UTF-8"):
        ring.derive("k", "caf\udce9", "mac")
    with pytest.raises(ValueError, match="UTF-8"):
        ring.derive("k", "app", "m\udce9c")
    import flask

    from satchel.flask_ext import SatchelSessionInterface

    with pytest.raises(ConfigurationError, match="UTF-8"):
        SatchelSessionInterface(purpose="caf\udce9")
    app = flask.Flask(__name__)
    app.secret_key = "a secret key of some length"
    app.config["SATCHEL_SESSION_PURPOSE"] = "caf\udce9"
    with pytest.raises(ConfigurationError, match=r"^SATCHEL_SESSION_PURPOSE must be"):
        SatchelSessionInterface().check(app)


@pytest.mark.parametrize(
    "secret", ["a-long-and-very-secret-flask-key", b"a-long-and-very-secret-flask-key"]
)
def test_from_secrets_refuses_one_bare_secret(secret: str | bytes) -> None:
    """A str is a Sequence[str]: iterated, it made one key per character, and a token
    sealed with any one-character "secret" then opened."""
    with pytest.raises(TypeError, match="list of secrets"):
        Keyring.from_secrets(secret)


@pytest.mark.parametrize("text", [None, 5, b"k1:AAAA"])
def test_from_string_refuses_non_str_with_a_configuration_error(text: object) -> None:
    with pytest.raises(ConfigurationError, match="is a str"):
        Keyring.from_string(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_rotated_keeps_a_count_of_keys_not_a_slice(keep: Any) -> None:
    """keep was a slice bound: keep=0 kept every key, keep=-1 dropped the oldest."""
    ring = Keyring.generate("a").rotated(generate_key("b"))
    with pytest.raises(ValueError, match="number of keys to keep"):
        ring.rotated(keep=keep)
    assert [k.kid for k in ring.rotated(generate_key("c"), keep=2).keys] == ["c", "b"]
    assert len(ring.rotated(keep=None).keys) == 3
