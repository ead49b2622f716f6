"""The load generator behind ``satchel compare``: a separate process, driven over pipes.

``python -m satchel.bench._load --port PORT`` reads one JSON command per line on stdin
and answers each with one JSON line on stdout. Every command is bounded in count and
in time (``deadline`` seconds); requests go to 127.0.0.1 only.

Commands (``group`` names a set of conversations kept in this process):

``{"cmd": "build", "group": g, "count": n, "turns": t, "threads": k, "deadline": s}``
    start ``n`` conversations and chat with each until it holds ``t`` turns (every
    request adds the user's message and the reply: two turns).
``{"cmd": "measure", "group": g, "per_conv": r, "threads": k, "slice": [i, n], ...}``
    send ``r`` more messages to every conversation of ``g`` (or of its ``i``-th of
    ``n`` slices); the ``k`` threads each own a share of the conversations and take
    turns between them, so the server sees many interleaved conversations. Returns
    throughput, latency percentiles, bytes on the wire (request and response, headers
    and body, as counted on the socket), status codes and the server's own
    ``Server-Timing`` figures, and keeps the samples for ``summary``.
``{"cmd": "summary", "group": g}``
    the same figures over every sample ``measure`` took for ``g`` so far (the harness
    measures slices of several modes in turn, so background noise hits all alike).
``{"cmd": "timed", "group": g, "duration": d, "threads": k, "bucket": 0.25, "restart_at": n}``
    like ``measure`` but for ``d`` seconds, with a per-bucket timeline (requests,
    errors, latency) against ``time.monotonic()`` (system-wide on Linux, so the
    harness can line its own events up with it). ``restart_at`` (optional): a
    conversation holding that many turns starts over, with no token.
``{"cmd": "quit"}``

Each conversation is a thread's own: one ``http.client`` connection per thread, kept
alive when the server allows it (gunicorn's sync workers close it after each
response, so each request also pays a loopback connect).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
PATH = "/api/chat"
HEADER = "Satchel-Context"
REQUEST_TIMEOUT = 10.0

_WORDS = (
    "the a my our this that some any every each one two three few many more less "
    "time day week plan idea garden kitchen recipe sauce bread oven train ticket city "
    "trip budget report meeting project deadline team client email letter phone "
    "battery screen laptop printer network router password account invoice payment "
    "tax refund policy contract lease landlord neighbour dog cat walk run bike route "
    "map weather rain snow coat shoes gift birthday party music song guitar lesson "
    "book chapter story essay grammar word sentence french spanish german exam class "
    "teacher student homework question answer problem error bug test server database "
    "query index cache memory disk backup file folder photo camera light lamp room "
    "paint wall floor door window chair table desk shelf box bag car insurance repair "
    "engine tire brake fuel cost price offer discount store market shop order delivery "
    "how why when where what which should could would can will must might need want "
    "try make take give find keep start stop change fix check compare explain choose "
    "quickly slowly carefully today tomorrow yesterday later again still already only "
    "really quite very just also maybe probably cheap expensive simple hard easy "
    "better worse best worst new old small large fresh dry warm cold early late"
).split()


def message(conv: int, n: int) -> str:
    """A deterministic user message of two to four sentences (60-330 characters, mostly
    100-300)."""
    rng = random.Random(conv * 1_000_003 + n)
    sentences = []
    for _ in range(rng.randint(2, 4)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 13))]
        sentences.append(" ".join(words).capitalize() + rng.choice((".", "?", ".", "!")))
    return " ".join(sentences)


# ----------------------------------------------------------------------- counting I/O


class _CountingReader:
    """Wraps the response's socket file and counts every byte read from it."""

    def __init__(self, fp: Any) -> None:
        self.fp = fp
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        data = self.fp.read() if n is None or n < 0 else self.fp.read(n)
        self.count += len(data)
        return data

    def read1(self, n: int = -1) -> bytes:
        data = self.fp.read1(n)
        self.count += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self.fp.readline(limit)
        self.count += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        n = self.fp.readinto(buf) or 0
        self.count += n
        return n

    def close(self) -> None:
        self.fp.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)


