"""Child processes for ``satchel bench chaos`` and ``satchel compare``: a private
redis-server, the app server, and the helpers both use.

Small on purpose (the test suite has fuller helpers in ``tests/support``, which the
package must not import). Every child runs in its own session / process group, gets
SIGKILL if this process dies abruptly (``setpriv --pdeathsig`` when available), and is
killed at interpreter exit. Everything binds to 127.0.0.1 only.

This module is also:

* the embedded server: ``python -m satchel.bench._procs serve MODULE:FACTORY --port N``
  runs werkzeug's threaded server (HTTP/1.1 keep-alive, no reloader, no debugger);
* a gunicorn config (``-c python:satchel.bench._procs``): gunicorn reads the names
  here that are gunicorn settings, and the only one defined is ``post_fork`` (workers
  die with their master). Do not add module-level names that are gunicorn settings.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
_LIVE: set[subprocess.Popen] = set()


class ProcError(RuntimeError):
    """A child process failed to start or to answer."""


def require_modules(*names: str, extra: str) -> None:
    """ProcError naming the packages of ``names`` that cannot be imported, and the extra
    that installs them: found before a run starts, not as a child's traceback at
    start-up or an import after minutes of measuring."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ProcError(f"needs {', '.join(missing)}: pip install 'satchel[{extra}]'")


