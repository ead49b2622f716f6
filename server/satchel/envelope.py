"""The token's byte layout: prefix, header, body; parse and build, no crypto.

A token is ASCII: ``s1.`` followed by the unpadded base64url of::

    offset  size  field
    0       1     format version (1)
    1       1     flags: bit 0 sealed, bit 1 compressed, bit 2 ChaCha20-Poly1305,
                  bit 3 padded (see padding.py)
    2       1     zstd dictionary id (0 when none)
    3       1     key id length L (1..16)
    4       L     key id, ASCII
    4+L     4     issued-at, uint32 big-endian, Unix seconds
    8+L     4     expires-at, uint32 big-endian, Unix seconds (0 = no expiry)
    12+L    ...   body: signed  -> payload || HMAC-SHA256 (32 bytes)
                        sealed  -> nonce (12) || ciphertext || tag (16)

The header (prefix included) is authenticated in both modes: it is covered by the MAC,
or it is the AEAD's associated data. See docs/token-format.md.
"""

from __future__ import annotations

import binascii
import re
import struct
from typing import NamedTuple

from .errors import MalformedToken, TokenTooLarge, UnsupportedVersion

PREFIX = "s1."
_PREFIX_BYTES = PREFIX.encode("ascii")
FORMAT_VERSION = 1
KNOWN_PREFIXES = {"s1.": 1}
#: What a server- or memory-mode app hands out instead of a token (a signed session
#: id, satchel.server_mode): named here so a token parser can say what it was sent.
SERVER_CARRIER_PREFIX = "sv1."

FLAG_SEALED = 0x01
FLAG_COMPRESSED = 0x02
FLAG_CHACHA = 0x04
FLAG_PADDED = 0x08
_KNOWN_FLAGS = FLAG_SEALED | FLAG_COMPRESSED | FLAG_CHACHA | FLAG_PADDED

_TIMES = struct.Struct(">II")
_tuple_new = tuple.__new__
MIN_HEADER = 4 + 1 + 8
MAX_KID = 16
#: the characters of a key id (keys.py refuses a key named otherwise)
_KID_RE = re.compile(r"[A-Za-z0-9_-]+")
DEFAULT_MAX_TOKEN_BYTES = 64 * 1024


class Header(NamedTuple):  # a tuple: built on every open and seal, it must be cheap
    """What a token says about itself before it is verified. Trust none of it until then."""

    version: int
    flags: int
    dictionary_id: int
    kid: str
    issued_at: int
    expires_at: int

    @property
    def sealed(self) -> bool:
        """Flag bit 0: the body is AEAD ciphertext, else the unencrypted payload and its MAC."""
        return bool(self.flags & FLAG_SEALED)

    @property
    def compressed(self) -> bool:
        """Flag bit 1: the payload is zstd-compressed (with dictionary ``dictionary_id``
        unless that is 0)."""
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def padded(self) -> bool:
        """Flag bit 3: the payload ends in length padding (padding.py), to be removed
        after verification."""
        return bool(self.flags & FLAG_PADDED)

    @property
    def mode(self) -> str:
        """``"sealed"`` or ``"signed"``: the flag as ``Codec(mode=...)`` names it."""
        return "sealed" if self.sealed else "signed"

    @property
    def algorithm(self) -> str:
        """``"hmac-sha256"`` for a signed token; for a sealed one ``"chacha20-poly1305"``
        when flag bit 2 is set, else ``"aes-256-gcm"``."""
        if not self.sealed:
            return "hmac-sha256"
        return "chacha20-poly1305" if self.flags & FLAG_CHACHA else "aes-256-gcm"

    def pack(self) -> bytes:
        """The header's bytes as the token lays them out, without the prefix
        (:func:`authenticated_header` adds it). ``version`` is packed as it is, so a
        parsed header packs back to the bytes it was read from; no field is checked."""
        kid = self.kid.encode("ascii")
        return (
            bytes((self.version, self.flags, self.dictionary_id, len(kid)))
            + kid
            + _TIMES.pack(self.issued_at, self.expires_at)
        )


