"""Model backends for the chat example, behind one small interface.

A backend is anything with::

    name: str
    def stream(self, messages: list[Message]) -> Iterator[str]   # text pieces
    def complete(self, messages: list[Message]) -> str            # the whole reply

where a ``Message`` is ``{"role": "system" | "user" | "assistant", "content": str}``
(the OpenAI chat-completions shape, which most providers and local servers accept).

* :class:`OfflineModel` (the default): deterministic, no network, streams word by word;
  ``delay`` adds a pause between words for demos.
* :class:`OpenAICompatibleModel`: any OpenAI-compatible ``/chat/completions`` endpoint
  (OpenAI, Azure-style gateways, vLLM, llama.cpp server, Ollama's ``/v1``, LM Studio...)
  using only the standard library, with ``stream: true`` parsed as server-sent events.
  A stream counts as complete only when it ends with ``data: [DONE]`` or a chunk gave a
  ``finish_reason``; one cut off before either raises :class:`ModelError`, so a partial
  reply is never stored as the assistant's turn.

:func:`model_from_env` picks one from ``SATCHEL_MODEL_BASE_URL``, ``SATCHEL_MODEL_API_KEY``
and ``SATCHEL_MODEL_NAME``; :func:`build_messages` turns a Satchel context into messages
(the pinned system prompt, pinned facts and running summary as one system message, then
the turns held in the token).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, TypedDict, overload, runtime_checkable

from satchel import Context, Turn
from satchel.context import join_surrogate_pairs
from satchel.errors import ConfigurationError

DEFAULT_SYSTEM_PROMPT = (
    "You are a concise, friendly assistant in the Satchel chat demo. Answer in plain text."
)


class Message(TypedDict):
    role: str
    content: str


class ModelError(RuntimeError):
    """The model backend failed (network, HTTP status, malformed or empty reply).

    ``str(error)`` is what the browser is told; ``detail`` is for the server's log
    only: the provider's error ``type`` and ``code`` identifiers and the body's size,
    never its message, which can quote the conversation (a validation error echoing its
    input, a moderation refusal) or key fragments.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


#: Most bytes read from the model for one reply, and for one line of its event stream:
#: far more than any reply a turn keeps (32,000 characters), and a bound on the memory
#: a misbehaving endpoint can make a worker hold.
MAX_REPLY_BYTES = 4 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
#: Most bytes read of an error body (its type and code come after the message)
MAX_ERROR_BYTES = 256 * 1024

#: Default for SATCHEL_MODEL_TIMEOUT: below gunicorn's default worker timeout (30 s),
#: which would otherwise kill the worker first and answer an HTML 500.
DEFAULT_MODEL_TIMEOUT = 25.0

_SURROGATE = re.compile("[\ud800-\udfff]")


@runtime_checkable
class ChatModel(Protocol):
    """What the chat app and the LLM summarizer need from a model."""

    name: str

    def stream(self, messages: list[Message]) -> Iterator[str]: ...

    def complete(self, messages: list[Message]) -> str: ...


# --------------------------------------------------------------------- messages


