"""Consistency levels: client (forks reported), monotonic (stale refused), tier-down
policies, per-route levels, user binding and erasure, through real Flask requests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from flask import Flask, has_request_context, request

from satchel import Keyring, Satchel
from satchel.consistency import ForkDetector, decode_mark, encode_mark, newest_key
from satchel.errors import TierUnavailable
from satchel.schema import from_wire
from satchel.serialize import unpack
from satchel.tiers import MemoryTier
from tests.support import wait_until

KEYS = Keyring.generate("k1").to_string()


def make_app(tmp_path: Path, observer: Any = None, **config: Any) -> tuple[Flask, Satchel]:
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True)
    app.config.update(config)
    satchel = Satchel(app, observer=observer)
    app.extensions["barrier"] = None

    @app.post("/chat")
    def chat() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        barrier = app.extensions["barrier"]
        if barrier is not None:
            barrier.wait(timeout=5)  # both requests have opened before either seals
        return {"turns": len(ctx.turns), "degraded": ctx.degraded}

    if "SATCHEL_OVERFLOW_URL" in config:  # a monotonic route needs the tier's marks

        @app.post("/spend")
        @satchel.consistency("monotonic")
        def spend() -> Any:
            ctx = satchel.context
            credits = ctx.metadata.get("credits", 10) - 1
            ctx.metadata["credits"] = credits
            return {"credits": credits}

        @app.get("/peek")
        @satchel.consistency("monotonic")
        def peek() -> Any:  # read-only: no new token
            satchel.discard()
            ctx = satchel.context
            return {"credits": ctx.metadata.get("credits", 10), "degraded": ctx.degraded}

    return app, satchel


def start_in_thread(call: Any) -> Any:
    """Start ``call()`` in a thread of its own (its own Flask contexts, as another
    server thread would have); the returned function waits for it and gives its result."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(call()))
    worker.start()

    def result() -> Any:
        worker.join(10)
        assert out, "the call did not finish"
        return out[0]

    return result


def in_thread(call: Any) -> Any:
    """``call()`` run in a thread of its own (its own Flask contexts), and its result."""
    return start_in_thread(call)()


def token_in(stream_body: str) -> str:
    """The token of a streamed reply's final ``satchel`` event."""
    line = stream_body.split("event: satchel\ndata: ", 1)[1].split("\n", 1)[0]
    return json.loads(line)["token"]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tier.sqlite3'}"


def post(client: Any, path: str, token: str | None, message: str = "hi") -> Any:
    headers = {"Satchel-Context": token} if token else {}
    return client.post(path, json={"message": message}, headers=headers)


def kept_newest(app: Flask, tag: str) -> bytes | None:
    """The newest token a monotonic save of session ``tag`` kept in the app's tier."""
    key = newest_key(tag)
    return Satchel.state(app).tier.get_many([key], cache=False).get(key)


# -- client level ---------------------------------------------------------------------


def test_client_level_reports_fork_and_lets_last_writer_win(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path)
    client = app.test_client()
    first = post(client, "/chat", None)
    token = first.headers["Satchel-Context"]
    a = post(client, "/chat", token, "from tab A")
    assert a.status_code == 200 and "Satchel-Fork" not in a.headers
    b = post(client, "/chat", token, "from tab B")  # same parent as A: a fork
    assert b.status_code == 200
    assert b.headers["Satchel-Fork"].startswith("behind=")
    assert b.headers["Satchel-Seq"] == a.headers["Satchel-Seq"]


def test_a_read_with_an_old_token_says_fork_but_counts_one_only_when_a_token_is_issued(
    tmp_path: Path,
) -> None:
    """A read-only route (discard()) issues no token: no branch is made. It says the
    token is behind (Satchel-Fork), but counted a fork, and logged a WARNING, on every
    load of a stale tab."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, satchel = make_app(tmp_path, metrics)

    @app.get("/context")
    def context() -> Any:
        satchel.discard()
        return {"turns": len(satchel.context.turns)}

    client = app.test_client()
    old = post(client, "/chat", None).headers["Satchel-Context"]
    post(client, "/chat", old)
    for _ in range(3):
        read = client.get("/context", headers={"Satchel-Context": old})
        assert read.status_code == 200 and read.headers["Satchel-Fork"] == "behind=1"
        assert "Satchel-Context" not in read.headers
    forks = "satchel_forks_total"
    assert metrics.registry.get_sample_value(forks) in (None, 0.0)
    assert post(client, "/chat", old).headers["Satchel-Fork"] == "behind=1"  # a branch
    assert metrics.registry.get_sample_value(forks) == 1


def test_fork_detector_sibling_and_behind() -> None:
    from satchel import Context

    detector = ForkDetector(max_sessions=2)
    ctx = Context.new()
    ctx.seq, ctx.parent = 3, b"a" * 12
    assert detector.check(ctx) is None
    detector.record(ctx, None)
    older = Context.new(session_id=ctx.session_id)
    older.seq, older.parent = 2, b"b" * 12
    assert detector.check(older) == "behind=1"
    sibling = Context.new(session_id=ctx.session_id)
    sibling.seq, sibling.parent = 3, b"c" * 12
    assert detector.check(sibling) == "sibling"
    for _ in range(3):  # bounded: the oldest session is forgotten
        other = Context.new()
        other.seq, other.parent = 1, b"d" * 12
        detector.record(other, None)
    assert detector.check(older) is None


def test_two_requests_in_flight_at_once_with_one_token_are_a_fork_when_saved() -> None:
    """Both requests were checked before either saved, so both passed the check, and
    the second save, a sibling of the first, was never reported: the conversation went
    on with one branch and the other reply silently dropped. The save now notices a
    token issued for the session since its check."""
    from satchel import Context

    detector = ForkDetector()
    parent = Context.new()
    parent.seq, parent.parent = 3, b"p" * 12
    detector.record(parent, None)
    first, second = (
        Context.new(session_id=parent.session_id),
        Context.new(session_id=parent.session_id),
    )
    for ctx in (first, second):  # both opened from the token of seq 3
        ctx.seq, ctx.parent = 3, b"p" * 12
        assert detector.check(ctx) is None
    first.seq, first.parent = 4, b"1" * 12  # sealed: its own token
    second.seq, second.parent = 4, b"2" * 12
    assert detector.record(first, b"p" * 12) is None
    assert detector.record(second, b"p" * 12) == "sibling"
    # A save from further behind than a token issued meanwhile.
    late = Context.new(session_id=parent.session_id)
    late.seq, late.parent = 3, b"3" * 12
    assert detector.record(late, b"q" * 12) == "behind=2"
    # The same token recorded again (a reseal of this request) is no fork.
    assert detector.record(late, b"q" * 12) is None


def test_mark_round_trip() -> None:
    assert decode_mark(encode_mark(7, b"x" * 12, b"m" * 16)) == (7, b"x" * 12, b"m" * 16)
    # A mark of the release before mark ids still reads (checked by its older rule).
    assert decode_mark(encode_mark(7, b"x" * 12)) == (7, b"x" * 12, None)
    assert decode_mark(b"garbage\xff") is None


PLANTED_RECORDS = [
    msgpack.packb([1, 2**64 - 1]),  # an int where the digest goes: bytes(n) raised
    msgpack.packb([1, 2**28]),  # ... or allocated 256 MiB of zeros on every read
    msgpack.packb([1, b"d" * 12, 2**31]),
    msgpack.packb([b"\x01", b"d" * 12]),  # a seq that is not an int
    msgpack.packb([-1, b"d" * 12]),
    msgpack.packb([1, b"d" * 4096]),  # a digest far longer than any
    msgpack.packb({"seq": 1}),
    msgpack.packb([[[[1]]]]),
    msgpack.packb([]),
    msgpack.packb(7),
    b"\x92\x01\xc7\x01\x05x",  # an ext type
    b"\x92\x01\xc6\xff\xff\xff\xff",  # a bin that says 4 GiB follow
]


@pytest.mark.parametrize("raw", PLANTED_RECORDS)
def test_a_planted_or_damaged_mark_reads_as_none_cheaply(raw: bytes) -> None:
    """Marks are the server's own records in the tier, not authenticated: one planted
    there (or damaged) made every monotonic request of the session a 500, or allocate
    gigabytes. Read with limits and strict types, it is no mark."""
    import tracemalloc

    from satchel.consistency import decode_newest

    # Packed before tracing: msgpack < 1.1's packb() allocates a 1 MiB buffer, which is
    # the test's own cost, not the decoder's.
    huge_seq = msgpack.packb([b"m" * 16, b"p" * 12, "s1.x", 2**64 - 1])
    tracemalloc.start()
    try:
        assert decode_mark(raw) is None
        assert decode_newest(raw) is None
        assert decode_newest(huge_seq) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_planted_mark_is_no_mark_not_a_500(tmp_path: Path) -> None:
    from satchel.consistency import DEFAULT_MARK_TTL, mark_key

    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    token = post(client, "/spend", None).headers["Satchel-Context"]
    with app.app_context():
        state = satchel.state()
        tag = state.pipeline.session_tag(satchel.codec.open(token).session_id)
        state.tier.put(mark_key(tag), msgpack.packb([1, 2**64 - 1]), DEFAULT_MARK_TTL)
    response = post(client, "/spend", token)
    assert response.status_code == 200, response.get_data(as_text=True)


def test_an_old_token_taken_through_a_client_route_cannot_roll_back_a_spend(
    tmp_path: Path,
) -> None:
    """A replay laundered through a ``client``-level route: each pass raises its
    sequence number on a branch of its own, past the mark. The monotonic route must
    still see that it does not descend from the newest spend."""
    app, _ = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    first = post(client, "/spend", t0)
    second = post(client, "/spend", first.headers["Satchel-Context"])
    assert second.get_json() == {"credits": 8}
    laundered = t0
    for _ in range(4):  # the client-level route serves the old branch (a reported fork)
        laundered = post(client, "/chat", laundered).headers["Satchel-Context"]
    refused = post(client, "/spend", laundered)
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["error"]["code"] == "stale_context"
    # So is the token of the first spend, taken further the same way...
    after_first = post(client, "/chat", first.headers["Satchel-Context"])
    assert post(client, "/spend", after_first.headers["Satchel-Context"]).status_code == 409
    # ...while the newest branch, through the client route, keeps spending.
    newest = post(client, "/chat", second.headers["Satchel-Context"])
    assert post(client, "/spend", newest.headers["Satchel-Context"]).get_json() == {"credits": 7}


# -- monotonic ------------------------------------------------------------------------


def test_monotonic_refuses_replay_of_an_old_token(tmp_path: Path) -> None:
    app, _ = make_app(
        tmp_path, SATCHEL_CONSISTENCY="monotonic", SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path)
    )
    client = app.test_client()
    t1 = post(client, "/chat", None).headers["Satchel-Context"]
    t2 = post(client, "/chat", t1).headers["Satchel-Context"]
    t3 = post(client, "/chat", t2).headers["Satchel-Context"]
    # Two saves behind: refused, and given nothing.
    replay = post(client, "/chat", t1)
    assert replay.status_code == 409
    assert replay.get_json()["error"]["code"] == "stale_context"
    assert "Satchel-Context" not in replay.headers
    assert post(client, "/chat", t3).status_code == 200


def test_a_planted_newest_record_hands_back_nothing(tmp_path: Path) -> None:
    """The kept newest token is the tier's record, not authenticated: one rewritten
    there (another conversation's token, garbage, a header injection) was handed back
    as it was, or made the 409 a 500. It is opened first: only our own token, made from
    the one sent, at the record's seq, goes back."""
    from satchel.consistency import decode_newest, encode_newest, newest_context

    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    other = post(client, "/spend", None).headers["Satchel-Context"]  # a valid token of ours
    with app.app_context():
        state = satchel.state()
        tag = state.pipeline.session_tag(satchel.codec.open(t0).session_id)
        key = newest_key(tag)
        real = state.tier.get_many([key], cache=False).get(key)
        record = decode_newest(real)
    assert record is not None
    mark_id, parent, kept, seq = record
    at_rest = state.guard.at_rest
    context = newest_context(mark_id, parent)
    # Sealed in the tier: not the token itself, which whoever reads the tier could send.
    assert isinstance(kept, bytes) and spent.headers["Satchel-Context"].encode() not in real
    opened = at_rest.open(kept, context, max_bytes=1 << 20)
    assert opened is not None and opened.decode() == spent.headers["Satchel-Context"]
    planted_records = [
        # kept as they are (planted; a release before sealing kept them so, and those
        # are opened and checked the same way)
        *(p for p in (other, "not-a-token", "s1.x\r\nSet-Cookie: a=b", t0)),
        # sealed for this record, but not a token made from the one sent
        at_rest.seal(other.encode(), context),
        # this record's sealed token, sealed for another record (a swap)
        at_rest.seal(spent.headers["Satchel-Context"].encode(), newest_context(mark_id, mark_id)),
    ]
    for planted in planted_records:
        state.tier.put(key, encode_newest(mark_id, parent, planted, seq), 600, cache=False)
        replay = post(client, "/spend", t0)
        assert replay.status_code == 409, (planted, replay.get_data(as_text=True))
        assert replay.get_json()["error"]["code"] == "stale_context"
        assert "Satchel-Context" not in replay.headers, planted
    # A record kept as it is by the release before records were sealed: its token is
    # handed back (checked as any), or the client whose response was lost across the
    # upgrade got a 409 without it, and was locked out for good.
    spent_token = spent.headers["Satchel-Context"]
    state.tier.put(key, encode_newest(mark_id, parent, spent_token, seq), 600, cache=False)
    assert post(client, "/spend", t0).headers["Satchel-Context"] == spent_token
    # The real record, put back, is handed back as before.
    assert real is not None
    state.tier.put(key, real, 600, cache=False)
    assert post(client, "/spend", t0).headers["Satchel-Context"] == spent.headers["Satchel-Context"]


def test_the_token_the_newest_was_made_from_gets_the_newest_back(tmp_path: Path) -> None:
    """A response lost on its way (a dropped connection) leaves the client with the
    token the newest was made from. It is refused, as any replay, but the 409 hands
    the newest token back, so the client catches up instead of being locked out; that
    undoes nothing (the spend is in it) and gives nothing its holder could not get."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, _ = make_app(tmp_path, metrics, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)  # the response the client never got
    assert spent.get_json() == {"credits": 9}
    replay = post(client, "/spend", t0)
    assert replay.status_code == 409
    assert replay.get_json()["error"]["code"] == "stale_context"
    assert "newest token" in replay.get_json()["error"]["message"]
    assert replay.headers["Satchel-Context"] == spent.headers["Satchel-Context"]
    assert replay.headers["Satchel-Seq"] == spent.headers["Satchel-Seq"]
    assert replay.headers["Satchel-Session"] == spent.headers["Satchel-Session"]
    assert replay.headers["Cache-Control"] == "no-store"
    assert "Satchel-Context" in replay.headers["Vary"]
    assert "Satchel-Context" in replay.headers["Access-Control-Expose-Headers"]
    # The handed-back token goes on from the spend: nothing was rolled back.
    after = post(client, "/spend", replay.headers["Satchel-Context"])
    assert after.get_json() == {"credits": 8}
    # Once the newest has moved on, the old parent gets nothing (two saves behind)...
    again = post(client, "/spend", t0)
    assert again.status_code == 409 and "Satchel-Context" not in again.headers
    # ...and the parent of the new newest gets that one.
    behind = post(client, "/spend", spent.headers["Satchel-Context"])
    assert behind.headers["Satchel-Context"] == after.headers["Satchel-Context"]
    # A sibling of the newest (made from the same parent at a client-level route, a
    # branch of its own) is not its parent: nothing.
    sibling = post(client, "/chat", spent.headers["Satchel-Context"])
    assert sibling.status_code == 200 and "Satchel-Fork" in sibling.headers
    refused = post(client, "/spend", sibling.headers["Satchel-Context"])
    assert refused.status_code == 409 and "Satchel-Context" not in refused.headers
    sample = metrics.registry.get_sample_value
    assert sample("satchel_stale_refused_total") == 4
    assert sample("satchel_stale_recovered_total") == 2


def test_keep_newest_off_keeps_no_token_in_the_tier(tmp_path: Path) -> None:
    app, _ = make_app(
        tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path), SATCHEL_KEEP_NEWEST="false"
    )
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    assert kept_newest(app, spent.headers["Satchel-Session"]) is None
    replay = post(client, "/spend", t0)
    assert replay.status_code == 409 and "Satchel-Context" not in replay.headers


def test_the_newest_token_is_handed_back_in_the_cookie_too(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path), SATCHEL_COOKIE="satchel")
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    replay = post(client, "/spend", t0)
    assert replay.status_code == 409
    cookie = replay.headers["Set-Cookie"]
    assert cookie.startswith(f"satchel={spent.headers['Satchel-Context']};")
    assert "HttpOnly" in cookie


def test_erasing_a_session_deletes_its_kept_newest_token(tmp_path: Path) -> None:
    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    tag = spent.headers["Satchel-Session"]
    assert kept_newest(app, tag) is not None
    with app.app_context():
        session_id = satchel.codec.open(spent.headers["Satchel-Context"]).session_id
        satchel.erase(session_id)
    assert kept_newest(app, tag) is None
    replay = post(client, "/spend", t0)
    assert replay.status_code == 410 and "Satchel-Context" not in replay.headers


def test_monotonic_two_concurrent_requests_with_one_token(tmp_path: Path) -> None:
    app, _ = make_app(
        tmp_path, SATCHEL_CONSISTENCY="monotonic", SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path)
    )
    token = post(app.test_client(), "/chat", None).headers["Satchel-Context"]
    app.extensions["barrier"] = threading.Barrier(2)
    results: list[Any] = []

    def send(msg: str) -> None:
        results.append(post(app.test_client(), "/chat", token, msg))

    threads = [threading.Thread(target=send, args=(m,)) for m in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 409]
    loser = next(r for r in results if r.status_code == 409)
    assert loser.get_json()["error"]["code"] == "stale_context"


def test_the_loser_of_a_race_is_refused_and_not_counted_as_a_fork(tmp_path: Path) -> None:
    """A passes the mark's check, then B (same token) is served and moves the mark; A's
    fork check found it behind and counted a fork (and its 409 said Satchel-Fork),
    although the save then refused it: forks count branches that were served."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, _ = make_app(
        tmp_path,
        observer=metrics,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
    )
    token = post(app.test_client(), "/chat", None).headers["Satchel-Context"]
    guard = Satchel.state(app).guard
    checked_before = guard.before
    b_done = threading.Event()

    def before(ctx: Any, tag: str, **kw: Any) -> Any:
        mark = checked_before(ctx, tag, **kw)
        if request.get_json()["message"] == "A":
            assert b_done.wait(10)  # A has passed the check; B runs to its end first
        return mark

    guard.before = before  # type: ignore[method-assign]
    a_result = start_in_thread(lambda: post(app.test_client(), "/chat", token, "A"))
    b = post(app.test_client(), "/chat", token, "B")
    b_done.set()
    a = a_result()
    assert (a.status_code, b.status_code) == (409, 200)
    assert a.get_json()["error"]["code"] == "stale_context"
    assert "Satchel-Fork" not in a.headers and "Satchel-Fork" not in b.headers
    sample = metrics.registry.get_sample_value
    assert sample("satchel_stale_refused_total") == 1
    assert sample("satchel_forks_total") == 0


