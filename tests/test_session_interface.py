"""SatchelSessionInterface: Flask's own session tests, ported, plus Satchel's additions.

The first part ports every session test of pallets/flask (tests/test_basic.py,
tests/test_testing.py, tests/test_reqctx.py, tests/test_json_tag.py values) to run
against ``SatchelSessionInterface``; the assertions are Flask's. The second part covers
what Satchel adds: the token format, key rotation and re-issue, modes, expiry, the
cookie size limit and the overflow hook, and a round trip through a real HTTP server.
"""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import random
import re
import threading
import typing as t
import uuid
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from types import SimpleNamespace

import flask
import pytest
from flask.globals import request_ctx
from flask.sessions import SecureCookieSessionInterface, SessionInterface
from markupsafe import Markup
from werkzeug.http import parse_date
from werkzeug.serving import make_server

import satchel
from satchel import serialize
from satchel.codec import Codec, peek
from satchel.errors import ConfigurationError, SatchelError
from satchel.flask_ext.session import (
    PAYLOAD_KIND,
    PAYLOAD_VERSION,
    SatchelSession,
    SatchelSessionInterface,
    SessionTooLarge,
)
from satchel.keys import Keyring, generate_key
from tests.support.clock import FakeClock

T0 = 1_900_000_000.0  # a fixed "now" for tests that move the clock


def make_app(**config: t.Any) -> flask.Flask:
    app = flask.Flask("satchel_session_test")
    app.config.update({"TESTING": True, "SECRET_KEY": "test key", **config})
    app.session_interface = SatchelSessionInterface()
    return app


@pytest.fixture
def app() -> flask.Flask:
    return make_app()


@pytest.fixture
def client(app: flask.Flask) -> flask.testing.FlaskClient:
    return app.test_client()


@pytest.fixture
def req_ctx(app: flask.Flask) -> Iterator[t.Any]:
    with app.test_request_context() as ctx:
        yield ctx


def session_cookie(client: flask.testing.FlaskClient, name: str = "session") -> str | None:
    cookie = client.get_cookie(name)
    return None if cookie is None else cookie.value


def set_cookie_value(rv: t.Any, name: str = "session") -> str:
    for header in rv.headers.getlist("Set-Cookie"):
        if header.startswith(name + "="):
            return header.split(";", 1)[0].split("=", 1)[1]
    raise AssertionError(f"no Set-Cookie for {name!r} in {rv.headers!r}")


# ======================================================================================
# Ported from pallets/flask tests/test_basic.py
# ======================================================================================


def test_session(app, client):
    @app.route("/set", methods=["POST"])
    def set():
        assert not request_ctx._session.accessed
        assert not request_ctx._session.modified
        flask.session["value"] = flask.request.form["value"]
        assert request_ctx._session.accessed
        assert request_ctx._session.modified
        return "value set"

    @app.route("/get")
    def get():
        assert not request_ctx._session.accessed
        assert not request_ctx._session.modified
        v = flask.session.get("value", "None")
        assert request_ctx._session.accessed
        assert not request_ctx._session.modified
        return v

    @app.route("/nothing")
    def nothing():
        assert not request_ctx._session.accessed
        assert not request_ctx._session.modified
        return ""

    rv = client.post("/set", data={"value": "42"})
    assert rv.data == b"value set"
    assert "cookie" in rv.vary
    assert client.get("/get").data == b"42"
    rv = client.get("/nothing")
    assert "cookie" not in rv.vary
    assert "Set-Cookie" not in rv.headers


def test_session_path(app, client):
    app.config.update(APPLICATION_ROOT="/foo")

    @app.route("/")
    def index():
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/foo")
    assert "path=/foo" in rv.headers["set-cookie"].lower()


def test_session_using_application_root(app, client):
    class PrefixPathMiddleware:
        def __init__(self, app, prefix):
            self.app = app
            self.prefix = prefix

        def __call__(self, environ, start_response):
            environ["SCRIPT_NAME"] = self.prefix
            return self.app(environ, start_response)

    app.wsgi_app = PrefixPathMiddleware(app.wsgi_app, "/bar")
    app.config.update(APPLICATION_ROOT="/bar")

    @app.route("/")
    def index():
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/")
    assert "path=/bar" in rv.headers["set-cookie"].lower()


