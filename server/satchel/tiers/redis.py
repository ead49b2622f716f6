"""The Redis overflow tier (single server, Sentinel or Cluster) on redis-py.

hiredis is used automatically when it is installed. Every call is bounded by the
:class:`~satchel.tiers.base.Timeouts` passed in (``read`` is the socket timeout,
``connect`` the connect timeout) and by a redis-py :class:`~redis.retry.Retry` policy
(default: one immediate retry, so a connection that went stale in the pool is
replaced without failing the request, and a dead server costs at most two short
attempts).

Keys of one session share a Redis Cluster hash tag (``{tag}``), so:

* ``get_many`` is one ``MGET`` (one slot, one node, one round trip);
* ``put`` is one script call that ``SET``\\s the value with ``PX`` and adds the key to
  the session's index set ``<prefix>:{tag}:idx`` (whose TTL follows the longest-lived
  member), atomically; when the set has grown past :data:`INDEX_PRUNE_ABOVE` members,
  the same call drops up to :data:`INDEX_PRUNE_SAMPLE` of them that no longer exist
  (expired, evicted), so the set stays near the session's live keys;
  ``put_unless_marked`` is the same call, which first reads the session's mark and
  writes nothing when it holds the erasure tombstone;
* ``delete`` is one script call per session that deletes the keys and removes them
  from the index;
* ``delete_session`` is one script call that deletes every indexed key and the index;
  ``erase_session`` is one that deletes every indexed key but the mark and sets the
  mark to the tombstone (so no write of the session lands between the two);
* ``compare_and_set_mark`` is one script call (atomic, one key).

Scripts only touch keys of one slot, so they run unchanged on Cluster.

Every redis-py error is mapped: out-of-memory replies (``OOM command not allowed when
used memory > 'maxmemory'``) to :class:`~satchel.errors.TierFull`; everything else
(connection refused or reset, timeouts, ``CLUSTERDOWN``, ``TRYAGAIN``, ``LOADING``,
``READONLY`` during a failover, Sentinel finding no master, unexpected replies) to
:class:`~satchel.errors.TierUnavailable`. Nothing else escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from ..errors import ConfigurationError, TierBusy, TierError, TierFull, TierUnavailable
from . import REDIS_SCHEMES, redact_url
from .base import CLAIM_HELD, ClaimHeld, Companion, Tier, Timeouts, hash_tag

# redis-py 6 retries a timed-out call once under Retry(NoBackoff(), 1) (5.x never
# retried timeouts): the retry policy this tier documents. A redis-py installed
# without the extra's bound may be older.
if int(redis.__version__.split(".")[0]) < 6:
    # Not an ImportError: redis-py is installed, and the fix is to upgrade it
    # (tier_from_url reports an ImportError as "not installed").
    raise ConfigurationError(
        f"satchel's Redis tier needs redis-py 6 or newer, not {redis.__version__}: "
        "pip install 'satchel[redis]'"
    )

T = TypeVar("T")

SCHEMES = REDIS_SCHEMES
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
#: query parameters Satchel reads itself from Sentinel and Cluster URLs (a single
#: server's go to redis-py, which checks them)
#: TLS options for a private CA or client certificates (redis-py's names), taken by
#: every URL form; a single server's ``rediss://`` passes them to redis-py itself.
TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
SENTINEL_PARAMS = ("db", "ssl", "sentinel_password", *TLS_PARAMS)
CLUSTER_PARAMS = ("ssl", *TLS_PARAMS)
_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")  # what redis-py reads so too
_CERT_REQS = ("none", "optional", "required")
#: query parameters redis-py reads as seconds, and as booleans (its own parser takes
#: any word but a few as true: ``off`` and ``flase`` were on)
_SECONDS_PARAMS = ("socket_timeout", "socket_connect_timeout")
_BOOL_PARAMS = (
    "ssl_check_hostname",
    "retry_on_timeout",
    "single_connection_client",
    "socket_keepalive",
    "legacy_responses",
)
_DIGITS = re.compile(r"[0-9]+")

#: A session's index set is pruned once it holds more members than this...
INDEX_PRUNE_ABOVE = 32
#: ...by checking this many of them (at random: bounded work per put, whatever the
#: set's size). A chat session has a handful of live keys, so a prune usually checks
#: the whole set and runs again only after ~INDEX_PRUNE_ABOVE more puts.
INDEX_PRUNE_SAMPLE = 64

# KEYS[1] = key, KEYS[2] = session index (optional); ARGV[1] = value, ARGV[2] = ttl ms,
# ARGV[3] = prune above this many members, ARGV[4] = members to check when pruning.
# Expired, evicted and deleted keys would otherwise stay members until the whole set
# expires: hundreds per long conversation, each read by delete_session.
# KEYS[3] = a mark of the same session (optional), ARGV[5] = the value that refuses the
# write (put_unless_marked: the erasure tombstone); returns 0 when refused, else 1.
_PUT = """
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[5] then
  return 0
