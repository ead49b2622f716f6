"""The chat example (examples/chat) at the HTTP level: Flask test client, a fake
OpenAI-compatible endpoint on loopback, and one LiveServer over real HTTP."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from examples.chat import app as chat_app
from examples.chat.llm_summarizer import LLMSummarizer
from examples.chat.models import (
    ChatModel,
    ModelError,
    OfflineModel,
    OpenAICompatibleModel,
    build_messages,
    iter_sse_data,
    model_from_env,
)
from satchel import Context, Keyring, Satchel, Turn

APP = "examples.chat.app:create_app"


# --------------------------------------------------------------------- helpers


def make_app(tmp_path: Path, **config: Any) -> Any:
    base = {
        "TESTING": True,
        "SATCHEL_KEYS": Keyring.generate().to_string(),
        "SATCHEL_OVERFLOW_URL": f"sqlite:///{tmp_path / 'overflow.sqlite3'}",
        "CHAT_MODEL": OfflineModel(),
    }
    base.update(config)
    return chat_app.create_app(base)


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if not data:
            continue  # comments only (a keep-alive): no event, as every SSE reader does
        events.append((name, json.loads("\n".join(data))))
    return events


def words(n: int) -> str:
    """Distinct text, so tokens do not compress away and the byte budget is reached."""
    return " ".join(secrets.token_hex(4) for _ in range(n))


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app reads SATCHEL_* from the environment: start every test from none."""
    for key in (*chat_app.ENV_KEYS, "SATCHEL_LLM_SUMMARIZER"):
        monkeypatch.delenv(key, raising=False)
    for key in ("BASE_URL", "API_KEY", "NAME", "DELAY", "TIMEOUT", "TEMPERATURE"):
        monkeypatch.delenv(f"SATCHEL_MODEL_{key}", raising=False)


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return make_app(tmp_path)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def chat(client: Any, message: str, token: str | None = None) -> Any:
    headers = {"Satchel-Context": token} if token else {}
    return client.post("/api/chat", json={"message": message}, headers=headers)


# ------------------------------------------------------------------- the page


def test_page_is_self_contained_and_accessible(client: Any) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert '<label for="message">' in html
    assert 'role="log"' in html and 'role="status"' in html
    assert 'id="new-chat"' in html
    # Nothing from another origin: no CDN, no web font.
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert 'src="/assets/chat.js"' in html
    assert 'data-client-url="/static/satchel/satchel.js"' in html
    assert 'data-header-name="Satchel-Context"' in html  # SATCHEL_HEADER, for the client


def test_client_module_and_assets_are_served(client: Any) -> None:
    js = client.get("/static/satchel/satchel.js")
    assert js.status_code == 200
    assert js.mimetype == "text/javascript"
    assert "export function createClient" in js.get_data(as_text=True)
    assert client.get("/static/satchel/satchel.d.ts").status_code in (200, 404)
    for path in ("/assets/chat.js", "/assets/chat.css"):
        assert client.get(path).status_code == 200, path
    assert client.get("/static/satchel/../../pyproject.toml").status_code == 404
    assert client.get("/static/satchel/package.json").status_code == 404
    assert client.get("/static/satchel/nope.js").status_code == 404


# ------------------------------------------------------------------- the API


def test_chat_round_trip(client: Any) -> None:
    first = chat(client, "Hello, Satchel")
    assert first.status_code == 200
    body = first.get_json()
    assert "Hello, Satchel" in body["reply"]
    assert body["turns"] == 2 and body["degraded"] == []
    token = first.headers["Satchel-Context"]
    assert first.headers["Satchel-Seq"] == "1"

    second = chat(client, "And a second message", token)
    assert second.status_code == 200
    assert second.headers["Satchel-Seq"] == "2"
    ctx = client.get("/api/context", headers={"Satchel-Context": second.headers["Satchel-Context"]})
    contents = [(t["role"], t["content"]) for t in ctx.get_json()["all_turns"]]
    assert [r for r, _ in contents] == ["user", "assistant", "user", "assistant"]
    assert contents[0][1] == "Hello, Satchel"
    assert contents[2][1] == "And a second message"


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, 'send JSON {"message": "..."}'),
        ({"message": 3}, 'send JSON {"message": "..."}'),
        ({"message": "   "}, "message is empty"),
        ({"message": "x" * 8001}, "longer than 8000"),
    ],
)
def test_bad_messages_are_json_400(client: Any, body: dict, message: str) -> None:
    """Each is refused before any context work, by both endpoints."""
    for path in ("/api/chat", "/api/chat/stream"):
        resp = client.post(path, json=body)
        assert resp.status_code == 400, path
        error = resp.get_json()["error"]
        assert error["code"] == "invalid_request"
        assert message in error["message"]
        assert "Satchel-Context" not in resp.headers


def test_a_huge_body_is_refused_before_it_is_read(client: Any) -> None:
    from examples.chat.app import MAX_BODY_BYTES

    huge = json.dumps({"message": "x" * (MAX_BODY_BYTES + 1)})
    for path in ("/api/chat", "/api/chat/stream"):
        resp = client.post(path, data=huge, content_type="application/json")
        assert resp.status_code == 413, path
        assert resp.get_json()["error"]["code"] == "request_entity_too_large"


def test_unpaired_surrogate_in_message_is_invalid_text(client: Any) -> None:
    for path in ("/api/chat", "/api/chat/stream"):
        resp = client.post(path, data='{"message": "cut \\udc00"}', content_type="application/json")
        assert resp.status_code == 400, path
        assert resp.get_json()["error"]["code"] == "invalid_text"
        assert "Satchel-Context" not in resp.headers


def test_stream_sse_format(app: Any, client: Any) -> None:
    resp = client.post("/api/chat/stream", json={"message": "Stream me a reply"})
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Satchel-Context" not in resp.headers  # the token travels in the stream
    events = parse_sse(resp.get_data(as_text=True))
    names = [name for name, _ in events]
    assert names[-2:] == ["satchel", "done"]
    assert set(names[:-2]) == {"delta"} and len(names) > 5  # word by word
    text = "".join(data["text"] for name, data in events if name == "delta")
    assert text == OfflineModel().reply([{"role": "user", "content": "Stream me a reply"}])
    final = events[-2][1]
    assert final["seq"] == 1 and final["degraded"] == [] and final["session"]

    ctx = Satchel.state(app).codec.open(final["token"])
    assert [(t.role, t.content) for t in ctx.turns] == [
        ("user", "Stream me a reply"),
        ("assistant", text),
    ]

    # The streamed token carries the conversation on.
    nxt = client.post(
        "/api/chat/stream",
        json={"message": "And again"},
        headers={"Satchel-Context": final["token"]},
    )
    final2 = parse_sse(nxt.get_data(as_text=True))[-2][1]
    assert final2["seq"] == 2
    assert len(Satchel.state(app).codec.open(final2["token"]).turns) == 4