def test_per_route_monotonic_protects_credits_from_rollback(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    assert spent.get_json() == {"credits": 9}
    # Replaying the pre-spend token on the credits route is refused...
    assert post(client, "/spend", t0).status_code == 409
    # ...while the app-wide client level still serves it, flagged as a fork.
    chat = post(client, "/chat", t0)
    assert chat.status_code == 200 and "Satchel-Fork" in chat.headers
    # The newest token keeps spending.
    again = post(client, "/spend", spent.headers["Satchel-Context"])
    assert again.get_json() == {"credits": 8}


def test_monotonic_needs_a_tier(tmp_path: Path) -> None:
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        make_app(tmp_path, SATCHEL_CONSISTENCY="monotonic")


def test_a_monotonic_route_without_a_tier_fails_at_start_up() -> None:
    """Not with a JSON 500 on the route's first request."""
    from satchel.errors import ConfigurationError

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS)
    satchel = Satchel(app)
    with pytest.raises(ConfigurationError, match="spend demands monotonic"):

        @app.post("/spend")
        @satchel.consistency("monotonic")
        def spend() -> Any:
            return {}

    # The factory pattern: routes decorated before init_app are checked by it.
    later = Satchel()

    @later.consistency("monotonic")
    def withdraw() -> Any:
        return {}

    other = Flask(__name__)
    other.config.update(SATCHEL_KEYS=KEYS)
    with pytest.raises(ConfigurationError, match="withdraw"):
        later.init_app(other)


def test_installing_satchel_twice_on_one_app_is_refused() -> None:
    """init_app twice (or two Satchel objects) ran every request's steps twice: two
    Server-Timing headers, and under monotonic every request refused 409."""
    from satchel.errors import ConfigurationError

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS)
    satchel = Satchel(app)
    with pytest.raises(ConfigurationError, match="already installed"):
        satchel.init_app(app)
    with pytest.raises(ConfigurationError, match="already installed"):
        Satchel(app)
    resp = app.test_client().get("/nothing-here")
    assert resp.status_code == 404


def test_a_server_route_in_a_client_held_app_fails_at_start_up(tmp_path: Path) -> None:
    """'server' is stricter than 'monotonic', but one route cannot take the context off
    the wire: it must not be served as a plain client-level route (no replay check)."""
    from satchel.errors import ConfigurationError

    tier = {"SATCHEL_OVERFLOW_URL": sqlite_url(tmp_path), "SATCHEL_CONSISTENCY": "monotonic"}
    app, satchel = make_app(tmp_path, **tier)
    with pytest.raises(ConfigurationError, match=r"spend_all demands 'server'.*monotonic"):

        @app.post("/spend-all")
        @satchel.consistency("server")
        def spend_all() -> Any:
            return {}

    later = Satchel()  # decorated before init_app: init_app refuses it

    @later.consistency("server")
    def withdraw() -> Any:
        return {}

    other = Flask(__name__)
    other.config.update(SATCHEL_KEYS=KEYS, **tier)
    with pytest.raises(ConfigurationError, match="withdraw"):
        later.init_app(other)

    # Where the context is server-side, the route is served.
    server_app = Flask(__name__)
    server_app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_MODE="memory")
    ext = Satchel(server_app)

    @server_app.post("/spend")
    @ext.consistency("server")
    def spend() -> Any:
        ext.context.metadata["spent"] = True
        return {"ok": True}

    assert server_app.test_client().post("/spend").status_code == 200


def monotonic_on_redis(
    tmp_path: Path, redis_server: Any, policy: str, observer: Any = None
) -> tuple[Any, str]:
    """A client of an app at ``monotonic`` on ``redis_server``, and its first token."""
    app, _ = make_app(
        tmp_path,
        observer,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_TIER_DOWN_POLICY=policy,
    )
    client = app.test_client()
    return client, post(client, "/chat", None).headers["Satchel-Context"]


def fill_up(redis_server: Any) -> None:
    """Redis out of memory: every write refused (``noeviction``), reads still served."""
    redis_server.config_set({"maxmemory": 1, "maxmemory-policy": "noeviction"})


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_monotonic_with_the_tier_down(tmp_path: Path, redis_server: Any, policy: str) -> None:
    client, token = monotonic_on_redis(tmp_path, redis_server, policy)
    redis_server.kill()
    response = post(client, "/chat", token)
    if policy == "fail_open":
        assert response.status_code == 200
        assert "consistency_unchecked" in response.headers["Satchel-Degraded"]
        assert "consistency_unchecked" in response.get_json()["degraded"]
    else:
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "tier_unavailable"


@pytest.mark.parametrize("held", [True, False], ids=["token_held", "new_conversation"])
def test_fail_closed_says_what_a_mark_write_that_timed_out_may_have_done(
    tmp_path: Path, redis_server: Any, held: bool
) -> None:
    """Redis stalls while the mark's compare-and-set is on its way: the app gives up
    (503), and Redis runs the command when it resumes. For a token the client holds,
    "retry shortly" would ask for the message twice: the 503 says it may have been
    saved, and it was. A new conversation's client holds no token to reload: a mark
    that landed names a token nobody has, so sending again (afresh) is right."""
    app, _ = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_TIER_DOWN_POLICY="fail_closed",
    )
    stall = {"armed": False}

    @app.after_request  # runs before Satchel's own (registered earlier), which saves
    def pause_redis(response: Any) -> Any:
        if stall["armed"]:
            stall["armed"] = False
            redis_server.pause()
        return response

    client = app.test_client()
    token = None
    if held:  # two saves: the second loads the script a held token's save runs
        token = post(client, "/chat", None).headers["Satchel-Context"]
        token = post(client, "/chat", token).headers["Satchel-Context"]
    stall["armed"] = True
    response = post(client, "/chat", token, "only once")
    redis_server.resume()  # the stalled compare-and-set runs now
    assert not stall["armed"]  # the stall happened, at the save
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "tier_unavailable"
    if not held:
        assert "retry shortly" in error["message"]
        return
    assert "may still have been saved" in error["message"]
    assert "reload the conversation" in error["message"]

    # It was: the token sent is now older than the mark, and the refusal hands back
    # the newest token, which holds the message once.
    again = post(client, "/chat", token, "only once")
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "stale_context"
    newest = Satchel.state(app).pipeline.codec.open(again.headers["Satchel-Context"])
    assert [t.content for t in newest.turns].count("only once") == 1


