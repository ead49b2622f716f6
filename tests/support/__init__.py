"""Reusable real-service test helpers for Satchel (see tests/conftest.py for fixtures).

Import from here: ``from tests.support import RedisServer, LiveServer, free_port``.
"""

from .browser import CHROMIUM_ARGS, artifact_path, chromium_path, launch_chromium, save_screenshot
from .env import (
    ARTIFACTS_DIR,
    REPO_ROOT,
    SERVER_DIR,
    find_binary,
    free_port,
    is_ci,
    require_binary,
    skip_or_fail,
    timed_without_gc,
    wait_until,
)
from .live_server import HttpResponse, LiveServer, LiveServerError, http_request
from .procs import kill_all
from .redis_server import RedisCluster, RedisError, RedisServer, raw_command

__all__ = [
    "ARTIFACTS_DIR",
    "CHROMIUM_ARGS",
    "REPO_ROOT",
    "SERVER_DIR",
    "HttpResponse",
    "LiveServer",
    "LiveServerError",
    "RedisCluster",
    "RedisError",
    "RedisServer",
    "artifact_path",
    "chromium_path",
    "find_binary",
    "free_port",
    "http_request",
    "is_ci",
    "kill_all",
    "launch_chromium",
    "raw_command",
    "require_binary",
    "save_screenshot",
    "skip_or_fail",
    "timed_without_gc",
    "wait_until",
]
