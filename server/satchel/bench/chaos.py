"""``satchel bench chaos``: the example app under load while its Redis tier fails.

What it runs (all on 127.0.0.1, in a temporary directory):

* its own ``redis-server`` on a free port (``--save "" --appendonly no``: a restart
  loses every segment, like a cache node that was replaced);
* ``examples.minimal_chat.app:create_app`` with ``SATCHEL_OVERFLOW_URL`` on that
  Redis, a small byte budget (:data:`MAX_TOKEN_BYTES`) so conversations overflow
  every few turns, a hard cap (:data:`HARD_MAX_TOKEN_BYTES`) so a long outage ends in
  counted data loss, and a fixed bench-only key. ``--server embedded`` serves it with
  werkzeug's threaded server in a subprocess, ``--server gunicorn`` with gunicorn
  (2 workers, gthread). The breaker and tier timeouts are the extension's defaults
  unless :data:`TUNING` variables are set in the environment (they are passed on, and
  the schedule follows the reset timeout); no other ``SATCHEL_*`` variable reaches
  the app. A second, idle app process (the *cold reader*) starts too;
* ``--conversations`` client threads, each a keep-alive ``http.client`` connection
  (renewed every :data:`RECONNECT_EVERY` requests, so with gunicorn a conversation
  moves between workers as it would behind a load balancer) carrying its own
  ``Satchel-Context`` token, sending ``--requests`` chat turns: a quarter of them in
  the first seconds (so every conversation has overflowed before the first fault),
  the rest paced evenly over the schedule;
* the schedule (times from the start of the load; ``R`` is the breaker's reset
  timeout, ``SATCHEL_BREAKER_RESET_TIMEOUT``, default 2 s)::

      quick:  kill -9 @2.5s, restart @4.5s, SIGSTOP @2.5+R+2, SIGCONT 2 s later,
              end R+2 s after the SIGSTOP                           (10.5 s with R=2)
      full:   kill -9 @5s, restart @11s, SIGSTOP @max(11, 5+R)+4, SIGCONT 4 s later,
              blip (kill -9, restart 0.5 s later) at SIGSTOP+R+4, end R+4 s after
              the blip                                              (27 s with R=2)

  Faults are spaced R plus a margin apart, so the breaker has normally closed again
  before the next one (the recovery figures say whether it had).

After the load, every context is read back from the app (adopting the new tokens,
so turns held back by refused writes overflow) until no response is tier-flagged
(*settled*, bounded by R + 5 s); then once more from that app (*warm*: its in-process
segment cache may still hold segments the tier lost) and once from the cold reader
(*cold*: what the tier really holds). Both read-backs are accounted for.

Accounting (per conversation and read-back; ``sent`` = 2 turns per chat request
that returned 200, since only then did the client adopt the new token):

* ``present``: the turn is in ``all_turns`` (rehydrated overflow + inline), found by
  the marker the bench puts first in each message (the example's reply quotes it);
* ``in missing segments``: ``overflowed_turns - rehydrated_turns`` of the read-back,
  i.e. turns whose overflow segment is still referenced by the token but could not be
  read; counted only if the read-back response is flagged with a segment reason
  (``segment_missing`` / ``segment_corrupt`` / ``segment_foreign`` /
  ``tier_unavailable``), else they are *unreported*;
* ``data_loss``: ``lifecycle.lost`` (turns the hard cap forced out while the tier
  refused writes, and turns of segments the tier lost whose references were dropped);
  counted only if at least one response of that conversation was
  flagged ``data_loss``, else *unreported*;
* ``policy drops``: ``lifecycle.dropped`` of every policy other than ``data_loss`` (the
  same turns as ``lifecycle.lost``); overflowed turns are not dropped and are counted
  apart (``lifecycle.overflowed``). For example ``token_budget``. Counted, but
  such responses are *not* flagged degraded, so they are listed separately.

``unaccounted = sent - present - (in missing segments + data_loss + policy drops)``
must be 0 for every conversation (negative: more losses reported than happened).
Duplicated turns, turns out of order and turns of another conversation are errors too.
With the embedded server (one process, so one ``/metrics``), what the app counted
(``satchel_degraded_total`` by reason, ``satchel_data_loss_turns_total``) must equal
what the clients were told and what the contexts record.

Latency of ``POST /api/chat`` is split by the schedule and the degraded reasons: a
fault's *impaired window* runs from the fault until the last response flagged with a
tier reason (``tier_unavailable`` / ``tier_write_failed``) after Redis came back,
which is when the breaker (or every worker's breaker) has closed again. ``breaker
closed``: responses outside every impaired window and not tier-flagged; ``breaker
open``: tier-flagged responses inside an impaired window (the first few of a hang
pay the tier timeouts before the breaker opens: see the hang row's p99/max).
Recovery, per fault with a return: time from Redis answering again to the first
response with no degraded reason at all, to the last tier-flagged response, and
(after a restart) to the first segment written into the new Redis (``DBSIZE``); with
the embedded server also when ``satchel_breaker_state`` (sampled every 0.2 s) showed
the breaker open and closed again.

Exit status: 0 when there was no 5xx, no transport error, no unaccounted or
unreported turn, no duplicated/misordered turn and (embedded) the counters matched;
1 otherwise; 2 when the bench cannot run (no redis-server, no checkout with
examples/, a bad tuning variable).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import itertools
import json
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..flask_ext.config import SatchelConfig
from ._load import percentile as nearest_rank
from ._procs import (
    LOOPBACK,
    AppProcess,
    ProcError,
    RedisProcess,
    Workdir,
    require_modules,
    stop_on_sigterm,
)

#: soft byte budget of the token: small, so conversations overflow every few turns
MAX_TOKEN_BYTES = 1500
#: hard cap while the tier refuses writes: small, so a long outage ends in data_loss
HARD_MAX_TOKEN_BYTES = 4096
#: a fixed, public, bench-only key (never use it for anything else)
BENCH_KEYS = (
    "chaos:"
    + base64.urlsafe_b64encode(
        hashlib.sha256(b"satchel bench chaos: a public key, not a secret").digest()
    )
    .rstrip(b"=")
    .decode()
)
REQUEST_TIMEOUT = 10.0
#: each conversation opens a new keep-alive connection every this many requests, so
#: (with gunicorn) its requests spread over the workers, as behind a load balancer
RECONNECT_EVERY = 4
#: the load stops this long after the schedule's end whatever is left to send
LOAD_GRACE = 10.0

#: tier knobs taken from the environment (passed to the app, and the schedule follows
#: the breaker's reset timeout); unset, the extension's defaults apply
TUNING: dict[str, type] = {
    "SATCHEL_BREAKER_RESET_TIMEOUT": float,
    "SATCHEL_BREAKER_FAIL_MAX": int,
    "SATCHEL_TIER_READ_TIMEOUT": float,
    "SATCHEL_TIER_CONNECT_TIMEOUT": float,
}
#: the read-backs: the app that served the load ("warm": its in-process segment cache
#: may still hold segments the tier lost) and a fresh app process ("cold": what the
#: tier really holds)
READ_BACKS = ("warm", "cold")
TIER_REASONS = frozenset({"tier_unavailable", "tier_write_failed"})
SEGMENT_REASONS = frozenset(
    {"segment_missing", "segment_corrupt", "segment_foreign", "tier_unavailable"}
)
SAVE_TIME_REASONS = frozenset({"tier_write_failed", "data_loss"})
#: A turn's marker, as message_for writes it (zero-padded, wider past 999 conversations
#: or 9999 turns: a fixed width failed every conversation from the 1001st on).
MARKER = re.compile(r"\bc(\d{3,})t(\d{4,})\b")
#: pseudo-words of random syllables: about as compressible as chat text (~3x with the
#: dictionary), unlike a short word list, which zstd squeezes to almost nothing
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


# ---------------------------------------------------------------------- schedule


@dataclass(slots=True)
class Fault:
    """One injected failure: ``start`` (kill / SIGSTOP) and ``ret`` (Redis answers
    again), both seconds from the start of the load, as they actually happened."""

    label: str  # "kill", "hang", "blip"
    planned_start: float
    planned_return: float
    start: float = 0.0
    ret: float = 0.0


def build_schedule(quick: bool, reset: float) -> tuple[list[Fault], float]:
    """The faults and the load duration (seconds), from the breaker reset timeout."""
    if quick:
        kill, restart = 2.5, 4.5
        stop = kill + reset + 2.0
        faults = [Fault("kill", kill, restart), Fault("hang", stop, stop + 2.0)]
        return faults, stop + reset + 2.0
    kill, restart = 5.0, 11.0
    stop = max(restart, kill + reset) + 4.0
    blip = stop + reset + 4.0
    faults = [
        Fault("kill", kill, restart),
        Fault("hang", stop, stop + 4.0),
        Fault("blip", blip, blip + 0.5),
    ]
    return faults, blip + reset + 4.0


# ------------------------------------------------------------------------- load


@dataclass(slots=True)
class Sample:
    """One HTTP exchange as the client saw it (times in seconds from the load start)."""

    conv: int
    turn: int  # -1 for the read-back
    path: str
    t: float
    latency: float
    status: int  # 0: transport error, no response
    header: tuple[str, ...] = ()
    body: tuple[str, ...] | None = None
    error: str | None = None
    label: str = ""  # the read-back: "warm" or "cold"

    @property
    def reasons(self) -> frozenset[str]:
        return frozenset(self.header)


@dataclass
class Readback:
    status: int
    data: dict[str, Any] | None
    header: tuple[str, ...]


@dataclass
class ConvResult:
    conv: int
    requests_sent: int = 0
    ok: list[int] = field(default_factory=list)  # chat turn numbers answered 200
    reconnects: int = 0
    readbacks: dict[str, Readback] = field(default_factory=dict)  # "warm" / "cold"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def message_for(conv: int, turn: int, rng: random.Random) -> str:
    """A user message of 20-50 words, starting with the turn's marker (the example's
    reply quotes the first words, so both turns of the exchange carry it)."""
    words = " ".join(
        "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 4)))
        for _ in range(rng.randint(20, 50))
    )
    return f"c{conv:03d}t{turn:04d} {words}."


class Client:
    """One keep-alive HTTP/1.1 connection to the app (reconnects when needed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=REQUEST_TIMEOUT)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request; a connection the server closed while idle is replaced once."""
        for attempt in (0, 1):
            reused = self.conn is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt or not reused:
                    raise
                self.reconnects += 1
                continue
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, resp.headers, data
        raise AssertionError("unreachable")


class Load:
    """The conversations, the fault schedule and the samples they produce."""

    def __init__(
        self,
        *,
        port: int,
        conversations: int,
        requests: int,
        duration: float,
        warmup: float,
        t0: float,
        seed: int = 1,
    ) -> None:
        self.port = port
        self.conversations = conversations
        self.requests = requests
        self.duration = duration
        self.warmup = warmup
        self.t0 = t0
        self.seed = seed
        self.samples: list[Sample] = []
        self.results = [ConvResult(c) for c in range(conversations)]
        self._lock = threading.Lock()
        self._tokens: list[str | None] = [None] * conversations

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _record(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def _exchange(
        self,
        client: Client,
        conv: int,
        turn: int,
        method: str,
        path: str,
        body: Any,
        *,
        label: str = "",
    ) -> tuple[Sample, dict[str, Any] | None]:
        headers = {"Accept": "application/json"}
        token = self._tokens[conv]
        if token:
            headers["Satchel-Context"] = token
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        started = self.now()
        t = time.perf_counter()
        try:
            status, resp_headers, data = client.request(method, path, payload, headers)
        except (OSError, http.client.HTTPException) as exc:
            sample = Sample(
                conv,
                turn,
                path,
                started,
                time.perf_counter() - t,
                0,
                error=type(exc).__name__,
                label=label,
            )
            self._record(sample)
            return sample, None
        latency = time.perf_counter() - t
        parsed: dict[str, Any] | None = None
        body_reasons: tuple[str, ...] | None = None
        error = None
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            error = "response is not JSON"
        if isinstance(parsed, dict) and isinstance(parsed.get("degraded"), list):
            body_reasons = tuple(str(r) for r in parsed["degraded"])
        if status != 200:
            detail = parsed.get("error") if isinstance(parsed, dict) else None
            error = f"HTTP {status}: {json.dumps(detail)[:200] if detail else data[:200]!r}"
        new_token = resp_headers.get("Satchel-Context")
        if status == 200:
            if new_token:
                self._tokens[conv] = new_token
            elif method != "GET":
                # Reads (GET /api/context) issue no token; every chat turn must.
                error = "200 without a Satchel-Context token"
        sample = Sample(
            conv,
            turn,
            path,
            started,
            latency,
            status,
            _split(resp_headers.get("Satchel-Degraded")),
            body_reasons,
            error,
            label,
        )
        self._record(sample)
        return sample, parsed

    def due(self, conv: int, turn: int) -> float:
        """When a turn is sent: the first quarter of the turns over the first
        ``warmup`` seconds (so conversations have overflowed before the first fault),
        the rest evenly over the remaining schedule; conversations are staggered."""
        warm_turns = self.requests // 4
        stagger = conv / max(self.conversations, 1)
        if turn < warm_turns:
            return self.warmup * (turn + stagger) / warm_turns
        rest = self.requests - warm_turns
        span = max(self.duration - 0.5 - self.warmup, 0.5)
        return self.warmup + span * (turn - warm_turns + stagger) / rest

    def run_conversation(self, conv: int) -> None:
        rng = random.Random(self.seed * 1000 + conv)
        result = self.results[conv]
        client = Client(self.port)
        hard_stop = self.duration + LOAD_GRACE
        try:
            for turn in range(self.requests):
                due = self.due(conv, turn)
                wait = due - self.now()
                if wait > 0:
                    time.sleep(wait)
                if self.now() > hard_stop:
                    break
                if turn and turn % RECONNECT_EVERY == 0:
                    client.close()  # a new connection: with gunicorn, maybe another worker
                message = message_for(conv, turn, rng)
                sample, _ = self._exchange(
                    client, conv, turn, "POST", "/api/chat", {"message": message}
                )
                result.requests_sent += 1
                if sample.status == 200 and sample.error is None:
                    result.ok.append(turn)
        finally:
            result.reconnects = client.reconnects
            client.close()

    def read_back(self, conv: int, port: int, label: str) -> None:
        """``GET /api/context`` on the app at ``port`` (the client adopts the new token)."""
        client = Client(port)
        try:
            sample, parsed = self._exchange(
                client, conv, -1, "GET", "/api/context", None, label=label
            )
        finally:
            client.close()
        self.results[conv].readbacks[label] = Readback(
            sample.status, parsed if isinstance(parsed, dict) else None, sample.header
        )


def run_faults(redis: RedisProcess, faults: Sequence[Fault], load: Load) -> None:
    """Inject each fault at its planned time; record when it actually happened."""
    for fault in faults:
        wait = fault.planned_start - load.now()
        if wait > 0:
            time.sleep(wait)
        fault.start = load.now()
        if fault.label == "hang":
            redis.pause()
        else:
            redis.kill()
        wait = fault.planned_return - load.now()
        if wait > 0:
            time.sleep(wait)
        if fault.label == "hang":
            redis.resume()
        else:
            redis.start(same_port=True)
        fault.ret = load.now()


def settle(load: Load, port: int, until: float) -> float | None:
    """After the load: read every context back (adopting the tokens, so held-back
    turns overflow) until no response is tier-flagged, i.e. the breakers have closed.
    Returns when that happened (s from the load start), None at ``until``."""
    while True:
        first = len(load.samples)
        for c in range(load.conversations):
            load.read_back(c, port, "settle")
        if not any(s.reasons & TIER_REASONS for s in load.samples[first:]):
            return load.now()
        if load.now() >= until:
            return None
        time.sleep(0.25)


def sample_dbsize(redis: RedisProcess, load: Load, stop: threading.Event, out: list) -> None:
    """(t, DBSIZE or None) every 0.1 s: when the first segment lands in a new Redis."""
    while not stop.is_set():
        out.append((load.now(), redis.dbsize(timeout=0.2)))
        stop.wait(0.1)


_METRIC_LINE = re.compile(r"^(satchel_[a-z_]+)(?:\{([^}]*)\})? (\S+)$")


def scrape_metrics(port: int) -> dict[str, Any] | None:
    """The app's ``/metrics``: breaker state, degraded responses by reason, turns lost."""
    client = Client(port)
    try:
        status, _, data = client.request("GET", "/metrics", None, {})
    except (OSError, http.client.HTTPException):
        return None
    finally:
        client.close()
    if status != 200:
        return None
    out: dict[str, Any] = {"breaker_state": None, "degraded": {}, "data_loss_turns": 0.0}
    for line in data.decode("utf-8", "replace").splitlines():
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "satchel_breaker_state":
            out["breaker_state"] = value
        elif name == "satchel_degraded_total":
            reason = re.search(r'reason="([^"]*)"', labels)
            if reason and value:  # the series alerts watch exist from the start, at 0
                out["degraded"][reason.group(1)] = value
        elif name == "satchel_data_loss_turns_total":
            out["data_loss_turns"] = value
    return out