class Envelope(NamedTuple):
    """A parsed token: the header, its exact bytes (to authenticate), and the body."""

    header: Header
    header_bytes: bytes  # prefix + packed header: exactly what the MAC / AAD covers
    body: bytes
    raw: bytes  # the whole decoded token, for digests


def pack_header(flags: int, dictionary_id: int, kid: str, issued_at: int, expires_at: int) -> bytes:
    """The packed header of a new token (format version 1), without building a Header."""
    kid_bytes = kid.encode("ascii")
    return (
        bytes((FORMAT_VERSION, flags, dictionary_id, len(kid_bytes)))
        + kid_bytes
        + _TIMES.pack(issued_at, expires_at)
    )


def header_size(kid: str) -> int:
    """Bytes of a packed header naming key id ``kid`` (version, flags, dictionary id,
    key id length, key id, issued-at, expires-at)."""
    return 4 + len(kid) + _TIMES.size


def encoded_length(raw_size: int) -> int:
    """Characters of the token for ``raw_size`` bytes of envelope (prefix included)."""
    return len(PREFIX) + (raw_size * 4 + 2) // 3


def build(header: Header, body: bytes) -> str:
    """Join an already-protected body to its header and encode the token."""
    return encode(header.pack() + body)


def encode(raw: bytes) -> str:
    """The token string for raw envelope bytes (header and body)."""
    # binascii directly: base64.urlsafe_b64encode is this plus two wrapper calls.
    # replace, not translate: translate looks up every byte, replace jumps (memchr) to
    # the few "+" and "/" (1 in 32 characters), several times faster on a token.
    encoded = binascii.b2a_base64(raw, newline=False).replace(b"+", b"-").replace(b"/", b"_")
    return PREFIX + encoded.rstrip(b"=").decode("ascii")


def authenticated_header(header: Header) -> bytes:
    """The bytes the MAC or AEAD must cover for ``header``: the prefix and the header."""
    return PREFIX.encode("ascii") + header.pack()


