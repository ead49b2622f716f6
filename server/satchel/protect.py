"""Sign / verify (HMAC-SHA256) and seal / unseal (AEAD) behind one interface.

A :class:`Protector` turns a payload into a token body bound to its header, and back.
Both modes authenticate the header; only the sealed mode hides the payload.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .envelope import FLAG_CHACHA, FLAG_SEALED
from .errors import BadSignature, MalformedToken, SatchelError
from .keys import MAX_KID_LENGTH, Keyring

MAC_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

RandomBytes = Callable[[int], bytes]

_hmac_new: Callable[..., Any]
try:
    # OpenSSL's HMAC object itself (hmac.new wraps it in Python-level methods).
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # a Python built without OpenSSL
    _hmac_new = hmac.new


def keyed_hmac(key: bytes) -> Any:
    """An HMAC-SHA256 keyed with ``key``, to ``.copy()`` for each message and never
    update itself: keying costs more than hashing a token (the benchmark's floor uses
    it too, so that both are measured calling the primitive the same way)."""
    return _hmac_new(key, digestmod="sha256")


class Protector(Protocol):
    """Binds a payload to its authenticated header with a key from the ring."""

    #: Header flag bits this protector sets (and requires when opening).
    flags: int
    mode: str
    #: Bytes the body adds around the payload (MAC, or nonce and tag).
    overhead: int

    def protect(self, kid: str, header: bytes, payload: bytes) -> bytes: ...

    def unprotect(self, kid: str, header: bytes, body: bytes) -> bytes: ...


class Signer:
    """HMAC-SHA256 over header and payload. The client can read, but not change, the payload."""

    flags = 0
    mode = "signed"
    overhead = MAC_SIZE

    def __init__(self, keyring: Keyring, purpose: str) -> None:
        self.keyring = keyring
        self.purpose = purpose
        #: an HMAC keyed once per key id and copied for each token, never updated itself:
        #: hmac.digest() would key a new one (and look the algorithm up) on every call
        self._macs: dict[str, Any] = {}

    def _mac(self, kid: str, header: bytes, payload: bytes) -> bytes:
        """HMAC-SHA256 of ``header + payload`` under ``kid``'s MAC subkey."""
        keyed = self._macs.get(kid)
        if keyed is None:
            keyed = self._macs[kid] = keyed_hmac(self.keyring.derive(kid, self.purpose, "mac"))
        mac = keyed.copy()
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def protect(self, kid: str, header: bytes, payload: bytes) -> bytes:
        return payload + self._mac(kid, header, payload)

    def unprotect(self, kid: str, header: bytes, body: bytes) -> bytes:
        if len(body) < MAC_SIZE:
            raise MalformedToken("token is too short to hold its signature")
        payload, mac = body[:-MAC_SIZE], body[-MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(kid, header, payload)):
            raise BadSignature("token signature does not match", kid=kid)
        return payload


class Sealer:
    """AEAD with the header as associated data. The client can neither read nor change it.

    ``algorithm`` is ``"aes-256-gcm"`` (default; hardware-accelerated almost
    everywhere) or ``"chacha20-poly1305"``. Nonces are 96 random bits per token; with
    one key, 2**32 tokens keep the collision chance below 2**-32, so rotate keys well
    before that (docs/security.md).
    """

    mode = "sealed"
    overhead = NONCE_SIZE + TAG_SIZE

    def __init__(
        self,
        keyring: Keyring,
        purpose: str,
        algorithm: str = "aes-256-gcm",
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if algorithm not in ("aes-256-gcm", "chacha20-poly1305"):
            raise ValueError(f"unknown AEAD algorithm {algorithm!r}")
        self.keyring = keyring
        self.purpose = purpose
        self.algorithm = algorithm
        self.flags = FLAG_SEALED | (FLAG_CHACHA if algorithm == "chacha20-poly1305" else 0)
        self._cipher_class = ChaCha20Poly1305 if self.flags & FLAG_CHACHA else AESGCM
        self._random_bytes = random_bytes
        self._ciphers: dict[str, AESGCM | ChaCha20Poly1305] = {}

    def _cipher(self, kid: str) -> AESGCM | ChaCha20Poly1305:
        cipher = self._ciphers.get(kid)
        if cipher is None:
            cipher = self._cipher_class(self.keyring.derive(kid, self.purpose, self.algorithm))
            self._ciphers[kid] = cipher
        return cipher

    def protect(self, kid: str, header: bytes, payload: bytes) -> bytes:
        nonce = self._random_bytes(NONCE_SIZE)
        return nonce + self._cipher(kid).encrypt(nonce, payload, header)

    def unprotect(self, kid: str, header: bytes, body: bytes) -> bytes:
        if len(body) < NONCE_SIZE + TAG_SIZE:
            raise MalformedToken("token is too short to hold its nonce and tag")
        try:
            return self._cipher(kid).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], header)
        except InvalidTag:
            raise BadSignature("token failed authenticated decryption", kid=kid) from None


