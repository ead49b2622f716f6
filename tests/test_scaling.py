"""Many instances, no affinity: one conversation served alternately by separate processes.

Every test starts two (or three) real app processes (``LiveServer``: gunicorn or
werkzeug) on different ports with the same key ring, and sends the turns of one
conversation to them in turn, as a round-robin load balancer without sticky sessions
would. Client mode needs nothing shared but the keys; the overflow tier and server
mode share a Redis (single server or Cluster); memory mode needs affinity, and the
key rotation tests show the two-step rollout across instances (docs/scaling.md).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

from satchel.keys import generate_key
from tests.support import LiveServer

APP = "examples.minimal_chat.app:create_app"
HEADER = "Satchel-Context"
K1 = generate_key("k1").to_string()
K2 = generate_key("k2").to_string()


def serve(factory: Any, env: dict[str, str], server: str = "werkzeug", **kw: Any) -> LiveServer:
    base = {"SATCHEL_KEYS": K1}
    return factory(APP, env={**base, **env}, server=server, **kw)


def message(n: int) -> str:
    # A digest per message keeps the text from compressing away, so that a small
    # byte budget really pushes turns into the overflow tier.
    code = hashlib.sha256(f"message {n}".encode()).hexdigest()
    return f"Message {n}: please keep track of item {n}, its code is {code}."


def send(srv: LiveServer, text: str, token: str | None) -> Any:
    headers = {HEADER: token} if token else {}
    resp = srv.post("/api/chat", json_body={"message": text}, headers=headers)
    assert resp.status == 200, f"{srv!r}: {resp.status} {resp.text}"
    return resp


def turn_of(resp: Any) -> int:
    match = re.match(r"\(turn (\d+)\)", resp.json()["reply"])
    assert match, resp.text
    return int(match.group(1))


def alternate(
    servers: list[LiveServer], count: int, token: str | None = None, start: int = 0
) -> tuple[str, list[Any]]:
    """Send ``count`` messages, round robin over ``servers``; returns the last token."""
    responses = []
    for n, srv in zip(range(start, start + count), itertools.cycle(servers), strict=False):
        resp = send(srv, message(n), token)
        token = resp.headers[HEADER]
        responses.append(resp)
    assert token is not None
    return token, responses


def context_of(srv: LiveServer, token: str) -> dict[str, Any]:
    resp = srv.get("/api/context", headers={HEADER: token})
    assert resp.status == 200, resp.text
    data = resp.json()
    data["_degraded"] = resp.headers.get("Satchel-Degraded")
    return data


def user_texts(ctx: dict[str, Any]) -> list[str]:
    return [t["content"] for t in ctx["all_turns"] if t["role"] == "user"]


# ----------------------------------------------------------------------------- client


def test_client_mode_two_instances_no_affinity(live_server_factory: Any) -> None:
    a = serve(live_server_factory, {}, server="gunicorn", workers=2)
    b = serve(live_server_factory, {})
    token, responses = alternate([a, b], 8)

    assert [turn_of(r) for r in responses] == list(range(1, 9))
    assert {r.headers["Satchel-Session"] for r in responses} == {
        responses[0].headers["Satchel-Session"]
    }
    for srv in (a, b):
        assert user_texts(context_of(srv, token)) == [message(n) for n in range(8)]


def test_overflow_on_a_shared_redis_is_rehydrated_by_the_other_instance(
    live_server_factory: Any, redis_server: Any
) -> None:
    env = {
        "SATCHEL_OVERFLOW_URL": redis_server.url,
        "SATCHEL_MAX_TOKEN_BYTES": "900",
        "SATCHEL_MAX_TURNS": "400",
    }
    a = serve(live_server_factory, env, server="gunicorn", workers=2)
    b = serve(live_server_factory, env)
    token, responses = alternate([a, b], 14)

    assert [turn_of(r) for r in responses] == list(range(1, 15))
    assert not [
        r.headers.get("Satchel-Degraded") for r in responses if "Satchel-Degraded" in r.headers
    ]
    segments = [k for k in redis_server.client().keys("*") if b":seg:" in k]
    assert segments, "the budget was meant to push turns into the overflow tier"
    for srv in (a, b):
        ctx = context_of(srv, token)
        assert ctx["_degraded"] is None
        assert ctx["overflow"], "some turns live in Redis, not in the token"
        assert len(ctx["turns"]) < len(ctx["all_turns"]) == 28
        assert user_texts(ctx) == [message(n) for n in range(14)]

    # Control: an instance with the same keys but without the shared tier cannot.
    lone = serve(
        live_server_factory, {"SATCHEL_MAX_TOKEN_BYTES": "900", "SATCHEL_MAX_TURNS": "400"}
    )
    ctx = context_of(lone, token)
    assert ctx["_degraded"] and "tier_unavailable" in ctx["_degraded"]
    assert len(ctx["all_turns"]) < 28


def test_overflow_tier_on_redis_cluster(live_server_factory: Any, redis_cluster: Any) -> None:
    redis_cluster.flushall()
    host, port = redis_cluster.addresses[0]
    env = {
        "SATCHEL_OVERFLOW_URL": f"redis+cluster://{host}:{port}",
        "SATCHEL_MAX_TOKEN_BYTES": "900",
        "SATCHEL_MAX_TURNS": "400",
    }
    a = serve(live_server_factory, env, server="gunicorn", workers=2)
    b = serve(live_server_factory, env)
    token, responses = alternate([a, b], 14)

    assert [turn_of(r) for r in responses] == list(range(1, 15))
    assert all("Satchel-Degraded" not in r.headers for r in responses)
    for srv in (a, b):
        ctx = context_of(srv, token)
        assert ctx["_degraded"] is None
        assert ctx["overflow"]
        assert user_texts(ctx) == [message(n) for n in range(14)]


# ------------------------------------------------------------------- server and memory


def test_server_mode_instances_share_one_redis(live_server_factory: Any, redis_server: Any) -> None:
    # Only SATCHEL_OVERFLOW_URL: server mode's store falls back to it.
    env = {"SATCHEL_MODE": "server", "SATCHEL_OVERFLOW_URL": redis_server.url}
    a = serve(live_server_factory, env, server="gunicorn", workers=2)
    b = serve(live_server_factory, env)
    carrier, responses = alternate([a, b], 8)

    assert [turn_of(r) for r in responses] == list(range(1, 9))
    assert {r.headers[HEADER] for r in responses} == {carrier}
    assert all("Satchel-Reset" not in r.headers for r in responses)
    for srv in (a, b):
        assert user_texts(context_of(srv, carrier)) == [message(n) for n in range(8)]
    assert [k for k in redis_server.client().keys("*") if k.endswith(b":ctx")]


def test_memory_mode_needs_affinity(live_server_factory: Any) -> None:
    """Two memory-mode processes do not share contexts: the second starts over."""
    a = serve(live_server_factory, {"SATCHEL_MODE": "memory"})
    b = serve(live_server_factory, {"SATCHEL_MODE": "memory"})
    carrier, responses = alternate([a], 2)
    assert turn_of(responses[-1]) == 2

    resp = send(b, message(2), carrier)
    assert resp.headers["Satchel-Reset"] == "session_not_found"
    assert turn_of(resp) == 1
    assert turn_of(send(a, message(3), carrier)) == 3  # a still has its own copy


# ------------------------------------------------------------------------ key rotation


def test_two_step_key_rollout_across_instances(live_server_factory: Any) -> None:
    """k2 goes everywhere at the END of the ring first (accepted, not sealing), then to
    the front. No instance ever sees a token sealed with a key it does not know."""
    a = serve(live_server_factory, {"SATCHEL_KEYS": K1})
    b = serve(live_server_factory, {"SATCHEL_KEYS": K1})
    token, _ = alternate([a, b], 2)

    # Step 1, instance by instance: add k2 at the end. Everyone still seals with k1.
    b.restart(env={"SATCHEL_KEYS": f"{K1},{K2}"})
    token, responses = alternate([a, b], 2, token, start=2)
    a.restart(env={"SATCHEL_KEYS": f"{K1},{K2}"})
    token, more = alternate([a, b], 2, token, start=4)
    responses += more

    # Step 2, instance by instance: move k2 to the front. Mixed rings still agree.
    b.restart(env={"SATCHEL_KEYS": f"{K2},{K1}"})
    token, more = alternate([a, b], 4, token, start=6)
    responses += more
    a.restart(env={"SATCHEL_KEYS": f"{K2},{K1}"})
    token, more = alternate([a, b], 2, token, start=10)
    responses += more

    assert [turn_of(r) for r in responses] == list(range(3, 13))
    assert user_texts(context_of(a, token)) == [message(n) for n in range(12)]


def test_new_key_at_the_front_on_one_instance_breaks_the_others(
    live_server_factory: Any,
) -> None:
    """Why the two steps: a token sealed with k2 means nothing to an instance without k2."""
    a = serve(live_server_factory, {"SATCHEL_KEYS": K1})
    b = serve(live_server_factory, {"SATCHEL_KEYS": f"{K2},{K1}"})
    token = send(b, message(0), None).headers[HEADER]
    resp = a.post("/api/chat", json_body={"message": message(1)}, headers={HEADER: token})
    assert resp.status == 400
    assert resp.json()["error"]["code"] == "token_unknown_key"


def _server_mode_rollout(factory: Any, redis_url: str, anchor: str | None) -> list[Any]:
    env = {"SATCHEL_MODE": "server", "SATCHEL_OVERFLOW_URL": redis_url, "SATCHEL_KEYS": K1}
    if anchor:
        env["SATCHEL_ANCHOR_KID"] = anchor
    a = serve(factory, env)
    b = serve(factory, env)
    carrier, responses = alternate([a, b], 2)
    b.restart(env={"SATCHEL_KEYS": f"{K1},{K2}"})  # step 1 on one instance
    carrier, more = alternate([a, b], 2, carrier, start=2)
    responses += more
    a.restart(env={"SATCHEL_KEYS": f"{K1},{K2}"})
    b.restart(env={"SATCHEL_KEYS": f"{K2},{K1}"})  # step 2
    carrier, more = alternate([a, b], 2, carrier, start=4)
    return responses + more


def test_server_mode_two_step_rollout_with_a_pinned_anchor(
    live_server_factory: Any, redis_server: Any
) -> None:
    """Server-mode store keys are named with the anchor key: pin it during a rollout."""
    responses = _server_mode_rollout(live_server_factory, redis_server.url, anchor="k1")
    assert [turn_of(r) for r in responses] == list(range(1, 7))
    assert all("Satchel-Reset" not in r.headers for r in responses)


def test_server_mode_rollout_without_a_pinned_anchor_resets_sessions(
    live_server_factory: Any, redis_server: Any
) -> None:
    """The hazard docs/scaling.md warns about: the anchor defaults to the LAST key of the
    ring, so appending the new key (step 1) renames every server-mode session: the
    instances that already have the new ring no longer find them."""
    responses = _server_mode_rollout(live_server_factory, redis_server.url, anchor=None)
    resets = [r.headers.get("Satchel-Reset") for r in responses]
    assert "session_not_found" in resets
    assert [turn_of(r) for r in responses] != list(range(1, 7))