def test_session_using_session_settings(app, client):
    app.config.update(
        SERVER_NAME="www.example.com:8080",
        APPLICATION_ROOT="/test",
        SESSION_COOKIE_DOMAIN=".example.com",
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_PARTITIONED=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
    )

    @app.route("/")
    def index():
        flask.session["testing"] = 42
        return "Hello World"

    @app.route("/clear")
    def clear():
        flask.session.pop("testing", None)
        return "Goodbye World"

    rv = client.get("/", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    # or condition for Werkzeug < 2.3
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "httponly" not in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie

    rv = client.get("/clear", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    assert "session=;" in cookie
    # or condition for Werkzeug < 2.3
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie


def test_session_using_samesite_attribute(app, client):
    @app.route("/")
    def index():
        flask.session["testing"] = 42
        return "Hello World"

    app.config.update(SESSION_COOKIE_SAMESITE="invalid")

    with pytest.raises(ValueError):
        client.get("/")

    app.config.update(SESSION_COOKIE_SAMESITE=None)
    rv = client.get("/")
    cookie = rv.headers["set-cookie"].lower()
    assert "samesite" not in cookie

    app.config.update(SESSION_COOKIE_SAMESITE="Strict")
    rv = client.get("/")
    cookie = rv.headers["set-cookie"].lower()
    assert "samesite=strict" in cookie

    app.config.update(SESSION_COOKIE_SAMESITE="Lax")
    rv = client.get("/")
    cookie = rv.headers["set-cookie"].lower()
    assert "samesite=lax" in cookie


def test_missing_session(app):
    app.secret_key = None

    def expect_exception(f, *args, **kwargs):
        with pytest.raises(RuntimeError) as e:
            f(*args, **kwargs)
        assert e.value.args and "session is unavailable" in e.value.args[0]

    with app.test_request_context():
        assert flask.session.get("missing_key") is None
        expect_exception(flask.session.__setitem__, "foo", 42)
        expect_exception(flask.session.pop, "foo")


def test_session_secret_key_fallbacks(app, client) -> None:
    @app.post("/")
    def set_session() -> str:
        flask.session["a"] = 1
        return ""

    @app.get("/")
    def get_session() -> dict[str, t.Any]:
        return dict(flask.session)

    # Set session with initial secret key, and two valid expiring keys
    app.secret_key, app.config["SECRET_KEY_FALLBACKS"] = (
        "0 key",
        ["-1 key", "-2 key"],
    )
    client.post()
    assert client.get().json == {"a": 1}
    # Change secret key, session can't be loaded and appears empty
    app.secret_key = "? key"
    assert client.get().json == {}
    # Rotate the valid keys, session can be loaded
    app.secret_key, app.config["SECRET_KEY_FALLBACKS"] = (
        "+1 key",
        ["0 key", "-1 key"],
    )
    assert client.get().json == {"a": 1}


def test_session_expiration(app, client):
    permanent = True

    @app.route("/")
    def index():
        flask.session["test"] = 42
        flask.session.permanent = permanent
        return ""

    @app.route("/test")
    def test():
        return str(flask.session.permanent)

    rv = client.get("/")
    assert "set-cookie" in rv.headers
    match = re.search(r"(?i)\bexpires=([^;]+)", rv.headers["set-cookie"])
    expires = parse_date(match.group())
    expected = datetime.now(UTC) + app.permanent_session_lifetime
    assert expires.year == expected.year
    assert expires.month == expected.month
    assert expires.day == expected.day

    rv = client.get("/test")
    assert rv.data == b"True"

    permanent = False
    rv = client.get("/")
    assert "set-cookie" in rv.headers
    match = re.search(r"\bexpires=([^;]+)", rv.headers["set-cookie"])
    assert match is None


def test_session_stored_last(app, client):
    @app.after_request
    def modify_session(response):
        flask.session["foo"] = 42
        return response

    @app.route("/")
    def dump_session_contents():
        return repr(flask.session.get("foo"))

    assert client.get("/").data == b"None"
    assert client.get("/").data == b"42"


def test_session_special_types(app, client):
    now = datetime.now(UTC).replace(microsecond=0)
    the_uuid = uuid.uuid4()

    @app.route("/")
    def dump_session_contents():
        flask.session["t"] = (1, 2, 3)
        flask.session["b"] = b"\xff"
        flask.session["m"] = Markup("<html>")
        flask.session["u"] = the_uuid
        flask.session["d"] = now
        flask.session["t_tag"] = {" t": "not-a-tuple"}
        flask.session["di_t_tag"] = {" t__": "not-a-tuple"}
        flask.session["di_tag"] = {" di": "not-a-dict"}
        return "", 204

    @app.route("/dump")
    def dump():
        return pickle.dumps(dict(flask.session))

    with client:
        client.get("/")
        s = flask.session
        assert s["t"] == (1, 2, 3)
        assert type(s["b"]) is bytes
        assert s["b"] == b"\xff"
        assert type(s["m"]) is Markup
        assert s["m"] == Markup("<html>")
        assert s["u"] == the_uuid
        assert s["d"] == now
        assert s["t_tag"] == {" t": "not-a-tuple"}
        assert s["di_t_tag"] == {" t__": "not-a-tuple"}
        assert s["di_tag"] == {" di": "not-a-dict"}

    # and the same values come back from the cookie on the next request
    rv = pickle.loads(client.get("/dump").data)
    assert rv["t"] == (1, 2, 3)
    assert type(rv["b"]) is bytes
    assert type(rv["m"]) is Markup
    assert rv["u"] == the_uuid
    assert rv["d"] == now
    assert rv["di_tag"] == {" di": "not-a-dict"}


def test_session_old_style_special_types_in_after_request(app, client):
    # The older form of test_session_special_types (Flask <= 1.x): values set in
    # after_request are stored (session is saved last) and read on the next request.
    now = datetime.now(UTC).replace(microsecond=0)
    the_uuid = uuid.uuid4()

    @app.after_request
    def modify_session(response):
        flask.session["m"] = Markup("Hello!")
        flask.session["u"] = the_uuid
        flask.session["dt"] = now
        flask.session["b"] = b"\xff"
        flask.session["t"] = (1, 2, 3)
        return response

    @app.route("/")
    def dump_session_contents():
        return pickle.dumps(dict(flask.session))

    client.get("/")
    rv = pickle.loads(client.get("/").data)
    assert rv["m"] == Markup("Hello!")
    assert type(rv["m"]) is Markup
    assert rv["dt"] == now
    assert rv["u"] == the_uuid
    assert rv["b"] == b"\xff"
    assert type(rv["b"]) is bytes
    assert rv["t"] == (1, 2, 3)


def test_session_cookie_setting(app):
    is_permanent = True

    @app.route("/bump")
    def bump():
        rv = flask.session["foo"] = flask.session.get("foo", 0) + 1
        flask.session.permanent = is_permanent
        return str(rv)

    @app.route("/read")
    def read():
        return str(flask.session.get("foo", 0))

    def run_test(expect_header):
        with app.test_client() as c:
            assert c.get("/bump").data == b"1"
            assert c.get("/bump").data == b"2"
            assert c.get("/bump").data == b"3"

            rv = c.get("/read")
            set_cookie = rv.headers.get("set-cookie")
            assert (set_cookie is not None) == expect_header
            assert rv.data == b"3"

    is_permanent = True
    app.config["SESSION_REFRESH_EACH_REQUEST"] = True
    run_test(expect_header=True)

    is_permanent = True
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    run_test(expect_header=False)

    is_permanent = False
    app.config["SESSION_REFRESH_EACH_REQUEST"] = True
    run_test(expect_header=False)

    is_permanent = False
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    run_test(expect_header=False)


def test_session_vary_cookie(app, client):
    @app.route("/set")
    def set_session():
        flask.session["test"] = "test"
        return ""

    @app.route("/get")
    def get():
        return flask.session.get("test")

    @app.route("/getitem")
    def getitem():
        return flask.session["test"]

    @app.route("/setdefault")
    def setdefault():
        return flask.session.setdefault("test", "default")

    @app.route("/clear")
    def clear():
        flask.session.clear()
        return ""

    @app.route("/vary-cookie-header-set")
    def vary_cookie_header_set():
        response = flask.Response()
        response.vary.add("Cookie")
        flask.session["test"] = "test"
        return response

    @app.route("/vary-header-set")
    def vary_header_set():
        response = flask.Response()
        response.vary.update(("Accept-Encoding", "Accept-Language"))
        flask.session["test"] = "test"
        return response

    @app.route("/no-vary-header")
    def no_vary_header():
        return ""

    def expect(path, header_value="Cookie"):
        rv = client.get(path)

        if header_value:
            # The 'Vary' key should exist in the headers only once.
            assert len(rv.headers.get_all("Vary")) == 1
            assert rv.headers["Vary"] == header_value
        else:
            assert "Vary" not in rv.headers

    expect("/set")
    expect("/get")
    expect("/getitem")
    expect("/setdefault")
    expect("/clear")
    expect("/vary-cookie-header-set")
    expect("/vary-header-set", "Accept-Encoding, Accept-Language, Cookie")
    expect("/no-vary-header", None)


def test_session_refresh_vary(app, client):
    @app.get("/login")
    def login():
        flask.session["user_id"] = 1
        flask.session.permanent = True
        return ""

    @app.get("/ignored")
    def ignored():
        return ""

    rv = client.get("/login")
    assert rv.headers["Vary"] == "Cookie"
    rv = client.get("/ignored")
    assert rv.headers["Vary"] == "Cookie"


def test_flashes(app, req_ctx):
    assert not flask.session.modified
    flask.flash("Zap")
    flask.session.modified = False
    flask.flash("Zip")
    assert flask.session.modified
    assert list(flask.get_flashed_messages()) == ["Zap", "Zip"]


def test_extended_flashing(app):
    # Be sure app.testing=True below, else tests can fail silently.
    #
    # Specifically, if app.testing is not set to True, the AssertionErrors
    # in the view functions will cause a 500 response to the test client
    # instead of propagating exceptions.

    @app.route("/")
    def index():
        flask.flash("Hello World")
        flask.flash("Hello World", "error")
        flask.flash(Markup("<em>Testing</em>"), "warning")
        return ""

    @app.route("/test/")
    def test():
        messages = flask.get_flashed_messages()
        assert list(messages) == [
            "Hello World",
            "Hello World",
            Markup("<em>Testing</em>"),
        ]
        return ""

    @app.route("/test_with_categories/")
    def test_with_categories():
        messages = flask.get_flashed_messages(with_categories=True)
        assert len(messages) == 3
        assert list(messages) == [
            ("message", "Hello World"),
            ("error", "Hello World"),
            ("warning", Markup("<em>Testing</em>")),
        ]
        return ""

    @app.route("/test_filter/")
    def test_filter():
        messages = flask.get_flashed_messages(category_filter=["message"], with_categories=True)
        assert list(messages) == [("message", "Hello World")]
        return ""

    @app.route("/test_filters/")
    def test_filters():
        messages = flask.get_flashed_messages(
            category_filter=["message", "warning"], with_categories=True
        )
        assert list(messages) == [
            ("message", "Hello World"),
            ("warning", Markup("<em>Testing</em>")),
        ]
        return ""

    @app.route("/test_filters_without_returning_categories/")
    def test_filters2():
        messages = flask.get_flashed_messages(category_filter=["message", "warning"])
        assert len(messages) == 2
        assert messages[0] == "Hello World"
        assert messages[1] == Markup("<em>Testing</em>")
        return ""

    # Create new test client on each test to clean flashed messages.

    client = app.test_client()
    client.get("/")
    client.get("/test/")

    client = app.test_client()
    client.get("/")
    client.get("/test_with_categories/")

    client = app.test_client()
    client.get("/")
    client.get("/test_filter/")

    client = app.test_client()
    client.get("/")
    client.get("/test_filters/")

    client = app.test_client()
    client.get("/")
    assert session_cookie(client)
    client.get("/test_filters_without_returning_categories/")
    # Reading the flashes consumed them: the session emptied and the cookie was deleted.
    assert session_cookie(client) is None


def test_request_processing(app, client):
    evts = []

    @app.before_request
    def before_request():
        evts.append("before")

    @app.after_request
    def after_request(response):
        response.data += b"|after"
        evts.append("after")
        return response

    @app.route("/")
    def index():
        assert "before" in evts
        assert "after" not in evts
        flask.session["seen"] = True
        return "request"

    assert "after" not in evts
    rv = client.get("/")
    assert "after" in evts
    assert rv.data == b"request|after"
    # the session is saved after the after_request functions ran
    assert session_cookie(client).startswith("s1.")


# ======================================================================================
# Ported from pallets/flask tests/test_testing.py and tests/test_reqctx.py
# ======================================================================================


def test_full_url_request_and_redirect_keep_session(app, client):
    @app.route("/", methods=["GET", "POST"])
    def index():
        if flask.request.method == "POST":
            return flask.redirect("/getsession")
        flask.session["data"] = "foo"
        return "index"

    @app.route("/getsession")
    def get_session():
        return flask.session.get("data", "<missing>")

    with client:
        rv = client.get("/getsession")
        assert rv.data == b"<missing>"

        rv = client.get("/")
        assert rv.data == b"index"
        assert flask.session.get("data") == "foo"

        rv = client.post("/", data={}, follow_redirects=True)
        assert rv.data == b"foo"
        assert flask.session.get("data") == "foo"

        rv = client.get("/getsession")
        assert rv.data == b"foo"


def test_session_transactions(app, client):
    @app.route("/")
    def index():
        return str(flask.session["foo"])

    with client:
        with client.session_transaction() as sess:
            assert isinstance(sess, SatchelSession)
            assert len(sess) == 0
            sess["foo"] = [42]
            assert len(sess) == 1
        rv = client.get("/")
        assert rv.data == b"[42]"
        with client.session_transaction() as sess:
            assert len(sess) == 1
            assert sess["foo"] == [42]


def test_session_transactions_no_null_sessions():
    app = flask.Flask(__name__)
    app.session_interface = SatchelSessionInterface()

    with app.test_client() as c:
        with pytest.raises(RuntimeError) as e:
            with c.session_transaction():
                pass
        assert "Session backend did not open a session" in str(e.value)


def test_session_transactions_keep_context(app, client, req_ctx):
    client.get("/")
    req = flask.request._get_current_object()
    assert req is not None
    with client.session_transaction():
        assert req is flask.request._get_current_object()


def test_session_transaction_needs_cookies(app):
    c = app.test_client(use_cookies=False)

    with pytest.raises(TypeError, match=r"Cookies are disabled\."):
        with c.session_transaction():
            pass


def test_session_error_pops_context():
    class SessionError(Exception):
        pass

    class FailingSessionInterface(SatchelSessionInterface):
        def open_session(self, app, request):
            raise SessionError()

    class CustomFlask(flask.Flask):
        session_interface = FailingSessionInterface()

    app = CustomFlask(__name__)
    app.secret_key = "test key"

    @app.route("/")
    def index():
        # shouldn't get here
        AssertionError()

    response = app.test_client().get("/")
    assert response.status_code == 500
    assert not flask.request
    assert not flask.current_app


def test_session_dynamic_cookie_name():
    # This session interface will use a cookie with a different name if the
    # requested url ends with the string "dynamic_cookie"
    class PathAwareSessionInterface(SatchelSessionInterface):
        def get_cookie_name(self, app):
            if flask.request.url.endswith("dynamic_cookie"):
                return "dynamic_cookie_name"
            else:
                return super().get_cookie_name(app)

    class CustomFlask(flask.Flask):
        session_interface = PathAwareSessionInterface()

    app = CustomFlask(__name__)
    app.secret_key = "secret_key"

    @app.route("/set", methods=["POST"])
    def set():
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.route("/get")
    def get():
        v = flask.session.get("value", "None")
        return v

    @app.route("/set_dynamic_cookie", methods=["POST"])
    def set_dynamic_cookie():
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.route("/get_dynamic_cookie")
    def get_dynamic_cookie():
        v = flask.session.get("value", "None")
        return v

    test_client = app.test_client()

    # first set the cookie in both /set urls but each with a different value
    assert test_client.post("/set", data={"value": "42"}).data == b"value set"
    assert test_client.post("/set_dynamic_cookie", data={"value": "616"}).data == b"value set"

    # now check that the relevant values come back - meaning that different
    # cookies are being used for the urls that end with "dynamic cookie"
    assert test_client.get("/get").data == b"42"
    assert test_client.get("/get_dynamic_cookie").data == b"616"


def test_context_copying_keeps_session(app, client):
    # tests/test_reqctx.py test_context_copying / greenlet tests, with a thread.
    @app.route("/")
    def index():
        flask.session["fizz"] = "buzz"

        @flask.copy_current_request_context
        def work():
            assert flask.request.path == "/"
            assert flask.request.args["foo"] == "bar"
            assert flask.session["fizz"] == "buzz"
            return 42

        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(work).result() == 42
        return "Hello World!"

    rv = client.get("/?foo=bar")
    assert rv.data == b"Hello World!"


# Values from tests/test_json_tag.py test_dump_load_unchanged, through the cookie.
@pytest.mark.parametrize(
    "data",
    (
        {" t": (1, 2, 3)},
        {" t__": b"a"},
        {" di": " di"},
        {"x": (1, 2, 3), "y": 4},
        (1, 2, 3),
        [(1, 2, 3)],
        b"\xff",
        Markup("<html>"),
        uuid.uuid4(),
        datetime.now(tz=UTC).replace(microsecond=0),
        "unicode \u2603",
        None,
        1.5,
        [1, {"nested": [b"x"]}],
    ),
)
def test_tagged_values_round_trip_through_cookie(app, client, data):
    @app.route("/")
    def read():
        return pickle.dumps(flask.session["value"])

    with client.session_transaction() as sess:
        sess["value"] = data

    assert pickle.loads(client.get("/").data) == data


# ======================================================================================
# Satchel additions
# ======================================================================================


def open_cookie(app: flask.Flask, value: str) -> dict[str, t.Any]:
    """Open a session cookie with the app's current codec and return the raw payload map."""
    codec = app.session_interface.get_codec(app)
    _env, payload = codec.open_payload(value)
    return serialize.unpack(payload)


def test_cookie_is_a_sealed_satchel_token_with_versioned_payload(app, client):
    @app.route("/")
    def index():
        flask.session["user"] = "marker-visible-only-when-signed"
        return ""

    rv = client.get("/")
    value = set_cookie_value(rv)
    assert value.startswith("s1.")
    header = peek(value)
    assert header.mode == "sealed"
    assert "marker" not in value
    payload = open_cookie(app, value)
    assert payload["v"] == PAYLOAD_VERSION == 1
    assert payload["k"] == PAYLOAD_KIND == "flask-session"
    assert payload["d"] == b'{"user":"marker-visible-only-when-signed"}'
    # the token's expiry is the session lifetime, permanent or not (Flask's max_age)
    lifetime = int(app.permanent_session_lifetime.total_seconds())
    assert header.expires_at - header.issued_at == lifetime


def test_signed_mode_by_config(app, client):
    app.config["SATCHEL_SESSION_MODE"] = "signed"

    @app.route("/")
    def index():
        flask.session["n"] = flask.session.get("n", 0) + 1
        return str(flask.session["n"])

    rv = client.get("/")
    assert peek(set_cookie_value(rv)).mode == "signed"
    assert client.get("/").data == b"2"


def test_bad_mode_is_a_configuration_error(app, client):
    app.config["SATCHEL_SESSION_MODE"] = "plain"
    with pytest.raises(ConfigurationError, match="SATCHEL_SESSION_MODE"):
        client.get("/")
    with pytest.raises(ConfigurationError):
        SatchelSessionInterface(mode="plain")


def test_compression_makes_repetitive_sessions_fit(app, client):
    big = "the same sentence, again and again. " * 400  # ~14 KB of text

    @app.route("/")
    def index():
        flask.session["notes"] = big
        return ""

    @app.route("/read")
    def read():
        return flask.session["notes"]

    rv = client.get("/")
    header = rv.headers["Set-Cookie"]
    assert len(header) < 1000 < len(big)
    assert peek(set_cookie_value(rv)).compressed
    assert client.get("/read").text == big


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "s1.",
        "s1.AAAA",
        "s9.AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "eyJhIjoxfQ.aGVsbG8.c2lnbmF0dXJl",  # shaped like Flask's default cookie
    ],
)
def test_unreadable_cookie_gives_new_empty_session(app, client, value):
    @app.route("/")
    def index():
        s = request_ctx._session
        return {"data": dict(s), "new": s.new, "rejected": s.rejected}

    client.set_cookie("session", value)
    rv = client.get("/")
    assert rv.json["data"] == {}
    assert rv.json["new"] is True
    assert rv.json["rejected"]
    assert "Set-Cookie" not in rv.headers  # like Flask: not modified, nothing sent


