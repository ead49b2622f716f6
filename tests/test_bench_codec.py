"""``satchel bench codec``: one smoke run through the CLI, and what its figures mean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from satchel.bench import codec as bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_codec_cli_prints_every_figure_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "codec.json"
    proc = subprocess.run(
        [sys.executable, "-m", "satchel.cli", "bench", "codec", "--quick", "--turns", "4,20",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "signed/floor" in text and "flask/signed" in text and "text/flask" in text
    assert "targets:" in text and "token <= 0.6x Flask cookie bytes" in text
    result = json.loads(out.read_text())
    assert [row["turns"] for row in result["rows"]] == [4, 20]
    assert result["machine"] and result["date"] and "heldout" in result["corpus"]
    for row in result["rows"]:
        b = row["bytes"]
        assert b["contexts"] == 100
        # The text alone is a floor for the tokens: they carry it and more.
        assert 0 < b["text"] < b["floor"] <= b["signed"]
        # On one state, a sealed token is the shorter: a 12-byte nonce and 16-byte tag
        # against a 32-byte MAC.
        assert b["text"] < b["sealed"] < b["signed"]
        assert row["sealed_vs_flask_bytes"] == b["sealed"] / b["flask"]
        us = row["us"]
        assert row["signed_vs_floor"] == row["signed_roundtrip_us"] / row["floor_roundtrip_us"]
        assert row["signed_roundtrip_us"] == us["signed_seal"] + us["signed_open"]
        assert all(v > 0 for v in us.values())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
def test_a_json_path_that_cannot_be_written_is_exit_2_in_one_line() -> None:
    """--json /dev/full (or a read-only file system, /proc) passed the checks before the
    run and ended it with a traceback and exit 1, which reads as a missed target."""
    proc = subprocess.run(
        [sys.executable, "-m", "satchel.cli", "bench", "codec", "--quick", "--turns", "4",
         "--json", "/dev/full"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--json /dev/full: not written" in proc.stderr and "Traceback" not in proc.stderr


def test_targets_are_checked_as_the_issue_states_them() -> None:
    row = {
        "turns": 20,
        "signed_vs_floor": 1.31,
        "flask_vs_signed": 2.5,
        "sealed_vs_flask_bytes": 0.8,
    }
    checks = {name: ok for name, ok, _ in bench.check_targets({"rows": [row]})}
    assert checks == {
        "20 turns: signed seal+open within 1.3x of floor": False,
        "20 turns: >= 2.5x faster than Flask (signed)": True,
        "20 turns: token <= 0.8x Flask cookie bytes (sealed)": True,
    }


def _conversations(path: Path) -> list[list[dict[str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["turns"] for line in lines if line.strip()]


def test_packaged_sample_is_held_out_text_and_serves_an_installed_satchel(
    tmp_path: Path, monkeypatch
) -> None:
    """Outside a checkout the bench uses the packaged sample; it must be held-out text
    (the hand-written conversations, then the first generated ones), and enough of it
    for every size: one short conversation repeated into 200 turns measured nothing."""
    corpus = ROOT / "tools" / "corpus"
    expected = _conversations(corpus / "heldout_handwritten.jsonl")
    generated = _conversations(corpus / "heldout.jsonl")
    monkeypatch.setattr(bench, "corpus_roots", lambda: [tmp_path])
    convs, source = bench.load_conversations()
    assert source == f"packaged {bench.PACKAGED_SAMPLE} ({len(convs)} conversations)"
    assert convs[: len(expected)] == expected
    rest = convs[len(expected) :]
    assert len(rest) >= 24 and rest == generated[: len(rest)]
    # Every 200-turn context joins distinct conversations: none repeats within one.
    assert sum(len(turns) for turns in convs) >= 200


def test_checkout_corpus_is_found_from_any_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    convs, source = bench.load_conversations()
    assert source.endswith("tools/corpus/heldout.jsonl") and "packaged" not in source
    assert len(convs) == len(_conversations(ROOT / "tools" / "corpus" / "heldout.jsonl")) + len(
        _conversations(ROOT / "tools" / "corpus" / "heldout_handwritten.jsonl")
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--turns", "abc"], "not comma-separated integers"),
        (["--turns", "0"], "sizes must be 1 to 10000"),
        (["--turns", ","], "sizes must be 1 to 10000"),
        (["--turns", "9000"], "this codec opens at most"),
        (["--corpus", "{missing}"], "no such file"),
        (["--corpus", "{empty}"], "no conversation with turns"),
        (["--corpus", "{bad}"], "line 1: not"),
        (["--corpus", "{bot}"], "line 2: role 'bot' is not one of"),
        (["--corpus", "{surrogate}"], "line 1: turn content is not valid Unicode text"),
        (["--json", "{tmp}/no/such/dir/out.json"], "does not exist"),
    ],
)
def test_bad_arguments_are_exit_2_with_one_line_before_any_run(
    args: list[str], says: str, tmp_path: Path
) -> None:
    """A corpus of empty conversations hung forever; a missing corpus silently measured
    the packaged one; --turns abc, a bad corpus line or an unwritable --json path ended
    in a traceback (the last one after the whole run)."""
    (tmp_path / "empty.jsonl").write_text('{"turns": []}\n')
    (tmp_path / "bad.jsonl").write_text('{"turns": "nope"}\n')
    (tmp_path / "bot.jsonl").write_text(
        '{"turns": [{"role": "user", "content": "hi"}]}\n'
        '{"turns": [{"role": "bot", "content": "hello"}]}\n'
    )
    (tmp_path / "surrogate.jsonl").write_text(  # JSON's escape of half a surrogate pair
        '{"turns": [{"role": "user", "content": "\\ud800"}]}\n'
    )
    paths = {
        "surrogate": str(tmp_path / "surrogate.jsonl"),
        "missing": str(tmp_path / "missing.jsonl"),
        "empty": str(tmp_path / "empty.jsonl"),
        "bad": str(tmp_path / "bad.jsonl"),
        "bot": str(tmp_path / "bot.jsonl"),
        "tmp": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "satchel.cli", "bench", "codec", "--quick",
         *(a.format(**paths) for a in args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no usage block
    assert proc.stdout == ""


@pytest.mark.parametrize("floor_class", ["Floor", "SealedFloor"])
def test_the_floor_runs_the_primitives_on_the_bytes_satchel_packs(floor_class: str) -> None:
    """The floor sealed a dict per turn with string keys: more bytes than Satchel's
    arrays, unpacked about twice as slowly, so Satchel's whole open beat the "floor"
    at 50 turns. It must carry exactly the payload Satchel's token carries."""
    from satchel import Codec, Keyring

    convs, _ = bench.load_conversations(None)
    codec = Codec(Keyring.generate("k1"), mode="signed")
    floor = getattr(bench, floor_class)(b"k" * 32, codec.compressor)
    for turns in (4, 50):
        ctx = bench.build_context(bench.conversation_of(convs, turns), 1_795_000_000)
        wire = bench.wire_of(ctx)
        assert floor.open(floor.seal(wire)) == wire
        packed = codec.prepare(ctx)
        assert floor.cctx.compress(msgpack.packb(wire)) == packed.packed.data
        # Satchel's signed token is the floor's bytes plus its envelope: never smaller.
        assert len(floor.seal(wire)) < len(codec.seal(ctx))


