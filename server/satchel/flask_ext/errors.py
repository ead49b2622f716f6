"""Errors to JSON at the HTTP edge: one table, one shape.

Every error response is ``{"error": {"code": ..., "message": ...}}`` with the status
the error class names. Nothing Satchel raises on purpose becomes a 500.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import ContextBusy, SatchelError, TierError, TierUnavailable

log = logging.getLogger("satchel")

#: What the client is told of a 500: the code, and that the details are logged.
INTERNAL_MESSAGE = "the server could not handle this conversation; its log says why"

#: What the client is told of a tier's own failure (an app that lets one through, say
#: from ``satchel.erase``): its message names servers and addresses, which are logged.
TIER_MESSAGES = {
    "tier_unavailable": "the storage tier is unavailable; retry shortly",
    "tier_full": "the storage tier is full; retry later",
}

#: HTTP status codes that Satchel error codes map to, for reference and docs.
STATUS_BY_CODE: dict[str, int] = {
    "token_malformed": 400,
    "token_invalid": 400,
    "token_bad_signature": 400,
    "token_unknown_key": 400,
    "token_wrong_mode": 400,
    "token_unsupported_version": 400,
    "token_migration_failed": 400,
    "token_invalid_context": 400,
    "token_too_large": 413,
    "token_expired": 401,
    "token_wrong_user": 403,
    "token_erased": 410,
    "stale_context": 409,
    "context_busy": 409,
    "tier_unavailable": 503,
    "tier_full": 503,
    "budget_exceeded": 413,
    "invalid_request": 400,
    "invalid_text": 400,
    "invalid_value": 400,
    "invalid_turn": 400,
}


def error_response(code: str, message: str, status: int, **extra: Any) -> Response:
    """A ``{"error": {"code", "message", **extra}}`` JSON response with ``status``, marked
    ``no-store``. ``message`` goes out as given: :func:`public_error` is what words a
    SatchelError for the client."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


def public_error(exc: SatchelError) -> dict[str, str]:
    """``{"code", "message"}`` for the client: what every error response and every
    streamed error event says. Messages written for developers or operators are logged
    and replaced."""
    status = STATUS_BY_CODE.get(exc.code, exc.status)
    if status == 500:
        # A bug in the app (a context that cannot be sealed): the details name the app's
        # fields, which are for its developers, not for whoever sent the request.
        log.error("satchel: %s: %s", exc.code, exc.message)
        return {"code": exc.code, "message": INTERNAL_MESSAGE}
    if isinstance(exc, TierError) and "op" in exc.facts:  # raw from a tier, not worded for users
        log.warning("satchel: %s: %s", exc.code, exc.message)
        return {
            "code": exc.code,
            "message": TIER_MESSAGES.get(exc.code, TIER_MESSAGES["tier_unavailable"]),
        }
    return {"code": exc.code, "message": exc.message}


#: seconds a 409 context_busy asks the client to wait (Retry-After) before sending again
CONTEXT_BUSY_RETRY_AFTER = 1


def satchel_error_response(exc: SatchelError) -> Response:
    """The JSON error response for ``exc``. Without the extension's state: a blueprint
    that needs a handler of its own should register ``Satchel.handle_error``, which
    also hands back the newest token of a lost response."""
    public = public_error(exc)
    response = error_response(
        public["code"], public["message"], STATUS_BY_CODE.get(exc.code, exc.status)
    )
    if isinstance(exc, ContextBusy):
        # The reply that holds the conversation is most often the client's own, just
        # stopped: the server notices at its next write and lets go.
        response.headers["Retry-After"] = str(CONTEXT_BUSY_RETRY_AFTER)
    elif isinstance(exc, TierUnavailable):
        # While the breaker is open it says when it lets a trial call through; else a
        # second is as good a guess as any for a tier that just failed.
        retry_in = exc.facts.get("retry_in")
        seconds = math.ceil(retry_in) if isinstance(retry_in, int | float) else 1
        response.headers["Retry-After"] = str(max(1, min(seconds, 60)))
    return response


#: The ``code`` of werkzeug's HTTP errors, fixed here: it is part of the HTTP contract
#: (docs/security.md), and was derived from werkzeug's reason phrase, which a release
#: could reword (RFC 9110 calls 413 "Content Too Large") and so change the code.
HTTP_ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    410: "gone",
    411: "length_required",
    412: "precondition_failed",
    413: "request_entity_too_large",
    414: "request_uri_too_long",
    415: "unsupported_media_type",
    416: "requested_range_not_satisfiable",
    417: "expectation_failed",
    421: "misdirected_request",
    422: "unprocessable_entity",
    423: "locked",
    424: "failed_dependency",
    428: "precondition_required",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    451: "unavailable_for_legal_reasons",
    500: "internal_server_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
    505: "http_version_not_supported",
}


def http_error_response(exc: HTTPException) -> Response:
    """JSON for werkzeug's HTTP errors (bad JSON body, 404, 405...) on Satchel routes."""
    code = HTTP_ERROR_CODES.get(exc.code or 500) or _code_of_name(exc.name)
    response = error_response(code, exc.description or exc.name or "error", exc.code or 500)
    for name, value in exc.get_headers():
        if name.lower() != "content-type":  # keep what HTTP requires, e.g. a 405's Allow
            response.headers[name] = value
    return response


def _code_of_name(name: str | None) -> str:
    """A code for a status the table does not name (an app's own HTTPException)."""
    return re.sub(r"[^a-z0-9]+", "_", (name or "http error").lower()).strip("_") or "http_error"


__all__ = [
    "CONTEXT_BUSY_RETRY_AFTER",
    "HTTP_ERROR_CODES",
    "STATUS_BY_CODE",
    "error_response",
    "http_error_response",
    "public_error",
    "satchel_error_response",
]