def system_message(ctx: Context, default_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The pinned system prompt (or the app default), pinned facts and the summary."""
    parts = [ctx.pinned.system or default_prompt]
    if ctx.pinned.facts:
        parts.append("Facts to keep in mind:\n" + "\n".join(f"- {f}" for f in ctx.pinned.facts))
    if ctx.summary:
        parts.append("Summary of the earlier conversation:\n" + ctx.summary)
    return "\n\n".join(p for p in parts if p)


def build_messages(
    ctx: Context,
    *,
    default_prompt: str = DEFAULT_SYSTEM_PROMPT,
    include_rehydrated: bool = False,
) -> list[Message]:
    """Messages for a model: one system message, then the conversation's turns.

    By default only the turns held in the token are sent: the running summary stands in
    for the ones that overflowed, which keeps the prompt bounded however long the chat
    gets. ``include_rehydrated=True`` also sends the overflowed turns read back from the
    tier (when they could be read).
    """
    turns: Iterable[Turn] = ctx.all_turns() if include_rehydrated else ctx.turns
    messages: list[Message] = [{"role": "system", "content": system_message(ctx, default_prompt)}]
    for turn in turns:
        if turn.role in ("user", "assistant") and turn.content:
            messages.append({"role": turn.role, "content": turn.content})
    return messages


def _last_user(messages: list[Message]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""


# ---------------------------------------------------------------------- offline

_OPENERS = (
    "Good question.",
    "Here is how I see it.",
    "Let me think about that.",
    "Thanks for asking.",
)
_CLOSERS = (
    "Tell me more if you want to go deeper.",
    "Happy to expand on any part of this.",
    "Ask away if something is unclear.",
)


class OfflineModel:
    """A deterministic stand-in for a model: no network, same input, same reply.

    The reply quotes the user's message, counts the turns it can see and says when a
    summary of earlier turns was in its system message, so the demo shows what the model
    would receive. ``delay`` (seconds) pauses between streamed words, for demos only.
    """

    name = "offline"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = max(0.0, float(delay))

    def reply(self, messages: list[Message]) -> str:
        message = " ".join(_last_user(messages).split())
        words = message.split()
        quoted = " ".join(words[:12]) + ("…" if len(words) > 12 else "")
        seed = int.from_bytes(hashlib.sha256(message.encode()).digest()[:4], "big")
        turn = sum(1 for m in messages if m["role"] == "user")
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        memory = (
            " I can also see a summary of our earlier conversation."
            if "Summary of the earlier conversation" in system
            else ""
        )
        if not words:
            quoted = "nothing"
        return (
            f"{_OPENERS[seed % len(_OPENERS)]} You said: “{quoted}”. "
            f"This is reply {turn} in the turns I can see, written offline and "
            f"deterministically, so the demo runs anywhere without a network.{memory} "
            f"{_CLOSERS[(seed // 7) % len(_CLOSERS)]}"
        )

    def stream(self, messages: list[Message]) -> Iterator[str]:
        words = self.reply(messages).split(" ")
        for i, word in enumerate(words):
            if self.delay and i:
                time.sleep(self.delay)
            yield word if i == len(words) - 1 else word + " "

    def complete(self, messages: list[Message]) -> str:
        return self.reply(messages)


# ------------------------------------------------------------ OpenAI-compatible


class _Deadline:
    """Ends a model request when its whole time is up, wherever it is blocked.

    The socket timeout bounds each read, not a reply: a model that sends a byte now and
    then (headers trickling in, keep-alive bytes, an event-stream line that never ends)
    kept a server thread for as long as it liked, as every read waits for a full
    buffer, line or header block. A timer shuts the request's socket down at the
    deadline, which makes whatever read is blocked return or raise at once.
    """

    def __init__(self, seconds: float) -> None:
        self.passed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener whose connections this deadline can cut (proxies as usual)."""
        deadline = self

        def tracked(cls: type[http.client.HTTPConnection]) -> Any:
            # The socket, not the connection: urllib asks for Connection: close, and a
            # connection then hands its socket to the response and forgets it. Tracked
            # as it is made (a proxy's CONNECT tunnel is set up inside connect()), and
            # again once connected (TLS wraps it in a socket of its own).
            class Tracked(cls):  # type: ignore[valid-type,misc]
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    create = self._create_connection

                    def tracked_create(*a: Any, **kw: Any) -> socket.socket:
                        sock = create(*a, **kw)
                        deadline._track(sock)
                        return sock

                    self._create_connection = tracked_create

                def connect(self) -> None:
                    super().connect()
                    deadline._track(self.sock)

            return Tracked

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> Any:
                return self.do_open(tracked(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> Any:
                return self.do_open(
                    tracked(http.client.HTTPSConnection),
                    req,
                    context=getattr(self, "_context", None),
                )

        return urllib.request.build_opener(HTTP, HTTPS)

    def start(self) -> _Deadline:
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.cancel()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            late = self.passed
        if late:  # connected just as the time ran out
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class OpenAICompatibleModel:
    """Any OpenAI-compatible chat-completions endpoint, with the standard library only.

    ``base_url`` is the API root that ``/chat/completions`` is appended to, e.g.
    ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1`` (Ollama).
    ``api_key`` may be empty for local servers. ``options`` are extra request fields
    (``temperature``, ``max_tokens``...).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_MODEL_TIMEOUT,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the model base URL must be http(s)://..., not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or None
        self.timeout = timeout
        self.options = dict(options or {})
        self.name = f"openai-compatible:{model}"

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompatibleModel({self.base_url!r}, {self.model!r})"

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def _request(self, messages: list[Message], *, stream: bool) -> urllib.request.Request:
        body = {**self.options, "model": self.model, "messages": messages, "stream": stream}
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": "satchel-chat-example",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )

    def _masked(self, text: str) -> str:
        return text.replace(self.api_key, "[api key]") if self.api_key else text

    def _open(self, req: urllib.request.Request, deadline: _Deadline) -> Any:
        try:
            return deadline.opener().open(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            with err:
                # Enough for the error's type and code after a long quoted message (the
                # message itself is never kept); bounded, as every read from the model.
                detail = err.read(MAX_ERROR_BYTES).decode("utf-8", "replace")
            raise ModelError(
                f"model endpoint answered {err.code}", self._masked(_error_text(detail))
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if deadline.passed or isinstance(reason, TimeoutError):
                # Connected (or still connecting) but no answer in time: not unreachable.
                raise self._timed_out() from None
            raise ModelError("model endpoint unreachable", _transport_error(reason)) from None

    def _deadline_passed(self, started: float) -> bool:
        return time.monotonic() - started > self.timeout

    def _timed_out(self) -> ModelError:
        return ModelError(f"the model took longer than {self.timeout:g} s to reply")

    def _lines(self, resp: Any, started: float) -> Iterator[bytes]:
        """The response's lines, until the reply's whole time runs out (the deadline
        cuts a read that is blocked; this ends one that keeps trickling) or its size
        limits are passed."""
        total = 0
        while line := resp.readline(MAX_LINE_BYTES + 1):
            total += len(line)
            if len(line) > MAX_LINE_BYTES or total > MAX_REPLY_BYTES:
                raise ModelError("the model's reply is too long", f"over {total} bytes")
            if self._deadline_passed(started):
                raise self._timed_out()
            yield line

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[_Deadline]:
        """The reply's whole time: a timer that cuts the request when it runs out, and a
        ModelError raised after that (a cut socket reads as a short or broken reply)
        named for what happened."""
        deadline = _Deadline(self.timeout).start()
        try:
            yield deadline
        except ModelError:
            if deadline.passed:
                raise self._timed_out() from None
            raise
        finally:
            deadline.cancel()

    def stream(self, messages: list[Message]) -> Iterator[str]:
        with self._deadline() as deadline:
            yield from self._stream(messages, deadline)

    def _stream(self, messages: list[Message], deadline: _Deadline) -> Iterator[str]:
        started = time.monotonic()
        with self._open(self._request(messages, stream=True), deadline) as resp:
            content_type = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in content_type:
                # Some servers ignore stream=true: take the whole reply at once.
                text = _completion_text(_json(self._read(resp, started)))
                yield _nonempty(text)
                return
            # A closed connection ends the iteration like a finished stream does (even a
            # chunked one cut between chunks), so only an explicit end marks the reply
            # complete: [DONE], or a finish_reason for servers that never send [DONE].
            finished = False
            sent = False
            # A high surrogate ending a chunk is held for the next one: JSON lets a
            # provider split an emoji as "\ud83d" then "\ude00" across two chunks, and
            # cleaned apart, each half became a replacement character.
            held = ""
            try:
                for data in iter_sse_data(self._lines(resp, started), comments=True):
                    if data is None:  # the provider's keep-alive comment: pass one on
                        yield ""
                        continue
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = _json(data.encode())
                    if isinstance(chunk, dict) and chunk.get("error"):
                        raise ModelError(
                            "model stream error", self._masked(_error_text(json.dumps(chunk)))
                        )
                    text = held + _delta_text(chunk)
                    held = text[-1] if text and "\ud800" <= text[-1] <= "\udbff" else ""
                    piece = _clean(join_surrogate_pairs(text[: len(text) - len(held)]))
                    if piece:
                        sent = True
                    # A chunk with no text (the role, reasoning, a keep-alive) yields "":
                    # satchel.stream sends an SSE comment for it, so a proxy in front of
                    # this app keeps the response open through a long thinking pause.
                    yield piece
                    finished = finished or _finish_reason(chunk) is not None
            except (OSError, http.client.HTTPException) as err:
                if not finished:
                    raise ModelError("model stream broke off", _transport_error(err)) from None
            if not finished:
                raise ModelError("model stream broke off before its end (no [DONE])")
            if held:  # a high surrogate no low one followed: no text
                sent = True
                yield _clean(held)
            if not sent:
                _nonempty("")

    def complete(self, messages: list[Message]) -> str:
        started = time.monotonic()
        with self._deadline() as deadline:
            with self._open(self._request(messages, stream=False), deadline) as resp:
                raw = self._read(resp, started)
            return _nonempty(_completion_text(_json(raw)))

    def _read(self, resp: Any, started: float) -> bytes:
        """The whole body, within the reply's time; a connection that drops early is a
        model error."""
        body = bytearray()
        try:
            while chunk := resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536):
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise ModelError("the model's reply is too long", f"over {len(body)} bytes")
                if self._deadline_passed(started):
                    raise self._timed_out()
        except (OSError, http.client.HTTPException) as err:  # IncompleteRead is no OSError
            raise ModelError("model reply broke off", _transport_error(err)) from None
        if getattr(resp, "length", None):  # bytes its Content-Length promised never came
            raise ModelError("model reply broke off", f"{resp.length} bytes missing")
        return bytes(body)


def _clean(text: str) -> str:
    # A lone surrogate (JSON allows "\ud83d") is no text: the model's fault, not the user's.
    return _SURROGATE.sub("\ufffd", text) if text else text


def _nonempty(text: str) -> str:
    """``text``, or ModelError for an empty reply (an answer-less turn would leave two
    user messages in a row for the next request)."""
    if not text.strip():
        raise ModelError("the model sent an empty reply")
    return _clean(text)


@overload
def iter_sse_data(lines: Iterable[bytes]) -> Iterator[str]: ...
@overload
def iter_sse_data(lines: Iterable[bytes], *, comments: bool) -> Iterator[str | None]: ...
def iter_sse_data(lines: Iterable[bytes], *, comments: bool = False) -> Iterator[str | None]:
    """The ``data`` of each server-sent event in a byte-line iterable (a response);
    with ``comments``, None for each comment line (a provider's keep-alive)."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            if comments:
                yield None
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # nested past what the parser recurses: not JSON
        # Not the bytes themselves: they are (part of) the reply, conversation text the
        # log must not hold.
        raise ModelError("model endpoint sent invalid JSON", f"{len(raw)} bytes") from None


def _delta_text(chunk: Any) -> str:
    try:
        delta = chunk["choices"][0].get("delta") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _finish_reason(chunk: Any) -> str | None:
    """``choices[0].finish_reason`` of a stream chunk when set ("stop", "length"...)."""
    try:
        reason = chunk["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return reason if isinstance(reason, str) and reason else None


def _completion_text(body: Any) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ModelError("model reply has no choices[0].message.content") from None
    return content if isinstance(content, str) else ""


#: what an error identifier may look like to be logged (``invalid_request_error``,
#: ``context_length_exceeded``, ``429``): a word, not a sentence
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _transport_error(err: object) -> str:
    """What of a connection error the log may hold: its type, and for an OS error the
    system's own errno and text. Not str(err) of the rest: http.client's BadStatusLine,
    LineTooLong and UnknownProtocol quote what the server sent, which can be the
    request (the conversation) echoed back by a broken endpoint or proxy."""
    name = type(err).__name__
    if isinstance(err, OSError) and err.errno is not None:
        return f"{name}: [Errno {err.errno}] {err.strerror}"
    return name


def _error_text(detail: str) -> str:
    """What of an error body the log may hold: the error's ``type`` and ``code`` when they
    are identifiers, and the body's size. Not its message: providers quote the input
    there (validation and moderation errors), and that is conversation text."""
    size = f"{len(detail.encode('utf-8', 'replace'))} bytes"
    try:
        body = json.loads(detail)
    except (ValueError, RecursionError):
        return f"{size}, not JSON"
    err = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return size
    fields = [
        f"{name}={value}"
        for name in ("type", "code")
        if isinstance(value := err.get(name), str | int) and _IDENTIFIER.fullmatch(str(value))
    ]
    return ", ".join([*fields, size])


# ------------------------------------------------------------------ from config


def model_from_env(env: Mapping[str, str] | None = None) -> ChatModel:
    """:class:`OpenAICompatibleModel` when ``SATCHEL_MODEL_BASE_URL`` is set, else offline.

    ``SATCHEL_MODEL_NAME`` (default ``gpt-4o-mini``), ``SATCHEL_MODEL_API_KEY`` (optional
    for local servers), ``SATCHEL_MODEL_TIMEOUT`` (seconds for the whole reply, default
    25: below gunicorn's 30 s worker timeout) and
    ``SATCHEL_MODEL_TEMPERATURE`` tune the remote model; ``SATCHEL_MODEL_DELAY`` (seconds
    between words) slows the offline one down for demos.
    """
    env = os.environ if env is None else env
    base_url = env.get("SATCHEL_MODEL_BASE_URL", "").strip()
    # Every setting is checked whichever model runs: a bad timeout set while developing
    # offline must stop the app now, not the day a real model is configured.
    delay = _env_number(env, "SATCHEL_MODEL_DELAY", 0.0)
    timeout = _env_number(env, "SATCHEL_MODEL_TIMEOUT", DEFAULT_MODEL_TIMEOUT, positive=True)
    options: dict[str, Any] = {}
    if env.get("SATCHEL_MODEL_TEMPERATURE"):
        options["temperature"] = _env_number(env, "SATCHEL_MODEL_TEMPERATURE", 0.0)
    if not base_url:
        return OfflineModel(delay=delay)
    return OpenAICompatibleModel(
        base_url,
        env.get("SATCHEL_MODEL_NAME") or "gpt-4o-mini",
        api_key=env.get("SATCHEL_MODEL_API_KEY") or None,
        timeout=timeout,
        options=options,
    )


def _env_number(
    env: Mapping[str, str], name: str, default: float, *, positive: bool = False
) -> float:
    """A finite number >= 0 (> 0 when ``positive``) from ``env[name]``, else ``default``;
    ConfigurationError naming the variable at start-up, not a 500 (a negative or NaN
    timeout) or a 502 (zero) on every message."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigurationError(f"{name} must be {kind}, not {raw!r}")
    return value


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatModel",
    "Message",
    "ModelError",
    "OfflineModel",
    "OpenAICompatibleModel",
    "build_messages",
    "iter_sse_data",
    "model_from_env",
    "system_message",
]
