"""Real ``redis-server`` processes for tests.

``RedisServer``  -- one throwaway server on a free loopback port, with fault injection
                    (kill / pause / resume / restart) and config tweaks.
``RedisCluster`` -- three cluster-enabled masters joined with ``redis-cli --cluster create``.

Both are context managers; every process is in its own process group and is killed at
teardown. Readiness is detected by polling (PING / CLUSTER INFO) under a deadline.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from satchel.bench._procs import RedisReplyError, resp_command

from . import procs
from .env import LOOPBACK, free_port, require_binary, tail, wait_until

__all__ = ["RedisCluster", "RedisError", "RedisServer", "raw_command", "redis_version"]


class RedisError(RuntimeError):
    """A helper-managed redis process failed to start or misbehaved."""


# ----------------------------------------------------------------------- RESP helper


def raw_command(host: str, port: int, *args: str | bytes | int, timeout: float = 0.5) -> Any:
    """Send one command over a fresh socket, return the decoded reply.

    The bench's minimal RESP2 reader (:func:`satchel.bench._procs.resp_command`), used
    for readiness probes so they do not depend on redis-py's retry behaviour. Error
    replies are returned as ``RedisReplyError`` instances, not raised.
    """
    return resp_command(port, *args, timeout=timeout, host=host, raise_errors=False)


@functools.cache
def redis_version(binary: str) -> tuple[int, ...]:
    """Version of a redis-server binary, e.g. (7, 0, 15)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _no_retry() -> Any:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