def test_fail_closed_retry_after_is_the_open_breakers_wait(
    tmp_path: Path, redis_server: Any
) -> None:
    """Every fail_closed 503 said Retry-After: 1 while the open breaker refused every
    call for its whole reset timeout (30 s here), as server mode's did."""
    app, _ = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_TIER_DOWN_POLICY="fail_closed",
        SATCHEL_BREAKER_RESET_TIMEOUT=30,
    )
    client = app.test_client()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    redis_server.kill()
    waits = []
    for _ in range(7):  # refused connections, then the breaker open (fail_max 5)
        response = post(client, "/chat", token)
        assert response.status_code == 503
        waits.append(int(response.headers["Retry-After"]))
    assert waits[0] == 1 and 20 <= waits[-1] <= 30, waits


def test_fail_closed_says_retry_when_the_mark_could_not_be_read(
    tmp_path: Path, redis_server: Any
) -> None:
    """A failed read of the mark saved nothing: retrying is the right advice."""
    client, token = monotonic_on_redis(tmp_path, redis_server, "fail_closed")
    redis_server.kill()
    response = post(client, "/chat", token)
    assert response.status_code == 503
    assert "retry shortly" in response.get_json()["error"]["message"]


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_monotonic_with_the_tier_full(
    tmp_path: Path, redis_server: Any, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis out of memory (noeviction) refuses to move the mark: that is a full store,
    not an unavailable one. fail_closed answers 503 tier_full saying so; fail_open
    serves flagged consistency_unchecked and the audit event names tier_full."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    client, token = monotonic_on_redis(tmp_path, redis_server, policy, observer=metrics)
    fill_up(redis_server)
    caplog.set_level("INFO", logger="satchel.audit")
    response = post(client, "/chat", token)
    events = {
        name: [getattr(r, "satchel", {}) for r in caplog.records if r.getMessage() == name]
        for name in ("degraded", "unavailable")
    }
    degraded = metrics.registry.get_sample_value(
        "satchel_degraded_total", {"reason": "consistency_unchecked"}
    )
    refused = metrics.registry.get_sample_value(
        "satchel_unavailable_total", {"reason": "tier_full"}
    )
    if policy == "fail_closed":
        assert response.status_code == 503
        error = response.get_json()["error"]
        assert error["code"] == "tier_full" and "full" in error["message"]
        assert "unavailable" not in error["message"]
        # Refused, not served degraded: counted and logged as such.
        assert not events["degraded"] and degraded == 0  # the series exists from the start
        assert events["unavailable"][0]["reason"] == "tier_full" and refused == 1
    else:
        assert response.status_code == 200
        assert "consistency_unchecked" in response.headers["Satchel-Degraded"]
        facts = events["degraded"][0]
        assert {"reason": "consistency_unchecked", "error": "tier_full"}.items() <= facts.items()
        assert facts["detail"] == "OutOfMemoryError"  # what failed underneath
        assert degraded == 1 and refused == 0


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_a_new_conversation_refused_for_its_mark_started_no_session(
    tmp_path: Path, redis_server: Any, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session starts when its first token goes out (docs/operations.md): a new
    conversation whose first mark the full tier refused under fail_closed got a 503 and
    no token, so neither satchel_sessions_started_total nor a session_started record
    may say it started (a client retrying through the outage counted one per try).
    Under fail_open the token goes out, flagged: that one started."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    client, _token = monotonic_on_redis(tmp_path, redis_server, policy, observer=metrics)
    fill_up(redis_server)
    caplog.set_level("INFO", logger="satchel.audit")
    responses = [post(client, "/chat", None) for _ in range(3)]
    started = metrics.registry.get_sample_value("satchel_sessions_started_total")
    records = [r for r in caplog.records if r.getMessage() == "session_started"]
    if policy == "fail_closed":
        assert [r.status_code for r in responses] == [503, 503, 503]
        assert not any("Satchel-Context" in r.headers for r in responses)
        assert started == 1 and records == []  # the first conversation's only
    else:
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert started == 4 and len(records) == 3


def test_a_save_whose_mark_write_failed_does_not_lock_the_conversation_out(
    tmp_path: Path, redis_server: Any
) -> None:
    """fail_open serves a request whose mark could not be moved (Redis out of memory);
    its token names a mark id the tier never got. When the tier takes writes again, that
    token must still pass, not answer 409 forever."""
    client, token = monotonic_on_redis(tmp_path, redis_server, "fail_open")
    token = post(client, "/chat", token).headers["Satchel-Context"]
    before = token
    fill_up(redis_server)
    unmoved = post(client, "/chat", token)
    assert unmoved.status_code == 200
    assert "consistency_unchecked" in unmoved.headers["Satchel-Degraded"]
    redis_server.config_set({"maxmemory": 0})
    token = unmoved.headers["Satchel-Context"]
    for _ in range(3):  # the conversation goes on, and the mark moves again
        response = post(client, "/chat", token)
        assert response.status_code == 200, response.get_json()
        assert "Satchel-Degraded" not in response.headers
        token = response.headers["Satchel-Context"]
    # ...and the tokens from before are refused again, as stale.
    assert post(client, "/chat", before).status_code == 409
    assert post(client, "/chat", unmoved.headers["Satchel-Context"]).status_code == 409


def test_marks_lost_by_a_restart_are_reported_and_set_again(
    tmp_path: Path, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without persistence forgets the marks: a token of a marked session
    is served flagged consistency_reset (counted, logged), and the mark starts again."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()  # the extension's own AuditObserver does the logging
    app, satchel = make_app(
        tmp_path,
        observer=metrics,
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_BREAKER_RESET_TIMEOUT=0.05,
    )
    client = app.test_client()
    before_marks = post(client, "/chat", None).headers["Satchel-Context"]  # client level
    with app.app_context():
        assert satchel.codec.open(before_marks).marked is False
    spent = post(client, "/spend", before_marks)
    assert spent.status_code == 200 and "Satchel-Degraded" not in spent.headers
    after_spend = spent.headers["Satchel-Context"]
    chatted = post(client, "/chat", after_spend).headers["Satchel-Context"]  # carried along
    with app.app_context():
        assert satchel.codec.open(chatted).marked is True
    assert post(client, "/spend", chatted).status_code == 200
    # While the mark is there, an older marked token is refused; no reset is reported.
    assert post(client, "/spend", after_spend).status_code == 409

    redis_server.restart()  # empty: no persistence
    caplog.set_level("WARNING", logger="satchel.audit")
    replay = post(client, "/spend", after_spend)  # older than the mark was; nothing knows
    deadline = time.monotonic() + 5
    while replay.status_code == 503 and time.monotonic() < deadline:  # breaker reconnecting
        replay = post(client, "/spend", after_spend)
    assert replay.status_code == 200
    assert replay.headers["Satchel-Degraded"] == "consistency_reset"
    assert metrics.registry.get_sample_value("satchel_marks_lost_total") == 1
    assert (
        metrics.registry.get_sample_value("satchel_degraded_total", {"reason": "consistency_reset"})
        == 1
    )
    lost = {id(r) for r in caplog.records if r.getMessage() == "mark_lost"}
    assert len(lost) == 1 and all(r.levelname == "WARNING" for r in caplog.records)
    # The mark starts again from the token just issued: the older one is refused again.
    again = replay.headers["Satchel-Context"]
    assert post(client, "/spend", after_spend).status_code == 409
    ok = post(client, "/spend", again)
    assert ok.status_code == 200 and "Satchel-Degraded" not in ok.headers
    # A session that never had a mark is not flagged when none is found.
    fresh = post(client, "/chat", None).headers["Satchel-Context"]
    first_spend = post(client, "/spend", fresh)
    assert first_spend.status_code == 200 and "Satchel-Degraded" not in first_spend.headers
    assert metrics.registry.get_sample_value("satchel_marks_lost_total") == 1


def test_a_lost_mark_is_counted_once_and_a_read_of_an_older_token_locks_nobody_out(
    tmp_path: Path, redis_server: Any
) -> None:
    """After the tier lost a mark, nothing tells which token is the newest. Each load of
    the conversation (a read-only request) counted the same loss again; and setting the
    mark again from the first token read, an older tab's, refused the newest token for
    good. Now the loss is counted once per process, every request is flagged until a
    save sets the mark again, and that save is the newest token's."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, _ = make_app(
        tmp_path,
        observer=metrics,
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_BREAKER_RESET_TIMEOUT=0.05,
    )
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    older = post(client, "/spend", t0).headers["Satchel-Context"]
    newest = post(client, "/spend", older).headers["Satchel-Context"]
    newest = post(client, "/spend", newest).headers["Satchel-Context"]
    redis_server.restart()  # empty: no persistence

    def peek(token: str) -> Any:
        return client.get("/peek", headers={"Satchel-Context": token})

    first = peek(older)  # an old tab loads the chat first
    deadline = time.monotonic() + 5
    while first.status_code == 503 and time.monotonic() < deadline:  # breaker reconnecting
        first = peek(older)
    assert first.status_code == 200 and first.get_json()["degraded"] == ["consistency_reset"]
    for token in (older, newest):
        again = peek(token)
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["degraded"] == ["consistency_reset"]  # still unchecked
    assert metrics.registry.get_sample_value("satchel_marks_lost_total") == 1
    # The newest token's save sets the mark again: it goes on, and the older one is
    # refused from then on.
    saved = post(client, "/spend", newest)
    assert saved.status_code == 200 and saved.get_json() == {"credits": 6}
    ok = post(client, "/spend", saved.headers["Satchel-Context"])
    assert ok.status_code == 200 and "Satchel-Degraded" not in ok.headers
    assert post(client, "/spend", older).status_code == 409
    assert metrics.registry.get_sample_value("satchel_marks_lost_total") == 1


# -- binding and erasure ----------------------------------------------------------------


def test_user_binding_refuses_a_token_copied_to_another_account(tmp_path: Path) -> None:
    current = {"user": "alice"}
    app, _ = make_app(tmp_path, SATCHEL_USER_BINDING=lambda: current["user"])
    client = app.test_client()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    assert post(client, "/chat", token).status_code == 200
    current["user"] = "mallory"
    refused = post(client, "/chat", token)
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "token_wrong_user"
    # Nor does it work signed out: a stolen token must not be usable without an account.
    current["user"] = None
    anonymous = post(client, "/chat", token)
    assert anonymous.status_code == 403
    assert anonymous.get_json()["error"]["code"] == "token_wrong_user"
    # A conversation started signed out stays usable signed out (nothing is bound).
    fresh = post(client, "/chat", None).headers["Satchel-Context"]
    assert post(client, "/chat", fresh).status_code == 200


@pytest.mark.parametrize("arrangement", ["decorators reversed", "opened by a hook"])
def test_a_monotonic_route_is_checked_however_its_context_is_opened(
    tmp_path: Path, arrangement: str
) -> None:
    """The route's level comes from its registered view: the check runs even when the
    decorators are stacked the other way round or a before_request hook opens the
    context before the view wrapper could say which level it wants."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)

    def spend() -> Any:
        ctx = satchel.context
        ctx.metadata["credits"] = ctx.metadata.get("credits", 10) - 1
        return {"credits": ctx.metadata["credits"]}

    if arrangement == "decorators reversed":
        satchel.consistency("monotonic")(app.post("/spend")(spend))
    else:
        app.post("/spend")(satchel.consistency("monotonic")(spend))

        @app.before_request
        def load_context() -> None:
            satchel.get_context()

    client = app.test_client()
    first = post(client, "/spend", None)
    assert first.get_json() == {"credits": 9}
    t1 = first.headers["Satchel-Context"]
    assert post(client, "/spend", t1).get_json() == {"credits": 8}
    replay = post(client, "/spend", t1)  # the spend just made must not be undone
    assert replay.status_code == 409


def test_erase_deletes_tier_data_and_refuses_tokens_in_monotonic(tmp_path: Path) -> None:
    app, satchel = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_MAX_TOKEN_BYTES=600,
    )
    client = app.test_client()
    token = None
    for i in range(12):
        noise = hashlib.sha256(str(i).encode()).hexdigest()  # text that does not compress
        r = post(client, "/chat", token, f"message {i} {noise} {noise[::-1]}")
        assert r.status_code == 200
        token = r.headers["Satchel-Context"]
    with app.app_context():
        ctx = satchel.codec.open(token)
        assert ctx.overflow, "the budget should have made the session overflow"
        result = satchel.erase(ctx.session)
    assert result["deleted_keys"] >= len(ctx.overflow)
    assert result["tokens_refused"] is True
    refused = post(client, "/chat", token)
    assert refused.status_code == 410
    assert refused.get_json()["error"]["code"] == "token_erased"


@pytest.mark.parametrize("mode", ["client", "server", "memory"])
def test_erase_through_the_app_leaves_the_tombstone_in_every_mode(
    tmp_path: Path, mode: str
) -> None:
    """The tombstone used to be written only when the app had a monotonic guard (client
    mode): in server and memory modes an erased carrier came back as a new, empty
    conversation under the same id, and nothing stopped segment writes."""
    from satchel.consistency import ERASED, mark_key

    app, satchel = make_app(
        tmp_path,
        SATCHEL_MODE=mode,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path) if mode != "memory" else "",
    )
    client = app.test_client()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    with app.app_context():
        state = satchel.state()
        if mode == "client":
            session_id = satchel.codec.open(token).session_id
        else:
            session_id = state.pipeline.session_id_of(token)
        result = satchel.erase(session_id)
        tombstone = mark_key(result["session"])
        assert state.tier.get_many([tombstone], cache=False).get(tombstone) == ERASED
    assert result["tokens_refused"] is True
    after = post(client, "/chat", token)
    if mode == "client":  # client level: the browser's copy stays usable (documented)
        assert after.status_code == 200
    else:
        assert after.status_code == 410
        assert after.get_json()["error"]["code"] == "token_erased"


def test_a_stream_the_client_never_finished_reading_does_not_move_the_mark(
    tmp_path: Path,
) -> None:
    """A streamed reply on a monotonic route seals its token at the end. If the client
    is gone by then (a closed tab), the token never reaches it; moving the mark to it
    would lock the conversation out (409 forever for the only token the client has)."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        return satchel.stream(
            iter(["a ", "streamed ", "reply"]),
            on_complete=lambda text: ctx.add_turn("assistant", text),
        )

    client = app.test_client()

    def read(token: str | None, *, until: str | None = None) -> str:
        headers = {"Satchel-Context": token} if token else {}
        response = client.post("/stream", json={"message": "hi"}, headers=headers, buffered=False)
        seen = ""
        try:
            for chunk in response.response:
                seen += chunk.decode() if isinstance(chunk, bytes) else chunk
                if until is not None and until in seen:
                    break  # the client goes away: the server closes the generator here
        finally:
            response.close()
        return seen

    first = token_in(read(None))
    second = read(first, until="event: satchel")  # the final event left, nobody read on
    assert "event: satchel" in second and "event: done" not in second
    # The client only ever had `first`: it must still be served.
    third = read(first)
    assert "event: satchel" in third and "event: error" not in third
    # A finished stream moved the mark as usual: `first` is stale now.
    assert "stale_context" in read(first)


def test_mark_ids_off_for_a_rolling_deploy_over_the_release_before_them(
    tmp_path: Path,
) -> None:
    """SATCHEL_MARK_IDS=false writes marks and tokens as the release before mark ids
    did, so a replica of that release in the same rollout (it drops the ids from the
    tokens it seals) does not get its conversations refused by the new replicas."""
    app, satchel = make_app(
        tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path), SATCHEL_MARK_IDS="false"
    )
    client = app.test_client()
    spent = post(client, "/spend", post(client, "/chat", None).headers["Satchel-Context"])
    token = spent.headers["Satchel-Context"]
    with app.app_context():
        opened = satchel.codec.open(token)
        assert opened.marked and opened.mark_id is None  # what the older release wrote
        state = Satchel.state(app)
        tag = satchel.pipeline.session_tag(opened.session_id)
        stored = state.tier.get_many([f"satchel:{{{tag}}}:hwm"], cache=False)
        (raw,) = [stored.get(f"satchel:{{{tag}}}:hwm")]
    assert raw is not None and decode_mark(raw)[2] is None
    assert post(client, "/spend", token).get_json() == {"credits": 8}
    assert post(client, "/spend", token).status_code == 409  # still checked (seq rule)


def test_a_bound_methods_route_level_and_a_signed_out_cookie(tmp_path: Path) -> None:
    """@satchel.consistency on a bound method works as on a function; and a cookie
    refused because nobody is signed in is kept (signing in again opens it)."""

    class Views:
        def spend(self) -> Any:
            return {"ok": True}

    app = Flask(__name__)
    current: dict[str, Any] = {"user": "alice"}
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_COOKIE="chat",
        SATCHEL_COOKIE_SECURE=False,
        SATCHEL_USER_BINDING=lambda: current["user"],
    )
    satchel = Satchel(app)
    app.add_url_rule("/spend", view_func=satchel.consistency("monotonic")(Views().spend))

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", "hi")
        return {"turns": len(satchel.context.turns)}

    client = app.test_client()
    assert client.get("/spend").status_code == 200
    assert client.post("/chat").get_json() == {"turns": 1}
    current["user"] = None
    refused = client.post("/chat")
    assert refused.status_code == 403
    assert not any("chat=" in c for c in refused.headers.getlist("Set-Cookie"))
    current["user"] = "alice"
    assert client.post("/chat").get_json() == {"turns": 2}
    exposed = refused.headers["Access-Control-Expose-Headers"].split(", ")
    assert len(exposed) == len(set(exposed))  # listed once, not once per hook


class MarkRefusingTier(MemoryTier):
    """Refuses, once told to, the writes of monotonic marks (and of claims too)."""

    refuse = False

    refuse_claims = False

    def compare_and_set_mark(self, key, expected, new, ttl):  # type: ignore[no-untyped-def]
        if self.refuse and (self.refuse_claims or key.endswith(":hwm")):
            raise TierUnavailable("writes refused for the test")
        return super().compare_and_set_mark(key, expected, new, ttl)

    def compare_and_set_mark_with(self, key, expected, new, ttl, companion):  # type: ignore[no-untyped-def]
        if self.refuse and key.endswith(":hwm"):  # the mark, with the newest token
            raise TierUnavailable("writes refused for the test")
        return super().compare_and_set_mark_with(key, expected, new, ttl, companion)


@pytest.mark.parametrize("protocol", ["satchel", "ai-sdk"])
def test_a_stream_whose_mark_the_tier_refused_after_its_token_went_out_says_so(
    protocol: str,
) -> None:
    """Under fail_open a stream moves its mark once the final event is out; when the
    tier refuses that write, the reply was served unchecked. It was flagged nowhere the
    client could see (the event had gone) and not counted as a degraded response. Now a
    second final event, with the same token, carries the flag."""
    from satchel.metrics import PrometheusObserver

    tier, metrics = MarkRefusingTier(), PrometheusObserver()
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_TIER_DOWN_POLICY="fail_open")
    satchel = Satchel(app, tier=tier, observer=metrics)

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        return satchel.stream(
            iter(["ok"]), on_complete=lambda t: ctx.add_turn("assistant", t), protocol=protocol
        )

    def finals(body: str) -> list[dict[str, Any]]:
        if protocol == "satchel":
            return [
                json.loads(x.split("\n", 1)[0]) for x in body.split("event: satchel\ndata: ")[1:]
            ]
        parts = [json.loads(x.split("\n", 1)[0]) for x in body.split("data: ")[1:] if x[0] == "{"]
        return [p["data"] for p in parts if p["type"] == "data-satchel"]

    client = app.test_client()
    first = finals(client.post("/stream").get_data(as_text=True))
    assert len(first) == 1 and first[0]["degraded"] == []
    tier.refuse = True  # the claim is taken; the mark's write after the final event fails
    body = client.post("/stream", headers={"Satchel-Context": first[0]["token"]})
    sent = finals(body.get_data(as_text=True))
    assert [m["degraded"] for m in sent] == [[], ["consistency_unchecked"]]
    assert sent[0]["token"] == sent[1]["token"]
    assert metrics.registry.get_sample_value("satchel_degraded_responses_total") == 1


def test_a_fail_closed_stream_sends_no_token_it_could_not_check(tmp_path: Path) -> None:
    """Under fail_closed a streamed reply moves the mark before its final event: when
    the tier refuses that write, the stream ends in an error and carries no token (a
    token whose mark never moved would leave the spend open to a replay)."""
    tier = MarkRefusingTier()
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_TIER_DOWN_POLICY="fail_closed")
    satchel = Satchel(app, tier=tier)

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        return satchel.stream(iter(["ok"]), on_complete=lambda t: ctx.add_turn("assistant", t))

    client = app.test_client()
    first = client.post("/stream").get_data(as_text=True)
    assert "event: satchel" in first
    token = token_in(first)
    tier.refuse = True  # the stream's claim is taken; the mark's write at the end fails
    body = client.post("/stream", headers={"Satchel-Context": token}).get_data(as_text=True)
    assert "event: error" in body and "tier_unavailable" in body
    assert "event: satchel" not in body
    tier.refuse_claims = True  # the claim fails too: a JSON 503 before any text
    refused = client.post("/stream", headers={"Satchel-Context": token})
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "tier_unavailable"


def test_a_tier_failure_let_through_to_the_edge_names_no_server(redis_server: Any) -> None:
    """An app's admin route calls satchel.erase while Redis is down and lets the error
    through: a JSON 503, whose message does not give away the tier's address."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=redis_server.url, TESTING=True)
    satchel = Satchel(app)

    @app.post("/admin/erase/<session>")
    def erase(session: str) -> Any:
        return satchel.erase(session)

    redis_server.kill()
    response = app.test_client().post(f"/admin/erase/{'ab' * 16}")
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "tier_unavailable" and "retry" in error["message"]
    assert "127.0.0.1" not in error["message"] and str(redis_server.port) not in error["message"]


def test_a_first_mark_the_tier_never_took_is_not_reported_lost(
    tmp_path: Path, redis_server: Any
) -> None:
    """A session's first monotonic save while Redis is full (fail_open): served flagged,
    and its token must not claim a mark, or the next request, once Redis has room,
    reports a lost mark (consistency_reset, satchel_marks_lost_total, a page)."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, satchel = make_app(
        tmp_path,
        metrics,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_TIER_DOWN_POLICY="fail_open",
    )
    client = app.test_client()
    fill_up(redis_server)
    first = post(client, "/chat", None)
    assert first.status_code == 200
    assert first.headers["Satchel-Degraded"] == "consistency_unchecked"
    token = first.headers["Satchel-Context"]
    with app.app_context():
        opened = satchel.codec.open(token)
        sealed_parent = from_wire(unpack(satchel.codec.open_payload(token)[1])).parent
    assert opened.marked is False and opened.mark_id is None
    # The first token of a conversation: seq 1, no parent (the discarded seal is not one).
    assert first.headers["Satchel-Seq"] == str(opened.seq) == "1" and sealed_parent is None

    # A session's first monotonic request on a token it already had: the successor of
    # the token sent (seq + 1, its digest as the parent).
    sent = post(client, "/chat", None).headers["Satchel-Context"]
    with app.app_context():
        before = satchel.codec.open(sent)
        spent = post(client, "/spend", sent)
        assert spent.headers["Satchel-Degraded"] == "consistency_unchecked"
        after = satchel.codec.open_payload(spent.headers["Satchel-Context"])[1]
    assert from_wire(unpack(after)).seq == before.seq + 1
    assert from_wire(unpack(after)).parent == before.parent  # the sent token's digest

    redis_server.config_set({"maxmemory": 0})
    second = post(client, "/chat", token)
    assert second.status_code == 200 and "Satchel-Degraded" not in second.headers
    assert metrics.registry.get_sample_value("satchel_marks_lost_total") in (None, 0)
    # The mark is set now, and protects as usual.
    third = post(client, "/chat", second.headers["Satchel-Context"])
    assert third.status_code == 200
    assert post(client, "/chat", token).status_code == 409


def test_a_first_mark_whose_write_timed_out_but_landed_does_not_lock_the_session_out(
    tmp_path: Path, redis_server: Any
) -> None:
    """fail_open, Redis stalled during a session's first mark: the write timed out, the
    token was sealed again without its mark, and Redis ran the queued write once it
    resumed. The mark then named a token nobody had: every later request of the
    session was refused 409 (no token handed back), for the mark's lifetime."""
    import threading

    from satchel.consistency import mark_key

    app, satchel = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_TIER_DOWN_POLICY="fail_open",
    )
    resumed = threading.Event()

    @app.post("/stall")
    def stall() -> Any:
        satchel.context.add_turn("user", "hello")
        redis_server.pause()  # the mark's write meets a stalled Redis

        def resume() -> None:
            redis_server.resume()
            resumed.set()

        threading.Timer(0.3, resume).start()  # after the write's 50 ms timeout
        return {}

    client = app.test_client()
    warm = post(client, "/chat", None)  # pooled connections and scripts ready
    assert post(client, "/chat", warm.headers["Satchel-Context"]).status_code == 200
    first = client.post("/stall")
    assert first.status_code == 200
    assert first.headers["Satchel-Degraded"] == "consistency_unchecked"
    token = first.headers["Satchel-Context"]
    assert resumed.wait(5)
    with app.app_context():
        tag = satchel.codec.session_tag(satchel.codec.open(token).session_id)
    wait_until(lambda: redis_server.client().exists(mark_key(tag)) == 1, timeout=5)
    nxt = post(client, "/chat", token)  # the mark landed, naming this very token
    assert nxt.status_code == 200, nxt.get_data(as_text=True)
    assert "Satchel-Degraded" not in nxt.headers
    assert post(client, "/chat", nxt.headers["Satchel-Context"]).status_code == 200


