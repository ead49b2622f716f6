"""Satchel: stateless-first, client-held chat context for Flask.

The context is serialized (msgpack), compressed (zstd with a trained dictionary),
versioned (migrations run on read) and signed (HMAC) or sealed (AEAD) into a token
the client carries. Only sessions that outgrow their byte budget spill their oldest
turns into an overflow tier.

Quick start::

    from satchel import Codec, Context, Keyring

    codec = Codec(Keyring.generate())          # sealed by default
    ctx = Context.new()
    ctx.add_turn("user", "Hello!")
    token = codec.seal(ctx)                    # a URL-safe str
    assert codec.open(token).turns[0].content == "Hello!"
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .codec import NO_EXPIRY, Codec, Opened, Prepared, peek, token_digest
from .context import (
    Context,
    Lifecycle,
    LifecycleAction,
    OpaqueBlock,
    Pinned,
    Role,
    SegmentRef,
    ToolCall,
    Turn,
)
from .envelope import Header
from .errors import (
    BadSignature,
    BadToken,
    BudgetExceeded,
    ConfigurationError,
    ContextBusy,
    ContextErased,
    ContextNotSerializable,
    InvalidContext,
    InvalidRequest,
    InvalidText,
    InvalidValue,
    MalformedToken,
    MigrationFailed,
    SatchelError,
    StaleContext,
    TierBusy,
    TierError,
    TierFull,
    TierUnavailable,
    TokenExpired,
    TokenTooLarge,
    UnknownKeyId,
    UnsupportedVersion,
    WrongMode,
    WrongUser,
)
from .keys import Key, Keyring
from .limits import Limits
from .schema import CURRENT_VERSION as SCHEMA_VERSION

__version__ = "0.1.0"

# The audit events are a stream the app opts into (AuditObserver, its own handlers):
# without this, Python's last-resort handler would print the routine WARNING ones
# (forks, stale tokens) to stderr. The extension's own warnings and errors (a
# generated development key, an unpinned anchor key, a failing tier, a stream that
# raised) are left to reach stderr through that handler when the app has configured
# no logging, so they are not lost.
logging.getLogger("satchel.audit").addHandler(logging.NullHandler())

if TYPE_CHECKING:  # the lazy imports below, typed for mypy and editors
    from .flask_ext import Satchel
    from .flask_ext.session import SatchelSessionInterface


if not TYPE_CHECKING:  # a module __getattr__ would type every misspelt name as object

    def __getattr__(name: str) -> object:
        # The Flask pieces import Flask; keep ``import satchel`` light for pure codec users.
        if name == "Satchel":
            from .flask_ext import Satchel

            return Satchel
        if name == "SatchelSessionInterface":
            from .flask_ext.session import SatchelSessionInterface

            return SatchelSessionInterface
        raise AttributeError(f"module 'satchel' has no attribute {name!r}")


__all__ = [
    "NO_EXPIRY",
    "SCHEMA_VERSION",
    "BadSignature",
    "BadToken",
    "BudgetExceeded",
    "Codec",
    "ConfigurationError",
    "Context",
    "ContextBusy",
    "ContextErased",
    "ContextNotSerializable",
    "Header",
    "InvalidContext",
    "InvalidRequest",
    "InvalidText",
    "InvalidValue",
    "Key",
    "Keyring",
    "Lifecycle",
    "LifecycleAction",
    "Limits",
    "MalformedToken",
    "MigrationFailed",
    "OpaqueBlock",
    "Opened",
    "Pinned",
    "Prepared",
    "Role",
    "Satchel",
    "SatchelError",
    "SatchelSessionInterface",
    "SegmentRef",
    "StaleContext",
    "TierBusy",
    "TierError",
    "TierFull",
    "TierUnavailable",
    "TokenExpired",
    "TokenTooLarge",
    "ToolCall",
    "Turn",
    "UnknownKeyId",
    "UnsupportedVersion",
    "WrongMode",
    "WrongUser",
    "__version__",
    "peek",
    "token_digest",
]