# ----------------------------------------------------------------------- RedisServer


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1:<free port>.

    >>> with RedisServer(config={"maxmemory": "2mb", "maxmemory-policy": "noeviction"}) as srv:
    ...     srv.client().set("k", "v")

    Arguments:
        port: fixed port; default picks a free one (and re-picks if it was taken).
        config: ``{"maxmemory": "2mb", ...}`` -> ``--maxmemory 2mb ...`` on the command line.
        extra_args: raw extra command-line arguments appended last.
        cluster: start with ``--cluster-enabled yes`` (used by :class:`RedisCluster`).
        data_dir: working dir (``--dir``); default a fresh temp dir removed by ``stop()``.
        startup_timeout: deadline for the PING readiness probe, seconds.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        config: Mapping[str, Any] | None = None,
        extra_args: Iterable[str] = (),
        cluster: bool = False,
        data_dir: Path | str | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port: int = port if port is not None else 0
        self.config = {k: str(v) for k, v in (config or {}).items()}
        self.extra_args = list(extra_args)
        self.cluster = cluster
        self.cluster_bus_port: int | None = None
        self.binary = binary or require_binary("redis-server")
        self.startup_timeout = startup_timeout
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="satchel-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    # -- info ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        """Process exists and has not exited (it may be paused)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def paused(self) -> bool:
        return self.running and procs.proc_state(self.proc.pid) in ("T", "t")

    def logs(self, max_chars: int = 4000) -> str:
        return tail(self.log_path, max_chars)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} pid={self.pid} {state}>"

    # -- lifecycle -----------------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / f"nodes-{self.port}.conf"),
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
            if self.cluster_bus_port:
                argv += ["--cluster-port", str(self.cluster_bus_port)]
        for key, value in self.config.items():
            argv += [f"--{key}", value]
        return argv + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns self."""
        if self.running:
            return self
        attempts = 5 if self._auto_port else 1
        for attempt in range(attempts):
            if self._auto_port and (attempt or not self.port):
                self.port = free_port()
            if self.cluster and (attempt or not self.cluster_bus_port):
                self._pick_bus_port()
            if self._launch():
                return self
        raise RedisError(f"redis-server did not start on port {self.port}:\n{self.logs()}")

    def _pick_bus_port(self) -> None:
        if redis_version(self.binary) >= (7, 0, 0):
            port = free_port()
            while port == self.port:
                port = free_port()
            self.cluster_bus_port = port
        else:  # older redis: bus port is always port + 10000
            while self.port + 10000 > 65535:
                self.port = free_port()
            self.cluster_bus_port = None

    def _launch(self) -> bool:
        """One start attempt; False if the port was taken (so the caller may retry)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = procs.spawn(self._argv(), log_path=self.log_path, cwd=self.dir)

        def ready() -> bool:
            if self.proc.poll() is not None:
                return True  # exited: stop waiting, inspected below
            return self.ping()

        try:
            wait_until(ready, timeout=self.startup_timeout, message=f"redis on {self.port}")
        except TimeoutError:
            log = self.logs()
            procs.kill(self.proc)
            raise RedisError(
                f"redis-server on port {self.port} not ready after {self.startup_timeout}s:\n{log}"
            ) from None
        if self.proc.poll() is None:
            return True
        new_log = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
        procs.kill(self.proc)
        if "in use" in new_log.lower() and self._auto_port:
            return False
        raise RedisError(
            f"redis-server exited with {self.proc.returncode} on port {self.port}:\n"
            f"{new_log[-4000:]}"
        )

    def ping(self, timeout: float = 0.5) -> bool:
        """True when the server answers PING with PONG within ``timeout``."""
        try:
            return raw_command(self.host, self.port, "PING", timeout=timeout) == "PONG"
        except OSError:
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        wait_until(
            self.ping,
            timeout=timeout or self.startup_timeout,
            message=f"redis on {self.port} to answer PING",
        )

    def kill(self) -> None:
        """SIGKILL the server process (by pid) and reap it. The port is freed."""
        if self.proc is not None:
            procs.kill(self.proc)

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, never answered."""
        self._require_running()
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_until(lambda: self.paused, timeout=5, message="redis to stop (SIGSTOP)")

    def resume(self) -> None:
        """SIGCONT a paused server and wait until it answers PING again."""
        self._require_running()
        os.kill(self.proc.pid, signal.SIGCONT)
        wait_until(lambda: not self.paused, timeout=5, message="redis to continue (SIGCONT)")
        self.wait_ready()

    def restart(self) -> RedisServer:
        """Kill the process and start a fresh one on the same port (data is lost)."""
        self.kill()
        auto, self._auto_port = self._auto_port, False  # keep the same port
        try:
            return self.start()
        finally:
            self._auto_port = auto

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) the server and remove its temp dir."""
        if self.proc is not None:
            procs.terminate(self.proc, grace=5)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _require_running(self) -> None:
        if not self.running:
            raise RedisError(f"{self!r} is not running")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` for this server.

        Defaults differ from redis-py's on purpose: ``retry`` = no retries (redis-py 8
        retries 10x with backoff by default, which makes fault tests slow),
        ``socket_timeout=5``, ``socket_connect_timeout=2``. Override with kwargs.
        """
        import redis

        opts: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
            "retry": _no_retry(),
        }
        opts.update(kwargs)
        return redis.Redis(**opts)

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Any:
        """Run one raw command on a fresh connection (see :func:`raw_command`)."""
        return raw_command(self.host, self.port, *args, timeout=timeout)

    def config_set(self, name: str | Mapping[str, Any], value: Any = None) -> None:
        """``CONFIG SET name value`` (or a mapping of several). Also remembered for restart()."""
        items = dict(name) if isinstance(name, Mapping) else {name: value}
        for key, val in items.items():
            reply = self.command("CONFIG", "SET", key, str(val))
            if isinstance(reply, RedisReplyError):
                raise RedisError(f"CONFIG SET {key} {val}: {reply}")
            self.config[key] = str(val)

    def config_get(self, name: str) -> str | None:
        reply = self.command("CONFIG", "GET", name)
        return reply[1] if isinstance(reply, list) and len(reply) == 2 else None

    def flushall(self) -> None:
        self.command("FLUSHALL")


# ---------------------------------------------------------------------- RedisCluster


class RedisCluster:
    """``masters`` (default 3) cluster-enabled redis-servers joined into one cluster.

    ``startup_nodes`` is a list of ``redis.cluster.ClusterNode``; ``addresses`` the
    ``(host, port)`` pairs; ``nodes`` the underlying :class:`RedisServer` objects.
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        config: Mapping[str, Any] | None = None,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.config = dict(config or {})
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.redis_cli = require_binary("redis-cli")
        require_binary("redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="satchel-redis-cluster-"))
        self.nodes: list[RedisServer] = []
        self.create_output = ""

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [n.address for n in self.nodes]

    @property
    def startup_nodes(self) -> list[Any]:
        from redis.cluster import ClusterNode

        return [ClusterNode(host, port) for host, port in self.addresses]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"redis://{host}:{port}"

    @property
    def urls(self) -> list[str]:
        return [f"redis://{h}:{p}" for h, p in self.addresses]

    def logs(self, max_chars: int = 2000) -> str:
        return "\n".join(f"--- node {n.port} ---\n{n.logs(max_chars)}" for n in self.nodes)

    def __repr__(self) -> str:
        return f"<RedisCluster {self.addresses}>"

    def start(self) -> RedisCluster:
        try:
            for i in range(self.masters):
                node = RedisServer(
                    config=self.config,
                    extra_args=self.extra_args,
                    cluster=True,
                    data_dir=self.dir / f"node-{i}",
                    startup_timeout=self.startup_timeout,
                )
                self.nodes.append(node)
                node.start()
            self._create()
            wait_until(
                self._all_ok,
                timeout=self.startup_timeout,
                message="cluster_state:ok on every node",
            )
        except BaseException:
            print(f"redis cluster startup failed:\n{self.logs()}\n{self.create_output}")
            self.stop()
            raise
        return self

    def _create(self) -> None:
        argv = [
            self.redis_cli, "--cluster", "create",
            *(f"{h}:{p}" for h, p in self.addresses),
            "--cluster-replicas", "0", "--cluster-yes",
        ]  # fmt: skip
        res = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.startup_timeout,
            check=False,
        )
        self.create_output = res.stdout + res.stderr
        if res.returncode != 0 or "[OK] All 16384 slots covered" not in res.stdout:
            raise RedisError(f"redis-cli --cluster create failed:\n{self.create_output}")

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        reply = node.command("CLUSTER", "INFO")
        if not isinstance(reply, str) or isinstance(reply, RedisReplyError):
            return {}
        pairs = (line.split(":", 1) for line in reply.splitlines() if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}

    def _all_ok(self) -> bool:
        for node in self.nodes:
            try:
                info = self.cluster_info(node)
            except OSError:
                return False
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(
                self.masters
            ):
                return False
        return True

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.cluster.RedisCluster`` client (redis-py defaults, overridable)."""
        from redis.cluster import RedisCluster as ClusterClient

        opts: dict[str, Any] = {
            "startup_nodes": self.startup_nodes,
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
        }
        opts.update(kwargs)
        return ClusterClient(**opts)

    def flushall(self) -> None:
        for node in self.nodes:
            node.command("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