def test_tampered_cookie_is_refused(app, client):
    @app.route("/set")
    def set_():
        flask.session["role"] = "user"
        return ""

    @app.route("/")
    def index():
        return {"data": dict(flask.session), "rejected": request_ctx._session.rejected}

    for mode in ("sealed", "signed"):
        app.config["SATCHEL_SESSION_MODE"] = mode
        value = set_cookie_value(client.get("/set"))
        assert client.get("/").json["data"] == {"role": "user"}
        # flip one character in the middle of the body
        i = len(value) // 2
        tampered = value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1 :]
        client.set_cookie("session", tampered)
        rv = client.get("/").json
        assert rv["data"] == {}
        assert rv["rejected"] in ("token_bad_signature", "token_malformed")


def test_flask_default_cookie_is_not_accepted(app, client):
    default = SecureCookieSessionInterface()
    with app.test_request_context():
        value = default.get_signing_serializer(app).dumps({"admin": True})
    client.set_cookie("session", value)

    @app.route("/")
    def index():
        return dict(flask.session)

    assert client.get("/").json == {}


def test_token_of_another_purpose_or_kind_is_refused(app, client):
    ring = app.session_interface.get_keyring(app)

    @app.route("/")
    def index():
        return {"data": dict(flask.session), "rejected": request_ctx._session.rejected}

    # a token sealed with the same keys for another purpose (e.g. a chat context)
    other = Codec(ring, "sealed", purpose="satchel")
    token, _ = other.seal_payload(app.session_interface.dumps({"a": 1}))
    client.set_cookie("session", token)
    assert client.get("/").json == {"data": {}, "rejected": "token_bad_signature"}

    # right keys and purpose, wrong payload kind or version
    codec = app.session_interface.get_codec(app)
    inner = b'{"a":1}'
    for payload, code in [
        ({"v": 1, "k": "chat", "d": inner}, "token_invalid_context"),
        ({"v": 2, "k": PAYLOAD_KIND, "d": inner}, "token_unsupported_version"),
        ({"v": True, "k": PAYLOAD_KIND, "d": inner}, "token_unsupported_version"),
        ({"v": 1, "k": PAYLOAD_KIND, "d": "not bytes"}, "token_invalid_context"),
        ({"v": 1, "k": PAYLOAD_KIND, "d": b"[1, 2]"}, "token_invalid_context"),
        ({"v": 1, "k": PAYLOAD_KIND, "d": b"{not json"}, "token_invalid_context"),
        ([1, 2, 3], "token_invalid_context"),
    ]:
        token, _ = codec.seal_payload(serialize.pack(payload))
        client.set_cookie("session", token)
        assert client.get("/").json == {"data": {}, "rejected": code}, payload

    token, _ = codec.seal_payload(serialize.pack({"v": 1, "k": PAYLOAD_KIND, "d": inner}))
    client.set_cookie("session", token)
    assert client.get("/").json == {"data": {"a": 1}, "rejected": None}


