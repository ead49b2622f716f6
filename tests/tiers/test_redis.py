"""RedisTier, GuardedTier and SegmentStore against real redis-server processes:
round trips, TTLs, kill -9, SIGSTOP, restart, the breaker, maxmemory, the cache."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from satchel import Codec
from satchel.errors import TierFull, TierUnavailable
from satchel.segments import SEGMENT_MISSING, TIER_UNAVAILABLE, SegmentStore
from satchel.tiers import (
    BreakerPolicy,
    GuardedTier,
    RedisTier,
    SegmentCache,
    Timeouts,
    default_retry,
    tier_from_url,
)
from tests.support import RedisServer, timed_without_gc, wait_until

from .conftest import Events, FakeClock, make_ctx

pytestmark = pytest.mark.redis

FAST = Timeouts(read=0.05, connect=0.1)


def command_calls(side) -> dict[str, int]:
    """``{command: calls}`` from INFO commandstats, read on a side connection."""
    stats = side.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def calls_during(server: RedisServer, fn: Callable[[], object]) -> dict[str, int]:
    """The commands the server ran while ``fn`` ran (the side connection is set up first)."""
    side = server.client()
    before = command_calls(side)
    fn()
    after = command_calls(side)
    side.close()
    delta = {k: n - before.get(k, 0) for k, n in after.items()}
    return {k: n for k, n in delta.items() if n and k != "info"}


def spill(store: SegmentStore, ctx, n: int, ttl: float = 600) -> None:
    moved, ctx.turns = ctx.turns[:n], ctx.turns[n:]
    ctx.overflow.append(store.write(ctx, moved, ttl, now=time.time()))


def make_store(
    server: RedisServer,
    codec: Codec,
    *,
    cache_bytes: int = 0,
    clock: Callable[[], float] = time.monotonic,
    events: Events | None = None,
    fail_max: int = 3,
    timeouts: Timeouts = FAST,
) -> SegmentStore:
    tier = tier_from_url(server.url, timeouts=timeouts)
    guard = GuardedTier(
        tier,
        breaker=BreakerPolicy(fail_max=fail_max, reset_timeout=10.0),
        cache=SegmentCache(max_bytes=cache_bytes, clock=clock),
        clock=clock,
        on_event=events,
    )
    return SegmentStore(guard, codec)


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


# ------------------------------------------------------------------------ round trips


def test_all_segments_of_a_context_in_one_mget(redis_server: RedisServer, codec) -> None:
    store = make_store(redis_server, codec, timeouts=Timeouts(read=1, connect=1))
    ctx = make_ctx(10)
    turns = list(ctx.turns)
    spill(store, ctx, 3)
    spill(store, ctx, 2)
    spill(store, ctx, 2)
    store.read(ctx)  # warm the connection pool
    got = None

    def read() -> None:
        nonlocal got
        got = store.read(ctx)

    assert calls_during(redis_server, read) == {"mget": 1}
    assert got.complete and got.turns == turns[:7]
    # a write is one script call: the erasure tombstone's read, the SET and the index
    # update, atomically; commandstats also counts the commands the script runs
    # (SCARD: the index is pruned only once it has grown large)
    during = calls_during(redis_server, lambda: spill(store, ctx, 1))
    assert during.pop("evalsha") == 1
    assert during.pop("get") == 1
    assert set(during) <= {"set", "sadd", "pttl", "pexpire", "scard"} and during["set"] == 1


def test_ttl_is_applied_to_segments_and_the_session_index(redis_server: RedisServer, codec):
    store = make_store(redis_server, codec, timeouts=Timeouts(read=1, connect=1))
    ctx = make_ctx(4)
    spill(store, ctx, 1, ttl=30)
    spill(store, ctx, 1, ttl=300)
    spill(store, ctx, 1, ttl=60)  # a shorter TTL never shortens the index's
    client = redis_server.client()
    keys = [store.key_for(ctx.session_id, r.digest) for r in ctx.overflow]
    ttls = [client.pttl(k) for k in keys]
    assert 29_000 < ttls[0] <= 30_000 and 299_000 < ttls[1] <= 300_000
    assert 59_000 < ttls[2] <= 60_000
    index = f"satchel:{{{store.session_tag(ctx.session_id)}}}:idx"
    assert 299_000 < client.pttl(index) <= 300_000
    assert client.smembers(index) == {k.encode() for k in keys}
    assert store.erase(ctx.session_id) == 3
    assert client.keys("*") == []


def test_the_session_index_is_pruned_of_keys_that_are_gone(redis_server: RedisServer) -> None:
    """Every put adds its key to the session's index; expired, evicted and deleted keys
    used to stay members until the whole set expired (121 members for 5 live keys after
    400 exchanges, each read by delete_session). A put now prunes the set once it has
    grown past INDEX_PRUNE_ABOVE members, and delete() removes what it deletes."""
    from satchel.tiers.redis import INDEX_PRUNE_ABOVE, INDEX_PRUNE_SAMPLE

    tier = RedisTier(redis_server.url, timeouts=Timeouts(read=1, connect=1))
    client = redis_server.client()
    index = "satchel:{s}:idx"

    def members() -> set[str]:
        return {m.decode() for m in client.smembers(index)}

    live = [f"satchel:{{s}}:live{i}" for i in range(5)]
    for key in live:
        tier.put(key, b"v", 600)
    for i in range(200):  # gone at once, as if evicted
        tier.put(f"satchel:{{s}}:evicted{i}", b"v", 600)
        client.delete(f"satchel:{{s}}:evicted{i}")
    assert set(live) <= members() and client.scard(index) <= INDEX_PRUNE_ABOVE + 1

    # Expired keys too (Redis' own clock says when). Enough that the next put prunes
    # (5 live + 28 + 1 > 32), few enough that it checks the whole set (at most 33 + 28
    # + 1 <= 64), so what is left is exact.
    short = [f"satchel:{{s}}:short{i}" for i in range(28)]
    for key in short:
        tier.put(key, b"v", 0.05)
    assert INDEX_PRUNE_ABOVE < client.scard(index) + 1 <= INDEX_PRUNE_SAMPLE
    wait_until(lambda: client.exists(*short) == 0, timeout=5, message="short keys to expire")
    tier.put("satchel:{s}:last", b"v", 600)
    assert members() == {*live, "satchel:{s}:last"}

    assert tier.delete([live[0], live[1], "satchel:{s}:never-written"]) == 2
    assert members() == {*live[2:], "satchel:{s}:last"}
    assert tier.delete_session("s") == 4
    assert client.keys("*") == []

    # Live keys are never pruned, however many there are.
    many = [f"satchel:{{t}}:k{i}" for i in range(3 * INDEX_PRUNE_ABOVE)]
    for key in many:
        tier.put(key, b"v", 600)
    assert client.scard("satchel:{t}:idx") == len(many)
    assert tier.delete_session("t") == len(many)
    tier.close()


# --------------------------------------------------------------------------- failures


def test_killed_server_fails_fast(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeouts=FAST)
    tier.put("satchel:{s}:a", b"v", 60)  # a pooled connection now exists
    redis_server.kill()
    for call in (
        lambda: tier.get_many(["satchel:{s}:a"]),
        lambda: tier.put("satchel:{s}:a", b"v", 60),
        lambda: tier.compare_and_set_mark("satchel:{s}:m", None, b"1", 60),
        lambda: tier.delete_session("s"),
        tier.ping,
    ):
        elapsed, exc = timed(call)
        assert isinstance(exc, TierUnavailable), exc
        assert elapsed < 0.5
        assert exc.facts["tier"] == "redis" and exc.facts["error"] == "ConnectionError"


def test_paused_server_hits_the_read_timeout(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeouts=FAST, retry=default_retry(0))
    tier.ping()
    redis_server.pause()
    try:
        elapsed, exc = timed(lambda: tier.get_many(["k"]))
        assert isinstance(exc, TierUnavailable) and exc.facts["error"] == "TimeoutError"
        assert 0.04 < elapsed < 0.5
        retried = RedisTier(redis_server.url, timeouts=FAST)  # one retry: twice the budget
        elapsed, exc = timed(lambda: retried.put("k", b"v", 5))
        assert isinstance(exc, TierUnavailable) and elapsed < 0.5
    finally:
        redis_server.resume()
    assert tier.get_many(["k"]) == [None]  # the stale connection was dropped


def test_restart_recovers_including_scripts(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeouts=FAST)
    tier.put("satchel:{s}:a", b"1", 60)
    assert tier.compare_and_set_mark("satchel:{s}:m", None, b"1", 60) is None
    redis_server.restart()  # new process: empty, no scripts loaded, pooled sockets dead
    tier.put("satchel:{s}:a", b"2", 60)  # the retry replaces the dead connection
    assert tier.get_many(["satchel:{s}:a"]) == [b"2"]
    assert tier.compare_and_set_mark("satchel:{s}:m", None, b"1", 60) is None
    assert tier.delete_session("s") == 2


def test_breaker_opens_fails_fast_then_recovers(redis_server: RedisServer, codec) -> None:
    clock, events = FakeClock(), Events()
    store = make_store(redis_server, codec, clock=clock, events=events, fail_max=3)
    guard = store.tier
    ctx = make_ctx(4)
    spill(store, ctx, 2)
    redis_server.pause()
    try:
        for _ in range(3):
            assert store.read(ctx).missing[0][1] == TIER_UNAVAILABLE
        assert guard.breaker_state == "open"
        assert events.seen == [("breaker_opened", {"tier": "redis"})]
        durations = []
        with timed_without_gc():
            for _ in range(20):
                elapsed, exc = timed(lambda: guard.put("satchel:{x}:k", b"v", 5))
                assert isinstance(exc, TierUnavailable) and str(exc) == "breaker open"
                assert exc.facts["unsent"] is True  # no socket touched: the paused server
                started = time.perf_counter()
                got = store.read(ctx)
                durations += [elapsed, time.perf_counter() - started]
                assert got.missing[0][1] == TIER_UNAVAILABLE and str(got.error) == "breaker open"
        # Fast: the median call, and every call well under the 50 ms read timeout it
        # would wait on the paused server. (Each call under 5 ms failed about once in
        # 200 runs: a full garbage collection late in the suite takes 25-80 ms; the
        # collector is off for the loop now, and the median bound kept all the same.)
        assert statistics.median(durations) < 0.005
        assert max(durations) < 0.2
    finally:
        redis_server.resume()
    # still open (the clock has not moved), although the server is back
    assert calls_during(redis_server, lambda: store.read(ctx)) == {}
    clock.advance(10.5)
    got = store.read(ctx)  # the half-open trial succeeds
    assert got.complete and len(got.turns) == 2
    assert guard.breaker_state == "closed"
    assert events.names == ["breaker_opened", "breaker_half_open", "breaker_closed"]


def test_breaker_trial_fails_while_server_is_still_down(redis_server: RedisServer) -> None:
    clock = FakeClock()
    guard = GuardedTier(
        RedisTier(redis_server.url, timeouts=FAST),
        breaker=BreakerPolicy(fail_max=2, reset_timeout=5),
        clock=clock,
    )
    redis_server.kill()
    for _ in range(2):
        with pytest.raises(TierUnavailable):
            guard.ping()
    clock.advance(6)
    with pytest.raises(TierUnavailable) as info:
        guard.ping()  # the trial touches the network and fails
    assert str(info.value) != "breaker open"
    assert guard.breaker_state == "open"
    redis_server.restart()
    clock.advance(6)
    guard.ping()
    assert guard.breaker_state == "closed"


def test_noeviction_out_of_memory_is_tier_full(redis_server: RedisServer, codec) -> None:
    store = make_store(redis_server, codec, timeouts=Timeouts(read=1, connect=1))
    used = int(redis_server.client().info("memory")["used_memory"])
    redis_server.config_set({"maxmemory": used + 256 * 1024, "maxmemory-policy": "noeviction"})
    ctx = make_ctx(0)
    import os

    with pytest.raises(TierFull) as info:
        for _ in range(100):
            ctx.add_turn("user", os.urandom(16 * 1024).hex())
            spill(store, ctx, 1)
    assert info.value.code == "tier_full" and info.value.facts["op"] == "put"
    assert store.tier.breaker_state == "closed"  # a full tier is not a down tier
    got = store.read(ctx)  # what was written is still readable
    assert got.complete and len(got.turns) == len(ctx.overflow)


def test_allkeys_lru_evictions_are_segment_missing(redis_server: RedisServer, codec) -> None:
    store = make_store(redis_server, codec, timeouts=Timeouts(read=1, connect=1))
    used = int(redis_server.client().info("memory")["used_memory"])
    redis_server.config_set({"maxmemory": used + 512 * 1024, "maxmemory-policy": "allkeys-lru"})
    ctx = make_ctx(0)
    import os

    for _ in range(60):  # ~2 MiB of incompressible segments into 512 KiB
        ctx.add_turn("user", os.urandom(16 * 1024).hex())
        spill(store, ctx, 1)
    got = store.read(ctx)
    reasons = {reason for _, reason in got.missing}
    assert reasons == {SEGMENT_MISSING}
    assert 0 < len(got.missing) < len(ctx.overflow)
    assert len(got.turns) + len(got.missing) == len(ctx.overflow)
    assert int(redis_server.client().info("stats")["evicted_keys"]) > 0


def test_cache_serves_reads_while_redis_is_stopped(redis_server: RedisServer, codec) -> None:
    store = make_store(redis_server, codec, cache_bytes=1 << 20)
    cache = store.tier.cache
    ctx = make_ctx(8)
    turns = list(ctx.turns)
    for _ in range(3):
        spill(store, ctx, 2)
    # one segment is not in this process's cache (as if written by another worker)
    uncached = store.key_for(ctx.session_id, ctx.overflow[2].digest)
    cache.discard([uncached])
    redis_server.pause()
    try:
        started = time.perf_counter()
        got = store.read(ctx)
        assert time.perf_counter() - started < 0.5
        assert got.from_cache == 2 and got.turns == turns[:4]
        assert got.missing == [(ctx.overflow[2], TIER_UNAVAILABLE)]
        assert cache.hits == 2 and cache.misses == 1
        ctx.overflow = ctx.overflow[:2]
        got = store.read(ctx)  # fully cached: the tier is not asked at all
        assert got.complete and got.error is None and got.from_cache == 2
        assert cache.hits == 4 and cache.misses == 1
    finally:
        redis_server.resume()


def test_segments_redis_lost_in_a_restart_are_restored_from_the_cache(
    redis_server: RedisServer, codec
) -> None:
    """Redis is killed and restarted empty: the breaker opens, the segments this
    process cached come back as unconfirmed, and restore() puts them back into the new
    Redis, where a process without the cache finds them."""
    clock = FakeClock()
    store = make_store(redis_server, codec, cache_bytes=1 << 20, clock=clock, fail_max=2)
    ctx = make_ctx(6)
    turns = list(ctx.turns)
    spill(store, ctx, 2)
    spill(store, ctx, 2)
    redis_server.kill()
    for _ in range(2):
        with pytest.raises(TierUnavailable):
            store.tier.ping()
    assert store.tier.breaker_state == "open"
    redis_server.restart()  # empty: no persistence
    clock.advance(10.5)
    store.tier.ping()  # the half-open trial succeeds
    assert redis_server.client().dbsize() == 0

    got = store.read(ctx)
    assert got.complete and got.turns == turns[:4] and len(got.unconfirmed) == 2
    cold = make_store(redis_server, codec)  # another process: no cache
    assert [reason for _, reason in cold.read(ctx).missing] == [SEGMENT_MISSING] * 2
    assert store.restore(ctx, got.unconfirmed, ttl=600) == 2
    assert cold.read(ctx).turns == turns[:4]
    assert store.read(ctx).unconfirmed == []  # confirmed again


def test_tampered_and_foreign_references_on_redis(redis_server: RedisServer, codec) -> None:
    import dataclasses

    store = make_store(redis_server, codec)
    alice, bob = make_ctx(4), make_ctx(4)
    spill(store, alice, 2)
    spill(store, bob, 2)
    tampered = dataclasses.replace(alice.overflow[0], digest=bytes(16))
    alice.overflow.append(tampered)
    got = store.read(alice)
    assert len(got.turns) == 2 and got.missing == [(tampered, SEGMENT_MISSING)]
    bob.overflow = list(alice.overflow[:1])  # Bob points his token at Alice's segment
    assert store.read(bob).missing == [(alice.overflow[0], SEGMENT_MISSING)]


@contextlib.contextmanager
def sentinel_for(master: RedisServer, tmp_path: Path, *extra: str) -> Iterator[int]:
    """A real Sentinel process monitoring ``master`` as "svc"; yields its port."""
    from tests.support import free_port, procs, require_binary

    binary = require_binary("redis-server")
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor svc 127.0.0.1 {master.port} 1\n" + "".join(f"{e}\n" for e in extra)
    )
    proc = procs.spawn([binary, str(conf), "--sentinel"], log_path=tmp_path / "sentinel.log")
    try:
        probe = RedisServer(port=port)  # only used to PING the sentinel
        wait_until(lambda: probe.ping(), timeout=10, message="sentinel to answer PING")
        yield port
    finally:
        procs.kill(proc)


def test_sentinel_url(redis_server: RedisServer, tmp_path) -> None:
    """redis+sentinel:// finds the master through a real Sentinel process."""
    with sentinel_for(redis_server, tmp_path) as port:
        tier = tier_from_url(
            f"redis+sentinel://127.0.0.1:{port}/svc?db=3", timeouts=Timeouts(read=1, connect=1)
        )
        tier.put("satchel:{s}:a", b"via sentinel", 60)
        assert tier.get_many(["satchel:{s}:a"]) == [b"via sentinel"]
        assert redis_server.client(db=3).get("satchel:{s}:a") == b"via sentinel"
        tier.close()


