"""Train Satchel's zstd dictionary (server/satchel/dictionaries/chat-v1.zdict).

The samples are the exact bytes the codec compresses: ``pack(to_wire(ctx))`` of
Contexts built from the training corpus (tools/corpus/train.jsonl), in two shapes:

* plain windows: 1..60 recent turns ending at random points of a conversation, so
  tiny and large tokens are both represented;
* evolved tokens: the conversation replayed exchange by exchange through Satchel's
  own lifecycle code (``apply_policies``: rolling window + extractive summary) and an
  emulation of the pipeline's byte budget (oldest turns move to overflow segments),
  so the summary, lifecycle record and overflow references a real token carries are
  in the samples too.

Compression settings mirror ``satchel.compress.Compressor`` (its zstd level, magicless
frames, no checksum, no dictionary id in the frame, content size written); the final
table is measured with ``Compressor`` itself. The trainer's own ``level`` stays at
:data:`TRAINED_AT_LEVEL`, so the script still makes chat-v1's exact bytes after the
codec's level changed.

Usage::

    .venv/bin/python tools/train_dictionary.py            # train, write .zdict + README
    .venv/bin/python tools/train_dictionary.py --select   # parameter search only
    # an app's own dictionary, from its own transcripts (ids 128-255):
    .venv/bin/python tools/train_dictionary.py --corpus chats.jsonl --dict-id 200 \
        --out instance/chat-app.zdict

``--select`` trains candidates (dict size x k x d) on conversations made only of 4/5 of
the training topics and scores them on conversations made of the other 1/5, so the
choice of parameters never looks at the held-out split (and is not fooled by
passages shared between fitting and scoring data). The chosen values are the
constants below; the final dictionary is then trained on the whole training split
with those fixed parameters, which makes it deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tools" / "corpus"
try:
    import satchel  # noqa: F401
except ImportError:  # not installed: use the source tree (same as PYTHONPATH=server)
    sys.path.insert(0, str(ROOT / "server"))

from satchel.bench.codec import _read_corpus as read_corpus  # noqa: E402
from satchel.codec import DIGEST_SIZE, Codec  # noqa: E402
from satchel.compress import (  # noqa: E402
    DEFAULT_LEVEL,
    DICTIONARY_FILES,
    FIRST_APP_DICTIONARY_ID,
    Compressor,
    load_dictionary,
)
from satchel.context import Context, LifecycleAction, SegmentRef  # noqa: E402
from satchel.errors import ConfigurationError  # noqa: E402
from satchel.keys import Keyring  # noqa: E402
from satchel.lifecycle.policy import LifecyclePolicy, apply_policies  # noqa: E402
from satchel.schema import to_wire  # noqa: E402
from satchel.serialize import pack  # noqa: E402

#: The zstd level the trainer is given (zstandard.train_dictionary's ``level``). chat-v1
#: was trained at 3; the codec compresses at its own DEFAULT_LEVEL.
TRAINED_AT_LEVEL = 3

DICT_ID = 1
DICT_PATH = ROOT / "server" / "satchel" / "dictionaries" / DICTIONARY_FILES[DICT_ID]
README_PATH = DICT_PATH.parent / "README.md"

# Chosen with --select (see README.md for the search table).
DICT_SIZE = 32 * 1024
K = 128
D = 6

SAMPLE_SEED = 20240917
SEGMENT_DIGEST_SIZE = 16
MAX_WINDOW = 60
MEASURE_TURNS = (4, 20, 50, 200)

Conversation = list[tuple[str, str]]


# --------------------------------------------------------------------------
# Corpus -> Contexts
# --------------------------------------------------------------------------


def load_jsonl(path: Path) -> list[Conversation]:
    convs = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                convs.append([(t["role"], t["content"]) for t in json.loads(line)["turns"]])
    return convs


def timeline(rng: random.Random, n: int) -> list[int]:
    """Plausible whole-second timestamps for n turns of one conversation."""
    ts = rng.randint(1_704_067_200, 1_767_225_599)  # some time in 2024-2025
    out = []
    for i in range(n):
        if i % 2:  # assistant reply
            ts += rng.randint(2, 45)
        elif i:  # user's next message
            gap = rng.random()
            ts += rng.randint(8, 240) if gap < 0.85 else rng.randint(600, 3 * 86400)
        out.append(ts)
    return out


def plain_context(
    conv: Conversation, stamps: Sequence[int], start: int, end: int, rng: random.Random
) -> Context:
    """Turns [start, end) in a fresh context, as sealed after ``end`` turns."""
    ctx = Context.new(now=stamps[0], session_id=rng.randbytes(16))
    for (role, content), ts in zip(conv[start:end], stamps[start:end], strict=True):
        ctx.add_turn(role, content, ts=ts)
    ctx.seq = (end + 1) // 2
    ctx.parent = rng.randbytes(DIGEST_SIZE) if ctx.seq > 1 else None
    return ctx


@dataclass(frozen=True)
class Evolution:
    max_turns: int | None  # the rolling window (LifecyclePolicy.max_turns)
    raw_budget: int | None  # msgpack bytes past which the oldest turns overflow


def overflow(
    ctx: Context, policy: LifecyclePolicy, budget: int, now: int, rng: random.Random
) -> None:
    """Emulate the pipeline's byte budget with a tier: oldest exchanges -> a segment."""
    size = len(pack(to_wire(ctx)))
    if size <= budget or len(ctx.turns) <= 2:
        return
    excess = (size - int(budget * 0.75)) / size * sum(len(t.content) + 16 for t in ctx.turns)
    count, removed = 0, 0.0
    while count < len(ctx.turns) - 2 and removed < excess:
        removed += sum(len(t.content) + 16 for t in ctx.turns[count : count + 2])
        count += 2
    spill = ctx.turns[:count]
    del ctx.turns[:count]
    stored = int(sum(len(t.content.encode()) for t in spill) * 0.45) + 64
    ctx.overflow.append(
        SegmentRef(rng.randbytes(SEGMENT_DIGEST_SIZE), len(spill), stored, ctx.seq, now)
    )
    ctx.summary = policy.summarizer(spill, ctx.summary)
    ctx.lifecycle.summarized += len(spill)
    ctx.lifecycle.record(LifecycleAction("byte_budget", "overflowed", len(spill), now))


