"""The key ring: named keys, the newest seals, every listed key opens.

Keys are never used directly. Each purpose (the app) and use (``mac``, the AEAD's
name ``aes-256-gcm`` or ``chacha20-poly1305``, ``segment-key``, ``session-tag``,
``user-binding``, ``server-session-id``, ``session-overflow``) gets its own subkey
through HKDF-SHA256 (info ``purpose NUL use``; neither may hold a NUL, so no two
pairs share an info), so a token minted for one app or purpose cannot be opened by
another that shares the master key.

``SATCHEL_KEYS`` holds a comma-separated list of ``kid:secret`` pairs, newest first,
the secret in unpadded base64url (``satchel keygen`` prints one)::

    SATCHEL_KEYS="k2611:Zm9v...,k2605:YmFy..."
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigurationError, UnknownKeyId

#: The longest key id: ids travel in every token header.
MAX_KID_LENGTH = 16
_KID_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_KID_LENGTH}}}$")
_HKDF_SALT = b"satchel/v1"
MIN_SECRET_BYTES = 16


def b64url_encode(data: bytes) -> str:
    """``data`` as base64url without ``=`` padding, as key strings (``kid:secret``) are
    written; :func:`b64url_decode` reads it back."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


log = logging.getLogger("satchel.keys")

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_STANDARD_TO_URLSAFE = str.maketrans("+/", "-_")


def b64url_decode(text: str) -> bytes:
    """Decode base64url, unpadded or padded; ValueError for anything else.

    Strict: a plain base64 decoder skips characters outside its alphabet, so a key
    pasted with a stray character (or two keys joined by the wrong separator) would
    silently decode to some other secret.
    """
    if not _B64URL_RE.fullmatch(text):
        hint = ""
        if "+" in text or "/" in text:
            hint = " (this is standard base64: write '+' as '-' and '/' as '_')"
        raise ValueError(f"not base64url: only A-Z, a-z, 0-9, '-', '_' and '=' padding{hint}")
    unpadded = text.rstrip("=")
    if len(unpadded) % 4 == 1 or (text != unpadded and len(text) % 4):
        raise ValueError("not base64url: a truncated or wrongly padded length")
    try:
        return base64.b64decode(
            unpadded + "=" * (-len(unpadded) % 4), altchars=b"-_", validate=True
        )
    except binascii.Error:
        raise ValueError("not base64url") from None


def is_canonical_b64url(text: str, raw: bytes) -> bool:
    """Whether ``text`` is how an encoder writes ``raw`` (padding aside): False when its
    last character carries bits no encoder sets, as a secret cut short by a character
    when pasted does."""
    return b64url_encode(raw) == text.rstrip("=")


@dataclass(frozen=True, slots=True)
class Key:
    """One master key. ``kid`` is public (it travels in every token); ``secret`` is not."""

    kid: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not _KID_RE.fullmatch(self.kid):
            # Not echoed: a key written the wrong way round ('secret:kid') would put
            # the secret in the message.
            raise ConfigurationError("a key id is 1-16 characters of A-Z, a-z, 0-9, '_' or '-'")
        if not isinstance(self.secret, bytes):
            # Refused here, not at the first seal or open (a TypeError from HKDF, which
            # no caller expects from Codec.open()). A str is most often the 'kid:secret'
            # text's secret half: Keyring.from_string decodes it.
            raise ConfigurationError(
                f"key {self.kid!r}: the secret is bytes, not {type(self.secret).__name__} "
                "(Keyring.from_string reads the 'kid:base64url-secret' form)",
                kid=self.kid,
            )
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"key {self.kid!r} is too short: at least {MIN_SECRET_BYTES} bytes",
                kid=self.kid,
            )

    def to_string(self) -> str:
        """The ``kid:secret`` form used by ``SATCHEL_KEYS``."""
        return f"{self.kid}:{b64url_encode(self.secret)}"


#: What :func:`is_key_purpose` asks of a purpose, for error messages.
KEY_PURPOSE_RULE = "a non-empty str without NUL that encodes as UTF-8"