class _CountingResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.counter = _CountingReader(self.fp)
        self.fp = self.counter  # type: ignore[assignment]  # counts, then reads through


class CountingConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection that counts the bytes it sends (headers and body)."""

    response_class = _CountingResponse

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT) -> None:
        super().__init__(HOST, port, timeout=timeout)
        self.sent = 0

    def send(self, data: Any) -> None:
        self.sent += len(data)
        super().send(data)


# ------------------------------------------------------------------------ conversations


@dataclass(slots=True)
class Conversation:
    id: int
    token: str | None = None
    turns: int = 0
    sent: int = 0


@dataclass(slots=True)
class Sample:
    start: float  # time.monotonic()
    latency: float  # seconds
    status: int  # 0: no HTTP answer (timeout, refused, reset)
    kind: str = ""  # for errors: "503 tier_unavailable", "timeout", ...
    req_bytes: int = 0
    resp_bytes: int = 0
    token_bytes: int = 0  # the Satchel-Context value sent
    turns: int = 0  # context size (turns) the request carried
    reset: bool = False  # Satchel-Reset: the server started the context over
    degraded: bool = False  # Satchel-Degraded was set
    timing: dict[str, float] = field(default_factory=dict)


def parse_server_timing(value: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";")
        if name and rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                continue
    return out


def chat(conn: CountingConnection, conv: Conversation) -> Sample:
    """Send the next message of ``conv`` and adopt the token that comes back."""
    body = json.dumps({"message": message(conv.id, conv.sent)}).encode()
    headers = {"Content-Type": "application/json"}
    if conv.token:
        headers[HEADER] = conv.token
    conn.sent = 0
    start = time.monotonic()
    t0 = time.perf_counter()
    try:
        conn.request("POST", PATH, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except TimeoutError:
        conn.close()
        return Sample(start, time.perf_counter() - t0, 0, "timeout", conn.sent)
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return Sample(start, time.perf_counter() - t0, 0, type(exc).__name__, conn.sent)
    latency = time.perf_counter() - t0
    sample = Sample(
        start,
        latency,
        resp.status,
        req_bytes=conn.sent,
        resp_bytes=resp.counter.count,  # type: ignore[attr-defined]
        token_bytes=len(conv.token or ""),
        turns=conv.turns,
        timing=parse_server_timing(resp.getheader("Server-Timing")),
    )
    if resp.status == 200:
        conv.sent += 1
        sample.reset = resp.getheader("Satchel-Reset") is not None
        sample.degraded = resp.getheader("Satchel-Degraded") is not None
        conv.turns = 2 if sample.reset else conv.turns + 2
        conv.token = resp.getheader(HEADER) or conv.token
    else:
        code = ""
        try:
            code = json.loads(data)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "non-json"
        sample.kind = f"{resp.status} {code}"
    return sample


# ----------------------------------------------------------------------------- driver


class Driver:
    def __init__(self, port: int) -> None:
        self.port = port
        self.groups: dict[str, list[Conversation]] = {}
        self.taken: dict[str, tuple[list[Sample], float]] = {}
        self._next_id = 0

    def new_group(self, name: str, count: int) -> list[Conversation]:
        convs = [Conversation(self._next_id + i) for i in range(count)]
        self._next_id += count
        self.groups[name] = convs
        return convs

    def _run(
        self,
        threads: int,
        shares: list[list[Conversation]],
        work: Callable[[CountingConnection, list[Conversation], Callable[[], bool]], list],
        deadline: float,
    ) -> tuple[list[Sample], float]:
        stop_at = time.monotonic() + deadline
        results: list[list[Sample]] = [[] for _ in shares]

        def expired() -> bool:
            return time.monotonic() >= stop_at

        def worker(i: int) -> None:
            conn = CountingConnection(self.port)
            try:
                results[i] = work(conn, shares[i], expired)
            finally:
                conn.close()

        pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join(deadline + REQUEST_TIMEOUT + 5)
        elapsed = time.perf_counter() - t0
        return [s for rs in results for s in rs], elapsed

    @staticmethod
    def _shares(convs: list[Conversation], threads: int) -> list[list[Conversation]]:
        threads = max(1, min(threads, len(convs) or 1))
        return [convs[i::threads] for i in range(threads)]

    def build(self, group: str, count: int, turns: int, threads: int, deadline: float) -> dict:
        convs = self.new_group(group, count)
        shares = self._shares(convs, threads)
        rounds = max(0, math.ceil(turns / 2))

        def work(conn: CountingConnection, mine: list[Conversation], expired: Callable) -> list:
            out: list[Any] = []
            for conv in mine:
                for _ in range(rounds):
                    if expired():
                        return out
                    sample = chat(conn, conv)
                    out.append(sample)
                    if sample.status != 200:
                        break
            return out

        samples, elapsed = self._run(len(shares), shares, work, deadline)
        built = [c for c in convs if c.turns >= turns]
        return {
            "group": group,
            "conversations": len(convs),
            "complete": len(built),
            "turns_mean": sum(c.turns for c in convs) / max(1, len(convs)),
            "token_bytes_mean": sum(len(c.token or "") for c in convs) / max(1, len(convs)),
            "elapsed": elapsed,
            **summarize(samples, elapsed),
        }

    def measure(
        self,
        group: str,
        per_conv: int,
        threads: int,
        deadline: float,
        part: tuple[int, int] = (0, 1),
    ) -> dict:
        index, parts = part
        shares = self._shares(self.groups[group][index::parts], threads)

        def work(conn: CountingConnection, mine: list[Conversation], expired: Callable) -> list:
            out: list[Any] = []
            for _ in range(per_conv):
                for conv in mine:
                    if expired():
                        return out
                    out.append(chat(conn, conv))
            return out

        samples, elapsed = self._run(len(shares), shares, work, deadline)
        kept, spent = self.taken.get(group, ([], 0.0))
        self.taken[group] = (kept + samples, spent + elapsed)
        return {"group": group, "threads": len(shares), **summarize(samples, elapsed)}

    def tokens(self, group: str, limit: int) -> dict:
        """Up to ``limit`` tokens the group's conversations hold now (for codec costs)."""
        held = [conv.token for conv in self.groups.get(group, []) if conv.token]
        return {"group": group, "tokens": held[: max(0, limit)]}

    def summary(self, group: str) -> dict:
        samples, elapsed = self.taken.get(group, ([], 0.0))
        return {"group": group, **summarize(samples, elapsed)}

    def timed(
        self,
        group: str,
        duration: float,
        threads: int,
        bucket: float,
        restart_at: int | None = None,
    ) -> dict:
        """Send to ``group``'s conversations in turn for ``duration`` seconds.

        ``restart_at``: a conversation that holds this many turns starts over (a new
        one, no token), so however fast the machine, none outgrows the app's window or
        budget during the phase.
        """
        shares = self._shares(self.groups[group], threads)
        t0 = time.monotonic()

        def work(conn: CountingConnection, mine: list[Conversation], expired: Callable) -> list:
            out: list[Any] = []
            while mine:
                for conv in mine:
                    if expired():
                        return out
                    if restart_at is not None and conv.turns >= restart_at:
                        conv.token, conv.turns = None, 0
                    out.append(chat(conn, conv))
            return out

        samples, elapsed = self._run(len(shares), shares, work, duration)
        return {
            "group": group,
            "threads": len(shares),
            "t0": t0,
            "bucket": bucket,
            "timeline": timeline(samples, t0, bucket),
            **summarize(samples, elapsed),
        }


