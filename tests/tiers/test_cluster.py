"""RedisTier on a real 3-master Redis Cluster: one slot per session, one MGET per read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from satchel.errors import TierBusy, TierUnavailable
from satchel.segments import SEGMENT_MISSING, SegmentStore
from satchel.tiers import (
    BreakerPolicy,
    GuardedTier,
    RedisTier,
    SegmentCache,
    Timeouts,
    tier_from_url,
)
from tests.support import RedisCluster, wait_until

from .conftest import make_ctx, unclaimed_contract

pytestmark = pytest.mark.redis


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    redis_cluster.flushall()
    yield redis_cluster


@pytest.fixture
def tier(cluster: RedisCluster) -> Iterator[RedisTier]:
    nodes = ",".join(f"{h}:{p}" for h, p in cluster.addresses)
    t = tier_from_url(f"redis+cluster://{nodes}", timeouts=Timeouts(read=1, connect=1))
    yield t
    t.close()


def mget_calls(cluster: RedisCluster) -> list[int]:
    out = []
    for node in cluster.nodes:
        stats = node.client().info("commandstats")
        out.append(int(stats.get("cmdstat_mget", {}).get("calls", 0)))
    return out


def test_a_sessions_segments_share_one_slot_and_one_mget(cluster, tier, codec) -> None:
    store = SegmentStore(GuardedTier(tier, cache=SegmentCache(max_bytes=0)), codec)
    ctx = make_ctx(10)
    turns = list(ctx.turns)
    for n in (2, 3, 1, 2):
        moved, ctx.turns = ctx.turns[:n], ctx.turns[n:]
        ctx.overflow.append(store.write(ctx, moved, 60, now=time.time()))
    tag = store.session_tag(ctx.session_id)
    client = cluster.client()
    keys = [store.key_for(ctx.session_id, r.digest) for r in ctx.overflow]
    slots = {client.keyslot(k) for k in [*keys, f"satchel:{{{tag}}}:idx"]}
    assert len(slots) == 1

    store.read(ctx)  # warm up
    before = mget_calls(cluster)
    got = store.read(ctx)
    after = mget_calls(cluster)
    assert got.complete and got.turns == turns[:8]
    assert sum(after) - sum(before) == 1  # one MGET on one node

    assert store.erase(ctx.session_id) == 4
    assert [r for _, r in store.read(ctx).missing] == [SEGMENT_MISSING] * 4
    assert client.exists(*keys, f"satchel:{{{tag}}}:idx") == 0


def test_compare_and_set_and_keys_of_several_sessions(cluster, tier) -> None:
    key = "satchel:{sess-a}:hwm"
    assert tier.compare_and_set_mark(key, None, b"1", 60) is None
    assert tier.compare_and_set_mark(key, None, b"2", 60) == b"1"
    assert tier.compare_and_set_mark(key, b"1", b"2", 60) is None
    assert tier.compare_and_set_mark("satchel:{sess-b}:hwm", b"x", b"y", 60) == b""
    # The mark and its companion (one slot: the session's tag) in one script.
    other = "satchel:{sess-c}:hwm"
    companion = ("satchel:{sess-c}:newest", b"tok", 30)
    assert tier.compare_and_set_mark_with(other, None, b"3", 60, companion) is None
    assert tier.get_many([other, companion[0]]) == [b"3", b"tok"]
    # Server mode's save against a stream's claim: one script in the session's slot.
    unclaimed_contract(tier)
    # keys of many sessions (many slots) still come back in order
    keys = [f"satchel:{{s{i}}}:seg" for i in range(12)]
    for i, k in enumerate(keys):
        tier.put(k, b"%d" % i, 60)
    assert tier.get_many([*keys, "satchel:{none}:x"]) == [*(b"%d" % i for i in range(12)), None]
    tier.expire_soon(keys, 30)  # one script per slot: keys of many sessions are fine
    assert all(0 < cluster.client().pttl(k) <= 30_000 for k in keys)
    assert tier.delete(keys) == 12
    assert tier.delete_session("sess-a") == 1


def test_erasure_and_guarded_writes_run_as_one_script_each_on_cluster(cluster, tier) -> None:
    """erase_session and put_unless_marked touch the mark and the session's keys in
    one script: their slot is the session's tag, so no CROSSSLOT on Cluster."""
    mark = "satchel:{sess-e}:hwm"
    assert tier.put_unless_marked("satchel:{sess-e}:seg:1", b"one", 60, mark, b"\x00erased")
    assert tier.compare_and_set_mark(mark, None, b"7", 60) is None
    assert tier.erase_session("sess-e", mark, b"\x00erased", 60) == 2
    assert not tier.put_unless_marked("satchel:{sess-e}:seg:2", b"two", 60, mark, b"\x00erased")
    assert tier.get_many(["satchel:{sess-e}:seg:1", "satchel:{sess-e}:seg:2", mark]) == [
        None,
        None,
        b"\x00erased",
    ]