end
if redis.replicate_commands then
  -- Redis < 5 replicates a script verbatim and refuses writes after SRANDMEMBER;
  -- this switches it to replicating effects, the default (and a no-op) since 5.
  redis.replicate_commands()
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if KEYS[2] then
  redis.call('SADD', KEYS[2], KEYS[1])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
  if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[3]) then
    local sample = redis.call('SRANDMEMBER', KEYS[2], ARGV[4])
    for i = 1, #sample do
      if redis.call('EXISTS', sample[i]) == 0 then
        redis.call('SREM', KEYS[2], sample[i])
      end
    end
  end
end
return 1
"""

# Every key a script touches is declared in KEYS, the members of a session's index and
# their compare-and-set write ids (<key>:w, _CAS) included: while Cluster migrates the
# session's slot, a script whose keys are split between two nodes is refused
# (TRYAGAIN: the call fails, nothing is half done) instead of running on one node and
# deleting, as no-ops, the keys that already moved.

# KEYS[1] = session index, KEYS[2..n+1] = keys of that session, KEYS[n+2..2n+1] = their
# write ids; ARGV[1] = n. Deletes them and removes them from the index; returns how
# many of the keys existed.
_DELETE = """
local n = tonumber(ARGV[1])
local count = 0
for i = 2, n + 1 do
  count = count + redis.call('DEL', KEYS[i])
  redis.call('SREM', KEYS[1], KEYS[i])
end
for i = n + 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
return count
"""

# KEYS[1] = session index, KEYS[2..n+1] = the index's members as the caller read them
# (the mark left out), KEYS[n+2..2n+1] = their write ids, and optionally KEYS[2n+2] = a
# mark of the session and KEYS[2n+3] = its write id; ARGV[1] = n, ARGV[2] = tombstone,
# ARGV[3] = ttl ms. Deletes every member; with a mark, sets the mark to the tombstone
# in the same step (erase_session: no write lands between the delete and the
# tombstone). Returns the keys deleted (the mark counted when it held anything but the
# tombstone), or -1 when the index holds a member the caller did not read (written
# since: read again).
_DELETE_SESSION = """
local n = tonumber(ARGV[1])
local mark = KEYS[2 * n + 2]
local declared = {}
for i = 2, n + 1 do
  declared[KEYS[i]] = true
end
if mark then
  declared[mark] = true
end
local members = redis.call('SMEMBERS', KEYS[1])
for i = 1, #members do
  if not declared[members[i]] then
    return -1
  end
end
local count = 0
for i = 2, n + 1 do
  count = count + redis.call('DEL', KEYS[i])
end
for i = n + 2, 2 * n + 1 do
  redis.call('DEL', KEYS[i])
end
redis.call('DEL', KEYS[1])
if mark then
  local previous = redis.call('GET', mark)
  if previous and previous ~= ARGV[2] then
    count = count + 1
  end
  redis.call('DEL', KEYS[2 * n + 3])
  redis.call('SET', mark, ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], mark)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return count
"""

#: times a session's erasure reads its index again when writes keep adding keys to it
DELETE_SESSION_ATTEMPTS = 3

# KEYS = keys of one session (one slot); ARGV[1] = ttl ms. Only shortens a TTL.
_EXPIRE_SOON = """
local n = 0
for i = 1, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left == -1 or left > tonumber(ARGV[1]) then
    n = n + redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return n