# ---------------------------------------------------------------------------- figures


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(samples: list[Sample], elapsed: float) -> dict[str, Any]:
    answered = [s for s in samples if s.status]
    ok = [s for s in samples if s.status == 200]
    lat = sorted(s.latency * 1000 for s in answered)
    statuses = Counter(str(s.status) if s.status else s.kind for s in samples)
    errors = Counter(s.kind for s in samples if s.status != 200)
    timing_names = sorted({name for s in ok for name in s.timing})
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_rate": (len(samples) - len(ok)) / len(samples) if samples else 0.0,
        "statuses": dict(statuses),
        "error_kinds": dict(errors),
        "server_errors": sum(1 for s in samples if s.status >= 500),
        "no_answer": sum(1 for s in samples if not s.status),
        "resets": sum(1 for s in ok if s.reset),
        "degraded": sum(1 for s in ok if s.degraded),
        "rps": len(answered) / elapsed if elapsed > 0 else 0.0,
        "elapsed": elapsed,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "mean_ms": _mean(lat),
        "max_ms": lat[-1] if lat else float("nan"),
        "req_bytes": _mean([s.req_bytes for s in ok]),
        "resp_bytes": _mean([s.resp_bytes for s in ok]),
        "token_bytes": _mean([s.token_bytes for s in ok]),
        "turns_mean": _mean([s.turns for s in ok]),
        "turns_min": min((s.turns for s in ok), default=0),
        "turns_max": max((s.turns for s in ok), default=0),
        "server_timing_ms": {
            name: _mean([s.timing[name] for s in ok if name in s.timing]) for name in timing_names
        },
    }


