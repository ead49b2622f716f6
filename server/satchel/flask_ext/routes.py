"""Operational routes: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz``.

None of them reads, opens, creates or seals a context: they never touch
``satchel.context``, so the extension issues no token on them, and a
``Satchel-Context`` header sent to them is ignored.

``/readyz``::

    {"status": "ready" | "degraded" | "not_ready",
     "mode": "client",
     "keyring": {"loaded": true, "kids": 2, "development": false},
     "tier": {"name": "redis", "reachable": true, "breaker": "closed",
              "full": false, "writes_failing": false} | null}

* ``ready`` (200): the key ring is loaded and the tier (if any) answers a ping with
  its breaker closed.
* ``degraded`` (200): the tier does not answer or its breaker is not closed, or it
  refused a write for want of memory in the last minute (``"full": true``: a Redis at
  ``maxmemory`` with ``noeviction``, memory mode's bounded store), or its writes keep
  failing while it answers reads (``"writes_failing": true``: a SQLite file on a
  read-only disk; every spill is refused until one succeeds). The app still
  serves: overflowed turns are missing (the summary stands in for them) and
  responses say so in ``Satchel-Degraded``; a full store refuses what needs room.
  Taking every replica out of the load balancer because a shared dependency is down
  would turn a degraded service into an outage, so this stays 200.
* ``not_ready`` (503): there is no usable key ring, so no token can be opened or
  sealed; or ``SATCHEL_METADATA_WRITE_VERSION`` needs a metadata downgrade that is not
  registered, so no token can be written (every request would fail).

``metadata`` (only when ``SATCHEL_METADATA_VERSION`` is set) lists the app's metadata
versions and the migrations and downgrades that are missing. A missing migration does
not change the status (an app may start at a version with no tokens of an older one),
but a token of that version is refused as ``token_migration_failed``: check it before
a rollout.

``keyring.development`` is true while the app runs on a generated development key
file (no ``SATCHEL_KEYS``): fine for ``make demo``, never for a deployment, so a
deploy check can refuse it. It does not change the status.

The ping goes through the tier's circuit breaker: while it is open the answer is
immediate (no socket is touched), and a probe waits at most the tier's own
timeouts for each try of its retry policy (docs/operations.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import MethodNotAllowed

from ..errors import SatchelError, TierError
from .errors import http_error_response

log = logging.getLogger("satchel")

NO_STORE = {"Cache-Control": "no-store"}


def register_routes(app: Flask, ext: Any, *, metrics_route: str | None, health: bool) -> None:
    """Add ``metrics_route`` (when set) and ``/healthz`` + ``/readyz`` (when ``health``).

    ``ext`` is the :class:`~satchel.flask_ext.Satchel` extension: ``ext.state(app)``
    gives the key ring and the tier, ``ext.metrics`` the
    :class:`~satchel.metrics.PrometheusObserver` (looked up on each scrape, so it may
    be set after the routes are registered).
    """
    if metrics_route:

        def satchel_metrics() -> Response:
            from ..metrics import metrics_response

            observer = getattr(ext, "metrics", None)
            registry = getattr(observer, "registry", None)
            if registry is None:
                return _json(
                    {"error": {"code": "metrics_disabled", "message": "no metrics observer"}},
                    404,
                )
            watch = getattr(observer, "watch_tier", None)
            if watch is not None:
                watch(_tier(app, ext))
            return metrics_response(registry)

        _add_read_route(app, metrics_route, "satchel_metrics", satchel_metrics)

    if health:

        def satchel_healthz() -> Response:
            return _json({"status": "ok"}, 200)

        def satchel_readyz() -> Response:
            body, status = readiness(app, ext)
            return _json(body, status)

        _add_read_route(app, "/healthz", "satchel_healthz", satchel_healthz)
        _add_read_route(app, "/readyz", "satchel_readyz", satchel_readyz)

    paths = {metrics_route} if metrics_route else set()
    if health:
        paths |= {"/healthz", "/readyz"}
    if paths:

        def refuse_other_methods() -> Response | None:
            """Any method the rules do not list (PROPFIND, CONNECT, a made-up one) is
            refused by werkzeug's router before a view runs: an HTML 405 whose Allow
            named every method the rule lists, refused ones included. Flask raises the
            router's error only after the before-request hooks, so one here answers it
            in JSON with the methods these routes really take."""
            if isinstance(request.routing_exception, MethodNotAllowed) and request.path in paths:
                return _method_not_allowed()
            return None

        app.before_request(refuse_other_methods)


#: What the operational routes answer; any other method is a JSON 405 naming these.
_READ_METHODS = ("GET", "HEAD", "OPTIONS")
#: Methods routed to the view only to be refused there in JSON: left to the router,
#: they were werkzeug's HTML 405 (the app's JSON error handlers cover its own routes).
_REFUSED_METHODS = ("POST", "PUT", "PATCH", "DELETE", "TRACE")


def _add_read_route(app: Flask, rule: str, endpoint: str, view: Callable[[], Response]) -> None:
    allow = ", ".join(_READ_METHODS)

    def read_only() -> Response:
        if request.method == "OPTIONS":
            return Response(status=204, headers={"Allow": allow})
        if request.method not in _READ_METHODS:
            return _method_not_allowed()
        return view()

    app.add_url_rule(
        rule,
        endpoint=endpoint,
        view_func=read_only,
        methods=[*_READ_METHODS, *_REFUSED_METHODS],
        provide_automatic_options=False,
    )


def _method_not_allowed() -> Response:
    return http_error_response(MethodNotAllowed(valid_methods=list(_READ_METHODS)))


def _json(body: dict[str, Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(NO_STORE)
    return response


def _state(app: Flask, ext: Any) -> Any:
    try:
        return ext.state(app)
    except SatchelError:
        return None


def _tier(app: Flask, ext: Any) -> Any:
    state = _state(app, ext)
    return getattr(state, "tier", None) if state is not None else None


def readiness(app: Flask, ext: Any) -> tuple[dict[str, Any], int]:
    """The ``/readyz`` body and status (see the module docstring)."""
    state = _state(app, ext)
    codec = getattr(state, "codec", None)
    keyring = getattr(codec, "keyring", None)
    try:
        kids = len(keyring) if keyring is not None else 0
    except Exception:
        kids = 0
    body: dict[str, Any] = {
        "status": "ready",
        "mode": getattr(getattr(state, "config", None), "mode", None),
        "keyring": {
            "loaded": kids > 0,
            "kids": kids,
            "development": bool(getattr(state, "development_key", False)),
        },
        "tier": None,
    }
    schema = getattr(getattr(state, "pipeline", None), "metadata_schema", None)
    missing_downgrades: list[int] = []
    if schema is not None and schema.version:
        missing_downgrades = schema.missing_downgrades()
        body["metadata"] = {
            "version": schema.version,
            "write_version": schema.write_version,
            "missing_migrations": schema.missing_migrations(),
            "missing_downgrades": missing_downgrades,
        }
    tier = getattr(state, "tier", None)
    if tier is not None:
        body["tier"] = status = tier_status(tier)
        if (
            not status["reachable"]
            or status["breaker"] != "closed"
            or status["full"]
            or status["writes_failing"]
        ):
            body["status"] = "degraded"
    if kids == 0 or missing_downgrades:  # nothing can be opened, or nothing written
        body["status"] = "not_ready"
        return body, 503
    return body, 200


def tier_status(tier: Any) -> dict[str, Any]:
    """``{"name", "reachable", "breaker", "full", "writes_failing"}`` for ``tier``,
    pinging it once."""
    name = str(getattr(tier, "name", None) or type(tier).__name__)
    reachable = True
    try:
        tier.ping()
    except TierError as exc:
        reachable = False
        log.info("satchel readiness: the %s tier is unreachable: %s", name, exc.code)
    except Exception as exc:  # a probe never fails with a 500
        reachable = False
        log.warning("satchel readiness: pinging the %s tier raised %s", name, type(exc).__name__)
    breaker = getattr(tier, "breaker_state", None)
    if breaker not in ("closed", "open", "half_open"):
        breaker = "closed" if reachable else "open"
    full_recently = getattr(tier, "full_recently", None)
    full = bool(full_recently()) if callable(full_recently) else False
    writes_failing = bool(getattr(tier, "writes_failing", False))
    return {
        "name": name,
        "reachable": reachable,
        "breaker": breaker,
        "full": full,
        "writes_failing": writes_failing,
    }


__all__ = ["readiness", "register_routes", "tier_status"]