@pytest.mark.parametrize("protocol", ["satchel", "ai-sdk"])
def test_a_tier_failure_in_a_stream_names_no_server_either(
    redis_server: Any, protocol: str
) -> None:
    """The same tier error raised inside a streamed reply: its error event says what an
    error response would, not the tier's message with the server's address."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=redis_server.url, TESTING=True)
    satchel = Satchel(app)

    @app.post("/stream")
    def stream() -> Any:
        satchel.context.add_turn("user", "hi")
        return satchel.stream(
            iter(["one ", "two"]),
            on_complete=lambda text: satchel.erase("ab" * 16),
            protocol=protocol,
        )

    redis_server.kill()
    body = app.test_client().post("/stream").get_data(as_text=True)
    assert "tier_unavailable" in body and "retry shortly" in body
    assert "127.0.0.1" not in body and str(redis_server.port) not in body


def test_an_unchecked_request_says_why_once_the_breaker_is_open(
    tmp_path: Path, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit event's detail: the failure underneath, then breaker_open."""
    client, token = monotonic_on_redis(tmp_path, redis_server, "fail_open")
    redis_server.kill()
    caplog.set_level("INFO", logger="satchel.audit")
    for _ in range(7):  # five failures open the breaker
        assert post(client, "/chat", token).status_code == 200
    details = [
        getattr(r, "satchel", {}).get("detail")
        for r in caplog.records
        if r.getMessage() == "degraded"
    ]
    assert details[0] == "ConnectionError" and details[-1] == "breaker_open"


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_requests_sent_at_once_with_one_token_stream_one_reply(tmp_path: Path, policy: str) -> None:
    """The mark moves when a streamed reply is complete, so every request sent at once
    with one token streamed the whole reply (the paid-for part: a model's answer, a
    credit's worth) and only the end told them apart. The first one claims the token;
    the others are refused with a JSON 409 before any text goes out."""
    import threading

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_TIER_DOWN_POLICY=policy,
    )
    satchel = Satchel(app)
    gate = threading.Event()
    charged: list[str] = []

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])

        def deltas() -> Iterator[str]:
            yield "the paid "
            gate.wait(5)  # held open while the others arrive
            yield "reply"

        def complete(text: str) -> None:
            charged.append(text)
            ctx.add_turn("assistant", text)

        return satchel.stream(deltas(), on_complete=complete)

    client = app.test_client()
    gate.set()
    first = client.post("/stream", json={"message": "hi"})
    token = token_in(first.get_data(as_text=True))
    charged.clear()
    gate.clear()

    headers = {"Satchel-Context": token}
    winner = client.post("/stream", json={"message": "go"}, headers=headers, buffered=False)
    assert winner.status_code == 200
    chunks = iter(winner.response)
    assert "the paid" in next(chunks).decode()  # streaming, held at the gate
    for _ in range(3):
        # From another thread, as another server thread would: a request made from
        # this one would share the streaming request's contexts (and its g).
        loser = in_thread(
            lambda: app.test_client().post("/stream", json={"message": "go"}, headers=headers)
        )
        assert loser.status_code == 409, loser.get_data(as_text=True)
        assert loser.get_json()["error"]["code"] == "context_busy"  # not stale: retry later
        assert loser.headers["Retry-After"] == "1"
        # A page on another origin must be able to read it.
        assert "Retry-After" in loser.headers["Access-Control-Expose-Headers"].split(", ")
    gate.set()
    body = "".join(c.decode() for c in chunks)
    winner.close()
    assert "event: satchel" in body and charged == ["the paid reply"]
    # The claim is gone with the stream: the winner's token goes on, the old one is stale.
    nxt = client.post(
        "/stream", json={"message": "next"}, headers={"Satchel-Context": token_in(body)}
    )
    assert nxt.status_code == 200 and "event: satchel" in nxt.get_data(as_text=True)
    assert "stale_context" in client.post(
        "/stream", json={"message": "x"}, headers=headers
    ).get_data(as_text=True)