def timeline(samples: list[Sample], t0: float, bucket: float) -> list[dict[str, Any]]:
    """Per-bucket requests, errors and latency, by when each request was sent."""
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        buckets.setdefault(int((s.start - t0) // bucket), []).append(s)
    out = []
    for i in range(max(buckets, default=-1) + 1):
        items = buckets.get(i, [])
        lat = sorted(s.latency * 1000 for s in items)
        out.append(
            {
                "t": round(i * bucket, 3),
                "requests": len(items),
                "errors": sum(1 for s in items if s.status != 200),
                "resets": sum(1 for s in items if s.status == 200 and s.reset),
                "degraded": sum(1 for s in items if s.status == 200 and s.degraded),
                "p50_ms": percentile(lat, 50),
                "p95_ms": percentile(lat, 95),
                "max_ms": lat[-1] if lat else float("nan"),
                "statuses": dict(Counter(str(s.status) if s.status else s.kind for s in items)),
            }
        )
    return out


# ------------------------------------------------------------------------------- main


def handle(driver: Driver, cmd: dict[str, Any]) -> dict[str, Any]:
    name = cmd.get("cmd")
    threads = int(cmd.get("threads", 1))
    deadline = float(cmd.get("deadline", 60))
    if name == "build":
        return driver.build(cmd["group"], int(cmd["count"]), int(cmd["turns"]), threads, deadline)
    if name == "measure":
        index, parts = cmd.get("slice", (0, 1))
        return driver.measure(
            cmd["group"], int(cmd["per_conv"]), threads, deadline, (int(index), int(parts))
        )
    if name == "summary":
        return driver.summary(cmd["group"])
    if name == "tokens":
        return driver.tokens(cmd["group"], int(cmd.get("limit", 10)))
    if name == "timed":
        restart_at = cmd.get("restart_at")
        return driver.timed(
            cmd["group"],
            float(cmd["duration"]),
            threads,
            float(cmd.get("bucket", 0.25)),
            int(restart_at) if restart_at is not None else None,
        )
    raise ValueError(f"unknown command {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the app's port on 127.0.0.1")
    args = parser.parse_args(argv)
    driver = Driver(args.port)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            result = handle(driver, cmd)
        except Exception as exc:  # report, keep serving: the harness decides
            result = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
