"""``satchel bench codec``: seal and open, side by side with Flask and the raw floor.

For contexts of 4, 20, 50 and 200 turns of held-out English chat text (conversations
the dictionary was not trained on), one run measures:

* Satchel ``Codec.seal`` / ``Codec.open``, signed and sealed;
* Flask's default session serializer (itsdangerous URLSafeTimedSerializer with
  Flask's tagged JSON, as ``SecureCookieSessionInterface`` builds it) on the same data;
* the primitive floor: msgpack + zstd (same dictionary and level) + HMAC-SHA256 +
  base64url chained by hand on the very map Satchel packs for the context, with no
  framework around them.

The three are measured interleaved, round by round, and medians are reported, so a
noisy neighbour hurts all of them alike. Targets (issue 2) are checked and printed.
"""

from __future__ import annotations

import argparse
import binascii
import gc
import hmac
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import msgpack
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import schema
from ..codec import Codec
from ..compress import Compressor
from ..context import ROLES, Context, check_text
from ..errors import BudgetExceeded, ConfigurationError, ContextNotSerializable, InvalidText
from ..keys import Keyring
from ..protect import keyed_hmac

SIZES = (4, 20, 50, 200)
SIZE_SAMPLES = 100
TARGET_FLOOR_RATIO = 1.3
TARGET_FLASK_SPEEDUP = 2.5
TARGET_BYTES = {4: 0.6, 20: 0.8}
#: The held-out conversations an installed satchel carries (see load_conversations).
PACKAGED_SAMPLE = "heldout_sample.jsonl"


def load_conversations(path: str | None = None) -> tuple[list[list[dict[str, str]]], str]:
    """Held-out conversations: ``path`` when given; else the repository's held-out
    corpus (``tools/corpus/heldout*.jsonl``, looked up from the working directory,
    then from this source checkout); else the sample packaged with satchel."""
    if path:
        candidates = [Path(path)]
    else:
        candidates = [
            root / "tools" / "corpus" / name
            for root in corpus_roots()
            for name in ("heldout_handwritten.jsonl", "heldout.jsonl")
        ]
    if path and not Path(path).is_file():
        raise ConfigurationError(f"--corpus {path}: no such file")
    convs: list[list[dict[str, str]]] = []
    used: list[str] = []
    for candidate in candidates:
        if candidate.is_file():
            if not path and any(Path(u).name == candidate.name for u in used):
                continue  # the working directory is the checkout: one copy is enough
            convs.extend(_read_corpus(candidate))
            used.append(_shown(candidate))
    if path and not convs:
        raise ConfigurationError(f"--corpus {path}: no conversation with turns in it")
    if not convs:
        # An installed satchel has no tools/: it carries the hand-written held-out
        # conversations and the first 24 generated ones (none seen in training), so
        # that `satchel bench codec` means the same thing outside the repository.
        text = resources.files("satchel.bench").joinpath(PACKAGED_SAMPLE).read_text("utf-8")
        convs = [json.loads(line)["turns"] for line in text.splitlines() if line.strip()]
        used.append(f"packaged {PACKAGED_SAMPLE} ({len(convs)} conversations)")
    return convs, ", ".join(used)