def evolve(
    conv: Conversation,
    stamps: Sequence[int],
    evo: Evolution,
    snapshots: Iterable[int],
    rng: random.Random,
) -> list[bytes]:
    """Replay ``conv`` one exchange (one seal) at a time; return the payloads sealed
    at ``snapshots`` (numbers of turns received so far, rounded up to a seal)."""
    policy = LifecyclePolicy(
        max_turns=evo.max_turns,
        max_token_bytes=None,
        hard_max_token_bytes=None,
        idle_ttl=None,
        max_age=None,
    )
    wanted = sorted(set(snapshots))
    ctx = Context.new(now=stamps[0], session_id=rng.randbytes(16))
    out: list[bytes] = []
    i = 0
    while i < len(conv) and wanted:
        j = min(i + 2, len(conv))
        for (role, content), ts in zip(conv[i:j], stamps[i:j], strict=True):
            ctx.add_turn(role, content, ts=ts)
        now = stamps[j - 1]
        apply_policies(ctx, policy, now)
        if evo.raw_budget is not None:
            overflow(ctx, policy, evo.raw_budget, now, rng)
        ctx.seq += 1
        ctx.parent = rng.randbytes(DIGEST_SIZE) if ctx.seq > 1 else None
        while wanted and wanted[0] <= j:
            wanted.pop(0)
            out.append(pack(to_wire(ctx)))
        i = j
    return out


