"""The redis helpers really start, break and heal redis-server processes."""

from __future__ import annotations

import time

import pytest
import redis

from tests.support import RedisServer, free_port
from tests.support.procs import proc_state

pytestmark = pytest.mark.redis


def test_set_get_and_url(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.set("k", "v")
    assert client.get("k") == b"v"
    assert redis.Redis.from_url(redis_server.url).get("k") == b"v"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    # the helper's own flags: nothing persisted
    assert redis_server.config_get("save") == ""
    assert redis_server.config_get("appendonly") == "no"


def test_kill_then_restart_on_same_port(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("k", "v")
    port, pid = redis_server.port, redis_server.pid

    redis_server.kill()
    assert not redis_server.running
    assert proc_state(pid) is None
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get("k")

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert client.get("k") is None  # fresh process, no persistence
    assert client.set("k", "v2")
    assert client.get("k") == b"v2"


def test_pause_times_out_then_resume_works(redis_server: RedisServer) -> None:
    fast = redis_server.client(socket_timeout=0.05)
    assert fast.ping()

    redis_server.pause()
    assert redis_server.paused
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        fast.get("anything")
    assert time.monotonic() - started < 2

    redis_server.resume()
    assert not redis_server.paused
    slow = redis_server.client()
    assert slow.set("after", "1")
    assert slow.get("after") == b"1"


def test_stop_terminates_process(redis_factory) -> None:
    server = redis_factory()
    pid = server.pid
    server.stop()
    assert not server.running
    assert proc_state(pid) is None
    assert not server.ping()


def test_maxmemory_noeviction_rejects_writes(redis_factory) -> None:
    server = redis_factory(config={"maxmemory-policy": "noeviction"})
    client = server.client()
    client.set("small", "ok")
    used = client.info("memory")["used_memory"]
    server.config_set("maxmemory", used + 256 * 1024)
    assert server.config_get("maxmemory") == str(used + 256 * 1024)

    chunk = b"x" * (64 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for i in range(64):  # 4 MiB at most; fails after ~256 KiB
            client.set(f"big:{i}", chunk)
    assert client.get("small") == b"ok"  # reads still work
    assert client.delete("small") == 1  # and deletes


def test_factory_servers_are_independent(redis_factory) -> None:
    a = redis_factory()
    b = redis_factory(config={"maxmemory": "10mb", "maxmemory-policy": "allkeys-lru"})
    assert a.port != b.port
    a.client().set("k", "a")
    assert b.client().get("k") is None
    assert b.config_get("maxmemory-policy") == "allkeys-lru"


def test_explicit_port_and_context_manager() -> None:
    port = free_port()
    with RedisServer(port=port) as server:
        assert server.port == port
        assert server.client().ping()
        pid = server.pid
    assert proc_state(pid) is None


def test_cluster_set_get_across_slots(redis_cluster) -> None:
    client = redis_cluster.client()
    keys = [f"key:{i}" for i in range(30)]
    slots = {client.keyslot(k) for k in keys}
    owners = {client.get_node_from_key(k).port for k in keys}
    assert len(slots) > 1
    assert len(owners) == 3  # keys land on every master
    for k in keys:
        assert client.set(k, k.upper())
    for k in keys:
        assert client.get(k) == k.upper().encode()
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.addresses[0][1]}"
    assert len(redis_cluster.startup_nodes) == 3
    for node in redis_cluster.nodes:
        assert redis_cluster.cluster_info(node)["cluster_state"] == "ok"


def test_cluster_flushall(redis_cluster) -> None:
    client = redis_cluster.client()
    client.set("{tag}a", "1")
    redis_cluster.flushall()
    assert client.get("{tag}a") is None
