"""flask.session past the cookie limit: the sealed session overflows to a real tier."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, session

from satchel import SatchelSessionInterface
from satchel.flask_ext.session import SessionTooLarge
from satchel.flask_ext.session_overflow import PREFIX, TierSessionOverflow


def make_app(tier: Any) -> Flask:
    app = Flask(__name__)
    app.secret_key = "test secret key, long enough for the ring"
    app.config["TESTING"] = True
    app.session_interface = SatchelSessionInterface(overflow=TierSessionOverflow(tier))

    @app.post("/set/<int:size>")
    def set_value(size: int) -> str:
        session["notes"] = os.urandom(size).hex()  # random: it does not compress
        return "ok"

    @app.get("/get")
    def get_value() -> dict[str, Any]:
        return {"notes": session.get("notes")}

    return app


def cookie_of(response: Any) -> str:
    header = response.headers["Set-Cookie"]
    return header.split(";", 1)[0].split("=", 1)[1]


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
    assert client.get("/get").get_json() == {"notes": None}


def test_tier_down_refuses_the_write_loudly_and_reads_empty(redis_server: Any) -> None:
    app = make_app(redis_server.url)
    client = app.test_client()
    client.post("/set/6000")
    assert len(client.get("/get").get_json()["notes"]) == 12000
    redis_server.kill()
    assert client.get("/get").get_json() == {"notes": None}  # unreadable: empty, logged
    with pytest.raises(SessionTooLarge):
        client.post("/set/6000")  # nowhere to put it: an error, never a silent drop
