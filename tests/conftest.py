"""Shared pytest fixtures for real services: redis-server, a redis cluster, live WSGI apps
and headless Debian Chromium. Helpers live in ``tests/support`` (``from tests.support
import ...``). Missing binaries skip locally and fail when ``CI`` is set.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "server", ROOT):  # `satchel`, `examples.*` and `tests.support` import
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# Property tests run beside real servers on 2 cores: timing is not what they test, so no
# per-example deadline (a busy machine would otherwise fail them as "too slow").
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.support import (  # noqa: E402
    ARTIFACTS_DIR,
    LiveServer,
    RedisCluster,
    RedisServer,
    kill_all,
    launch_chromium,
    save_screenshot,
)
from tests.support import chromium_path as _find_chromium  # noqa: E402
from tests.support import free_port as _free_port  # noqa: E402
from tests.support.env import safe_filename, skip_or_fail  # noqa: E402

settings.register_profile(
    "satchel", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("satchel")

# playwright runs on asyncio: a task it leaves pending is reported ("Task was destroyed
# but it is pending!") when the garbage collector gets to it, during whatever test runs
# then, whose log capture took it for that test's own (a test that checks its warnings
# failed on a clean run). Satchel uses no asyncio: its records go to stderr, not caplog.
logging.getLogger("asyncio").propagate = False
logging.getLogger("asyncio").addHandler(logging.StreamHandler(sys.stderr))

REDIS_FIXTURES = {"redis_server", "redis_factory", "redis_cluster"}
BROWSER_FIXTURES = {"chromium_path", "browser", "page", "screenshot"}


# --------------------------------------------------------------------------- hooks


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Expose ``item.rep_setup`` / ``rep_call`` / ``rep_teardown`` for fixtures."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Auto-mark tests by the fixtures they use (so ``-m 'not browser'`` works)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
        if names & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    kill_all()  # safety net: nothing started by the helpers survives the run


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


# ------------------------------------------------------------------------- basics


@pytest.fixture
def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (call ``tests.support.free_port()`` for more)."""
    return _free_port()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``<repo>/test-artifacts`` (git-ignored), created on demand."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


# -------------------------------------------------------------------------- redis


@pytest.fixture
def redis_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(**RedisServer kwargs) -> started RedisServer``; all stopped at teardown."""
    started: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        started.append(server)
        return server.start()

    yield make
    failed = _failed(request)
    for server in started:
        if failed:
            print(f"\n--- {server!r} log ---\n{server.logs()}")
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A fresh, empty redis-server on a free loopback port (function scope)."""
    return redis_factory()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master redis cluster (module scope; call ``.flushall()`` to reset data)."""
    with RedisCluster() as cluster:
        yield cluster


# -------------------------------------------------------------------- live server


@pytest.fixture
def live_server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., LiveServer]]:
    """``live_server_factory("pkg.mod:create_app", env={...}, server="gunicorn", workers=2)``
    -> started LiveServer; all stopped at teardown, logs printed if the test failed."""
    started: list[LiveServer] = []

    def make(app: str, **kwargs: Any) -> LiveServer:
        server = LiveServer(app, **kwargs)
        started.append(server)
        return server.start()

    yield make
    failed = _failed(request)
    for server in started:
        if failed:
            print(f"\n--- {server!r} log ({server.log_path}) ---\n{server.logs()}")
        server.cleanup()


# ------------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of Debian's chromium; skip locally / fail under CI if missing."""
    return _find_chromium()


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    """A headless playwright ``Browser`` on Debian chromium (session scope)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed in this interpreter (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        browser = launch_chromium(pw, executable_path=chromium_path)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh playwright ``Page`` in its own context (cookies/storage isolated).

    Every test that uses it leaves a full-page screenshot of how the page ended, so a
    person can look at what the test saw (issue 4): ``test-artifacts/<test
    name>-end.png``, or ``<test name>-failed.png`` when the test failed. Tests also
    save their own at the steps that matter (the ``screenshot`` fixture).
    """
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(10_000)
    pg = context.new_page()
    try:
        yield pg
    finally:
        failed = _failed(request)
        try:
            name = safe_filename(f"{request.node.name}-{'failed' if failed else 'end'}")
            path = save_screenshot(pg, name)
            if failed:
                print(f"\nscreenshot of failing page: {path}")
        except Exception as exc:  # the page may be gone (closed by the test)
            if failed:
                print(f"\ncould not save failure screenshot: {exc}")
        context.close()


@pytest.fixture
def screenshot(page: Any, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """``screenshot()`` saves the ``page`` fixture to ``test-artifacts/<test name>.png``;
    ``screenshot("step2")`` -> ``<test name>-step2.png``; ``screenshot(other_page=p)``."""

    def take(suffix: str = "", *, other_page: Any = None, full_page: bool = True) -> Path:
        name = request.node.name + (f"-{suffix}" if suffix else "")
        return save_screenshot(other_page or page, safe_filename(name), full_page=full_page)

    return take
