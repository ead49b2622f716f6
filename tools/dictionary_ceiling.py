"""How small could tokens get with a dictionary? An upper bound, not a candidate.

Trains a 32 KiB dictionary (the shipped size and parameters) on the *held-out*
conversations themselves, then compresses 4- and 20-turn contexts of those same
conversations with it, next to plain zstd and the shipped ``chat-v1`` dictionary.
Such an "oracle" dictionary has seen the very text it compresses, so it is never
shipped and says nothing about unseen conversations; what it shows is how much of the
issue's size target (tokens at most 0.6x Flask's cookie at 4 turns, 0.8x at 20) only
phrasing shared between training and use can buy. Numbers are mean compressed payload
bytes over 100 contexts, measured exactly like ``satchel bench codec``.

Usage::

    .venv/bin/python tools/dictionary_ceiling.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

try:
    import satchel  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

import zstandard

from satchel import schema, serialize
from satchel.bench.codec import build_context, conversation_of, load_conversations
from satchel.compress import DEFAULT_LEVEL, compression_dictionary

WINDOWS = (2, 4, 10, 20)
FRAME = {
    "format": zstandard.FORMAT_ZSTD1_MAGICLESS,
    "write_checksum": 0,
    "write_dict_id": 0,
    "write_content_size": 1,
}


def payload(turns: list[dict[str, str]], now: int) -> bytes:
    return serialize.pack(schema.to_wire(build_context(turns, now)))


def compressor(dictionary: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdCompressor:
    params = zstandard.ZstdCompressionParameters.from_level(DEFAULT_LEVEL, **FRAME)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)


def main() -> None:
    convs, source = load_conversations(None)
    now = int(time.time())
    samples = [
        payload(conv[end - w : end], now)
        for conv in convs
        for end in range(1, len(conv) + 1, 2)
        for w in WINDOWS
        if end >= w
    ]
    oracle = zstandard.train_dictionary(32768, samples, k=128, d=6, level=3, dict_id=9)
    oracle.precompute_compress(level=DEFAULT_LEVEL)  # compiled once, as Compressor's are
    shipped = compression_dictionary(1, DEFAULT_LEVEL)
    rows = {
        "plain zstd": compressor(None),
        "shipped chat-v1 (never saw this text)": compressor(shipped),
        "oracle (trained on this very text)": compressor(oracle),
    }
    print(f"corpus: {source}; {len(samples)} training samples for the oracle")
    for turns in (4, 20):
        contexts = [payload(conversation_of(convs, turns, offset), now) for offset in range(100)]
        print(f"\n{turns} turns, mean compressed payload bytes over {len(contexts)} contexts")
        for name, cctx in rows.items():
            mean = statistics.mean(len(cctx.compress(p)) for p in contexts)
            print(f"  {name:40s} {mean:7.0f}")


if __name__ == "__main__":
    main()