# ------------------------------------------------------------------------- basics


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.01
) -> T:
    """Poll ``predicate`` (growing interval, at most 0.1 s) until truthy or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ProcError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


def _exited_or(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> bool:
    """For :func:`wait_until`: stop waiting once the process is ready, or has died."""
    return proc.poll() is not None or ready()


@functools.cache
def _pdeathsig() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` when available: children die with this process."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return ()
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--") if probe.returncode == 0 else ()


def start_child(argv: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start ``argv`` in a new process group, registered for cleanup; ``popen`` goes to
    :class:`subprocess.Popen` (pipes, ``env``, ``cwd``...; stdin is /dev/null unless set)."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen([*_pdeathsig(), *argv], start_new_session=True, close_fds=True, **popen)
    _LIVE.add(proc)
    return proc


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path | str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen:
    """Start ``argv`` in a new process group, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return start_child(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
        )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _group_members(pgid: int) -> bool:
    """Whether any process is in group ``pgid`` (Linux /proc; True where it cannot be
    read, so a group is never left running for want of a look)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            return True
    return False


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and whatever is left in its group; reap it.

    The group is signalled once, and before the leader is reaped where it can be: a
    reaped group whose members are all gone frees its id for reuse, and a second
    kill() (a ``stop()`` after ``kill()``) sent SIGKILL to whatever group took it, on a
    busy machine whose process ids wrap (another run's server, say)."""
    if proc not in _LIVE:
        # Killed already (its group id may belong to another group by now), or never
        # registered: the leader alone, if it still runs.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return
    _LIVE.discard(proc)
    # The leader reaped already (a poll() saw it exit): its group id is free for reuse
    # once the group is empty, so the group is signalled only while a member is left.
    if proc.returncode is None or _group_members(proc.pid):
        _signal_group(proc, signal.SIGKILL)  # the leader and its workers at once
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def terminate(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGTERM (and SIGCONT, for a stopped process) the group, SIGKILL after ``grace``.

    Returns the exit status (negative: killed by that signal)."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        _signal_group(proc, signal.SIGCONT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    kill(proc)  # stragglers in the group too (gunicorn workers)
    return proc.returncode


def terminate_all(grace: float = 2.0) -> None:
    """SIGTERM every child still registered, SIGKILL what is left after ``grace``."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            terminate(proc, grace)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a cancelled CI job, ``timeout``) raises ``SystemExit(143)``, as Ctrl-C
    raises KeyboardInterrupt, so ``finally`` blocks and :func:`kill_all` stop the
    children and remove the work files. Python's default ends the process at once:
    the files stayed, and gunicorn workers outlived their killed master."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@atexit.register
def kill_all() -> None:
    """Last resort: SIGKILL every child still registered."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            kill(proc)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode("utf-8", "replace")
    except OSError:
        return ""


def proc_state(pid: int) -> str | None:
    """Linux process state letter (R, S, T = stopped, Z...), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# -------------------------------------------------------------------------- redis


class RedisReplyError(str):
    """An error reply (``-ERR ...``), returned instead of raised on request."""


def resp_command(
    port: int,
    *args: str | bytes | int,
    timeout: float = 0.5,
    host: str = LOOPBACK,
    raise_errors: bool = True,
) -> Any:
    """One command on a fresh connection; a tiny RESP2 reader (no redis-py, so probes
    are independent of the client under test). Error replies raise ConnectionError,
    or with ``raise_errors=False`` come back as :class:`RedisReplyError` strings."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        return read_reply(sock.makefile("rb"), raise_errors=raise_errors)


def read_reply(reader: Any, *, raise_errors: bool = True) -> Any:
    """One RESP2 reply (simple string, error, integer, bulk string, array)."""
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        if raise_errors:
            raise ConnectionError(rest.decode())
        return RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [read_reply(reader, raise_errors=raise_errors) for _ in range(n)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


class RedisProcess:
    """A throwaway ``redis-server`` on 127.0.0.1 without persistence, with faults:
    :meth:`kill` (SIGKILL), :meth:`pause` (SIGSTOP), :meth:`resume` (SIGCONT) and
    :meth:`restart` (a fresh, empty server on the same port)."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        found = binary or shutil.which("redis-server")
        if not found:
            raise ProcError(
                "redis-server not found on PATH (apt-get install redis-server, "
                "or `make deps-system`)"
            )
        self.binary = found
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
        return "unknown"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
        ]  # fmt: skip

    def ping(self, timeout: float = 0.3) -> bool:
        try:
            return resp_command(self.port, "PING", timeout=timeout) == "PONG"
        except (OSError, ConnectionError):
            return False

    def _serves_ours(self) -> bool:
        """Whether the server answering on the port is the one this object started: a
        port free when picked can be taken before redis-server binds it (or while a
        killed one is down), and a PING answered by that other Redis passed for ours,
        which the benches then killed, flushed and measured."""
        if self.proc is None:
            return False
        try:
            info = resp_command(self.port, "INFO", "server", timeout=0.3)
        except (OSError, ConnectionError):
            return False
        return f"process_id:{self.proc.pid}\r\n" in str(info)

    def dbsize(self, timeout: float = 0.3) -> int | None:
        try:
            return int(resp_command(self.port, "DBSIZE", timeout=timeout))
        except (OSError, ConnectionError, ValueError):
            return None

    def start(self, *, same_port: bool = False) -> RedisProcess:
        for _attempt in range(5):
            if not same_port:
                self.port = free_port()
            self.proc = spawn(self._argv(), log_path=self.log_path, cwd=self.dir)
            proc = self.proc
            try:
                wait_until(
                    functools.partial(_exited_or, proc, self._serves_ours),
                    timeout=10,
                    what=f"redis-server on port {self.port}",
                )
            except ProcError:
                kill(self.proc)
                raise
            if self.proc.poll() is None:
                return self
            kill(self.proc)
            if "in use" not in tail(self.log_path).lower():
                break
            if same_port:
                time.sleep(0.2)  # the killed server's socket may linger for a moment
        raise ProcError(f"redis-server did not start on port {self.port}:\n{tail(self.log_path)}")

    def kill(self) -> None:
        if self.proc is not None:
            kill(self.proc)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        pid = self.proc.pid
        wait_until(lambda: proc_state(pid) in ("T", "t"), timeout=5, what="SIGSTOP")

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        wait_until(self.ping, timeout=10, what="redis to answer after SIGCONT")

    def restart(self) -> None:
        self.kill()
        self.start(same_port=True)

    def close(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace=3)


# ---------------------------------------------------------------------------- app


def repo_root() -> Path | None:
    """The checkout holding ``examples/minimal_chat`` (cwd first, then next to the
    package), or None when Satchel runs from an install without the examples."""
    here = Path(__file__).resolve()
    for candidate in (Path.cwd(), *here.parents):
        if (candidate / "examples" / "minimal_chat" / "app.py").is_file():
            return candidate
    return None


class AppProcess:
    """``examples.minimal_chat.app:create_app`` served on 127.0.0.1 by ``kind``:
    ``"embedded"`` (werkzeug, threaded) or ``"gunicorn"`` (``workers`` processes,
    gthread worker with ``threads`` threads each, HTTP keep-alive)."""

    def __init__(
        self,
        workdir: Path,
        *,
        kind: str,
        env: Mapping[str, str],
        app: str = "examples.minimal_chat.app:create_app",
        workers: int = 2,
        threads: int = 8,
        name: str = "app",
    ) -> None:
        if kind not in ("embedded", "gunicorn"):
            raise ValueError(f"kind must be 'embedded' or 'gunicorn', not {kind!r}")
        root = repo_root()
        if root is None:
            raise ProcError(
                "examples/minimal_chat not found: run `satchel bench chaos` from a Satchel "
                "checkout (the bench serves the example app)"
            )
        self.root = root
        self.kind = kind
        self.app = app
        self.workers = workers
        self.threads = threads
        self.env = dict(env)
        self.log_path = workdir / f"{name}-{kind}.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def describe(self) -> str:
        if self.kind == "embedded":
            return "embedded (werkzeug threaded server, 1 process)"
        return f"gunicorn ({self.workers} workers x {self.threads} threads, gthread)"

    def _argv(self) -> list[str]:
        if self.kind == "embedded":
            return [
                sys.executable, "-m", "satchel.bench._procs", "serve", self.app,
                "--port", str(self.port),
            ]  # fmt: skip
        return [
            sys.executable, "-m", "gunicorn",
            "-c", "python:satchel.bench._procs",
            "-w", str(self.workers),
            "-k", "gthread", "--threads", str(self.threads),
            "-b", f"{LOOPBACK}:{self.port}",
            "--keep-alive", "5",
            "--graceful-timeout", "3",
            "--error-logfile", "-",
            "--chdir", str(self.root),
            f"{self.app}()",
        ]  # fmt: skip

    def _child_env(self) -> dict[str, str]:
        # SATCHEL_* settings come from ``env`` only, never from the caller's shell
        env = {k: v for k, v in os.environ.items() if not k.startswith("SATCHEL_")}
        import satchel

        package_parent = str(Path(satchel.__file__).resolve().parents[1])
        paths = [str(self.root), package_parent]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.settimeout(2)
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return sock.recv(12).startswith(b"HTTP/")
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> AppProcess:
        for _attempt in range(4):
            self.port = free_port()
            self.proc = spawn(
                self._argv(), log_path=self.log_path, env=self._child_env(), cwd=self.root
            )
            proc = self.proc
            try:
                wait_until(
                    functools.partial(_exited_or, proc, self._answers),
                    timeout=timeout,
                    what=f"the {self.kind} app server to answer HTTP",
                )
            except ProcError:
                terminate(proc, grace=2)
                raise ProcError(f"app server did not answer:\n{tail(self.log_path)}") from None
            if proc.poll() is None:
                return self
            kill(proc)
            if "in use" not in tail(self.log_path).lower():
                break
        raise ProcError(f"app server exited during startup:\n{tail(self.log_path)}")

    def close(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace=5)


class Workdir:
    """A temporary directory for logs, removed on exit unless ``keep``."""

    def __init__(self, keep: bool = False) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="satchel-chaos-"))
        self.keep = keep

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------ gunicorn hook, embedded server


def post_fork(server: object, worker: object) -> None:
    """gunicorn hook: a worker gets SIGKILL when its master dies (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(spec: str, port: int) -> None:
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr or "create_app")
    app = factory()
    server = make_server(LOOPBACK, port, app, threaded=True)

    def _term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    print(f"serving {spec} on http://{LOOPBACK}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m satchel.bench._procs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="serve MODULE:FACTORY with werkzeug (threaded)")
    p.add_argument("app")
    p.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        sys.path.insert(0, os.getcwd())
        _serve(args.app, args.port)


if __name__ == "__main__":
    main()