def sample_breaker(port: int, load: Load, stop: threading.Event, out: list) -> None:
    """(t, breaker state: 0 closed, 1 half-open, 2 open, None unknown) every 0.2 s."""
    while not stop.is_set():
        scraped = scrape_metrics(port)
        out.append((load.now(), scraped["breaker_state"] if scraped else None))
        stop.wait(0.2)


# --------------------------------------------------------------------- analysis


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank, as the compare harness computes it (round() here took the rank
    above whenever q/100 * n was odd: p99 of 100 samples was their maximum)."""
    if not values:
        return None
    return nearest_rank(sorted(values), q)


def latency_row(samples: Iterable[Sample]) -> dict[str, Any]:
    ms = [s.latency * 1000 for s in samples]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
        "mean_ms": statistics.fmean(ms) if ms else None,
    }


def impaired_windows(faults: Sequence[Fault], samples: Sequence[Sample], end: float) -> list:
    """(fault, start, end): from the fault to the last tier-flagged response after Redis
    came back (answered before the next fault). ``samples``: answered ones only."""
    windows = []
    for i, fault in enumerate(faults):
        limit = faults[i + 1].start if i + 1 < len(faults) else end + LOAD_GRACE
        tail = [
            s.t
            for s in samples
            if fault.ret <= s.t and s.t + s.latency < limit and s.reasons & TIER_REASONS
        ]
        windows.append((fault, fault.start, max([fault.ret, *tail])))
    return windows


def account(conv: int, result: ConvResult, samples: Sequence[Sample], label: str) -> dict[str, Any]:
    """Every turn the client sent: present in the ``label`` read-back, or accounted
    for (see the module doc)."""
    sent = len(result.ok) * 2
    out: dict[str, Any] = {
        "conversation": conv,
        "read_back": label,
        "segments": 0,
        "requests": result.requests_sent,
        "sent": sent,
        "present": 0,
        "missing": sent,
        "in_missing_segments": 0,
        "data_loss": 0,
        "policy_drops": {},
        "unaccounted": sent,
        "unreported": 0,
        "duplicates": 0,
        "out_of_order": 0,
        "foreign": 0,
        "readback_status": None,
        "readback_degraded": [],
        "problems": [],
    }
    rb = result.readbacks.get(label)
    if rb is None or rb.data is None or rb.status != 200:
        out["readback_status"] = rb.status if rb else None
        out["problems"].append(f"c{conv:03d} {label}: the context could not be read back")
        return out
    data = rb.data
    out["readback_status"] = rb.status
    out["segments"] = len(data.get("overflow") or [])
    out["readback_degraded"] = list(rb.header)
    expected = {("user", t) for t in result.ok} | {("assistant", t) for t in result.ok}
    seen: dict[tuple[str, int], int] = {}
    positions: list[int] = []
    for turn in data.get("all_turns", []):
        match = MARKER.search(str(turn.get("content", "")))
        if not match:
            continue
        if int(match.group(1)) != conv:
            out["foreign"] += 1
            continue
        key = (str(turn.get("role")), int(match.group(2)))
        if key in seen:
            out["duplicates"] += 1
            continue
        seen[key] = len(seen)
        if key in expected:
            positions.append(key[1] * 2 + (key[0] == "assistant"))
    out["out_of_order"] = sum(1 for a, b in itertools.pairwise(positions) if b <= a)
    present = len(expected & seen.keys())
    lifecycle = data.get("lifecycle") or {}
    dropped = dict(lifecycle.get("dropped") or {})
    lost = int(lifecycle.get("lost") or 0)
    gap = int(data.get("overflowed_turns") or 0) - int(data.get("rehydrated_turns") or 0)
    policy = {k: int(v) for k, v in dropped.items() if k not in ("data_loss", "overflow")}
    unreported = 0
    if gap and not set(rb.header) & SEGMENT_REASONS:
        unreported += gap
        out["problems"].append(
            f"c{conv:03d} {label}: {gap} overflowed turns not rehydrated and not flagged"
        )
    flagged_loss = any(
        "data_loss" in s.reasons for s in samples if s.conv == conv and s.status == 200
    )
    if lost and not flagged_loss:
        unreported += lost
        out["problems"].append(
            f"c{conv:03d} {label}: lifecycle.lost = {lost} but no response flagged data_loss"
        )
    if lost != int(dropped.get("data_loss", 0)):
        out["problems"].append(
            f"c{conv:03d} {label}: lifecycle.lost ({lost}) != lifecycle.dropped.data_loss "
            f"({dropped.get('data_loss')})"
        )
    accounted = gap + lost + sum(policy.values())
    out.update(
        present=present,
        missing=sent - present,
        in_missing_segments=gap,
        data_loss=lost,
        policy_drops=policy,
        unaccounted=sent - present - accounted,
        unreported=unreported,
    )
    if out["unaccounted"]:
        out["problems"].append(
            f"c{conv:03d} {label}: {out['unaccounted']} turns unaccounted (sent {sent}, "
            f"present {present}, accounted {accounted})"
        )
    for name in ("duplicates", "out_of_order", "foreign"):
        if out[name]:
            out["problems"].append(f"c{conv:03d} {label}: {out[name]} {name} turns")
    return out


def analyse(
    load: Load,
    faults: Sequence[Fault],
    dbsizes: Sequence[tuple[float, int | None]],
) -> dict[str, Any]:
    chats = [s for s in load.samples if s.path == "/api/chat"]
    answered = [s for s in load.samples if s.status]
    statuses = Counter(s.status for s in load.samples)
    by_reason = Counter(r for s in answered for r in dict.fromkeys(s.header))
    degraded = [s for s in answered if s.header]
    disagree = [s for s in answered if s.body is not None and set(s.body) != set(s.header)]
    save_only = [
        s
        for s in disagree
        if set(s.body or ()) <= set(s.header)
        and set(s.header) - set(s.body or ()) <= SAVE_TIME_REASONS
    ]
    requests = {
        "total": len(load.samples),
        "chat": len(chats),
        "readback": len(load.samples) - len(chats),
        "ok": statuses.get(200, 0),
        "4xx": sum(n for code, n in statuses.items() if 400 <= code < 500),
        "5xx": sum(n for code, n in statuses.items() if code >= 500),
        "transport_errors": statuses.get(0, 0),
        "other_errors": sum(1 for s in load.samples if s.status and s.error),
        "reconnects": sum(r.reconnects for r in load.results),
        "degraded": len(degraded),
        "degraded_by_reason": dict(by_reason.most_common()),
        "header_json_disagree": len(disagree),
        "header_json_disagree_save_time_only": len(save_only),
        "not_sent": sum(load.requests - r.requests_sent for r in load.results),
    }
    accounts = [
        account(r.conv, r, load.samples, label) for label in READ_BACKS for r in load.results
    ]
    turns = {}
    for label in READ_BACKS:
        mine = [a for a in accounts if a["read_back"] == label]
        totals: dict[str, Any] = {
            key: sum(a[key] for a in mine)
            for key in (
                "sent",
                "present",
                "missing",
                "in_missing_segments",
                "data_loss",
                "unaccounted",
                "unreported",
                "duplicates",
                "out_of_order",
                "foreign",
                "segments",
            )
        }
        policy: Counter[str] = Counter()
        for a in mine:
            policy.update(a["policy_drops"])
        totals["policy_drops"] = dict(policy)
        totals["conversations_degraded"] = sum(1 for a in mine if a["readback_degraded"])
        totals["readback_degraded_by_reason"] = dict(
            Counter(r for a in mine for r in a["readback_degraded"])
        )
        turns[label] = totals

    end = max((s.t for s in load.samples), default=0.0)
    # the app that served the load, until the read-backs: the chats, then the settling
    traffic = [
        s for s in load.samples if s.status and (s.path == "/api/chat" or s.label == "settle")
    ]
    windows = impaired_windows(faults, traffic, end)

    def inside(s: Sample) -> tuple[Fault, float, float] | None:
        for w in windows:
            if w[1] <= s.t <= w[2]:
                return w
        return None

    ok_chats = [s for s in chats if s.status]
    closed = [s for s in ok_chats if inside(s) is None and not s.reasons & TIER_REASONS]
    opened = [s for s in ok_chats if inside(s) is not None and s.reasons & TIER_REASONS]
    latency: dict[str, Any] = {
        "breaker_closed": latency_row(closed),
        "breaker_open": latency_row(opened),
    }
    for fault, start, stop in windows:
        within = [s for s in ok_chats if start <= s.t <= stop]
        latency[f"{fault.label}_window_all"] = latency_row(within)
        latency[f"{fault.label}_window_tier_flagged"] = latency_row(
            [s for s in within if s.reasons & TIER_REASONS]
        )
    recovery = []
    for i, (fault, _start, stop) in enumerate(windows):
        limit = faults[i + 1].start if i + 1 < len(faults) else end + 1
        after = sorted(
            (s for s in traffic if fault.ret <= s.t and s.t + s.latency < limit),
            key=lambda s: s.t,
        )
        first_clean = next((s.t for s in after if not s.header), None)
        tier_flagged_after = [s for s in after if s.reasons & TIER_REASONS]
        loss_after = [s for s in after if "data_loss" in s.reasons]
        first_write = None
        if fault.label != "hang":
            first_write = next(
                (t for t, n in dbsizes if fault.ret <= t < limit and n and n > 0), None
            )
        recovery.append(
            {
                "fault": fault.label,
                "injected_at_s": round(fault.start, 3),
                "redis_back_at_s": round(fault.ret, 3),
                "impaired_until_s": round(stop, 3),
                "first_clean_after_s": _delta(first_clean, fault.ret),
                "last_tier_flagged_after_s": _delta(
                    tier_flagged_after[-1].t if tier_flagged_after else None, fault.ret
                ),
                "tier_flagged_after_return": len(tier_flagged_after),
                "data_loss_responses_after_return": len(loss_after),
                "first_segment_written_after_s": _delta(first_write, fault.ret),
            }
        )
    passed = (
        requests["5xx"] == 0
        and requests["transport_errors"] == 0
        and requests["other_errors"] == 0
        and all(a["readback_status"] == 200 for a in accounts)
        and not any(
            a["unaccounted"] or a["unreported"] or a["duplicates"] or a["out_of_order"]
            for a in accounts
        )
        and not any(a["foreign"] for a in accounts)
    )
    return {
        "requests": requests,
        "turns": turns,
        "latency": latency,
        "recovery": recovery,
        "faults": [asdict(f) for f in faults],
        "conversations": accounts,
        "errors": sorted({f"{s.label or s.path}: {s.error}" for s in load.samples if s.error}),
        "samples": [sample_row(s) for s in sorted(load.samples, key=lambda s: s.t)],
        "passed": passed,
    }


def sample_row(s: Sample) -> list[Any]:
    """One sample in the JSON output: where, when (s), conversation, turn, latency (ms),
    status, degraded reasons from the header."""
    where = s.label or s.path
    return [where, round(s.t, 4), s.conv, s.turn, round(s.latency * 1000, 2), s.status,
            ",".join(s.header)]  # fmt: skip


def add_breaker_figures(
    report: dict[str, Any], faults: Sequence[Fault], samples: Sequence[tuple[float, Any]]
) -> None:
    """From the sampled ``satchel_breaker_state`` (embedded server only): when the
    breaker opened after each fault and closed after Redis came back."""
    if not samples:
        return
    for fault, row in zip(faults, report["recovery"], strict=True):
        opened = next((t for t, v in samples if t >= fault.start and v == 2), None)
        closed = None
        if opened is not None:
            closed = next((t for t, v in samples if t >= max(opened, fault.ret) and v == 0), None)
        row["breaker_opened_after_fault_s"] = _delta(opened, fault.start)
        row["breaker_closed_after_return_s"] = _delta(closed, fault.ret)


def add_counted(report: dict[str, Any], load: Load, counted: dict[str, Any] | None) -> None:
    """Compare what the app counted (``/metrics`` of the embedded server) with what the
    clients saw from it: degraded responses by reason, and turns lost."""
    if counted is None:
        report["counted"] = None
        return
    seen: Counter[str] = Counter()
    for s in load.samples:
        if s.status and s.label != "cold":
            seen.update(set(s.header))
    lost = sum(
        int(((r.readbacks.get("warm") or Readback(0, None, ())).data or {})
            .get("lifecycle", {}).get("lost", 0))
        for r in load.results
    )  # fmt: skip
    by_server = {k: int(v) for k, v in counted["degraded"].items()}
    match = by_server == dict(seen) and int(counted["data_loss_turns"]) == lost
    report["counted"] = {
        "degraded_by_server": by_server,
        "degraded_seen_by_clients": dict(seen),
        "data_loss_turns_by_server": int(counted["data_loss_turns"]),
        "data_loss_turns_in_contexts": lost,
        "match": match,
    }
    if not match:
        report["passed"] = False


def _delta(t: float | None, since: float) -> float | None:
    return None if t is None else round(t - since, 3)


# ----------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "never" if value is None else f"+{value:.2f}s"


def render(report: dict[str, Any]) -> str:
    env, req, turns = report["environment"], report["requests"], report["turns"]
    lines = [
        "Satchel chaos bench",
        f"  server      {env['server']}",
        f"  redis       {env['redis']} on {env['redis_url']} (no persistence)",
        f"  load        {env['conversations']} conversations x {env['requests']} turns, "
        f"{env['duration_s']:.1f} s schedule, budget {env['max_token_bytes']} B "
        f"(hard {env['hard_max_token_bytes']} B)",
        f"  breaker     fail_max {env['breaker_fail_max']}, reset {env['breaker_reset_s']:.1f} s; "
        f"tier timeouts read {env['tier_read_timeout_s'] * 1000:.0f} ms, connect "
        f"{env['tier_connect_timeout_s'] * 1000:.0f} ms "
        + (
            "(from the environment: " + ", ".join(env["tuning_from_env"]) + ")"
            if env.get("tuning_from_env")
            else "(extension defaults)"
        ),
        f"  machine     {env['nproc']} CPUs, {env['cpu']}, Python {env['python']}",
        "",
        "schedule (s from load start, actual)",
    ]
    for f in report["faults"]:
        how = "SIGSTOP/SIGCONT" if f["label"] == "hang" else "SIGKILL/restart"
        lines.append(f"  {f['label']:<6} {how:<16} at {f['start']:6.2f}  back at {f['ret']:6.2f}")
    lines += [
        "",
        "requests",
        f"  total {req['total']} (chat {req['chat']}, read-back {req['readback']})  "
        f"200 {req['ok']}  4xx {req['4xx']}  5xx {req['5xx']}  "
        f"transport errors {req['transport_errors']}  reconnects {req['reconnects']}",
        f"  not sent (ran out of time) {req['not_sent']}",
        f"  degraded {req['degraded']}",
    ]
    for reason, n in req["degraded_by_reason"].items():
        lines.append(f"    {reason:<20} {n}")
    lines.append(
        f"  header/JSON disagree {req['header_json_disagree']} "
        f"(save-time reasons only in the header: {req['header_json_disagree_save_time_only']})"
    )
    lines += ["", "turns (read back from the app that served the load, then from a fresh one)"]
    for label, t in turns.items():
        policy = ", ".join(f"{k} {v}" for k, v in t["policy_drops"].items()) or "0"
        flagged = ", ".join(f"{k} {v}" for k, v in t["readback_degraded_by_reason"].items())
        lines += [
            f"  {label}: sent {t['sent']}  present {t['present']}  missing {t['missing']}  "
            f"(segments referenced {t['segments']})",
            f"    accounted: in missing segments (flagged) {t['in_missing_segments']}, "
            f"data_loss (lifecycle.lost, flagged) {t['data_loss']}, "
            f"policy drops (not flagged) {policy}",
            f"    unaccounted {t['unaccounted']}  unreported {t['unreported']}  "
            f"duplicates {t['duplicates']}  out of order {t['out_of_order']}  "
            f"foreign {t['foreign']}",
            f"    conversations flagged at read-back {t['conversations_degraded']}"
            + (f" ({flagged})" if flagged else ""),
        ]
    lines += [
        "",
        "latency, POST /api/chat (ms)              n      p50      p99      max",
    ]
    labels = {
        "breaker_closed": "breaker closed (healthy)",
        "breaker_open": "breaker open (tier-flagged, impaired)",
    }
    for key, row in report["latency"].items():
        label = labels.get(key, key.replace("_window_", " window: ").replace("_", " "))
        lines.append(
            f"  {label:<38} {row['n']:>5} {_ms(row['p50_ms']):>8} {_ms(row['p99_ms']):>8} "
            f"{_ms(row['max_ms']):>8}"
        )
    settled = report.get("settled_at_s")
    lines += [
        "",
        "recovery (from Redis answering again; after the load, contexts are read back "
        "until no response is tier-flagged: "
        + ("never settled" if settled is None else f"settled at {settled:.2f} s")
        + ")",
    ]
    for r in report["recovery"]:
        lines.append(
            f"  {r['fault']:<6} first clean response {_s(r['first_clean_after_s'])}, "
            f"last tier-flagged {_s(r['last_tier_flagged_after_s'])} "
            f"({r['tier_flagged_after_return']} responses, "
            f"{r['data_loss_responses_after_return']} with data_loss)"
            + (
                f", first segment written {_s(r['first_segment_written_after_s'])}"
                if r["fault"] != "hang"
                else ""
            )
        )
        if "breaker_opened_after_fault_s" in r:
            lines.append(
                f"         breaker (/metrics): opened {_s(r['breaker_opened_after_fault_s'])} "
                f"after the fault, closed {_s(r['breaker_closed_after_return_s'])} after "
                "Redis was back"
            )
    counted = report.get("counted")
    if counted is not None:
        lines += [
            "",
            "counted by the app (/metrics) vs seen by the clients: "
            + ("match" if counted["match"] else "MISMATCH"),
            f"  degraded by reason: app {counted['degraded_by_server']}, "
            f"clients {counted['degraded_seen_by_clients']}",
            f"  turns lost: app {counted['data_loss_turns_by_server']}, "
            f"contexts {counted['data_loss_turns_in_contexts']}",
        ]
    problems = [p for a in report["conversations"] for p in a["problems"]]
    problems += report.get("errors", [])
    lines += ["", "problems" if problems else "problems: none"]
    lines += [f"  {p}" for p in problems[:20]]
    if len(problems) > 20:
        lines.append(f"  ... and {len(problems) - 20} more")
    lines += ["", "result: " + ("PASS" if report["passed"] else "FAIL")]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------- main


def tuning_from_env() -> dict[str, float | int]:
    """The tier knobs (:data:`TUNING`) set in this environment, parsed. Every other
    ``SATCHEL_*`` variable is ignored: the bench sets the app's configuration."""
    out: dict[str, float | int] = {}
    for name, kind in TUNING.items():
        value = os.environ.get(name, "").strip()
        if value:
            try:
                out[name] = kind(value)
            except ValueError:
                raise ProcError(f"{name}={value!r} is not a valid {kind.__name__}") from None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    conversations = int(getattr(args, "conversations", 8))
    requests = int(getattr(args, "requests", 40))
    if conversations < 1 or requests < 1:
        raise ProcError("--conversations and --requests must be at least 1")
    kind = getattr(args, "server", "embedded") or "embedded"
    require_modules("redis", extra="redis")  # the app's overflow tier
    knobs = tuning_from_env()
    # Checked as the app checks them, before anything starts: a negative or NaN
    # timeout was accepted here and refused by the app, whose traceback was relayed.
    settings = SatchelConfig.from_settings(knobs)
    reset, fail_max = settings.breaker_reset_timeout, settings.breaker_fail_max
    faults, duration = build_schedule(quick, reset)
    work = Workdir(keep=bool(os.environ.get("SATCHEL_CHAOS_KEEP")))
    try:
        redis = RedisProcess(work.path)  # ProcError without redis-server: no dir left
    except BaseException:
        work.close()
        raise
    apps: list[AppProcess] = []
    try:
        redis.start()
        env = {
            "SATCHEL_KEYS": BENCH_KEYS,
            "SATCHEL_OVERFLOW_URL": redis.url,
            "SATCHEL_MAX_TOKEN_BYTES": str(MAX_TOKEN_BYTES),
            "SATCHEL_HARD_MAX_TOKEN_BYTES": str(HARD_MAX_TOKEN_BYTES),
            **{k: str(v) for k, v in knobs.items()},
        }
        app = AppProcess(work.path, kind=kind, env=env)
        apps.append(app)
        app.start()
        # the cold reader idles until the read-back: it never holds a segment in cache
        cold = AppProcess(work.path, kind="embedded", env=env, name="cold")
        apps.append(cold)
        cold.start()
        print(
            f"satchel bench chaos: {app.describe()} on {app.url}, redis on {redis.url}; "
            f"{duration:.0f} s of load ...",
            file=sys.stderr,
            flush=True,
        )
        load = Load(
            port=app.port,
            conversations=conversations,
            requests=requests,
            duration=duration,
            warmup=0.8 * faults[0].planned_start,
            t0=time.monotonic(),
        )
        stop = threading.Event()
        dbsizes: list[tuple[float, int | None]] = []
        breaker: list[tuple[float, float | None]] = []
        samplers = [
            threading.Thread(target=sample_dbsize, args=(redis, load, stop, dbsizes), daemon=True)
        ]
        if kind == "embedded":  # one process: its /metrics is the whole app's
            samplers.append(
                threading.Thread(
                    target=sample_breaker, args=(app.port, load, stop, breaker), daemon=True
                )
            )
        threads = [
            threading.Thread(target=load.run_conversation, args=(c,), daemon=True)
            for c in range(conversations)
        ]
        for t in [*samplers, *threads]:
            t.start()
        try:
            run_faults(redis, faults, load)
        finally:
            for t in threads:
                t.join(timeout=max(0.0, duration + LOAD_GRACE + REQUEST_TIMEOUT - load.now()))
        if not redis.ping():
            raise ProcError("redis did not come back at the end of the schedule")
        settled = settle(load, app.port, load.now() + reset + 5.0)
        stop.set()
        for t in samplers:
            t.join(timeout=2)
        for c in range(conversations):
            load.read_back(c, app.port, "warm")
        counted = scrape_metrics(app.port) if kind == "embedded" else None
        for c in range(conversations):
            load.read_back(c, cold.port, "cold")
        report = analyse(load, faults, dbsizes)
        report["settled_at_s"] = None if settled is None else round(settled, 3)
        add_breaker_figures(report, faults, breaker)
        add_counted(report, load, counted)
        if not report["passed"]:
            print(f"--- app log ({app.log_path}) ---\n{_tail(app.log_path)}", file=sys.stderr)
        report["environment"] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "server": app.describe(),
            "redis": redis.version(),
            "redis_url": redis.url,
            "conversations": conversations,
            "requests": requests,
            "quick": quick,
            "duration_s": duration,
            "max_token_bytes": MAX_TOKEN_BYTES,
            "hard_max_token_bytes": HARD_MAX_TOKEN_BYTES,
            "breaker_fail_max": fail_max,
            "breaker_reset_s": reset,
            "tier_read_timeout_s": settings.tier_read_timeout,
            "tier_connect_timeout_s": settings.tier_connect_timeout,
            "tuning_from_env": {k: str(v) for k, v in knobs.items()},
            "nproc": len(os.sched_getaffinity(0)),
            "cpu": cpu_model(),
            "python": platform.python_version(),
        }
        return report
    finally:
        for proc in apps:
            proc.close()
        redis.close()
        work.close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode("utf-8", "replace")
    except OSError:
        return ""


def main(args: argparse.Namespace) -> int:
    json_out = getattr(args, "json_out", None)
    try:
        with stop_on_sigterm():
            report = run(args)
    except ProcError as exc:
        print(f"satchel bench chaos: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    if json_out:
        from ..cli import write_output_file

        write_output_file(json_out, json.dumps(report, indent=2, sort_keys=True) + "\n", "--json")
    return 0 if report["passed"] else 1


__all__ = ["build_schedule", "main", "run"]
