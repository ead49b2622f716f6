"""Headless Debian Chromium driven by Playwright (never a Playwright-downloaded browser)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .env import ARTIFACTS_DIR, find_binary, require_binary, safe_filename, skip_or_fail

__all__ = [
    "CHROMIUM_ARGS",
    "artifact_path",
    "chromium_path",
    "launch_chromium",
    "save_screenshot",
]

#: Flags for a root, offline, headless machine. Without the background-networking
#: flags Chromium keeps trying to reach Google hosts that this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """Path of Debian's chromium (``$CHROMIUM_PATH`` overrides). Skips locally /
    fails under CI when it is not installed."""
    override = os.environ.get("CHROMIUM_PATH")
    if override:
        found = find_binary(override)
        if found:
            return found
        skip_or_fail(f"CHROMIUM_PATH={override!r} is not an executable")
    return require_binary(*CHROMIUM_NAMES)


def launch_chromium(playwright: Any, executable_path: str | None = None, **kwargs: Any) -> Any:
    """``playwright.chromium.launch(...)`` with Debian chromium and :data:`CHROMIUM_ARGS`."""
    args = [*CHROMIUM_ARGS, *kwargs.pop("args", [])]
    return playwright.chromium.launch(
        executable_path=executable_path or chromium_path(),
        headless=kwargs.pop("headless", True),
        args=args,
        **kwargs,
    )


def artifact_path(name: str, suffix: str = ".png") -> Path:
    """``test-artifacts/<safe name><suffix>`` (directory created)."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR / f"{safe_filename(name)}{suffix}"


def save_screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG screenshot of ``page`` as ``test-artifacts/<name>.png``; returns the path."""
    path = artifact_path(name)
    page.screenshot(path=str(path), full_page=full_page)
    return path