def test_sentinels_that_fail_are_each_asked_once_per_attempt() -> None:
    """Finding the master asks each sentinel in turn: the next sentinel is the retry.
    With the tier's retry on the sentinel connections too, every sentinel was asked
    twice per attempt, and the master's retry doubled that again: one call cost
    (1 + r) x sentinels x (1 + r) timeouts, 1.2 s with three unreachable sentinels."""
    import socket
    import threading

    listeners, counts = [], []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        listeners.append(sock)
        counts.append(0)

    def hang_up(i: int) -> None:  # accepts, counts, and closes: a broken sentinel
        while True:
            try:
                conn, _ = listeners[i].accept()
            except OSError:
                return
            counts[i] += 1
            conn.close()

    threads = [threading.Thread(target=hang_up, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    hosts = ",".join(f"127.0.0.1:{sock.getsockname()[1]}" for sock in listeners)
    tier = tier_from_url(f"redis+sentinel://{hosts}/svc", timeouts=Timeouts(read=1, connect=1))
    try:
        with pytest.raises(TierUnavailable):
            tier.get_many(["satchel:{s}:a"])
    finally:
        tier.close()
        for sock in listeners:
            sock.close()
    assert counts == [2, 2, 2]  # once for the attempt and once for its one retry


def test_compare_and_set_retried_after_a_late_reply_is_not_a_lost_race(
    redis_server: RedisServer,
) -> None:
    """The write lands, its reply comes after the read timeout, redis-py's Retry runs
    the script again: that run finds its own value and must report success, not a
    conflict (a false 409 in server mode, and a turn saved twice when resent)."""
    from tests.support.slow_proxy import SlowReplyProxy

    proxy = SlowReplyProxy(redis_server.port)
    tier = RedisTier(f"redis://127.0.0.1:{proxy.port}", timeouts=Timeouts(read=0.05, connect=0.5))
    try:
        key = "satchel:{s}:hwm"
        assert tier.compare_and_set_mark(key, None, b"first", 60) is None
        proxy.delay_next_reply(b"EVALSHA", 0.3)
        assert tier.compare_and_set_mark(key, b"first", b"second", 60) is None
        assert proxy.delayed.is_set()  # the reply really was late, and the call retried
        assert redis_server.client().get(key) == b"second"
        # A real conflict is still one, and so is a second writer of the same bytes:
        # a signed token sealed twice in one second is byte for byte the same.
        assert tier.compare_and_set_mark(key, b"first", b"third", 60) == b"second"
        assert tier.compare_and_set_mark(key, b"first", b"second", 60) == b"second"
    finally:
        tier.close()
        proxy.close()


def test_deleting_a_session_leaves_no_key_of_it(redis_server: RedisServer) -> None:
    """The compare-and-set's write ids (<key>:w) are the session's keys too: an erasure
    must not leave them behind for a month."""
    tier = RedisTier(redis_server.url, timeouts=Timeouts(read=0.5, connect=0.5))
    try:
        assert tier.compare_and_set_mark("satchel:{abc}:hwm", None, b"mark", 3600) is None
        assert tier.compare_and_set_mark("satchel:{abc}:ctx", None, b"ctx", 3600) is None
        tier.put("satchel:{abc}:seg:1", b"segment", 3600)
        assert tier.compare_and_set_mark("other:{zzz}:hwm", None, b"kept", 3600) is None
        assert tier.delete_session("abc") == 3  # the keys the app wrote, as before
        assert redis_server.client().keys("*{abc}*") == []
        assert tier.delete(["other:{zzz}:hwm"]) == 1
        assert redis_server.client().keys("*") == []
    finally:
        tier.close()


def _write_tls_files(directory) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    """A private CA and a certificate for 127.0.0.1 it signed: (ca, cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "satchel test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


@pytest.mark.redis
def test_rediss_with_a_private_ca_given_in_the_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """TLS to a real redis-server whose certificate a private CA signed: the URL's
    ssl_ca_certs (docs/overflow.md) is all it takes; without it the tier is unavailable
    (the certificate does not verify), never a hang or an exception of another kind."""
    from tests.support import free_port

    ca, cert, key = _write_tls_files(tmp_path)
    tls_port = free_port()
    tls = [
        "--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
        "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(extra_args=tls) as server:
        timeouts = Timeouts(read=1.0, connect=1.0)
        url = f"rediss://127.0.0.1:{tls_port}/3"
        tier = tier_from_url(f"{url}?ssl_ca_certs={ca}", timeouts=timeouts)
        tier.put("satchel:{s}:k", b"over TLS", 60)
        assert tier.get_many(["satchel:{s}:k"]) == [b"over TLS"]
        assert server.client(db=3).get("satchel:{s}:k") == b"over TLS"  # db 3, same server
        tier.close()
        untrusted = tier_from_url(url, timeouts=timeouts)  # the system's CAs only
        started = time.monotonic()
        with pytest.raises(TierUnavailable):
            untrusted.get_many(["satchel:{s}:k"])
        assert time.monotonic() - started < 5
        untrusted.close()


def test_a_sentinel_master_demoted_to_a_replica_refuses_writes_only(
    redis_factory: Callable[..., RedisServer], tmp_path
) -> None:
    """Sentinel's connection turns READONLY into ConnectionError("The previous master is
    now a slave"): without writes_only, such writes counted in the main breaker, which a
    worker reading from its segment cache then opened (docs/overflow.md, Sentinel row)."""
    master, other = redis_factory(), redis_factory()
    down_after = "sentinel down-after-milliseconds svc 60000"
    with sentinel_for(master, tmp_path, down_after) as port:
        tier = tier_from_url(
            f"redis+sentinel://127.0.0.1:{port}/svc", timeouts=Timeouts(read=1, connect=1)
        )
        tier.put("satchel:{s}:a", b"one", 60)
        master.client().replicaof("127.0.0.1", other.port)  # demoted; sentinel not told
        with pytest.raises(TierUnavailable) as refused:
            tier.put("satchel:{s}:b", b"two", 60)
        assert refused.value.facts.get("writes_only") is True, refused.value.facts
        tier.close()