def test_context_endpoint(client: Any) -> None:
    empty = client.get("/api/context")
    assert empty.status_code == 200
    data = empty.get_json()
    assert data["all_turns"] == [] and data["token_bytes"] == 0
    assert data["overflow_tier"] == "sqlite" and data["model"] == "offline"
    assert "Satchel-Context" not in empty.headers  # reading issues no token

    token = chat(client, "remember this").headers["Satchel-Context"]
    resp = client.get("/api/context", headers={"Satchel-Context": token})
    data = resp.get_json()
    assert "Satchel-Context" not in resp.headers
    assert data["token_bytes"] == len(token)
    assert data["held_turns"] == 2 and data["overflowed_turns"] == 0
    assert data["summary"] == "" and data["degraded"] == []
    assert data["all_turns"][0]["content"] == "remember this"
    assert data["max_token_bytes"] == 3800


def test_context_rehydrates_overflowed_turns(tmp_path: Path) -> None:
    app = make_app(tmp_path, SATCHEL_MAX_TOKEN_BYTES=1200)
    client = app.test_client()
    token = None
    sent = []
    for i in range(10):
        sent.append(f"message {i}: {words(25)}")
        resp = chat(client, sent[-1], token)
        assert resp.status_code == 200
        token = resp.headers["Satchel-Context"]
    data = client.get("/api/context", headers={"Satchel-Context": token}).get_json()
    assert data["overflowed_turns"] > 0
    assert data["held_turns"] < len(data["all_turns"])
    assert data["rehydrated_turns"] == data["overflowed_turns"]
    assert data["summary"].startswith("(")  # the extractive summary's header
    user_turns = [t["content"] for t in data["all_turns"] if t["role"] == "user"]
    assert user_turns == sent  # nothing lost, in order
    assert data["token_bytes"] == len(token) <= 1200 * 1.5


def test_context_says_turns_lost_apart_from_turns_summarized(tmp_path: Path) -> None:
    """Turns dropped past the hard cap while the tier refused them were counted with the
    window's routine drops: after the reply that flagged data_loss, the page called them
    "earlier turns folded into the running summary" on every view."""
    from tests.support import free_port

    app = make_app(
        tmp_path,
        SATCHEL_OVERFLOW_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
        SATCHEL_MAX_TOKEN_BYTES=1200,
        SATCHEL_HARD_MAX_TOKEN_BYTES=2000,
    )
    client, token, flagged = app.test_client(), None, set()
    for i in range(10):
        resp = chat(client, f"message {i}: {words(25)}", token)
        assert resp.status_code == 200
        token = resp.headers["Satchel-Context"]
        flagged |= set(resp.get_json()["degraded"])
    assert "data_loss" in flagged
    data = client.get("/api/context", headers={"Satchel-Context": token}).get_json()
    assert data["lost_turns"] == data["lifecycle"]["lost"] > 0
    assert data["summarized_only_turns"] == 0  # no window drop: every removed turn was lost


def test_bad_token_is_a_json_error(client: Any) -> None:
    resp = client.get("/api/context", headers={"Satchel-Context": "s1.not-a-token"})
    assert 400 <= resp.status_code < 500
    assert resp.get_json()["error"]["code"].startswith("token_")
    resp = client.post(
        "/api/chat/stream", json={"message": "hi"}, headers={"Satchel-Context": "garbage"}
    )
    assert resp.get_json()["error"]["code"].startswith("token_")