def test_a_stream_that_waited_past_the_winners_save_is_refused(tmp_path: Path) -> None:
    """Two streams with one token, the second a little late: it passed the mark check
    while the first was still answering, and took the claim the moment the first
    released it, after the first's save had moved the mark. It streamed its whole reply
    and got a token the mark then refused forever (a conversation locked out). Now the
    claim looks at the mark again: 409 stale_context, before any text."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    loaded, go = threading.Event(), threading.Event()
    charged: list[str] = []

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context  # opened and checked against the mark here
        if request.headers.get("X-Late"):
            loaded.set()
            go.wait(5)  # the other request answers and saves meanwhile

        def complete(text: str) -> None:
            charged.append(text)
            ctx.add_turn("assistant", text)

        return satchel.stream(iter(["the paid reply"]), on_complete=complete)

    client = app.test_client()
    token = token_in(client.post("/stream").get_data(as_text=True))
    charged.clear()
    headers = {"Satchel-Context": token}
    late = start_in_thread(
        lambda: app.test_client().post("/stream", headers={**headers, "X-Late": "1"}, buffered=True)
    )
    assert loaded.wait(5)
    first = client.post("/stream", headers=headers).get_data(as_text=True)
    assert "event: satchel" in first  # answered, saved, claim released
    go.set()
    refused = late()
    assert refused.status_code == 409, refused.get_data(as_text=True)
    assert refused.get_json()["error"]["code"] == "stale_context"
    assert charged == ["the paid reply"]  # one reply paid for, not two
    # The winner's token goes on.
    nxt = client.post("/stream", headers={"Satchel-Context": token_in(first)})
    assert "event: satchel" in nxt.get_data(as_text=True)


def test_a_stream_that_fails_releases_its_claim(tmp_path: Path) -> None:
    """A reply that fails (a model error) issues no token: the client sends the same
    one again, which its own failed attempt's claim must not refuse."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    fail = [True]

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context

        def deltas() -> Iterator[str]:
            yield "partial "
            if fail[0]:
                raise RuntimeError("the model went away")
            yield "whole"

        return satchel.stream(deltas(), on_complete=lambda text: ctx.add_turn("assistant", text))

    client = app.test_client()
    fail[0] = False
    token = token_in(client.post("/stream", json={}).get_data(as_text=True))
    fail[0] = True
    failed = client.post("/stream", json={}, headers={"Satchel-Context": token})
    assert "stream_failed" in failed.get_data(as_text=True)
    fail[0] = False
    again = client.post("/stream", json={}, headers={"Satchel-Context": token})
    assert again.status_code == 200 and "event: satchel" in again.get_data(as_text=True)


def test_a_mark_that_vanishes_mid_request_is_reported_lost_not_a_race(tmp_path: Path) -> None:
    """The tier evicted the mark between the request's read and its compare-and-set:
    that is not another request winning (409 "another request finished first" sent a
    client with no newer token nowhere); the mark is set afresh and the loss flagged."""
    from satchel.consistency import mark_key

    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    state = Satchel.state(app)

    @app.post("/spend-evicted")
    @satchel.consistency("monotonic")
    def spend_evicted() -> Any:
        ctx = satchel.context
        tag = state.pipeline.session_tag(ctx.session_id)
        state.tier.delete([mark_key(tag)])  # evicted while the request runs
        return {"degraded": ctx.degraded}

    client = app.test_client()
    token = post(client, "/spend", post(client, "/chat", None).headers["Satchel-Context"])
    response = post(client, "/spend-evicted", token.headers["Satchel-Context"])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "consistency_reset" in response.headers["Satchel-Degraded"]
    # The mark was set afresh: the token before is refused again.
    stale = post(client, "/spend", token.headers["Satchel-Context"])
    assert stale.status_code == 409


