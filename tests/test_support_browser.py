"""Headless Debian Chromium via Playwright against a LiveServer."""

from __future__ import annotations

APP = "tests.support._demo_app:create_app"


def test_click_round_trip_and_screenshot(live_server_factory, page, screenshot) -> None:
    srv = live_server_factory(APP)
    page.goto(srv.url_for("/"))
    page.fill("#msg", "héllo satchel")
    page.click("#send")
    page.wait_for_function("document.getElementById('out').textContent !== '(nothing yet)'")
    assert page.text_content("#out") == "héllo satchel"
    path = screenshot()
    assert path.name == "test_click_round_trip_and_screenshot.png"
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