def tampered(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


@pytest.mark.parametrize("mode", ["client", "server"])
def test_context_of_a_reset_reports_no_token_bytes(tmp_path: Path, mode: str) -> None:
    """A token the server refused and replaced with a fresh context (SATCHEL_ON_BAD_TOKEN
    =fresh; in server mode, a session the store no longer has) is not the chat's token:
    its size was reported as the token's, for a chat that now holds none."""
    app = make_app(tmp_path, SATCHEL_ON_BAD_TOKEN="fresh", SATCHEL_MODE=mode)
    client = app.test_client()
    token = chat(client, "hi").headers["Satchel-Context"]
    if mode == "server":  # the same keys, an empty store: the session is not found
        (tmp_path / "empty").mkdir()
        keys = app.config["SATCHEL_KEYS"]
        client = make_app(
            tmp_path / "empty", SATCHEL_ON_BAD_TOKEN="fresh", SATCHEL_MODE=mode, SATCHEL_KEYS=keys
        ).test_client()
        bad = token
    else:
        bad = tampered(token)
    resp = client.get("/api/context", headers={"Satchel-Context": bad})
    assert resp.status_code == 200
    assert resp.headers.get("Satchel-Reset")
    data = resp.get_json()
    assert data["all_turns"] == [] and data["held_turns"] == 0
    assert data["token_bytes"] == 0


@pytest.mark.parametrize("mode", ["client", "server", "memory"])
def test_the_page_says_where_the_conversation_is_kept(tmp_path: Path, mode: str) -> None:
    """In server and memory mode the page said the context was "a sealed token kept in
    this browser" and that "the server keeps no chat history": the server keeps it all."""
    html = make_app(tmp_path, SATCHEL_MODE=mode).test_client().get("/").get_data(as_text=True)
    browser_only = "kept in this browser" in html and "keeps no chat history" in html
    assert browser_only == (mode == "client")
    if mode != "client":
        assert "kept on the server" in html


@pytest.mark.parametrize("mode", ["server", "memory"])
def test_delete_erases_what_the_server_keeps(tmp_path: Path, mode: str) -> None:
    """Delete chat in server/memory mode forgot the carrier in the browser and left the
    whole conversation in the store until its TTL: DELETE /api/context erases it."""
    client = make_app(tmp_path, SATCHEL_MODE=mode).test_client()
    token = chat(client, "my secret plan").headers["Satchel-Context"]
    resp = client.delete("/api/context", headers={"Satchel-Context": token})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["erased"] is True
    assert "Satchel-Context" not in resp.headers  # erasing issues no token
    assert resp.headers["Cache-Control"] == "no-store"  # as every /api/ answer of a chat
    gone = client.get("/api/context", headers={"Satchel-Context": token})
    assert gone.status_code == 410 and gone.get_json()["error"]["code"] == "token_erased"
    # Without a token there is nothing to erase.
    assert client.delete("/api/context").get_json()["erased"] is False


@pytest.mark.parametrize("mode", ["client", "server"])
def test_delete_removes_the_token_cookie(tmp_path: Path, mode: str) -> None:
    """With SATCHEL_COOKIE the token is in an HttpOnly cookie page code cannot remove:
    Delete chat left it, and in client mode the next message carried on the deleted
    chat (its turns back in the context)."""
    client = make_app(
        tmp_path, SATCHEL_MODE=mode, SATCHEL_COOKIE="chat", SATCHEL_COOKIE_SECURE=False
    ).test_client()
    chat(client, "my secret is 1234")  # the cookie jar keeps the token
    assert client.get_cookie("chat") is not None
    resp = client.delete("/api/context")
    assert resp.get_json()["erased"] is True
    cleared = [h for h in resp.headers.getlist("Set-Cookie") if h.startswith("chat=")]
    assert len(cleared) == 1 and "Max-Age=0" in cleared[0] and "HttpOnly" in cleared[0]
    assert client.get_cookie("chat") is None
    fresh = client.get("/api/context").get_json()
    assert fresh["all_turns"] == []  # a new chat, not the deleted one


def test_delete_erases_overflowed_turns_in_client_mode(tmp_path: Path) -> None:
    client = make_app(tmp_path, SATCHEL_MAX_TOKEN_BYTES=1200).test_client()
    token = None
    for i in range(10):
        token = chat(client, f"message {i}: {words(25)}", token).headers["Satchel-Context"]
    assert client.get("/api/context", headers={"Satchel-Context": token}).get_json()[
        "overflowed_turns"
    ]
    resp = client.delete("/api/context", headers={"Satchel-Context": token})
    assert resp.get_json()["erased"] is True and resp.get_json()["deleted_keys"] > 0
    data = client.get("/api/context", headers={"Satchel-Context": token}).get_json()
    assert data["rehydrated_turns"] == 0  # the segments are gone


class FailingModel:
    name = "failing"

    def stream(self, messages: list) -> Iterator[str]:
        yield "partial "
        raise ModelError("upstream went away")

    def complete(self, messages: list) -> str:
        raise ModelError("upstream went away")


def test_model_failure_keeps_the_clients_token(tmp_path: Path) -> None:
    app = make_app(tmp_path, CHAT_MODEL=FailingModel())
    client = app.test_client()
    resp = chat(client, "hi")
    assert resp.status_code == 502
    assert resp.get_json()["error"] == {
        "code": "model_unavailable",
        "message": "upstream went away",
    }
    assert "Satchel-Context" not in resp.headers

    events = parse_sse(client.post("/api/chat/stream", json={"message": "hi"}).get_data(True))
    assert [n for n, _ in events] == ["delta", "error"]
    assert events[-1][1]["code"] == "model_unavailable"


def test_default_overflow_is_sqlite_in_the_instance_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert chat_app.default_overflow_url(str(tmp_path)) == (
        f"sqlite:///{tmp_path}/overflow.sqlite3"
    )
    assert chat_app.default_overflow_url(str(tmp_path)).startswith("sqlite:////")
    monkeypatch.setenv("SATCHEL_MAX_TOKEN_BYTES", "2000")
    monkeypatch.delenv("SATCHEL_OVERFLOW_URL", raising=False)
    app = chat_app.create_app(
        {"SATCHEL_KEYS": Keyring.generate().to_string(), "CHAT_MODEL": OfflineModel()}
    )
    assert app.config["SATCHEL_MAX_TOKEN_BYTES"] == "2000"
    assert app.config["SATCHEL_OVERFLOW_URL"] == (
        f"sqlite:///{Path(app.instance_path) / 'overflow.sqlite3'}"
    )
    assert app.config["SATCHEL_METRICS_ROUTE"] == "/metrics"
    assert app.config["SATCHEL_HEALTH_ROUTES"] is True
    monkeypatch.setenv("SATCHEL_OVERFLOW_URL", "")
    app = chat_app.create_app(
        {"SATCHEL_KEYS": Keyring.generate().to_string(), "CHAT_MODEL": OfflineModel()}
    )
    data = app.test_client().get("/api/context").get_json()
    assert data["overflow_tier"] is None


# --------------------------------------------------------------------- models


def test_build_messages_sends_summary_and_pinned_prompt_as_system() -> None:
    ctx = Context.new()
    ctx.summary = "(2 earlier turns summarized)\n- user: my name is Ada"
    ctx.pinned.facts.append("The user prefers metric units.")
    ctx.add_turn("user", "What is my name?")
    messages = build_messages(ctx, default_prompt="Be brief.")
    assert messages[0]["role"] == "system"
    system = messages[0]["content"]
    assert system.startswith("Be brief.")
    assert "my name is Ada" in system and "metric units" in system
    assert messages[1:] == [{"role": "user", "content": "What is my name?"}]
    ctx.pinned.system = "You are a pirate."
    assert build_messages(ctx)[0]["content"].startswith("You are a pirate.")


def test_offline_model_is_deterministic() -> None:
    model = OfflineModel()
    messages = [{"role": "user", "content": "Same input"}]
    assert model.complete(messages) == "".join(model.stream(messages))
    assert model.complete(messages) == OfflineModel().complete(messages)
    assert isinstance(model, ChatModel)
    with_summary = [{"role": "system", "content": "Summary of the earlier conversation:\nx"}]
    assert "summary" in model.complete([*with_summary, *messages])


def test_model_from_env() -> None:
    assert isinstance(model_from_env({}), OfflineModel)
    assert model_from_env({"SATCHEL_MODEL_DELAY": "0.01"}).delay == 0.01
    model = model_from_env(
        {
            "SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1/",
            "SATCHEL_MODEL_API_KEY": "sk-test",
            "SATCHEL_MODEL_NAME": "tiny",
            "SATCHEL_MODEL_TEMPERATURE": "0.2",
        }
    )
    assert isinstance(model, OpenAICompatibleModel)
    assert model.url == "http://127.0.0.1:9/v1/chat/completions"
    assert model.model == "tiny" and model.options == {"temperature": 0.2}
    assert "sk-test" not in repr(model)


def test_iter_sse_data() -> None:
    lines = [b": comment\n", b"data: one\r\n", b"\n", b"event: x\n", b"data: a\n", b"data: b\n"]
    assert list(iter_sse_data(lines)) == ["one", "a\nb"]


class FakeOpenAI:
    """A loopback OpenAI-compatible endpoint that records what it was sent.

    ``cut_after``: the stream (or the JSON reply) stops after that many pieces and the
    connection closes, as when the upstream dies mid-reply. ``done``: end a stream with
    ``data: [DONE]``. ``finish_reason``: set on the last piece's chunk.
    """

    def __init__(
        self,
        pieces: list[str],
        status: int = 200,
        *,
        cut_after: int | None = None,
        done: bool = True,
        finish_reason: str | None = None,
        gap: float = 0.0,
        comments_only: bool = False,
        error_message: str = "no such model",
    ) -> None:
        self.pieces = pieces
        self.gap = gap  # seconds between pieces
        self.comments_only = comments_only  # SSE comments (keep-alives), never data
        self.error_message = error_message
        self.status = status
        self.cut_after = cut_after
        self.done = done
        self.finish_reason = finish_reason
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                fake.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                if fake.status != 200:
                    payload = json.dumps({"error": {"message": fake.error_message}}).encode()
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    first = {"choices": [{"delta": {"role": "assistant"}}]}
                    self.wfile.write(f"data: {json.dumps(first)}\n\n".encode())
                    pieces = fake.pieces[: fake.cut_after]
                    for i, piece in enumerate(pieces):
                        time.sleep(fake.gap)  # the upstream's own pace, not a test wait
                        if fake.comments_only:
                            self.wfile.write(b": keep-alive\n\n")
                            self.wfile.flush()
                            continue
                        choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}}
                        if i == len(fake.pieces) - 1:
                            choice["finish_reason"] = fake.finish_reason
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                        self.wfile.flush()
                    if fake.done and fake.cut_after is None:
                        self.wfile.write(b"data: [DONE]\n\n")
                    return  # HTTP/1.0: the connection closes here
                payload = json.dumps(
                    {
                        "choices": [
                            {"message": {"role": "assistant", "content": "".join(fake.pieces)}}
                        ]
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: fake.cut_after])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_openai_compatible_model_streams_over_sse() -> None:
    with FakeOpenAI(["Hel", "lo", " there"]) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", api_key="sk-test", timeout=5)
        messages = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
        ]
        # The role chunk carries no text: "", which satchel.stream sends as a keep-alive.
        assert list(model.stream(messages)) == ["", "Hel", "lo", " there"]
        assert model.complete(messages) == "Hello there"
    streamed, completed = fake.requests
    assert streamed["path"] == "/v1/chat/completions"
    assert streamed["headers"]["Authorization"] == "Bearer sk-test"
    assert streamed["body"] == {"model": "tiny", "messages": messages, "stream": True}
    assert completed["body"]["stream"] is False