def test_purpose_config_scopes_cookies(app, client):
    @app.route("/set")
    def set_():
        flask.session["a"] = 1
        return ""

    @app.route("/")
    def index():
        return dict(flask.session)

    client.get("/set")
    assert client.get("/").json == {"a": 1}
    app.config["SATCHEL_SESSION_PURPOSE"] = "another-app"
    assert client.get("/").json == {}


def test_expiry_is_enforced_from_the_envelope():
    clock = FakeClock(T0)
    # no refresh, so reading the session does not re-seal it with a later expiry
    app = make_app(
        PERMANENT_SESSION_LIFETIME=timedelta(hours=1), SESSION_REFRESH_EACH_REQUEST=False
    )
    app.session_interface = SatchelSessionInterface(clock=clock)
    client = app.test_client()

    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        flask.session.permanent = flask.request.args.get("permanent") == "1"
        return ""

    @app.route("/")
    def index():
        return {"data": dict(flask.session), "rejected": request_ctx._session.rejected}

    for permanent in ("1", "0"):
        clock.now = T0
        rv = client.get(f"/login?permanent={permanent}")
        header = peek(set_cookie_value(rv))
        assert header.issued_at == int(T0)
        assert header.expires_at == int(T0) + 3600
        if permanent == "1":
            match = re.search(r"Expires=([^;]+)", rv.headers["Set-Cookie"])
            assert parse_date(match.group(1)).timestamp() == header.expires_at
        else:
            assert "Expires" not in rv.headers["Set-Cookie"]
        clock.now = T0 + 3600 - 1
        assert client.get("/").json["data"]["user"] == "ada"
        clock.now = T0 + 3600 + 31  # past expiry plus the 30 s clock-skew allowance
        assert client.get("/").json == {"data": {}, "rejected": "token_expired"}


def app_with_login(user: str) -> tuple[flask.Flask, FakeClock]:
    """An app on a fake clock whose ``/login`` stores ``user`` in the session."""
    clock = FakeClock(T0)
    app = make_app()
    app.session_interface = SatchelSessionInterface(clock=clock)

    @app.route("/login")
    def login():
        flask.session["user"] = user
        return ""

    return app, clock


def test_lowered_lifetime_applies_to_existing_cookies():
    app, clock = app_with_login("ada")
    client = app.test_client()

    @app.route("/")
    def index():
        return {"data": dict(flask.session), "rejected": request_ctx._session.rejected}

    client.get("/login")
    clock.now = T0 + 7200
    assert client.get("/").json["data"] == {"user": "ada"}
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(hours=1)
    assert client.get("/").json == {"data": {}, "rejected": "token_expired"}


def test_permanent_refresh_extends_expiry():
    clock = FakeClock(T0)
    app = make_app(PERMANENT_SESSION_LIFETIME=timedelta(hours=1))
    app.session_interface = SatchelSessionInterface(clock=clock)
    client = app.test_client()

    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        flask.session.permanent = True
        return ""

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    client.get("/login")
    clock.now = T0 + 3000
    rv = client.get("/")  # SESSION_REFRESH_EACH_REQUEST: re-sealed with a new expiry
    assert peek(set_cookie_value(rv)).expires_at == int(T0) + 3000 + 3600
    clock.now = T0 + 6000
    assert client.get("/").text == "ada"


def test_secret_key_rotation_reissues_unmodified_session(app, client):
    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        return ""

    @app.route("/")
    def index():
        return {"user": flask.session.get("user"), "kid": request_ctx._session.kid}

    client.get("/login")
    old_kid = peek(session_cookie(client)).kid

    # no rotation: an unmodified, non-permanent session sends no cookie
    rv = client.get("/")
    assert "Set-Cookie" not in rv.headers

    app.config.update(SECRET_KEY="new test key", SECRET_KEY_FALLBACKS=["test key"])
    rv = client.get("/")
    assert rv.json == {"user": "ada", "kid": old_kid}
    new_value = set_cookie_value(rv)
    new_kid = peek(new_value).kid
    assert new_kid != old_kid
    assert "Vary" in rv.headers

    # the re-issued cookie opens without the fallback: nobody was logged out
    app.config["SECRET_KEY_FALLBACKS"] = []
    rv = client.get("/")
    assert rv.json == {"user": "ada", "kid": new_kid}
    assert "Set-Cookie" not in rv.headers


def test_reissue_keeps_the_original_expiry():
    clock = FakeClock(T0)
    app = make_app(SESSION_REFRESH_EACH_REQUEST=False)
    app.session_interface = SatchelSessionInterface(clock=clock)
    client = app.test_client()

    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        flask.session.permanent = True
        return ""

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    first = peek(set_cookie_value(client.get("/login")))
    clock.now = T0 + 86400
    app.config.update(SECRET_KEY="new test key", SECRET_KEY_FALLBACKS=["test key"])
    rv = client.get("/")
    second = peek(set_cookie_value(rv))
    assert second.kid != first.kid
    assert second.expires_at == first.expires_at
    match = re.search(r"Expires=([^;]+)", rv.headers["Set-Cookie"])
    assert parse_date(match.group(1)).timestamp() == first.expires_at


def test_reissue_keeps_the_sessions_age_for_a_lowered_lifetime():
    """Re-issued under a new key on day 5, a session written on day 0 was measured from
    day 5: on day 20, with the lifetime lowered to 16 days, it was still accepted."""
    app, clock = app_with_login("alice")
    client = app.test_client()

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    first = peek(set_cookie_value(client.get("/login")))
    clock.now = T0 + 5 * 86400
    app.config.update(SECRET_KEY="new test key", SECRET_KEY_FALLBACKS=["test key"])
    rv = client.get("/")
    assert rv.get_data(as_text=True) == "alice"
    second = peek(set_cookie_value(rv))
    assert second.kid != first.kid and second.issued_at == first.issued_at
    clock.now = T0 + 20 * 86400
    app.permanent_session_lifetime = timedelta(days=16)
    assert client.get("/").get_data(as_text=True) == "-"  # 20 days old: expired