def is_key_purpose(value: object) -> bool:
    """Whether ``value`` can scope derived keys (half of every subkey's HKDF info,
    ``purpose NUL use``): no NUL, or "a\\0b" + "c" and "a" + "b\\0c" would derive one key
    for two purposes; UTF-8, or every seal and open fails (a lone surrogate: what
    ``os.environ`` makes of a byte that is not UTF-8)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class Keyring:
    """An ordered set of keys; the first is the current (sealing) key.

    Derived subkeys are cached per ``(kid, purpose, use)``; HKDF is not free and
    runs at most once per key and purpose for the life of the ring.
    """

    __slots__ = ("_anchor_kid", "_by_kid", "_derived", "keys")

    def __init__(self, keys: Iterable[Key], *, anchor_kid: str | None = None) -> None:
        self.keys: tuple[Key, ...] = tuple(keys)
        if not self.keys:
            raise ConfigurationError("the key ring is empty: configure at least one key")
        self._by_kid: dict[str, Key] = {}
        for key in self.keys:
            if key.kid in self._by_kid:
                raise ConfigurationError(f"duplicate key id {key.kid!r}", kid=key.kid)
            self._by_kid[key.kid] = key
        self._derived: dict[tuple[str, str, str, int], bytes] = {}
        if anchor_kid is not None and anchor_kid not in self._by_kid:
            raise ConfigurationError(f"anchor key id {anchor_kid!r} is not in the key ring")
        self._anchor_kid = anchor_kid

    def __repr__(self) -> str:  # never print secrets
        return f"Keyring(kids={[k.kid for k in self.keys]!r})"

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def current(self) -> Key:
        """The key that seals new tokens."""
        return self.keys[0]

    @property
    def anchor(self) -> Key:
        """The oldest key: it anchors names that must survive rotation.

        Session tags, segment keys and consistency marks are keyed hashes; keyed with
        the current key they would change at every rotation and strand the data they
        name. They are keyed with the anchor instead: the key named by ``anchor_kid``
        (``SATCHEL_ANCHOR_KID``), else the last (oldest) key of the ring. Promoting a new
        key to the front changes nothing; only retiring the anchor re-anchors them
        (docs/operations.md, "Key rotation").
        """
        if self._anchor_kid is not None:
            return self._by_kid[self._anchor_kid]
        return self.keys[-1]

    @property
    def anchor_pinned(self) -> bool:
        """Whether ``anchor_kid`` names the anchor (else it is the ring's last key, and
        moves when the end of the ring changes)."""
        return self._anchor_kid is not None

    def anchored(self, purpose: str, use: str) -> bytes:
        """The subkey of the anchor key for ``purpose`` and ``use``."""
        return self.derive(self.anchor.kid, purpose, use)

    @property
    def kids(self) -> list[str]:
        """The key ids, newest (the one that seals) first."""
        return [k.kid for k in self.keys]

    def get(self, kid: str) -> Key:
        """The key with id ``kid``; :class:`~satchel.errors.UnknownKeyId` if the ring has none."""
        try:
            return self._by_kid[kid]
        except KeyError:
            raise UnknownKeyId(
                f"the token names key id {kid!r}, which is not in the key ring", kid=kid
            ) from None

    def derive(self, kid: str, purpose: str, use: str, length: int = 32) -> bytes:
        """The subkey of ``kid`` for ``purpose`` (the app) and ``use`` (mac, aead, ...)."""
        cache_key = (kid, purpose, use, length)
        derived = self._derived.get(cache_key)
        if derived is None:
            if not (is_key_purpose(purpose) and is_key_purpose(use)):
                raise ValueError(f"a key purpose or use must be {KEY_PURPOSE_RULE}")
            hkdf = HKDF(
                algorithm=hashes.SHA256(),
                length=length,
                salt=_HKDF_SALT,
                info=f"{purpose}\x00{use}".encode(),
            )
            derived = hkdf.derive(self.get(kid).secret)
            self._derived[cache_key] = derived
        return derived

    # -- constructors -------------------------------------------------------------

    @classmethod
    def generate(cls, kid: str | None = None) -> Keyring:
        """A ring with one fresh random 256-bit key."""
        return cls([generate_key(kid)])

    @classmethod
    def from_string(cls, text: str, *, anchor_kid: str | None = None) -> Keyring:
        """Parse ``kid:secret[,kid:secret...]``, newest first."""
        if not isinstance(text, str):
            # None (an unset variable) or bytes (a file read in binary) failed with an
            # AttributeError or a TypeError about the wrong operand of split().
            raise ConfigurationError(
                f"the key ring is a str ('kid:secret,...'), not {type(text).__name__}"
            )
        keys: list[Key] = []
        for raw_item in text.split(","):
            item = raw_item.strip()
            if not item:
                continue
            kid, sep, secret = item.partition(":")
            kid = kid.strip()
            if not sep:
                raise ConfigurationError("each key is written 'kid:base64url-secret'")
            if not _KID_RE.fullmatch(kid):
                # Checked before the secret, and not echoed: in 'secret:kid' order the
                # part before the colon is the secret.
                raise ConfigurationError(
                    f"key {len(keys) + 1} of the ring: a key id is 1-16 characters of "
                    "A-Z, a-z, 0-9, '_' or '-' (keys are written 'kid:secret')"
                )
            urlsafe = secret.strip().translate(_STANDARD_TO_URLSAFE)
            try:
                # Standard base64 ('+', '/') is taken too: the two alphabets cannot be
                # confused, and a key made by `openssl rand -base64 32` must not stop
                # an upgraded app from starting.
                raw = b64url_decode(urlsafe)
            except ValueError as exc:
                # The key id only: the message must never hold any of the secret.
                raise ConfigurationError(
                    f"key {kid!r}: the secret is {exc} ('satchel keygen' prints one)", kid=kid
                ) from None
            if not is_canonical_b64url(urlsafe, raw):
                # Taken (a key that worked must not stop an upgraded app from starting),
                # but said: most often a secret cut short when pasted, which decodes to
                # another secret than the other instances', and every token they seal
                # is then a bad signature here. The key id only, as above.
                log.warning(
                    "satchel key %r: the secret's last character carries bits no encoder "
                    "writes; was it cut short or altered? Compare it with the secret "
                    "the other instances use ('satchel keygen' prints a well-formed one)",
                    kid,
                )
            keys.append(Key(kid, raw))
        return cls(keys, anchor_kid=anchor_kid)

    @classmethod
    def from_env(cls, var: str = "SATCHEL_KEYS", *, require_anchor: bool = False) -> Keyring:
        """The ring in environment variable ``var`` (``kid:secret,...``, newest first),
        anchored at ``SATCHEL_ANCHOR_KID`` when set; ConfigurationError when unset.

        ``require_anchor``: for tools that find a session's tier data by its anchored
        names (``satchel erase``, a server-mode carrier in ``satchel inspect``). With
        several keys and no ``SATCHEL_ANCHOR_KID`` they cannot know which key the app
        anchors at, and a guess names other keys: an erasure that finds nothing and
        reports success. ConfigurationError then, naming what to set.
        """
        value = os.environ.get(var, "")
        if not value.strip():
            raise ConfigurationError(f"{var} is not set")
        anchor = os.environ.get("SATCHEL_ANCHOR_KID") or None
        ring = cls.from_string(value, anchor_kid=anchor)
        if require_anchor and anchor is None and len(ring.keys) > 1:
            raise ConfigurationError(
                f"{var} has {len(ring.keys)} keys and SATCHEL_ANCHOR_KID is not set: set it to "
                "the anchor your app uses (its SATCHEL_ANCHOR_KID; an app without one "
                f"anchors at the last key of its ring, here {ring.keys[-1].kid!r}), so that "
                "the session's tier data is found under the names the app gave it"
            )
        return ring

    @classmethod
    def from_secrets(cls, secrets_: Sequence[str | bytes]) -> Keyring:
        """A ring from plain secrets such as Flask's SECRET_KEY and SECRET_KEY_FALLBACKS.

        Key ids are a short hash of each secret so that the right one is tried first;
        24 bits (6 hex digits) of a SHA-256 reveal nothing useful about a secret.
        """
        if isinstance(secrets_, str | bytes | bytearray):
            # A str is a Sequence[str] (mypy takes it): iterated, it made one key per
            # character, and a token sealed with any one-character secret opened.
            raise TypeError("from_secrets takes a list of secrets: write [secret]")
        keys: list[Key] = []
        for secret in secrets_:
            if not isinstance(secret, str | bytes | bytearray):
                raise TypeError(f"a secret is a str or bytes, not {type(secret).__name__}")
            raw = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(raw) < MIN_SECRET_BYTES:
                # Flask accepts short secrets; stretch them so the ring still works.
                raw = hashlib.sha256(b"satchel-short-secret" + raw).digest()
            kid = "f" + hashlib.sha256(b"satchel-kid" + raw).hexdigest()[:6]
            if any(k.kid == kid for k in keys):
                continue
            keys.append(Key(kid, raw))
        return cls(keys)

    def to_string(self) -> str:
        """The ring as ``SATCHEL_KEYS`` spells it (secrets included: keep it secret)."""
        return ",".join(k.to_string() for k in self.keys)

    def rotated(self, new_key: Key | None = None, keep: int | None = None) -> Keyring:
        """A new ring with ``new_key`` (or a fresh one) in front; ``keep``: keep only the
        newest N keys, the new one included (at least 1; None keeps them all)."""
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            # It was a slice: keep=0 kept every key, keep=-1 dropped the oldest. A ring
            # keeps at least the key it seals with.
            raise ValueError(f"keep is the number of keys to keep (1 or more), not {keep!r}")
        keys = [new_key or generate_key(), *self.keys]
        return Keyring(keys if keep is None else keys[:keep])


def generate_key(kid: str | None = None) -> Key:
    """A fresh 256-bit key; the default id is short (it travels in every token)."""
    if kid is None:
        kid = "k" + secrets.token_hex(2)
    return Key(kid, secrets.token_bytes(32))


__all__ = ["Key", "Keyring", "b64url_decode", "b64url_encode", "generate_key"]
