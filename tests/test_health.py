"""/healthz and /readyz, including a real redis tier that goes down and comes back."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from satchel import Satchel
from satchel.errors import TierUnavailable
from satchel.flask_ext.routes import register_routes, tier_status
from satchel.keys import Keyring, generate_key
from satchel.observe import Observer
from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier
from tests.support import LiveServer, RedisServer

KEYS = Keyring.generate("old").rotated(generate_key("new"))  # two keys, newest first


class Events(Observer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def event(self, name: str, /, **fields: Any) -> None:
        self.names.append(name)


def tier_entry(name: str, *, reachable: bool, breaker: str) -> dict[str, Any]:
    """A tier's /readyz entry, neither full nor refusing writes."""
    return {
        "name": name,
        "reachable": reachable,
        "breaker": breaker,
        "full": False,
        "writes_failing": False,
    }


def make_app(*, tier: Any = None, observer: Observer | None = None, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, **config)
    ext = Satchel(app, observer=observer, tier=tier)
    ext.metrics = None
    register_routes(app, ext, metrics_route=None, health=True)

    @app.post("/chat")
    def chat() -> Any:
        ctx = ext.context
        ctx.add_turn("user", os.urandom(200).hex())
        return {"degraded": ctx.degraded}

    return app


def test_healthz_is_a_plain_liveness_check() -> None:
    app = make_app()
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}
    assert resp.headers["Cache-Control"] == "no-store"


def test_ready_without_a_tier() -> None:
    resp = make_app().test_client().get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json() == {
        "status": "ready",
        "mode": "client",
        "keyring": {"loaded": True, "kids": 2, "development": False},
        "tier": None,
    }


def test_health_routes_never_open_create_or_seal_a_context() -> None:
    events = Events()
    app = make_app(observer=events, tier=MemoryTier())
    client = app.test_client()
    for path in ("/healthz", "/readyz"):
        for headers in ({}, {"Satchel-Context": "s1.garbage"}):
            resp = client.get(path, headers=headers)
            assert resp.status_code == 200, (path, headers)
            assert "Satchel-Context" not in resp.headers
            assert "Satchel-Reset" not in resp.headers
    assert events.names == []
    # the app itself still issues tokens
    assert "Satchel-Context" in client.post("/chat").headers
    assert "session_started" in events.names


def test_not_ready_without_a_key_ring() -> None:
    app = Flask(__name__)
    ext = Satchel()  # registered on an app it was never initialised on: no key ring
    register_routes(app, ext, metrics_route=None, health=True)
    client = app.test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json() == {
        "status": "not_ready",
        "mode": None,
        "keyring": {"loaded": False, "kids": 0, "development": False},
        "tier": None,
    }
    assert client.get("/healthz").status_code == 200  # alive, just not ready


def test_redis_tier_down_is_degraded_but_serving(redis_server: RedisServer) -> None:
    app = make_app(SATCHEL_OVERFLOW_URL=redis_server.url, SATCHEL_MAX_TOKEN_BYTES=600)
    client = app.test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "ready"
    assert resp.get_json()["tier"] == tier_entry("redis", reachable=True, breaker="closed")

    token = None
    for _ in range(4):  # overflow into redis
        resp = client.post("/chat", headers={"Satchel-Context": token} if token else {})
        token = resp.headers["Satchel-Context"]
    assert redis_server.client().dbsize() > 0

    redis_server.kill()
    resp = client.get("/readyz")
    assert resp.status_code == 200  # client mode still serves
    body = resp.get_json()
    assert body["status"] == "degraded"
    assert body["keyring"] == {"loaded": True, "kids": 2, "development": False}
    assert body["tier"] == tier_entry("redis", reachable=False, breaker="closed")

    # chat keeps working, degraded; the probes and requests open the breaker
    resp = client.post("/chat", headers={"Satchel-Context": token})
    assert resp.status_code == 200
    assert resp.headers["Satchel-Degraded"]
    for _ in range(5):
        body = client.get("/readyz").get_json()
    assert body["status"] == "degraded"
    assert body["tier"] == tier_entry("redis", reachable=False, breaker="open")