def test_codec_is_cached_per_secrets(app):
    iface = app.session_interface
    a = iface.get_codec(app)
    assert iface.get_codec(app) is a
    app.config["SECRET_KEY_FALLBACKS"] = ["older key"]
    b = iface.get_codec(app)
    assert b is not a
    assert b.keyring.current.kid == a.keyring.current.kid
    assert len(b.keyring) == 2
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert iface.get_codec(app) is a
    app.config["SATCHEL_SESSION_MODE"] = "signed"
    assert iface.get_codec(app).mode == "signed"


def test_satchel_keys_config_wins_over_secret_key(app, client):
    k1, k2 = generate_key("k1"), generate_key("k2")
    app.config["SATCHEL_KEYS"] = Keyring([k1]).to_string()

    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        return ""

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    client.get("/login")
    assert peek(session_cookie(client)).kid == "k1"
    # rotate: k2 seals, k1 still opens; the cookie is re-issued under k2
    app.config["SATCHEL_KEYS"] = Keyring([k2, k1]).to_string()
    rv = client.get("/")
    assert rv.text == "ada"
    assert peek(set_cookie_value(rv)).kid == "k2"
    app.config["SATCHEL_KEYS"] = Keyring([k2])  # a Keyring object works too
    assert client.get("/").text == "ada"
    # the secret key alone cannot open a SATCHEL_KEYS cookie
    del app.config["SATCHEL_KEYS"]
    assert client.get("/").text == "-"


def test_bad_satchel_keys_is_a_configuration_error(app, client):
    app.config["SATCHEL_KEYS"] = "no-colon-here"
    with pytest.raises(ConfigurationError):
        client.get("/")
    app.config["SATCHEL_KEYS"] = 12345
    with pytest.raises(ConfigurationError):
        client.get("/")


def test_extension_keyring_is_used_and_read_per_request(app, client):
    ext = SimpleNamespace(keyring=Keyring([generate_key("ext1")]))
    app.extensions["satchel"] = ext
    app.config["SATCHEL_KEYS"] = Keyring([generate_key("cfg")]).to_string()

    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        return ""

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    client.get("/login")
    assert peek(session_cookie(client)).kid == "ext1"
    ext.keyring = ext.keyring.rotated(generate_key("ext2"))
    rv = client.get("/")
    assert rv.text == "ada"
    assert peek(set_cookie_value(rv)).kid == "ext2"

    ext.keyring = "not a keyring"
    with pytest.raises(ConfigurationError):
        client.get("/")

    # an extension without a keyring attribute falls through to SATCHEL_KEYS
    app.extensions["satchel"] = SimpleNamespace()
    assert client.get("/").text == "-"


def test_extension_state_with_codec_keyring_is_used(app, client):
    # The Satchel extension's app state exposes its ring as ``.codec.keyring``.
    ring = Keyring([generate_key("chat1")])
    app.extensions["satchel"] = SimpleNamespace(codec=SimpleNamespace(keyring=ring))

    @app.route("/")
    def index():
        flask.session["a"] = 1
        return ""

    assert peek(set_cookie_value(client.get("/"))).kid == "chat1"


def test_real_satchel_extension_shares_keys_not_tokens(app, client):
    from satchel.flask_ext import Satchel

    app.config["SATCHEL_KEYS"] = Keyring([generate_key("kx")]).to_string()
    Satchel(app)

    @app.route("/s")
    def set_():
        flask.session["a"] = 1
        return ""

    value = set_cookie_value(client.get("/s"))
    assert peek(value).kid == "kx"
    # same keys, different purpose: the chat codec refuses a session cookie
    with pytest.raises(SatchelError):
        app.extensions["satchel"].codec.open(value)


def test_mode_switch_accepts_and_reissues(app, client):
    @app.route("/login")
    def login():
        flask.session["user"] = "ada"
        return ""

    @app.route("/")
    def index():
        return flask.session.get("user", "-")

    client.get("/login")
    assert peek(session_cookie(client)).mode == "sealed"
    app.config["SATCHEL_SESSION_MODE"] = "signed"
    rv = client.get("/")
    assert rv.text == "ada"
    assert peek(set_cookie_value(rv)).mode == "signed"
    app.config["SATCHEL_SESSION_MODE"] = "sealed"
    rv = client.get("/")
    assert rv.text == "ada"
    assert peek(set_cookie_value(rv)).mode == "sealed"


def test_pad_to_setting_rounds_the_cookie_and_old_cookies_still_open(app, client):
    from satchel import envelope

    @app.route("/set/<int:n>")
    def set_n(n):
        flask.session["blob"] = "x" * n
        return ""

    @app.route("/")
    def index():
        return str(len(flask.session.get("blob", "")))

    client.get("/set/10")
    unpadded = session_cookie(client)
    assert not peek(unpadded).padded
    app.config["SATCHEL_SESSION_PAD_TO"] = "256"
    for n in (1, 300, 2000):
        client.get(f"/set/{n}")
        cookie = session_cookie(client)
        assert peek(cookie).padded and len(envelope.parse(cookie).raw) % 256 == 0
        assert client.get("/").text == str(n)
    app.config["SATCHEL_SESSION_PAD_TO"] = None  # turning it off logs no one out
    assert client.get("/").text == "2000"
    app.config["SATCHEL_SESSION_PAD_TO"] = 3
    with pytest.raises(ConfigurationError, match="SATCHEL_SESSION_PAD_TO"):
        client.get("/")
    # One bucket of 4096 is a 5,465-byte cookie: no session could ever be stored.
    app.config["SATCHEL_SESSION_PAD_TO"] = 4096
    with pytest.raises(ConfigurationError, match="at most 3061"):
        client.get("/")


def test_cookie_name_setting(app, client):
    app.config["SESSION_COOKIE_NAME"] = "__Host-sid"
    app.config["SESSION_COOKIE_SECURE"] = True

    @app.route("/")
    def index():
        flask.session["a"] = 1
        return ""

    @app.route("/read")
    def read():
        return dict(flask.session)

    rv = client.get("/", "https://localhost/")
    assert rv.headers["Set-Cookie"].startswith("__Host-sid=s1.")
    assert session_cookie(client, "__Host-sid")
    assert session_cookie(client) is None
    assert client.get("/read", "https://localhost/").json == {"a": 1}


def test_httponly_default_and_no_domain_by_default(app, client):
    @app.route("/")
    def index():
        flask.session["a"] = 1
        return ""

    cookie = client.get("/").headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "Domain" not in cookie
    assert "Path=/" in cookie


def test_session_too_large_raises(app, client):
    import os

    @app.route("/")
    def index():
        # random bytes do not compress: ~6 KB of base64 text
        flask.session["blob"] = os.urandom(4500)
        return ""

    with pytest.raises(SessionTooLarge) as info:
        client.get("/")
    err = info.value
    assert isinstance(err, SatchelError)
    assert err.code == "session_too_large"
    assert err.status == 500
    assert err.facts["limit"] == 4093
    assert err.facts["size"] > 4093
    assert str(err.facts["size"]) in err.message
    assert "4093" in err.message
    assert session_cookie(client) is None

    # without TESTING the app answers 500 and sends no cookie
    app.testing = False
    rv = client.get("/")
    assert rv.status_code == 500
    assert "Set-Cookie" not in rv.headers

    # MAX_COOKIE_SIZE is the limit; 0 turns the check off like Werkzeug's warning
    app.testing = True
    app.config["MAX_COOKIE_SIZE"] = 0
    assert client.get("/").status_code == 200
    assert session_cookie(client)