def test_sizes_compare_tokens_of_one_state() -> None:
    """Codec.seal() gives the context a parent digest: the signed token, sealed first,
    had none, and the sealed and floor tokens after it did, so the table compared
    tokens of different contexts (sealed looked 15 characters longer than signed, where
    on one context it is 4 shorter)."""
    from satchel import Codec, Keyring

    convs, _ = bench.load_conversations(None)
    ring = Keyring.generate("k1")
    signed, sealed = Codec(ring, mode="signed"), Codec(ring)
    floor = bench.Floor(b"k" * 32, signed.compressor)
    flask_s = bench.flask_serializer()
    sizes = bench.mean_sizes(convs, 4, 1_795_000_000, signed, sealed, floor, flask_s, samples=5)
    # The same contexts, each sealed once before (as a request's is), measured by hand.
    for_each = {"signed": 0, "sealed": 0}
    for offset in range(5):
        turns = bench.conversation_of(convs, 4, offset)
        for name, codec in (("signed", signed), ("sealed", sealed)):
            ctx = bench.build_context(turns, 1_795_000_000)
            codec.seal(ctx)
            for_each[name] += len(codec.seal(ctx))
    # Within a few characters: each seal's parent digest is new random bytes, which
    # zstd may happen to shorten by a byte.
    assert abs(sizes["signed"] - for_each["signed"] / 5) <= 5
    assert abs(sizes["sealed"] - for_each["sealed"] / 5) <= 5
    assert sizes["sealed"] < sizes["signed"]  # 28 bytes of nonce and tag against 32 of MAC


def test_chaos_percentile_is_the_nearest_rank() -> None:
    """round() took the rank above whenever q/100 * n was odd: p99 of 100 samples was
    their maximum, the kill window's p50 of 70 the 36th."""
    from satchel.bench.chaos import percentile

    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(70, 0, -1)), 50) == 35
    assert percentile(list(range(1, 301)), 99) == 297
    assert percentile([], 50) is None


def test_a_corpus_too_small_for_a_size_is_said_and_its_size_not_a_verdict(tmp_path: Path) -> None:
    """The bench cycles the corpus to fill a size: zstd's window found the repeats
    (zlib's does not), and a 16-conversation corpus read 0.38x of Flask's bytes at 200
    turns, a target "met" by a corpus that repeats itself."""
    corpus = tmp_path / "small.jsonl"
    turns = [
        {"role": r, "content": f"message {i} about the shipping times of order {i * 37}"}
        for i, r in enumerate(["user", "assistant"] * 5)
    ]
    corpus.write_text(json.dumps({"turns": turns}) + "\n")  # 10 turns in all
    result = bench.run((4, 20), 1, 0.001, str(corpus))
    assert [row["repeats"] for row in result["rows"]] == [False, True]
    checks = {name: (ok, figure) for name, ok, figure in bench.check_targets(result)}
    ok, figure = checks["20 turns: token <= 0.8x Flask cookie bytes (sealed)"]
    assert not ok and "corpus repeats" in figure
    assert "WARNING: the corpus holds fewer turns than 20" in bench.render(result)
