"""Codec.seal and Codec.open: the one place that runs the token steps in order.

Opening, every step bounded, in this order and no other:

1. length cap on the raw token            (envelope.parse)
2. envelope parse                          (envelope.parse)
3. verify the MAC or decrypt the AEAD      (protect)
4. expiry, with a small clock-skew allowance
5. padding removed, if the token is padded (padding)
   decompress with a hard output cap       (compress)
6. msgpack unpack with limits              (serialize)
7. schema migration and validation         (schema)

No byte that was not authenticated reaches the decompressor or msgpack.

Sealing runs the same steps backwards. The sequence number is incremented on every
seal and the digest of the previous token is recorded as the parent, so a fork (two
tokens made from one) can be detected later.
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, NoReturn

from . import envelope, padding, schema, serialize
from .compress import DEFAULT_LEVEL, Compressed, Compressor
from .context import Context
from .envelope import FLAG_COMPRESSED, FLAG_PADDED, Envelope, Header
from .errors import (
    BudgetExceeded,
    ConfigurationError,
    ContextNotSerializable,
    TokenExpired,
    UnsupportedVersion,
    WrongMode,
)
from .keys import KEY_PURPOSE_RULE, Keyring, is_key_purpose
from .limits import DEFAULT_LIMITS, Limits
from .protect import Protector, RandomBytes, make_protector

Clock = Callable[[], float]
#: ``Codec(mode=...)``: AEAD (the client can neither read nor change it) or HMAC.
Mode = Literal["sealed", "signed"]
#: ``Codec(algorithm=...)``: the AEAD of sealed tokens.
Algorithm = Literal["aes-256-gcm", "chacha20-poly1305"]
DIGEST_SIZE = 12
_PREFIX_BYTES = envelope.PREFIX.encode("ascii")
_UINT32_MAX = 2**32 - 1
_tuple_new = tuple.__new__  # NamedTuple's own __new__ is a Python-level wrapper
#: ``Codec.seal(ctx, expires_at=NO_EXPIRY)``: a token that never expires, whatever the
#: codec's ``ttl`` (the header's expires-at ``0``).
NO_EXPIRY = 0


def token_digest(raw: bytes) -> bytes:
    """A short name for a token: the last 12 bytes of its MAC or AEAD tag.

    The tag already depends on every byte of the token under a key the client does
    not have, so it names the token as well as a separate hash would, for free.
    """
    return raw[-DIGEST_SIZE:]


class Prepared(NamedTuple):  # a tuple: one is made on every seal, it must be cheap
    """A context packed and compressed for its next seal (:meth:`Codec.prepare`).

    ``size`` is the exact length the token will have. Passing it to
    :meth:`Codec.seal_verbose` seals these bytes instead of packing and compressing the
    context again: valid only while the context is unchanged since ``prepare``. The
    pipeline measures the token against its byte budget this way, and seals what it
    measured.
    """

    payload: bytes  # msgpack of the context as it will be sealed (sequence number + 1)
    packed: Compressed
    size: int
    seq: int  # the sequence number the payload carries


@dataclass(slots=True)
class Opened:
    """A verified token: its header, its digest and the context inside."""

    header: Header
    digest: bytes
    context: Context
    #: phase timings in seconds, for Server-Timing and metrics
    timings: dict[str, float] = field(default_factory=dict)


class Codec:
    """Turns a :class:`Context` into a token and back.

    ``mode`` is ``"sealed"`` (AEAD, default: the client can neither read nor change
    the context) or ``"signed"`` (HMAC: readable, not changeable). ``purpose`` scopes
    the derived keys, so tokens of one app or use are refused by another. ``ttl`` is
    the default token lifetime in seconds (None for no expiry; ValueError for 0, less,
    NaN or infinity); ``pad_to`` rounds
    every token's raw length up to a multiple of that many bytes, so the length of a
    sealed token does not tell how well its content compressed (padding.py; None for
    no padding; tokens open whatever this setting). ``clock`` and ``random_bytes`` are
    passed in so tests control time and nonces.
    """

    def __init__(
        self,
        keyring: Keyring,
        mode: Mode = "sealed",
        *,
        purpose: str = "satchel",
        ttl: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        dictionary_id: int | None = None,
        level: int = DEFAULT_LEVEL,
        algorithm: Algorithm = "aes-256-gcm",
        pad_to: int | None = None,
        clock: Clock = time.time,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if not isinstance(keyring, Keyring):
            # A SATCHEL_KEYS string passed as it is failed only at the first open, with
            # an AttributeError that no caller expects from open().
            hint = " (Keyring.from_string(text) reads one)" if isinstance(keyring, str) else ""
            raise TypeError(f"keyring is a Keyring, not {type(keyring).__name__}{hint}")
        if not isinstance(limits, Limits):
            raise TypeError(f"limits is a Limits, not {type(limits).__name__}")
        if mode == "signed" and algorithm != "aes-256-gcm":
            raise ValueError(
                f"algorithm={algorithm!r} applies to sealed tokens; signed ones use HMAC-SHA256"
            )
        if not is_key_purpose(purpose):
            # Refused here, not at the first seal: the purpose is half of every subkey's
            # HKDF info ("purpose NUL use", keys.py).
            raise ValueError(f"purpose must be {KEY_PURPOSE_RULE}, not {purpose!r}")
        self.keyring = keyring
        self.mode = mode
        self.purpose = purpose
        self.ttl = _check_ttl(ttl)
        self.limits = limits
        self.pad_to = padding.check_pad_to(pad_to)
        self.clock = clock
        self.protector: Protector = make_protector(
            mode, keyring, purpose, algorithm=algorithm, random_bytes=random_bytes
        )
        try:
            self.compressor = Compressor(
                dictionary_id,
                level=level,
                max_decompressed=limits.max_decompressed_bytes,
                # Sealed: the clear header must not tell a Hebrew context from an
                # English one by its dictionary id.
                plain_fallback=mode == "signed",
            )
        except UnsupportedVersion as exc:  # a token's error; here it is the app's setting
            raise ConfigurationError(
                f"dictionary_id={dictionary_id}: {exc.message.replace('token needs ', '')}"
                " (register an app's own with satchel.compress.register_dictionary)"
            ) from None

    def __repr__(self) -> str:
        padded = f", pad_to={self.pad_to}" if self.pad_to else ""
        return (
            f"Codec(mode={self.mode!r}, purpose={self.purpose!r}{padded}, keyring={self.keyring!r})"
        )

    # -- seal -------------------------------------------------------------------------

    def seal(self, ctx: Context, *, expires_at: float | None = None) -> str:
        """Seal ``ctx`` into a token, incrementing its sequence number.

        ``expires_at`` (Unix seconds) overrides the codec's ``ttl``: None (the default)
        uses the ``ttl``, :data:`NO_EXPIRY` (``0``) makes a token that never expires,
        and any other time is when the token expires (a past one makes a token that
        is expired already; past 2106 is 2106, the header's limit). TypeError or
        ValueError for anything else (a str, NaN, infinity).

        Every token this returns opens with this codec until it expires: a context
        that would not (values msgpack cannot carry or the reader refuses, sizes past
        ``limits``) raises :class:`~satchel.errors.ContextNotSerializable` or
        :class:`~satchel.errors.BudgetExceeded` instead, naming the field at fault.
        A seal that raises leaves ``ctx`` as it was; TypeError if ``ctx`` is not a
        :class:`Context`.
        """
        return self.seal_verbose(ctx, expires_at=expires_at)[0]

    def seal_verbose(
        self,
        ctx: Context,
        *,
        expires_at: float | None = None,
        prepared: Prepared | None = None,
    ) -> tuple[str, int]:
        """Like :meth:`seal`, also returning the payload size before compression.

        ``prepared``: what :meth:`prepare` made of ``ctx``, with no change to ``ctx``
        since; its bytes are sealed as they are.
        """
        now = self.clock()
        if expires_at is None and self.ttl is not None:
            expires_at = now + self.ttl
        # prepare() refuses what is not a Context, and names a seq of the wrong type
        # (ctx.seq + 1 here would raise a bare TypeError for it).
        if prepared is None or prepared.seq - 1 != ctx.seq:
            prepared = self.prepare(ctx)
        self._check_opens(prepared)
        token, raw = self.seal_payload(
            prepared.payload, now=now, expires_at=expires_at, packed=prepared.packed
        )
        # Only now that nothing can fail: a refused seal leaves ctx as it was.
        ctx.seq = prepared.seq
        ctx.parent = token_digest(raw)
        ctx.opened_kid = self.keyring.current.kid
        return token, len(prepared.payload)

    def prepare(self, ctx: Context) -> Prepared:
        """Pack and compress ``ctx`` as its next seal will, without sealing it.

        Raises :class:`~satchel.errors.ContextNotSerializable` for values msgpack
        cannot carry, or that would not open again (``schema.check_sealable``).
        """
        if not isinstance(ctx, Context):
            _not_a_context(ctx)
        # Checks what it maps with the readers open() uses (check_sealable), and writes
        # the sequence number sealing gives the token.
        wire = schema.to_wire(ctx, self.limits, next_seq=True)
        seq = wire["q"]
        try:
            payload = serialize.pack(wire)
        except (TypeError, ValueError, OverflowError) as exc:
            where = schema.unpackable_part(wire) or str(exc)
            raise ContextNotSerializable(f"the context cannot be sealed: {where}") from None
        if len(payload) > self.limits.max_str_bytes:
            # Only now can one string be longer than the reader accepts: look for it.
            schema.check_sealable(ctx, self.limits)
        schema.values_passed(ctx)  # a save measuring again need not walk them again
        packed = self.compressor.compress(payload)
        size = self._token_length(len(packed.data))
        return _tuple_new(Prepared, (payload, packed, size, seq))

    def _check_opens(self, prepared: Prepared) -> None:
        """Refuse to issue a token that this codec's own limits would refuse to open.

        Not in :meth:`prepare`: the byte budget measures contexts that are still too
        large, and trims them, before one is sealed.
        """
        limits = self.limits
        if prepared.size > limits.max_token_bytes:
            raise BudgetExceeded(
                f"the token would be {prepared.size} bytes; this codec opens at most "
                f"{limits.max_token_bytes} (Limits.max_token_bytes)",
                size=prepared.size,
                limit=limits.max_token_bytes,
            )
        if len(prepared.payload) > limits.max_decompressed_bytes:
            raise BudgetExceeded(
                f"the context packs to {len(prepared.payload)} bytes; this codec opens at "
                f"most {limits.max_decompressed_bytes} (Limits.max_decompressed_bytes)",
                size=len(prepared.payload),
                limit=limits.max_decompressed_bytes,
            )

    def measure(self, ctx: Context) -> int:
        """The length the token for ``ctx`` would have if sealed now, without sealing."""
        return self.prepare(ctx).size

    def _token_length(self, stored: int) -> int:
        """Token length for ``stored`` bytes of (compressed) payload."""
        raw = envelope.header_size(self.keyring.current.kid) + stored + self.protector.overhead
        if self.pad_to:
            raw = padding.padded_length(raw, self.pad_to)
        return envelope.encoded_length(raw)

    def seal_payload(
        self,
        payload: bytes,
        *,
        now: float | None = None,
        expires_at: float | None = None,
        packed: Compressed | None = None,
    ) -> tuple[str, bytes]:
        """Compress, protect and encode raw payload bytes. Returns the token and its raw bytes.

        ``packed`` is ``payload`` already compressed (by :meth:`prepare`). ``expires_at``
        None or :data:`NO_EXPIRY` (``0``): the token never expires.
        """
        # First: a bad expires_at raises before any work.
        expiry = 0 if expires_at is None else _expiry_field(expires_at)
        now = current_time(now, self.clock)
        if packed is None:
            packed = self.compressor.compress(payload)
        kid = self.keyring.current.kid
        flags = self.protector.flags | (FLAG_COMPRESSED if packed.compressed else 0)
        if self.pad_to:
            flags |= FLAG_PADDED
        packed_header = envelope.pack_header(
            flags,
            packed.dictionary_id,
            kid,
            min(int(now), _UINT32_MAX),
            expiry,
        )
        data = packed.data
        if self.pad_to:
            unpadded = len(packed_header) + len(data) + self.protector.overhead
            data = padding.pad(data, unpadded, self.pad_to)
        body = self.protector.protect(kid, _PREFIX_BYTES + packed_header, data)
        raw = packed_header + body
        return envelope.encode(raw), raw

    # -- open -------------------------------------------------------------------------

    def open(self, token: str | bytes, *, now: float | None = None) -> Context:
        """Verify and open ``token``; raises a :class:`~satchel.BadToken` subclass."""
        env, payload = self.open_payload(token, now=now)
        return self._context_of(env, payload, None)

    def open_verbose(self, token: str | bytes, *, now: float | None = None) -> Opened:
        """Like :meth:`open`, also returning the header, digest and step timings."""
        timings: dict[str, float] = {}
        env, payload = self.open_payload(token, now=now, timings=timings)
        ctx = self._context_of(env, payload, timings)
        assert ctx.parent is not None
        return Opened(env.header, ctx.parent, ctx, timings)

    def _context_of(
        self, env: Envelope, payload: bytes, timings: dict[str, float] | None
    ) -> Context:
        """Steps 6-7: bounded unpack, migration and validation."""
        if timings is None:  # untimed: the plain open() is the hot path
            ctx = schema.from_wire(serialize.unpack(payload, self.limits))
        else:
            t0 = time.perf_counter()
            obj = serialize.unpack(payload, self.limits)
            t1 = time.perf_counter()
            ctx = schema.from_wire(obj)
            timings["unpack"] = t1 - t0
            timings["migrate"] = time.perf_counter() - t1
        ctx.opened_parent = ctx.parent  # the token it was made from (MonotonicGuard)
        ctx.parent = token_digest(env.raw)
        ctx.opened_kid = env.header.kid
        return ctx

    def open_payload(
        self,
        token: str | bytes,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[Envelope, bytes]:
        """Steps 1-5: length cap, parse, verify, expiry, bounded decompress."""
        t0 = time.perf_counter() if timings is not None else 0.0
        env = envelope.parse(token, self.limits.max_token_bytes)
        return env, self.open_envelope(env, now=now, timings=timings, started=t0)

    def open_envelope(
        self,
        env: Envelope,
        *,
        now: float | None = None,
        timings: dict[str, float] | None = None,
        started: float = 0.0,
    ) -> bytes:
        """Steps 3-5 on a parsed envelope: verify, expiry, bounded decompress.

        Overflow segments come here straight from their stored bytes
        (:func:`envelope.parse_raw`), without a detour through base64.
        """
        header = env.header
        if (header.flags & 0x05) != self.protector.flags:
            expected = getattr(self.protector, "algorithm", "hmac-sha256")
            # The ChaCha20 bit without the sealed bit names no mode: describing it as
            # "signed with hmac-sha256" would read as no mismatch at all.
            found = (
                f"token's mode flags 0x{header.flags & 0x05:02x} name no mode"
                if header.flags & 0x05 == 0x04
                else f"token is {header.mode} with {header.algorithm}"
            )
            raise WrongMode(
                f"{found}; this codec expects {self.mode} tokens with {expected}",
                token_mode=header.mode,
                token_algorithm=header.algorithm,
            )
        self.keyring.get(header.kid)  # unknown key id -> UnknownKeyId, before any crypto
        payload = self.protector.unprotect(header.kid, env.header_bytes, env.body)
        # Authenticated from here on.
        if header.expires_at:
            now = current_time(now, self.clock)
            if now > header.expires_at + self.limits.clock_skew:
                raise TokenExpired(
                    "token has expired",
                    expired_at=header.expires_at,
                    issued_at=header.issued_at,
                    now=int(now),
                )
        if timings is not None:
            verified = time.perf_counter()
            timings["verify"] = verified - started
        if header.flags & FLAG_PADDED:
            payload = padding.unpad(payload)
        if header.flags & FLAG_COMPRESSED:  # the flag, not the property: every open
            payload = self.compressor.decompress(payload, header.dictionary_id)
        if timings is not None:
            timings["decompress"] = time.perf_counter() - verified
        return payload

    def session_tag(self, session_id: bytes) -> str:
        """16 hex characters of HMAC-SHA256 under the anchor key.

        It names a session in logs, in tier keys (a Redis Cluster hash tag) and in
        consistency marks: stable across key rotation, meaningless without the key.
        """
        return self._session_tag_under(self.keyring.anchor.kid, session_id)

    def _session_tag_under(self, kid: str, session_id: bytes) -> str:
        key = self.keyring.derive(kid, self.purpose, "session-tag")
        return hmac.digest(key, session_id, "sha256").hex()[:16]

    def session_tags_under_other_anchors(self, session_id: bytes) -> list[str]:
        """:meth:`session_tag` as each other key of the ring would make it as the anchor.

        Names keyed by the anchor change when the anchor does (an unpinned ring whose
        last key changed). The monotonic guard keeps marks under these too and looks
        under them before it calls a token stale, so a change of anchor does not lock
        every conversation out. Empty for a pinned anchor, which does not move.
        """
        if self.keyring.anchor_pinned:
            return []
        anchor = self.keyring.anchor.kid
        return [
            self._session_tag_under(kid, session_id) for kid in self.keyring.kids if kid != anchor
        ]

    def needs_reseal(self, ctx: Context) -> bool:
        """True when ``ctx`` was opened with a key other than the current one."""
        return ctx.opened_kid is not None and ctx.opened_kid != self.keyring.current.kid


def _check_ttl(ttl: float | None) -> float | None:
    """A token lifetime: None (no expiry) or a finite number of seconds above 0. Zero
    or less would make every token expired already: refused when the codec is built,
    not found out at the first open."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl is seconds (or None for no expiry), not {type(ttl).__name__}")
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a finite number of seconds above 0, not {ttl}")
    return ttl


