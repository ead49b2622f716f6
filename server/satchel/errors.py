"""One exception hierarchy for everything that can go wrong with a token or a tier.

Every error carries a stable machine-readable ``code`` (used verbatim in the JSON
error body at the HTTP edge) and an HTTP ``status``. The HTTP layer maps errors to
responses with one table (:data:`satchel.flask_ext.errors`), never by ``isinstance``
chains scattered across views.

Messages never contain key material or token contents: only facts such as sizes,
key ids, versions and times.
"""

from __future__ import annotations

from typing import Any


class SatchelError(Exception):
    """Root of every error Satchel raises on purpose."""

    code: str = "satchel_error"
    status: int = 500

    def __init__(self, message: str | None = None, **facts: Any) -> None:
        self.message = message or self.__class__.__doc__ or self.code
        #: What went wrong, as plain data (sizes, key ids, versions, times).
        self.facts: dict[str, Any] = facts
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"code": ..., "message": ...}``."""
        return {"code": self.code, "message": self.message}


class BadToken(SatchelError):
    """The token cannot be used."""

    code = "token_invalid"
    status = 400


class MalformedToken(BadToken):
    """The token is not a well-formed Satchel token."""

    code = "token_malformed"


class TokenTooLarge(BadToken):
    """The token, or what it decompresses or unpacks to, is larger than allowed."""

    code = "token_too_large"
    status = 413


class BadSignature(BadToken):
    """The token failed verification: it was altered or minted with another key."""

    code = "token_bad_signature"


class UnknownKeyId(BadToken):
    """The token names a key id that is not in the key ring."""

    code = "token_unknown_key"


class WrongMode(BadToken):
    """The token was minted in another protection mode (signed versus sealed)."""

    code = "token_wrong_mode"


class TokenExpired(BadToken):
    """The token is past its expiry, idle timeout or maximum age."""

    code = "token_expired"
    status = 401


class UnsupportedVersion(BadToken):
    """The token's format or schema version is unknown to this release."""

    code = "token_unsupported_version"


class MigrationFailed(BadToken):
    """A schema migration could not upgrade the token's context."""

    code = "token_migration_failed"


class InvalidContext(BadToken):
    """The token verified, but its content does not describe a valid context."""

    code = "token_invalid_context"


class WrongUser(BadToken):
    """The token is bound to another user than the one making the request."""

    code = "token_wrong_user"
    status = 403


class StaleContext(SatchelError):
    """The token is older than the newest one the server has seen for this session."""

    code = "stale_context"
    status = 409

    def __init__(
        self, message: str | None = None, *, newest_token: str | None = None, **facts: Any
    ) -> None:
        super().__init__(message, **facts)
        #: The session's newest token, when the refused token is the one it was made
        #: from (its response was lost on the way): the 409 hands it back. An
        #: attribute, not a fact: facts are plain data for logs, this is a credential.
        self.newest_token = newest_token


class ContextBusy(SatchelError):
    """Another request with the same token is being answered right now (a streamed
    reply on a ``monotonic`` route claims its token): retry once it has ended."""

    code = "context_busy"
    status = 409


class ContextErased(BadToken):
    """The session this token belongs to was erased."""

    code = "token_erased"
    status = 410


class TierError(SatchelError):
    """The overflow tier or server-side store failed (timeout, connection, full)."""

    code = "tier_unavailable"
    status = 503


class TierUnavailable(TierError):
    """The tier did not answer in time, refused the connection, or the breaker is open."""


class TierBusy(TierUnavailable):
    """The tier answered, but cannot serve these keys right now: Redis Cluster is moving
    their slot to another master (``TRYAGAIN``, redirections past redis-py's limit).

    Reported as ``tier_unavailable`` like any outage, but it says nothing about the
    server's health: it opens no circuit breaker, which would fail the sessions of the
    master's other slots too.
    """


def retry_facts(error: BaseException | None) -> dict[str, float]:
    """``{"retry_in": seconds}`` when ``error`` is a tier error that knows how long its
    breaker still refuses calls, else ``{}``: for an error raised in its place, so the
    503's ``Retry-After`` says that wait, not 1 s."""
    retry_in = error.facts.get("retry_in") if isinstance(error, TierError) else None
    return {"retry_in": retry_in} if isinstance(retry_in, int | float) else {}


class TierFull(TierError):
    """The tier refused a write because it is out of memory or space."""

    code = "tier_full"


class BudgetExceeded(SatchelError):
    """The context cannot fit its byte budget even after every allowed trim."""

    code = "budget_exceeded"
    status = 413


class InvalidRequest(SatchelError):
    """The request body or parameters are not what the endpoint expects."""

    code = "invalid_request"
    status = 400


class InvalidText(InvalidRequest, ValueError):
    """Text cannot enter the context: it is not valid Unicode (an unpaired surrogate).

    A ValueError too, so code that validates its own input can catch it as one.
    """

    code = "invalid_text"


class InvalidValue(InvalidRequest, ValueError):
    """A value cannot enter the context: an integer outside the 64 bits a token
    carries, or nesting deeper than a token opens (tool-call arguments from a request
    body, for example). A ValueError too, as :class:`InvalidText` is.
    """

    code = "invalid_value"


class InvalidTurn(InvalidRequest, TypeError, ValueError):
    """A user turn cannot be added: its content is not a str (``Context.add_turn``).

    That text most often comes straight from a request body (``{"message": null}``),
    where a plain TypeError was a 500: here it is a JSON 400 ``invalid_turn``. A
    TypeError and a ValueError too, for code that caught what ``add_turn`` raised
    before. The app's own turns (a model's reply of the wrong type) stay a TypeError.
    """

    code = "invalid_turn"


class ContextNotSerializable(SatchelError):
    """The context holds a value msgpack cannot carry (a set, a datetime, an object).

    A programming error in the app, not bad input: metadata takes str, int, float,
    bool, None, bytes, and lists and str-keyed maps of those.
    """

    code = "context_not_serializable"
    status = 500


class ConfigurationError(SatchelError):
    """Satchel is configured in a way that cannot work (for example, no keys)."""

    code = "configuration_error"
    status = 500


__all__ = [
    "BadSignature",
    "BadToken",
    "BudgetExceeded",
    "ConfigurationError",
    "ContextBusy",
    "ContextErased",
    "ContextNotSerializable",
    "InvalidContext",
    "InvalidRequest",
    "InvalidText",
    "InvalidTurn",
    "InvalidValue",
    "MalformedToken",
    "MigrationFailed",
    "SatchelError",
    "StaleContext",
    "TierBusy",
    "TierError",
    "TierFull",
    "TierUnavailable",
    "TokenExpired",
    "TokenTooLarge",
    "UnknownKeyId",
    "UnsupportedVersion",
    "WrongMode",
    "WrongUser",
    "retry_facts",
]
