"""flask.session past the cookie limit: the sealed session overflows to a real tier."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request, session

from satchel.flask_ext.session import SatchelSessionInterface, SessionTooLarge
from satchel.flask_ext.session_overflow import PREFIX, TierSessionOverflow
from satchel.tiers.memory import MemoryTier
from tests.support.clock import FakeClock

T0 = 1_900_000_000.0  # a fixed "now" for the tests that move the session clock
LIFETIME = timedelta(hours=1)


def make_app(
    tier: Any,
    *,
    grace: float = 600.0,
    testing: bool = True,
    clock: FakeClock | None = None,
    overflow: TierSessionOverflow | None = None,
) -> Flask:
    app = Flask(__name__)
    app.secret_key = "test secret key, long enough for the ring"
    app.config["TESTING"] = testing
    app.config["PERMANENT_SESSION_LIFETIME"] = LIFETIME
    app.session_interface = SatchelSessionInterface(
        overflow=overflow or TierSessionOverflow(tier, grace=grace),
        clock=clock or time.time,
    )

    @app.post("/set/<int:size>")
    def set_value(size: int) -> str:
        session.permanent = request.args.get("permanent") == "1"
        session["notes"] = os.urandom(size).hex()  # random: it does not compress
        return "ok"

    @app.get("/get")
    def get_value() -> dict[str, Any]:
        return {"notes": session.get("notes"), "rejected": session.rejected}  # type: ignore[attr-defined]

    @app.post("/touch")
    def touch() -> str:
        session["touched"] = session.get("touched", 0) + 1
        return "ok"

    @app.post("/logout")
    def logout() -> str:
        session.clear()
        if request.args.get("flash"):
            session["_flashes"] = [("message", "You are logged out.")]  # flash()'s shape
        return "ok"

    return app


def cookie_of(response: Any) -> str:
    header = response.headers["Set-Cookie"]
    return header.split(";", 1)[0].split("=", 1)[1]


def tier_key(reference: str) -> str:
    """The tier key a ``so1.<key>.<signature>`` cookie names."""
    return reference[len(PREFIX) :].rsplit(".", 1)[0]


def redis_ttls(redis_server: Any) -> dict[str, int]:
    """Every key in the server with its TTL in seconds."""
    client = redis_server.client()
    try:
        return {k.decode(): int(client.ttl(k)) for k in client.keys("*")}
    finally:
        client.close()


def test_a_large_session_overflows_and_reads_back(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    client = app.test_client()
    small = client.post("/set/100")
    assert not cookie_of(small).startswith(PREFIX)  # under the limit: a plain cookie
    large = client.post("/set/6000")
    value = cookie_of(large)
    assert value.startswith(PREFIX) and len(value) < 200
    notes = client.get("/get").get_json()["notes"]
    assert notes is not None and len(notes) == 12000


def test_a_forged_reference_gives_an_empty_session(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    client = app.test_client()
    value = cookie_of(client.post("/set/6000"))
    forged = value[:-2] + ("AA" if value[-2:] != "AA" else "BB")
    client.set_cookie("session", forged)
    assert client.get("/get").get_json() == {"notes": None, "rejected": "token_bad_signature"}


@pytest.mark.parametrize("stored", [b"\xc3\xa9 not a token", b"garbage, but ASCII"])
def test_a_stored_copy_that_is_not_a_token_gives_an_empty_session(
    tmp_path: Path, stored: bytes
) -> None:
    """A stored copy that is not ASCII (damaged, or planted in the tier) was a 500: the
    reference's value decoded as ASCII outside any SatchelError. Refused as a damaged
    cookie is: an empty session that says why."""
    overflow = TierSessionOverflow(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    app = make_app(None, overflow=overflow)
    client = app.test_client()
    value = cookie_of(client.post("/set/6000"))
    overflow.tier.put(tier_key(value), stored, 600, cache=False)
    assert client.get("/get").get_json() == {"notes": None, "rejected": "token_malformed"}


def test_tier_down_reads_empty_and_serves_without_the_session_flagged_and_counted(
    redis_server: Any, caplog: Any
) -> None:
    """The read was an empty session with a warning and no flag or metric; the write
    raised SessionTooLarge, Flask's HTML 500, and nothing counted it. A tier outage is
    a degraded path: the request succeeds (its other work is done: a 500, or a 503
    saying "retry", would have the user repeat it), flagged, counted, logged."""
    from satchel.metrics import PrometheusObserver

    obs = PrometheusObserver()
    app = make_app(None, overflow=TierSessionOverflow(redis_server.url))
    app.session_interface.observer = obs  # type: ignore[attr-defined]

    @app.after_request
    def cors(response: Any) -> Any:  # an app's own header survives
        response.headers["Access-Control-Allow-Origin"] = "https://chat.example"
        return response

    client = app.test_client()
    reference = cookie_of(client.post("/set/6000"))
    assert len(client.get("/get").get_json()["notes"]) == 12000
    redis_server.kill()

    def count(name: str, **labels: str) -> float:
        return obs.registry.get_sample_value(name, labels) or 0.0

    # Unreadable: an empty session that says the tier (not the cookie) failed.
    read = client.get("/get")
    assert read.status_code == 200
    assert read.get_json() == {"notes": None, "rejected": "tier_unavailable"}
    assert read.headers["Satchel-Degraded"] == "session_unavailable"
    assert "Set-Cookie" not in read.headers  # the reference stays with the client
    assert count("satchel_degraded_total", reason="session_unavailable") == 1
    assert count("satchel_degraded_responses_total") == 1
    assert client.get_cookie("session").value == reference  # type: ignore[union-attr]
    # Nowhere to store it: served as the view made it, the session ended, flagged.
    with caplog.at_level(logging.INFO):
        written = client.post("/set/6000")
    assert written.status_code == 200 and written.get_data() == b"ok"
    assert written.headers["Satchel-Degraded"] == "session_not_saved, session_unavailable"
    assert written.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "session=;" in written.headers["Set-Cookie"]  # deleted
    assert count("satchel_degraded_total", reason="session_not_saved") == 1
    assert count("satchel_degraded_responses_total") == 2  # responses, not reasons
    assert "the session ends" in caplog.text
    assert client.get_cookie("session") is None
    assert count("satchel_overflow_misses_total", reason="tier_unavailable") == 0


def test_a_logout_the_tier_cannot_store_is_not_undone(tmp_path: Path) -> None:
    """session.pop("user") on a session still too large for its cookie, with the tier
    full: the client kept its previous cookie, so the 200 "logged out" page left it
    logged in. The session ends instead."""
    tier = MemoryTier(max_bytes=20_000)
    app = make_app(tier)

    @app.post("/login")
    def login() -> str:
        session["user"] = "alice"
        session["history"] = os.urandom(3000).hex()  # large: overflows
        return "ok"

    @app.post("/logout-keep-history")
    def logout_keep_history() -> str:
        session.pop("user")
        session["history"] += "x"  # still too large for a cookie
        return "logged out"

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {"user": session.get("user")}

    client = app.test_client()
    assert client.post("/login").status_code == 200
    assert client.get("/whoami").get_json() == {"user": "alice"}
    tier.max_bytes = 1  # full from now on
    out = client.post("/logout-keep-history")
    assert out.status_code == 200 and out.headers["Satchel-Degraded"] == "session_not_saved"
    assert client.get("/whoami").get_json() == {"user": None}


def test_an_app_with_the_satchel_extension_reports_session_outages_to_its_metrics(
    redis_server: Any,
) -> None:
    """Without an observer of its own, the session interface reports to the Satchel
    extension's, so /metrics counts the session tier's outages with the rest."""
    from satchel import Keyring, Satchel
    from satchel.metrics import PrometheusObserver

    obs = PrometheusObserver()
    app = make_app(None, overflow=TierSessionOverflow(redis_server.url))
    app.config["SATCHEL_KEYS"] = Keyring.generate("k1")
    Satchel(app, observer=obs)
    client = app.test_client()
    client.post("/set/6000")
    redis_server.kill()
    assert client.get("/get").headers["Satchel-Degraded"] == "session_unavailable"
    assert client.post("/set/6000").status_code == 200
    for reason in ("session_unavailable", "session_not_saved"):
        assert obs.registry.get_sample_value("satchel_degraded_total", {"reason": reason})
    assert obs.registry.get_sample_value("satchel_degraded_responses_total") == 2


def test_a_copy_the_tier_lost_is_counted_and_logged_not_a_silent_logout(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis at allkeys-lru evicting a stored session copy (or restarting without
    persistence) logged its user out with nothing but a DEBUG line: no metric, no
    audit record. It counts in satchel_session_refused_total{reason} (apart from the
    tokens, whose ratios alerts divide), is logged (a throttled WARNING), and the dead
    cookie is deleted, so one lost session counts once, not once per request after."""
    from satchel.audit import AuditObserver
    from satchel.metrics import PrometheusObserver
    from satchel.observe import MultiObserver

    obs = PrometheusObserver()
    app = make_app(None, overflow=TierSessionOverflow(redis_server.url))
    app.session_interface.observer = MultiObserver([obs, AuditObserver()])  # type: ignore[attr-defined]
    client = app.test_client()
    client.post("/set/6000")
    redis_server.client().flushall()  # what an eviction or a restart leaves
    caplog.set_level("INFO", logger="satchel.audit")
    first = client.get("/get")
    assert first.get_json()["rejected"] == "session_missing"
    assert "session=;" in first.headers["Set-Cookie"]  # the dead reference, deleted
    for _ in range(3):  # the browser no longer sends it
        assert client.get("/get").get_json() == {"notes": None, "rejected": None}
    samples = {
        name: obs.registry.get_sample_value(name, {"reason": "session_missing"})
        for name in ("satchel_session_refused_total", "satchel_tokens_refused_total")
    }
    assert samples == {"satchel_session_refused_total": 1, "satchel_tokens_refused_total": None}
    (record,) = [r for r in caplog.records if r.getMessage() == "session_refused"]
    assert record.levelname == "WARNING"
    assert record.satchel["reason"] == "session_missing"  # type: ignore[attr-defined]