def current_time(now: float | None, clock: Callable[[], float]) -> float:
    """``now``, or ``clock()`` when it is None: the time a call works at.

    Any real number is a time (numpy's and ``Decimal`` included, as before this check);
    one that is not finite raises ValueError (NaN compares false with everything, so an
    expired token would open and no age limit would hold), a non-number TypeError.
    """
    if now is None:
        return clock()
    if type(now) is int:
        return now  # every int is finite (math.isfinite would overflow past 1e308)
    if type(now) is not float:  # a float is the usual case
        if isinstance(now, bool | str | bytes | bytearray):
            raise TypeError(f"now is Unix seconds, not {type(now).__name__}")
        try:
            now = float(now)
        except (TypeError, ValueError):
            raise TypeError(f"now is Unix seconds, not {type(now).__name__}") from None
    if math.isfinite(now):
        return now
    raise ValueError(f"now is Unix seconds, a finite number, not {now}")


def _expiry_field(expires_at: float | None) -> int:
    """The header's expires-at for ``expires_at``: 0 (no expiry) for None and 0, else
    the time in whole seconds, at least 1 (a past time: a token expired already, never
    one that does not expire) and at most the header's 2**32 - 1."""
    if (type(expires_at) is int or type(expires_at) is float) and 1 <= expires_at <= _UINT32_MAX:
        return int(expires_at)  # the usual case, first: every seal comes here
    if expires_at is None:
        return 0
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise TypeError(
            f"expires_at is Unix seconds (or None, or NO_EXPIRY), not {type(expires_at).__name__}"
        )
    if expires_at == 0:
        return 0
    if not math.isfinite(expires_at):
        raise ValueError(f"expires_at is {expires_at}: for no expiry, pass NO_EXPIRY (0)")
    return max(1, min(int(expires_at), _UINT32_MAX))


def _not_a_context(value: object) -> NoReturn:
    raise TypeError(f"seal takes a satchel Context, not {type(value).__name__}")


def peek(token: str | bytes, max_token_bytes: int = DEFAULT_LIMITS.max_token_bytes) -> Header:
    """The token's header, unverified: for diagnostics only (``satchel inspect --no-verify``)."""
    return envelope.parse(token, max_token_bytes).header


__all__ = ["NO_EXPIRY", "Codec", "Opened", "Prepared", "peek", "token_digest"]