def test_openai_compatible_model_errors() -> None:
    with FakeOpenAI([], status=404) as fake:
        model = OpenAICompatibleModel(fake.base_url, "nope", timeout=5)
        with pytest.raises(ModelError, match="answered 404") as info:
            list(model.stream([{"role": "user", "content": "hi"}]))
        # Neither the browser's message nor the log's detail holds the provider's
        # words (they can quote the conversation): its error type and code, and a size.
        assert "no such" not in str(info.value) and "no such" not in info.value.detail
        assert "bytes" in info.value.detail
        assert "Authorization" not in fake.requests[0]["headers"]
    with pytest.raises(ModelError, match="unreachable"):
        OpenAICompatibleModel(fake.base_url, "x", timeout=2).complete([])
    with pytest.raises(ValueError):
        OpenAICompatibleModel("file:///etc/passwd", "x")


def test_openai_compatible_stream_keeps_a_split_emoji_and_passes_keep_alives_on() -> None:
    """A provider's chunks may split an emoji ("\\ud83d" then "\\ude00"): each half
    became a replacement character. And its keep-alive comments (OpenRouter's ":
    OPENROUTER PROCESSING") passed nothing on, so a proxy could close the response."""
    with FakeOpenAI(["A \ud83d", "\ude00 B"]) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        assert list(model.stream([])) == ["", "A ", "\U0001f600 B"]
    with FakeOpenAI(["x\ud83d"]) as fake:  # a high surrogate nothing followed
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        assert list(model.stream([])) == ["", "x", "\ufffd"]
    with FakeOpenAI(["w"] * 3, comments_only=True) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        pieces: list[str] = []
        with pytest.raises(ModelError):  # no text at all: an empty reply
            for piece in model.stream([]):
                pieces.append(piece)
        assert pieces == ["", "", "", ""]  # the role chunk, then one per keep-alive


def test_openai_compatible_stream_cut_off_before_done_is_a_model_error() -> None:
    pieces = [f"w{i} " for i in range(10)]
    with FakeOpenAI(pieces, cut_after=4) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        got: list[str] = []
        with pytest.raises(ModelError, match="broke off"):
            got.extend(model.stream([{"role": "user", "content": "hi"}]))
        assert [p for p in got if p] == pieces[:4]  # what arrived was streamed; no end came
        with pytest.raises(ModelError, match="broke off"):  # a JSON reply cut short too
            model.complete([{"role": "user", "content": "hi"}])


def test_openai_compatible_stream_may_end_with_a_finish_reason_instead_of_done() -> None:
    with FakeOpenAI(["All ", "done."], done=False, finish_reason="stop") as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        assert "".join(model.stream([{"role": "user", "content": "hi"}])) == "All done."
    with FakeOpenAI(["Cut ", "off"], done=False) as fake:  # neither: not complete
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        with pytest.raises(ModelError, match="no \\[DONE\\]"):
            list(model.stream([{"role": "user", "content": "hi"}]))