def test_with_no_grace_a_missing_copy_keeps_the_cookie_a_concurrent_request_set(
    tmp_path: Path,
) -> None:
    """grace=0 deletes a replaced copy at once: a request still in flight with the old
    cookie finds it missing while the request that replaced it has just set the new
    cookie. Deleting the "dead" cookie there would log the user out for good."""
    app = make_app(f"sqlite:///{tmp_path / 'sessions.sqlite3'}", grace=0)
    client = app.test_client()
    old = cookie_of(client.post("/set/6000"))
    new = cookie_of(client.post("/set/6000"))  # replaced: the old copy deleted at once
    assert old != new
    client.set_cookie("session", old)  # the request that left before the new cookie
    stale = client.get("/get")
    assert stale.get_json()["rejected"] == "session_missing"
    assert "Set-Cookie" not in stale.headers  # the browser keeps the newer cookie


def test_a_forged_reference_is_counted_apart_and_its_cookie_dropped(tmp_path: Path) -> None:
    from satchel.metrics import PrometheusObserver

    obs = PrometheusObserver()
    app = make_app(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    app.session_interface.observer = obs  # type: ignore[attr-defined]
    client = app.test_client()
    value = cookie_of(client.post("/set/6000"))
    client.set_cookie("session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    assert "session=;" in client.get("/get").headers["Set-Cookie"]
    bad = obs.registry.get_sample_value(
        "satchel_session_refused_total", {"reason": "token_bad_signature"}
    )
    assert bad == 1
    assert (
        obs.registry.get_sample_value(
            "satchel_tokens_refused_total", {"reason": "token_bad_signature"}
        )
        is None
    )


def test_the_tier_holds_one_copy_per_live_session(redis_server: Any) -> None:
    app = make_app(redis_server.url, grace=30)
    client = app.test_client()
    first = cookie_of(client.post("/set/3000?permanent=1"))
    assert first.startswith(PREFIX)
    assert list(redis_ttls(redis_server)) == [tier_key(first)]

    for _ in range(5):  # reads of an unmodified session keep its copy and its cookie
        read = client.get("/get")
        assert len(read.get_json()["notes"]) == 6000
        assert "Set-Cookie" not in read.headers
    assert list(redis_ttls(redis_server)) == [tier_key(first)]

    second = cookie_of(client.post("/touch"))  # modified: a new copy, the old one retired
    ttls = redis_ttls(redis_server)
    assert set(ttls) == {tier_key(first), tier_key(second)}
    assert 0 < ttls[tier_key(first)] <= 30
    assert ttls[tier_key(second)] > LIFETIME.total_seconds() - 60
    # A request that left before the new cookie arrived still reads its session.
    client.set_cookie("session", first)
    assert len(client.get("/get").get_json()["notes"]) == 6000
    client.set_cookie("session", second)

    logout = client.post("/logout")
    assert logout.headers["Set-Cookie"].startswith("session=;")
    ttls = redis_ttls(redis_server)
    assert list(ttls) == [tier_key(first)]  # only the retiring copy, for its grace period
    assert ttls[tier_key(first)] <= 30
    client.set_cookie("session", second)  # the logged-out cookie opens nothing
    assert client.get("/get").get_json() == {"notes": None, "rejected": "session_missing"}


def test_a_session_that_shrinks_back_into_its_cookie_retires_its_copy(
    redis_server: Any,
) -> None:
    app = make_app(redis_server.url, grace=0)  # no grace: deleted as soon as replaced
    client = app.test_client()
    client.post("/set/3000")
    assert len(redis_ttls(redis_server)) == 1
    small = cookie_of(client.post("/set/10"))
    assert not small.startswith(PREFIX)
    assert redis_ttls(redis_server) == {}


def test_an_unmodified_session_is_stored_again_late_in_its_lifetime() -> None:
    # Sliding expiry (SESSION_REFRESH_EACH_REQUEST) without a tier write per request:
    # the copy is replaced once past half its lifetime, so an active user stays in.
    clock = FakeClock(T0)
    tier = MemoryTier(clock=clock)  # the tier's TTLs run on the same clock
    client = make_app(tier, clock=clock).test_client()
    first = cookie_of(client.post("/set/3000?permanent=1"))
    clock.now = T0 + LIFETIME.total_seconds() * 0.4
    assert "Set-Cookie" not in client.get("/get").headers
    clock.now = T0 + LIFETIME.total_seconds() * 0.6
    refreshed = client.get("/get")
    second = cookie_of(refreshed)
    assert second.startswith(PREFIX) and second != first
    assert len(refreshed.get_json()["notes"]) == 6000
    clock.now = T0 + LIFETIME.total_seconds() * 1.3  # past the first copy's lifetime
    assert len(client.get("/get").get_json()["notes"]) == 6000


def test_session_too_large_is_not_retried_by_the_error_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook that declines (returns None) leaves SessionTooLarge, an app's problem:
    Flask's 500, and the session saved once more for it must not call the hook again."""
    calls = []

    def declining(*args: Any) -> None:
        calls.append(args)

    app = make_app(MemoryTier(), testing=False)
    app.session_interface.overflow = declining  # type: ignore[attr-defined]
    client = app.test_client()
    with caplog.at_level(logging.ERROR):
        response = client.post("/set/3000")
    assert response.status_code == 500
    assert "Set-Cookie" not in response.headers
    assert len(calls) == 1
    assert [r for r in caplog.records if "finalizing failed" in r.getMessage()] == []


def test_a_full_tier_serves_without_the_session_and_is_tried_once() -> None:
    """A full tier was SessionTooLarge, Flask's HTML 500: now the response goes out,
    the session ended and flagged session_not_saved, and the hook is called once."""

    class CountingOverflow(TierSessionOverflow):
        calls = 0

        def __call__(self, *args: Any) -> str:
            CountingOverflow.calls += 1
            return super().__call__(*args)

    full = MemoryTier(max_bytes=1000)  # refuses the write: TierFull
    overflow = CountingOverflow(full)
    client = make_app(full, testing=False, overflow=overflow).test_client()
    response = client.post("/set/3000")
    assert response.status_code == 200
    assert response.headers["Satchel-Degraded"] == "session_not_saved"
    assert "session=;" in response.headers["Set-Cookie"]  # nothing to keep: ended
    assert CountingOverflow.calls == 1


def test_a_session_whose_token_no_request_could_open_is_refused_when_written() -> None:
    """A 60 KB session of random bytes sealed to a token over Limits.max_token_bytes
    (64 KiB): the tier stored it with a 200, the next request refused the stored token
    (token_too_large) and the whole session was gone without an error."""
    tier = MemoryTier()
    client = make_app(tier).test_client()
    with pytest.raises(SessionTooLarge, match=r"Limits\.max_token_bytes"):
        client.post("/set/50000")  # 100,000 hex characters: a ~75 KB token
    assert len(tier) == 0  # nothing stored that could not be read back


def test_a_logout_that_writes_after_clearing_deletes_the_stored_copy_at_once() -> None:
    """session.clear() then flash("logged out"): the session was not empty, so the
    previous copy was only retired for the grace period, and the pre-logout cookie
    still opened the logged-in session for ten minutes."""
    tier = MemoryTier()
    app = make_app(tier)
    client = app.test_client()
    before = cookie_of(client.post("/set/3000"))
    assert before.startswith(PREFIX)
    response = client.post("/logout?flash=1")
    assert response.status_code == 200
    assert tier.get_many([tier_key(before)]) == [None]
    replay = app.test_client()
    replay.set_cookie("session", before)
    assert replay.get("/get").get_json() == {"notes": None, "rejected": "session_missing"}


def test_an_overflowed_session_slides_when_its_token_expires_before_half_the_lifetime() -> None:
    """The refresh waited for half of PERMANENT_SESSION_LIFETIME, ignoring the token's
    own expiry: with a lifetime raised since the copy was stored (or a subclass's
    get_expiration_time giving a shorter expiry), an active user was logged out."""
    from datetime import UTC, datetime

    clock = FakeClock(T0)

    class TwoHours(SatchelSessionInterface):
        def get_expiration_time(self, app: Flask, session: Any) -> datetime:
            return datetime.fromtimestamp(clock() + 2 * 3600, UTC)

    app = make_app(MemoryTier(), clock=clock)
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(days=31)
    app.session_interface = TwoHours(overflow=app.session_interface.overflow, clock=clock)
    client = app.test_client()
    assert cookie_of(client.post("/set/3000?permanent=1")).startswith(PREFIX)
    for _ in range(10):  # a request every 30 minutes for five hours
        clock.advance(30 * 60)
        assert client.get("/get").get_json()["rejected"] is None


def test_the_overflow_hook_takes_the_tier_options_of_its_url(tmp_path: Path) -> None:
    """The docs' remedy for slow tier reads named SATCHEL_TIER_READ_TIMEOUT, which the
    hook never read: it always ran with the 50 ms default."""
    from satchel.tiers import Timeouts

    hook = TierSessionOverflow("redis://127.0.0.1:1/0", timeouts=Timeouts(read=0.75))
    assert hook.tier.tier.timeouts.read == 0.75
    with pytest.raises(TypeError):
        TierSessionOverflow(MemoryTier(), timeouts=Timeouts(read=0.75))


def test_a_streamed_reply_flagged_by_the_session_and_its_save_counts_once() -> None:
    """The session interface counted the response when its headers went out, and the
    extension counted it again when the stream's save flagged a reason of its own:
    satchel_degraded_responses_total read 2 for one response."""

    from satchel import Keyring, Satchel
    from satchel.lifecycle import LifecyclePolicy
    from satchel.metrics import PrometheusObserver
    from tests.test_overflow_history import Flaky  # a tier whose reads can be refused

    def failing_counter(text: str) -> int:
        raise ValueError("a tokenizer that refuses this text")

    tier = Flaky()
    obs = PrometheusObserver()
    app = Flask(__name__)
    app.config["SATCHEL_KEYS"] = Keyring.generate("k1")
    app.session_interface = SatchelSessionInterface(overflow=TierSessionOverflow(tier))
    policy = LifecyclePolicy(max_llm_tokens=10_000, token_counter=failing_counter)
    ext = Satchel(app, observer=obs, policy=policy)

    @app.post("/big")
    def big() -> str:
        session["notes"] = os.urandom(4000).hex()
        return "ok"

    @app.post("/stream")
    def stream() -> Any:
        session.get("notes")
        ext.context.add_turn("user", "hi")
        return ext.stream(
            iter(["a", "b"]), on_complete=lambda t: ext.context.add_turn("assistant", t)
        )

    client = app.test_client()
    assert client.post("/big").status_code == 200
    tier.refuse_reads = True
    reply = client.post("/stream")
    body = reply.get_data(as_text=True)
    assert reply.headers["Satchel-Degraded"] == "session_unavailable"
    assert "token_counter_failed" in body
    assert obs.registry.get_sample_value("satchel_degraded_responses_total") == 1


@pytest.mark.filterwarnings("ignore:The 'session' cookie is too large")  # curl sends it
def test_a_stored_copy_is_neither_a_cookie_nor_movable_to_another_reference() -> None:
    """The tier held each overflowed session as its cookie value: whoever could read
    the tier (a replica, a backup) could send it as the session cookie and be that
    user, and whoever could write it could copy the admin's value under their own
    reference's key. Copies are sealed for their key now."""
    tier = MemoryTier()
    app = make_app(tier)

    @app.post("/as/<name>")
    def login_as(name: str) -> str:
        session["user"] = name
        session["history"] = os.urandom(3000).hex()  # large: overflows
        return "ok"

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {"user": session.get("user"), "rejected": session.rejected}  # type: ignore[attr-defined]

    admin, mallory = app.test_client(), app.test_client()
    admin_ref = cookie_of(admin.post("/as/admin"))
    mallory_ref = cookie_of(mallory.post("/as/mallory"))
    stored_admin = tier.get_many([tier_key(admin_ref)])[0]
    assert stored_admin is not None
    # Read from the tier and sent as a cookie: not a session.
    thief = app.test_client()
    thief.set_cookie("session", stored_admin.decode("latin-1"))
    assert thief.get("/whoami").get_json()["user"] is None
    # Copied over the key Mallory's genuine reference names: refused, not the admin.
    tier.put(tier_key(mallory_ref), stored_admin, 600)
    assert mallory.get("/whoami").get_json() == {"user": None, "rejected": "token_malformed"}
    assert admin.get("/whoami").get_json() == {"user": "admin", "rejected": None}