def test_erasure_on_cluster_finds_keys_its_index_lost(cluster, tier) -> None:
    """allkeys-lru evicts the index set like any key: erasure scans every master for
    the session's tag, so the segments it no longer listed go too."""
    mark = "satchel:{sess-l}:hwm"
    for n in (1, 2):
        assert tier.put_unless_marked(f"satchel:{{sess-l}}:seg:{n}", b"x", 60, mark, b"\x00e")
    assert cluster.client().delete("satchel:{sess-l}:idx") == 1  # evicted
    assert tier.erase_session("sess-l", mark, b"\x00e", 60) == 2
    assert tier.get_many(["satchel:{sess-l}:seg:1", "satchel:{sess-l}:seg:2"]) == [None, None]


def _migrate(cluster: RedisCluster, slot: int) -> tuple[Any, Any, bytes, bytes]:
    """Start moving ``slot`` to another master, as ``redis-cli --cluster reshard`` does:
    (source client, target client, source id, target id)."""
    by_port = {node.address[1]: node for node in cluster.nodes}
    any_node = cluster.nodes[0].client()
    owner = next(r for r in any_node.execute_command("CLUSTER SLOTS") if r[0] <= slot <= r[1])
    source = by_port[int(owner[2][1])].client()
    target = next(by_port[p].client() for p in by_port if p != int(owner[2][1]))
    source_id, target_id = (
        source.execute_command("CLUSTER MYID"),
        target.execute_command("CLUSTER MYID"),
    )
    target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    return source, target, source_id, target_id


def test_an_erasure_during_a_slot_migration_deletes_all_or_fails(cluster, tier) -> None:
    """The delete script deleted index members it did not declare: with the index moved
    and the stored context not yet, it ran on the target node, deleted nothing there,
    dropped the index and reported success; the context survived every later erasure."""
    tag = "migrating"
    stored = f"satchel:{{{tag}}}:ctx"
    assert tier.compare_and_set_mark(stored, None, b"the stored conversation", 600) is None
    slot = cluster.client().keyslot(stored)
    source, target, _source_id, target_id = _migrate(cluster, slot)
    port = target.connection_pool.connection_kwargs["port"]
    source.execute_command(
        "MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", f"satchel:{{{tag}}}:idx"
    )
    try:
        with pytest.raises(TierUnavailable):  # refused whole: nothing half done
            tier.delete_session(tag)
    finally:  # the rest of the slot moves; the cluster is whole again
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for node in cluster.nodes:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    # The index still names the context, so erasing again (as the error asks) reaches it.
    assert tier.get_many([stored]) == [b"the stored conversation"]
    assert tier.erase_session(tag, f"satchel:{{{tag}}}:hwm", b"\x00erased", 60) == 1
    assert tier.get_many([stored]) == [None]


def test_an_erasure_after_a_reshard_scans_the_slots_new_owner(cluster, tier) -> None:
    """The SCAN for keys the index lost took its node from the client's slot map, which
    a reshard this process has not met yet still names the old owner of: it scanned
    that node, found nothing, and the segments survived an erasure that said 0."""
    tag = "resharded"
    mark = f"satchel:{{{tag}}}:hwm"
    for n in (1, 2):
        assert tier.put_unless_marked(f"satchel:{{{tag}}}:seg:{n}", b"x", 600, mark, b"\x00e")
    raw = cluster.client()
    slot = raw.keyslot(mark)
    assert raw.delete(f"satchel:{{{tag}}}:idx") == 1  # evicted (allkeys-lru)
    source, target, _source_id, target_id = _migrate(cluster, slot)
    port = target.connection_pool.connection_kwargs["port"]
    while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
    for node in cluster.nodes:
        node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    assert tier.erase_session(tag, mark, b"\x00e", 60) == 2
    assert raw.mget([f"satchel:{{{tag}}}:seg:1", f"satchel:{{{tag}}}:seg:2"]) == [None, None]