def test_chat_app_reports_a_cut_off_stream_as_model_unavailable(tmp_path: Path) -> None:
    with FakeOpenAI([f"w{i} " for i in range(10)], cut_after=4) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        client = make_app(tmp_path, CHAT_MODEL=model).test_client()
        resp = client.post("/api/chat/stream", json={"message": "hi"})
        events = parse_sse(resp.get_data(as_text=True))
        resp = chat(client, "hi")
        assert resp.status_code == 502
        assert resp.get_json()["error"]["code"] == "model_unavailable"
        assert "Satchel-Context" not in resp.headers
    assert [n for n, _ in events] == ["delta"] * 4 + ["error"]
    assert events[-1][1]["code"] == "model_unavailable"  # no satchel, no done: no token


def test_chat_app_with_an_openai_compatible_model(tmp_path: Path) -> None:
    with FakeOpenAI(["Ahoy", ", ", "Ada!"]) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        client = make_app(tmp_path, CHAT_MODEL=model, CHAT_SYSTEM_PROMPT="Talk like a pirate.")
        client = client.test_client()
        token = chat(client, "My name is Ada").headers["Satchel-Context"]
        resp = client.post(
            "/api/chat/stream", json={"message": "Who am I?"}, headers={"Satchel-Context": token}
        )
        events = parse_sse(resp.get_data(as_text=True))
        assert "".join(d["text"] for n, d in events if n == "delta") == "Ahoy, Ada!"
        assert events[-2][0] == "satchel"
    sent = fake.requests[-1]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "Talk like a pirate."}
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "user"]
    assert sent[1]["content"] == "My name is Ada" and sent[-1]["content"] == "Who am I?"


# ----------------------------------------------------------------- summarizer


class ScriptedModel:
    name = "scripted"

    def __init__(self, reply: str | Exception) -> None:
        self.reply = reply
        self.calls: list[list] = []

    def stream(self, messages: list) -> Iterator[str]:
        yield self.complete(messages)

    def complete(self, messages: list) -> str:
        self.calls.append(messages)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def test_llm_summarizer_and_its_fallback() -> None:
    ctx = Context.new()
    ctx.add_turn("user", "My name is Ada. I like tea.")
    ctx.add_turn("assistant", "Nice to meet you, Ada.")
    good = LLMSummarizer(ScriptedModel("  Ada likes\n tea.  "))
    assert good(ctx.turns, "earlier") == "Ada likes tea."
    prompt = good.model.calls[0][1]["content"]
    assert "earlier" in prompt and "user: My name is Ada. I like tea." in prompt

    failing = LLMSummarizer(ScriptedModel(ModelError("down")))
    summary = failing(ctx.turns, "")
    assert failing.fallbacks == 1
    assert summary.startswith("(2 earlier turns summarized)") and "Ada" in summary
    assert LLMSummarizer(ScriptedModel(""))(ctx.turns, "").startswith("(2 earlier")

    long = LLMSummarizer(ScriptedModel("x" * 5000), max_chars=100)
    assert len(long(ctx.turns, "")) == 100


def test_llm_summarizer_in_the_app(tmp_path: Path) -> None:
    summarizer = LLMSummarizer(ScriptedModel("The user sent many hex words."))
    app = make_app(tmp_path, SATCHEL_MAX_TOKEN_BYTES=1200, SATCHEL_SUMMARIZER=summarizer)
    client = app.test_client()
    token = None
    for i in range(8):
        token = chat(client, f"{i} {words(25)}", token).headers["Satchel-Context"]
    data = client.get("/api/context", headers={"Satchel-Context": token}).get_json()
    assert data["overflowed_turns"] > 0
    assert data["summary"] == "The user sent many hex words."


# ---------------------------------------------------------------- real HTTP


def test_live_server_round_trip(live_server_factory: Any, tmp_path: Path) -> None:
    srv = live_server_factory(
        APP,
        env={
            "SATCHEL_KEYS": Keyring.generate().to_string(),
            "SATCHEL_OVERFLOW_URL": f"sqlite:///{tmp_path / 'o.sqlite3'}",
            "SATCHEL_MODEL_BASE_URL": "",
        },
    )
    page = srv.get("/")
    assert page.status == 200 and "Satchel chat" in page.text
    assert (
        srv.get("/static/satchel/satchel.js").headers["Content-Type"].startswith("text/javascript")
    )

    resp = srv.post("/api/chat/stream", json_body={"message": "over real HTTP"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [n for n, _ in events][-2:] == ["satchel", "done"]
    token = events[-2][1]["token"]

    resp = srv.post(
        "/api/chat", json_body={"message": "and JSON"}, headers={"Satchel-Context": token}
    )
    assert resp.status == 200 and resp.headers["Satchel-Seq"] == "2"
    ctx = srv.get("/api/context", headers={"Satchel-Context": resp.headers["Satchel-Context"]})
    turns = [t["content"] for t in ctx.json()["all_turns"] if t["role"] == "user"]
    assert turns == ["over real HTTP", "and JSON"]


@pytest.mark.parametrize("comments_only", [False, True])
def test_a_reply_that_never_ends_is_cut_at_the_model_timeout(comments_only: bool) -> None:
    """The socket timeout bounds each read, not the reply: a model that keeps trickling
    (or sends only keep-alives) held the request, a thread and a connection forever."""
    with FakeOpenAI(["w "] * 200, gap=0.05, comments_only=comments_only) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"longer than 0\.5 s"):
            list(model.stream([{"role": "user", "content": "hi"}]))
        assert time.monotonic() - started < 3


class TricklingModel:
    """A raw HTTP endpoint that sends ``prelude`` and then one byte of ``drip`` every
    50 ms, for up to 20 s: each read it blocks is short, the reply never ends."""

    def __init__(self, prelude: bytes, drip: bytes) -> None:
        import socketserver

        trickle = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)  # the request (small: one message)
                try:
                    self.request.sendall(prelude)
                    for i in range(400):
                        if trickle.stop.wait(0.05):
                            return
                        self.request.sendall(drip[i % len(drip) : i % len(drip) + 1])
                except OSError:
                    return  # the client cut the connection: what the test wants

        self.stop = threading.Event()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> TricklingModel:
        # A short poll: shutdown() waits for the loop's next poll (0.5 s by default).
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"


