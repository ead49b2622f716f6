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
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

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


def send(page: Page, text: str, *, windowed: bool = False) -> None:
    """Type ``text``, press Enter, and wait until the reply is in and the page settled."""
    assistants = page.locator(".msg-assistant")
    before = assistants.count()
    page.fill("#message", text)
    with page.expect_response(lambda r: r.request.method == "POST" and "/api/chat" in r.url):
        page.press("#message", "Enter")
    # Idle comes only after the reply and the reload that follows it (sending ->
    # loading -> idle): a settled page, not a transient one. With a turn window full
    # the reload drops the oldest exchange, so the count may be back where it was.
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".msg-user .msg-text").last).to_have_text(text)
    assert assistants.count() in ((before + 1, before) if windowed else (before + 1,))
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


def send_and_lose_the_reply(page: Page, text: str) -> None:
    """Send ``text``; the server finishes the reply (and issues its token), but the
    response never reaches the page (a dropped connection). Returns once it settled."""
    held: list[Any] = []

    def finish_on_the_server_only(route: Any) -> None:
        response = route.fetch()
        response.body()  # read to its end: the server has sent its final event...
        held.append(response)
        route.abort("connectionreset")  # ...which never reaches the page

    page.route("**/api/chat/stream", finish_on_the_server_only)
    page.fill("#message", text)
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    assert held, "the streamed request never reached the server"
    page.unroute("**/api/chat/stream")


# ----------------------------------------------------------------------- tests


def test_send_and_receive(live_server_factory, tmp_path, page, screenshot) -> None:
    srv = start_app(live_server_factory, tmp_path)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    open_chat(page, srv)

    # Accessible composer: a labelled textarea. It is not focused on load (that would
    # skip the heading and list for screen readers, and open a phone's keyboard), but
    # typing with nothing focused goes into it.
    composer = page.get_by_label("Message", exact=True)
    expect(page.get_by_role("button", name="New chat", exact=True)).to_be_visible()
    expect(page.get_by_role("log")).to_contain_text("No messages yet")
    expect(composer).not_to_be_focused()
    page.keyboard.type("Hi")
    expect(composer).to_be_focused()
    expect(composer).to_have_value("Hi")
    expect(page.locator("#char-count")).to_have_text("2 of 8,000 characters")

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
    # Record every text the reply bubble shows while it streams in, and every change
    # to the log a screen reader would hear: changes outside aria-hidden subtrees.
    page.evaluate(
        """() => {
            window.__seen = [];
            window.__heard = [];
            const thread = document.getElementById('thread');
            const hidden = (n) => {
                const e = n.nodeType === 1 ? n : n.parentElement;
                return !!(e && e.closest('[aria-hidden="true"]'));
            };
            new MutationObserver((records) => {
                const texts = thread.querySelectorAll('.msg-assistant .msg-text');
                if (texts.length) window.__seen.push(texts[texts.length - 1].textContent);
                for (const r of records) {
                    if (hidden(r.target)) continue;
                    if (r.type === 'characterData') window.__heard.push('edit: ' + r.target.data);
                    for (const n of r.addedNodes) {
                        if (!hidden(n)) window.__heard.push(n.textContent);
                    }
                }
            }).observe(thread, {childList: true, subtree: true, characterData: true});
        }"""
    )
    page.fill("#message", "Please stream a reply word by word")
    page.press("#message", "Enter")
    thread = page.get_by_role("log")
    expect(thread).to_have_attribute("aria-busy", "true")
    streaming = page.locator(".msg-assistant.pending")
    expect(streaming.locator(".msg-text")).to_contain_text("You said")
    expect(streaming).to_have_attribute("aria-hidden", "true")  # not read out piece by piece
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
    # The log itself changed twice: the message sent, then the whole reply, once.
    heard = page.evaluate("window.__heard")
    assert heard == ["You" + "Please stream a reply word by word", "Assistant" + final["content"]]
    expect(page.locator(".msg-assistant").last).not_to_have_attribute("aria-hidden", "true")
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

    # The first one is still there, whole. Switching rebuilds the log with its live
    # region off, so a screen reader does not read the whole conversation out.
    page.evaluate(
        """() => {
            const thread = document.getElementById('thread');
            window.__liveDuringRebuild = [];
            new MutationObserver((records) => {
                if (records.some((r) => r.type === 'childList')) {
                    window.__liveDuringRebuild.push(thread.getAttribute('aria-live'));
                }
            }).observe(thread, {childList: true});
        }"""
    )
    page.locator("#conversations button", has_text="First conversation").click()
    expect(page.locator(".msg-text")).to_have_text(first_thread)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.get_by_role("log")).to_have_attribute("aria-live", "polite")
    expect(page.get_by_role("log")).to_have_attribute("aria-busy", "false")
    live = page.evaluate("window.__liveDuringRebuild")
    assert live and set(live) == {"off"}, live
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


@pytest.mark.parametrize("mode", ["client", pytest.param("server", marks=pytest.mark.redis)])
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
    # Not send(): it waits for one more reply than before, and the thread, rebuilt on
    # the fresh context, ends with as many as before (the second showed only while it
    # streamed, a moment a busy machine can miss).
    page.fill("#message", "After the tampering")
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
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
    # The tier refused the turns that should have left: only now is the token's size
    # over its soft budget worth a note.
    expect(notice).to_have_attribute("data-reasons", re.compile(r"\btier_write_failed\b"))
    expect(page.locator("#thread-note")).to_contain_text("over its soft budget")
    screenshot("degraded")

    # The chat keeps working: another message, another reply, the history intact. The
    # notice, still true, is left alone (not cleared and redrawn, so not re-announced).
    page.evaluate(
        """() => {
            window.__noticeChanges = 0;
            new MutationObserver((records) => { window.__noticeChanges += records.length; })
                .observe(document.getElementById('notice'),
                         {childList: true, subtree: true, characterData: true});
        }"""
    )
    send(page, "Still here?")
    assert page.evaluate("window.__noticeChanges") == 0
    expect(last_reply(page)).to_contain_text("Still here?")
    expect(page.locator("#error")).to_be_hidden()
    data = server_context(srv, page)
    assert user_texts(data)[-1] == "Still here?"
    assert user_texts(data)[0].startswith("Message 0:")  # old turns still shown (cached)
    screenshot()

    # A reload knows none of the responses that said so, and the context it loads comes
    # from the cache unflagged: the note went. The token itself still says it (over the
    # budget with older turns in it, which a tier that takes them would hold).
    page.reload()
    expect(page.locator(".msg-user").last).to_contain_text("Still here?")
    expect(page.locator("#thread-note")).to_contain_text("over its soft budget")


def test_failed_send_keeps_its_error_and_leaves_no_bubble(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "Before the outage")
    composer = page.get_by_label("Message", exact=True)
    error = page.locator("#error")

    srv.stop()
    text = "  Sent while the server is down"
    page.fill("#message", text)
    page.press("#message", "Enter")
    expect(error).to_contain_text("The message was not sent")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    # Settled, and the error is still the send's: no "Could not load this chat" from a
    # reload after it, no dashed "No reply." bubble, the text back in the box as typed.
    expect(error).to_contain_text("It is back in the message box")
    expect(error).not_to_contain_text("Could not load")
    expect(page.locator(".msg")).to_have_count(2)
    expect(page.locator(".msg.failed, .msg.pending")).to_have_count(0)
    expect(composer).to_have_value(text)
    expect(composer).to_be_focused()
    screenshot("failed")

    # Back up: Enter sends the same text, and the error goes.
    srv.restart()
    page.press("#message", "Enter")
    expect(page.locator(".msg-user")).to_have_count(2)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(error).to_be_empty()
    expect(error).to_be_hidden()
    assert user_texts(server_context(srv, page)) == ["Before the outage", text]
    screenshot()


