"""``satchel compare``: client-held context against server-side modes, side by side.

One run starts its own ``redis-server`` on a free loopback port, then serves the
example app (``examples/minimal_chat``) under gunicorn in each mode in turn:

========  ==================================================================================
baseline  ``SATCHEL_BASELINE=1``: same routes, no context handling at all
client    the context travels in the token; the Redis overflow tier is configured but
          sessions stay under the byte budget (60 000 bytes, 400 turns) so it is never used
server    ``SATCHEL_MODE=server``: the context is kept in Redis, a signed id travels
memory    ``SATCHEL_MODE=memory``: the context is kept in the worker process; correct only
          with one worker (or sticky sessions), so it runs with ``-w 1``
========  ==================================================================================

A separate load process (:mod:`satchel.bench._load`) drives many interleaved
conversations per mode and context size (4, 20, 50, 200 turns): each conversation is
first built up to the size, then a fixed number of further messages is measured. The
harness reads the gunicorn processes' RSS and CPU time from ``/proc``, Redis' memory
from ``INFO memory``, and, in a fault phase, kills Redis for a fixed window while
client and server modes are under load. It writes ``comparison.md`` and PNG plots
(matplotlib, Agg) to ``--out`` (default ``docs``) and prints whether the targets
were met. ``--quick`` is a smoke run (sizes 4 and 20, fewer requests, a shorter fault
window) that finishes well within two minutes.

Every request count and every phase is bounded; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import hashlib
import http.client
import json
import math
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..flask_ext.config import SatchelConfig
from . import _procs
from ._procs import (
    LOOPBACK,
    free_port,
    require_modules,
    resp_command,
    spawn,
    start_child,
    stop_on_sigterm,
    tail,
    terminate,
    terminate_all,
    wait_until,
)

APP_SPEC = "examples.minimal_chat.app:create_app()"
MODES = ("baseline", "client", "server", "memory")
MODE_COLORS = {
    "baseline": "#7f7f7f",
    "client": "#1f77b4",
    "server": "#d62728",
    "memory": "#2ca02c",
    "client, overflowing": "#9467bd",
}
#: A benchmark-only key, fixed so that runs are comparable (never use it elsewhere).
BENCH_KEYS = "bench:" + base64.urlsafe_b64encode(
    hashlib.sha256(b"satchel compare: benchmark-only key, never for production").digest()
).rstrip(b"=").decode("ascii")
#: In the outage phase a client-mode conversation holding this many turns starts over,
#: under the loaded phases' 400-turn window (SATCHEL_MAX_TURNS) and 60,000-byte budget.
CLIENT_FAULT_RESTART_AT = 300
#: gunicorn refuses header fields over 8190 bytes by default; 200-turn tokens are larger.
HEADER_FIELD_LIMIT = 65536
TARGET_LATENCY_OVERHEAD = 0.15
TARGET_SIZE = 20
#: the breaker every mode runs with (the extension's defaults: the harness sets none)
BREAKER = SatchelConfig()


# -------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """How much load each phase gets."""

    quick: bool
    sizes: tuple[int, ...]
    conversations: dict[int, int]  # per size, for the loaded measurement
    per_conv: dict[int, int]  # measured messages per conversation, per size
    latency_conversations: dict[int, int]  # per size, for the one-in-flight measurement
    threads: int  # concurrent requests under load
    rounds: int  # each mode's conversations are measured in this many interleaved slices
    session_steps: tuple[int, ...]  # cumulative sessions for the memory curve
    session_turns: int
    fault_modes: tuple[str, ...]
    fault_conversations: int
    fault_duration: float
    fault_kill_at: float
    fault_down_for: float
    phase_deadline: float  # seconds, per load command


FULL = Plan(
    quick=False,
    sizes=(4, 20, 50, 200),
    conversations={4: 800, 20: 400, 50: 160, 200: 80},
    per_conv={4: 1, 20: 2, 50: 5, 200: 10},
    latency_conversations={4: 200, 20: 100, 50: 40, 200: 20},
    threads=8,
    rounds=4,
    session_steps=(0, 200, 400, 800),
    session_turns=20,
    fault_modes=("client", "client, overflowing", "server"),
    fault_conversations=200,
    fault_duration=20.0,
    fault_kill_at=5.0,
    fault_down_for=5.0,
    phase_deadline=120.0,
)

QUICK = Plan(
    quick=True,
    sizes=(4, 20),
    conversations={4: 160, 20: 80},
    per_conv={4: 1, 20: 2},
    latency_conversations={4: 40, 20: 20},
    threads=8,
    rounds=2,
    session_steps=(0, 50, 100),
    session_turns=20,
    fault_modes=("client", "server"),
    fault_conversations=40,
    fault_duration=6.0,
    fault_kill_at=1.5,
    fault_down_for=2.0,
    phase_deadline=20.0,
)


# ------------------------------------------------------------------------- processes


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14, 15 of stat(5)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except (OSError, ValueError):
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


# ------------------------------------------------------------------------------ redis


class RedisProcess(_procs.RedisProcess):
    """The private redis-server of :mod:`._procs` (127.0.0.1, no persistence, killable
    and restartable), with what the report reads from it."""

    def url_for(self, db: int = 0) -> str:
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def command(self, *args: str, timeout: float = 2.0) -> Any:
        return resp_command(self.port, *args, timeout=timeout)

    def used_memory(self) -> int:
        text = self.command("INFO", "memory")
        for line in str(text).splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
        return 0

    def key_bytes(self, db: int) -> int:
        """What database ``db``'s keys take, by ``MEMORY USAGE`` of each: a session's
        cost without ``used_memory``'s allocator and connection-buffer swings (about
        20 KB up or down, sessions or not, as an idle connection's buffer is freed)."""
        return int(self.command("EVAL", _KEY_BYTES_SCRIPT, "0", str(db), timeout=30.0))

    def keys(self, db: int | None = None) -> int:
        """Keys in database ``db`` (every database when None), from INFO keyspace."""
        total = 0
        for line in str(self.command("INFO", "keyspace")).splitlines():
            name, _, rest = line.partition(":")
            if name.startswith("db") and (db is None or name == f"db{db}"):
                total += int(rest.split(",")[0].split("=")[1])
        return total

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0


# --------------------------------------------------------------------------- the app


@functools.cache
def _gunicorn_has_control_socket() -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any("--no-control-socket" in (s.cli or []) for s in KNOWN_SETTINGS)


class AppServer:
    """``gunicorn -w N -b 127.0.0.1:PORT 'examples.minimal_chat.app:create_app()'``."""

    def __init__(self, repo: Path, env: dict[str, str], workers: int, log: Path) -> None:
        self.repo = repo
        self.env = env
        self.workers = workers
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "gunicorn",
            "-c", "python:satchel.bench._procs",  # post_fork: workers die with the master
            "-w", str(self.workers),
            "-b", f"{LOOPBACK}:{self.port}",
            "--limit-request-field_size", str(HEADER_FIELD_LIMIT),
            "--graceful-timeout", "3",
        ]  # fmt: skip
        if _gunicorn_has_control_socket():
            argv.append("--no-control-socket")  # several servers may run at once
        return [*argv, APP_SPEC]

    def start(self) -> AppServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SATCHEL_")}
        paths = [str(self.repo), str(self.repo / "server")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **self.env)
        for _ in range(3):
            self.port = free_port()
            offset = self.log.stat().st_size if self.log.exists() else 0
            self.proc = spawn(self.argv(), log_path=self.log, env=env, cwd=self.repo)
            try:
                wait_until(self._ready, timeout=30, what="gunicorn to answer")
            except RuntimeError:
                terminate(self.proc)
                raise RuntimeError(f"gunicorn did not answer:\n{tail(self.log)}") from None
            if self.proc.poll() is None:
                return self
            fresh = self.log.read_bytes()[offset:].decode("utf-8", "replace")
            if "in use" not in fresh:
                break
        raise RuntimeError(f"gunicorn exited at startup:\n{tail(self.log)}")

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return True
        if len(children(self.proc.pid)) < self.workers:
            return False
        try:
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
            conn.request("GET", "/api/context")
            conn.getresponse().read()
            conn.close()
        except (OSError, http.client.HTTPException):
            return False
        return True

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