@pytest.mark.parametrize(
    ("prelude", "drip", "call"),
    [
        (SSE_HEAD, b"data: xxxx", "stream"),  # an event-stream line that never ends
        (JSON_HEAD, b'{"choices": [', "complete"),  # a JSON body, one byte at a time
        (JSON_HEAD, b'{"choices": [', "stream"),  # stream=true ignored, JSON trickling
        (SSE_HEAD, b'data: {"x": 1}\n\n', "complete"),  # events where JSON was asked for
        (b"HTTP/1.1 200 OK\r\n", b"X-Slow: header\r\n", "stream"),  # headers trickling
    ],
    ids=["sse-line", "json-complete", "json-stream", "sse-complete", "headers"],
)
def test_a_model_that_keeps_every_read_busy_is_cut_at_the_timeout(
    prelude: bytes, drip: bytes, call: str
) -> None:
    """Each read waited for a full buffer, line or header block, and the deadline was
    checked only between reads: a model sending a byte now and then held the request
    (and a server thread) for minutes, far past SATCHEL_MODEL_TIMEOUT."""
    with TricklingModel(prelude, drip) as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=0.5)
        messages = [{"role": "user", "content": "hi"}]
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"longer than 0\.5 s"):
            if call == "stream":
                list(model.stream(messages))
            else:
                model.complete(messages)
        assert time.monotonic() - started < 3


def test_a_proxy_trickling_its_connect_answer_is_cut_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind HTTPS_PROXY the CONNECT tunnel is set up inside connect(), before the
    socket was tracked: a proxy trickling its answer held the request past the timeout."""
    with TricklingModel(b"HTTP/1.1 200 Connection established\r\n", b"X-Slow: 1\r\n") as proxy:
        monkeypatch.setenv("https_proxy", proxy.base_url.removesuffix("/v1"))
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        model = OpenAICompatibleModel("https://model.invalid/v1", "tiny", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"longer than 0\.5 s"):
            model.complete([{"role": "user", "content": "hi"}])
        assert time.monotonic() - started < 3


def test_a_model_that_answers_nothing_timed_out_it_is_not_unreachable() -> None:
    """A model that accepts the connection and never answers was reported as
    "model endpoint unreachable", sending an operator after the network."""
    import socket

    with socket.socket() as listener:  # the kernel accepts; nobody ever answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        model = OpenAICompatibleModel(f"http://127.0.0.1:{port}/v1", "tiny", timeout=0.5)
        for call in (model.complete, lambda m: list(model.stream(m))):
            with pytest.raises(ModelError, match=r"longer than 0\.5 s"):
                call([{"role": "user", "content": "hi"}])


def test_an_empty_reply_is_a_model_error_and_bad_unicode_is_the_models() -> None:
    with FakeOpenAI([]) as fake:  # [DONE] and nothing before it
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        with pytest.raises(ModelError, match="empty reply"):
            list(model.stream([{"role": "user", "content": "hi"}]))
    with FakeOpenAI(["ok \ud83d", "fine"]) as fake:  # a lone surrogate, escaped in JSON
        model = OpenAICompatibleModel(fake.base_url, "tiny", timeout=5)
        assert "".join(model.stream([{"role": "user", "content": "hi"}])) == "ok \ufffdfine"


def test_the_provider_s_words_and_the_api_key_stay_out_of_the_browser() -> None:
    key = "sk-test-SECRETKEY123456"
    with FakeOpenAI([], status=401, error_message=f"Incorrect API key provided: {key}") as fake:
        model = OpenAICompatibleModel(fake.base_url, "tiny", api_key=key, timeout=5)
        with pytest.raises(ModelError) as info:
            model.complete([{"role": "user", "content": "hi"}])
    assert str(info.value) == "model endpoint answered 401"
    assert key not in info.value.detail and "Incorrect" not in info.value.detail


def test_a_provider_error_quoting_the_conversation_stays_out_of_the_log(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The provider's error message went to the log (WARNING, the default): a validation
    or moderation error that quotes its input put the user's message there, against
    'message text never reaches the log'. The log now has the error's type and code."""
    quoted = "Invalid content: 'PRIVATE-MARKER my card is 4111' was flagged"
    with FakeOpenAI([], status=400, error_message=quoted) as fake:
        app = make_app(tmp_path, CHAT_MODEL=OpenAICompatibleModel(fake.base_url, "m", timeout=5))
        with caplog.at_level(logging.DEBUG):
            resp = app.test_client().post("/api/chat", json={"message": "PRIVATE-MARKER hi"})
    assert resp.status_code == 502
    assert resp.get_json()["error"]["code"] == "model_unavailable"
    assert "chat model failed: model endpoint answered 400" in caplog.text
    assert "PRIVATE-MARKER" not in caplog.text
    # A long quoted input: the body is still read whole enough to parse (its size is
    # the body's, not a cut at 2,000 bytes that read as "not JSON").
    with FakeOpenAI([], status=400, error_message="x" * 5000) as fake:
        model = OpenAICompatibleModel(fake.base_url, "m", timeout=5)
        with pytest.raises(ModelError) as info:
            model.complete([{"role": "user", "content": "hi"}])
    assert "not JSON" not in info.value.detail and "xxxx" not in info.value.detail


def test_an_llm_summarizer_failure_logs_no_message_text(caplog: pytest.LogCaptureFixture) -> None:
    class Quoting:
        def complete(self, messages: Any) -> str:
            raise RuntimeError(f"invalid request: {messages[-1]['content']}")

        def stream(self, messages: Any) -> Any:
            raise NotImplementedError

    summarize = LLMSummarizer(Quoting())  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG):
        summary = summarize([Turn("user", "PRIVATE-MARKER my pin", 0.0)], "")
    assert summary  # the extractive fallback
    assert "RuntimeError" in caplog.text and "PRIVATE-MARKER" not in caplog.text


