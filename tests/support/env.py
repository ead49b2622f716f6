"""Environment helpers shared by the real-service test helpers.

* ``is_ci()``           -- is the ``CI`` env var set (non-empty, not "0"/"false")?
* ``skip_or_fail(msg)`` -- ``pytest.skip`` locally, ``pytest.fail`` under CI.
* ``require_binary()``  -- absolute path of an executable, or skip/fail with an install hint.
* ``free_port()``       -- an unused TCP port on 127.0.0.1.
* ``wait_until()``      -- poll a predicate with a deadline (no fixed sleeps).
* ``satchel_command()`` -- argv that runs the installed ``satchel`` console script.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_DIR = REPO_ROOT / "server"
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
LOOPBACK = "127.0.0.1"

_DEPS_HINT = "as root run `make deps-system`, or `apt-get install -y {pkg}`"
INSTALL_HINTS: dict[str, str] = {
    "redis-server": _DEPS_HINT.format(pkg="redis-server"),
    "redis-cli": _DEPS_HINT.format(pkg="redis-server"),
    "chromium": _DEPS_HINT.format(pkg="chromium")
    + " (Debian's chromium; never `playwright install`)",
    "node": "apt-get install -y nodejs",
}


def is_ci() -> bool:
    """True when the ``CI`` environment variable is set to something truthy."""
    value = os.environ.get("CI", "").strip().lower()
    return value not in ("", "0", "false")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the current test locally; fail it when running under CI."""
    if is_ci():
        pytest.fail(f"{reason} [CI is set: missing test prerequisites are failures]", pytrace=False)
    pytest.skip(reason)


def find_binary(*names: str) -> str | None:
    """First of ``names`` found (absolute paths are accepted as-is), else None."""
    for name in names:
        if os.path.isabs(name):
            if os.access(name, os.X_OK) and not os.path.isdir(name):
                return name
            continue
        found = shutil.which(name)
        if found:
            return found
    return None


def require_binary(name: str, *alternatives: str, hint: str | None = None) -> str:
    """Return the path of ``name`` (or of the first alternative found).

    When none is installed: ``pytest.skip`` locally, ``pytest.fail`` when CI is set,
    with a message saying how to install it.
    """
    path = find_binary(name, *alternatives)
    if path:
        return path
    how = hint or INSTALL_HINTS.get(name) or f"install {name!r} and put it on PATH"
    names = " / ".join((name, *alternatives))
    skip_or_fail(f"required binary {names} not found on PATH; to install: {how}")


def free_port(host: str = LOOPBACK) -> int:
    """An unused TCP port on ``host`` (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.005,
    max_interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value, which is returned.

    Polls with a short, growing interval; raises ``TimeoutError`` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(delay)
        delay = min(delay * 2, max_interval)


@contextlib.contextmanager
def timed_without_gc() -> Iterator[None]:
    """A timed section with the garbage collector collected first, then off: a full
    collection late in the suite takes 60-600 ms, and one landing inside a section
    bounded at 50 ms would fail a check that is about the code, not the collector."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_filename(name: str, max_len: int = 150) -> str:
    """Make a test name (``test_x[a/b]``) usable as a file name."""
    cleaned = _UNSAFE.sub("-", name).strip("-.") or "unnamed"
    return cleaned[:max_len]


def tail(path: Path | str | None, max_chars: int = 4000) -> str:
    """The last ``max_chars`` characters of a log file ('' when missing)."""
    if not path:
        return ""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return data[-max_chars:].decode("utf-8", "replace")


def satchel_env(keys: str | None = None, **extra: str) -> dict[str, str]:
    """This environment for a ``satchel`` command: no ``SATCHEL_*`` of the caller's,
    the checkout's ``server/`` importable, ``SATCHEL_KEYS`` when given, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATCHEL_")}
    server = Path(__file__).resolve().parents[2] / "server"
    env["PYTHONPATH"] = os.pathsep.join([str(server), env.get("PYTHONPATH", "")])
    if keys is not None:
        env["SATCHEL_KEYS"] = keys
    env.update(extra)
    return env


def satchel_command() -> list[str]:
    """The ``satchel`` console script next to this Python (the one ``pip install``
    made), else on PATH, else ``python -m satchel.cli``."""
    import sys

    script = Path(sys.executable).with_name("satchel")
    if script.exists():
        return [str(script)]
    found = shutil.which("satchel")
    return [found] if found else [sys.executable, "-m", "satchel.cli"]