def parse(token: str | bytes, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> Envelope:
    """Check the length cap, then decode and split the token. No crypto, no trust."""
    if type(token) is str and len(token) <= max_token_bytes and token.startswith(PREFIX):
        # The common case, with the same checks in fewer steps: a current-format str.
        try:
            raw = _b64url_decode_canonical(token[3:].encode("ascii"))
        except UnicodeEncodeError:
            raise MalformedToken("token body is not base64url") from None
        return _split(raw, _PREFIX_BYTES, FORMAT_VERSION)
    if isinstance(token, bytes):
        if len(token) > max_token_bytes:
            raise TokenTooLarge(
                f"token is {len(token)} bytes; the limit is {max_token_bytes}",
                size=len(token),
                limit=max_token_bytes,
            )
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedToken("token is not ASCII") from None
    if not isinstance(token, str):
        raise MalformedToken("token must be a string")
    # The cap comes first: nothing else may cost work proportional to an unbounded input.
    if len(token) > max_token_bytes:
        raise TokenTooLarge(
            f"token is {len(token)} bytes; the limit is {max_token_bytes}",
            size=len(token),
            limit=max_token_bytes,
        )
    prefix, dot, data = token.partition(".")
    if not dot:
        raise MalformedToken("token has no format prefix")
    if prefix + "." not in KNOWN_PREFIXES:
        # At most 4 digits: the prefix goes into the error's message, which must not
        # echo kilobytes of what the client sent.
        digits = prefix[1:]
        if prefix[:1] == "s" and len(digits) <= 4 and digits.isascii() and digits.isdigit():
            raise UnsupportedVersion(
                f"token format {prefix!r} is not supported by this release", format=prefix
            )
        if prefix == SERVER_CARRIER_PREFIX[:-1]:
            # What an app in server or memory mode hands out (satchel.server_mode): a
            # client kept it across a switch to client mode, or sent it to another app.
            raise MalformedToken(
                "this is a server-side session id (sv1.), not a context token: it names a "
                "context kept by an app in server or memory mode, which an app in client "
                "mode cannot open; drop it to start afresh"
            )
        raise MalformedToken("token has an unknown prefix")
    try:
        ascii_data = data.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedToken("token body is not base64url") from None
    raw = _b64url_decode_canonical(ascii_data)
    return _split(raw, prefix.encode("ascii") + b".", KNOWN_PREFIXES[prefix + "."])


def parse_raw(raw: bytes) -> Envelope:
    """Split the decoded bytes of a current-format token (a stored overflow segment)."""
    return _split(raw, _PREFIX_BYTES, FORMAT_VERSION)


def _split(raw: bytes, prefix: bytes, format_version: int) -> Envelope:
    """Check and split the decoded bytes into header and body."""
    if len(raw) < MIN_HEADER:
        raise MalformedToken("token is too short to hold a header")
    version, flags, dictionary_id, kid_len = raw[0], raw[1], raw[2], raw[3]
    if version != format_version:
        # The prefix names the format (an unknown one is refused before this); a
        # header that says another is not that format's token.
        raise MalformedToken(
            f"token format version byte {version} does not match its prefix",
            format_version=version,
        )
    if flags & ~_KNOWN_FLAGS:
        raise MalformedToken("token has unknown flags set")
    end = 4 + kid_len
    if not 1 <= kid_len <= MAX_KID or len(raw) < end + 8:
        raise MalformedToken("token key id length is invalid")
    try:
        kid = raw[4:end].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedToken("token key id is not ASCII") from None
    if not kid.isalnum() and not _KID_RE.fullmatch(kid):  # isalnum: the usual kid, fast
        raise MalformedToken("token key id has characters outside A-Z a-z 0-9 _ -")
    issued_at, expires_at = _TIMES.unpack_from(raw, end)
    header_end = end + 8
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python-level wrapper, and
    # this runs on every open.
    header = _tuple_new(Header, (version, flags, dictionary_id, kid, issued_at, expires_at))
    return _tuple_new(Envelope, (header, prefix + raw[:header_end], raw[header_end:], raw))


_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Bits of the last character that carry no data, by input length mod 4.
_UNUSED_BITS_MASK = {2: 0x0F, 3: 0x03}
_PADDING = (b"", b"", b"==", b"=")
_PLUS, _SLASH, _PAD = b"+/="  # ints: the byte values


def _b64url_decode_canonical(data: bytes) -> bytes:
    """Strict, canonical, unpadded base64url: one token has exactly one spelling.

    Any character outside the URL-safe alphabet is refused (plain base64 decoders
    skip them), and the unused low bits of the last character must be zero, so no
    changed character can decode to the same bytes.
    """
    remainder = len(data) % 4
    if remainder == 1:
        raise MalformedToken("token body is not base64url")
    if remainder:
        index = _ALPHABET.find(data[-1:])
        if index < 0 or index & _UNUSED_BITS_MASK[remainder]:
            raise MalformedToken("token body is not canonical base64url")
    # "+", "/" and "=" are not base64url (and padding is never sent): refused here, as
    # the strict decoder below refuses every other character outside the alphabet.
    # Searches and replace, not translate: they jump (memchr) over the bytes. (An int
    # searched for is a plain memchr; a bytes one first fails as an int, raising and
    # clearing a TypeError.)
    if _PLUS in data or _SLASH in data or _PAD in data:
        raise MalformedToken("token body is not base64url")
    try:
        return binascii.a2b_base64(
            data.replace(b"-", b"+").replace(b"_", b"/") + _PADDING[remainder], strict_mode=True
        )
    except binascii.Error:
        raise MalformedToken("token body is not base64url") from None


__all__ = [
    "DEFAULT_MAX_TOKEN_BYTES",
    "FLAG_CHACHA",
    "FLAG_COMPRESSED",
    "FLAG_PADDED",
    "FLAG_SEALED",
    "FORMAT_VERSION",
    "PREFIX",
    "Envelope",
    "Header",
    "authenticated_header",
    "build",
    "encoded_length",
    "header_size",
    "parse",
    "parse_raw",
]