def test_a_slot_on_the_move_fails_its_own_calls_but_opens_no_breaker(cluster, tier) -> None:
    """While resharding moved one slot, calls for it failed with TRYAGAIN; counted as
    failures, five of them opened the breaker of the whole master, and the sessions of
    its other slots got 503s for a planned, healthy migration."""
    guarded = GuardedTier(tier, BreakerPolicy(fail_max=2, reset_timeout=60))
    moving = "satchel:{on-the-move}:seg:1"
    assert guarded.put_unless_marked(moving, b"one", 600, "satchel:{on-the-move}:hwm", b"x")
    slot = cluster.client().keyslot(moving)
    source, target, _source_id, target_id = _migrate(cluster, slot)
    port = target.connection_pool.connection_kwargs["port"]
    source_port = source.connection_pool.connection_kwargs["port"]
    # A session whose slot stays on the same master.
    neighbour = next(
        key
        for i in range(10_000)
        if (key := f"satchel:{{neighbour-{i}}}:seg:1")
        and cluster.client().keyslot(key) != slot
        and guarded.tier.shard_of(key) == guarded.tier.shard_of(moving)
    )
    guarded.put(neighbour, b"stays", 600)
    source.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", moving)
    try:
        for _ in range(4):  # the session's keys are split between the two nodes
            fetched = guarded.get_many([moving, "satchel:{on-the-move}:seg:2"], cache=False)
            assert isinstance(fetched.error, TierBusy), fetched.error
        assert guarded.breaker_state == "closed"
        assert guarded.get_many([neighbour], cache=False).get(neighbour) == b"stays"
    finally:
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for node in cluster.nodes:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    assert source_port != port


def test_unreachable_cluster_is_tier_unavailable() -> None:
    from tests.support import free_port

    t = RedisTier(
        f"redis+cluster://127.0.0.1:{free_port()}", timeouts=Timeouts(read=0.05, connect=0.1)
    )
    started = time.perf_counter()
    with pytest.raises(TierUnavailable):
        t.get_many(["satchel:{s}:a"])
    assert time.perf_counter() - started < 1.0


def test_a_dead_master_makes_its_slots_unavailable_fast() -> None:
    with RedisCluster() as own:  # its own cluster: the shared one stays healthy
        nodes = ",".join(f"{h}:{p}" for h, p in own.addresses)
        t = RedisTier(f"redis+cluster://{nodes}", timeouts=Timeouts(read=0.05, connect=0.1))
        key = "satchel:{s}:a"
        t.put(key, b"1", 60)
        client = own.client()
        owner = client.nodes_manager.get_node_from_slot(client.keyslot(key))
        next(n for n in own.nodes if n.port == owner.port).kill()
        for _ in range(3):
            started = time.perf_counter()
            with pytest.raises(TierUnavailable) as info:
                t.get_many([key])
            assert time.perf_counter() - started < 0.5
            assert info.value.facts["mode"] == "cluster"
        t.close()