def test_a_replay_the_mark_refuses_is_not_also_counted_as_a_fork(tmp_path: Path) -> None:
    """The fork detector ran before the mark's check: every refused replay also counted
    in satchel_forks_total (and logged a fork), which counts branches that were served."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app, _ = make_app(tmp_path, metrics, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    old = post(client, "/chat", None).headers["Satchel-Context"]
    post(client, "/spend", old)
    replay = post(client, "/spend", old)
    assert replay.status_code == 409 and "Satchel-Fork" not in replay.headers
    assert metrics.registry.get_sample_value("satchel_forks_total") == 0
    assert metrics.registry.get_sample_value("satchel_stale_refused_total") == 1


def test_a_change_of_anchor_does_not_lock_conversations_out(tmp_path: Path) -> None:
    """An unpinned ring's anchor is its last key, and the two-step rollout puts a new
    key last, then first: the anchor moves to the new key and back. Marks are named
    with the anchor, so after the move back every conversation met its old mark, which
    no current token descends from: 409 for good (an operator drill, monotonic, two
    instances). The guard now finds the mark under the other anchor the token does
    descend from: served, flagged consistency_reset, and the mark moves on. A real
    replay is still refused."""
    k3, k5 = Keyring.generate("k3").to_string(), Keyring.generate("k5").to_string()
    url = sqlite_url(tmp_path)

    def instance(keys: str) -> Any:
        app = Flask(__name__)
        app.config.update(
            SATCHEL_KEYS=keys, SATCHEL_OVERFLOW_URL=url, SATCHEL_CONSISTENCY="monotonic"
        )
        satchel = Satchel(app)

        @app.post("/spend")
        def spend() -> Any:
            ctx = satchel.context
            ctx.metadata["spent"] = ctx.metadata.get("spent", 0) + 1
            return {"spent": ctx.metadata["spent"], "degraded": ctx.degraded}

        return app.test_client()

    token, spent, flags = None, 0, []

    def spend(client: Any) -> None:
        nonlocal token, spent
        rv = client.post("/spend", headers={"Satchel-Context": token} if token else {})
        assert rv.status_code == 200, rv.get_data(as_text=True)
        spent += 1
        assert rv.get_json()["spent"] == spent
        flags.append(rv.get_json()["degraded"])
        token = rv.headers["Satchel-Context"]

    before, step1, step2 = instance(k3), instance(f"{k3},{k5}"), instance(f"{k5},{k3}")
    for client in (before, before, step1, step1, before, step2, step2, step1, step2, step2):
        spend(client)  # the fleet mixed, then settled on step 2: never refused
    assert flags[-1] == []  # settled: checked as usual again
    assert ["consistency_reset"] in flags
    previous = token
    spend(step2)
    rv = step2.post("/spend", headers={"Satchel-Context": previous})  # a replay
    assert rv.status_code == 409 and rv.get_json()["error"]["code"] == "stale_context"


def test_erasure_under_an_unpinned_ring_reaches_every_anchor(tmp_path: Path) -> None:
    """The guard keeps an unpinned ring's marks under each key's name, so erasure
    leaves its tombstone under each: an instance anchored elsewhere refuses too."""
    k3, k5 = Keyring.generate("k3").to_string(), Keyring.generate("k5").to_string()
    url = sqlite_url(tmp_path)
    apps = []
    for keys in (f"{k3},{k5}", k3, f"{k5},{k3}"):  # anchored by k5, k3, k3
        app = Flask(__name__)
        app.config.update(
            SATCHEL_KEYS=keys, SATCHEL_OVERFLOW_URL=url, SATCHEL_CONSISTENCY="monotonic"
        )
        satchel = Satchel(app)
        app.add_url_rule("/", "chat", lambda s=satchel: {"seq": s.context.seq}, methods=["POST"])
        apps.append((app, satchel))
    (first, erasing), (second, _), _third = apps
    token = first.test_client().post("/").headers["Satchel-Context"]
    token = (
        second.test_client()
        .post("/", headers={"Satchel-Context": token})
        .headers["Satchel-Context"]
    )
    with first.app_context():
        erasing.erase(erasing.codec.open(token).session_id)
    for app, _ in apps:
        rv = app.test_client().post("/", headers={"Satchel-Context": token})
        assert rv.status_code == 410, (app.config["SATCHEL_KEYS"][:2], rv.get_data(as_text=True))


def test_a_streams_second_look_at_the_mark_that_fails_follows_the_tier_policy(
    tmp_path: Path,
) -> None:
    """The look at the mark after taking the claim is a tier read like any other: when
    it fails, fail_closed answers 503 before any text (it streamed the whole reply on
    stale state and was refused only at the end)."""
    from satchel.errors import TierUnavailable
    from satchel.tiers.guard import Fetched

    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_TIER_DOWN_POLICY="fail_closed",
    )
    satchel = Satchel(app)
    loaded, go = threading.Event(), threading.Event()
    charged: list[str] = []

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        if request.headers.get("X-Late"):
            loaded.set()
            go.wait(5)

        def complete(text: str) -> None:
            charged.append(text)
            ctx.add_turn("assistant", text)

        return satchel.stream(iter(["the paid reply"]), on_complete=complete)

    client = app.test_client()
    token = token_in(client.post("/stream").get_data(as_text=True))
    charged.clear()
    late = start_in_thread(
        lambda: app.test_client().post(
            "/stream", headers={"Satchel-Context": token, "X-Late": "1"}, buffered=True
        )
    )
    assert loaded.wait(5)
    assert "event: satchel" in client.post("/stream", headers={"Satchel-Context": token}).get_data(
        as_text=True
    )
    tier = app.extensions["satchel"].guard.tier
    real = tier.get_many

    def mark_reads_fail_in_the_late_request(keys: Any, cache: bool = True) -> Any:
        late_request = has_request_context() and request.headers.get("X-Late")
        if late_request and any(k.endswith(":hwm") for k in keys):
            return Fetched(
                tuple(keys),
                {},
                dict.fromkeys(keys, "tier_unavailable"),
                error=TierUnavailable("down"),
            )
        return real(keys, cache=cache)

    tier.get_many = mark_reads_fail_in_the_late_request
    go.set()
    refused = late()
    assert refused.status_code == 503, refused.get_data(as_text=True)
    assert refused.get_json()["error"]["code"] == "tier_unavailable"
    assert charged == ["the paid reply"]


def test_a_request_sent_as_the_stream_hands_over_its_token_is_not_locked_out(
    tmp_path: Path,
) -> None:
    """A stream sends its token in the ``satchel`` event and moves the mark after (the
    client has the token by then). A tab that sends the moment the token arrives (the
    browser client releases its lock on that event) can read the mark before it moves
    and save after: its compare-and-set met the stream's own mark and failed, and the
    conversation was refused on every later request. The mark had moved to the save
    that issued the very token this request opened, so the request moves it on."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_CONSISTENCY="monotonic",
    )
    satchel = Satchel(app)
    loaded, go = threading.Event(), threading.Event()

    @app.post("/stream")
    def stream() -> Any:
        ctx = satchel.context
        return satchel.stream(
            iter(["a reply"]), on_complete=lambda text: ctx.add_turn("assistant", text)
        )

    @app.post("/chat")
    def chat() -> Any:
        ctx = satchel.context  # checked against the mark here
        if request.headers.get("X-Wait"):
            loaded.set()
            go.wait(5)  # the stream settles its mark meanwhile
        ctx.add_turn("user", "next")
        return {"turns": len(ctx.turns)}

    client = app.test_client()
    token = client.post("/chat").headers["Satchel-Context"]
    streamed = client.post("/stream", headers={"Satchel-Context": token}, buffered=False)
    chunks = iter(streamed.response)
    received = ""
    while "event: satchel" not in received:
        received += next(chunks).decode()
    handed_over = token_in(received)  # the mark has not moved yet
    late = start_in_thread(
        lambda: app.test_client().post(
            "/chat", headers={"Satchel-Context": handed_over, "X-Wait": "1"}
        )
    )
    assert loaded.wait(5)
    received += "".join(c.decode() for c in chunks)  # the stream ends: its mark moves
    streamed.close()
    go.set()
    answered = late()
    assert answered.status_code == 200, answered.get_data(as_text=True)
    nxt = client.post("/chat", headers={"Satchel-Context": answered.headers["Satchel-Context"]})
    assert nxt.status_code == 200, nxt.get_data(as_text=True)
    # A real replay is still refused.
    replay = client.post("/chat", headers={"Satchel-Context": handed_over})
    assert replay.status_code == 409


@pytest.mark.parametrize(
    ("lifetimes", "expected"),
    [
        ({"SATCHEL_IDLE_TTL": 60, "SATCHEL_MAX_AGE": 150}, 150 + 600),  # a short session
        ({"SATCHEL_IDLE_TTL": 60 * 86400, "SATCHEL_MAX_AGE": 90 * 86400}, 90 * 86400 + 600),
        ({"SATCHEL_IDLE_TTL": 60, "SATCHEL_MAX_AGE": None}, 31 * 86400),  # no end to outlive
    ],
    ids=["short", "long", "no-max-age"],
)
def test_marks_live_until_the_session_s_maximum_age_has_passed(
    tmp_path: Path, redis_server: Any, lifetimes: dict[str, Any], expected: int
) -> None:
    """Marks lived a fixed 31 days: a month of tier memory for every 150-second
    session, and for a 90-day one a mark gone while its tokens still opened (a replay
    then passed as consistency_reset). Not the idle TTL either: client-level requests
    keep any branch of the session alive (an older token included) without touching
    the mark, up to the maximum age, and a mark gone before then let that branch undo
    a spend at a monotonic route. Erasure tombstones outlive it, and 31 days."""
    app, satchel = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
        **lifetimes,
    )
    client = app.test_client()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    redis = redis_server.client()
    (mark,) = [key for key in redis.keys("*:hwm")]
    assert expected - 5 <= redis.ttl(mark) <= expected
    session = app.extensions["satchel"].codec.open(token).session_id.hex()
    with app.app_context():
        satchel.erase(session)
    assert redis.ttl(mark) >= max(expected, 31 * 86400) - 5


def test_a_branch_kept_alive_at_the_client_level_cannot_undo_a_spend_later(
    tmp_path: Path,
) -> None:
    """The attack on idle-TTL marks: spend at a monotonic route, keep an older token
    alive through the client-level chat route (each request renews its expiry and
    leaves the mark alone), wait until no spend happened for the idle TTL: the mark
    had expired and the old token spent again from its own credits."""
    from satchel.tiers import MemoryTier

    now = [1_800_000_000.0]
    tier = MemoryTier(clock=lambda: now[0])
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_IDLE_TTL=60, SATCHEL_MAX_AGE=86400)
    satchel = Satchel(app, tier=tier)
    state = satchel.state(app)
    for part in (state.codec, state.pipeline, state.guard):
        part.clock = lambda: now[0]

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", "hello")
        return {}

    @app.post("/spend")
    @satchel.consistency("monotonic")
    def spend() -> Any:
        credits = satchel.context.metadata.get("credits", 3) - 1
        satchel.context.metadata["credits"] = credits
        return {"credits": credits}

    client = app.test_client()
    old = post(client, "/chat", None).headers["Satchel-Context"]
    assert post(client, "/spend", old).get_json() == {"credits": 2}
    for _ in range(30):  # 30 minutes of keeping the old branch alive, a chat a minute
        now[0] += 55
        old = post(client, "/chat", old).headers["Satchel-Context"]
    replay = post(client, "/spend", old)
    assert replay.status_code == 409, replay.get_json()
    assert replay.get_json()["error"]["code"] == "stale_context"


def test_marks_follow_the_maximum_age_of_a_policy_passed_in(
    tmp_path: Path, redis_server: Any
) -> None:
    """Satchel(policy=...) renews tokens under its own maximum age: the marks were
    sized by the config's (30 days by default), so a 90-day policy's sessions lost
    their marks while a pre-spend branch could still open."""
    from satchel.lifecycle import LifecyclePolicy

    for max_age, expected in ((90 * 86400, 90 * 86400 + 600), (None, 31 * 86400)):
        redis_server.client().flushall()
        app = Flask(__name__)
        app.config.update(
            SATCHEL_KEYS=KEYS,
            SATCHEL_CONSISTENCY="monotonic",
            SATCHEL_OVERFLOW_URL=redis_server.url,
        )
        satchel = Satchel(app, policy=LifecyclePolicy(max_age=max_age))

        @app.post("/chat")
        def chat(satchel: Satchel = satchel) -> Any:
            satchel.context.add_turn("user", "hello")
            return {}

        post(app.test_client(), "/chat", None)
        redis = redis_server.client()
        (mark,) = redis.keys("*:hwm")
        assert expected - 5 <= redis.ttl(mark) <= expected