class LoadProcess:
    """The separate load generator (``python -m satchel.bench._load``), over pipes."""

    def __init__(self, repo: Path, port: int) -> None:
        env = dict(os.environ)
        paths = [str(repo / "server")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.proc = start_child(
            [sys.executable, "-m", "satchel.bench._load", "--port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the load process gave no answer in {timeout:.0f}s") from None
        if line is None:
            raise RuntimeError("the load process exited")
        result = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"load process: {result['error']}")
        return result

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.send(cmd)
        budget = float(cmd.get("deadline", cmd.get("duration", 60))) + 30
        return self.receive(budget)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "quit"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        terminate(self.proc, grace=1)


# ---------------------------------------------------------------------------- results


@dataclass
class Results:
    plan: Plan
    workers: int
    started: str = ""
    finished: str = ""
    elapsed: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fault: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode_workers: dict[str, int] = field(default_factory=dict)
    redis_keys_after: dict[str, int] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: seal + open of this run's own client contexts: Satchel's codec and the floor
    codec_cost: dict[str, Any] = field(default_factory=dict)


# SCAN and MEMORY USAGE inside the server: one round trip for the whole database.
_KEY_BYTES_SCRIPT = """
redis.call('SELECT', ARGV[1])
local total, cursor = 0, '0'
repeat
  local page = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    total = total + (redis.call('MEMORY', 'USAGE', key) or 0)
  end
until cursor == '0'
return total
"""
#: Redis databases: client-mode overflow and server-mode contexts are kept apart, so
#: the keys each mode writes can be counted while both are served.
_MODE_DB = {"client": 1, "client, overflowing": 1, "server": 0}


def codec_cost(tokens: list[str], *, quick: bool = False) -> dict[str, Any]:
    """Seal + open, in this process, of a context this run's client mode really carried.

    The token of median length is opened with the benchmark's keys; its context is then
    sealed and opened by Satchel's codec (sealed mode, as the app runs) and by the
    primitive floor of a sealed token (msgpack + zstd + AES-GCM + base64 chained by
    hand, :class:`~satchel.bench.codec.SealedFloor`) on the same wire map, interleaved
    round by round. Empty if no token came back.
    """
    from ..codec import Codec
    from ..keys import Keyring
    from .codec import SealedFloor, measure, wire_of

    if not tokens:
        return {}
    keyring = Keyring.from_string(BENCH_KEYS)
    codec = Codec(keyring)
    token = sorted(tokens, key=len)[len(tokens) // 2]
    ctx = codec.open(token)
    wire = wire_of(ctx)
    floor = SealedFloor(keyring.derive(keyring.current.kid, "bench", "floor"), codec.compressor)
    floor_token = floor.seal(wire)
    medians = measure(
        {
            "satchel_seal": lambda: codec.seal(ctx),
            "satchel_open": lambda: codec.open(token),
            "floor_seal": lambda: floor.seal(wire),
            "floor_open": lambda: floor.open(floor_token),
        },
        rounds=5 if quick else 11,
        budget_s=0.01 if quick else 0.03,
    )
    return {
        "turns": len(ctx.turns),
        "token_bytes": len(token),
        "satchel_us": (medians["satchel_seal"] + medians["satchel_open"]) * 1e6,
        "floor_us": (medians["floor_seal"] + medians["floor_open"]) * 1e6,
    }


def mode_env(mode: str, redis: RedisProcess) -> dict[str, str]:
    env = {
        "SATCHEL_KEYS": BENCH_KEYS,
        "SATCHEL_MAX_TURNS": "400",
        "SATCHEL_MAX_TOKEN_BYTES": "60000",
        "SATCHEL_HARD_MAX_TOKEN_BYTES": str(HEADER_FIELD_LIMIT),
    }
    url = redis.url_for(_MODE_DB.get(mode, 0))
    if mode == "baseline":
        env["SATCHEL_BASELINE"] = "1"
    elif mode == "client":
        env.update(SATCHEL_MODE="client", SATCHEL_OVERFLOW_URL=url)
    elif mode == "server":
        # Both, as a server-mode deployment on one Redis sets them (the store URL
        # falls back to the overflow URL when unset).
        env.update(SATCHEL_MODE="server", SATCHEL_STORE_URL=url, SATCHEL_OVERFLOW_URL=url)
    elif mode == "memory":
        env["SATCHEL_MODE"] = "memory"
    elif mode == "client, overflowing":
        env.update(
            SATCHEL_MODE="client",
            SATCHEL_OVERFLOW_URL=url,
            SATCHEL_MAX_TOKEN_BYTES="1200",
            SATCHEL_HARD_MAX_TOKEN_BYTES="16384",
        )
    else:
        raise ValueError(mode)
    return env


class Harness:
    def __init__(self, repo: Path, plan: Plan, workers: int, workdir: Path) -> None:
        self.repo = repo
        self.plan = plan
        self.workers = workers
        self.workdir = workdir
        self.redis = RedisProcess(workdir)
        self.results = Results(plan=plan, workers=workers)

    def log(self, text: str) -> None:
        print(f"[compare {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def workers_for(self, mode: str) -> int:
        return 1 if mode == "memory" else self.workers

    @contextlib.contextmanager
    def serving(self, label: str, env: dict[str, str], workers: int) -> Iterator[AppServer]:
        log = self.workdir / f"gunicorn-{label.replace(', ', '-')}.log"
        app = AppServer(self.repo, env, workers, log).start()
        try:
            yield app
        finally:
            app.stop()

    def run(self) -> Results:
        t0 = time.perf_counter()
        self.results.started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.redis.start()
        self.results.machine = machine_info(self.redis.version())
        try:
            for mode in MODES:
                self.results.mode_workers[mode] = self.workers_for(mode)
                self.run_sessions(mode)
            self.run_sizes()
            for mode in self.plan.fault_modes:
                self.run_fault(mode)
        finally:
            self.redis.close()
        with contextlib.suppress(OSError):
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            self.results.machine["loadavg_end"] = load
        self.results.elapsed = time.perf_counter() - t0
        self.results.finished = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return self.results

    def build(self, load: LoadProcess, group: str, count: int, turns: int) -> dict[str, Any]:
        return load.call(
            {
                "cmd": "build",
                "group": group,
                "count": count,
                "turns": turns,
                "threads": self.plan.threads,
                "deadline": self.plan.phase_deadline,
            }
        )

    def warm_up(self, load: LoadProcess) -> None:
        """First requests import and initialise lazily: keep them out of every figure."""
        self.build(load, "warm-up", self.plan.threads * 2, 6)
        load.call(
            {
                "cmd": "measure",
                "group": "warm-up",
                "per_conv": 2,
                "threads": self.plan.threads,
                "deadline": self.plan.phase_deadline,
            }
        )

    # -- memory vs sessions (one fresh server per mode) ------------------------------------

    def run_sessions(self, mode: str) -> None:
        plan = self.plan
        self.redis.flushall()
        self.log(f"{mode}: memory vs sessions (gunicorn -w {self.workers_for(mode)})")
        env = mode_env(mode, self.redis)
        with self.serving(f"sessions-{mode}", env, self.workers_for(mode)) as app:
            load = LoadProcess(self.repo, app.port)
            try:
                self.warm_up(load)
                points = []
                have = 0
                for step in plan.session_steps:
                    if step > have:
                        self.build(load, f"sessions-{step}", step - have, plan.session_turns)
                        have = step
                    points.append(
                        {
                            "sessions": step,
                            "rss": app.rss(),
                            "redis_used_memory": self.redis.used_memory(),
                            "redis_key_bytes": self.redis.key_bytes(_MODE_DB.get(mode, 0)),
                            "redis_keys": self.redis.keys(),
                        }
                    )
            finally:
                load.close()
        base_rss, base_redis = points[0]["rss"], points[0]["redis_used_memory"]
        for p in points:
            p["rss_delta"] = p["rss"] - base_rss
            p["redis_delta"] = p["redis_used_memory"] - base_redis
            p["redis_key_delta"] = p["redis_key_bytes"] - points[0]["redis_key_bytes"]
        self.results.sessions[mode] = points
        last = points[-1]
        self.log(
            f"{mode}: {last['sessions']} sessions of {plan.session_turns} turns: "
            f"app RSS {last['rss_delta'] / 2**20:+.1f} MiB, "
            f"Redis keys {last['redis_key_delta'] / 2**20:+.2f} MiB ({last['redis_keys']} keys)"
        )

    # -- context sizes (every mode served at once, measured in interleaved rounds) ---------

    def run_sizes(self) -> None:
        plan = self.plan
        self.redis.flushall()
        apps: dict[str, AppServer] = {}
        loads: dict[str, LoadProcess] = {}
        try:
            for mode in MODES:
                log = self.workdir / f"gunicorn-{mode}.log"
                env = mode_env(mode, self.redis)
                apps[mode] = AppServer(self.repo, env, self.workers_for(mode), log).start()
                loads[mode] = LoadProcess(self.repo, apps[mode].port)
                self.warm_up(loads[mode])
            self.log(f"serving {', '.join(MODES)}; measuring in {plan.rounds} interleaved rounds")
            for mode in MODES:
                self.results.sizes[mode] = {}
            for size in plan.sizes:
                self.measure_size(size, apps, loads)
            for mode in MODES:
                self.results.redis_keys_after[mode] = self.redis.keys(_MODE_DB.get(mode, 0))
        finally:
            for load in loads.values():
                load.close()
            for app in apps.values():
                app.stop()

    def measure_size(
        self, size: int, apps: dict[str, AppServer], loads: dict[str, LoadProcess]
    ) -> None:
        plan = self.plan
        self.redis.flushall()
        built: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            db = _MODE_DB.get(mode, 0)
            key_bytes_before = self.redis.key_bytes(db)
            before, keys_before = self.redis.used_memory(), self.redis.keys()
            b1 = self.build(loads[mode], f"load-{size}", plan.conversations[size], size)
            b2 = self.build(loads[mode], f"lat-{size}", plan.latency_conversations[size], size)
            after, keys_after = self.redis.used_memory(), self.redis.keys()
            key_bytes = self.redis.key_bytes(db) - key_bytes_before
            sessions = plan.conversations[size] + plan.latency_conversations[size]
            complete = b1["complete"] + b2["complete"]
            if complete < sessions:
                # Measured anyway, the figures would be labelled with a size many of
                # the conversations never reached (a slow or busy host).
                raise RuntimeError(
                    f"{mode} mode built only {complete} of {sessions} conversations to "
                    f"{size} turns before the phase deadline ({plan.phase_deadline:.0f} s): "
                    "the host is too slow or too busy for this run; nothing was reported"
                )
            built[mode] = {
                "complete": b1["complete"] + b2["complete"],
                "requests": b1["requests"] + b2["requests"],
                "statuses": _merge(b1["statuses"], b2["statuses"]),
                # The keys' own size: used_memory's delta (kept beside it) carried
                # ~20 KB swings that are no session's, a 10% error at 100 sessions.
                "redis_per_session": key_bytes / sessions,
                "redis_used_memory_per_session": (after - before) / sessions,
                "redis_keys": keys_after - keys_before,  # written by this mode's sessions
            }
        for mode in MODES:  # settle after the builds; not counted
            loads[mode].call(
                {
                    "cmd": "measure",
                    "group": "warm-up",
                    "per_conv": 1,
                    "threads": plan.threads,
                    "deadline": plan.phase_deadline,
                }
            )
        cpu = {mode: [0.0, 0.0, 0.0] for mode in MODES}
        for r in range(plan.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                app, load = apps[mode], loads[mode]
                cpu_before = (app.cpu(), self.redis.cpu(), load.cpu())
                load.call(
                    {
                        "cmd": "measure",
                        "group": f"load-{size}",
                        "per_conv": plan.per_conv[size],
                        "threads": plan.threads,
                        "slice": [r, plan.rounds],
                        "deadline": plan.phase_deadline,
                    }
                )
                cpu_after = (app.cpu(), self.redis.cpu(), load.cpu())
                for i in range(3):
                    cpu[mode][i] += cpu_after[i] - cpu_before[i]
        for r in range(plan.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                loads[mode].call(
                    {
                        "cmd": "measure",
                        "group": f"lat-{size}",
                        "per_conv": plan.per_conv[size],
                        "threads": 1,
                        "slice": [r, plan.rounds],
                        "deadline": plan.phase_deadline,
                    }
                )
        if size == TARGET_SIZE:
            held = loads["client"].call({"cmd": "tokens", "group": f"lat-{size}", "limit": 15})
            self.results.codec_cost = codec_cost(held["tokens"], quick=self.plan.quick)
        for mode in MODES:
            loaded = loads[mode].call({"cmd": "summary", "group": f"load-{size}"})
            single = loads[mode].call({"cmd": "summary", "group": f"lat-{size}"})
            n = max(1, loaded["requests"])
            # Redis' own CPU counts for a mode only when the mode stored anything there:
            # otherwise what moved in the slice is Redis' background ticks (sampled at
            # 10 ms), which no request of that mode caused.
            uses_redis = mode == "server" or built[mode]["redis_keys"] > 0
            row = {
                "size": size,
                "conversations": plan.conversations[size],
                "per_conv": plan.per_conv[size],
                "built_complete": built[mode]["complete"],
                "built_requests": built[mode]["requests"],
                "build_statuses": built[mode]["statuses"],
                "loaded": loaded,
                "single": single,
                "app_cpu_ms": cpu[mode][0] * 1000 / n,
                "redis_cpu_ms": cpu[mode][1] * 1000 / n if uses_redis else 0.0,
                "load_cpu_ms": cpu[mode][2] * 1000 / n,
                "rss": apps[mode].rss(),
                "redis_per_session": built[mode]["redis_per_session"],
                "redis_keys": built[mode]["redis_keys"],
            }
            self.results.sizes[mode][size] = row
            self.log(
                f"{mode} @ {size} turns: {loaded['rps']:.0f} rps, p50 {loaded['p50_ms']:.2f} ms, "
                f"p99 {loaded['p99_ms']:.2f} ms, 1-in-flight p50 {single['p50_ms']:.2f} ms, "
                f"up {loaded['req_bytes']:.0f} B / down {loaded['resp_bytes']:.0f} B, "
                f"app CPU {row['app_cpu_ms']:.2f} ms/req, errors {loaded['errors']}"
            )

    # -- fault ---------------------------------------------------------------------------

    def run_fault(self, mode: str) -> None:
        plan = self.plan
        if not self.redis.ping():
            self.redis.restart()
        self.redis.flushall()
        env = mode_env(mode, self.redis)
        if mode != "client":
            env["SATCHEL_MAX_TURNS"] = str(plan.session_turns)  # a window: stay at ~20
        # "client" keeps the Redis tier and the loaded phases' window and budget (400
        # turns, 60,000 bytes): its sessions grow through the phase but stay under
        # the budget, so its requests do not need Redis, and the outage is measured
        # with the tier configured, as a deployment would run it. ("client,
        # overflowing" has a small byte budget, so older turns do live in Redis.)
        self.log(f"fault: {mode}, Redis killed for {plan.fault_down_for:.1f}s")
        with self.serving(f"fault-{mode}", env, self.workers) as app:
            load = LoadProcess(self.repo, app.port)
            try:
                self.warm_up(load)
                self.build(load, "fault", plan.fault_conversations, plan.session_turns)
                keys_before = self.redis.keys(_MODE_DB.get(mode, 0))
                load.send(
                    {
                        "cmd": "timed",
                        "group": "fault",
                        "duration": plan.fault_duration,
                        "threads": plan.threads,
                        "bucket": 0.25,
                        # Under the 400-turn window, whatever the machine's speed (a
                        # quick run on a fast host reached 428 turns and spilled).
                        "restart_at": CLIENT_FAULT_RESTART_AT if mode == "client" else None,
                    }
                )
                sent = time.monotonic()
                time.sleep(max(0.0, sent + plan.fault_kill_at - time.monotonic()))
                killed = time.monotonic()
                self.redis.kill()
                time.sleep(max(0.0, killed + plan.fault_down_for - time.monotonic()))
                restarting = time.monotonic()
                self.redis.start(same_port=True)
                back = time.monotonic()
                result = load.receive(plan.fault_duration + 40)
                keys_after = self.redis.keys(_MODE_DB.get(mode, 0))
            finally:
                load.close()
        t0 = result["t0"]
        result.update(
            mode=mode,
            kill_at=killed - t0,
            restart_at=restarting - t0,
            back_at=back - t0,
            keys_before=keys_before,
            keys_after=keys_after,  # written after the restart (it came back empty)
            tier_configured="SATCHEL_OVERFLOW_URL" in env or "SATCHEL_STORE_URL" in env,
        )
        result["windows"] = fault_windows(result)
        self.results.fault[mode] = result
        self.log(
            f"fault: {mode}: {result['requests']} requests, {result['errors']} errors "
            f"({result['error_rate']:.1%}), statuses {result['statuses']}, "
            f"resets {result['resets']}, degraded {result['degraded']}"
        )


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def fault_windows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Requests and errors before the kill, while Redis was down, and after it was back."""
    bucket = result["bucket"]
    spans = {
        "before": (0.0, result["kill_at"]),
        "outage": (result["kill_at"], result["back_at"]),
        "after": (result["back_at"], math.inf),
    }
    out = {}
    for name, (lo, hi) in spans.items():
        rows = [b for b in result["timeline"] if lo <= b["t"] + bucket / 2 < hi]
        n = sum(b["requests"] for b in rows)
        e = sum(b["errors"] for b in rows)
        out[name] = {
            "requests": n,
            "errors": e,
            "error_rate": e / n if n else 0.0,
            "resets": sum(b["resets"] for b in rows),
            "degraded": sum(b["degraded"] for b in rows),
        }
    recovered = None
    for b in result["timeline"]:
        if b["t"] >= result["back_at"] and b["requests"] and b["errors"] == 0:
            recovered = b["t"]
            break
    out["after"]["recovered_at"] = recovered
    return out


# ---------------------------------------------------------------------------- targets


def check_targets(res: Results) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    sizes = res.sizes
    t = TARGET_SIZE

    def row(mode: str) -> dict[str, Any] | None:
        return sizes.get(mode, {}).get(t)

    base, client, server = row("baseline"), row("client"), row("server")
    if base and client:
        for key, label in (("loaded", f"{res.plan.threads} in flight"), ("single", "1 in flight")):
            b, c = base[key]["p50_ms"], client[key]["p50_ms"]
            overhead = c / b - 1 if b else math.inf
            targets.append(
                {
                    "name": f"client p50 at {t} turns within +15% of baseline ({label})",
                    "met": overhead <= TARGET_LATENCY_OVERHEAD,
                    "value": f"{c:.2f} ms vs {b:.2f} ms ({overhead:+.1%}, {c - b:+.2f} ms)",
                }
            )
    if client and server:
        c, s = client["loaded"]["rps"], server["loaded"]["rps"]
        targets.append(
            {
                "name": f"client RPS >= server RPS at {t} turns "
                f"({res.workers} worker{'s' if res.workers != 1 else ''} each)",
                "met": c >= s,
                "value": f"{c:.0f} vs {s:.0f} rps ({c / s - 1:+.1%})" if s else f"{c:.0f} rps",
            }
        )
    if "client" in sizes:
        keys = res.redis_keys_after.get("client", 0)
        per = [r["redis_per_session"] for r in sizes["client"].values()]
        targets.append(
            {
                "name": "Redis memory for client sessions under budget = 0",
                "met": keys == 0 and all(r["redis_keys"] == 0 for r in sizes["client"].values()),
                "value": f"{keys} keys written ({max(per):.0f} B of keys per session)",
            }
        )
    client_fault = res.fault.get("client")
    if client_fault:
        tier = "Redis tier configured" if client_fault.get("tier_configured") else "no tier"
        targets.append(
            {
                "name": "Redis outage: client mode (under budget) 0% errors",
                "met": client_fault["errors"] == 0,
                "value": f"{client_fault['errors']} errors in {client_fault['requests']} "
                f"requests ({tier}; {client_fault.get('keys_after', 0)} keys written to "
                "Redis after its restart)",
            }
        )
    server_fault = res.fault.get("server")
    if server_fault:
        kinds = server_fault["error_kinds"]
        clean = all(k == "503 tier_unavailable" for k in kinds)
        out = server_fault["windows"]["outage"]
        targets.append(
            {
                "name": "Redis outage: server mode errors are 503 tier_unavailable "
                "(no 500s, no hangs); rate as measured",
                "met": clean and server_fault["no_answer"] == 0,
                "value": f"{out['error_rate']:.1%} while Redis was down, "
                f"{server_fault['error_rate']:.1%} over the run; {kinds or 'no errors'}",
            }
        )
    for mode, rows in sizes.items():
        if mode.startswith("client"):
            bad = sum(
                r["loaded"]["server_errors"] + r["single"]["server_errors"] for r in rows.values()
            )
            if bad:
                targets.append({"name": f"no 5xx in {mode} mode", "met": False, "value": str(bad)})
    return targets


def client_statuses(res: Results) -> dict[str, dict[str, int]]:
    """Every status code each mode saw, over all phases (for tests and the report)."""
    out: dict[str, dict[str, int]] = {}
    for mode, rows in res.sizes.items():
        acc: dict[str, int] = {}
        for r in rows.values():
            for part in (r["build_statuses"], r["loaded"]["statuses"], r["single"]["statuses"]):
                acc = _merge(acc, part)
        out[mode] = acc
    for mode, f in res.fault.items():
        out[f"fault: {mode}"] = dict(f["statuses"])
    return out


# ------------------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_plots(res: Results, img: Path) -> list[str]:
    plt = _plt()
    img.mkdir(parents=True, exist_ok=True)
    made = []
    sizes = res.plan.sizes

    def size_axis(ax: Any) -> None:
        ax.set_xscale("log")
        ax.set_xticks(list(sizes))
        ax.set_xticklabels([str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("context size (turns)")
        ax.grid(True, alpha=0.3)

    def series(mode: str, fn: Any) -> tuple[list[int], list[float]]:
        rows = res.sizes.get(mode, {})
        xs = [s for s in sizes if s in rows]
        return xs, [fn(rows[s]) for s in xs]

    # latency vs context size
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        c = MODE_COLORS[mode]
        label = f"{mode} (-w {res.mode_workers.get(mode, res.workers)})"
        xs, p50 = series(mode, lambda r: r["loaded"]["p50_ms"])
        _, p95 = series(mode, lambda r: r["loaded"]["p95_ms"])
        axes[0].plot(xs, p50, "o-", color=c, label=f"{label} p50")
        axes[0].plot(xs, p95, "s--", color=c, alpha=0.7, label=f"{label} p95")
        xs, single = series(mode, lambda r: r["single"]["p50_ms"])
        _, single95 = series(mode, lambda r: r["single"]["p95_ms"])
        axes[1].plot(xs, single, "o-", color=c, label=f"{label} p50")
        axes[1].plot(xs, single95, "s--", color=c, alpha=0.6)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].set_title(f"under load ({res.plan.threads} requests in flight)")
    axes[1].set_title("one request in flight (p50 solid, p95 dashed)")
    for ax in axes:
        size_axis(ax)
        ax.set_ylabel("latency (ms, log scale)")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "latency_vs_context.png", dpi=110)
    plt.close(fig)
    made.append("latency_vs_context.png")

    # bytes on the wire
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for mode in MODES:
        c = MODE_COLORS[mode]
        xs, up = series(mode, lambda r: r["loaded"]["req_bytes"])
        _, down = series(mode, lambda r: r["loaded"]["resp_bytes"])
        ax.plot(xs, up, "o-", color=c, label=f"{mode}: request")
        ax.plot(xs, down, "s--", color=c, alpha=0.7, label=f"{mode}: response")
    size_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("bytes per request on the wire (headers + body)")
    ax.set_title("bytes on the wire vs context size")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(img / "bytes_vs_context.png", dpi=110)
    plt.close(fig)
    made.append("bytes_vs_context.png")

    # throughput and CPU
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        c = MODE_COLORS[mode]
        label = f"{mode} (-w {res.mode_workers.get(mode, res.workers)})"
        xs, rps = series(mode, lambda r: r["loaded"]["rps"])
        axes[0].plot(xs, rps, "o-", color=c, label=label)
        xs, cpu = series(mode, lambda r: r["app_cpu_ms"])
        _, rcpu = series(mode, lambda r: r["app_cpu_ms"] + r["redis_cpu_ms"])
        axes[1].plot(xs, cpu, "o-", color=c, label=f"{mode}: app")
        if mode == "server":
            axes[1].plot(xs, rcpu, "s--", color=c, alpha=0.7, label="server: app + Redis")
    axes[0].set_title("requests per second")
    axes[0].set_ylabel("requests / s")
    axes[1].set_title("server CPU time per request")
    axes[1].set_ylabel("ms of CPU per request")
    for ax in axes:
        size_axis(ax)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "throughput_cpu_vs_context.png", dpi=110)
    plt.close(fig)
    made.append("throughput_cpu_vs_context.png")

    # memory vs sessions
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        pts = res.sessions.get(mode, [])
        if not pts:
            continue
        c = MODE_COLORS[mode]
        xs = [p["sessions"] for p in pts]
        axes[0].plot(xs, [p["rss"] / 2**20 for p in pts], "o-", color=c, label=mode)
        redis = [p["redis_key_delta"] / 2**20 for p in pts]
        axes[1].plot(xs, redis, "o-", color=c, label=mode)
    axes[0].set_title("app server RSS (gunicorn master + workers)")
    axes[0].set_ylabel("MiB")
    axes[1].set_title("Redis memory of the mode's keys (MEMORY USAGE)")
    axes[1].set_ylabel("MiB above the first step")
    for ax in axes:
        ax.set_xlabel(f"sessions of {res.plan.session_turns} turns")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(img / "memory_vs_sessions.png", dpi=110)
    plt.close(fig)
    made.append("memory_vs_sessions.png")

    # the outage
    if res.fault:
        fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        first = next(iter(res.fault.values()))
        for mode, f in res.fault.items():
            c = MODE_COLORS.get(mode, "#000000")
            tl = f["timeline"]
            xs = [b["t"] + f["bucket"] / 2 for b in tl]
            err = [100 * b["errors"] / b["requests"] if b["requests"] else 0 for b in tl]
            reset = [100 * b["resets"] / b["requests"] if b["requests"] else 0 for b in tl]
            axes[0].plot(xs, err, "-", color=c, label=f"{mode}: errors")
            if any(reset):
                axes[0].plot(xs, reset, ":", color=c, label=f"{mode}: context lost (reset)")
            degraded = [100 * b["degraded"] / b["requests"] if b["requests"] else 0 for b in tl]
            if any(degraded):
                axes[0].plot(xs, degraded, "--", color=c, alpha=0.7, label=f"{mode}: degraded")
            axes[1].plot(xs, [b["p95_ms"] for b in tl], "-", color=c, label=f"{mode} p95")
        for ax in axes:
            ax.axvspan(first["kill_at"], first["back_at"], color="#ffcccc", alpha=0.5)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("% of requests (per 250 ms)")
        axes[0].set_title("Redis killed (shaded) and restarted empty")
        axes[0].legend(fontsize=7)
        axes[1].set_ylabel("p95 latency (ms)")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("seconds into the fault phase")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / "outage_timeline.png", dpi=110)
        plt.close(fig)
        made.append("outage_timeline.png")
    return made


# ----------------------------------------------------------------------------- report


def machine_info(redis_version: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        from importlib.metadata import version

        gunicorn_version = version("gunicorn")
    except Exception:
        gunicorn_version = "?"
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return {
        "loadavg": load,
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem / 2**30,
        "python": platform.python_version(),
        "gunicorn": gunicorn_version,
        "redis": redis_version,
    }


def _ms(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _b(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}"


def _redis_cell(row: dict[str, Any]) -> str:
    if not row["redis_keys"]:
        return "0 (no keys)"
    return f"{_b(row['redis_per_session'])} ({row['redis_keys']} keys)"


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def render_report(res: Results, plots: list[str]) -> str:
    plan = res.plan
    m = res.machine
    lines: list[str] = []
    add = lines.append
    title = "Client-held vs server-side context: measured"
    add(f"# {title}{' (quick smoke run)' if plan.quick else ''}")
    add("")
    add(
        "Generated by `satchel compare"
        + (" --quick" if plan.quick else "")
        + f" --workers {res.workers}` on {res.started} "
        f"({res.elapsed:.0f} s). Re-run it to refresh every figure and plot on this page."
    )
    if plan.quick:
        add("")
        add(
            "> **Quick run**: few requests, sizes 4 and 20 only, a short outage. The figures "
            "show the harness works; they are too noisy to quote."
        )
    add("")
    add("## Set-up")
    add("")
    add(f"* Machine: {m.get('cpu')}, {m.get('cores')} CPUs, {m.get('memory_gib', 0):.0f} GiB, "
        f"{m.get('os')}; Python {m.get('python')}, gunicorn {m.get('gunicorn')}, "
        f"Redis {m.get('redis')}.")  # fmt: skip
    add(
        f"* App: `examples/minimal_chat` under `gunicorn -w {res.workers}` (sync workers) on "
        "127.0.0.1, started afresh for each mode; `memory` mode runs with `-w 1` because its "
        "contexts live in one worker process (with two workers, every other request would "
        "land on a worker that has never seen the conversation). Its throughput is therefore "
        "not comparable with the others; its latency at one request in flight is."
    )
    add(
        "* Modes: **baseline** (`SATCHEL_BASELINE=1`: the same routes, no context, each "
        "reply computed from the current message only); **client** (context in the sealed "
        "token; `SATCHEL_OVERFLOW_URL` points at the benchmark Redis, but with "
        "`SATCHEL_MAX_TOKEN_BYTES=60000` and `SATCHEL_MAX_TURNS=400` every session stays "
        "under budget, so Redis is never touched; the outage phase adds *client, "
        "overflowing*, with a small budget, see there); **server** (`SATCHEL_MODE=server`, "
        "context in Redis, a signed id travels); **memory** (`SATCHEL_MODE=memory`)."
    )
    add(
        f"* Load: a separate process (`python -m satchel.bench._load`) with "
        f"{plan.threads} threads, each with its own `http.client` connection, taking turns "
        "among its share of the conversations, so the server sees many interleaved "
        "conversations with "
        f"{plan.threads} requests in flight. Each conversation is first built up to the "
        "context size, then sent a fixed number of further messages that are measured; "
        "a second, smaller set of conversations is measured with one request in flight "
        "(latency without queueing). Messages are 2-4 generated sentences (mostly "
        "100-300 characters); the reply is the example's deterministic stand-in model."
    )
    counts = ", ".join(
        f"{s} turns: {plan.conversations[s]} conversations x {plan.per_conv[s]}" for s in plan.sizes
    )
    drift = max(2 * (plan.per_conv[s] - 1) / s for s in plan.sizes)
    add(f"* Measured requests per mode under load: {counts}. A conversation measured "
        "k times carries N, N+2, ..., N+2(k-1) turns, so a size's requests carry up to "
        f"{drift:.0%} more turns than its name.")  # fmt: skip
    add(
        "* Bytes are counted on the socket by the load generator: request line, headers and "
        "body up; status line, headers and body down. CPU is utime+stime of the gunicorn "
        "master and workers from `/proc/PID/stat` over the loaded phase, divided by its "
        "requests (Redis' own CPU separately); RSS is the sum of their `VmRSS`, which "
        "counts the pages the workers share with the master once per process (and memory "
        "mode runs one worker): compare modes by how RSS grows, not by its level; Redis "
        "memory per session is the `MEMORY USAGE` of the mode's keys (its own database), "
        "divided by its sessions: `used_memory` moves by about 20 KB with no session at all "
        "(an idle connection's buffer freed, then allocated again)."
    )
    add(
        f"* The load generator runs on the same {m.get('cores')} CPUs as the server and "
        "Redis, so throughput is a relative figure: all modes pay the same client cost. "
        "All four modes are served at once and measured in interleaved rounds "
        f"({plan.rounds} slices of each mode's conversations, the mode order rotating), "
        "so background load on the machine hits them alike. Load average (1, 5, 15 min) "
        f"at the start: {m.get('loadavg')}; at the end: {m.get('loadavg_end', '?')}."
    )
    add("")
    add("## Targets")
    add("")
    add("| target | result | measured |")
    add("|---|---|---|")
    for t in res.targets:
        add(f"| {t['name']} | {'**met**' if t['met'] else '**missed**'} | {t['value']} |")
    add("")
    add(_verdict(res))
    notes = _target_notes(res)
    if notes:
        add("")
        add(notes)
    add("")
    add("## Throughput, latency, bytes and CPU by context size")
    add("")
    add(
        "p50/p95/p99 are under load; *1-in-flight p50* is the same request with no queue. "
        "*up* / *down*: bytes on the wire per request. *CPU*: app (gunicorn) CPU per "
        "request; for a mode that stores anything in Redis (server mode; client mode once "
        "it overflows), Redis' own CPU per request is added after the `+`."
    )
    for size in plan.sizes:
        add("")
        add(f"### {size} turns")
        add("")
        add(
            "| mode | workers | rps | p50 ms | p95 ms | p99 ms | 1-in-flight p50 ms | up B "
            "| down B | token B | CPU ms/req | RSS MiB | Redis B/session | errors |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for mode in MODES:
            r = res.sizes.get(mode, {}).get(size)
            if not r:
                continue
            lo = r["loaded"]
            cpu = _ms(r["app_cpu_ms"])
            if r["redis_cpu_ms"] > 0.005:
                cpu += f" + {_ms(r['redis_cpu_ms'])}"
            add(
                f"| {mode} | {res.mode_workers.get(mode)} | {lo['rps']:.0f} | "
                f"{_ms(lo['p50_ms'])} | {_ms(lo['p95_ms'])} | {_ms(lo['p99_ms'])} | "
                f"{_ms(r['single']['p50_ms'])} | {_b(lo['req_bytes'])} | "
                f"{_b(lo['resp_bytes'])} | {_b(lo['token_bytes'])} | {cpu} | "
                f"{r['rss'] / 2**20:.1f} | {_redis_cell(r)} | "
                f"{lo['errors'] + r['single']['errors']} |"
            )
    add("")
    for name in ("latency_vs_context.png", "bytes_vs_context.png", "throughput_cpu_vs_context.png"):
        if name in plots:
            add(f"![{name[:-4].replace('_', ' ')}](img/{name})")
            add("")
    add("Where the time goes inside the app (`Server-Timing`, mean ms per request, "
        f"at {TARGET_SIZE} turns under load):")  # fmt: skip
    add("")
    add("| mode | open | trim | budget check (`overflow`) | seal | total Satchel |")
    add("|---|---|---|---|---|---|")
    for mode in MODES:
        r = res.sizes.get(mode, {}).get(TARGET_SIZE)
        if not r:
            continue
        st = r["loaded"]["server_timing_ms"]
        cells = [_ms(st.get(k, float("nan"))) for k in ("open", "trim", "overflow", "seal")]
        add(f"| {mode} | " + " | ".join(cells) + f" | {_ms(st.get('satchel', float('nan')))} |")
    add("")
    add(
        "*total Satchel* runs from the start of the request to the sealed token, so it "
        "includes the view and, under load, time spent waiting for the CPU. In server "
        "mode *open* includes the Redis read and *seal* the Redis write; memory mode's "
        "include the in-process store."
    )
    client = res.sizes.get("client", {}).get(TARGET_SIZE)
    if client:
        st = client["loaded"]["server_timing_ms"]
        check, seal = st.get("overflow", 0.0), st.get("seal", 0.0)
        if seal and check > 0.3 * seal:
            add("")
            add(
                f"In client mode the budget check costs {_ms(check)} ms against "
                f"{_ms(seal)} ms for sealing, although nothing overflows: it packs and "
                "compresses the whole context to learn the token's size. Sealing then "
                "seals exactly those bytes (`Codec.prepare`), so it only protects and "
                "encodes."
            )
    add("")
    add("## Memory vs number of sessions")
    add("")
    add(
        f"Sessions of {plan.session_turns} turns are created one after another on a fresh "
        "server; after each step the harness reads the app's RSS and the `MEMORY USAGE` of "
        "the mode's Redis keys."
    )
    add("")
    steps = plan.session_steps
    add("| mode | " + " | ".join(f"{s} sessions: RSS MiB / Redis KiB" for s in steps) + " |")
    add("|---|" + "---|" * len(steps))
    for mode in MODES:
        pts = res.sessions.get(mode)
        if not pts:
            continue
        cells = [f"{p['rss'] / 2**20:.1f} / {p['redis_key_delta'] / 1024:.0f}" for p in pts]
        add(f"| {mode} | " + " | ".join(cells) + " |")
    add("")
    if "memory_vs_sessions.png" in plots:
        add("![memory vs sessions](img/memory_vs_sessions.png)")
        add("")
    add(_memory_text(res))
    add("")
    add("## Redis outage")
    add("")
    add(
        f"{plan.fault_conversations} conversations, built to {plan.session_turns} turns, "
        f"run for {plan.fault_duration:.0f} s with {plan.threads} requests in flight. Redis "
        f"is SIGKILLed {plan.fault_kill_at:.1f} s in and started again (empty: no "
        f"persistence) {plan.fault_down_for:.1f} s later. Every request is bucketed by when "
        "it was sent (250 ms buckets). Every mode runs with Redis configured. *server* "
        f"keeps them at {plan.session_turns} turns with a rolling window "
        f"(`SATCHEL_MAX_TURNS={plan.session_turns}`). *client* has the Redis overflow tier "
        "and the loaded phases' window and budget (400 turns, 60,000 bytes): its "
        "conversations grow through the phase but stay under the budget, the case the "
        f"target is about (one that reaches {CLIENT_FAULT_RESTART_AT} turns starts over, so "
        "none outgrows them however fast the machine). *client, overflowing* (full runs "
        "only) is client mode with a 1200-byte budget, so older turns live in Redis and "
        "the outage reaches them."
    )
    add("")
    add(
        "| mode | requests | errors | error rate | while down | after restart | status codes "
        "| context lost (reset) | degraded (down / after) | max latency ms |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for mode, f in res.fault.items():
        w = f["windows"]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(f["statuses"].items()))
        add(
            f"| {mode} | {f['requests']} | {f['errors']} | {_pct(f['error_rate'])} | "
            f"{_pct(w['outage']['error_rate'])} | {_pct(w['after']['error_rate'])} | "
            f"{statuses} | {f['resets']} | {f['degraded']} ({w['outage']['degraded']} / "
            f"{w['after']['degraded']}) | {_ms(f['max_ms'])} |"
        )
    add("")
    if "outage_timeline.png" in plots:
        add("![outage timeline](img/outage_timeline.png)")
        add("")
    add(_fault_text(res))
    add("")
    add("## Where client-held context loses, and where it wins")
    add("")
    add(_tradeoffs(res))
    add("")
    add("## Caveats")
    add("")
    for note in _caveats(res):
        add(f"* {note}")
    add("")
    data = {
        "version": 1,
        "quick": plan.quick,
        "workers": res.workers,
        "statuses": client_statuses(res),
        "targets": [{"name": t["name"], "met": t["met"]} for t in res.targets],
        "codec_cost": {k: round(v, 1) for k, v in res.codec_cost.items()},
    }
    add(f"<!-- satchel-compare-data: {json.dumps(data, sort_keys=True)} -->")
    return "\n".join(lines) + "\n"


def _get(res: Results, mode: str, size: int) -> dict[str, Any] | None:
    return res.sizes.get(mode, {}).get(size)


def _verdict(res: Results) -> str:
    met = sum(1 for t in res.targets if t["met"])
    return f"{met} of {len(res.targets)} targets met."


def _target_notes(res: Results) -> str:
    base, client = _get(res, "baseline", TARGET_SIZE), _get(res, "client", TARGET_SIZE)
    if not base or not client:
        return ""
    missed = [t for t in res.targets if t["name"].startswith("client p50") and not t["met"]]
    if not missed:
        return ""
    added = client["single"]["p50_ms"] - base["single"]["p50_ms"]
    cpu = client["app_cpu_ms"] - base["app_cpu_ms"]
    return (
        f"**On the latency target.** The baseline handler does almost nothing "
        f"({_ms(base['app_cpu_ms'])} ms of CPU per request), so Satchel's fixed work per "
        f"request (open, lifecycle, budget check, seal, observers: {cpu:+.2f} ms of CPU at "
        f"{TARGET_SIZE} turns) is large next to it: the +15% target is missed against this "
        f"baseline. In absolute terms one request in flight takes {added:+.2f} ms; next to "
        f"a model reply that takes 500 ms to generate that is {added / 500:.2%}. Under "
        "load the same CPU cost also shows up as queueing (the loaded p50)."
    ) + _floor_text(res, base["single"]["p50_ms"])


def _floor_text(res: Results, base_p50_ms: float) -> str:
    cost = res.codec_cost
    if not cost or base_p50_ms <= 0:
        return ""
    budget_us = base_p50_ms * 1000 * TARGET_LATENCY_OVERHEAD
    return (
        f" How little room +15% leaves: sealing and opening one of this run's own "
        f"{cost['turns']}-turn client contexts ({cost['token_bytes']:,}-byte token) takes "
        f"{cost['satchel_us']:.0f} us with Satchel's codec, and {cost['floor_us']:.0f} us "
        f"for the primitive floor alone (msgpack + zstd + AES-GCM + base64 chained by hand, "
        f"measured on the same wire map). +15% of the baseline's {_ms(base_p50_ms)} ms is "
        f"{budget_us:.0f} us: the floor takes {cost['floor_us'] / budget_us:.0%} of it "
        "before a header is read, a turn is trimmed or the byte budget is checked."
    )


def _memory_text(res: Results) -> str:
    parts = []
    last = {m: pts[-1] for m, pts in res.sessions.items() if pts}
    n = res.plan.session_steps[-1]
    if "server" in last and n:
        per = last["server"]["redis_key_delta"] / n
        parts.append(
            f"Server mode costs Redis about {per:,.0f} bytes per {res.plan.session_turns}-turn "
            f"session (`MEMORY USAGE` of its keys: the sealed context, the session's index "
            f"set and key overhead)"
        )
    if "client" in last:
        parts.append(
            f"client mode wrote {last['client']['redis_keys']} keys "
            f"(`used_memory` moved {last['client']['redis_delta']:+,} bytes all the same: "
            "connection buffers)"
        )
    if "memory" in last and n:
        per = last["memory"]["rss_delta"] / n
        parts.append(
            f"memory mode grows the worker's RSS by about {per:,.0f} bytes per session, "
            "and it is lost on every restart or deploy"
        )
    if "client" in last and n:
        per = last["client"]["rss_delta"] / n
        parts.append(
            f"client mode's RSS moved by {per:+,.0f} bytes per session (allocator noise and "
            "the bounded per-process fork-detection map)"
        )
    if "baseline" in last:
        parts.append(
            f"the baseline, which keeps nothing, moved by "
            f"{last['baseline']['rss_delta'] / 2**20:+.1f} MiB: RSS grows in allocator-sized "
            "steps, so read the slopes, not single steps"
        )
    return "; ".join(parts) + "." if parts else ""


def _fault_text(res: Results) -> str:
    out = []
    c = res.fault.get("client")
    s = res.fault.get("server")
    o = res.fault.get("client, overflowing")
    if c:
        tier = (
            "with the Redis overflow tier configured"
            if c.get("tier_configured")
            else "with no overflow tier"
        )
        out.append(
            f"**Client mode** (sessions within the byte budget, {tier}) answered "
            f"{c['requests']} requests with {c['errors']} errors and {c['degraded']} "
            "degraded answers, and wrote "
            f"{c.get('keys_after', 0)} keys to Redis after its restart: a session under its "
            "budget never needs Redis, so the outage is invisible to it."
        )
    if s:
        w = s["windows"]
        rec = w["after"].get("recovered_at")
        kinds = ", ".join(f"{k}: {v}" for k, v in s["error_kinds"].items()) or "none"
        fail_max, reset = BREAKER.breaker_fail_max, BREAKER.breaker_reset_timeout
        txt = (
            f"**Server mode** failed {_pct(w['outage']['error_rate'])} of requests while "
            f"Redis was down and {_pct(w['after']['error_rate'])} after it was back "
            f"(errors by kind: {kinds}; {s['no_answer']} requests got no HTTP answer). "
            f"Every failure is a fast JSON 503 `tier_unavailable` (max latency "
            f"{_ms(s['max_ms'])} ms): each worker's breaker opens after {fail_max} "
            "consecutive failures and stays open for `SATCHEL_BREAKER_RESET_TIMEOUT` "
            f"({reset:g} s, the default) before one trial call, so requests keep failing "
            f"fast for up to about {reset:g} s after Redis is back"
        )
        if rec is not None:
            txt += (
                f" (first error-free bucket after the restart: {rec:.2f} s into the phase, "
                f"{rec - s['back_at']:.2f} s after Redis answered again)"
            )
        else:
            txt += " (the run ended before the breaker's trial call)"
        txt += (
            f". Redis came back empty, so {s['resets']} requests found their conversation "
            "gone and started over (`Satchel-Reset: session_not_found`): a server-side "
            "store without persistence loses every context in a crash."
        )
        out.append(txt)
    if o:
        out.append(
            f"**Client mode, overflowing** (older turns in Redis) answered with "
            f"{o['errors']} errors; {o['degraded']} responses carried `Satchel-Degraded` "
            "(overflowed turns unavailable, or held inline until the tier takes writes "
            "again): the conversation goes on with the turns the token holds."
        )
    return "\n\n".join(out)


def _tradeoffs(res: Results) -> str:
    big = max(res.plan.sizes)
    t = TARGET_SIZE
    lines = ["**Loses:**", ""]
    c_big, s_big, b_big = (
        _get(res, "client", big),
        _get(res, "server", big),
        _get(res, "baseline", big),
    )
    if c_big and s_big:
        lines.append(
            f"* **Upload on every request.** At {big} turns a client-mode request is "
            f"{_b(c_big['loaded']['req_bytes'])} bytes against "
            f"{_b(s_big['loaded']['req_bytes'])} in server mode "
            f"({_ratio(c_big['loaded']['req_bytes'], s_big['loaded']['req_bytes'])}), "
            f"and the response carries the next token back "
            f"({_b(c_big['loaded']['resp_bytes'])} vs {_b(s_big['loaded']['resp_bytes'])} "
            "bytes). Mobile uplinks pay that on every message; the token grows with the "
            "context until the byte budget moves turns to the overflow tier."
        )
        c_t, s_t = _get(res, "client", TARGET_SIZE), _get(res, "server", TARGET_SIZE)
        if c_t and s_t and big != TARGET_SIZE:
            lines[-1] += (
                f" At {TARGET_SIZE} turns it is {_b(c_t['loaded']['req_bytes'])} against "
                f"{_b(s_t['loaded']['req_bytes'])} bytes up."
            )
        tok = c_big["loaded"]["token_bytes"]
        over = []
        if tok > 8190:
            over.append(
                "gunicorn's default 8190-byte header field limit (this harness raises it "
                f"with `--limit-request-field_size {HEADER_FIELD_LIMIT}`)"
            )
        if tok > 8192:
            over.append("nginx's default 8 KB header buffers")
        if tok > 4096:
            over.append("the 4 KB a cookie can hold")
        if over:
            lines.append(
                f"* **Header size limits.** A {big}-turn token is {_b(tok)} bytes: over "
                + ", ".join(over)
                + ". Keep the default budget (`SATCHEL_MAX_TOKEN_BYTES=3800`) with an "
                "overflow tier, or raise every proxy's limits along the way."
            )
        else:
            lines.append(
                f"* **Header size limits.** A {big}-turn token is {_b(tok)} bytes; at 200 "
                "turns with this run's budget it would pass gunicorn's default 8190-byte "
                "header limit and nginx's 8 KB buffers (run without `--quick` to see)."
            )
    c_t, s_t, b_t = _get(res, "client", t), _get(res, "server", t), _get(res, "baseline", t)
    if c_t and b_t:
        st = c_t["loaded"]["server_timing_ms"]
        lines.append(
            f"* **CPU for sealing and opening.** At {t} turns the app spends "
            f"{_ms(c_t['app_cpu_ms'])} ms of CPU per request in client mode against "
            f"{_ms(b_t['app_cpu_ms'])} ms for the baseline; Satchel's own steps take "
            f"{_ms(st.get('satchel', float('nan')))} ms (open "
            f"{_ms(st.get('open', float('nan')))}, seal {_ms(st.get('seal', float('nan')))}). "
            "Server mode seals too (it stores the same sealed bytes), so against server "
            "mode the difference is parsing and moving the larger header."
        )
    if c_t and s_t and t != big and c_t["loaded"]["rps"] < s_t["loaded"]["rps"]:
        lines.append(
            f"* **Throughput at {t} turns.** {c_t['loaded']['rps']:.0f} rps in client mode "
            f"against {s_t['loaded']['rps']:.0f} in server mode on the same {res.workers} "
            "workers: in this run, opening and sealing the token cost more than the "
            "loopback Redis round trips."
        )
    if c_big and s_big and c_big["loaded"]["rps"] < s_big["loaded"]["rps"]:
        lines.append(
            f"* **Throughput at {big} turns.** The advantage over server mode is gone: "
            f"{c_big['loaded']['rps']:.0f} rps against {s_big['loaded']['rps']:.0f}, "
            f"and {_ms(c_big['app_cpu_ms'])} ms of app CPU per request against "
            f"{_ms(s_big['app_cpu_ms'])} (+ {_ms(s_big['redis_cpu_ms'])} in Redis): "
            "opening and sealing a large token costs about what a loopback Redis round "
            "trip does."
        )
    if c_big and b_big:
        lines.append(
            f"* **Latency grows with the context (against the baseline).** With one "
            f"request in flight a {big}-turn client request takes "
            f"{_ms(c_big['single']['p50_ms'])} ms (p50) against "
            f"{_ms(b_big['single']['p50_ms'])} ms for the baseline, which keeps no context"
            + (
                f" (server mode, which opens and seals the same context after a Redis "
                f"round trip: {_ms(s_big['single']['p50_ms'])} ms)"
                if s_big
                else ""
            )
            + "."
        )
    lines += ["", "**Wins:**", ""]
    last = {m: pts[-1] for m, pts in res.sessions.items() if pts}
    if "server" in last and "client" in last:
        n = res.plan.session_steps[-1]
        lines.append(
            f"* **No server memory per session.** {n} sessions cost Redis "
            f"{last['server']['redis_key_delta'] / 2**20:.2f} MiB in server mode and nothing "
            f"in client mode ({last['client']['redis_keys']} keys); memory mode puts them "
            "in the worker's RSS instead, where a restart loses them."
        )
    c_f, s_f = res.fault.get("client"), res.fault.get("server")
    if c_f and s_f:
        lines.append(
            f"* **Survives a Redis outage.** {c_f['errors']} errors in client mode against "
            f"{_pct(s_f['windows']['outage']['error_rate'])} of requests failing in server "
            f"mode while Redis was down, plus {s_f['resets']} conversations lost when it "
            "came back empty."
        )
    if c_t and s_t and c_t["loaded"]["rps"] >= s_t["loaded"]["rps"]:  # else under Loses
        cr, sr = c_t["loaded"]["rps"], s_t["loaded"]["rps"]
        lines.append(
            f"* **Throughput at {t} turns.** {cr:.0f} rps in client mode against {sr:.0f} in "
            f"server mode on the same {res.workers} workers ({cr / sr - 1:.0%} more); "
            f"server mode also spends {_ms(s_t['redis_cpu_ms'])} ms of Redis CPU per request "
            "and a network round trip (two on a write) that a remote Redis would make longer "
            "than this loopback one."
        )
    lines.append(
        "* **No affinity.** Any instance with the key ring serves any request; memory mode "
        "needs one process or sticky sessions (tests/test_scaling.py, docs/scaling.md)."
    )
    return "\n".join(lines)


def _caveats(res: Results) -> list[str]:
    notes = [
        "Loopback Redis: a Redis across a network adds a round trip (or two) to every "
        "server-mode request that this run does not show.",
        "The stand-in model's replies are short and templated, so tokens compress better "
        "than contexts of real model output would; real contexts reach the byte budget at "
        "fewer turns.",
        "gunicorn sync workers close the connection after every response, so every request "
        "also pays a loopback TCP connect (the same for all modes).",
        "Client mode pays the extension's full per-request path (opening, lifecycle "
        "policies, sealing, headers); the baseline has no extension at all.",
    ]
    if res.workers > 1:
        notes.append(
            "`memory` mode ran with one worker, so its throughput is not comparable with "
            f"the {res.workers}-worker modes."
        )
    notes += res.notes
    return notes


# ------------------------------------------------------------------------------ entry


def find_repo() -> Path:
    """The checkout holding ``examples/minimal_chat`` (cwd first, then this package's)."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / "examples" / "minimal_chat" / "app.py").is_file():
            return root
    raise RuntimeError(
        "satchel compare runs the example app from a source checkout: run it from the "
        "repository root (where examples/minimal_chat is)"
    )


def _out_problem(out: Path) -> str | None:
    """Why the report could not be written under ``out`` at the end of a run, or None:
    a file there, or a file where one of the directories to create would go."""
    if out.exists():
        if not out.is_dir():
            return "is a file, not a directory"
        return None if os.access(out, os.W_OK) else "not writable"
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            return None if os.access(parent, os.W_OK) else f"{parent} is not writable"
    return None


def main(args: argparse.Namespace) -> int:
    with stop_on_sigterm():
        return _main(args)


def max_workers() -> int:
    """The most ``--workers`` this machine is given: 4 per CPU, and at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


def _main(args: argparse.Namespace) -> int:
    quick = bool(getattr(args, "quick", False))
    workers = int(getattr(args, "workers", 2))  # 0 is refused below, not taken for 2
    out = Path(getattr(args, "out", "docs") or "docs")
    plan = QUICK if quick else FULL
    if workers < 1:
        print("satchel compare: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > max_workers():
        # Every mode starts that many processes: a typo (100000) forked them all.
        print(
            f"satchel compare: --workers {workers} is more than {max_workers()} "
            f"(4 per CPU, at least 64) on this machine",
            file=sys.stderr,
        )
        return 2
    problem = _out_problem(out)
    if problem:  # found now, not after a five-minute run
        print(f"satchel compare: --out {out}: {problem}", file=sys.stderr)
        return 2
    try:
        repo = find_repo()
        # The app servers' Redis modes, gunicorn, and the plots drawn after the run.
        require_modules("gunicorn", "redis", "matplotlib", extra="bench")
    except RuntimeError as exc:
        print(f"satchel compare: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="satchel-compare-"))
    try:
        try:
            harness = Harness(repo, plan, workers, workdir)  # finds redis-server
        except RuntimeError as exc:
            print(f"satchel compare: {exc}", file=sys.stderr)
            return 2
        try:
            results = harness.run()
        except RuntimeError as exc:
            print(f"satchel compare: {exc}", file=sys.stderr)
            return 1
        finally:
            terminate_all(grace=2)
        results.targets = check_targets(results)
        try:
            out.mkdir(parents=True, exist_ok=True)
            plots = make_plots(results, out / "img")
            report = out / "comparison.md"
            report.write_text(render_report(results, plots), encoding="utf-8")
        except OSError as exc:  # checked before the run, but a file system can still refuse
            print(f"satchel compare: --out {out}: not written ({exc})", file=sys.stderr)
            return 2
    finally:  # the logs and Redis' files, whether the run finished or not (Ctrl-C)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"wrote {report} and {len(plots)} plots in {out / 'img'} ({results.elapsed:.0f} s)")
    print("targets:")
    for t in results.targets:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['name']}: {t['value']}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs")
    sys.exit(main(parser.parse_args()))
