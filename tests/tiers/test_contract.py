"""The Tier contract, run against every backend: memory, SQLite and a real redis-server."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from satchel.errors import ConfigurationError, TierFull
from satchel.tiers import MemoryTier, NoTier, SQLiteTier, Tier, Timeouts, hash_tag, tier_from_url
from satchel.tiers.base import CLAIM_HELD
from satchel.tiers.memory import ENTRY_OVERHEAD
from tests.support import wait_until

from .conftest import unclaimed_contract


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)],
)
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tier]:
    if request.param == "memory":
        t: Tier = MemoryTier()
    elif request.param == "sqlite":
        t = SQLiteTier(tmp_path / "tier.db")
    else:
        server = request.getfixturevalue("redis_server")
        t = tier_from_url(server.url, timeouts=Timeouts(read=0.5, connect=0.5))
    yield t
    t.close()


def test_put_get_many_delete(tier: Tier) -> None:
    assert tier.get_many([]) == []
    tier.put("s:{a}:1", b"one", 60)
    tier.put("s:{a}:2", b"\x00two\xff", 60)
    tier.put("s:{a}:1", b"uno", 60)  # overwrite
    assert tier.get_many(["s:{a}:1", "nope", "s:{a}:2", "s:{a}:1"]) == [
        b"uno",
        None,
        b"\x00two\xff",
        b"uno",
    ]
    assert tier.delete(["s:{a}:1", "nope"]) == 1
    assert tier.get_many(["s:{a}:1"]) == [None]
    tier.ping()


def test_delete_session_removes_every_key_of_the_session_only(tier: Tier) -> None:
    for i in range(5):
        tier.put(f"satchel:{{sess1}}:seg:{i}", b"x" * i, 60)
    tier.put("satchel:{sess2}:seg:0", b"y", 60)
    assert tier.compare_and_set_mark("satchel:{sess1}:mark", None, b"7", 60) is None
    assert tier.delete_session("sess1") == 6
    assert tier.get_many([f"satchel:{{sess1}}:seg:{i}" for i in range(5)]) == [None] * 5
    assert tier.get_many(["satchel:{sess1}:mark", "satchel:{sess2}:seg:0"]) == [None, b"y"]
    assert tier.delete_session("sess1") == 0


def test_put_unless_marked_writes_only_while_the_mark_does_not_refuse(tier: Tier) -> None:
    mark = "satchel:{s}:hwm"
    assert tier.put_unless_marked("satchel:{s}:seg:1", b"one", 60, mark, b"\x00erased")
    assert tier.compare_and_set_mark(mark, None, b"a mark", 60) is None
    assert tier.put_unless_marked("satchel:{s}:seg:2", b"two", 60, mark, b"\x00erased")
    assert tier.compare_and_set_mark(mark, b"a mark", b"\x00erased", 60) is None
    assert not tier.put_unless_marked("satchel:{s}:seg:3", b"three", 60, mark, b"\x00erased")
    keys = [f"satchel:{{s}}:seg:{i}" for i in (1, 2, 3)]
    assert tier.get_many(keys) == [b"one", b"two", None]
    # What it wrote belongs to the session like any put: delete_session takes it.
    assert tier.delete_session("s") == 3


def test_erase_session_deletes_all_but_the_mark_and_leaves_the_tombstone(tier: Tier) -> None:
    mark = "satchel:{s}:hwm"
    for i in range(3):
        tier.put(f"satchel:{{s}}:seg:{i}", b"x", 60)
    tier.put("satchel:{other}:seg:0", b"y", 60)
    assert tier.compare_and_set_mark(mark, None, b"7", 60) is None
    assert (
        tier.compare_and_set_mark_with(
            "satchel:{s}:ctx", None, b"state", 60, ("satchel:{s}:newest", b"tok", 60)
        )
        is None
    )
    # Three segments, the stored state, the newest token and the mark that held "7".
    assert tier.erase_session("s", mark, b"\x00erased", 60) == 6
    assert (
        tier.get_many([*(f"satchel:{{s}}:seg:{i}" for i in range(3)), "satchel:{s}:ctx"])
        == [None] * 4
    )
    assert tier.get_many([mark, "satchel:{other}:seg:0"]) == [b"\x00erased", b"y"]
    # Erasing again deletes nothing of the session's data; the tombstone stays.
    assert tier.erase_session("s", mark, b"\x00erased", 60) == 0
    assert tier.get_many([mark]) == [b"\x00erased"]
    assert not tier.put_unless_marked("satchel:{s}:seg:9", b"z", 60, mark, b"\x00erased")
    # A session with nothing stored still gets its tombstone.
    assert tier.erase_session("new", "satchel:{new}:hwm", b"\x00erased", 60) == 0
    assert tier.get_many(["satchel:{new}:hwm"]) == [b"\x00erased"]
    # delete_session still removes the tombstone (it is one of the session's keys).
    assert tier.delete_session("s") == 1


def test_expire_soon_shortens_ttls_and_never_lengthens_them(tier: Tier) -> None:
    tier.put("s:{a}:long", b"long", 3600)
    tier.put("s:{a}:short", b"short", 0.05)
    tier.put("s:{a}:other", b"other", 3600)
    tier.expire_soon(["s:{a}:long", "s:{a}:short", "s:{a}:absent"], 1.0)
    # Within the grace period both are still readable; the short one keeps its own TTL.
    assert tier.get_many(["s:{a}:long", "s:{a}:absent"]) == [b"long", None]
    # Within the grace period: a TTL stretched to the grace would not have expired yet.
    wait_until(lambda: tier.get_many(["s:{a}:short"]) == [None], timeout=0.8)
    wait_until(lambda: tier.get_many(["s:{a}:long"]) == [None], timeout=5)
    assert tier.get_many(["s:{a}:other"]) == [b"other"]  # not named: untouched
    tier.expire_soon([], 1)


def test_compare_and_set_mark(tier: Tier) -> None:
    key = "satchel:{s}:hwm"
    assert tier.compare_and_set_mark(key, b"1", b"2", 60) == b""  # expected a value, absent
    assert tier.compare_and_set_mark(key, None, b"1", 60) is None
    assert tier.compare_and_set_mark(key, None, b"9", 60) == b"1"
    assert tier.compare_and_set_mark(key, b"0", b"9", 60) == b"1"
    assert tier.compare_and_set_mark(key, b"1", b"2", 60) is None
    assert tier.get_many([key]) == [b"2"]


def test_compare_and_set_mark_with_a_companion(tier: Tier) -> None:
    """The mark and the newest token kept with it: both or neither, and erasure
    (delete_session) reaches the companion."""
    key, newest = "satchel:{s}:hwm", "satchel:{s}:newest"
    assert tier.compare_and_set_mark_with(key, None, b"1", 60, (newest, b"t1", 30)) is None
    assert tier.get_many([key, newest]) == [b"1", b"t1"]
    # A lost compare-and-set writes neither.
    assert tier.compare_and_set_mark_with(key, b"0", b"2", 60, (newest, b"t2", 30)) == b"1"
    assert tier.get_many([key, newest]) == [b"1", b"t1"]
    assert tier.compare_and_set_mark_with(key, b"1", b"2", 60, (newest, b"t2", 30)) is None
    assert tier.get_many([key, newest]) == [b"2", b"t2"]
    assert tier.delete_session("s") == 2
    assert tier.get_many([key, newest]) == [None, None]


def test_a_custom_tiers_compare_and_set_with_a_companion_writes_it_after(tmp_path: Path) -> None:
    """The default for tiers that do not override it: the mark, then the companion."""

    class Plain(MemoryTier):
        """A custom tier: a compare-and-set of its own, and the default for the rest."""

        def compare_and_set_mark(
            self, key: str, expected: bytes | None, new: bytes, ttl: float
        ) -> bytes | None:
            return MemoryTier.compare_and_set_mark_with(self, key, expected, new, ttl, None)

        compare_and_set_mark_with = Tier.compare_and_set_mark_with

    tier = Plain()
    key, newest = "satchel:{s}:hwm", "satchel:{s}:newest"
    assert tier.compare_and_set_mark_with(key, None, b"1", 60, (newest, b"t1", 30)) is None
    assert tier.compare_and_set_mark_with(key, None, b"2", 60, (newest, b"t2", 30)) == b"1"
    assert tier.get_many([key, newest]) == [b"1", b"t1"]


def test_compare_and_set_unclaimed_stops_at_another_holders_claim(tier: Tier) -> None:
    """Server mode's save: refused while another request's stream holds the claim."""
    unclaimed_contract(tier)


def test_a_subclass_that_compares_and_sets_its_own_way_is_still_called(
    tier: Tier,
) -> None:
    """Moves of a monotonic mark go through compare_and_set_unclaimed: a subclass of a
    shipped tier that overrides compare_and_set_mark_with (to audit, or fail on
    purpose) was skipped by the SQLite transaction and the Redis script."""
    calls: list[str] = []
    base = type(tier)

    class Audited(base):  # type: ignore[valid-type,misc]
        def compare_and_set_mark_with(self, key, expected, new, ttl, companion):  # type: ignore[no-untyped-def]
            calls.append(key)
            return super().compare_and_set_mark_with(key, expected, new, ttl, companion)

    tier.__class__ = Audited  # the same connection, the subclass's methods
    key, claim = "satchel:{s}:hwm", "satchel:{s}:claim:ab"
    assert tier.compare_and_set_unclaimed(key, None, b"1", 60, claim, None) is None
    assert tier.compare_and_set_unclaimed(key, b"1", b"2", 60, claim, None) is None
    assert calls == [key, key]
    tier.put(claim, b"stream", 60)
    assert tier.compare_and_set_unclaimed(key, b"2", b"3", 60, claim, None) is CLAIM_HELD
    assert calls == [key, key] and tier.get_many([key]) == [b"2"]


def test_a_custom_tiers_compare_and_set_unclaimed_reads_the_claim_first() -> None:
    """The default for tiers that do not override it: read the claim, then the CAS."""

    class Plain(MemoryTier):
        compare_and_set_unclaimed = Tier.compare_and_set_unclaimed

    unclaimed_contract(Plain())


def test_compare_and_set_is_atomic_under_threads(tier: Tier) -> None:
    key = "satchel:{s}:counter"
    assert tier.compare_and_set_mark(key, None, b"0", 60) is None

    def bump(times: int) -> None:
        for _ in range(times):
            current = tier.get_many([key])[0]
            while lost := tier.compare_and_set_mark(key, current, b"%d" % (int(current) + 1), 60):
                current = lost

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert tier.get_many([key]) == [b"100"]


def test_hash_tag() -> None:
    assert hash_tag("satchel:{abc}:seg:x") == "abc"
    assert hash_tag("a{}b{c}") is None  # Redis: the first {...} must be non-empty
    assert hash_tag("plain") is None
    assert hash_tag("x{y") is None


def test_tier_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(tier_from_url(None), NoTier)
    assert isinstance(tier_from_url("  "), NoTier)
    assert isinstance(tier_from_url("memory://"), MemoryTier)
    absolute = tier_from_url(f"sqlite:///{tmp_path}/abs.db?busy_timeout=0.25")
    assert isinstance(absolute, SQLiteTier) and absolute.path == tmp_path / "abs.db"
    assert absolute.busy_timeout == 0.25
    monkeypatch.chdir(tmp_path)
    relative = tier_from_url("sqlite:///rel/tier.db")
    assert isinstance(relative, SQLiteTier) and relative.path == tmp_path / "rel" / "tier.db"
    relative.put("k", b"v", 5)
    assert (tmp_path / "rel" / "tier.db").exists()
    for bad in ("sqlite:///:memory:", "sqlite://x.db", "ftp://x", "redis+cluster://"):
        with pytest.raises(ConfigurationError):
            tier_from_url(bad)


def test_redis_urls_parse_without_connecting() -> None:
    from redis.sentinel import SentinelConnectionPool

    from satchel.tiers import RedisTier, default_retry

    timeouts = Timeouts(read=0.2, connect=0.3)
    single = tier_from_url("rediss://u:secret@h:6380/3", timeouts=timeouts)
    assert isinstance(single, RedisTier) and single.mode == "single"
    kwargs = single.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 6380, 3)
    assert kwargs["socket_timeout"] == 0.2 and kwargs["socket_connect_timeout"] == 0.3
    assert kwargs["retry"].get_retries() == 1
    assert "secret" not in repr(single)

    sentinel = RedisTier(
        "redis+sentinel://s1:26379,[::1]:26380/mymaster?db=2", retry=default_retry(0)
    )
    assert sentinel.mode == "sentinel"
    pool = sentinel.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinel._sentinel.sentinels] == [
        "s1",
        "::1",
    ]
    cluster = RedisTier("redis+cluster://h1:7000,h2:7001")
    assert cluster.mode == "cluster" and cluster._client is None  # built on first use
    # TLS with a private CA through the URL alone, on Sentinel too (it was refused as
    # an unknown parameter, and ssl=true checked against the system's CAs only).
    tls = RedisTier(
        "redis+sentinel://s1:26379/m?ssl=true&ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
    )
    tls_kwargs = tls.client.connection_pool.connection_kwargs
    assert tls_kwargs["ssl_ca_certs"] == "/ca.pem" and tls_kwargs["ssl_cert_reqs"] == "required"
    mixed = RedisTier("redis+sentinel://s1:26379/m?ssl=true&ssl_cert_reqs=Required")
    assert mixed.client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert RedisTier("redis+cluster://h1:7000?ssl=true&ssl_ca_certs=/ca.pem").mode == "cluster"
    with pytest.raises(ConfigurationError):
        RedisTier("redis+sentinel://s1:26379/")


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis://h:6379/abc", "'abc'"),  # was db 0, silently
        ("redis://h:6379/0?db=-1", "'-1'"),
        ("redis+sentinel://s:26379/svc?db=two", "'two'"),
        ("redis+cluster://h:7000/3", "database 0"),
        ("redis://[::1/0", "Invalid IPv6 URL"),  # was a bare ValueError
        ("redis://h:6379/0?sentinel_password=hunter2", "'sentinel_password'"),
        ("redis+cluster://h:7000?ssl=maybe", "ssl"),
        ("redis+sentinel://s:26379/svc?dbb=1", "'dbb'"),
        ("redis://h:70000/0", "70000"),
        ("redis://h:0/0", "port must be 1..65535"),  # redis-py took it; every call failed
        # localhost:6379, silently: another app's Redis, maybe
        ("redis:///2", "names no host"),
        ("rediss://:pw@/0", "names no host"),
        # Accepted, then every call failed (or a typo read as true):
        ("redis://h/0?socket_timeout=-1", "socket_timeout"),
        ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout"),
        ("rediss://h/0?ssl_check_hostname=false", None),  # valid: no error
        ("rediss://h/0?ssl_check_hostname=off", "ssl_check_hostname"),  # redis-py: true
        ("rediss://h/0?ssl_check_hostname=maybe", "ssl_check_hostname"),
        ("redis+sentinel://s:26379/m?ssl_ca_certs=/ca.pem", "needs ssl=true"),  # plaintext
        ("redis+cluster://h:7000?ssl_certfile=/c.pem&ssl=false", "needs ssl=true"),
        ("redis://h/0?socket_keepalive=off", "socket_keepalive"),
        ("redis+sentinel://s:26379/svc?ssl=true&ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
        ("sqlite:///x.db?busy_timeout=abc", "busy_timeout"),  # was a bare ValueError
        ("sqlite:///x.db?max_bytes=-5", "max_bytes"),  # was a 64 KiB cap, silently
        ("sqlite:///x.db?purge_every=0", "purge_every"),
        ("sqlite:///x.db?busytimeout=1", "'busytimeout'"),  # a typo was ignored
    ],
)
def test_bad_tier_urls_fail_at_startup(url: str, names: str | None) -> None:
    if names is None:
        tier_from_url(url, setting="SATCHEL_OVERFLOW_URL")
        return
    with pytest.raises(ConfigurationError) as info:
        tier_from_url(url, setting="SATCHEL_OVERFLOW_URL")
    message = info.value.message
    assert message.startswith("SATCHEL_OVERFLOW_URL: ") and names in message
    assert "unix://" not in message and "hunter2" not in message


def test_secrets_are_redacted_in_errors_and_repr() -> None:
    from satchel.tiers import RedisTier, redact_url

    url = "redis+sentinel://u:pw1@s1:26379/svc?sentinel_password=pw2&db=1"
    assert redact_url(url) == "redis+sentinel://u:***@s1:26379/svc?sentinel_password=***&db=1"
    assert "pw" not in repr(RedisTier(url))
    for bad in (url.replace("db=1", "db=x"), "redis://[::1:pw3@h?password=pw4"):
        with pytest.raises(ConfigurationError) as info:
            tier_from_url(bad)
        assert "pw" not in info.value.message, info.value.message
    assert redact_url("redis://:p/ss@h:6379/0?auth_token=t&x=1") == (
        "redis://:***@h:6379/0?auth_token=***&x=1"
    )
    assert redact_url("sqlite:////var/x.db?busy_timeout=1") == "sqlite:////var/x.db?busy_timeout=1"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Sec/retPw9@h:1/0",  # a password with an unencoded "/", "?" or "#"
        "redis://:Sec?retPw9@h:1/0",
        "redis://:Sec#retPw9@h:1/0",
        "redis+sentinel://:Sec/retPw9@h:1/m",
        "redis:/:SecretPw9@127.0.0.1:6390/0",  # a scheme typo
        "SecretPw9",  # a password pasted into the URL setting
    ],
)
def test_what_an_error_says_about_a_url_never_quotes_its_password(url: str) -> None:
    """redact_url hid the password in the URL an error shows, but the error's own text
    quoted the pieces a parser made of it ("not 'retPw9@h:1/0'", "port 'Sec'")."""
    with pytest.raises(ConfigurationError) as info:
        tier_from_url(url, setting="SATCHEL_STORE_URL")
    message = info.value.message
    assert message.startswith("SATCHEL_STORE_URL: ")
    for piece in ("Sec", "retPw9", "SecretPw9"):
        assert piece not in message, message


@pytest.mark.parametrize(
    "password", ["hunter2", "integer-xyz", "bad-database", "database", "URL", "Redis tier"]
)
def test_masking_never_touches_fixed_message_text(password: str) -> None:
    """Every run of 3+ characters of the message that was also in the password was
    masked, so the words masked in the message's own text gave pieces of the password
    away ("hunter2" made "integer" "i***ger"). What an error says about a URL that
    parses must not depend on its password at all."""

    def message(pw: str) -> str:
        with pytest.raises(ConfigurationError) as info:
            tier_from_url(f"redis://:{pw}@127.0.0.1:1/x", setting="SATCHEL_OVERFLOW_URL")
        return info.value.message

    said = message(password)
    assert said == message("zzzzzzzzzzzz"), said
    assert "the database number must be an integer >= 0" in said


def test_the_password_is_masked_in_every_form_an_error_may_quote() -> None:
    from satchel.tiers import scrub_url_secrets

    url = "redis://u:p%40ss%2Fword9@h:1/0"
    for quoted in ("p%40ss%2Fword9", "p@ss/word9", "u:p%40ss%2Fword9", "word9", "p@ss"):
        said = scrub_url_secrets(url, f"bad value {quoted!r} near 'h:1/0'")
        assert said == "bad value '***' near 'h:1/0'", (quoted, said)
    # Inside a word it is text of the message's own, not the URL quoted.
    assert scrub_url_secrets(url, "swords9x and 9word9") == "swords9x and 9word9"


def test_schemes_are_case_insensitive() -> None:
    from satchel.tiers import RedisTier

    single = tier_from_url("REDIS://h:6380/2")  # redis-py refused it, suggesting unix://
    assert isinstance(single, RedisTier) and single.mode == "single"
    kwargs = single.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 6380, 2)
    sentinel = tier_from_url("Redis+Sentinel://s:26379/svc")
    assert isinstance(sentinel, RedisTier) and sentinel.mode == "sentinel"
    assert isinstance(tier_from_url("MEMORY://"), MemoryTier)
    with pytest.raises(ConfigurationError) as info:
        tier_from_url("unix:///tmp/redis.sock")
    assert "unix://" not in info.value.message.partition(": use ")[2]


def test_memory_tier_bound(clock) -> None:
    entry = ENTRY_OVERHEAD + 1 + 40  # one key character, 40 value bytes
    full = MemoryTier(max_bytes=2 * entry + 20, clock=clock)
    full.put("a", b"x" * 40, 10)
    full.put("b", b"x" * 40, 100)
    with pytest.raises(TierFull):
        full.put("c", b"x" * 40, 10)
    with pytest.raises(TierFull):
        full.put("a", b"x" * 80, 10)  # a failed overwrite keeps the old value
    assert full.get_many(["a"]) == [b"x" * 40]
    clock.advance(10)  # "a" expired: its room is reclaimed
    full.put("c", b"x" * 40, 10)
    assert full.used_bytes == 2 * entry
    lru = MemoryTier(max_bytes=2 * entry + 20, evict=True, clock=clock)
    for key in "abc":
        lru.put(key, b"x" * 40, 100)
    assert lru.get_many(["a", "b", "c"]) == [None, b"x" * 40, b"x" * 40]
    with pytest.raises(TierFull):
        lru.put("huge", b"x" * (2 * entry), 100)
    # Refused without evicting anything: no room would have fit it.
    assert lru.get_many(["b", "c"]) == [b"x" * 40, b"x" * 40]


@pytest.mark.parametrize("value_bytes", [200, 2000])
def test_the_memory_tier_bound_counts_what_its_entries_take_in_memory(value_bytes: int) -> None:
    """scaling.md sizes memory mode by max_bytes: counting key and value bytes alone, a
    64 MiB store of short conversations took about 100 MB."""
    import os
    import tracemalloc

    tier = MemoryTier(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5000):  # each key and value made here, held by the tier alone
            tier.put(f"satchel:ctx:{i:016x}", os.urandom(value_bytes), 3600)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.9 < tier.used_bytes / taken < 1.1, (tier.used_bytes, taken)


def test_a_memory_tier_url_takes_its_options_and_refuses_others() -> None:
    """overflow.md: memory:// takes max_bytes= and evict=; they were silently dropped,
    and an unknown parameter passed."""
    tier = tier_from_url("memory://?max_bytes=100000&evict=true")
    assert isinstance(tier, MemoryTier) and tier.max_bytes == 100_000 and tier.evict is True
    assert tier_from_url("memory://", max_bytes=5000).max_bytes == 5000  # type: ignore[attr-defined]
    for bad in ("memory://?bogus=1", "memory://?max_bytes=0", "memory://?evict=maybe"):
        with pytest.raises(ConfigurationError, match="tier URL"):
            tier_from_url(bad)


def test_an_option_the_urls_tier_does_not_take_names_the_ones_it_does(tmp_path: Path) -> None:
    """timeouts= (Redis's) with a sqlite:// URL, the mistake docs/flask-session.md's
    advice invited, was a bare TypeError from SQLiteTier's constructor."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    with pytest.raises(
        ConfigurationError, match=r"sqlite:// tier takes no timeouts=.*busy_timeout="
    ):
        tier_from_url(url, timeouts=Timeouts(read=0.5))
    with pytest.raises(ConfigurationError, match=r"memory:// tier takes no busy_timeout="):
        tier_from_url("memory://", busy_timeout=1.0)
    for scheme in ("redis", "redis+sentinel"):  # (Sentinel's built, then failed every call)
        with pytest.raises(
            ConfigurationError, match=rf"{re.escape(scheme)}:// tier takes no busy_timeout="
        ):
            tier_from_url(f"{scheme}://127.0.0.1:1/0", busy_timeout=1.0)
    assert isinstance(tier_from_url(url, busy_timeout=2.0), SQLiteTier)
    assert isinstance(tier_from_url("memory://", max_bytes=4096), MemoryTier)


def test_without_redis_py_the_redis_names_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """satchel.tiers.RedisTier (and default_retry, which docs/overflow.md imports) were
    a bare "No module named 'redis'"; an older redis-py, installed without the extra's
    bound, ran without the timeout retry the tier documents."""
    import sys

    import redis

    import satchel.tiers as tiers

    # As in a process that never imported it: not in sys.modules, nor bound on the package.
    monkeypatch.delitem(sys.modules, "satchel.tiers.redis", raising=False)
    monkeypatch.delattr(tiers, "redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # not installed: import fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'satchel\[redis\]'"):
        tiers.RedisTier  # noqa: B018
    with pytest.raises(ConfigurationError, match=r"needs redis-py: pip install"):
        tier_from_url("redis://127.0.0.1:1/0")

    monkeypatch.setitem(sys.modules, "redis", redis)
    monkeypatch.setattr(redis, "__version__", "5.2.1")
    with pytest.raises(ConfigurationError, match=r"redis-py 6 or newer, not 5\.2\.1"):
        tier_from_url("redis://127.0.0.1:1/0")