def test_a_stream_left_just_before_its_final_event_can_catch_up(tmp_path: Path) -> None:
    """The client saw the whole reply and closed its connection normally (a Stop at the
    very end, a reader done at the last text) while the server saved. The server's
    write of the final event into the half-closed socket succeeds, so it moves the mark
    to a token nobody holds: the client's token was then refused for good. Now the 409
    hands the newest token back. A real server and a raw socket, so the connection
    really closes (the test client cannot do that). wsgiref, as gunicorn, writes each
    piece of the body with one send, the first of which succeeds after the client has
    gone (werkzeug's dev server writes a chunk in three, and sees the reset).
    """
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    gate = threading.Event()
    settled = threading.Event()

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        gated = request.headers.get("X-Gate") == "1"

        def complete(text: str) -> None:
            if gated:
                assert gate.wait(10)  # the client closes while the server saves
            ctx.add_turn("assistant", text)

        response = satchel.stream(iter(["the ", "whole ", "reply"]), on_complete=complete)
        if gated:
            response.call_on_close(settled.set)
        return response

    server = threaded_wsgiref(app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    try:
        t0 = token_in(ok_post(port, None))
        # The request whose final event never reaches anyone.
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps({"message": "again"}).encode()
        sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Satchel-Context: {t0}\r\nX-Gate: 1\r\n".encode()
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        seen = b""
        while b"reply" not in seen:  # the last delta has arrived
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk
        assert b"event: satchel" not in seen
        sock.close()  # FIN: the client is gone, normally
        gate.set()
        # Until the abandoned stream has ended on the server, the token's claim
        # answers 409 context_busy.
        deadline = time.monotonic() + 10
        while True:
            replay = raw_post(port, t0)
            if replay[0] != 409 or "context_busy" not in replay[2]:
                break
            assert time.monotonic() < deadline, "the abandoned stream never ended"
            settled.wait(0.05)
        status, headers, text = replay
        assert status == 409 and "stale_context" in text, text
        newest = headers.get("satchel-context")
        assert newest, "locked out: the 409 carried no token"
        # The handed-back token holds the exchange the client never saw the end of,
        # and the conversation goes on from it.
        with app.app_context():
            turns = [t.content for t in satchel.codec.open(newest).turns]
        assert turns[-2:] == ["again", "the whole reply"]
        assert "event: satchel" in ok_post(port, newest)
    finally:
        server.shutdown()


def threaded_wsgiref(app: Flask) -> Any:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    return make_server("127.0.0.1", 0, app, server_class=Server, handler_class=QuietHandler)


def raw_post(port: int, token: str | None) -> tuple[int, dict[str, str], str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Satchel-Context"] = token
    try:
        conn.request("POST", "/stream", body=json.dumps({"message": "hi"}), headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text
    finally:
        conn.close()


def ok_post(port: int, token: str | None) -> str:
    status, _headers, text = raw_post(port, token)
    assert status == 200, text
    return text


def test_the_newest_token_is_handed_back_on_redis(tmp_path: Path, redis_server: Any) -> None:
    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=redis_server.url)
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)
    replay = post(client, "/spend", t0)
    assert replay.status_code == 409
    assert replay.headers["Satchel-Context"] == spent.headers["Satchel-Context"]
    # Erasure reaches it (the session's index lists it).
    tag = spent.headers["Satchel-Session"]
    assert redis_server.client().get(newest_key(tag)) is not None
    with app.app_context():
        satchel.erase(satchel.codec.open(t0).session_id)
    assert redis_server.client().get(newest_key(tag)) is None


def _a_session_on_sqlite(tmp_path: Path) -> tuple[Flask, Satchel, Any, str, bytes]:
    """An app with a SQLite tier, its test client, a conversation's first token and
    its session id (the erasure races below start from it)."""
    app, satchel = make_app(tmp_path, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    client = app.test_client()
    t0 = post(client, "/chat", None).headers["Satchel-Context"]
    with app.app_context():
        session_id = satchel.codec.open(t0).session_id
    return app, satchel, client, t0, session_id


def _assert_erased_without_a_newest_token(
    app: Flask, client: Any, session_id: bytes, token: str
) -> None:
    tag = Satchel.state(app).pipeline.session_tag(session_id)
    assert kept_newest(app, tag) is None
    assert post(client, "/spend", token).status_code == 410


def test_an_erasure_right_after_the_marks_write_leaves_no_newest_token(tmp_path: Path) -> None:
    """The mark and the newest token kept with it are written in one step: an erasure
    that comes right after the mark's write (before the request has answered) deletes
    both. (Written one after the other, such an erasure came between them in 32 of 150
    races, and the erased conversation's newest token stayed in the tier for a week.)"""
    app, satchel, client, t0, session_id = _a_session_on_sqlite(tmp_path)
    tier = Satchel.state(app).tier
    erased: list[dict[str, Any]] = []

    started: list[bool] = []

    def erase_once() -> None:
        if not started:  # once (the erasure's own tombstone comes through here too)
            started.append(True)
            with app.app_context():
                erased.append(satchel.erase(session_id))

    for name in ("compare_and_set_mark", "compare_and_set_mark_with", "compare_and_set_unclaimed"):
        original = getattr(tier, name)

        def wrapped(*args: Any, _original: Any = original) -> Any:
            result = _original(*args)
            erase_once()  # as if another process erased right after this write
            return result

        setattr(tier, name, wrapped)
    post(client, "/spend", t0)
    assert erased and erased[0]["tokens_refused"]
    _assert_erased_without_a_newest_token(app, client, session_id, t0)


def test_a_save_right_after_an_erasure_keeps_no_token(tmp_path: Path) -> None:
    """Erasure used to delete the session's keys, then write its tombstone. A save in
    between found its mark gone (a lost mark, as far as it can tell), set it again and
    kept its token with it; the erased conversation's newest token stayed in the tier
    for a week. The delete and the tombstone are one step now: the save comes after
    both and is refused."""
    app, satchel, client, t0, session_id = _a_session_on_sqlite(tmp_path)
    t1 = post(client, "/spend", t0).headers["Satchel-Context"]
    tier = Satchel.state(app).tier
    saved: list[Any] = []

    def then_a_save_comes(original: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            count = original(*args)
            if not saved:
                saved.append(in_thread(lambda: post(app.test_client(), "/spend", t1)))
            return count

        return wrapped

    for name in ("delete_session", "erase_session"):
        setattr(tier, name, then_a_save_comes(getattr(tier, name)))
    with app.app_context():
        satchel.erase(session_id)
    assert saved and saved[0].status_code == 410
    _assert_erased_without_a_newest_token(app, client, session_id, t1)


def test_a_blueprint_with_a_catch_all_handler_hands_back_the_newest_token_too(
    tmp_path: Path,
) -> None:
    """docs/lifecycle.md: a blueprint whose catch-all handler would take Satchel's errors
    registers satchel.handle_error for them. The handler it named before made the JSON
    body alone: a lost response's 409 then came without the newest token."""
    from flask import Blueprint

    from satchel.errors import SatchelError

    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    bp = Blueprint("api", __name__)

    @bp.errorhandler(Exception)
    def everything(exc: Exception) -> Any:
        return {"oops": True}, 500

    bp.register_error_handler(SatchelError, satchel.handle_error)

    @bp.post("/spend")
    @satchel.consistency("monotonic")
    def spend() -> Any:
        ctx = satchel.context
        ctx.metadata["credits"] = ctx.metadata.get("credits", 10) - 1
        return {"credits": ctx.metadata["credits"]}

    app.register_blueprint(bp)
    client = app.test_client()
    t0 = post(client, "/spend", None).headers["Satchel-Context"]
    spent = post(client, "/spend", t0)  # its response is lost
    replay = post(client, "/spend", t0)
    assert replay.status_code == 409 and replay.get_json()["error"]["code"] == "stale_context"
    assert replay.headers["Satchel-Context"] == spent.headers["Satchel-Context"]
    bad = post(client, "/spend", t0[:-4] + "AAAA")
    assert bad.status_code == 400 and bad.get_json()["error"]["code"].startswith("token_")


def test_a_json_route_asked_with_a_token_a_stream_is_answering_is_busy(tmp_path: Path) -> None:
    """Two devices with one token: one streams a reply, the other calls a monotonic JSON
    route (which takes no claim of its own). The JSON request won the mark, the stream's
    token became a sibling and was refused for good. Now the JSON request sees the
    stream's claim (read with the mark) and is answered 409 context_busy; once the
    stream has ended, the same token gets the stream's token back (its parent)."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    gate = threading.Event()

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context

        def deltas() -> Iterator[str]:
            yield "a "
            gate.wait(5)
            yield "reply"

        return satchel.stream(deltas(), on_complete=lambda t: ctx.add_turn("assistant", t))

    @app.post("/spend")
    @satchel.consistency("monotonic")
    def spend() -> Any:
        ctx = satchel.context
        ctx.metadata["credits"] = ctx.metadata.get("credits", 10) - 1
        return {"credits": ctx.metadata["credits"]}

    @app.get("/peek")
    @satchel.consistency("monotonic")
    def peek() -> Any:
        satchel.discard()
        return {"credits": satchel.context.metadata.get("credits", 10)}

    @app.get("/peek-and-save")
    @satchel.consistency("monotonic")
    def peek_and_save() -> Any:
        satchel.context.metadata["seen"] = True  # a GET that changes the context
        return {}

    client = app.test_client()
    token = post(client, "/spend", None).headers["Satchel-Context"]
    headers = {"Satchel-Context": token}
    streaming = client.post("/stream", json={}, headers=headers, buffered=False)
    chunks = iter(streaming.response)
    assert "a " in next(chunks).decode()  # held open at the gate
    other = in_thread(lambda: post(app.test_client(), "/spend", token))
    assert other.status_code == 409, other.get_data(as_text=True)
    assert other.get_json()["error"]["code"] == "context_busy"
    assert other.headers["Retry-After"] == "1"
    # A read meanwhile is served (a page reloading the chat right after a Stop)...
    read = in_thread(lambda: app.test_client().get("/peek", headers=headers))
    assert read.status_code == 200 and read.get_json() == {"credits": 9}
    # ...unless it saves after all.
    saving = in_thread(lambda: app.test_client().get("/peek-and-save", headers=headers))
    assert saving.status_code == 409 and saving.get_json()["error"]["code"] == "context_busy"
    gate.set()
    body = "".join(c.decode() for c in chunks)
    streaming.close()
    streamed = token_in(body)
    again = post(client, "/spend", token)  # the other device, after its wait
    assert again.status_code == 409 and again.headers["Satchel-Context"] == streamed
    assert post(client, "/spend", streamed).status_code == 200  # the stream's token goes on


@pytest.mark.parametrize("tier", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_json_request_checked_before_a_stream_claimed_its_token_cannot_move_the_mark(
    tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """monotonic: a JSON request passed the mark's check a moment before a stream of the
    same token claimed it, then saved and moved the mark while the reply streamed. The
    stream ended as a success (its token, no error, no fork), yet its message was lost:
    its token was a sibling the conversation never kept. The mark's move now checks the
    stream's claim in the same atomic step: the JSON request is refused 409
    context_busy, and the stream's turn is the conversation's."""
    url = sqlite_url(tmp_path) if tier == "sqlite" else request.getfixturevalue("redis_server").url
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS, TESTING=True, SATCHEL_CONSISTENCY="monotonic", SATCHEL_OVERFLOW_URL=url
    )
    satchel = Satchel(app)
    checked, go, gate = threading.Event(), threading.Event(), threading.Event()

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", "sent from another tab")
        checked.set()  # the mark was checked: no stream held the token yet
        go.wait(5)
        return {"ok": True}

    @app.post("/stream")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", "streamed question")

        def deltas() -> Any:
            yield "the paid "
            gate.wait(5)
            yield "reply"

        return satchel.stream(deltas(), on_complete=lambda text: ctx.add_turn("assistant", text))

    client = app.test_client()
    go.set()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    checked.clear()
    go.clear()
    json_save = start_in_thread(lambda: post(app.test_client(), "/chat", token))
    assert checked.wait(5)
    streaming = client.post("/stream", headers={"Satchel-Context": token}, buffered=False)
    chunks = iter(streaming.response)
    assert "the paid" in next(chunks).decode()  # claimed: the mark was as checked
    go.set()
    refused = json_save()
    assert refused.status_code == 409, refused.get_data(as_text=True)
    assert refused.get_json()["error"]["code"] == "context_busy"
    gate.set()
    body = "".join(c.decode() for c in chunks)
    streaming.close()
    assert "event: satchel" in body and "event: error" not in body, body
    newest = token_in(body)
    after = post(client, "/chat", newest)  # the stream's token is the conversation's
    assert after.status_code == 200, after.get_data(as_text=True)
    opened = Satchel.state(app).codec.open(after.headers["Satchel-Context"])
    assert [t.content for t in opened.turns].count("streamed question") == 1


def test_a_fork_found_when_a_monotonic_route_saves_is_counted(tmp_path: Path) -> None:
    """A client-level request and a monotonic one in flight at once with one token: the
    monotonic one, saved second, carried Satchel-Fork: sibling, but its mark had moved
    before the fork was found, and no fork_detected event (nor count) followed."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app, observer=metrics)
    checked, go = threading.Event(), threading.Event()

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", "chat")
        return {}

    @app.post("/spend")
    @satchel.consistency("monotonic")
    def spend() -> Any:
        satchel.context.metadata["spent"] = True
        checked.set()
        go.wait(5)
        return {}

    client = app.test_client()
    go.set()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    token = post(client, "/spend", token).headers["Satchel-Context"]  # marked
    go.clear()
    checked.clear()
    spending = start_in_thread(lambda: post(app.test_client(), "/spend", token))
    assert checked.wait(5)
    chatted = post(client, "/chat", token)  # saved first, while /spend waits
    assert chatted.status_code == 200 and "Satchel-Fork" not in chatted.headers
    go.set()
    spent = spending()
    assert spent.status_code == 200, spent.get_data(as_text=True)
    assert spent.headers["Satchel-Fork"] == "sibling"
    assert metrics.registry.get_sample_value("satchel_forks_total") == 1


def test_a_stream_whose_claim_expired_leaves_the_claim_another_stream_took() -> None:
    """A stream's model went silent past the claim's TTL; a second stream took the
    claim; the first, ending, deleted it unconditionally, and a third request then
    saved under the second stream's reply (which ended in an error event after its
    whole reply). A release removes its own claim only."""
    from satchel.consistency import release_claim, take_claim
    from satchel.observe import NULL_OBSERVER
    from satchel.tiers import MemoryTier

    tier = MemoryTier()
    key = "satchel:{s}:claim"
    first = take_claim(tier, key, NULL_OBSERVER, "s")
    tier.delete([key])  # as if it expired
    second = take_claim(tier, key, NULL_OBSERVER, "s")
    release_claim(tier, first)
    assert tier.get_many([key]) == [second.holder]  # the second stream's claim stays
    release_claim(tier, second)
    assert tier.get_many([key]) == [None]  # and its own release removes it
    assert take_claim(tier, key, NULL_OBSERVER, "s")  # free again at once


def test_a_fork_found_late_on_a_streamed_monotonic_reply_is_counted_once(
    tmp_path: Path,
) -> None:
    """The stream moves its mark after its final event (fail_open): the fork its save
    found was reported by the save and again by the deferred mark move."""
    from satchel.metrics import PrometheusObserver

    metrics = PrometheusObserver()
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, TESTING=True, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app, observer=metrics)
    gate = threading.Event()

    @app.post("/chat")
    def chat() -> Any:
        satchel.context.add_turn("user", "chat")
        return {}

    @app.post("/stream")
    @satchel.consistency("monotonic")
    def stream() -> Any:
        ctx = satchel.context

        def deltas() -> Any:
            yield "part "
            gate.wait(5)
            yield "end"

        return satchel.stream(deltas(), on_complete=lambda t: ctx.add_turn("assistant", t))

    client = app.test_client()
    gate.set()
    token = post(client, "/chat", None).headers["Satchel-Context"]
    token = token_in(
        client.post("/stream", headers={"Satchel-Context": token}).get_data(as_text=True)
    )
    gate.clear()
    streaming = client.post("/stream", headers={"Satchel-Context": token}, buffered=False)
    chunks = iter(streaming.response)
    assert "part" in next(chunks).decode()
    assert in_thread(lambda: post(app.test_client(), "/chat", token)).status_code == 200
    gate.set()
    body = "".join(c.decode() for c in chunks)
    streaming.close()
    assert '"fork":"sibling"' in body.replace(" ", "")
    assert metrics.registry.get_sample_value("satchel_forks_total") == 1


class HeldStream:
    """One streamed POST read in a thread of its own (a stream's request context lives
    in the thread that reads it), up to its ``satchel`` event: the token is handed over
    and the mark not moved yet. The rest (the mark move) is read on :meth:`settle`.
    ``wait=False``: return at once (the view may be held); ``handed_over`` says when."""

    def __init__(
        self, app: Flask, path: str, token: str | None, message: str, *, wait: bool = True
    ) -> None:
        self.app, self.path, self.message = app, path, message
        self.handed_over, self.go = threading.Event(), threading.Event()
        self.token, self.body, self.status = "", "", 0
        self.thread = threading.Thread(target=self._run, args=(token,))
        self.thread.start()
        if wait:
            assert self.handed_over.wait(5)

    def _run(self, token: str | None) -> None:
        headers = {"Satchel-Context": token} if token else {}
        response = self.app.test_client().post(
            self.path, json={"message": self.message}, headers=headers
        )
        self.status = response.status_code
        if self.status != 200:  # refused: said at once, not by a timeout
            self.body = response.get_data(as_text=True)
            self.handed_over.set()
            return
        chunks = iter(response.response)
        while "event: satchel" not in self.body:
            self.body += next(chunks).decode()
        self.token = token_in(self.body)
        self.handed_over.set()
        self.go.wait(5)
        self.body += "".join(c.decode() for c in chunks)
        response.close()

    def settle(self) -> None:
        self.go.set()
        self.thread.join(5)


def test_tokens_sent_as_each_stream_hands_them_over_stay_accepted_down_the_chain(
    tmp_path: Path,
) -> None:
    """Each stream moves its mark after its satchel event. A client that sends every
    message the moment that event arrives (the browser client frees its lock there)
    has its second stream checked against the mark before the first moved it: that
    save named the older id as its parent, and the token it handed over met the first
    stream's moved mark and was refused for good (409 stale_context for the newest
    token, 1 to 7 times in 180 messages under gunicorn). A token made from the one
    the mark names descends from it."""
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=KEYS,
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path),
        SATCHEL_CONSISTENCY="monotonic",
    )
    satchel = Satchel(app)

    @app.post("/stream")
    def stream() -> Any:
        ctx = satchel.context
        ctx.add_turn("user", request.get_json()["message"])
        return satchel.stream(
            iter(["a reply"]), on_complete=lambda text: ctx.add_turn("assistant", text)
        )

    def handed_over(token: str, message: str) -> HeldStream:
        held = HeldStream(app, "/stream", token, message)
        assert held.status == 200, held.body
        return held

    def settle(held: HeldStream) -> None:
        held.settle()
        assert "event: error" not in held.body, held.body

    first = app.test_client().post("/stream", json={"message": "m0"})
    one = handed_over(token_in(first.get_data(as_text=True)), "m1")
    two = handed_over(one.token, "m2")  # checked before one moved the mark
    settle(one)  # the mark names one's token now
    three = handed_over(two.token, "m3")  # two's token, made from one's: accepted
    settle(two)
    settle(three)
    last = app.test_client().post(
        "/stream", json={"message": "m4"}, headers={"Satchel-Context": three.token}
    )
    final = token_in(last.get_data(as_text=True))
    with app.app_context():
        users = [t.content for t in satchel.codec.open(final).turns if t.role == "user"]
    assert users == ["m0", "m1", "m2", "m3", "m4"]