@pytest.mark.parametrize("change", ["rotation", "signed mode", "refresh"])
def test_an_unchanged_session_that_no_longer_fits_keeps_its_cookie(change, caplog):
    """A cookie near the limit that must be re-issued for a reason no view caused (a new
    key with a longer id, the other mode, a permanent session's refresh with one more
    attribute) can come out over MAX_COOKIE_SIZE. Raising failed every request of that
    browser, 404s included, since the client keeps the cookie and each request
    re-issued it. The client now keeps the cookie it has (it still opens), with a
    warning; a view that changes the session still gets SessionTooLarge."""
    app = make_app(SATCHEL_KEYS="k1:" + "A" * 43)
    client = app.test_client()
    blob = [b""]

    @app.post("/grow/<int:n>")
    def grow(n: int) -> str:
        flask.session.permanent = change == "refresh"
        # The same bytes for the same n (no randomness in the cookie's length), and
        # incompressible: the cookie's length follows n.
        flask.session["blob"] = random.Random(n).randbytes(n)
        return ""

    @app.get("/read")
    def read() -> str:
        blob[0] = flask.session.get("blob", b"")
        return ""

    # The largest session whose cookie still fits, found by growing it.
    size = 2000
    for step in (64, 1):
        while size < 4000:
            try:
                client.post(f"/grow/{size + step}")
            except SessionTooLarge:
                break
            size += step
    assert client.post(f"/grow/{size}").status_code == 200
    kept = session_cookie(client)
    assert kept
    if change == "rotation":
        app.config["SATCHEL_KEYS"] = "rotated-key-0016:" + "B" * 43 + ",k1:" + "A" * 43
    elif change == "signed mode":
        app.config["SATCHEL_SESSION_MODE"] = "signed"
    else:
        app.config["SESSION_COOKIE_SAMESITE"] = "Strict"  # a longer header on refresh
    with caplog.at_level(logging.WARNING, logger="satchel"):
        rv = client.get("/read")
        assert rv.status_code == 200
        assert client.get("/missing").status_code == 404
    assert "Set-Cookie" not in rv.headers
    assert session_cookie(client) == kept and len(blob[0]) == size  # still opens
    assert any("re-issuing the unchanged session" in r.getMessage() for r in caplog.records)
    with pytest.raises(SessionTooLarge):  # a view that writes still learns it
        client.post(f"/grow/{size}")


def test_a_session_changed_in_place_that_no_longer_fits_still_raises():
    """``session["items"].append(...)`` sets no ``modified``; a permanent session's
    refresh saves it anyway, as Flask's own interface does. When that no longer fits,
    it is a change, not a re-issue: SessionTooLarge, not a silently kept old cookie."""
    app = make_app(SATCHEL_KEYS="k1:" + "A" * 43)
    client = app.test_client()

    @app.post("/start/<int:n>")
    def start(n: int) -> str:
        flask.session.permanent = True
        flask.session["items"] = [random.Random(n).randbytes(n)]
        return ""

    @app.post("/append")
    def append() -> str:
        flask.session["items"].append(random.Random(0).randbytes(300))  # in place
        return ""

    size = 1000
    while size < 4000:  # the largest start that fits, to 64 bytes
        try:
            client.post(f"/start/{size + 64}")
        except SessionTooLarge:
            break
        size += 64
    assert client.post(f"/start/{size}").status_code == 200
    with pytest.raises(SessionTooLarge):
        client.post("/append")


def test_session_just_under_the_limit_is_sent(app, client):
    import os

    blob = os.urandom(2000)

    @app.route("/")
    def index():
        flask.session["blob"] = blob
        return ""

    rv = client.get("/")
    assert len(rv.headers["Set-Cookie"]) <= 4093
    app.config["MAX_COOKIE_SIZE"] = len(rv.headers["Set-Cookie"]) - 1
    with pytest.raises(SessionTooLarge):
        client.get("/")


def add_big_route(app: flask.Flask) -> None:
    """``/big`` stores 4,500 random bytes: a session past what a cookie holds."""

    @app.route("/big")
    def big() -> str:
        flask.session["blob"] = os.urandom(4500)
        return ""


def test_overflow_hook(app, client):
    store: dict[str, str] = {}
    calls: list[tuple[int, int]] = []

    class Overflow:
        def __call__(self, app_, session, value, size, limit):
            assert app_ is app
            assert isinstance(session, SatchelSession)
            calls.append((size, limit))
            ref = f"ref-{len(store)}"
            store[ref] = value
            return ref

        def resolve(self, app_, value):
            return store.get(value)

    app.session_interface.overflow = Overflow()

    add_big_route(app)

    @app.route("/")
    def index():
        return str(len(flask.session.get("blob", b"")))

    rv = client.get("/big")
    assert set_cookie_value(rv) == "ref-0"
    assert calls and calls[0][0] > calls[0][1] == 4093
    assert client.get("/").text == "4500"

    # a hook that declines (None) leads to SessionTooLarge
    app.session_interface.overflow = lambda *args: None
    with pytest.raises(SessionTooLarge):
        client.get("/big")
    # a hook whose replacement is still too large is refused too
    app.session_interface.overflow = lambda *args: "x" * 5000
    with pytest.raises(SessionTooLarge, match="overflow"):
        client.get("/big")


def test_overflow_hook_retires_replaced_and_cleared_references(app, client):
    store: dict[str, str] = {}
    retired: list[tuple[str, bool]] = []

    class Overflow:
        issued = 0

        def __call__(self, app_, session, value, size, limit):
            ref = f"ref-{self.issued}"
            self.issued += 1
            store[ref] = value
            return ref

        def resolve(self, app_, value):
            if value == "ref-down":
                raise satchel.errors.TierUnavailable("the tier is down")
            return store.get(value)

        def retire(self, app_, value, *, at_once):
            retired.append((value, at_once))
            store.pop(value, None)

    app.session_interface.overflow = Overflow()

    add_big_route(app)

    @app.route("/small")
    def small():
        flask.session["blob"] = b"x"
        return ""

    @app.route("/clear")
    def clear():
        flask.session.clear()
        return ""

    @app.route("/")
    def index():
        s = request_ctx._session
        return {"size": len(s.get("blob", b"")), "rejected": s.rejected}

    assert set_cookie_value(client.get("/big")) == "ref-0"
    assert "Set-Cookie" not in client.get("/").headers  # unmodified: nothing rewritten
    assert retired == []
    assert set_cookie_value(client.get("/big")) == "ref-1"
    assert retired == [("ref-0", False)]  # replaced: retired, with the hook's grace
    client.get("/small")  # back into a plain cookie: the stored copy is retired too
    assert retired[-1] == ("ref-1", False)
    assert set_cookie_value(client.get("/big")) == "ref-2"
    client.get("/clear")  # logout: dropped at once
    assert retired[-1] == ("ref-2", True) and store == {}

    # resolve() raising a SatchelError: an empty session whose rejected is that code
    client.set_cookie("session", "ref-down")
    assert client.get("/").json == {"size": 0, "rejected": "tier_unavailable"}


def test_no_keys_at_all_gives_null_session_and_refuses_writes(app, client):
    app.secret_key = None

    @app.route("/read")
    def read():
        return repr(flask.session.get("x"))

    @app.route("/write")
    def write():
        flask.session["x"] = 1
        return ""

    assert client.get("/read").text == "None"
    with pytest.raises(RuntimeError, match="session is unavailable"):
        client.get("/write")


def test_save_without_keys_is_a_configuration_error(app):
    iface = app.session_interface
    with app.test_request_context():
        session = SatchelSession({"a": 1})
        session.modified = True
        app.secret_key = None
        with pytest.raises(ConfigurationError):
            iface.save_session(app, session, app.response_class())


def test_unmodified_empty_session_sends_nothing_and_clear_deletes(app, client):
    @app.route("/set")
    def set_():
        flask.session["a"] = 1
        return ""

    @app.route("/clear")
    def clear():
        flask.session.clear()
        return ""

    @app.route("/read")
    def read():
        return dict(flask.session)

    assert "Set-Cookie" not in client.get("/read").headers
    client.get("/set")
    assert session_cookie(client)
    rv = client.get("/clear")
    assert "session=;" in rv.headers["Set-Cookie"]
    assert "Expires=Thu, 01 Jan 1970" in rv.headers["Set-Cookie"]
    assert session_cookie(client) is None


def test_lazy_import_from_package():
    assert satchel.SatchelSessionInterface is SatchelSessionInterface


def test_flask_default_interface_is_a_session_interface():
    assert isinstance(SatchelSessionInterface(), SessionInterface)


# --------------------------------------------------------------------------------------
# Through a real HTTP server
# --------------------------------------------------------------------------------------