"""

# KEYS[1] = mark, KEYS[2] = the mark's last writer, KEYS[3] = session index (optional)
# ARGV[1] = '1' if an expected value is given, ARGV[2] = expected, ARGV[3] = new,
# ARGV[4] = ttl ms, ARGV[5] = this call's write id. Returns {1} on success,
# {0, current or false} otherwise.
# redis-py's Retry runs the script again when the reply to a first run that did write
# is lost (a read timeout). That run finds the key changed and must not report its own
# write as a lost race (a false 409, and a resent message saved twice): it knows it by
# the write id it left next to the value (a random id; it expires with the value and is
# deleted with it). The value alone would not do: two requests
# can write identical bytes (a signed token sealed twice in one second), and the
# second must lose.
_CAS_RETRIED = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[3] and redis.call('GET', KEYS[2]) == ARGV[5] then return {1} end
"""
# The companion (KEYS[4], ARGV[6] its value, ARGV[7] its TTL) is known by its TTL:
# _CAS_UNCLAIMED passes its claim last (KEYS[#KEYS], ARGV[#ARGV]): after the companion
# when there is one, else in KEYS[4] and ARGV[6], with no ARGV[7].
_CAS_WRITE = """
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return {0, current} end
elseif current then
  return {0, current}
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
if KEYS[3] then
  redis.call('SADD', KEYS[3], KEYS[1])
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
end
if ARGV[7] then
  redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[7])
  redis.call('SADD', KEYS[3], KEYS[4])
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[7]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
  end
end
return {1}
"""
_CAS = _CAS_RETRIED + _CAS_WRITE

#: _CAS, unless the last key (a streamed reply's claim, in the session's slot) holds a
#: non-empty value other than the last argument (the saver's own claim, or empty):
#: then {2}. KEYS[3] is the session's index (the key is always tagged here); a
#: companion, when given, comes before the claim (KEYS[4], ARGV[6] and ARGV[7]).
_CAS_UNCLAIMED = (
    _CAS_RETRIED
    + """
local claim = redis.call('GET', KEYS[#KEYS])
if claim and claim ~= '' and claim ~= ARGV[#ARGV] then return {2} end
"""
    + _CAS_WRITE
)


class _SlotScript:
    """A Lua script on Redis Cluster: EVALSHA on the node of its keys' slot and, when
    that node does not have it yet, EVAL there (which caches it on that node).

    redis-py's own script falls back to SCRIPT LOAD, which Cluster sends to every
    master: with one master down, every scripted call (spills, compare-and-set,
    erasure) failed on the healthy masters too until each had loaded the script, and
    opened their breakers.
    """

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis' script id

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self.client.eval(self.source, len(keys), *keys, *args)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (SCAN MATCH): a prefix may hold
    ``*``, ``?``, ``[`` or a backslash."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _writer_key(key: str) -> str:
    """Where _CAS keeps the id of a key's last write: in the key's Cluster slot (a
    tagged key's tag; an untagged key is hashed whole, so it becomes the tag)."""
    return f"{key}:w" if hash_tag(key) else f"{{{key}}}:w"


def default_retry(retries: int = 1) -> Retry:
    """redis-py's retry policy as Satchel uses it: no backoff, ``retries`` retries."""
    return Retry(NoBackoff(), retries)


def _ttl_ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def _slot_moving(exc: BaseException) -> bool:
    """A Cluster slot in migration: TRYAGAIN (a multi-key call whose keys are split
    between the two nodes), or redis-py's redirections and retries exhausted ("TTL
    exhausted": it follows MOVED/ASK and retries TRYAGAIN a bounded number of times)."""
    if isinstance(exc, redis.exceptions.TryAgainError | redis.exceptions.AskError):
        return True
    return isinstance(exc, redis.exceptions.ClusterError) and "TTL exhausted" in str(exc)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    text = str(exc)
    return text.startswith("OOM") or "used memory > 'maxmemory'" in text


def _split_hosts(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple]]:
    """``[user[:pass]@]host[:port][,host[:port]...]`` -> (user, password, [(host, port)])."""
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts: list[tuple[str, int]] = []
    for raw in hostlist.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:6379
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = item.partition(":")
        port = int(port_text) if _DIGITS.fullmatch(port_text) else -1
        if not port_text:
            port = default_port
        elif not 0 < port < 65536:
            raise ConfigurationError(f"bad port in tier URL host {item!r}")
        if not host:
            raise ConfigurationError(f"empty host in tier URL ({item!r})")
        hosts.append((host, port))
    if not hosts:
        raise ConfigurationError("the tier URL names no host")
    return username, password, hosts