@pytest.mark.parametrize("parent_settles", ["before the claim", "after the claim"])
def test_a_chain_of_streamed_spends_never_spends_a_credit_twice(
    tmp_path: Path, parent_settles: str
) -> None:
    """O settled; streams with O (P handed over) and with P (T handed over) not yet
    settled; a stream with T opened it, then P's mark move landed (before or after that
    stream claimed). The stream with T delivered its goods and its mark move lost (it
    expected the older mark), so T's own settle moved the mark on and a spend with T
    was accepted: one credit paid for twice. A mark moved to the token the opened one
    was made from is that token's own settle, and the move goes on from there."""
    app = Flask(__name__)
    app.config.update(SATCHEL_KEYS=KEYS, SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path))
    satchel = Satchel(app)
    hold: dict[str, tuple[threading.Event, threading.Event]] = {}

    @app.post("/spend")
    @satchel.consistency("monotonic")
    def spend() -> Any:
        ctx = satchel.context  # the mark is checked here
        message = request.get_json()["message"]
        if message in hold:  # the view's own work before it streams
            opened, go = hold[message]
            opened.set()
            go.wait(5)
        credits = ctx.metadata.get("credits", 10) - 1
        ctx.metadata["credits"] = credits
        return satchel.stream(iter([f"goods for {message}"]))

    o = HeldStream(app, "/spend", None, "o")
    o.settle()
    p = HeldStream(app, "/spend", o.token, "p")
    t = HeldStream(app, "/spend", p.token, "t")  # checked against the mark that names O
    hold["u"] = (threading.Event(), threading.Event())
    u = HeldStream(app, "/spend", t.token, "u", wait=False)
    assert hold["u"][0].wait(5)  # u's request opened T
    if parent_settles == "before the claim":
        p.settle()
        hold["u"][1].set()
        assert u.handed_over.wait(5)
    else:
        hold["u"][1].set()
        assert u.handed_over.wait(5)
        p.settle()
    assert u.status == 200, u.body
    u.settle()
    t.settle()
    again = app.test_client().post(
        "/spend", json={"message": "v"}, headers={"Satchel-Context": t.token}
    )
    assert again.status_code == 409  # T's reply was paid for; U is the newest
    newest = app.test_client().post(
        "/spend", json={"message": "w"}, headers={"Satchel-Context": u.token}
    )
    assert newest.status_code == 200
    delivered = [s.message for s in (o, p, t, u) if s.token] + ["w"]  # goods handed over
    final = token_in(newest.get_data(as_text=True))  # read outside any app context
    with app.app_context():
        left = satchel.codec.open(final).metadata["credits"]
    assert left == 10 - len(delivered), (left, delivered)


@pytest.mark.parametrize("mode", ["client", "server", "memory"])
def test_an_erased_conversation_starts_afresh_under_the_fresh_policy(
    tmp_path: Path, mode: str
) -> None:
    """Under SATCHEL_ON_BAD_TOKEN=fresh an erased session's request starts a new
    conversation under a new id, flagged Satchel-Reset: token_erased (docs/consistency.md,
    "Erasure"). Server and memory mode did; client mode at the monotonic level answered
    410, the erasure being found by the mark after the policy's place."""
    app, satchel = make_app(
        tmp_path,
        SATCHEL_MODE=mode,
        SATCHEL_CONSISTENCY="monotonic" if mode == "client" else "client",
        SATCHEL_ON_BAD_TOKEN="fresh",
        SATCHEL_OVERFLOW_URL=sqlite_url(tmp_path) if mode != "memory" else "",
    )
    client = app.test_client()
    token = post(client, "/chat", None, "remember the erased secret").headers["Satchel-Context"]
    with app.app_context():
        state = satchel.state()
        opened = satchel.codec.open(token).session_id if mode == "client" else None
        session_id = opened or state.pipeline.session_id_of(token)
        satchel.erase(session_id)
    fresh = post(client, "/chat", token, "hello again")
    assert fresh.status_code == 200, fresh.get_data(as_text=True)
    assert fresh.headers["Satchel-Reset"] == "token_erased"
    new_token = fresh.headers["Satchel-Context"]
    with app.app_context():
        if mode == "client":
            ctx = satchel.codec.open(new_token)
            assert ctx.session_id != session_id
            assert [t.content for t in ctx.turns if t.role == "user"] == ["hello again"]
        else:
            assert state.pipeline.session_id_of(new_token) != session_id
    # The new conversation goes on (its mark, in client mode, was set afresh).
    assert post(client, "/chat", new_token, "and on").status_code == 200
    # The erased one stays erased.
    assert post(client, "/chat", token).headers["Satchel-Reset"] == "token_erased"


def test_a_streams_mark_move_superseded_by_the_next_message_is_not_a_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fail_open streams move their mark after the token went out. A client that sends
    its next message the moment the token arrives (as the browser client does) moves
    the mark first: the stream's move then loses, though nothing was refused. It was
    counted in satchel_stale_refused_total and logged as stale_refused (a WARNING)."""
    from examples.chat.app import create_app
    from examples.chat.models import OfflineModel

    app = create_app(
        {
            "SATCHEL_KEYS": KEYS,
            "SATCHEL_OVERFLOW_URL": f"sqlite:///{tmp_path / 'tier.db'}",
            "SATCHEL_CONSISTENCY": "monotonic",
            "CHAT_MODEL": OfflineModel(),
            "TESTING": True,
        }
    )
    client = app.test_client()
    token = client.post("/api/chat", json={"message": "zero"}).headers["Satchel-Context"]
    with caplog.at_level(logging.INFO, logger="satchel.audit"):
        streamed = client.post(
            "/api/chat/stream",
            json={"message": "one"},
            headers={"Satchel-Context": token},
            buffered=False,
        )
        chunks = iter(streamed.response)
        received = ""
        while "event: satchel" not in received:
            received += next(chunks).decode()
        final = next(b for b in received.split("\n\n") if b.startswith("event: satchel"))
        newest = json.loads(final.split("data: ", 1)[1])["token"]
        nxt = client.post("/api/chat", json={"message": "two"}, headers={"Satchel-Context": newest})
        assert nxt.status_code == 200 and "Satchel-Degraded" not in nxt.headers
        rest = b"".join(chunks).decode()
        streamed.close()
    assert "event: done" in rest and "event: error" not in rest
    events = [r.satchel_event for r in caplog.records if r.name == "satchel.audit"]
    assert "stale_refused" not in events and "mark_superseded" in events
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "satchel_stale_refused_total 0.0" in metrics
    after = client.post(
        "/api/chat",
        json={"message": "three"},
        headers={"Satchel-Context": nxt.headers["Satchel-Context"]},
    )
    assert after.status_code == 200


def test_a_first_mark_sqlite_refused_is_not_kept_and_not_reported_lost(tmp_path: Path) -> None:
    """Only a write that may still land (a Redis timeout) keeps its token marked. SQLite
    writes are synchronous: a first mark it refused (database is locked) never lands,
    and a token kept marked reported a lost mark on the next request."""
    import sqlite3

    db = tmp_path / "tier.db"
    app, satchel = make_app(
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=f"sqlite:///{db}",
        SATCHEL_TIER_DOWN_POLICY="fail_open",
    )
    client = app.test_client()
    post(client, "/chat", None)  # the file and its table exist
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past busy_timeout
    try:
        first = post(client, "/chat", None)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert first.headers["Satchel-Degraded"] == "consistency_unchecked"
    token = first.headers["Satchel-Context"]
    with app.app_context():
        assert satchel.codec.open(token).marked is False
    nxt = post(client, "/chat", token)
    assert nxt.status_code == 200 and "Satchel-Degraded" not in nxt.headers


def test_a_guard_that_seals_but_cannot_check_takes_no_plain_record() -> None:
    """Plain records (a release before sealing kept them so) are handed back only by a
    guard that opens them first (open_token): one built with at_rest alone handed a
    planted header-injecting string back as it was."""
    import os

    from satchel.consistency import MonotonicGuard, encode_newest
    from satchel.keys import Keyring
    from satchel.protect import AtRest
    from satchel.tiers import GuardedTier, MemoryTier

    tier = GuardedTier(MemoryTier())
    ring = Keyring.generate("k1")
    mark, parent = os.urandom(16), os.urandom(16)
    tier.put(newest_key("t"), encode_newest(mark, parent, "s1.x\r\nSet-Cookie: a=b", 3), 600)
    sealing_only = MonotonicGuard(tier, at_rest=AtRest(ring, "satchel", "newest-record"))
    assert sealing_only._newest_for("t", mark, parent) is None
    unchecked = MonotonicGuard(tier)  # checks nothing, as before records were sealed
    assert unchecked._newest_for("t", mark, parent) == ("s1.x\r\nSet-Cookie: a=b", 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_starts_with_no_late_releases_and_a_free_lock() -> None:
    """gunicorn --preload forks workers from the master: a child inherited the
    master's pending claims (the master's to release) and, if the release thread held
    the lock at the fork, a lock nobody would ever let go: its first add() hung."""
    from satchel.consistency import Claim, LateReleases

    releases = LateReleases(interval=3600)
    releases._pending.append((object(), Claim("k", b"h"), time.monotonic() + 60))
    read_end, write_end = os.pipe()
    with releases._lock:  # held by "the release thread" at the fork
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            try:
                free = releases._lock.acquire(timeout=2)
                if free:
                    releases._lock.release()
                os.write(write_end, b"ok" if free and releases.pending() == 0 else b"no")
            finally:
                os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 2)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert releases.pending() == 1  # the parent's own are untouched