@pytest.fixture
def live_app() -> Iterator[tuple[flask.Flask, int]]:
    app = make_app(TESTING=False)

    @app.post("/login")
    def login():
        flask.session["user"] = flask.request.form["user"]
        flask.session.permanent = True
        return "ok"

    @app.get("/me")
    def me():
        return flask.session.get("user", "anonymous")

    @app.post("/logout")
    def logout():
        flask.session.clear()
        return "bye"

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _http(port: int, method: str, path: str, *, cookie: str | None = None, body: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {}
        if cookie:
            headers["Cookie"] = cookie
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def test_over_real_http(live_app):
    app, port = live_app
    status, headers, body = _http(port, "GET", "/me")
    assert (status, body) == (200, b"anonymous")
    assert not [v for k, v in headers if k.lower() == "set-cookie"]

    status, headers, body = _http(port, "POST", "/login", body="user=ada")
    assert (status, body) == (200, b"ok")
    set_cookies = [v for k, v in headers if k.lower() == "set-cookie"]
    assert len(set_cookies) == 1
    assert "HttpOnly" in set_cookies[0] and "Expires=" in set_cookies[0]
    jar = SimpleCookie()
    jar.load(set_cookies[0])
    token = jar["session"].value
    assert peek(token).mode == "sealed"
    assert "ada" not in token
    assert dict(headers).get("Vary") == "Cookie"

    status, headers, body = _http(port, "GET", "/me", cookie=f"session={token}")
    assert (status, body) == (200, b"ada")

    # rotate the secret key while the server runs: the next response re-issues
    app.config.update(SECRET_KEY="rotated key", SECRET_KEY_FALLBACKS=["test key"])
    status, headers, body = _http(port, "GET", "/me", cookie=f"session={token}")
    assert body == b"ada"
    jar = SimpleCookie()
    jar.load(next(v for k, v in headers if k.lower() == "set-cookie"))
    rotated = jar["session"].value
    assert peek(rotated).kid != peek(token).kid
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert _http(port, "GET", "/me", cookie=f"session={rotated}")[2] == b"ada"
    assert _http(port, "GET", "/me", cookie=f"session={token}")[2] == b"anonymous"

    # tampered cookie: anonymous, not an error
    bad = rotated[:-2] + ("AA" if not rotated.endswith("AA") else "BB")
    assert _http(port, "GET", "/me", cookie=f"session={bad}")[:3:2] == (200, b"anonymous")

    status, headers, body = _http(port, "POST", "/logout", cookie=f"session={rotated}")
    assert body == b"bye"
    deleted = next(v for k, v in headers if k.lower() == "set-cookie")
    assert deleted.startswith("session=;")


def test_a_bad_pad_setting_is_one_clear_500_not_two_tracebacks(caplog) -> None:
    """The setting is read when a request opens the session: a bucket that can never fit
    is a ConfigurationError there, and Flask's finalizing (save_session with no
    session) must not add an AttributeError to it."""
    app = make_app(TESTING=False, SATCHEL_SESSION_PAD_TO=3062)

    @app.get("/")
    def index() -> str:
        return "ok"

    caplog.set_level("ERROR")
    response = app.test_client().get("/")
    assert response.status_code == 500
    logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert "ConfigurationError" in logged
    assert "AttributeError" not in logged and "finalizing" not in logged


def test_a_session_too_large_to_open_again_is_refused_when_saved() -> None:
    """A compressible 600 KB value sealed into a 167-byte cookie that the next request
    refused (the JSON is one msgpack bin, capped at 512 KiB): the session was dropped
    without a word. Saving now raises SessionTooLarge, as for a cookie over 4 KB."""
    app = flask.Flask(__name__)
    app.secret_key = "k" * 16
    app.testing = True
    app.session_interface = SatchelSessionInterface()

    @app.get("/w")
    def write() -> str:
        flask.session["big"] = "a" * 600_000
        return "ok"

    client = app.test_client()
    with pytest.raises(SessionTooLarge) as info:
        client.get("/w")
    assert "Limits.max_str_bytes" in info.value.message
    assert session_cookie(client) is None


def test_a_session_at_the_open_limit_still_saves_and_opens() -> None:
    """The check measured the whole payload (27 bytes more than the JSON bin the limit
    is for): sessions that open fine were refused at the boundary."""
    app = flask.Flask(__name__)
    app.secret_key = "k" * 16
    app.session_interface = SatchelSessionInterface()

    @app.get("/w")
    def write() -> str:
        flask.session["a"] = "x" * 524_280  # the JSON: exactly 512 KiB
        return "ok"

    @app.get("/r")
    def read() -> str:
        return str(len(flask.session.get("a", "")))

    client = app.test_client()
    assert client.get("/w").status_code == 200
    assert client.get("/r").text == "524280"


@pytest.mark.parametrize(
    "inner",
    [
        b'{"x": {" di": {}}}',  # Flask's TagDict raises StopIteration on an empty tag map
        b"[" * 5000 + b"]" * 5000,  # json.loads recurses past Python's limit
    ],
)
def test_session_data_the_tagged_serializer_chokes_on_is_an_empty_session(inner):
    """A cookie with the app's own key (an insider, or an older release) whose data
    Flask's serializer cannot read: an empty session with ``rejected`` set, as for any
    unreadable cookie, not a 500 on every request of that browser."""
    from satchel import serialize as satchel_serialize

    app = make_app()
    seen: list[t.Any] = []

    @app.route("/")
    def index():
        seen.append((dict(flask.session), getattr(flask.session, "rejected", None)))
        return ""

    interface = app.session_interface
    with app.test_request_context():
        codec = interface.get_codec(app)
    payload = satchel_serialize.pack({"v": 1, "k": "flask-session", "d": inner})
    cookie, _raw = codec.seal_payload(payload)
    client = app.test_client()
    client.set_cookie("session", cookie)
    assert client.get("/").status_code == 200
    assert seen == [({}, "token_invalid_context")]


def _clocked_app(interface_class: type[SatchelSessionInterface] = SatchelSessionInterface):
    now = [1_800_000_000.0]
    app = flask.Flask(__name__)
    app.config.update(SECRET_KEY="test key", TESTING=True)
    app.session_interface = interface_class(clock=lambda: now[0])

    @app.route("/set")
    def set_() -> str:
        flask.session["a"] = 1
        flask.session.permanent = True
        return ""

    @app.route("/get")
    def get() -> t.Any:
        return {"session": dict(flask.session), "rejected": flask.session.rejected}

    return app, now


@pytest.mark.parametrize(("ahead", "opens"), [(29, True), (31, False), (40 * 86400, False)])
def test_a_session_issued_in_the_future_opens_only_within_the_clock_skew(
    ahead: int, opens: bool
) -> None:
    """A cookie from a server whose clock ran 40 days ahead opened, and stayed valid
    for those 40 days on top of its lifetime. Flask's signer refuses a negative age."""
    app, now = _clocked_app()
    client = app.test_client()
    client.get("/set")
    now[0] -= ahead
    body = client.get("/get").get_json()
    if opens:
        assert body == {"session": {"_permanent": True, "a": 1}, "rejected": None}
    else:
        assert body == {"session": {}, "rejected": "token_expired"}


_NEW_YEAR = datetime(2030, 1, 1, tzinfo=UTC)


class _BrowserSessionOnly:  # "permanent, but a browser-session cookie"
    def get_expiration_time(self, app: flask.Flask, session: t.Any) -> datetime | None:
        return None


class _RememberMe:  # an expiry chosen from the session, permanent or not
    def get_expiration_time(self, app: flask.Flask, session: t.Any) -> datetime | None:
        return _NEW_YEAR if session.get("remember") else None


@pytest.mark.parametrize("hook", [_BrowserSessionOnly, _RememberMe], ids=lambda c: c.__name__)
@pytest.mark.parametrize("permanent", [True, False])
def test_the_expiration_hook_decides_the_cookie_as_flasks_does(hook: type, permanent: bool) -> None:
    """Flask asks get_expiration_time for every session and sets what it returns: None
    is a browser-session cookie, a date is Expires, permanent or not. Satchel asked it
    only for permanent sessions, and ignored None: a permanent session kept now +
    lifetime, and a "remember me" on a session that was not permanent got no Expires."""

    def expires(base: type[SessionInterface]) -> str | None:
        app = flask.Flask(__name__)
        app.config.update(SECRET_KEY="test key", TESTING=True)
        app.session_interface = type("Hooked", (hook, base), {})()

        @app.route("/set")
        def set_() -> str:
            flask.session.update(x=1, remember=True)
            flask.session.permanent = permanent
            return ""

        cookie = app.test_client().get("/set").headers["Set-Cookie"]
        match = re.search(r"Expires=([^;]+)", cookie)
        return match.group(1) if match else None

    flasks = expires(SecureCookieSessionInterface)
    assert expires(SatchelSessionInterface) == flasks
    assert flasks == (None if hook is _BrowserSessionOnly else "Tue, 01 Jan 2030 00:00:00 GMT")


def test_a_subclass_choosing_the_expiration_time_is_honoured() -> None:
    """get_expiration_time is Flask's documented hook ("remember me until..."); the
    cookie said now + lifetime whatever a subclass returned."""
    fixed = datetime(2030, 1, 1, tzinfo=UTC)

    class UntilNewYear(SatchelSessionInterface):
        def get_expiration_time(self, app: flask.Flask, session: t.Any) -> datetime | None:
            return fixed if session.permanent else None

    app, _ = _clocked_app(UntilNewYear)
    client = app.test_client()
    cookie = client.get("/set").headers["Set-Cookie"]
    assert "Expires=Tue, 01 Jan 2030 00:00:00 GMT" in cookie
    token = cookie.split("=", 1)[1].split(";")[0]
    assert peek(token).expires_at == int(fixed.timestamp())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SATCHEL_KEYS": "k1:short"}, "^SATCHEL_KEYS: "),
        ({"SATCHEL_SESSION_MODE": "SIGNED"}, "^SATCHEL_SESSION_MODE must be"),
        ({"SATCHEL_SESSION_PURPOSE": 123}, "^SATCHEL_SESSION_PURPOSE must be"),
    ],
)
def test_session_settings_are_checked_by_check_and_by_the_extension(
    config: dict[str, t.Any], message: str
) -> None:
    """Read per request, a bad setting made every request that touches flask.session a
    500 (a bare ValueError for the purpose). check(app) finds it where the app is built,
    and Satchel.init_app calls it for an installed SatchelSessionInterface."""
    from satchel.flask_ext import Satchel

    app = flask.Flask(__name__)
    app.secret_key = "a secret key of some length"
    app.config.update(config)
    app.session_interface = SatchelSessionInterface()
    with pytest.raises(ConfigurationError, match=message):
        app.session_interface.check(app)
    app.config.setdefault("SATCHEL_KEYS", satchel.Keyring.generate().to_string())
    with pytest.raises(ConfigurationError, match=message):
        Satchel(app)


