"""Subprocess management: every helper process runs in its own process group, is
registered here, and is killed at teardown (and at interpreter exit as a last resort).

When ``setpriv --pdeathsig`` is available the child also gets SIGKILL if the test
process dies abruptly, so a crashed or killed pytest leaves no servers behind.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

_LIVE: set[subprocess.Popen] = set()


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return ()
    try:
        ok = (
            subprocess.run(
                [setpriv, "--pdeathsig", "KILL", "--", "true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (setpriv, "--pdeathsig", "KILL", "--") if ok else ()


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path | str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen:
    """Start ``argv`` in a new session/process group, stdout+stderr appended to
    ``log_path``. The returned Popen's pid is the process group id."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*_pdeathsig_prefix(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            close_fds=True,
        )
    _LIVE.add(proc)
    return proc


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill(proc: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """SIGKILL the process (by pid) and reap it; then SIGKILL whatever is left in its group."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
    _signal_group(proc, signal.SIGKILL)
    _LIVE.discard(proc)


def terminate(proc: subprocess.Popen, *, grace: float = 5.0) -> int | None:
    """SIGTERM the whole process group, wait up to ``grace`` s, then SIGKILL it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        _signal_group(proc, signal.SIGCONT)  # a SIGSTOPped process must run to see SIGTERM
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    _signal_group(proc, signal.SIGKILL)  # stragglers (e.g. gunicorn workers)
    _LIVE.discard(proc)
    return proc.returncode


def proc_state(pid: int) -> str | None:
    """Linux process state letter from /proc (R, S, T=stopped, Z, ...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces
    return stat.rsplit(")", 1)[1].split()[0]


def kill_all() -> None:
    """SIGKILL every process group still registered (teardown safety net)."""
    for proc in list(_LIVE):
        try:
            kill(proc, timeout=5)
        except Exception:  # best effort at teardown
            _LIVE.discard(proc)


atexit.register(kill_all)