def test_the_examples_own_settings_are_not_warned_about_as_misspellings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/chat-example.md documents SATCHEL_LLM_SUMMARIZER; the app warned that it
    was "not a Satchel setting; did you mean SATCHEL_SUMMARIZER? (it is ignored)"."""
    import logging

    from examples._config import env_config

    monkeypatch.setenv("SATCHEL_LLM_SUMMARIZER", "1")
    monkeypatch.setenv("SATCHEL_OVERFLOW", "sqlite:///typo.db")  # still warned about
    with caplog.at_level(logging.WARNING, logger="satchel"):
        env_config(["SATCHEL_KEYS"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "SATCHEL_LLM_SUMMARIZER" not in warned
    assert "SATCHEL_OVERFLOW " in warned


@pytest.mark.parametrize(
    ("env", "name"),
    [
        (
            {"SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "SATCHEL_MODEL_TIMEOUT": "-1"},
            "SATCHEL_MODEL_TIMEOUT",
        ),
        (
            {"SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "SATCHEL_MODEL_TIMEOUT": "nan"},
            "SATCHEL_MODEL_TIMEOUT",
        ),
        (
            {"SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "SATCHEL_MODEL_TIMEOUT": "0"},
            "SATCHEL_MODEL_TIMEOUT",
        ),
        (
            {
                "SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1",
                "SATCHEL_MODEL_TEMPERATURE": "warm",
            },
            "SATCHEL_MODEL_TEMPERATURE",
        ),
        ({"SATCHEL_MODEL_DELAY": "inf"}, "SATCHEL_MODEL_DELAY"),
        # Checked whichever model runs (docs/chat-example.md: "every value is checked
        # when the app starts"): a remote model's settings while offline, and back.
        ({"SATCHEL_MODEL_TIMEOUT": "0"}, "SATCHEL_MODEL_TIMEOUT"),
        ({"SATCHEL_MODEL_TEMPERATURE": "nan"}, "SATCHEL_MODEL_TEMPERATURE"),
        (
            {"SATCHEL_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "SATCHEL_MODEL_DELAY": "abc"},
            "SATCHEL_MODEL_DELAY",
        ),
    ],
)
def test_a_bad_model_setting_is_refused_at_start_up(env: dict[str, str], name: str) -> None:
    """A negative or NaN timeout made every message a 500, zero a 502."""
    from satchel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=f"^{name} must be"):
        model_from_env(env)


@pytest.mark.parametrize(
    ("value", "on"), [("false", False), ("off", False), ("1", True), ("yes", True)]
)
def test_the_llm_summarizer_switch_reads_booleans_like_every_setting(
    value: str, on: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SATCHEL_LLM_SUMMARIZER=false turned the summarizer on (only "" and "0" were off)."""
    from satchel.errors import ConfigurationError

    monkeypatch.setenv("SATCHEL_LLM_SUMMARIZER", value)
    assert make_app(tmp_path).config["CHAT_LLM_SUMMARIZER"] is on
    monkeypatch.setenv("SATCHEL_LLM_SUMMARIZER", "maybe")
    with pytest.raises(ConfigurationError, match=r"^SATCHEL_LLM_SUMMARIZER must be"):
        make_app(tmp_path)


def test_a_broken_endpoint_echoing_the_request_does_not_put_it_in_the_log() -> None:
    """A malformed status line is quoted by http.client's BadStatusLine, and the model
    error's detail (logged at WARNING) was str(err): an endpoint or proxy that echoes the
    request put the user's message there verbatim. The log gets the error's type."""
    import socket
    import threading

    secret = "my card number is 4111 1111 1111 1111"
    listener = socket.create_server(("127.0.0.1", 0))

    def echo_in_a_bad_status_line() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                request = conn.recv(65536)
                while b"4111" not in request:
                    request += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 2x0 " + request.replace(b"\r\n", b" ")[:2000] + b"\r\n")

    server = threading.Thread(target=echo_in_a_bad_status_line, daemon=True)
    server.start()
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    model = OpenAICompatibleModel(base_url, "tiny", timeout=5)
    messages = [{"role": "user", "content": secret}]
    try:
        for call in (model.complete, lambda m: list(model.stream(m))):
            with pytest.raises(ModelError, match="unreachable") as info:
                call(messages)
            assert "4111" not in info.value.detail and "4111" not in str(info.value)
            assert info.value.detail == "BadStatusLine"
    finally:
        listener.close()
        server.join(timeout=5)


def test_llm_summarizer_sends_no_tool_output_as_a_users_words() -> None:
    """A tool result in a user turn (Anthropic's) went to the model as "user: <tool
    JSON>": the summary then said the user had said it."""
    from satchel import Context, ToolCall

    ctx = Context.new()
    ctx.add_turn("user", "What's my balance?")
    ctx.add_turn("assistant", "", tool_calls=[ToolCall("toolu_1", "get_balance", {})])
    ctx.add_turn("user", '{"iban": "DE89370400440532013000"}', tool_call_id="toolu_1")
    prompt = LLMSummarizer(ScriptedModel("ok")).messages(ctx.turns, "")[1]["content"]
    assert "DE89" not in prompt and "user: What's my balance?" in prompt


# ------------------------------------------------------- the Vercel AI SDK route


def ai_sdk_chunks(resp: Any) -> list[dict[str, Any]]:
    """The JSON chunks of a UI message stream (every ``data:`` line but ``[DONE]``)."""
    text = resp.get_data(as_text=True)
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def ai_sdk_send(client: Any, body: dict[str, Any], token: str | None) -> dict[str, Any]:
    """One request as ``satchelAISDK``'s ``prepareSendMessagesRequest`` builds it; the
    ``data-satchel`` part's data, with the streamed text under ``text``."""
    headers = {"Satchel-Context": token} if token else {}
    resp = client.post("/api/chat/ai-sdk", json=body, headers=headers)
    assert resp.status_code == 200
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    chunks = ai_sdk_chunks(resp)
    assert chunks[0] == {"type": "start"} and chunks[-1] == {"type": "finish"}
    (part,) = [c for c in chunks if c["type"] == "data-satchel"]
    assert part["transient"] is True
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    return {**part["data"], "text": text}


def test_ai_sdk_route_carries_the_conversation_from_the_newest_message_alone(
    app: Any, client: Any
) -> None:
    first = ai_sdk_send(
        client, {"message": "Plan a trip to Lisbon", "id": "c1", "trigger": "submit-message"}, None
    )
    second = ai_sdk_send(
        client,
        {"message": "And Porto?", "id": "c1", "trigger": "submit-message", "messageId": None},
        first["token"],
    )
    assert (first["seq"], second["seq"]) == (1, 2)
    ctx = Satchel.state(app).codec.open(second["token"])
    assert [(t.role, t.content) for t in ctx.turns] == [
        ("user", "Plan a trip to Lisbon"),
        ("assistant", first["text"]),
        ("user", "And Porto?"),
        ("assistant", second["text"]),
    ]
    assert second["text"] == OfflineModel().reply(
        [{"role": t.role, "content": t.content} for t in ctx.turns[:3]]
    )