def test_an_empty_session_pad_to_is_off_as_satchel_pad_to_is() -> None:
    app = flask.Flask(__name__)
    app.secret_key = "a secret key of some length"
    for off in ("", "none", " None "):
        app.config["SATCHEL_SESSION_PAD_TO"] = off
        assert SatchelSessionInterface().get_pad_to(app) is None


@pytest.fixture
def tokyo_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time nine hours ahead of UTC, as on a server in Tokyo."""
    import time as time_module

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time_module.tzset()
    yield
    monkeypatch.undo()
    time_module.tzset()


def test_a_naive_expiration_time_is_utc_as_werkzeug_reads_it(tokyo_time: None) -> None:
    """A subclass returning a naive datetime (datetime.utcnow() + delta, Flask's own style
    before 2.3) had it read as local time: east of UTC the token was sealed expired
    already and the session was lost on the next request without a word. Werkzeug's
    dump_cookie reads a naive datetime as UTC; so does the token's expiry now."""
    naive = datetime(2030, 1, 1)

    class UntilNewYear(SatchelSessionInterface):
        def get_expiration_time(self, app: flask.Flask, session: t.Any) -> datetime | None:
            return naive

    app, _ = _clocked_app(UntilNewYear)
    cookie = app.test_client().get("/set").headers["Set-Cookie"]
    assert "Expires=Tue, 01 Jan 2030 00:00:00 GMT" in cookie
    token = cookie.split("=", 1)[1].split(";")[0]
    assert peek(token).expires_at == int(naive.replace(tzinfo=UTC).timestamp())


def _login_opens_after_rotation(old_key: t.Any, **new_config: t.Any) -> str:
    """Log in under ``old_key``, rotate to ``new_config``, and say who the new app sees."""
    old = make_app(SECRET_KEY=old_key)

    @old.route("/login")
    def login() -> str:
        flask.session["user"] = "ada"
        return ""

    cookie = set_cookie_value(old.test_client().get("/login"))
    app = make_app(SECRET_KEY="new test key", **new_config)
    app.session_interface.check(app)

    @app.route("/")
    def index() -> str:
        return flask.session.get("user", "nobody")

    client = app.test_client()
    client.set_cookie("session", cookie)
    return client.get("/").get_data(as_text=True)


def test_none_among_the_secret_key_fallbacks_is_skipped() -> None:
    """SECRET_KEY_FALLBACKS = [os.environ.get("OLD_SECRET_KEY")] with the variable unset
    holds None: Flask's interface serves on, Satchel's made every request a 500
    (TypeError in Keyring.from_secrets). A None fallback is no key."""
    fallbacks = [None, "test key", None]
    assert _login_opens_after_rotation("test key", SECRET_KEY_FALLBACKS=fallbacks) == "ada"


def test_a_bytearray_secret_key_or_fallback_serves_as_flask_does() -> None:
    """Flask's interface serves with a bytearray SECRET_KEY or fallback (as does
    Keyring.from_secrets); Satchel's made every request a 500, views that never touch
    the session included (TypeError: unhashable type, from the ring cache's key)."""
    old_key = bytearray(b"an old secret key")
    assert _login_opens_after_rotation(old_key, SECRET_KEY_FALLBACKS=[old_key]) == "ada"


@pytest.mark.parametrize("dictionary_id", [999, 2, 200])
def test_an_unregistered_dictionary_id_is_found_by_check(dictionary_id: int) -> None:
    """check(app) promises to find a setting that would fail every request touching
    flask.session; an unregistered dictionary_id passed it and Satchel(app), then every
    request, views that never use the session included, was a 500."""
    from satchel.flask_ext import Satchel

    app = flask.Flask(__name__)
    app.secret_key = "a secret key of some length"
    app.session_interface = SatchelSessionInterface(dictionary_id=dictionary_id)
    with pytest.raises(ConfigurationError, match=f"^dictionary_id={dictionary_id}: "):
        app.session_interface.check(app)
    app.config["SATCHEL_KEYS"] = satchel.Keyring.generate().to_string()
    with pytest.raises(ConfigurationError, match=f"^dictionary_id={dictionary_id}: "):
        Satchel(app)


@pytest.mark.parametrize("dictionary_id", ["1", 1.0, True])
def test_a_dictionary_id_that_is_not_an_int_is_refused_at_once(dictionary_id: t.Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^dictionary_id must be an int"):
        SatchelSessionInterface(dictionary_id=dictionary_id)


@pytest.mark.parametrize("fallbacks", ["old-secret-value", b"old-secret-value"])
def test_secret_key_fallbacks_given_as_one_string_is_refused(fallbacks: t.Any) -> None:
    """Iterated, the string was one key per character: a cookie sealed with the secret
    "o" opened, a forged session for anyone who guessed one character."""
    from satchel.errors import ConfigurationError

    app = make_app()
    app.config["SECRET_KEY_FALLBACKS"] = fallbacks
    interface = SatchelSessionInterface()
    with pytest.raises(ConfigurationError, match=r"write \[old_key\]"):
        interface.check(app)
    with pytest.raises(ConfigurationError):
        interface.get_keyring(app)  # per request too: never a ring of characters
    app.config["SECRET_KEY_FALLBACKS"] = [fallbacks]
    assert len(interface.get_keyring(app).kids) == 2


def test_an_empty_fallback_is_no_key_and_short_secrets_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SECRET_KEY_FALLBACKS = [os.environ.get("OLD_SECRET_KEY", "")] with the variable
    unset put "" in the ring, stretched to a key anyone can compute: a session sealed
    with it (an admin's, say) was accepted. An empty fallback is skipped as None is;
    and a secret under 16 bytes, which Flask takes, is warned about."""
    import logging

    from satchel import Codec
    from satchel.flask_ext.session import SatchelSessionInterface
    from satchel.keys import Keyring

    app = flask.Flask(__name__)
    app.secret_key = "a long and random enough secret key for the test"
    app.config["SECRET_KEY_FALLBACKS"] = [""]
    app.session_interface = SatchelSessionInterface()

    @app.get("/whoami")
    def whoami() -> dict[str, object]:
        return {"user": flask.session.get("user")}

    purpose = app.session_interface.get_purpose(app)  # type: ignore[attr-defined]
    forger = Codec(Keyring.from_secrets([""]), purpose=purpose)
    payload = app.session_interface.dumps({"user": "admin"})  # type: ignore[attr-defined]
    forged, _ = forger.seal_payload(payload)
    client = app.test_client()
    client.set_cookie("session", forged)
    assert client.get("/whoami").get_json() == {"user": None}

    short = flask.Flask(__name__)
    short.secret_key = "dev"
    short.session_interface = SatchelSessionInterface()
    short.add_url_rule("/set", "set", lambda: flask.session.update(x=1) or "ok")
    with caplog.at_level(logging.WARNING, logger="satchel.session"):
        short.test_client().get("/set")
        short.test_client().get("/set")
    warned = [r for r in caplog.records if "shorter than 16 bytes" in r.getMessage()]
    assert len(warned) == 1  # once per ring, not per request