def _read_corpus(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL corpus (``{"turns": [{"role", "content"}...]}`` per
    line); ConfigurationError naming the line that is not one. Empty ones are skipped:
    sizes are built by joining conversations, which empty ones never grow."""
    out: list[list[dict[str, str]]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--corpus {path}: cannot be read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
            if not isinstance(turns, list):
                raise TypeError
            for turn in turns:
                if not (isinstance(turn["role"], str) and isinstance(turn["content"], str)):
                    raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(
                f'--corpus {path}, line {number}: not {{"turns": [{{"role": ..., '
                '"content": ...}, ...]}'
            ) from None
        # Other tools' exports say "model", "human", "bot": named here, not a traceback.
        unknown = sorted({t["role"] for t in turns} - set(ROLES))
        if unknown:
            raise ConfigurationError(
                f"--corpus {path}, line {number}: role {unknown[0]!r} is not one of "
                f"{', '.join(ROLES)} (rename it in the corpus)"
            )
        # JSON may escape half a surrogate pair ("\\ud800"): json.loads takes it, and
        # add_turn then refused it with a traceback, mid-run.
        try:
            for turn in turns:
                check_text(turn["content"], "turn content")
        except InvalidText as exc:
            raise ConfigurationError(f"--corpus {path}, line {number}: {exc.message}") from None
        if turns:
            out.append(turns)
    return out


def corpus_roots() -> list[Path]:
    """Where a repository checkout may be: the working directory, then the checkout
    this module runs from (an editable install)."""
    return [Path.cwd(), Path(__file__).resolve().parents[3]]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def conversation_of(convs: list[list[dict[str, str]]], turns: int, offset: int = 0) -> list[dict]:
    """``turns`` consecutive turns, joining held-out conversations as needed."""
    out: list[dict[str, str]] = []
    i = offset
    while len(out) < turns:
        out.extend(convs[i % len(convs)])
        i += 1
    return out[:turns]


def build_context(turns: list[dict[str, str]], now: int) -> Context:
    ctx = Context.new(now=now)
    for i, t in enumerate(turns):
        ctx.add_turn(t["role"], t["content"], ts=now - (len(turns) - i) * 30)  # type: ignore[arg-type]
    return ctx


def as_in_a_conversation(ctx: Context, codec: Codec) -> Context:
    """``ctx`` sealed once, as a request's context is (opened from the token before):
    it carries the parent digest every later seal, and the floor's map, carry too. The
    first seal of a fresh context has none, so measured first it made one codec's
    token 24 characters shorter than the others'."""
    codec.seal(ctx)
    return ctx


def as_plain(turns: list[dict[str, str]], now: int) -> dict[str, Any]:
    """The same conversation as a developer would put it in a Flask session."""
    return {
        "turns": [
            {"role": t["role"], "content": t["content"], "ts": now - (len(turns) - i) * 30}
            for i, t in enumerate(turns)
        ],
        "summary": "",
    }


class Floor:
    """msgpack + zstd + HMAC + base64 by hand, on the very map Satchel packs
    (:func:`wire_of`): what no framework around the same primitives can beat.

    The same bytes go through the same primitives as in Satchel's signed token, each
    called the fastest way (``binascii``, as the envelope does), with nothing around
    them: no envelope, no header fields, no checks, no Context built or read. A plain
    dict per turn (:func:`as_plain`) packs more bytes and unpacks about twice as
    slowly as Satchel's arrays, and made this floor heavier than Satchel's own work.
    """

    def __init__(self, key: bytes, compressor: Compressor) -> None:
        self.key = key
        self.mac = keyed_hmac(key)  # keyed once, copied per message, as Satchel's signer
        self.cctx = compressor._compressor()  # same dictionary, level and frame format
        self.dctx = compressor._decompressor(compressor.dictionary_id)

    def seal(self, obj: Any) -> str:
        data = self.cctx.compress(msgpack.packb(obj))
        mac = self.mac.copy()
        mac.update(data)
        return _b64url(data + mac.digest())

    def open(self, token: str) -> Any:
        raw = _unb64url(token)
        data, tag = raw[:-32], raw[-32:]
        mac = self.mac.copy()
        mac.update(data)
        if not hmac.compare_digest(tag, mac.digest()):
            raise ValueError("bad mac")
        return msgpack.unpackb(self.dctx.decompress(data))


class SealedFloor(Floor):
    """:class:`Floor` with AES-256-GCM (random 96-bit nonce) in place of the HMAC: the
    floor of Satchel's default, sealed, token."""

    def __init__(self, key: bytes, compressor: Compressor) -> None:
        super().__init__(key, compressor)
        self.aead = AESGCM(key[:32])

    def seal(self, obj: Any) -> str:
        data = self.cctx.compress(msgpack.packb(obj))
        nonce = os.urandom(12)
        return _b64url(nonce + self.aead.encrypt(nonce, data, None))

    def open(self, token: str) -> Any:
        raw = _unb64url(token)
        data = self.aead.decrypt(raw[:12], raw[12:], None)
        return msgpack.unpackb(self.dctx.decompress(data))


def _b64url(raw: bytes) -> str:
    # replace, not translate: it jumps (memchr) to the few "+" and "/", as the envelope does
    return binascii.b2a_base64(raw, newline=False).replace(b"+", b"-").replace(b"/", b"_").decode()


def _unb64url(token: str) -> bytes:
    text = token.encode()
    standard = text.replace(b"-", b"+").replace(b"_", b"/")
    return binascii.a2b_base64(standard + b"=" * (-len(text) % 4))


def wire_of(ctx: Context) -> dict[str, Any]:
    """The map Satchel packs for ``ctx`` (schema version, ids, times, turns as arrays)."""
    return schema.to_wire(ctx, next_seq=True)


def flask_serializer() -> Any:
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    app = Flask("bench")
    app.secret_key = "bench-secret-key-bench-secret-key"
    return SecureCookieSessionInterface().get_signing_serializer(app)


def per_op(fn: Callable[[], Any], number: int) -> float:
    """Seconds per call of ``fn``, with the garbage collector off while it runs, as
    ``timeit`` does: a collection's cost is set by every object the process holds (the
    corpus above all), not by the operation, and lands on whichever case runs when it
    triggers. Measured with it on, one case of one size read half as slow again in
    some runs and not in others (signed open at 20 turns: 97 us, alone 61 us)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if was_enabled:
            gc.enable()


def measure(cases: dict[str, Callable[[], Any]], rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each case, interleaved round by round."""
    numbers = {}
    for name, fn in cases.items():  # calibrate: aim for budget_s per case per round
        one = per_op(fn, 3)
        numbers[name] = max(1, int(budget_s / max(one, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(per_op(fn, numbers[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def run(
    sizes: tuple[int, ...],
    rounds: int,
    budget_s: float,
    corpus: str | None,
    dictionary_id: int | None = None,
) -> dict:
    convs, source = load_conversations(corpus)
    corpus_turns = sum(len(c) for c in convs)
    now = int(time.time())
    keyring = Keyring.generate("bench")
    signed = Codec(keyring, mode="signed", dictionary_id=dictionary_id)
    sealed = Codec(keyring, mode="sealed", dictionary_id=dictionary_id)
    floor = Floor(keyring.derive("bench", "floor", "mac"), signed.compressor)
    flask_s = flask_serializer()
    rows = []
    for n in sizes:
        turns = conversation_of(convs, n)
        ctx = as_in_a_conversation(build_context(turns, now), signed)
        plain = as_plain(turns, now)
        wire = wire_of(ctx)
        tok_signed = signed.seal(ctx)
        tok_sealed = sealed.seal(ctx)
        tok_floor = floor.seal(wire)
        tok_flask = flask_s.dumps(plain)
        assert signed.open(tok_signed).turns[-1].content == turns[-1]["content"]
        assert flask_s.loads(tok_flask)["turns"][-1]["content"] == turns[-1]["content"]
        timings = measure(
            {
                # partial, not lambdas: every case pays the same (C-level) call wrapper
                "signed_seal": partial(signed.seal, ctx),
                "signed_open": partial(signed.open, tok_signed),
                "sealed_seal": partial(sealed.seal, ctx),
                "sealed_open": partial(sealed.open, tok_sealed),
                "floor_seal": partial(floor.seal, wire),
                "floor_open": partial(floor.open, tok_floor),
                "flask_seal": partial(flask_s.dumps, plain),
                "flask_open": partial(flask_s.loads, tok_flask),
            },
            rounds,
            budget_s,
        )
        us = {k: v * 1e6 for k, v in timings.items()}
        signed_rt = us["signed_seal"] + us["signed_open"]
        sealed_rt = us["sealed_seal"] + us["sealed_open"]
        floor_rt = us["floor_seal"] + us["floor_open"]
        flask_rt = us["flask_seal"] + us["flask_open"]
        text_bytes = sum(len(t["content"].encode()) for t in turns)
        lengths = mean_sizes(convs, n, now, signed, sealed, floor, flask_s)
        rows.append(
            {
                "turns": n,
                # More turns than the corpus holds: its contexts repeat it, and zstd's
                # window finds the repeats (zlib's 32 KB one does not), so the sizes
                # flatter Satchel (a 16-conversation corpus read 0.38x at 200 turns).
                "repeats": n > corpus_turns,
                "text_bytes": text_bytes,
                "us": us,
                "signed_roundtrip_us": signed_rt,
                "sealed_roundtrip_us": sealed_rt,
                "floor_roundtrip_us": floor_rt,
                "flask_roundtrip_us": flask_rt,
                "signed_vs_floor": signed_rt / floor_rt,
                "flask_vs_signed": flask_rt / signed_rt,
                "flask_vs_sealed": flask_rt / sealed_rt,
                "bytes": lengths,
                "sealed_vs_flask_bytes": lengths["sealed"] / lengths["flask"],
                "signed_vs_flask_bytes": lengths["signed"] / lengths["flask"],
            }
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_facts(),
        "corpus": source,
        "dictionary_id": signed.compressor.dictionary_id,
        "rounds": rounds,
        "rows": rows,
    }


def mean_sizes(
    convs: list[list[dict[str, str]]],
    turns: int,
    now: int,
    signed: Codec,
    sealed: Codec,
    floor: Floor,
    flask_s: Any,
    samples: int = SIZE_SAMPLES,
) -> dict[str, float]:
    """Mean token length over up to ``samples`` contexts starting at different held-out
    conversations: one context says little about a dictionary."""
    totals = {"signed": 0, "sealed": 0, "floor": 0, "flask": 0, "text": 0, "contexts": 0}
    for offset in range(min(samples, len(convs))):
        turns_ = conversation_of(convs, turns, offset)
        ctx = as_in_a_conversation(build_context(turns_, now), signed)
        plain = as_plain(turns_, now)
        totals["signed"] += len(signed.seal(ctx))
        totals["sealed"] += len(sealed.seal(ctx))
        totals["floor"] += len(floor.seal(wire_of(ctx)))
        totals["flask"] += len(flask_s.dumps(plain))
        totals["text"] += text_only_length(turns_, sealed)
        totals["contexts"] += 1
    count = totals.pop("contexts")
    return {**{k: v / count for k, v in totals.items()}, "contexts": count}


def text_only_length(turns: list[dict[str, str]], codec: Codec) -> int:
    """Characters of the turns' text alone, compressed as the codec compresses (same
    dictionary and level) and base64-encoded: no envelope, MAC, roles, timestamps or
    framing. No token of this codec can be shorter, so it bounds the size ratios."""
    text = "\n".join(t["content"] for t in turns).encode()
    return (len(codec.compressor.compress(text).data) * 4 + 2) // 3


def machine_facts() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"zstandard {zstandard.__version__}, msgpack {'.'.join(map(str, msgpack.version))}"
    )


def check_targets(result: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for row in result["rows"]:
        n = row["turns"]
        r = row["signed_vs_floor"]
        checks.append(
            (
                f"{n} turns: signed seal+open within {TARGET_FLOOR_RATIO}x of floor",
                r <= TARGET_FLOOR_RATIO,
                f"{r:.2f}x",
            )
        )
        if n >= 20:
            s = row["flask_vs_signed"]
            checks.append(
                (
                    f"{n} turns: >= {TARGET_FLASK_SPEEDUP}x faster than Flask (signed)",
                    s >= TARGET_FLASK_SPEEDUP,
                    f"{s:.2f}x",
                )
            )
        if n in TARGET_BYTES:
            b = row["sealed_vs_flask_bytes"]
            repeats = row.get("repeats", False)
            checks.append(
                (
                    f"{n} turns: token <= {TARGET_BYTES[n]}x Flask cookie bytes (sealed)",
                    b <= TARGET_BYTES[n] and not repeats,
                    f"{b:.2f}x" + (" (the corpus repeats: not a measurement)" if repeats else ""),
                )
            )
    return checks


def render(result: dict) -> str:
    lines = [
        f"satchel bench codec - {result['date']}",
        f"machine: {result['machine']}",
        f"corpus (held out): {result['corpus']}; dictionary id {result['dictionary_id']}; "
        f"median of {result['rounds']} interleaved rounds",
        "",
        "turns | signed seal  open | sealed seal  open | floor seal  open | flask seal  open"
        " | signed/floor | flask/signed | flask/sealed",
    ]
    for row in result["rows"]:
        u = row["us"]
        lines.append(
            f"{row['turns']:>5} | {u['signed_seal']:>10.1f} {u['signed_open']:>5.1f}"
            f" | {u['sealed_seal']:>11.1f} {u['sealed_open']:>5.1f}"
            f" | {u['floor_seal']:>10.1f} {u['floor_open']:>5.1f}"
            f" | {u['flask_seal']:>10.1f} {u['flask_open']:>5.1f}"
            f" | {row['signed_vs_floor']:>11.2f}x | {row['flask_vs_signed']:>11.2f}x"
            f" | {row['flask_vs_sealed']:>11.2f}x"
        )
    lines += [
        "",
        "(microseconds per operation, medians)",
        "",
        "token length in characters, mean over held-out contexts",
        "",
        "turns | contexts | signed | sealed | floor | flask | sealed/flask | signed/flask"
        " | text only | text/flask",
    ]
    for row in result["rows"]:
        b = row["bytes"]
        lines.append(
            f"{row['turns']:>5} | {b['contexts']:>8} | {b['signed']:>6.0f} | {b['sealed']:>6.0f}"
            f" | {b['floor']:>5.0f} | {b['flask']:>5.0f} | {row['sealed_vs_flask_bytes']:>11.2f}x"
            f" | {row['signed_vs_flask_bytes']:>11.2f}x"
            f" | {b['text']:>9.0f} | {b['text'] / b['flask']:>9.2f}x"
        )
    lines += [
        "",
        "text only: the messages alone, compressed with the same dictionary and level and",
        "base64-encoded, with no envelope, MAC or structure: what the text alone costs.",
    ]
    repeated = [str(row["turns"]) for row in result["rows"] if row.get("repeats")]
    if repeated:
        lines += [
            "",
            f"WARNING: the corpus holds fewer turns than {', '.join(repeated)}: those contexts",
            "repeat it, and zstd finds the repeats (zlib's 32 KB window does not), so their",
            "sizes flatter Satchel. Give a corpus with at least that many turns.",
        ]
    lines += ["", "targets:"]
    for name, ok, figure in check_targets(result):
        lines.append(f"  [{'met' if ok else 'MISSED'}] {name}: {figure}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    turns = args.turns
    if isinstance(turns, str):  # called with a plain Namespace, not through the CLI
        turns = tuple(int(s) for s in turns.split(",") if s.strip())
    sizes = tuple(turns)
    rounds, budget = (5, 0.01) if args.quick else (15, 0.04)
    dictionary_id = getattr(args, "dictionary_id", None)
    try:
        result = run(sizes, rounds, budget, getattr(args, "corpus", None), dictionary_id)
    except (BudgetExceeded, ContextNotSerializable) as exc:  # a size the codec cannot seal
        raise ConfigurationError(f"--turns {','.join(map(str, sizes))}: {exc.message}") from None
    print(render(result))
    if args.json_out:
        from ..cli import write_output_file

        write_output_file(args.json_out, json.dumps(result, indent=2), "--json")
    if args.check and not all(ok for _n, ok, _f in check_targets(result)):
        return 1
    return 0


__all__ = ["main", "run"]
