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
  member), atomically;
* ``delete_session`` is one script call that deletes every indexed key and the index;
* ``compare_and_set_mark`` is one script call (atomic, one key).

Scripts only touch keys of one slot, so they run unchanged on Cluster.

Every redis-py error is mapped: out-of-memory replies (``OOM command not allowed when
used memory > 'maxmemory'``) to :class:`~satchel.errors.TierFull`; everything else
(connection refused or reset, timeouts, ``CLUSTERDOWN``, ``TRYAGAIN``, ``LOADING``,
``READONLY`` during a failover, Sentinel finding no master, unexpected replies) to
:class:`~satchel.errors.TierUnavailable`. Nothing else escapes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from ..errors import ConfigurationError, TierError, TierFull, TierUnavailable
from .base import Tier, Timeouts, hash_tag

T = TypeVar("T")

SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

# KEYS[1] = key, KEYS[2] = session index (optional); ARGV[1] = value, ARGV[2] = ttl ms
_PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if KEYS[2] then
  redis.call('SADD', KEYS[2], KEYS[1])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
return 1
"""

# KEYS[1] = session index. Members share its hash tag, so they are in its slot.
_DELETE_SESSION = """
local members = redis.call('SMEMBERS', KEYS[1])
local n = 0
for i = 1, #members, 256 do
  n = n + redis.call('DEL', unpack(members, i, math.min(i + 255, #members)))
end
redis.call('DEL', KEYS[1])
return n
"""

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

# KEYS[1] = mark, KEYS[2] = session index (optional)
# ARGV[1] = '1' if an expected value is given, ARGV[2] = expected, ARGV[3] = new,
# ARGV[4] = ttl ms. Returns {1} on success, {0, current or false} otherwise.
_CAS = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return {0, current} end
elseif current then
  return {0, current}
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
if KEYS[2] then
  redis.call('SADD', KEYS[2], KEYS[1])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
return {1}
"""


def default_retry(retries: int = 1) -> Retry:
    """redis-py's retry policy as Satchel uses it: no backoff, ``retries`` retries."""
    return Retry(NoBackoff(), retries)


def _ttl_ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


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
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigurationError(f"bad port in tier URL host {item!r}") from None
        if not host:
            raise ConfigurationError(f"empty host in tier URL ({item!r})")
        hosts.append((host, port))
    if not hosts:
        raise ConfigurationError("the tier URL names no host")
    return username, password, hosts


def _query(query: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(query).items()}


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostlist}").geturl()


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
            scheme = urlsplit(url).scheme.lower()
            if scheme not in SCHEMES:
                raise ConfigurationError(
                    f"unsupported Redis URL scheme {scheme!r}; use one of {', '.join(SCHEMES)}"
                )
            self.mode = {"redis+sentinel": "sentinel", "redis+cluster": "cluster"}.get(
                scheme, "single"
            )
            if self.mode == "cluster":  # a cluster client connects when built: lazily
                _split_hosts(urlsplit(url).netloc, DEFAULT_PORT)  # but check the URL now
            else:
                self._client = self._build(url)
        else:
            from redis.cluster import RedisCluster

            self.mode = "cluster" if isinstance(client, RedisCluster) else "single"

    def __repr__(self) -> str:
        where = redact(self.url) if self.url else type(self._client).__name__
        return f"RedisTier({where!r}, mode={self.mode!r})"

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
                return redis.Redis.from_url(url, retry=self.retry, **self._common())
            if self.mode == "sentinel":
                return self._build_sentinel(url)
            return self._build_cluster(url)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad Redis tier URL {redact(url)!r}: {exc}") from None

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
        sentinel_kwargs["retry"] = self.retry
        if "sentinel_password" in query:
            sentinel_kwargs["password"] = query["sentinel_password"]
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        master_opts = dict(opts, retry=self.retry, db=int(query.get("db", 0)))
        if self.max_connections is not None:
            master_opts["max_connections"] = self.max_connections
        if username:
            master_opts["username"] = username
        if password is not None:
            master_opts["password"] = password
        if query.get("ssl", "").lower() in ("1", "true", "yes"):
            master_opts["ssl"] = True
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
        if query.get("ssl", "").lower() in ("1", "true", "yes"):
            opts["ssl"] = True
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

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(source)
        return script

    def _index_key(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:idx"

    # -- error mapping -----------------------------------------------------------------

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TierError:
            raise
        except Exception as exc:  # nothing but TierError may leave a tier
            raise self._map(op, exc) from exc

    def _map(self, op: str, exc: Exception) -> TierError:
        facts = {"tier": self.name, "op": op, "error": type(exc).__name__, "mode": self.mode}
        if isinstance(exc, RedisError | RedisClusterException) and _is_oom(exc):
            return TierFull(f"Redis refused the write: out of memory ({op})", **facts)
        if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
            return TierUnavailable(f"Redis did not answer in time ({op})", **facts)
        if isinstance(exc, redis.exceptions.ConnectionError | OSError):
            return TierUnavailable(f"cannot reach Redis ({op}): {exc}", **facts)
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
        self._run("put", lambda: self._script("put", _PUT)(keys, [value, _ttl_ms(ttl)]))

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return int(self._run("delete", lambda: self.client.delete(*keys)))

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
        index = self._index_key(session_tag)
        return int(
            self._run(
                "delete_session", lambda: self._script("delete_session", _DELETE_SESSION)([index])
            )
        )

    def compare_and_set_mark(
        self, key: str, expected: bytes | None, new: bytes, ttl: float
    ) -> bytes | None:
        tag = hash_tag(key)
        keys = [key, self._index_key(tag)] if tag else [key]
        args = ["1" if expected is not None else "0", expected or b"", new, _ttl_ms(ttl)]
        reply = self._run("compare_and_set_mark", lambda: self._script("cas", _CAS)(keys, args))
        if reply and int(reply[0]) == 1:
            return None
        current = reply[1] if len(reply) > 1 else None
        return b"" if current is None else bytes(current)

    def ping(self) -> None:
        self._run("ping", lambda: self.client.ping())

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.close()
        except Exception:  # closing a broken client must not raise
            return


__all__ = ["RedisTier", "default_retry", "redact"]