def sdk_message(
    client: Any, message: str, user_id: str | None, token: str | None, *, regenerate: bool = False
) -> dict[str, Any]:
    """:func:`ai_sdk_send` of ``message`` as the adapter sends it: its UI message id,
    and ``regenerate-message`` for ``regenerate()``."""
    trigger = "regenerate-message" if regenerate else "submit-message"
    body = {"message": message, "userMessageId": user_id, "trigger": trigger}
    return ai_sdk_send(client, body, token)


def held(app: Any, token: str) -> list[tuple[str, str]]:
    """The (role, content) of every turn ``token`` holds."""
    return [(t.role, t.content) for t in Satchel.state(app).codec.open(token).turns]


class SwitchedModel(OfflineModel):
    """The offline model; ``answer = "error"`` makes it fail, ``"empty"`` answer
    nothing (a content filter, a stop at the first token)."""

    answer = "normal"

    def stream(self, messages: list) -> Iterator[str]:
        if self.answer == "error":
            raise ModelError("upstream went away")
        if self.answer == "normal":
            yield from super().stream(messages)


def test_ai_sdk_regenerate_answers_the_last_message_again_in_place_of_its_reply(
    app: Any, client: Any
) -> None:
    first = sdk_message(client, "Hello there", "u1", None)
    again = sdk_message(client, "Hello there", "u1", first["token"], regenerate=True)
    assert held(app, again["token"]) == [("user", "Hello there"), ("assistant", again["text"])]
    # The same words sent as a new message are a new turn, not a regeneration.
    third = sdk_message(client, "Hello there", "u2", again["token"])
    assert [role for role, _ in held(app, third["token"])] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_ai_sdk_regenerate_after_a_failed_reply_to_the_same_words_keeps_both(
    tmp_path: Path,
) -> None:
    """ "continue", answered; "continue" again, whose reply failed (no token: the client
    keeps the first one); regenerate. Matched by text, the regenerate replaced the
    first reply and the second message was never held. By message id it is answered
    as the new message it is."""
    model = SwitchedModel()
    app = make_app(tmp_path, CHAT_MODEL=model)
    client = app.test_client()
    first = sdk_message(client, "continue", "u1", None)
    model.answer = "error"
    failed = client.post(
        "/api/chat/ai-sdk",
        json={"message": "continue", "userMessageId": "u2", "trigger": "submit-message"},
        headers={"Satchel-Context": first["token"]},
    )
    last = failed.get_data(as_text=True).strip().splitlines()[-1]
    assert json.loads(last.removeprefix("data: "))["type"] == "error"  # and no token
    model.answer = "normal"
    again = sdk_message(client, "continue", "u2", first["token"], regenerate=True)
    assert held(app, again["token"]) == [
        ("user", "continue"),
        ("assistant", first["text"]),
        ("user", "continue"),
        ("assistant", again["text"]),
    ]


def test_ai_sdk_regenerate_after_an_empty_reply_answers_the_message_once(
    tmp_path: Path,
) -> None:
    """An empty reply is saved as nothing: the token ends with the unanswered user
    turn. Regenerate answers that turn; it held the message twice when the id was kept
    with the reply (there was none) instead of with the user turn."""
    model = SwitchedModel()
    app = make_app(tmp_path, CHAT_MODEL=model)
    client = app.test_client()
    first = sdk_message(client, "Hi", "u1", None)
    model.answer = "empty"
    empty = sdk_message(client, "Again", "u2", first["token"])
    assert empty["text"] == ""
    model.answer = "normal"
    again = sdk_message(client, "Again", "u2", empty["token"], regenerate=True)
    assert held(app, again["token"]) == [
        ("user", "Hi"),
        ("assistant", first["text"]),
        ("user", "Again"),
        ("assistant", again["text"]),
    ]


def test_ai_sdk_regenerate_after_a_turn_another_writer_added_holds_it_as_new(
    app: Any, client: Any
) -> None:
    """During a rolling deploy an older replica answers the page's route without
    clearing the record of the last AI SDK message: matched by id alone, a regenerate
    of that message then replaced the other reply and answered the other message. The
    record names the save it came from, so it is held as a new message."""
    first = sdk_message(client, "hello", "u1", None)
    codec = Satchel.state(app).codec
    ctx = codec.open(first["token"])  # an older release's save: turns, record untouched
    ctx.add_turn("user", "hello")  # the same words, in the same second
    ctx.add_turn("assistant", "page reply")
    assert ctx.metadata["ai_sdk_user"]["id"] == "u1"
    again = sdk_message(client, "hello", "u1", codec.seal(ctx), regenerate=True)
    assert [content for _, content in held(app, again["token"])][:4] == [
        "hello",
        first["text"],
        "hello",
        "page reply",
    ]


def test_ai_sdk_regenerate_twice_answers_in_place_both_times(app: Any, client: Any) -> None:
    token = sdk_message(client, "Hi", "u1", None)["token"]
    for _ in range(2):
        token = sdk_message(client, "Hi", "u1", token, regenerate=True)["token"]
    assert [role for role, _ in held(app, token)] == ["user", "assistant"]


def test_ai_sdk_regenerate_without_a_message_id_never_drops_a_reply(app: Any, client: Any) -> None:
    """An adapter that sends no userMessageId (or not an id): a regenerate cannot be
    told from a new message with the same words, so it is held as one (a question
    twice, never an exchange lost)."""
    first = sdk_message(client, "Hello", None, None)
    again = sdk_message(client, "Hello", "\ud800 bad", first["token"], regenerate=True)
    assert len(held(app, again["token"])) == 4


def test_ai_sdk_route_refuses_a_bad_message_as_json(client: Any) -> None:
    resp = client.post("/api/chat/ai-sdk", json={"messages": [{"role": "user"}]})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "invalid_request"


def test_a_bad_log_level_or_port_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/chat-example.md: a bad value stops the app with a ConfigurationError naming
    the variable. SATCHEL_LOG_LEVEL was a bare ValueError, a bad $PORT a traceback from
    int() before the arguments were parsed."""
    import logging

    from examples._config import configure_logging
    from examples.chat.__main__ import main
    from satchel.errors import ConfigurationError

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process
    monkeypatch.setattr(logging.getLogger("satchel"), "handlers", [])
    monkeypatch.setenv("SATCHEL_LOG_LEVEL", "loud")
    with pytest.raises(ConfigurationError, match=r"^SATCHEL_LOG_LEVEL must be"):
        configure_logging()
    monkeypatch.setenv("PORT", "abc")
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2 and "--port: invalid int value: 'abc'" in capsys.readouterr().err