class AtRest:
    """AEAD (AES-256-GCM) for a credential the server keeps in its tier: a token kept
    to hand back to a client whose response was lost, a flask.session too large for its
    cookie. Stored as is, such a value *is* the credential: whoever reads the tier (a
    replica, a backup) could send it and be that user, and whoever writes it could move
    one user's copy under another's name. Sealed here under a subkey of its own
    (``use``), with ``context`` (where it is kept) as associated data, it is neither.

    Stored form: the key id's length (1 byte), the key id (ASCII), a 96-bit random
    nonce, the ciphertext and its tag. Opened with whichever key of the ring the id
    names, so a record outlives a rotation while its key stays in the ring.
    """

    #: The most sealing adds to a value: the key id and its length, a nonce, a tag.
    MAX_OVERHEAD = 1 + MAX_KID_LENGTH + NONCE_SIZE + TAG_SIZE

    def __init__(
        self,
        keyring: Keyring,
        purpose: str,
        use: str,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.keyring = keyring
        self.purpose = purpose
        self.use = use
        self._random_bytes = random_bytes

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        kid = self.keyring.current.kid
        nonce = self._random_bytes(NONCE_SIZE)
        cipher = AESGCM(self.keyring.derive(kid, self.purpose, self.use))
        kid_bytes = kid.encode("ascii")
        return (
            bytes([len(kid_bytes)]) + kid_bytes + nonce + cipher.encrypt(nonce, plaintext, context)
        )

    def open(self, stored: bytes, context: bytes, *, max_bytes: int) -> bytes | None:
        """The plaintext, or None for anything that is not a value this ring sealed for
        ``context`` (another place's, a key no longer in the ring, damaged, planted,
        longer than ``max_bytes``): nothing unauthenticated is returned."""
        if not isinstance(stored, bytes) or not 0 < len(stored) <= max_bytes:
            return None
        size = stored[0]
        body = stored[1 + size :]
        if size == 0 or len(body) < NONCE_SIZE + TAG_SIZE:
            return None
        try:
            kid = stored[1 : 1 + size].decode("ascii")
            key = self.keyring.derive(self.keyring.get(kid).kid, self.purpose, self.use)
        except (UnicodeDecodeError, SatchelError, ValueError):
            return None
        try:
            return AESGCM(key).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], context)
        except InvalidTag:
            return None


def make_protector(
    mode: str,
    keyring: Keyring,
    purpose: str,
    *,
    algorithm: str = "aes-256-gcm",
    random_bytes: RandomBytes = os.urandom,
) -> Protector:
    if mode == "signed":
        return Signer(keyring, purpose)
    if mode == "sealed":
        return Sealer(keyring, purpose, algorithm, random_bytes)
    raise ValueError(f"mode must be 'signed' or 'sealed', not {mode!r}")


__all__ = ["AtRest", "Protector", "Sealer", "Signer", "make_protector"]