def _query(query: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def redact(url: str) -> str:
    """``url`` with its password and password-like query parameters as ``***``."""
    return redact_url(url)


def _bad(url: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"bad Redis tier URL {redact_url(url)!r}: {problem}")


def _db(url: str, text: str | None) -> int:
    """The database number ``text`` names (None or empty: 0).

    redis-py reads ``redis://h:6379/abc`` as db 0 without a word: the app would share
    (and erase) another app's keys.
    """
    if not text:
        return 0
    if not _DIGITS.fullmatch(text):
        raise _bad(url, f"the database number must be an integer >= 0, not {text!r}")
    return int(text)


def _flag(url: str, query: dict[str, str], name: str) -> bool:
    value = query.get(name, "").lower()
    if value not in _TRUE + _FALSE:
        raise _bad(url, f"{name} must be true or false, not {query[name]!r}")
    return value in _TRUE


def _check_tls_and_options(url: str, query: dict[str, str]) -> None:
    """Values redis-py would take and fail every call with (a negative timeout), or read
    otherwise than written (``ssl_check_hostname=off`` as on)."""
    for name in _SECONDS_PARAMS:
        if name in query:
            try:
                seconds = float(query[name])
            except ValueError:
                seconds = math.nan
            if not 0 < seconds <= 3600:  # nan compares false too
                raise _bad(url, f"{name} must be a number of seconds in (0, 3600]")
    for name in _BOOL_PARAMS:
        if name in query:
            _flag(url, query, name)
    if "ssl_cert_reqs" in query and query["ssl_cert_reqs"].lower() not in _CERT_REQS:
        raise _bad(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")


def _tls_options(url: str, query: dict[str, str]) -> dict[str, Any]:
    """The TLS options of a Sentinel or Cluster URL as redis-py's keyword arguments."""
    opts: dict[str, Any] = {}
    for name in TLS_PARAMS:
        if name in query:
            value = query[name]
            if name in _BOOL_PARAMS:
                opts[name] = _flag(url, query, name)
            else:  # redis-py takes the cert requirement in lower case only
                opts[name] = value.lower() if name == "ssl_cert_reqs" else value
    return opts


def _check_query(url: str, query: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _bad(url, f"unknown parameter {unknown[0]!r}; this URL takes {', '.join(allowed)}")


class RedisTier(Tier):
    """A :class:`~satchel.tiers.base.Tier` on Redis, Redis Sentinel or Redis Cluster.

    ``url`` is ``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``redis+sentinel://[user:pass@]host:port[,host:port...]/service_name[?db=N]`` or
    ``redis+cluster://[user:pass@]host:port[,host:port...]``. ``client`` may be given
    instead (an existing ``redis.Redis`` or ``redis.cluster.RedisCluster``).
    ``prefix`` names the per-session index sets (``<prefix>:{tag}:idx``).
    """

    name = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        timeouts: Timeouts | None = None,
        retry: Retry | None = None,
        prefix: str = "satchel",
        max_connections: int | None = None,
        client: Any = None,
        **client_options: Any,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisTier needs exactly one of url= or client=")
        self.url = url
        self.timeouts = timeouts or Timeouts()
        self.retry = retry if retry is not None else default_retry()
        self.prefix = prefix
        self.max_connections = max_connections
        self.client_options = client_options
        self._lock = threading.Lock()
        self._client: Any = client
        self._scripts: dict[str, Any] = {}
        if url is not None:
            url = url.strip()
            try:
                parts = urlsplit(url)
            except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
                raise _bad(url, str(exc)) from None
            scheme = parts.scheme.lower()
            if scheme not in SCHEMES:
                raise _bad(url, f"unsupported scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
            # RFC 3986: schemes are case-insensitive. redis-py only knows them in lower
            # case (and its error for REDIS:// suggests unix://, which Satchel refuses).
            url = scheme + url[len(parts.scheme) :]
            self.url = url
            self.mode = {"redis+sentinel": "sentinel", "redis+cluster": "cluster"}.get(
                scheme, "single"
            )
            self._check_url(url, parts)
            if self.mode != "cluster":  # a cluster client connects when built: lazily
                self._client = self._build(url)
        else:
            from redis.cluster import RedisCluster

            self.mode = "cluster" if isinstance(client, RedisCluster) else "single"

    def __repr__(self) -> str:
        where = redact_url(self.url) if self.url else type(self._client).__name__
        return f"RedisTier({where!r}, mode={self.mode!r})"

    def _check_url(self, url: str, parts: SplitResult) -> None:
        """What redis-py would let pass at start-up and fail on (or ignore) later."""
        query = _query(parts.query)
        if self.mode == "single":
            try:
                port = parts.port
            except ValueError:  # not a number, or past 65535
                port = -1
            if port is not None and not 0 < port < 65536:
                # redis-py takes port 0, and every call then fails.
                raise _bad(url, "the port must be 1..65535")
            if not parts.hostname:
                # redis-py connects to localhost:6379 then: maybe another app's Redis.
                raise _bad(url, "the URL names no host")
            # redis-py takes ?db= over the path; check both.
            _db(url, unquote(parts.path).removeprefix("/").removesuffix("/"))
            if "db" in query:
                _db(url, query["db"])
            _check_tls_and_options(url, query)
            return
        _split_hosts(parts.netloc, DEFAULT_PORT)
        if self.mode == "sentinel":
            _check_query(url, query, SENTINEL_PARAMS)
            _db(url, query.get("db"))
        else:
            _check_query(url, query, CLUSTER_PARAMS)
            if parts.path.strip("/") not in ("", "0"):
                raise _bad(url, "Redis Cluster has only database 0; remove the path")
        ssl_on = _flag(url, query, "ssl")
        tls = [name for name in TLS_PARAMS if name in query]
        if tls and not ssl_on:
            # Dropped without a word, the connection would be plaintext.
            raise _bad(url, f"{tls[0]} needs ssl=true (TLS is off without it)")
        _check_tls_and_options(url, query)

    # -- clients -----------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "socket_timeout": self.timeouts.read,
            "socket_connect_timeout": self.timeouts.connect,
        }
        if self.max_connections is not None:
            opts["max_connections"] = self.max_connections
        opts.update(self.client_options)
        return opts

    def _build(self, url: str) -> Any:
        try:
            if self.mode == "single":
                client = redis.Redis.from_url(url, retry=self.retry, **self._common())
                # redis-py hands unknown query parameters (?sentinel_password= on a
                # single server, a typo) to each connection it opens: every call would
                # fail with TypeError. Building one, without a socket, fails now instead.
                pool = client.connection_pool
                try:
                    pool.connection_class(**pool.connection_kwargs)
                except RedisError as exc:  # e.g. ssl_cert_reqs=nonsense
                    raise ValueError(str(exc)) from None
                return client
            if self.mode == "sentinel":
                return self._build_sentinel(url)
            return self._build_cluster(url)
        except (ValueError, TypeError) as exc:
            unknown = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
            if unknown:  # a query parameter redis-py does not take
                raise _bad(url, f"unknown parameter {unknown[1]!r}") from None
            raise _bad(url, str(exc)) from None

    def _build_sentinel(self, url: str) -> Any:
        from redis.sentinel import Sentinel

        parts = urlsplit(url)
        username, password, hosts = _split_hosts(parts.netloc, DEFAULT_SENTINEL_PORT)
        service = unquote(parts.path.strip("/"))
        if not service or "/" in service:
            raise ConfigurationError(
                "a Sentinel URL names one service: redis+sentinel://host:port/service_name"
            )
        query = _query(parts.query)
        opts = self._common()
        opts.pop("max_connections", None)
        sentinel_kwargs = {k: v for k, v in opts.items() if k.startswith("socket_")}
        # Each sentinel is asked once per lookup: asking the next one is the retry,
        # and the master's retry repeats the whole lookup. The tier's retry here too
        # asked each twice per lookup, and doubled the worst case per sentinel.
        sentinel_kwargs["retry"] = default_retry(0)
        if "sentinel_password" in query:
            sentinel_kwargs["password"] = query["sentinel_password"]
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        master_opts = dict(opts, retry=self.retry, db=_db(url, query.get("db")))
        if self.max_connections is not None:
            master_opts["max_connections"] = self.max_connections
        if username:
            master_opts["username"] = username
        if password is not None:
            master_opts["password"] = password
        if _flag(url, query, "ssl"):
            master_opts["ssl"] = True
            master_opts.update(_tls_options(url, query))
        self._sentinel = sentinel
        return sentinel.master_for(service, **master_opts)

    def _build_cluster(self, url: str) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        parts = urlsplit(url)
        username, password, hosts = _split_hosts(parts.netloc, DEFAULT_PORT)
        query = _query(parts.query)
        opts = self._common()
        if username:
            opts["username"] = username
        if password is not None:
            opts["password"] = password
        if _flag(url, query, "ssl"):
            opts["ssl"] = True
            opts.update(_tls_options(url, query))
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in hosts],
            retry=self.retry,
            require_full_coverage=False,
            **opts,
        )

    @property
    def client(self) -> Any:
        """The redis-py client (built on first use for Cluster)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build(self.url or "")
                client = self._client
        return client

    def shard_of(self, key: str) -> str:
        """Cluster: the master that serves ``key``'s slot, from the client's slot map
        (no I/O), so each master gets its own breaker; one shard otherwise."""
        client = self._client
        if self.mode != "cluster" or client is None:
            return ""
        try:
            return str(client.get_node_from_key(key).name)
        except Exception:  # a slot no master covers: its calls fail, on a shard of their own
            return "uncovered"

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            client = self.client
            if self.mode == "cluster":
                script = _SlotScript(client, source)
            else:
                script = client.register_script(source)
            self._scripts[name] = script
        return script

    def _index_key(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:idx"

    def _keys_under(self, tag: str) -> set[str]:
        """Every key named with the session's tag that its index may have lost.

        Under ``allkeys-lru`` Redis evicts the index set like any key: its segments
        survived it, unlisted, and erasing the session deleted none of them while
        reporting success. A SCAN finds them (it walks the whole keyspace, on
        Cluster the keyspace of the master that owns the session's slot, a page at a
        time: an erasure is rare, and must be complete). Writer ids (``:w``) go with
        the key they belong to.
        """
        pattern = _glob_escape(f"{self.prefix}:{{{tag}}}:") + "*"
        client = self.client
        options: dict[str, Any] = {"match": pattern, "count": 1000}
        if self.mode == "cluster":
            # Cluster: only the master that owns the session's slot holds its keys.
            # Scanning every master made one dead master fail every erasure (and
            # open the breaker of the healthy master the session lives on).
            options["target_nodes"] = client.get_node_from_key(self._index_key(tag))
        found = (k.decode() for k in client.scan_iter(**options))
        return {k for k in found if not k.endswith(":w")}

    # -- error mapping -----------------------------------------------------------------

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TierError:
            raise
        except Exception as exc:  # nothing but TierError may leave a tier
            raise self._map(op, exc) from exc

    def _map(self, op: str, exc: Exception) -> TierError:
        facts: dict[str, Any] = {
            "tier": self.name,
            "op": op,
            "error": type(exc).__name__,
            "mode": self.mode,
        }
        if isinstance(exc, RedisError | RedisClusterException) and _is_oom(exc):
            return TierFull(f"Redis refused the write: out of memory ({op})", **facts)
        if _slot_moving(exc):
            return TierBusy(f"Redis Cluster is moving this session's slot ({op}): {exc}", **facts)
        if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
            # A stalled Redis runs the command it had read once it resumes: the write
            # may still land (callers that reseal on failure must not; consistency.py).
            return TierUnavailable(
                f"Redis did not answer in time ({op})", may_have_landed=True, **facts
            )
        if isinstance(exc, redis.exceptions.ConnectionError) and isinstance(
            exc.__context__, redis.exceptions.ReadOnlyError
        ):
            # Sentinel's connection turns a READONLY reply into ConnectionError("The
            # previous master is now a slave"): a failover under way, reads still served.
            facts["writes_only"] = True
        if isinstance(exc, redis.exceptions.ConnectionError | OSError):
            # Not "unsent" even when the last connect was refused: the retry policy may
            # have sent the command once already, and its reply been lost.
            return TierUnavailable(
                f"cannot reach Redis ({op}): {exc}", may_have_landed=True, **facts
            )
        if isinstance(exc, redis.exceptions.ReadOnlyError):
            # A replica now (a failover under way): it still serves reads, so only the
            # writes' breaker counts this (guard.py).
            facts["writes_only"] = True
        if isinstance(exc, RedisError | RedisClusterException):
            return TierUnavailable(f"Redis failed ({op}): {exc}", **facts)
        return TierUnavailable(f"Redis tier failed ({op}): {type(exc).__name__}", **facts)

    # -- Tier --------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        keys = list(keys)

        def fetch() -> list[bytes | None]:
            client = self.client
            if self.mode == "cluster" and len({hash_tag(k) or k for k in keys}) > 1:
                # Keys of several sessions (or untagged keys): one MGET per slot.
                return client.mget_nonatomic(keys)
            return client.mget(keys)

        return self._run("get_many", fetch)

    def put(self, key: str, value: bytes, ttl: float) -> None:
        tag = hash_tag(key)
        keys = [key, self._index_key(tag)] if tag else [key]
        args = [value, _ttl_ms(ttl), INDEX_PRUNE_ABOVE, INDEX_PRUNE_SAMPLE]
        self._run("put", lambda: self._script("put", _PUT)(keys, args))

    def put_unless_marked(
        self, key: str, value: bytes, ttl: float, mark: str, refused: bytes
    ) -> bool:
        tag = hash_tag(key)
        if not tag or hash_tag(mark) != tag:
            # Not one slot (and in no session's index): read, then write.
            return super().put_unless_marked(key, value, ttl, mark, refused)
        keys = [key, self._index_key(tag), mark]
        args = [value, _ttl_ms(ttl), INDEX_PRUNE_ABOVE, INDEX_PRUNE_SAMPLE, refused]
        return bool(int(self._run("put", lambda: self._script("put", _PUT)(keys, args))))

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        by_tag: dict[str | None, list[str]] = {}
        for key in keys:  # a script's keys must share a slot on Cluster
            by_tag.setdefault(hash_tag(key), []).append(key)
        untagged = by_tag.pop(None, [])
        count = 0
        if untagged:  # in no session's index
            count += int(self._run("delete", lambda: self.client.delete(*untagged)))
            # Their compare-and-set write ids, if any: best effort, the keys are gone
            # (and "<key>:w", where releases before 2026-11-27 11:00 UTC put them).
            companions = [w for k in untagged for w in (_writer_key(k), f"{k}:w")]
            with contextlib.suppress(TierError):
                self._run("delete", lambda: self.client.delete(*companions))
        for tag, group in by_tag.items():
            count += int(self._run("delete", partial(self._delete_tagged, str(tag), group)))
        return count

    def _delete_tagged(self, tag: str, keys: list[str]) -> Any:
        # Inside _run: the script call (and building a Cluster client) may fail.
        writers = [_writer_key(k) for k in keys]
        return self._script("delete", _DELETE)([self._index_key(tag), *keys, *writers], [len(keys)])

    def expire_soon(self, keys: Sequence[str], ttl: float) -> None:
        if not keys:
            return
        by_slot: dict[str, list[str]] = {}
        for key in keys:  # a script's keys must share a slot on Cluster
            by_slot.setdefault(hash_tag(key) or key, []).append(key)

        def shorten(group: list[str]) -> Any:
            return self._script("expire_soon", _EXPIRE_SOON)(group, [_ttl_ms(ttl)])

        for group in by_slot.values():
            self._run("expire_soon", lambda: shorten(group))  # noqa: B023 - called at once

    def delete_session(self, session_tag: str) -> int:
        return self._delete_session(session_tag, None, b"", 0.0)

    def erase_session(self, session_tag: str, mark: str, tombstone: bytes, ttl: float) -> int:
        if hash_tag(mark) != session_tag:
            return super().erase_session(session_tag, mark, tombstone, ttl)
        return self._delete_session(session_tag, mark, tombstone, ttl)

    def _delete_session(self, tag: str, mark: str | None, tombstone: bytes, ttl: float) -> int:
        index = self._index_key(tag)
        mark_keys = [] if mark is None else [mark, _writer_key(mark)]

        def listed() -> set[str]:
            # A command of its own, on the index's key: on Cluster it follows (and
            # learns) a slot that moved, so the script, and the SCAN after the first
            # one, go to the node that owns the session now.
            return {m.decode() for m in self.client.smembers(index)}

        def delete() -> int:
            script = self._script("delete_session", _DELETE_SESSION)
            listing = listed()
            # Once: a key written after the scan is in the index, which is read again
            # on every attempt (the script refuses an index that names undeclared keys).
            unlisted = self._keys_under(tag)
            for attempt in range(DELETE_SESSION_ATTEMPTS):
                if attempt:
                    listing = listed()
                members = sorted((listing | unlisted) - {index, mark})
                keys = [index, *members, *(_writer_key(m) for m in members), *mark_keys]
                args = [len(members), tombstone, _ttl_ms(ttl)]
                count = int(script(keys, args))
                if count >= 0:
                    return count
            raise TierUnavailable(
                "the session's keys kept changing during the deletion; run it again",
                tier=self.name,
                op="delete_session",
            )

        return self._run("delete_session", delete)

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        return self.compare_and_set_mark_with(key, expected, new, ttl, None)

    def compare_and_set_mark_with(
        self, key: str, expected: bytes | None, new: bytes, ttl: float, companion: Companion | None
    ) -> bytes | None:
        tag = hash_tag(key)
        if companion is not None and (not tag or hash_tag(companion[0]) != tag):
            # Not one slot (and in no session's index): the two writes one after the other.
            return super().compare_and_set_mark_with(key, expected, new, ttl, companion)
        result = self._cas(key, expected, new, ttl, companion, None)
        assert not isinstance(result, ClaimHeld)  # no claim was checked
        return result

    def compare_and_set_unclaimed(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        ttl: float,
        claim: str,
        holder: bytes | None,
        companion: Companion | None = None,
    ) -> bytes | ClaimHeld | None:
        tag = hash_tag(key)
        slots = {hash_tag(claim), *(() if companion is None else (hash_tag(companion[0]),))}
        overridden = type(self).compare_and_set_mark_with is not RedisTier.compare_and_set_mark_with
        if not tag or slots != {tag} or overridden:
            # Not one slot, or a subclass that compares and sets its own way (its
            # method runs, after the claim is read): check, then write.
            return super().compare_and_set_unclaimed(
                key, expected, new, ttl, claim, holder, companion
            )
        return self._cas(key, expected, new, ttl, companion, (claim, holder))

    def _cas(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        ttl: float,
        companion: Companion | None,
        unclaimed: tuple[str, bytes | None] | None,
    ) -> bytes | ClaimHeld | None:
        """One _CAS call (_CAS_UNCLAIMED with a claim to check); the companion, and the
        claim, share ``key``'s tag (the caller checked)."""
        tag = hash_tag(key)
        writer = _writer_key(key)
        keys = [key, writer, self._index_key(tag)] if tag else [key, writer]
        # One id per call: a retry of this call sends the same one.
        write_id = secrets.token_bytes(16)
        args = ["1" if expected is not None else "0", expected or b"", new, _ttl_ms(ttl), write_id]
        if companion is not None:  # same tag: the same slot, and the same index
            keys.append(companion[0])
            args += [companion[1], _ttl_ms(companion[2])]
        name, source = "cas", _CAS
        if unclaimed is not None:  # the claim comes last (_CAS_UNCLAIMED)
            keys.append(unclaimed[0])
            args.append(unclaimed[1] or b"")
            name, source = "cas_unclaimed", _CAS_UNCLAIMED
        reply = self._run("compare_and_set_mark", lambda: self._script(name, source)(keys, args))
        if reply and int(reply[0]) == 2:
            return CLAIM_HELD
        if reply and int(reply[0]) == 1:
            return None
        current = reply[1] if len(reply) > 1 else None
        return b"" if current is None else bytes(current)

    def ping(self) -> None:
        self._run("ping", lambda: self.client.ping())
        if self.mode == "cluster":
            # A live node answers PING while the cluster refuses every command with
            # CLUSTERDOWN (a master gone, its slots uncovered): ask for its state too.
            state = self._run("ping", self._cluster_state)
            if state is not None and state != "ok":
                raise TierUnavailable(
                    f"Redis Cluster is down (cluster_state: {state})",
                    tier=self.name,
                    op="ping",
                    mode=self.mode,
                )

    def _cluster_state(self) -> str | None:
        """``cluster_state`` from CLUSTER INFO; None when the ACL does not grant the
        command (the PONG is then all readiness knows: a healthy cluster must not read
        as down, and count against the breaker, for want of a permission)."""
        try:
            info = self.client.cluster_info()
        except redis.exceptions.NoPermissionError:
            return None
        state = info.get("cluster_state") if isinstance(info, dict) else None
        return str(state)

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.close()
        except Exception:  # closing a broken client must not raise
            return


__all__ = ["RedisTier", "default_retry", "redact"]