def test_a_tier_that_reads_but_refuses_every_write_is_degraded(tmp_path: Any) -> None:
    """A SQLite file on a disk gone read-only answers pings and reads, so its breaker
    stays closed, while every spill fails (and turns are lost past the hard cap):
    /readyz said "ready". The writes' own fail-fast state makes it "degraded"."""
    import sqlite3

    from satchel.tiers import SQLiteTier

    path = tmp_path / "tier.db"
    guarded = GuardedTier(
        SQLiteTier(path, busy_timeout=0.01), breaker=BreakerPolicy(fail_max=2, reset_timeout=30)
    )
    app = make_app(tier=guarded, SATCHEL_MAX_TOKEN_BYTES=600)
    client = app.test_client()
    assert client.get("/readyz").get_json()["status"] == "ready"
    # Another process holds the write lock for the rest of the test: every write times
    # out (SQLite "database is locked"), every read still answers.
    holder = sqlite3.connect(path, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        token = None
        for _ in range(6):
            resp = client.post("/chat", headers={"Satchel-Context": token} if token else {})
            assert resp.status_code == 200
            token = resp.headers["Satchel-Context"]
            # Other sessions' reads succeed meanwhile, and close the breaker's count.
            assert guarded.get_many(["another session's segment"], cache=False).error is None
        assert "tier_write_failed" in resp.headers["Satchel-Degraded"]
        body = client.get("/readyz").get_json()
        assert body["tier"]["reachable"] is True and body["tier"]["breaker"] == "closed"
        assert body["tier"]["writes_failing"] is True
        assert body["status"] == "degraded"
    finally:
        holder.rollback()
        holder.close()


def test_ready_again_after_the_breaker_closes(redis_server: RedisServer) -> None:
    from satchel.tiers import RedisTier

    now = [0.0]
    tier = GuardedTier(
        RedisTier(redis_server.url),
        breaker=BreakerPolicy(fail_max=1, reset_timeout=5),
        clock=lambda: now[0],
    )
    client = make_app(tier=tier).test_client()
    redis_server.kill()
    assert client.get("/readyz").get_json()["tier"]["breaker"] == "open"
    redis_server.restart()
    # still open: the probe does not touch redis until the reset timeout passes
    body = client.get("/readyz").get_json()
    assert body["status"] == "degraded"
    assert body["tier"] == tier_entry("redis", reachable=False, breaker="open")
    now[0] += 6
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "ready"
    assert resp.get_json()["tier"] == tier_entry("redis", reachable=True, breaker="closed")


def test_tier_status_never_raises() -> None:
    class Bare:  # no breaker_state, a bug in ping
        name = "custom"

        def ping(self) -> None:
            raise RuntimeError("bug")

    assert tier_status(Bare()) == tier_entry("custom", reachable=False, breaker="open")

    class Down(MemoryTier):
        def ping(self) -> None:
            raise TierUnavailable("down")

    status = tier_status(GuardedTier(Down()))
    assert status == tier_entry("memory", reachable=False, breaker="closed")


# ------------------------------------------------------------------ over real HTTP


def create_live_app() -> Flask:
    return make_app(SATCHEL_OVERFLOW_URL=os.environ["SATCHEL_OVERFLOW_URL"])


def test_readyz_over_http_with_redis_killed(redis_server: RedisServer) -> None:
    with LiveServer(
        "tests.test_health:create_live_app",
        env={"SATCHEL_OVERFLOW_URL": redis_server.url},
    ) as server:
        assert server.get("/healthz").json() == {"status": "ok"}
        assert server.get("/readyz").json()["status"] == "ready"
        redis_server.kill()
        resp = server.get("/readyz")
        assert resp.status == 200
        assert resp.json()["status"] == "degraded"
        assert resp.json()["tier"]["reachable"] is False
        assert server.get("/healthz").status == 200


def test_readyz_and_every_start_say_the_app_runs_on_a_development_key(
    tmp_path: Any, monkeypatch: Any, caplog: Any
) -> None:
    """The dev-key warning came only with the start that generated the key: every
    later start (restarts, redeploys, other workers) ran on it in silence."""
    import logging

    monkeypatch.delenv("SATCHEL_KEYS", raising=False)

    def start() -> Flask:
        app = Flask(__name__)
        app.config.update(
            SATCHEL_DEV_KEY_FILE=str(tmp_path / "dev-key"), SATCHEL_HEALTH_ROUTES=True
        )
        Satchel(app)
        return app

    for _ in range(2):  # the first start generates the key, the second reuses it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="satchel"):
            app = start()
        assert any("SATCHEL_KEYS is not set" in r.getMessage() for r in caplog.records)
        body = app.test_client().get("/readyz").get_json()
        assert body["status"] == "ready" and body["keyring"]["development"] is True
    assert make_app().test_client().get("/readyz").get_json()["keyring"]["development"] is False


def test_readyz_reports_missing_metadata_migrations_and_refuses_a_missing_downgrade() -> None:
    """A forgotten downgrade passed /readyz while every write failed (no token issued),
    so a rollout gated on readiness went on; a forgotten migration was seen only as
    clients' tokens refused."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_METADATA_VERSION=1,
        SATCHEL_METADATA_WRITE_VERSION=0,
        SATCHEL_HEALTH_ROUTES=True,
    )
    ext = Satchel(app)
    client = app.test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["status"] == "not_ready"
    assert resp.get_json()["metadata"] == {
        "version": 1,
        "write_version": 0,
        "missing_migrations": [0],
        "missing_downgrades": [1],
    }

    @ext.metadata_migration(0)
    def up(meta: dict) -> dict:
        return meta

    @ext.metadata_downgrade(1)
    def down(meta: dict) -> dict:
        return meta

    resp = client.get("/readyz")  # registered after init_app, as the docs allow
    assert resp.status_code == 200 and resp.get_json()["status"] == "ready"
    assert resp.get_json()["metadata"]["missing_migrations"] == []
    assert resp.get_json()["metadata"]["missing_downgrades"] == []
    assert "metadata" not in make_app().test_client().get("/readyz").get_json()


def test_operational_routes_answer_other_methods_in_json() -> None:
    """A POST to /readyz (a probe misconfigured, a scanner) got werkzeug's HTML 405:
    the app's JSON error handlers cover only its own routes."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS, SATCHEL_METRICS_ROUTE="/metrics", SATCHEL_HEALTH_ROUTES=True
    )
    Satchel(app)
    client = app.test_client()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200
        assert client.head(path).status_code == 200
        options = client.options(path)
        assert options.status_code == 204 and options.headers["Allow"] == "GET, HEAD, OPTIONS"
        # Those the rule lists to refuse them, and those it does not (werkzeug's router
        # answered PROPFIND and made-up methods with its HTML 405, Allow naming POST...).
        for method in ("POST", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND", "QUERY", "FOO"):
            refused = client.open(path, method=method, data=b"{}")
            assert refused.status_code == 405, (path, method)
            assert refused.is_json, (path, method, refused.content_type)
            assert refused.get_json()["error"]["code"] == "method_not_allowed"
            assert refused.headers["Allow"] == "GET, HEAD, OPTIONS"