def training_payloads(convs: Sequence[Conversation], seed: int) -> list[bytes]:
    """msgpack payloads for dictionary training, deterministic for ``seed``."""
    rng = random.Random(seed)
    samples: list[bytes] = []
    for conv in convs:
        n = len(conv)
        stamps = timeline(rng, n)
        count = min(10, 1 + n // 10)
        for _ in range(count):
            end = rng.randint(1, n)
            if end % 2 and end < n and rng.random() < 0.85:
                end += 1  # usually sealed right after the assistant's reply
            width = rng.randint(1, min(MAX_WINDOW, end))
            samples.append(pack(to_wire(plain_context(conv, stamps, end - width, end, rng))))
        if n >= 6:
            evo = Evolution(
                max_turns=rng.choice([20, 40, 40, 60, None]),
                raw_budget=rng.choice([None, 5000, 8000, 8000, 11000]),
            )
            points = [rng.randint(2, n) for _ in range(min(8, 1 + n // 12))]
            samples.extend(evolve(conv, stamps, evo, points, rng))
    rng.shuffle(samples)
    return samples


def first_turns(convs: Sequence[Conversation], n: int, seed: int) -> list[bytes]:
    """Payloads of the first ``n`` turns of every conversation that has that many."""
    rng = random.Random(seed)
    out = []
    for conv in convs:
        stamps = timeline(rng, len(conv))
        if len(conv) >= n:
            out.append(pack(to_wire(plain_context(conv, stamps, 0, n, rng))))
    return out


def first_turn_convs(convs: Sequence[Conversation], n: int) -> list[Conversation]:
    return [conv[:n] for conv in convs if len(conv) >= n]


def pipeline_tokens(convs: Sequence[Conversation], seed: int) -> list[bytes]:
    """Each conversation's final token under the default policy (window 40) with the
    byte budget emulated (overflow past ~8 KB of msgpack, roughly a 3.8 KB token)."""
    rng = random.Random(seed)
    out = []
    evo = Evolution(max_turns=40, raw_budget=8000)
    for conv in convs:
        stamps = timeline(rng, len(conv))
        out.extend(evolve(conv, stamps, evo, [len(conv)], rng))
    return out


# --------------------------------------------------------------------------
# Compression, mirroring satchel.compress.Compressor
# --------------------------------------------------------------------------


def make_compress(dictionary: zstandard.ZstdCompressionDict | None) -> Callable[[bytes], int]:
    params = zstandard.ZstdCompressionParameters.from_level(
        DEFAULT_LEVEL,
        format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        write_checksum=0,
        write_dict_id=0,
        write_content_size=1,
    )
    cctx = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)

    def size(payload: bytes) -> int:
        if len(payload) < 32:
            return len(payload)
        return min(len(payload), len(cctx.compress(payload)))

    return size


def train(
    samples: list[bytes], size: int, k: int, d: int, dict_id: int = DICT_ID
) -> zstandard.ZstdCompressionDict:
    return zstandard.train_dictionary(
        size, samples, k=k, d=d, dict_id=dict_id, level=TRAINED_AT_LEVEL, split_point=1.0
    )


def train_app_dictionary(corpus: Path, out: Path, dict_id: int, size: int) -> int:
    """Train an app's own dictionary on its own transcripts (``--corpus``).

    Every fifth conversation is held back and used only to report the gain, so the
    figures printed are for conversations the dictionary did not see.
    """
    if not FIRST_APP_DICTIONARY_ID <= dict_id <= 255:
        print(
            f"--dict-id must be {FIRST_APP_DICTIONARY_ID}-255 (lower ids are Satchel's)",
            file=sys.stderr,
        )
        return 2
    try:
        # Read as `satchel bench codec --corpus` reads it: a missing file or a line that
        # is no conversation is one line naming it, not a traceback.
        convs = [[(t["role"], t["content"]) for t in turns] for turns in read_corpus(corpus)]
    except ConfigurationError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    fit = [c for i, c in enumerate(convs) if i % 5]
    held = [c for i, c in enumerate(convs) if not i % 5]
    samples = training_payloads(fit, SAMPLE_SEED)
    if len(fit) < 20 or len(held) < 5:
        print(f"{corpus}: {len(convs)} conversations; at least 25 are needed", file=sys.stderr)
        return 2
    try:
        dictionary = train(samples, size, K, D, dict_id)
    except zstandard.ZstdError as exc:
        print(f"training failed ({exc}): more or longer conversations are needed", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)  # instance/ need not exist yet
    out.write_bytes(dictionary.as_bytes())
    print(f"trained on {len(fit)} conversations ({len(samples)} samples); wrote {out}")
    print(f"mean compressed payload on {len(held)} held-back conversations:")
    shipped = make_compress(load_dictionary(DICT_ID))
    own = make_compress(dictionary)
    plain = make_compress(None)
    for n in (4, 20):
        payloads = first_turns(held, n, 11)
        if payloads:
            sizes = [mean([f(p) for p in payloads]) for f in (plain, shipped, own)]
            print(
                f"  {n:>2} turns ({len(payloads)}): plain zstd {sizes[0]:.0f}, "
                f"chat-v1 {sizes[1]:.0f}, this dictionary {sizes[2]:.0f} bytes"
            )
    print(
        f"use it: app.config SATCHEL_DICTIONARIES={{{dict_id}: '{out}'}} and "
        f"SATCHEL_DICTIONARY_ID={dict_id}; in the environment "
        f"SATCHEL_DICTIONARIES={dict_id}={out} SATCHEL_DICTIONARY_ID={dict_id} "
        "(every process that opens tokens needs it)"
    )
    return 0


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


# --------------------------------------------------------------------------
# Parameter selection (never reads the held-out split)
# --------------------------------------------------------------------------


@dataclass
class Validation:
    samples: list[bytes]  # fitting samples (4/5 of the training topics)
    sets: dict[str, list[bytes]]  # scoring payloads (the other 1/5)
    base: dict[str, float]  # mean zstd size without a dictionary, per set
    description: str


def validation_split() -> Validation:
    sys.path.insert(0, str(CORPUS))
    import generate  # tools/corpus/generate.py

    def is_val(topic: generate.Topic) -> bool:
        return zlib.crc32(topic.name.encode()) % 5 == 0

    fit = generate.generate("train", 101, 1700, topic_filter=lambda t: not is_val(t))
    val = generate.generate("train", 202, 300, 4, topic_filter=is_val)
    fit_convs = [[(t["role"], t["content"]) for t in c["turns"]] for c in fit]
    val_convs = [[(t["role"], t["content"]) for t in c["turns"]] for c in val]
    n_val_topics = sum(is_val(t) for t in generate.load_banks() if t.split == "train")
    samples = training_payloads(fit_convs, SAMPLE_SEED)
    sets = {
        "4 turns": first_turns(val_convs, 4, 7),
        "20 turns": first_turns(val_convs, 20, 7),
        "pipeline": pipeline_tokens(val_convs, 7),
    }
    plain = make_compress(None)
    base = {name: mean([plain(p) for p in ps]) for name, ps in sets.items()}
    description = (
        f"fit: {len(fit_convs)} conversations, {len(samples)} samples, "
        f"{sum(map(len, samples)) / 1e6:.1f} MB; validation: {len(val_convs)} "
        f"conversations from {n_val_topics} training topics never used for fitting"
    )
    return Validation(samples, sets, base, description)


def score(v: Validation, size: int, k: int, d: int) -> dict[str, float]:
    """Mean dictionary-compressed size per validation set."""
    comp = make_compress(train(v.samples, size, k, d))
    return {name: mean([comp(p) for p in ps]) for name, ps in v.sets.items()}


def score_line(v: Validation, row: dict[str, float]) -> str:
    return " | ".join(f"{row[n]:6.0f} ({100 * (1 - row[n] / v.base[n]):4.1f}%)" for n in v.sets)


def select(sizes: Sequence[int], ks: Sequence[int], ds: Sequence[int]) -> None:
    v = validation_split()
    print(v.description)
    print("no dictionary: " + ", ".join(f"{k} {x:.0f} B" for k, x in v.base.items()))
    header = f"{'size':>6} {'k':>5} {'d':>2} | " + " | ".join(f"{n:>14}" for n in v.sets)
    print(header)
    print("-" * len(header))
    results = []
    for size in sizes:
        for d in ds:
            for k in ks:
                if d > k:
                    continue
                row = score(v, size, k, d)
                results.append((size, k, d, row))
                print(f"{size // 1024:>5}K {k:>5} {d:>2} | {score_line(v, row)}", flush=True)
    best = min(results, key=lambda r: sum(r[3][n] / v.base[n] for n in v.sets))
    print(f"best by mean relative size: {best[0] // 1024}K k={best[1]} d={best[2]}")


def size_sweep(sizes: Sequence[int]) -> str:
    """Markdown table: the chosen k/d at several sizes, on the validation split."""
    v = validation_split()
    lines = [
        "| dict size | " + " | ".join(v.sets) + " |",
        "|---|" + "--:|" * len(v.sets),
        "| none | " + " | ".join(f"{v.base[n]:,.0f}" for n in v.sets) + " |",
    ]
    for size in sizes:
        row = score(v, size, K, D)
        cells = " | ".join(
            f"{row[n]:,.0f} ({100 * (row[n] / v.base[n] - 1):+.1f}%)" for n in v.sets
        )
        mark = " (chosen)" if size == DICT_SIZE else ""
        lines.append(f"| {size // 1024} KiB{mark} | {cells} |")
    return f"Validation setup: {v.description}.\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------
# Final training and measurement
# --------------------------------------------------------------------------


def flask_cookie_lengths(convs: Sequence[Conversation]) -> tuple[list[int], list[int]]:
    """zlib(JSON) payload sizes and full cookie lengths, as Flask's session does it."""
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    app = Flask("satchel-bench")
    app.secret_key = "x" * 32  # measurement only
    serializer = SecureCookieSessionInterface().get_signing_serializer(app)
    assert serializer is not None
    zsizes, cookies = [], []
    with app.app_context():
        for conv in convs:
            session = {"turns": [{"role": r, "content": c} for r, c in conv]}
            raw = serializer.serializer.dumps(session).encode()  # TaggedJSONSerializer
            zsizes.append(min(len(raw), len(zlib.compress(raw))))
            cookies.append(len(serializer.dumps(session)))
    return zsizes, cookies


@dataclass
class Row:
    label: str
    count: int
    raw: float
    plain: float
    dict_: float
    flask_z: float | None  # None when the row has no like-for-like Flask session
    tok_plain: float
    tok_dict: float
    cookie: float | None


def measure_rows(
    groups: list[tuple[str, list[Conversation] | None, list[bytes]]],
) -> list[Row]:
    plain, withdict = Compressor(dictionary_id=0), Compressor(dictionary_id=DICT_ID)
    keyring = Keyring.generate()
    codec_plain = Codec(keyring, dictionary_id=0)
    codec_dict = Codec(keyring, dictionary_id=DICT_ID)
    rows = []
    for label, convs, payloads in groups:
        zsizes, cookies = flask_cookie_lengths(convs) if convs is not None else ([], [])
        tok_plain, tok_dict = [], []
        for payload in payloads:
            for codec, out in ((codec_plain, tok_plain), (codec_dict, tok_dict)):
                out.append(len(codec.seal_payload(payload, now=1_750_000_000)[0]))
        rows.append(
            Row(
                label,
                len(payloads),
                mean([len(p) for p in payloads]),
                mean([len(plain.compress(p).data) for p in payloads]),
                mean([len(withdict.compress(p).data) for p in payloads]),
                mean(zsizes) if zsizes else None,
                mean(tok_plain),
                mean(tok_dict),
                mean(cookies) if cookies else None,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| context | n | msgpack | zstd | zstd + chat-v1 | dict vs zstd | zlib(JSON) "
        "| dict vs zlib(JSON) | token, zstd | token, zstd + chat-v1 | Flask cookie |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.flask_z is None or r.cookie is None:
            flask_z = vs_flask = cookie = "n/a"
        else:
            flask_z = f"{r.flask_z:,.0f}"
            vs_flask = f"{100 * (r.dict_ / r.flask_z - 1):+.0f}%"
            cookie = f"{r.cookie:,.0f}"
        lines.append(
            f"| {r.label} | {r.count} | {r.raw:,.0f} | {r.plain:,.0f} | {r.dict_:,.0f} "
            f"| {100 * (r.dict_ / r.plain - 1):+.0f}% | {flask_z} | {vs_flask} "
            f"| {r.tok_plain:,.0f} | {r.tok_dict:,.0f} | {cookie} |"
        )
    return "\n".join(lines)


def write_readme(
    table: str,
    sweep: str,
    n_train: int,
    n_samples: int,
    sample_mb: float,
    digest: str,
    seconds: float,
) -> None:
    README_PATH.write_text(
        f"""# zstd dictionaries

`chat-v1.zdict` is the default dictionary (id {DICT_ID}, named in the token header;
see `satchel/compress.py`). It is a full zstd dictionary: {DICT_SIZE // 1024} KiB of content
plus entropy tables, with dictionary id {DICT_ID} written in its header.

Never change the bytes of a published dictionary: tokens minted with it name its id
and can only be opened with exactly these bytes. A new dictionary gets a new id and
file name (`chat-v2.zdict` -> id 2) and is added to `DICTIONARY_FILES`; the old one
stays so that old tokens keep opening.

## How it was trained

```
.venv/bin/python tools/train_dictionary.py
```

(The script adds `server/` to `sys.path` itself when `satchel` is not installed.)

* **Corpus**: `tools/corpus/train.jsonl`, {n_train:,} English AI-assistant conversations
  (coding, SQL, cooking, travel, writing, math, customer support, health, careers,
  product comparisons, everyday tasks) composed deterministically by
  `tools/corpus/generate.py` from hand-written passages in `tools/corpus/banks/`.
* **Samples**: {n_samples:,} payloads ({sample_mb:.1f} MB), each the exact bytes the codec
  compresses, `pack(to_wire(ctx))`:
  * windows of 1..{MAX_WINDOW} recent turns ending at random points of each conversation;
  * tokens replayed exchange by exchange through `apply_policies` (rolling window
    20/40/60 or none, extractive summary) with the pipeline's byte budget emulated
    (oldest exchanges move to overflow segments), so summaries, lifecycle records
    and overflow references are represented.
* **Trainer**: `zstandard.train_dictionary` (fastCover), `dict_size={DICT_SIZE}`,
  `k={K}`, `d={D}`, `level={TRAINED_AT_LEVEL}`, `split_point=1.0`, `dict_id={DICT_ID}`.
  Fixed parameters (no optimizer run), so the output is deterministic: the same
  corpus, script and wire format give the same bytes. chat-v1 was trained on the
  wire format of commit c377b6a; the format has grown since, so the script trains
  other bytes today, and refuses to write them over chat-v1 (a published dictionary
  is never replaced: tokens name it by id).
* **Parameter choice**: `tools/train_dictionary.py --select` trains every
  candidate (16-64 KiB x k in 64..2048 x d in 6, 8) on conversations built from 4/5
  of the training topics and scores it on conversations built from the other 1/5,
  so no held-out text is used to pick parameters. k and d matter little (a few
  bytes either way); size matters more. 32 KiB is the best size within the 16-32
  KiB budget; 48 and 64 KiB gain only about 1 point more each, for a dictionary that
  every worker holds and `precompute_compress`es. Size sweep at k={K}, d={D}
  (mean compressed payload bytes on the validation split; "pipeline" as below):

{sweep}

* **sha256**: `{digest}`; training takes about {seconds:.0f} s.

## Measured gains (held-out conversations)

Held-out conversations are `tools/corpus/heldout.jsonl` (different seed, and topics
and passages reserved for it, so none of their text was seen in training) and the
hand-written `tools/corpus/heldout_handwritten.jsonl`. "N turns" is a context holding
the first N turns of every held-out conversation that long. Compression is measured
with `satchel.compress.Compressor` (zstd level {DEFAULT_LEVEL}, magicless frame, no
checksum), tokens with `Codec.seal_payload` (sealed mode, AES-256-GCM, base64url).
"zlib(JSON)" is what Flask's session cookie stores: its tagged-JSON serializer, then
`zlib.compress`; "Flask cookie" is the full signed cookie value from
`SecureCookieSessionInterface`. Its JSON holds only role and content, so it carries
less than a Satchel payload does (no timestamps, session id or sequence number).
"pipeline" is each held-out conversation's final token under the default policy
(window 40) with overflow past ~8 KB of msgpack (about a 3.8 KB token): recent turns,
running summary, lifecycle record and overflow references. A Flask session has no
equivalent (it would carry the whole conversation), hence n/a.
All sizes are means, in bytes (tokens and cookies in characters).

{table}
"""
        + kept_tail(),
        encoding="utf-8",
    )


#: Everything in README.md from this line on is written by hand and kept on retraining.
HAND_WRITTEN_MARKER = "<!-- hand-written from here on: tools/train_dictionary.py keeps it -->"


def kept_tail() -> str:
    """The hand-written end of the current README (from the marker), if any."""
    try:
        text = README_PATH.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    index = text.find(HAND_WRITTEN_MARKER)
    return "" if index < 0 else "\n" + text[index:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select", action="store_true", help="run the parameter search only")
    ap.add_argument("--sizes", default="16,24,32,48", help="KiB sizes for --select")
    ap.add_argument("--ks", default="64,128,256,512,1024,2048", help="k values for --select")
    ap.add_argument("--ds", default="6,8", help="d values for --select")
    ap.add_argument(
        "--corpus",
        type=Path,
        help="train an app dictionary on this JSONL of conversations instead "
        '({"turns": [{"role": ..., "content": ...}, ...]} per line)',
    )
    ap.add_argument("--out", type=Path, help="with --corpus: where to write the .zdict")
    ap.add_argument("--dict-id", type=int, default=200, help="with --corpus: 128-255")
    ap.add_argument("--size", type=int, default=DICT_SIZE, help="with --corpus: bytes")
    args = ap.parse_args(argv)

    if args.corpus:
        if not args.out:
            ap.error("--corpus needs --out")
        return train_app_dictionary(args.corpus, args.out, args.dict_id, args.size)

    if args.select:
        select(
            [int(s) * 1024 for s in args.sizes.split(",")],
            [int(k) for k in args.ks.split(",")],
            [int(d) for d in args.ds.split(",")],
        )
        return 0

    train_convs = load_jsonl(CORPUS / "train.jsonl")
    heldout = load_jsonl(CORPUS / "heldout.jsonl")
    handwritten = load_jsonl(CORPUS / "heldout_handwritten.jsonl")

    started = time.perf_counter()
    samples = training_payloads(train_convs, SAMPLE_SEED)
    dictionary = train(samples, DICT_SIZE, K, D)
    seconds = time.perf_counter() - started
    data = dictionary.as_bytes()
    assert dictionary.dict_id() == DICT_ID
    digest = hashlib.sha256(data).hexdigest()
    if DICT_PATH.exists() and DICT_PATH.read_bytes() != data:
        # A published dictionary is never replaced: every token compressed with it names
        # it by id, and would no longer decompress. The payloads this script builds follow
        # the current wire format, which has grown since chat-v1 was trained.
        shipped = hashlib.sha256(DICT_PATH.read_bytes()).hexdigest()
        print(
            f"not written: {DICT_PATH} (sha256 {shipped}) differs from "
            f"what this corpus and script train today (sha256 {digest}). A published "
            "dictionary is never replaced; ship a new one under a new id "
            "(compress.DICTIONARY_FILES) instead.",
            file=sys.stderr,
        )
        return 1
    DICT_PATH.write_bytes(data)
    sample_mb = sum(map(len, samples)) / 1e6
    print(
        f"trained on {len(train_convs)} conversations, {len(samples)} samples "
        f"({sample_mb:.1f} MB) in {seconds:.1f}s"
    )
    print(
        f"wrote {DICT_PATH.relative_to(ROOT)}: {len(data)} bytes, id {DICT_ID}, "
        f"k={dictionary.k} d={dictionary.d}, sha256 {digest}"
    )

    groups: list[tuple[str, list[Conversation] | None, list[bytes]]] = []
    for n in MEASURE_TURNS:
        groups.append((f"{n} turns", first_turn_convs(heldout, n), first_turns(heldout, n, 11)))
    groups.append(("pipeline", None, pipeline_tokens(heldout, 11)))
    groups.append(
        ("hand-written, 4 turns", first_turn_convs(handwritten, 4), first_turns(handwritten, 4, 13))
    )
    lengths = {len(c) for c in handwritten}
    whole = [
        pack(
            to_wire(
                plain_context(c, timeline(random.Random(i), len(c)), 0, len(c), random.Random(i))
            )
        )
        for i, c in enumerate(handwritten)
    ]
    groups.append(
        (f"hand-written, whole ({min(lengths)}-{max(lengths)} turns)", handwritten, whole)
    )
    table = format_table(measure_rows(groups))
    print()
    print(table)
    print("\nsize sweep on the validation split (training topics only):")
    sweep = size_sweep([16 * 1024, 24 * 1024, 32 * 1024, 48 * 1024])
    print(sweep)
    write_readme(table, sweep, len(train_convs), len(samples), sample_mb, digest, seconds)
    print(f"\nwrote {README_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