def test_over_the_soft_budget_with_a_healthy_tier_is_not_flagged(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    # One message bigger than the whole budget must stay in the token: normal, not news.
    srv = start_app(live_server_factory, tmp_path, SATCHEL_MAX_TOKEN_BYTES="1200")
    open_chat(page, srv)
    send(page, "A short one first")
    send(page, f"A long one: {hex_words(150)}")
    token_bytes = int(page.locator("#token-bytes").inner_text().replace(",", ""))
    assert token_bytes > 1200, token_bytes
    expect(page.locator("#overflow-tier")).to_have_text("sqlite")
    expect(page.locator("#notice")).to_be_empty()
    expect(page.locator("#thread-note")).not_to_contain_text("budget")
    expect(page.locator("#thread-note")).to_be_hidden()
    screenshot()


def two_chats(live_server_factory, tmp_path, page, first: str, second: str):
    """The app, and two conversations in the page: ``first``, then ``second`` (open)."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, first)
    page.get_by_role("button", name="New chat", exact=True).click()
    send(page, second)
    return srv


def test_focus_and_thread_survive_another_tab_sending(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = two_chats(live_server_factory, tmp_path, page, "First chat", "Second chat")
    page.locator("#conversations button", has_text="First chat").click()
    expect(page.locator("#thread-title")).to_have_text("First chat")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#conversations li").first).to_contain_text("Second chat")

    other = page.context.new_page()
    open_chat(other, srv)
    expect(other.locator("#thread-title")).to_have_text("First chat")

    # Tab one: a keyboard user is on "First chat" in the list, whose button is about
    # to move to the top; the messages on screen are marked to see if they are redrawn.
    page.evaluate(
        "() => document.querySelectorAll('#thread .msg').forEach((m) => { m.dataset.kept = '1'; })"
    )
    first_button = page.locator("#conversations button", has_text="First chat")
    first_button.focus()
    send(other, "From tab two")

    expect(page.locator("#conversations li").first).to_contain_text("First chat")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["First chat", "From tab two"])
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(first_button).to_be_focused()
    # Only the new turns were added to the log; what it showed before stayed put.
    expect(page.locator("#thread .msg[data-kept]")).to_have_count(2)
    expect(page.locator("#thread .msg")).to_have_count(4)
    expect(page.get_by_role("log")).to_have_attribute("aria-live", "polite")
    screenshot()
    other.close()


def test_chat_deleted_in_another_tab_is_not_resurrected(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = two_chats(live_server_factory, tmp_path, page, "Keep this chat", "Delete this chat")

    other = page.context.new_page()
    open_chat(other, srv)
    expect(other.locator("#thread-title")).to_have_text("Delete this chat")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete chat", exact=True).click()
    expect(page.locator("#thread-title")).to_have_text("Keep this chat")

    # The other tab leaves the deleted chat for the most recent one, and says why.
    expect(other.locator("#thread-title")).to_have_text("Keep this chat")
    expect(other.locator(".msg-user .msg-text")).to_have_text(["Keep this chat"])
    expect(other.locator("#conversations button")).to_have_count(1)
    expect(other.locator("#conversations button[aria-current=true]")).to_contain_text(
        "Keep this chat"
    )
    expect(other.get_by_role("status").filter(has_text="deleted in another tab")).to_be_visible()
    expect(other.locator("body")).to_have_attribute("data-state", "idle")
    screenshot("other-tab", other_page=other)

    # Sending from it does not bring the deleted chat back, in either tab.
    send(other, "Still in the kept chat")
    expect(other.locator("#notice")).not_to_contain_text("deleted")
    for tab in (page, other):
        expect(tab.locator("#conversations button")).to_have_count(1)
        expect(tab.locator("#conversations")).not_to_contain_text("Delete this chat")
        expect(tab.locator(".msg-user .msg-text")).to_have_text(
            ["Keep this chat", "Still in the kept chat"]
        )
    screenshot()
    other.close()


def test_messages_are_sent_and_shown_as_typed(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    text = (
        "    indented first line\n\tthen a tab\n"
        "```python\ndef f():\n    return 1\n```\n"
        "trailing spaces   "
    )
    send(page, text)
    assert user_texts(server_context(srv, page)) == [text]  # not trimmed
    shown = page.locator(".msg-user .msg-text").last
    assert shown.evaluate("(e) => e.textContent") == text
    assert shown.evaluate("(e) => getComputedStyle(e).whiteSpace") == "pre-wrap"
    code = page.locator(".msg-user .msg-code code")
    expect(code).to_have_count(1)
    assert code.evaluate("(e) => e.textContent") == "def f():\n    return 1\n"
    assert "monospace" in code.evaluate("(e) => getComputedStyle(e).fontFamily")
    expect(page.locator("#thread-title")).to_have_text(re.compile(r"^indented first line then"))
    screenshot()


def test_input_limits_are_explained(live_server_factory, tmp_path, page, screenshot) -> None:
    srv = start_app(live_server_factory, tmp_path)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_chat(page, srv)
    composer = page.get_by_label("Message", exact=True)
    problem = page.locator("#composer-problem")
    count = page.locator("#char-count")
    described = composer.get_attribute("aria-describedby").split()
    assert "char-count" in described and "composer-problem" in described

    # Only whitespace: Enter says why nothing happens.
    page.fill("#message", "   \n  ")
    page.press("#message", "Enter")
    expect(problem).to_have_text("Nothing to send: type a message first.")
    expect(page.get_by_role("status").filter(has_text="Nothing to send")).to_have_count(1)
    expect(page.locator(".msg")).to_have_count(0)
    page.fill("#message", "")
    page.keyboard.type("a")
    expect(problem).to_be_empty()  # what it said no longer applies

    # A paste over the limit is kept whole (not cut at 8,000), and flagged.
    page.fill("#message", "")
    too_long = "0123456789" * 801  # 8,010 characters
    page.evaluate("(t) => navigator.clipboard.writeText(t)", too_long)
    composer.focus()
    page.keyboard.press("Control+V")
    expect(composer).to_have_value(too_long)
    expect(count).to_have_text("8,010 of 8,000 characters: 10 too many")
    expect(composer).to_have_attribute("aria-invalid", "true")
    expect(problem).to_contain_text("10 characters over the 8,000-character limit")
    page.press("#message", "Enter")
    expect(problem).to_have_text(
        "Not sent: the message is 10 characters over the 8,000-character limit."
    )
    expect(page.locator(".msg")).to_have_count(0)
    screenshot("over")

    for _ in range(10):
        page.keyboard.press("Backspace")
    expect(count).to_have_text("8,000 of 8,000 characters")
    expect(composer).not_to_have_attribute("aria-invalid", "true")
    expect(problem).to_be_empty()
    screenshot()


def test_phone_layout_keeps_the_composer_in_reach(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    srv = start_app(live_server_factory, tmp_path)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(srv.url_for("/"))
    # 25 earlier conversations in this browser's list.
    page.evaluate(
        """() => {
            const now = Date.now(), conversations = {};
            for (let i = 0; i < 25; i++) {
                conversations['earlier-' + i] = {
                    title: 'Earlier chat ' + i, updated: now - (i + 1) * 60000,
                };
            }
            const index = JSON.stringify({current: null, conversations});
            localStorage.setItem('satchel-chat:index', index);
        }"""
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#conversations button")).to_have_count(25)
    # The list scrolls on its own; the composer is not pushed ~2,400px down.
    assert page.locator("#conversations").bounding_box()["height"] <= 12 * 16 + 1
    composer = page.get_by_label("Message", exact=True)
    assert composer.bounding_box()["y"] < 844  # its top is on the first screen
    # Notices sit above the thread, not below the composer.
    assert (
        page.locator("#notice").bounding_box()["y"] <= page.locator("#thread").bounding_box()["y"]
    )

    for i in range(3):
        send(page, f"Phone message {i}: {hex_words(30)}")
        expect(composer).to_be_in_viewport()
    screenshot()


def test_a_reply_that_never_arrived_shows_one_fork_notice_and_no_reload_loop(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """The server finishes a streamed reply (and issues its token), but the final event
    never reaches the page. After a reload, the server reports the page's token as
    behind on every load of the chat: the page must say so once and settle, not reload
    the chat again and again (it did, hundreds of times a second, stuck in 'loading')."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "first message")
    send_and_lose_the_reply(page, "second message")

    loads: list[str | None] = []
    page.on(
        "response",
        lambda r: loads.append(r.headers.get("satchel-fork")) if "/api/context" in r.url else None,
    )
    page.reload()
    body = page.locator("body")
    expect(body).to_have_attribute("data-state", "idle")
    expect(page.locator("#notice")).to_contain_text("older version of this chat")
    assert loads and all(fork and fork.startswith("behind=") for fork in loads)
    assert len(loads) <= 2, f"{len(loads)} loads of the chat after one reload"
    screenshot("fork-notice-after-a-lost-reply")

    # The conversation goes on from what the page shows.
    send(page, "third message")
    assert len(loads) <= 4
    assert user_texts(server_context(srv, page)) == ["first message", "third message"]


def test_monotonic_chat_whose_reply_was_lost_catches_up(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """Under monotonic consistency, a reply lost after the server committed left the
    page holding a token the server refuses (409 stale_context): the chat was locked
    out for good. The server now hands its newest token back with the refusal: the
    page's reload of the chat right after the failed send gets it, shows the chat as
    the server has it, says the message was saved (so it is not sent twice), and the
    conversation goes on."""
    srv = start_app(live_server_factory, tmp_path, SATCHEL_CONSISTENCY="monotonic")
    open_chat(page, srv)
    send(page, "first message")
    send_and_lose_the_reply(page, "second message")

    expect(page.locator(".msg-user .msg-text")).to_have_text(["first message", "second message"])
    expect(page.locator("#notice")).to_contain_text("the message itself was saved")
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#error")).to_be_hidden()
    screenshot("monotonic-lost-reply")

    send(page, "third message")
    expect(page.locator("#error")).to_be_hidden()
    assert user_texts(server_context(srv, page)) == [
        "first message",
        "second message",
        "third message",
    ]


def test_monotonic_chat_whose_reply_and_reload_were_lost_catches_up_on_the_next_send(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """The reply was lost and so was the reload after it (the network was down a
    moment): the page still holds the older token when the next message goes. The
    refusal brings the newest token: the page shows the chat as the server has it,
    keeps the new message in the box with a reason that says so, and sending it again
    works."""
    srv = start_app(live_server_factory, tmp_path, SATCHEL_CONSISTENCY="monotonic")
    open_chat(page, srv)
    send(page, "first message")
    page.route("**/api/context", lambda route: route.abort("connectionreset"))
    send_and_lose_the_reply(page, "second message")
    page.unroute("**/api/context")
    expect(page.locator("#message")).to_have_value("second message")  # as far as it knows

    page.fill("#message", "third message")
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#error")).to_contain_text("did not fully reach this page")
    expect(page.locator("#error")).not_to_contain_text("start a new chat")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["first message", "second message"])
    expect(page.locator("#message")).to_have_value("third message")
    screenshot("monotonic-lost-reply-and-reload")
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#error")).to_be_hidden()
    assert user_texts(server_context(srv, page)) == [
        "first message",
        "second message",
        "third message",
    ]


def test_a_message_saved_after_all_is_taken_out_of_the_box_by_a_later_load(
    live_server_factory, tmp_path, page
) -> None:
    """The reply was lost after the server saved the message, and the load of the chat
    right after the failure failed too (the network was down). Back online, the page
    loads the chat again and shows the message saved: the box still held it, under
    "not sent", and sending it stored it twice. Any load now takes it out of the box."""
    srv = start_app(live_server_factory, tmp_path, SATCHEL_CONSISTENCY="monotonic")
    open_chat(page, srv)
    send(page, "first message")
    page.route("**/api/context", lambda route: route.abort("internetdisconnected"))
    send_and_lose_the_reply(page, "second message")
    expect(page.locator("#message")).to_have_value("second message")
    page.unroute("**/api/context")
    page.context.set_offline(True)
    page.context.set_offline(False)  # the page's 'online' handler loads the chat again
    expect(page.locator(".msg-user .msg-text")).to_have_text(["first message", "second message"])
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#notice")).to_contain_text("the message itself was saved")
    expect(page.locator("#error")).to_be_hidden()


@pytest.mark.parametrize(
    "setting", [{"SATCHEL_MODE": "memory"}, {"SATCHEL_CONSISTENCY": "monotonic"}], ids=str
)
def test_enter_on_a_message_that_may_have_been_saved_loads_the_chat_first(
    live_server_factory, tmp_path, page, setting
) -> None:
    """The reply was lost after the server saved the message, and the load right after
    the failure failed too (the store stalled, so no 'online' event ever came). The
    user pressed Enter on the text the page had put back in the box: it was sent blind
    and stored twice. Enter now loads the chat first: the message is there, so it is
    taken out of the box and not sent. (Server mode: the stored conversation took a
    second copy as readily as the first. Monotonic: the first load is refused with the
    newest token handed back, and the second, with it, shows the message.)"""
    srv = start_app(live_server_factory, tmp_path, **setting)
    open_chat(page, srv)
    send(page, "first message")
    page.route("**/api/context", lambda route: route.abort("connectionreset"))
    send_and_lose_the_reply(page, "second message")
    expect(page.locator("#message")).to_have_value("second message")
    page.unroute("**/api/context")  # the store answers again; the page was not told
    page.press("#message", "Enter")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["first message", "second message"])
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#notice")).to_contain_text("the message itself was saved")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    assert user_texts(server_context(srv, page)) == ["first message", "second message"]


@pytest.mark.parametrize(
    "setting", [{"SATCHEL_MODE": "memory"}, {"SATCHEL_CONSISTENCY": "monotonic"}], ids=str
)
def test_a_message_being_checked_is_not_sent_into_a_chat_opened_meanwhile(
    live_server_factory, tmp_path, page, setting
) -> None:
    """Enter on a message whose send may have been saved loads its chat first; the
    user gave up waiting on that load and opened a new chat (the box still held the
    text). When the load ended, the text went out into the new chat, with no Enter
    pressed there. It belongs to the chat it was typed in: nothing is sent."""
    srv = start_app(live_server_factory, tmp_path, **setting)
    open_chat(page, srv)
    send(page, "first message")
    page.route("**/api/context", lambda route: route.abort("connectionreset"))
    send_and_lose_the_reply(page, "second message")
    page.unroute("**/api/context")
    held: list[Any] = []
    page.route(  # the stalled store: the check's load does not answer yet
        "**/api/context",
        lambda route: held.append(route) if not held else route.continue_(),
    )
    with page.expect_request("**/api/context"):
        page.press("#message", "Enter")
    page.click("#new-chat")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    sent = lambda request: request.method == "POST" and "/api/chat" in request.url  # noqa: E731
    with pytest.raises(PlaywrightTimeoutError), page.expect_request(sent, timeout=3000):
        held[0].abort("connectionreset")  # the held load ends at last
    expect(page.locator(".msg-user .msg-text")).to_have_count(0)  # and no token: no chat


def test_monotonic_chat_explains_an_unchecked_reply_in_words(
    live_server_factory, tmp_path, page, redis_server
) -> None:
    """Monotonic consistency, fail_open, and the store down: the reply is served,
    flagged consistency_unchecked. The page said only "Running in a degraded mode
    (consistency_unchecked). (consistency_unchecked)": it must say what that means."""
    srv = start_app(
        live_server_factory,
        tmp_path,
        SATCHEL_CONSISTENCY="monotonic",
        SATCHEL_OVERFLOW_URL=redis_server.url,
    )
    open_chat(page, srv)
    send(page, "first message")
    redis_server.kill()
    send(page, "while the store is down")
    notice = page.locator("#notice")
    expect(notice).to_have_attribute("data-reasons", re.compile(r"\bconsistency_unchecked\b"))
    expect(notice).to_contain_text("could not check that this is the chat's newest version")
    expect(notice).not_to_contain_text("degraded mode")


def test_monotonic_chat_locked_out_says_to_start_a_new_chat(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """Without the newest token kept (SATCHEL_KEEP_NEWEST=false) a lost reply still
    locks the chat out: the page must say why and what to do, not just fail every
    send; a new chat works."""
    srv = start_app(
        live_server_factory, tmp_path, SATCHEL_CONSISTENCY="monotonic", SATCHEL_KEEP_NEWEST="0"
    )
    open_chat(page, srv)
    send(page, "first message")
    send_and_lose_the_reply(page, "second message")

    page.fill("#message", "third message")
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#error")).to_contain_text("stale_context")
    expect(page.locator("#error")).to_contain_text("start a new chat")
    expect(page.locator("#message")).to_have_value("third message")

    page.click("#new-chat")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    send(page, "a new start")
    expect(last_reply(page)).not_to_be_empty()


def test_a_full_local_storage_keeps_saved_chats_and_says_new_turns_are_volatile(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """A store already full when the page opened was given up for memory: every saved
    chat showed up empty, and turns sent meanwhile were lost on reload, unannounced."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "before full")
    page.evaluate(  # to the last byte: big chunks, then ever smaller ones
        """() => {
            let n = 0;
            for (let size = 64 * 1024; size >= 1; size = Math.floor(size / 4)) {
                const chunk = 'x'.repeat(size);
                for (;;) {
                    try { localStorage.setItem('filler:' + n++, chunk); } catch { break; }
                }
            }
        }"""
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["before full"])
    send(page, "while full")
    expect(page.locator("#notice")).to_contain_text("storage is full")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["before full", "while full"])
    screenshot("storage-full")
    # A chat started while storage is full is named by its first message all the same
    # (the page's list is kept in its memory): it stayed "Untitled chat".
    page.click("#new-chat")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    send(page, "a new chat while full")
    expect(page.locator("#thread-title")).to_have_text("a new chat while full")
    expect(page.locator("#conversations button[aria-current=true]")).to_contain_text(
        "a new chat while full"
    )
    expect(page.locator("#conversations button", has_text="before full")).to_have_count(1)


@pytest.mark.parametrize("window", ["", "4"])
def test_in_server_mode_a_reply_lost_on_its_way_is_not_sent_twice(
    live_server_factory, tmp_path, page, screenshot, window: str
) -> None:
    """Server mode saved the message, the reply's way back failed, and the page put the
    text back in the box as 'not sent': sending it again stored it twice. With the turn
    window full the history's length does not change: it must still be noticed."""
    env = {"SATCHEL_MAX_TURNS": window} if window else {}
    srv = start_app(
        live_server_factory,
        tmp_path,
        SATCHEL_MODE="server",
        SATCHEL_STORE_URL=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        SATCHEL_OVERFLOW_URL="",
        **env,
    )
    open_chat(page, srv)
    for text in ("one", "two", "three"):
        send(page, text, windowed=bool(window))
    send_and_lose_the_reply(page, "lost reply")
    expect(page.locator("#notice")).to_contain_text("the message itself was saved")
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#error")).to_be_hidden()
    assert user_texts(server_context(srv, page))[-2:] == ["three", "lost reply"]
    screenshot("server-mode-lost-reply")


def test_right_to_left_text_is_laid_out_right_to_left(live_server_factory, tmp_path, page) -> None:
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "שלום (עולם) - 2024.")
    text = page.locator(".msg-user .msg-text").first
    assert text.evaluate("e => getComputedStyle(e).direction") == "rtl"
    assert page.locator("#message").get_attribute("dir") == "auto"


def test_a_reply_that_never_comes_can_be_stopped(live_server_factory, tmp_path, page) -> None:
    """A stalled server or model left the page 'Sending…' for good, with no way out,
    and every other tab of the chat waiting on its lock."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "first")
    page.route("**/api/chat/stream", lambda route: None)  # never answered
    page.fill("#message", "into the void")
    page.press("#message", "Enter")
    stop = page.locator("#stop")
    expect(stop).to_be_visible()
    stop.click()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(stop).to_be_hidden()
    expect(page.locator("#error")).to_contain_text("you stopped it before the reply started")
    expect(page.locator("#message")).to_have_value("into the void")
    page.unroute("**/api/chat/stream")
    send(page, "after the stop")  # the conversation lock was released
    assert user_texts(server_context(srv, page)) == ["first", "after the stop"]


def test_pressing_send_from_the_keyboard_puts_the_focus_on_stop(
    live_server_factory, tmp_path, page
) -> None:
    """Send, pressed with Space after tabbing to it, is disabled while the reply
    streams, which dropped the focus to the page's body: the next Tab started over from
    the top. The focus goes to Stop, the one thing to press then, and back to the
    message box when the reply is done."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    page.route("**/api/chat/stream", lambda route: None)  # a reply that takes its time
    page.fill("#message", "hello")
    page.focus("#send")
    page.keyboard.press("Space")
    stop = page.locator("#stop")
    expect(stop).to_be_visible()
    expect(stop).to_be_focused()
    page.keyboard.press("Enter")  # Stop, from the keyboard
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#message")).to_be_focused()


def test_a_load_that_failed_offline_is_redone_when_back_online(
    live_server_factory, tmp_path, page
) -> None:
    """'Could not load this chat: Failed to fetch' stayed on a chat that loaded fine
    once the browser was back online: nothing listened for it."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "hello")
    page.click("#new-chat")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.context.set_offline(True)
    page.locator("#conversations li", has_text="hello").click()  # its load fails offline
    expect(page.locator("#error")).to_contain_text("Could not load this chat")
    page.context.set_offline(False)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(".msg-user .msg-text")).to_have_text(["hello"])


def test_a_configured_token_header_is_the_one_the_page_uses(
    live_server_factory, tmp_path, page
) -> None:
    """With SATCHEL_HEADER set, the page's client still sent and read Satchel-Context:
    the server never got the token back, and every reply was followed by an empty
    thread (the reload of the chat opened a new, empty context)."""
    srv = start_app(live_server_factory, tmp_path, SATCHEL_HEADER="X-Chat-Context")
    sent: list[str] = []
    page.on(
        "request",
        lambda r: sent.append(r.headers.get("x-chat-context", "")) if "/api/" in r.url else None,
    )
    open_chat(page, srv)
    send(page, "first message")
    send(page, "second message")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["first message", "second message"])
    token = current_record(page)["token"]
    resp = srv.get("/api/context", headers={"X-Chat-Context": token})
    assert user_texts(resp.json()) == ["first message", "second message"]
    assert token in sent  # the token went back in the configured header


def test_a_bad_time_in_the_page_index_does_not_stop_the_page(
    live_server_factory, tmp_path, page
) -> None:
    """One conversation whose `updated` is not a time (an older page version, a hand
    edit) threw a RangeError while drawing the list: the page stayed 'loading' with no
    list, on every reload. It is listed with no time instead."""
    srv = start_app(live_server_factory, tmp_path)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    open_chat(page, srv)
    send(page, "a chat worth keeping")
    page.evaluate(
        """() => {
            const index = JSON.parse(localStorage.getItem('satchel-chat:index'));
            index.conversations.imported = {title: 'from an older page', updated: 'yesterday'};
            index.conversations.huge = {title: 'far future', updated: 1e300};
            localStorage.setItem('satchel-chat:index', JSON.stringify(index));
        }"""
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#conversations button")).to_have_count(3)
    expect(page.locator("#conversations li").first).to_contain_text("a chat worth keeping")
    expect(
        page.locator("#conversations button", has_text="older page").locator("time")
    ).to_have_count(0)
    expect(page.locator(".msg-user .msg-text")).to_have_text(["a chat worth keeping"])
    assert not errors, errors


def test_a_long_title_is_cut_between_characters(live_server_factory, tmp_path, page) -> None:
    """The title (the first message, cut at 48) was cut at 47 UTF-16 units: an emoji
    across the cut left half of it, shown as U+FFFD in the header, list and tab."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "a" * 46 + "😀😀😀 and more text here")
    expect(page.locator("#thread-title")).to_have_text("a" * 46 + "😀…")
    assert page.evaluate("document.title.isWellFormed()")
    expect(page.locator("#conversations [aria-current] .conversation-title")).to_have_text(
        "a" * 46 + "😀…"
    )


def test_a_chat_that_failed_to_load_keeps_its_title(live_server_factory, tmp_path, page) -> None:
    """A load that fails (offline, a 5xx) left the header and the tab at 'Untitled
    chat' while the list showed the chat's title: the title is set before loading."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "Trip to Lisbon")
    page.route(
        "**/api/context",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error": {"code": "tier_unavailable", "message": "store down"}}',
        ),
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#error")).to_contain_text("Could not load this chat")
    expect(page.locator("#thread-title")).to_have_text("Trip to Lisbon")
    expect(page).to_have_title("Trip to Lisbon · Satchel chat")


def test_a_failed_send_keeps_the_draft_typed_meanwhile_and_its_own_text(
    live_server_factory, tmp_path, page
) -> None:
    """The next message was typed while the reply streamed, then the send was stopped:
    the page said the failed message 'is back in the message box', but the box held
    only the new draft, and the failed message's text was gone. Both are kept."""
    srv = start_app(live_server_factory, tmp_path, SATCHEL_MODEL_DELAY="0.05")
    open_chat(page, srv)
    failed = "A long question I spent five minutes writing"
    page.fill("#message", failed)
    page.press("#message", "Enter")
    expect(page.locator(".msg.pending .msg-text")).to_contain_text("You said")
    page.keyboard.type("and a follow-up")  # the box keeps focus while the reply streams
    page.click("#stop")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#message")).to_have_value(f"{failed}\n\nand a follow-up")
    expect(page.locator("#error")).to_contain_text("you stopped the reply before it finished")
    expect(page.locator("#error")).to_contain_text("above what you typed")
    expect(page.locator(".msg")).to_have_count(0)


def _hold(page: Page, pattern: str, method: str | None = None) -> list[Any]:
    """Hold matching requests until the test lets each one go (``.continue_()``,
    ``.abort()``, ``.fulfill()``)."""
    held: list[Any] = []

    def handler(route: Any) -> None:
        if method is None or route.request.method == method:
            held.append(route)
        else:
            route.continue_()

    page.route(pattern, handler)
    return held


def _wait_held(page: Page, held: list[Any]) -> None:
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # lets Playwright run the route handler
    assert held, "the request never reached the network"


def test_a_send_that_fails_after_switching_chats_stays_with_its_chat(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """A send failed after the user had opened another conversation: its text went
    into that other chat's box, under 'It is back in the message box', and Enter sent
    it to the wrong chat. It waits for its own chat, and comes back when it is open."""
    srv = two_chats(live_server_factory, tmp_path, page, "Chat about cats", "Chat about taxes")
    held = _hold(page, "**/api/chat/stream")  # aborted below
    secret = "my tax id is 123-45-6789"
    page.fill("#message", secret)
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "sending")
    page.locator("#conversations button", has_text="Chat about cats").click()
    expect(page.locator("#thread-title")).to_have_text("Chat about cats")
    # Shown while the other chat's send is still going (it stayed empty until then).
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Chat about cats"])
    _wait_held(page, held)
    held[0].abort("connectionreset")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.unroute("**/api/chat/stream")

    # Not in this chat's box, and this chat shows no error of the other's; a note says
    # where the message is.
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#notice")).to_contain_text("Chat about taxes")
    expect(page.locator("#notice")).to_contain_text("was not sent")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Chat about cats"])
    screenshot("other-chat")

    # Its own chat has it back, with the reason.
    page.locator("#conversations button", has_text="Chat about taxes").click()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#message")).to_have_value(secret)
    expect(page.locator("#error")).to_contain_text("The message was not sent")
    expect(page.locator("#error")).to_contain_text("It is back in the message box")
    expect(page.locator("#notice")).not_to_contain_text("was not sent")
    page.press("#message", "Enter")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Chat about taxes", secret])
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    assert user_texts(server_context(srv, page)) == ["Chat about taxes", secret]
    page.locator("#conversations button", has_text="Chat about cats").click()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#message")).to_have_value("")
    assert user_texts(server_context(srv, page)) == ["Chat about cats"]
    screenshot()


def test_in_server_mode_delete_chat_erases_the_stored_conversation(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """In server mode the whole conversation is in the server's store: the page said
    the server kept no chat history, and Delete chat left it there until its TTL."""
    srv = start_app(
        live_server_factory,
        tmp_path,
        SATCHEL_MODE="server",
        SATCHEL_STORE_URL=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        SATCHEL_OVERFLOW_URL="",
    )
    open_chat(page, srv)
    expect(page.locator(".sidebar")).to_contain_text("kept on the server")
    expect(page.locator(".sidebar")).not_to_contain_text("keeps no chat history")
    send(page, "my secret plan")
    page.get_by_role("button", name="New chat", exact=True).click()
    send(page, "my other plan")
    tokens = {}
    for text in ("my other plan", "my secret plan"):
        page.locator("#conversations button", has_text=text).click()
        expect(page.locator("body")).to_have_attribute("data-state", "idle")
        tokens[text] = current_record(page)["token"]
        page.once("dialog", lambda dialog: dialog.accept())
        if text == "my secret plan":  # the server cannot be reached for this one
            page.route("**/api/context", lambda route: route.abort("connectionreset"))
        page.get_by_role("button", name="Delete chat", exact=True).click()
        expect(page.locator("#conversations")).not_to_contain_text(text)
        expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.unroute("**/api/context")

    erased = srv.get("/api/context", headers={"Satchel-Context": tokens["my other plan"]})
    assert erased.status == 410 and erased.json()["error"]["code"] == "token_erased"
    # Not erased: the page says so, and the conversation is still on the server.
    expect(page.locator("#notice")).to_contain_text("could not erase its copy")
    kept = srv.get("/api/context", headers={"Satchel-Context": tokens["my secret plan"]})
    assert user_texts(kept.json()) == ["my secret plan"]
    screenshot()


def test_a_send_that_fails_in_a_chat_reopened_meanwhile_comes_back_in_it(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """A -> B -> A while A's reply streamed, then A's send failed: the page compared
    client objects, reopening A had made a new one, so the text was kept for "another
    chat" while A was open, and clicking A did not bring it back."""
    srv = two_chats(live_server_factory, tmp_path, page, "Chat about cats", "Chat about taxes")
    held = _hold(page, "**/api/chat/stream")
    page.fill("#message", "second taxes question")
    page.press("#message", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "sending")
    page.locator("#conversations button", has_text="Chat about cats").click()
    expect(page.locator("#thread-title")).to_have_text("Chat about cats")
    page.locator("#conversations button", has_text="Chat about taxes").click()
    expect(page.locator("#thread-title")).to_have_text("Chat about taxes")
    _wait_held(page, held)
    held[0].abort("connectionreset")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.unroute("**/api/chat/stream")
    expect(page.locator("#message")).to_have_value("second taxes question")
    expect(page.locator("#error")).to_contain_text("The message was not sent")
    expect(page.locator("#notice")).not_to_contain_text("was not sent")
    assert user_texts(server_context(srv, page)) == ["Chat about taxes"]
    screenshot()


def test_opening_another_chat_while_delete_waits_on_the_server_deletes_the_right_one(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """Delete chat waited on DELETE /api/context with the page unlocked; opening
    another chat meanwhile made the page reset and close *that* chat (its history
    gone), while the chat meant for deletion stayed."""
    srv = two_chats(live_server_factory, tmp_path, page, "Chat about cats", "Chat about taxes")
    held = _hold(page, "**/api/context", method="DELETE")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete chat", exact=True).click()
    _wait_held(page, held)
    expect(page.get_by_role("button", name="Deleting…")).to_be_disabled()
    # Clicks while the server is asked do nothing.
    page.locator("#conversations button", has_text="Chat about cats").click()
    expect(page.locator("#thread-title")).to_have_text("Chat about taxes")
    held[0].continue_()
    expect(page.locator("#conversations")).not_to_contain_text("Chat about taxes")
    expect(page.locator("#thread-title")).to_have_text("Chat about cats")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.unroute("**/api/context")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["Chat about cats"])
    assert user_texts(server_context(srv, page)) == ["Chat about cats"]
    screenshot()


def test_delete_chat_keeps_the_chat_when_the_server_cannot_erase_it_right_now(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """After a Stop the reply still holds the conversation (409 context_busy), or the
    store is down (503): the page forgot the token anyway, so the server's copy could
    never be erased from it. It keeps the chat and says to try again."""
    srv = two_chats(live_server_factory, tmp_path, page, "Chat about cats", "Chat about taxes")
    page.route(
        "**/api/context",
        lambda route: (
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                json={"error": {"code": "tier_unavailable", "message": "the store is down"}},
            )
            if route.request.method == "DELETE"
            else route.continue_()
        ),
    )
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete chat", exact=True).click()
    expect(page.locator("#error")).to_contain_text("was not deleted")
    expect(page.locator("#conversations")).to_contain_text("Chat about taxes")
    delete = page.get_by_role("button", name="Delete chat", exact=True)
    expect(delete).to_be_enabled()
    # Disabled while the server was asked, the button had lost the focus for good: a
    # keyboard user was sent to the top of the page.
    expect(delete).to_be_focused()
    page.unroute("**/api/context")
    assert user_texts(server_context(srv, page)) == ["Chat about taxes"]
    screenshot()


def test_chats_left_empty_do_not_pile_up_in_the_list(live_server_factory, tmp_path, page) -> None:
    """New chat, then back to the real one, three times: three empty "Untitled chat"
    entries stayed in the list, above the real one, after a reload too."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "The only real chat")
    for _ in range(3):
        page.get_by_role("button", name="New chat", exact=True).click()
        expect(page.locator("#thread-title")).to_have_text("Untitled chat")
        page.locator("#conversations button", has_text="The only real chat").click()
        expect(page.locator("#thread-title")).to_have_text("The only real chat")
    expect(page.locator("#conversations li")).to_have_count(1)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#conversations li")).to_have_count(1)
    # An empty chat still open stays (New chat reuses it), and one sent in is kept.
    page.get_by_role("button", name="New chat", exact=True).click()
    expect(page.locator("#conversations li")).to_have_count(2)
    send(page, "A second real chat")
    page.locator("#conversations button", has_text="The only real chat").click()
    expect(page.locator("#conversations li")).to_have_count(2)


def test_an_empty_chat_left_in_one_tab_stays_open_in_another(
    live_server_factory, tmp_path, page
) -> None:
    """Tab two opens the empty chat tab one just made; tab one goes back to its real
    chat. Dropping the empty one from the shared list made tab two think it was deleted
    elsewhere: it jumped to the real chat, and the message typed for the new one went
    there."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "The real chat")
    page.get_by_role("button", name="New chat", exact=True).click()
    expect(page.locator("#thread-title")).to_have_text("Untitled chat")
    other = page.context.new_page()
    open_chat(other, srv)
    expect(other.locator("#thread-title")).to_have_text("Untitled chat")
    page.locator("#conversations button", has_text="The real chat").click()
    expect(page.locator("#thread-title")).to_have_text("The real chat")
    expect(page.locator("#conversations li")).to_have_count(1)
    send(other, "A message for the new chat")
    expect(other.locator("#thread-title")).to_have_text("A message for the new chat")
    expect(other.locator("#notice")).to_be_hidden()
    expect(page.locator("#conversations li")).to_have_count(2)
    page.locator("#conversations button", has_text="The real chat").click()
    expect(page.locator(".msg-user")).to_have_count(1)  # nothing went into it


def test_a_reload_keeps_the_tabs_own_chat_and_a_new_tab_opens_the_one_sent_in_last(
    live_server_factory, tmp_path, page
) -> None:
    """A reload opened the chat some tab had *opened* last, not this tab's: another
    tab's New chat (left empty) or one message there made this tab's reload land on
    that chat. Sending did not make a chat the most recent one for a new tab either."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "Conversation X one")
    other = page.context.new_page()
    open_chat(other, srv)
    expect(other.locator("#thread-title")).to_have_text("Conversation X one")
    other.get_by_role("button", name="New chat", exact=True).click()
    send(other, "Conversation Y one")
    other.get_by_role("button", name="New chat", exact=True).click()  # left empty
    expect(other.locator("#thread-title")).to_have_text("Untitled chat")
    send(page, "Conversation X two")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#thread-title")).to_have_text("Conversation X one")
    expect(page.locator(".msg-user .msg-text")).to_have_text(
        ["Conversation X one", "Conversation X two"]
    )
    other.reload()  # the other tab keeps its own (empty) chat
    expect(other.locator("body")).to_have_attribute("data-state", "idle")
    expect(other.locator("#thread-title")).to_have_text("Untitled chat")
    other.locator("#conversations button", has_text="Conversation Y one").click()
    expect(other.locator("#thread-title")).to_have_text("Conversation Y one")
    send(page, "Conversation X three")  # sent in last: what a new tab opens
    third = page.context.new_page()
    open_chat(third, srv)
    expect(third.locator("#thread-title")).to_have_text("Conversation X one")
    expect(third.locator(".msg-user")).to_have_count(3)
    # A reload is not a choice: after a send in Y, reloading the tab that shows X
    # leaves Y the most recent (it made X so, and a new tab opened X).
    send(other, "Conversation Y two")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#thread-title")).to_have_text("Conversation X one")
    fourth = page.context.new_page()
    open_chat(fourth, srv)
    expect(fourth.locator("#thread-title")).to_have_text("Conversation Y one")


def test_a_column_taller_than_the_window_scrolls_on_its_own(
    live_server_factory, tmp_path, page, screenshot
) -> None:
    """Notices and an open summary can need more than the window: the column spilled
    out of its 100vh, the whole page scrolled, and the sidebar's panel ended at the
    fold. The column scrolls inside itself instead."""
    page.set_viewport_size({"width": 1280, "height": 600})
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "hello")
    page.get_by_text("Running summary").click()
    page.evaluate("document.querySelector('#summary').textContent = 'A long summary. '.repeat(600)")
    sizes = page.evaluate(
        """() => ({
            page: document.scrollingElement.scrollHeight,
            window: window.innerHeight,
            main: document.querySelector('.main').scrollHeight,
            mainBox: document.querySelector('.main').clientHeight,
            sidebar: document.querySelector('.sidebar').getBoundingClientRect().height,
        })"""
    )
    assert sizes["page"] <= sizes["window"], sizes  # the page itself does not scroll
    assert sizes["main"] > sizes["mainBox"], sizes  # the column does
    assert sizes["sidebar"] >= sizes["window"], sizes
    screenshot()


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        ("segment_missing", "only the running summary has them"),
        ("tier_unavailable", "could not be loaded from the overflow store right now"),
    ],
)
def test_the_note_on_unloaded_turns_agrees_with_the_notice(
    live_server_factory, tmp_path, page, reason: str, said: str
) -> None:
    """Under "Some older turns have expired from the overflow store" the note said the
    turns "are in the overflow store but could not be loaded"."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "hello")

    def with_unloaded_turns(route: Any) -> None:
        data = route.fetch().json()
        data.update(overflowed_turns=4, rehydrated_turns=0, degraded=[reason])
        route.fulfill(json=data)

    page.route("**/api/context", with_unloaded_turns)
    page.reload()
    note = page.locator("#thread-note")
    expect(note).to_contain_text("4 earlier turns could not be loaded")
    expect(note).to_contain_text(said)
    expect(note).not_to_contain_text("are in the overflow store")


def test_turns_lost_while_the_tier_was_down_are_said_on_every_view(
    live_server_factory, tmp_path, page
) -> None:
    """Only the reply that lost turns said data_loss; every later view, a reload or
    another tab, called them "earlier turns folded into the running summary", as the
    window's routine drops. /api/context now says them apart (lost_turns)."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "hello")

    def with_losses(route: Any) -> None:
        data = route.fetch().json()
        data.update(lost_turns=5, summarized_only_turns=2)
        route.fulfill(json=data)

    page.route("**/api/context", with_losses)
    page.reload()
    note = page.locator("#thread-note")
    expect(note).to_contain_text("5 turns were lost while the overflow store could not take them")
    expect(note).to_contain_text("2 earlier turns were folded into the running summary")


def test_a_bad_title_in_the_page_index_is_untitled_everywhere(
    live_server_factory, tmp_path, page
) -> None:
    """The list showed an entry with a title that is no string (or an empty one) as
    "Untitled chat", but the heading showed the raw value and a first message never
    named the chat, for good."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "a chat worth keeping")
    page.evaluate(
        """() => {
            const index = JSON.parse(localStorage.getItem('satchel-chat:index'));
            index.conversations.numbered = {title: 12345, updated: Date.now() - 10};
            index.conversations.blank = {title: '', updated: Date.now() - 20};
            localStorage.setItem('satchel-chat:index', JSON.stringify(index));
        }"""
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.locator("#conversations button").nth(0).click()  # the numbered one (newest)
    expect(page.locator("#thread-title")).to_have_text("Untitled chat")
    page.locator("#conversations button").nth(1).click()  # the blank one
    expect(page.locator("#thread-title")).to_have_text("Untitled chat")
    send(page, "a blank chat named at last")
    expect(page.locator("#thread-title")).to_have_text("a blank chat named at last")


def test_a_browser_that_blocks_site_data_still_chats_for_the_pages_life(
    browser, chromium_path, live_server_factory, tmp_path
) -> None:
    """Cookies and site data blocked: localStorage throws and Web Locks are denied
    (SecurityError). The page said chats last until it is closed, and then every send
    failed with "The request was denied. (18)" before anything was sent."""
    from tests.support.browser import CHROMIUM_ARGS

    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(
        json.dumps({"profile": {"default_content_setting_values": {"cookies": 2}}})
    )
    srv = start_app(live_server_factory, tmp_path)
    context = browser.browser_type.launch_persistent_context(
        str(profile), executable_path=chromium_path, args=list(CHROMIUM_ARGS), headless=True
    )
    try:
        context.set_default_timeout(10_000)
        page = context.new_page()
        open_chat(page, srv)
        denied = page.evaluate(
            "() => navigator.locks.request('probe', () => 1).then(() => 'granted', e => e.name)"
        )
        assert denied == "SecurityError"  # what this test is about: a real denial
        expect(page.locator("#notice")).to_contain_text("until the page is closed")
        send(page, "hello without storage")
        send(page, "and again")
        expect(page.locator(".msg-user .msg-text")).to_have_text(
            ["hello without storage", "and again"]
        )
        expect(last_reply(page)).to_contain_text("You said: “and again”")
        expect(page.locator("#error")).to_have_text("")
    finally:
        context.close()


def test_a_sign_in_page_in_place_of_the_chat_is_explained(
    live_server_factory, tmp_path, page
) -> None:
    """A proxy's or captive portal's page answered 200 in place of GET /api/context:
    the page said "Unexpected token '<', "<html>..." is not valid JSON"."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "hello")
    page.route(
        "**/api/context",
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<html><body>Sign in</body></html>"
        ),
    )
    page.reload()
    error = page.locator("#error")
    expect(error).to_contain_text("Could not load this chat")
    expect(error).to_contain_text("not the chat (text/html)")
    expect(error).not_to_contain_text("JSON")


def test_a_focused_conversation_shows_its_whole_outline_in_the_narrow_layout(
    live_server_factory, tmp_path, page
) -> None:
    """In the one-column layout the list scrolls on its own, and clipped the outline
    drawn outside each button to a thin line: keyboard users switching chats on a phone
    (or at 200% zoom) saw almost no focus. It is drawn inside the button now."""
    page.set_viewport_size({"width": 320, "height": 640})
    two_chats(live_server_factory, tmp_path, page, "first chat", "second chat")
    page.focus("#new-chat")
    for _ in range(2):  # the list's two buttons, from the keyboard (:focus-visible)
        page.keyboard.press("Tab")
        box = page.evaluate(
            """() => {
                const el = document.activeElement, style = getComputedStyle(el);
                const grow = parseFloat(style.outlineWidth) + parseFloat(style.outlineOffset);
                const r = el.getBoundingClientRect();
                const list = document.getElementById('conversations').getBoundingClientRect();
                return {
                    inList: el.closest('#conversations') !== null,
                    outline: style.outlineStyle,
                    fits: r.left - grow >= list.left && r.right + grow <= list.right
                        && r.top - grow >= list.top && r.bottom + grow <= list.bottom,
                };
            }"""
        )
        assert box == {"inList": True, "outline": "solid", "fits": True}


def test_the_open_chat_is_marked_without_colour_in_forced_colours(
    live_server_factory, tmp_path, page
) -> None:
    """In forced-colours (high-contrast) mode the browser replaces the background and
    border colours that alone marked the open chat: every entry looked the same."""
    two_chats(live_server_factory, tmp_path, page, "first chat", "second chat")
    page.emulate_media(forced_colors="active")
    marks = page.evaluate(
        """() => [...document.querySelectorAll('#conversations .conversation')].map((b) => {
            const title = getComputedStyle(b.querySelector('.conversation-title'));
            const box = getComputedStyle(b);
            return [b.getAttribute('aria-current'), box.borderLeftWidth, title.fontWeight];
        })"""
    )
    current = [m[1:] for m in marks if m[0] == "true"]
    others = [m[1:] for m in marks if m[0] != "true"]
    assert len(current) == 1 and others
    assert all(current[0][0] != o[0] and current[0][1] != o[1] for o in others), marks


def test_enter_while_a_reply_is_written_says_why_nothing_was_sent(
    live_server_factory, tmp_path, page
) -> None:
    """The hint says Enter sends; pressed while a reply streams it did nothing, and a
    screen reader user heard nothing. It says why, keeps the text, and the note goes
    when the reply is done."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    held = _hold(page, "**/api/chat/stream")
    page.fill("#message", "first")
    page.press("#message", "Enter")
    _wait_held(page, held)
    page.fill("#message", "typed during the reply")
    page.press("#message", "Enter")
    problem = page.locator("#composer-problem")
    expect(problem).to_contain_text("A reply is still being written")
    expect(page.locator("#message")).to_have_value("typed during the reply")
    held[0].continue_()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(problem).to_have_text("")
    expect(page.locator("#message")).to_have_value("typed during the reply")


def test_right_to_left_chats_and_emoji_titles(live_server_factory, tmp_path, page) -> None:
    """A Hebrew chat's title read left to right (its ellipsis cut off the title's start),
    code in an Arabic message was laid out right to left (```python showed as
    python```), and a title cut at 48 code points split an emoji family."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "מה ההבדל בין רשימה לטאפל? " * 3 + "\n```python\nprint('سلام')\n```")
    direction = "el => getComputedStyle(el).direction"
    assert page.locator("#thread-title").evaluate(direction) == "rtl"
    assert page.locator(".conversation-title").first.evaluate(direction) == "rtl"
    assert page.locator(".msg-user .msg-code").evaluate(direction) == "ltr"
    page.click("#new-chat")
    send(page, "a" * 44 + "👨\u200d👩\u200d👧\u200d👦 family trip")
    expect(page.locator("#thread-title")).to_have_text("a" * 44 + "👨\u200d👩\u200d👧\u200d👦 f…")
    # A Hebrew line in an English message reads right to left (each line its own
    # direction), and a short Hebrew title sits at its start, the list's right edge:
    # both sat on the left, under the message's and the button's left alignment.
    page.click("#new-chat")
    send(page, "שלום")  # a short title: "שלום"
    send(page, "Translate:\nשלום לכולם, מה שלומכם?")  # noqa: RUF001
    hebrew_line = page.locator(".msg-user .msg-text").last
    assert hebrew_line.evaluate("el => getComputedStyle(el).unicodeBidi") == "plaintext"
    title = page.locator(".conversation-title").filter(has_text=re.compile("^שלום$")).first
    gaps = title.evaluate(
        "el => { const r = document.createRange(); r.selectNodeContents(el);"
        " const text = r.getBoundingClientRect();"
        " const box = el.closest('button').getBoundingClientRect();"
        " return [text.left - box.left, box.right - text.right]; }"
    )
    assert gaps[1] < gaps[0], f"the short Hebrew title sits left (gaps left, right: {gaps})"


def test_a_store_that_stops_answering_keeps_the_saved_chat(
    live_server_factory, tmp_path, page
) -> None:
    """localStorage that throws on every read and write (a corrupted profile, access
    revoked) while the page is open: the chat goes on in memory, says so, and the saved
    conversation is not replaced (it is there again after a reload)."""
    srv = start_app(live_server_factory, tmp_path)
    open_chat(page, srv)
    send(page, "saved before")
    page.evaluate(
        """() => {
            window.__storage = [Storage.prototype.getItem, Storage.prototype.setItem];
            const broken = () => { throw new DOMException('corrupted', 'UnknownError'); };
            Storage.prototype.getItem = broken;
            Storage.prototype.setItem = broken;
        }"""
    )
    # The page could not read the saved token: the reply comes in a fresh context of
    # its own (the note says why and that the saved chat is kept for a reload).
    for text in ("while unreadable", "and again"):
        page.fill("#message", text)
        with page.expect_response(lambda r: "/api/chat" in r.url and r.ok):
            page.press("#message", "Enter")
        expect(page.locator("body")).to_have_attribute("data-state", "idle")
        expect(page.locator("#notice")).to_contain_text("storage could not be read")
        if text == "while unreadable":  # the store answers again: still not written over
            page.evaluate(
                "() => { [Storage.prototype.getItem, Storage.prototype.setItem]"
                " = window.__storage; }"
            )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".msg-user .msg-text")).to_have_text(["saved before"])
