"""The chat example in real headless Chromium (Debian's), against a live app on loopback.

Every test saves a screenshot under test-artifacts/. No fixed sleeps: Playwright's
auto-waiting expectations only. ``body[data-state]`` is ``sending`` from the moment a
message is submitted until its reply has streamed in and the page has re-read the
context (``idle``), so waiting for ``idle`` after a send means "everything settled".
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from satchel import Keyring

APP = "examples.chat.app:create_app"
SECRET_KEYS = Keyring.generate().to_string()


# --------------------------------------------------------------------- helpers


def start_app(live_server_factory: Any, tmp_path: Path, **env: str) -> Any:
    base = {
        "SATCHEL_KEYS": SECRET_KEYS,
        "SATCHEL_OVERFLOW_URL": f"sqlite:///{tmp_path / 'overflow.sqlite3'}",
        "SATCHEL_MODEL_BASE_URL": "",  # the offline model, whatever the caller's env says
        "SATCHEL_MODEL_DELAY": "0",
    }
    base.update(env)
    return live_server_factory(APP, env=base)


def open_chat(page: Page, srv: Any) -> None:
    page.goto(srv.url_for("/"))
    expect(page.locator("body")).to_have_attribute("data-state", "idle")


def send(page: Page, text: str) -> None:
    """Type ``text``, press Enter, and wait until the reply is in and the page settled."""
    assistants = page.locator(".msg-assistant")
    before = assistants.count()
    page.fill("#message", text)
    page.press("#message", "Enter")
    expect(assistants).to_have_count(before + 1)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#message")).to_be_focused()


def last_reply(page: Page) -> Any:
    return page.locator(".msg-assistant .msg-text").last


def current_record(page: Page) -> dict[str, Any] | None:
    """The stored ``{token, seq, session}`` of the conversation the page shows."""
    raw = page.evaluate(
        """() => {
            const index = JSON.parse(localStorage.getItem('satchel-chat:index') || '{}');
            return localStorage.getItem('satchel:' + index.current);
        }"""
    )
    return json.loads(raw) if raw else None


def server_context(srv: Any, page: Page) -> dict[str, Any]:
    record = current_record(page)
    assert record, "no token stored for the current conversation"
    resp = srv.get("/api/context", headers={"Satchel-Context": record["token"]})
    assert resp.status == 200, resp.text
    return resp.json()


def user_texts(data: dict[str, Any]) -> list[str]:
    return [t["content"] for t in data["all_turns"] if t["role"] == "user"]


def hex_words(n: int) -> str:
    return " ".join(secrets.token_hex(4) for _ in range(n))


# ----------------------------------------------------------------------- tests


def test_send_and_receive(live_server_factory, tmp_path, page, screenshot) -> None:
    srv = start_app(live_server_factory, tmp_path)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    open_chat(page, srv)

    # Accessible composer: a labelled textarea that has focus from the start.
    composer = page.get_by_label("Message", exact=True)
    expect(composer).to_be_focused()
    expect(page.get_by_role("button", name="New chat", exact=True)).to_be_visible()
    expect(page.get_by_role("log")).to_contain_text("No messages yet")

    send(page, "Hello from Chromium")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Hello from Chromium"])
    expect(last_reply(page)).to_contain_text("You said: “Hello from Chromium”")
    expect(page.locator("#thread-title")).to_have_text("Hello from Chromium")
    expect(page.locator("#conversations button")).to_have_count(1)
    expect(page.locator("#conversations button[aria-current=true]")).to_contain_text(
        "Hello from Chromium"
    )

    # Shift+Enter is a newline, Enter sends the two lines as one message.
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(composer).to_have_value("line one\nline two")
    expect(page.locator(".msg-user")).to_have_count(1)
    page.keyboard.press("Enter")
    expect(page.locator(".msg-user .msg-text").last).to_have_text("line one\nline two")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(composer).to_have_value("")
    expect(composer).to_be_focused()

    # The status area agrees with the token the browser holds.
    token = current_record(page)["token"]
    expect(page.locator("#token-bytes")).to_have_text(f"{len(token):,}")
    expect(page.locator("#turns-held")).to_have_text("4")
    expect(page.locator("#turns-overflowed")).to_have_text("0")
    expect(page.locator("#overflow-tier")).to_have_text("sqlite")
    expect(page.locator("#notice")).to_be_hidden()
    data = server_context(srv, page)
    assert user_texts(data) == ["Hello from Chromium", "line one\nline two"]

    screenshot()
    assert not errors, errors
    foreign = [u for u in requests if not u.startswith(srv.url) and not u.startswith("data:")]
    assert not foreign, f"the page loaded something from elsewhere: {foreign}"


def test_streamed_reply_renders_progressively(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = start_app(live_server_factory, tmp_path, SATCHEL_MODEL_DELAY="0.03")
    open_chat(page, srv)
    # Record every text the reply bubble shows while it streams in.
    page.evaluate(
        """() => {
            window.__seen = [];
            const thread = document.getElementById('thread');
            new MutationObserver(() => {
                const texts = thread.querySelectorAll('.msg-assistant .msg-text');
                if (texts.length) window.__seen.push(texts[texts.length - 1].textContent);
            }).observe(thread, {childList: true, subtree: true, characterData: true});
        }"""
    )
    page.fill("#message", "Please stream a reply word by word")
    page.press("#message", "Enter")
    thread = page.get_by_role("log")
    expect(thread).to_have_attribute("aria-busy", "true")
    expect(page.locator(".msg-assistant.pending .msg-text")).to_contain_text("You said")
    screenshot("streaming")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(thread).to_have_attribute("aria-busy", "false")

    final = server_context(srv, page)["all_turns"][-1]
    assert final["role"] == "assistant"
    expect(last_reply(page)).to_have_text(final["content"])
    seen = [s for s in page.evaluate("window.__seen") if s]
    distinct = list(dict.fromkeys(seen))
    assert len(distinct) >= 10, distinct  # many intermediate renders, not one block
    assert distinct[-1] == final["content"]
    for shorter, longer in itertools.pairwise(distinct):
        assert longer.startswith(shorter), (shorter, longer)  # it only ever grew
    screenshot()


def test_reload_keeps_the_conversation(live_server_factory, tmp_path, page, screenshot) -> None:
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "First conversation, message one")
    send(page, "First conversation, message two")
    first_thread = page.locator(".msg-text").all_inner_texts()

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".msg-text")).to_have_text(first_thread)
    expect(page.locator("#thread-title")).to_have_text("First conversation, message one")
    expect(page.locator("#turns-held")).to_have_text("4")

    # A second conversation becomes the most recent one.
    page.get_by_role("button", name="New chat", exact=True).click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    send(page, "Second conversation")
    expect(page.locator("#conversations button")).to_have_count(2)

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Second conversation"])
    expect(page.locator("#conversations button")).to_have_count(2)
    expect(page.locator("#conversations button[aria-current=true]")).to_contain_text(
        "Second conversation"
    )

    # The first one is still there, whole.
    page.locator("#conversations button", has_text="First conversation").click()
    expect(page.locator(".msg-text")).to_have_text(first_thread)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    screenshot()


def test_two_tabs_share_one_history(
    live_server_factory, tmp_path, page, screenshot, browser
) -> None:
    srv = start_app(live_server_factory, tmp_path, SATCHEL_MODEL_DELAY="0.02")
    open_chat(page, srv)
    # Tabs are serialized by Web Locks and kept in sync by BroadcastChannel.
    expect(page.locator("body")).to_have_attribute("data-lock-mode", "web-locks")
    expect(page.locator("body")).to_have_attribute("data-sync-mode", "broadcast-channel")
    send(page, "Opening message from tab one")

    other = page.context.new_page()  # same context: same localStorage, same origin
    open_chat(other, srv)
    expect(other.locator(".msg-user .msg-text")).to_have_text(["Opening message from tab one"])

    # Both tabs send at (nearly) the same time to the same conversation.
    page.fill("#message", "Concurrent message from tab one")
    other.fill("#message", "Concurrent message from tab two")
    page.press("#message", "Enter")
    other.press("#message", "Enter")
    # Both are in flight together (each reply streams for about a second).
    expect(page.locator("body")).to_have_attribute("data-state", "sending")
    expect(other.locator("body")).to_have_attribute("data-state", "sending")

    expected = {
        "Opening message from tab one",
        "Concurrent message from tab one",
        "Concurrent message from tab two",
    }
    for tab in (page, other):
        expect(tab.locator(".msg-user")).to_have_count(3, timeout=15_000)
        expect(tab.locator(".msg-assistant")).to_have_count(3)
        expect(tab.locator("body")).to_have_attribute("data-state", "idle")

    # One history on the server, no lost turn, strictly alternating.
    data = server_context(srv, page)
    roles = [t["role"] for t in data["all_turns"]]
    assert roles == ["user", "assistant"] * 3
    assert set(user_texts(data)) == expected
    assert user_texts(data)[0] == "Opening message from tab one"
    # Each reply answers the message right before it.
    for user, assistant in zip(data["all_turns"][::2], data["all_turns"][1::2], strict=True):
        assert user["content"][:20] in assistant["content"]
    assert current_record(other) == current_record(page)

    # Both tabs show exactly that history.
    server_texts = [t["content"] for t in data["all_turns"]]
    expect(page.locator(".msg-text")).to_have_text(server_texts)
    expect(other.locator(".msg-text")).to_have_text(server_texts)
    screenshot("tab-one")
    screenshot("tab-two", other_page=other)
    other.close()


# Each tab's own requests, awaited one after the other, for one conversation.
RACE = """async ([tab, n]) => {
  const { createClient } = await import('/static/satchel/satchel.js');
  const client = createClient({ conversation: 'race' });
  const forks = [];
  client.on('fork', (d) => forks.push(d.detail));
  for (let i = 0; i < n; i++) {
    await client.fetch('/api/chat', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ message: `${tab} ${i}` }),
    });
  }
  return forks;
}"""


@pytest.mark.parametrize("mode", ["client", "server"])
def test_two_tabs_racing_lose_no_turn(
    live_server_factory, tmp_path, page, screenshot, mode, request
) -> None:
    """Many requests from two tabs, back to back, on one conversation: every turn lands.

    Client mode: the conversation lock hands over faster than localStorage reaches the
    other tab in Chromium; without the client's wait for the announced write, a tab
    sends the token it still sees, and its turn (or the other tab's) is lost. Server
    mode (the context in Redis, a carrier in the tab): the same two tabs, no turn lost.
    """
    env = {"SATCHEL_MAX_TURNS": "400"}
    if mode == "server":
        env.update(
            SATCHEL_MODE="server", SATCHEL_STORE_URL=request.getfixturevalue("redis_server").url
        )
    srv = start_app(live_server_factory, tmp_path, **env)
    open_chat(page, srv)
    other = page.context.new_page()
    open_chat(other, srv)
    n = 40
    page.evaluate(f"window.race = ({RACE})(['one', {n}]); 0")
    other.evaluate(f"window.race = ({RACE})(['two', {n}]); 0")
    assert page.evaluate("window.race") == []
    assert other.evaluate("window.race") == []
    record = json.loads(page.evaluate("localStorage.getItem('satchel:race')"))
    assert record["token"].startswith("sv1.") == (mode == "server")
    resp = srv.get("/api/context", headers={"Satchel-Context": record["token"]})
    assert resp.status == 200, resp.text
    sent = {f"{tab} {i}" for tab in ("one", "two") for i in range(n)}
    assert sorted(user_texts(resp.json())) == sorted(sent)
    screenshot(other_page=other)
    other.close()


def test_tampered_token_recovers_with_a_reset_notice(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "This will be forgotten")

    def tamper() -> None:
        page.evaluate(
            """() => {
                const index = JSON.parse(localStorage.getItem('satchel-chat:index'));
                const key = 'satchel:' + index.current;
                const record = JSON.parse(localStorage.getItem(key));
                const t = record.token, i = Math.floor(t.length / 2);
                record.token = t.slice(0, i) + (t[i] === 'A' ? 'B' : 'A') + t.slice(i + 1);
                localStorage.setItem(key, JSON.stringify(record));
            }"""
        )

    tamper()
    send(page, "After the tampering")
    notice = page.get_by_role("status").filter(has_text="Reset")
    expect(notice).to_contain_text("fresh context")
    expect(page.locator("#notice")).to_have_attribute("data-kinds", re.compile(r"\breset\b"))
    expect(last_reply(page)).to_contain_text("After the tampering")
    # The page now shows the fresh conversation only, as the server has it.
    expect(page.locator(".msg-user .msg-text")).to_have_text(["After the tampering"])
    assert user_texts(server_context(srv, page)) == ["After the tampering"]
    screenshot()

    # Tampering again and reloading: the page opens on a fresh context and says why.
    tamper()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#notice")).to_contain_text("could not be used")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "Starting over")
    assert user_texts(server_context(srv, page)) == ["Starting over"]
    screenshot("after-reload")


def test_redis_down_shows_degraded_notice_and_chat_continues(
    live_server_factory, tmp_path, page, screenshot, redis_server
) -> None:
    srv = start_app(
        live_server_factory,
        tmp_path,
        SATCHEL_OVERFLOW_URL=redis_server.url,
        SATCHEL_MAX_TOKEN_BYTES="1200",
        SATCHEL_MODE="client",  # overflow is what client mode does with a tier
    )
    open_chat(page, srv)
    expect(page.locator("#overflow-tier")).to_have_text("redis")

    # Chat until the token overflows into Redis.
    for i in range(15):
        send(page, f"Message {i}: {hex_words(25)}")
        if page.locator("#turns-overflowed").inner_text() != "0":
            break
    else:
        pytest.fail("the conversation never overflowed into Redis")
    expect(page.locator("#notice")).to_be_hidden()
    assert int(page.locator("#turns-overflowed").inner_text()) > 0
    page.get_by_text("Running summary").click()
    expect(page.locator("#summary")).to_contain_text("earlier turns summarized")
    expect(page.locator(".msg-user").first).to_contain_text("Message 0:")  # read back
    screenshot("overflowed")

    redis_server.kill()

    # Long messages make the next overflow (a Redis write) necessary; it fails.
    notice = page.locator("#notice")
    for i in range(6):
        send(page, f"After the outage {i}: {hex_words(60)}")
        expect(last_reply(page)).to_contain_text(f"After the outage {i}")
        if notice.is_visible():
            break
    expect(notice).to_be_visible()
    expect(notice).to_have_attribute("data-kinds", re.compile(r"\bdegraded\b"))
    expect(notice).to_contain_text("overflow store is unreachable")
    expect(page.get_by_role("status").filter(has_text="Degraded")).to_be_visible()
    screenshot("degraded")

    # The chat keeps working: another message, another reply, the history intact.
    send(page, "Still here?")
    expect(last_reply(page)).to_contain_text("Still here?")
    expect(page.locator("#error")).to_be_hidden()
    data = server_context(srv, page)
    assert user_texts(data)[-1] == "Still here?"
    assert user_texts(data)[0].startswith("Message 0:")  # old turns still shown (cached)
    screenshot()