def test_a_dead_master_opens_the_breaker_for_its_own_sessions_only() -> None:
    """One breaker per master: five failures on a dead master's slots must not refuse
    the sessions that live on the healthy ones (docs/scaling.md)."""
    with RedisCluster() as own:  # its own cluster: the shared one stays healthy
        nodes = ",".join(f"{h}:{p}" for h, p in own.addresses)
        events: list[tuple[str, dict]] = []
        guarded = GuardedTier(
            RedisTier(f"redis+cluster://{nodes}", timeouts=Timeouts(read=0.05, connect=0.1)),
            cache=SegmentCache(max_bytes=0),
            on_event=lambda name, **facts: events.append((name, facts)),
        )
        client = own.client()

        def owner(key: str) -> int:
            return client.nodes_manager.get_node_from_slot(client.keyslot(key)).port

        doomed = "satchel:{s0}:a"
        healthy = next(
            k for k in (f"satchel:{{s{i}}}:a" for i in range(1, 200)) if owner(k) != owner(doomed)
        )
        guarded.ping()  # the cluster client connects (and learns the slot map) on first use
        for key in (doomed, healthy):
            guarded.put(key, b"1", 60)
        assert guarded.breaker_states().keys() >= {
            f"127.0.0.1:{owner(doomed)}",
            f"127.0.0.1:{owner(healthy)}",
        }
        next(n for n in own.nodes if n.port == owner(doomed)).kill()

        for _ in range(guarded.policy.fail_max):
            assert guarded.get_many([doomed]).reason(doomed) == "tier_unavailable"
        with pytest.raises(TierUnavailable, match="breaker open"):
            guarded.put(doomed, b"2", 60)
        assert guarded.breaker_state == "open"  # the worst shard: /readyz says degraded
        assert [name for name, _ in events] == ["breaker_opened"]
        assert events[0][1]["detail"] == f"127.0.0.1:{owner(doomed)}"
        # The healthy master's sessions are served as if nothing happened.
        for _ in range(3 * guarded.policy.fail_max):
            assert guarded.get_many([healthy]).get(healthy) == b"1"
            guarded.put(healthy, b"1", 60)
        # Erasing a healthy master's session scans that master only: a scan of every
        # master failed on the dead one, every erasure with it, and opened the breaker
        # of the healthy master the session lives on.
        tag = healthy.split("{")[1].split("}")[0]
        assert guarded.erase_session(tag, f"satchel:{{{tag}}}:hwm", b"\x00e", 60) == 1
        assert guarded.get_many([healthy]).get(healthy) is None
        assert guarded.breaker_states()[f"127.0.0.1:{owner(healthy)}"] == "closed"
        guarded.close()


def test_compare_and_set_of_an_untagged_key(cluster, tier) -> None:
    """Its write id lives in the key's own slot (CROSSSLOT otherwise)."""
    assert tier.compare_and_set_mark("plainmark", None, b"1", 60) is None
    assert tier.compare_and_set_mark("plainmark", b"1", b"2", 60) is None
    assert tier.compare_and_set_mark("plainmark", b"1", b"3", 60) == b"2"
    assert tier.delete(["plainmark"]) == 1


def test_ping_fails_while_the_cluster_says_it_is_down() -> None:
    """A PING reaches one live node, which answers PONG while the cluster refuses
    every command with CLUSTERDOWN: /readyz said "reachable": true. The tier's ping
    also asks CLUSTER INFO, and a cluster_state other than ok is unavailable."""
    with RedisCluster(config={"cluster-node-timeout": "500"}) as own:
        nodes = ",".join(f"{h}:{p}" for h, p in own.addresses)
        t = RedisTier(f"redis+cluster://{nodes}", timeouts=Timeouts(read=0.2, connect=0.1))
        t.ping()
        own.nodes[0].kill()
        survivor = own.nodes[1]
        wait_until(
            lambda: own.cluster_info(survivor).get("cluster_state") == "fail",
            timeout=10,
            message="the survivors mark the cluster down",
        )
        with pytest.raises(TierUnavailable, match="cluster_state"):
            t.ping()
        t.close()


def test_ping_without_leave_to_ask_cluster_info_trusts_the_pong(cluster: RedisCluster) -> None:
    """An ACL that does not grant CLUSTER INFO (NOPERM) made every readiness probe of a
    healthy cluster 'unreachable', and counted against the breaker: the breaker-open
    alert fired for a cluster that served every request. The cluster's state is then
    unknown, and the PONG is what readiness has."""
    for node in cluster.nodes:
        node.command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-cluster|info")
    try:
        nodes = ",".join(f"{h}:{p}" for h, p in cluster.addresses)
        t = tier_from_url(f"redis+cluster://app:pw@{nodes}", timeouts=Timeouts(read=1, connect=1))
        t.ping()
        t.put("satchel:{s}:a", b"1", 60)  # the user works for everything else
        t.close()
    finally:
        for node in cluster.nodes:
            node.command("ACL", "DELUSER", "app")
