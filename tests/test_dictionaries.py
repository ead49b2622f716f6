"""An app's own zstd dictionaries: register_dictionary, SATCHEL_DICTIONARIES, the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from flask import Flask

from satchel import Codec, Context, Keyring, Satchel, envelope
from satchel.compress import register_dictionary
from satchel.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
PHRASES = [
    "Thanks for reaching out to Acme support! I'm sorry to hear your order",
    "has not arrived yet. Could you share your order number so I can check",
    "the shipping status? Our standard delivery takes 3-5 business days.",
    "Is there anything else I can help you with today? Have a great day!",
]


def house_style(i: int) -> str:
    """Replies in a recognizable house style: what an app's own dictionary learns."""
    return f"{PHRASES[i % 4]} (ticket {i * 7919 % 100000}). {PHRASES[(i + 1) % 4]}"


def trained(dict_id: int) -> bytes:
    samples = ["\n".join(house_style(i + j) for j in range(1 + i % 5)).encode() for i in range(600)]
    return zstandard.train_dictionary(8192, samples, dict_id=dict_id, level=3).as_bytes()


def chat(n: int = 4) -> Context:
    ctx = Context.new(now=1_800_000_000)
    for i in range(n):
        ctx.add_turn("assistant" if i % 2 else "user", house_style(1000 + i), ts=1_800_000_000)
    return ctx


def test_a_registered_dictionary_seals_smaller_tokens_that_name_it() -> None:
    register_dictionary(201, trained(201))
    ring = Keyring.generate("k1")
    own, plain = Codec(ring, dictionary_id=201), Codec(ring, dictionary_id=0)
    token = own.seal(chat())
    assert envelope.parse(token).header.dictionary_id == 201
    assert [t.content for t in own.open(token).turns] == [house_style(1000 + i) for i in range(4)]
    assert Codec(ring).open(token).turns  # any codec in this process opens it
    assert len(token) < 0.8 * len(plain.seal(chat()))

    # Another process that has not registered it refuses the token with a clear code.
    script = (
        "import sys; from satchel import Codec, Keyring, BadToken\n"
        "try: Codec(Keyring.from_string(sys.argv[1])).open(sys.argv[2])\n"
        "except BadToken as e: print(e.code, e.facts.get('dictionary_id'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, ring.to_string(), token],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["token_unsupported_version", "201"]


def test_an_id_names_one_dictionary_forever() -> None:
    data = trained(203)
    register_dictionary(203, data)
    register_dictionary(203, data)  # the same bytes again: nothing happens
    with pytest.raises(ValueError, match="already registered"):
        register_dictionary(203, trained(204))


@pytest.mark.parametrize("bad_id", [0, 1, 127, 256, -1])
def test_satchel_ids_and_out_of_range_ids_are_refused(bad_id: int) -> None:
    with pytest.raises(ValueError, match="128-255"):
        register_dictionary(bad_id, trained(205))


def test_bytes_that_are_not_a_dictionary_are_refused() -> None:
    for junk in (b"", b"not a dictionary" * 10, b"\x37\xa4\x30\xec" + b"\x00" * 100):
        with pytest.raises(ValueError):
            register_dictionary(206, junk)
    with pytest.raises(TypeError):
        register_dictionary(True, trained(206))  # type: ignore[arg-type]


def test_flask_config_registers_and_writes_with_the_app_dictionary(tmp_path: Path) -> None:
    path = tmp_path / "house.zdict"
    path.write_bytes(trained(207))
    app = Flask("house")
    app.config.update(
        SATCHEL_KEYS=Keyring.generate("k1"),
        SATCHEL_DICTIONARIES={"207": str(path)},
        SATCHEL_DICTIONARY_ID="207",
        TESTING=True,
    )
    satchel = Satchel(app)

    @app.post("/say")
    def say() -> dict[str, int]:
        satchel.context.add_turn("user", house_style(len(satchel.context.turns)))
        return {"turns": len(satchel.context.turns)}

    client = app.test_client()
    token = client.post("/say").headers["Satchel-Context"]
    token = client.post("/say", headers={"Satchel-Context": token}).headers["Satchel-Context"]
    assert envelope.parse(token).header.dictionary_id == 207
    assert len(Satchel.state(app).codec.open(token).turns) == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"SATCHEL_DICTIONARY_ID": 250}, "SATCHEL_DICTIONARY_ID"),
        ({"SATCHEL_DICTIONARIES": {5: b"x"}}, "SATCHEL_DICTIONARIES"),
        ({"SATCHEL_DICTIONARIES": {208: "/no/such/file.zdict"}}, "SATCHEL_DICTIONARIES"),
        ({"SATCHEL_DICTIONARIES": ["not", "a", "mapping"]}, "SATCHEL_DICTIONARIES"),
    ],
)
def test_bad_dictionary_config_is_a_configuration_error(config: dict, message: str) -> None:
    app = Flask("bad")
    app.config.update(SATCHEL_KEYS=Keyring.generate("k1"), **config)
    with pytest.raises(ConfigurationError, match=message):
        Satchel(app)


def test_trainer_makes_an_app_dictionary_from_transcripts(tmp_path: Path) -> None:
    corpus = tmp_path / "chats.jsonl"
    with corpus.open("w") as fh:
        for c in range(40):
            turns = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": house_style(c * 10 + i)}
                for i in range(8)
            ]
            fh.write(json.dumps({"turns": turns}) + "\n")
    out = tmp_path / "instance" / "app.zdict"  # as the docs give it: instance/ not made yet
    trainer = str(ROOT / "tools" / "train_dictionary.py")
    args = ["--corpus", str(corpus), "--dict-id", "209", "--size", "8192", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, trainer, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this dictionary" in result.stdout and "SATCHEL_DICTIONARY_ID=209" in result.stdout
    data = out.read_bytes()
    assert zstandard.ZstdCompressionDict(data).dict_id() == 209
    register_dictionary(209, data)
    ring = Keyring.generate("k1")
    assert Codec(ring, dictionary_id=209).open(Codec(ring, dictionary_id=209).seal(chat(20)))


def test_the_trainer_never_writes_over_a_published_dictionary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as documented, the trainer wrote its output over chat-v1; the wire format has
    grown since chat-v1 was trained, so the bytes differ, and every token compressed
    with dictionary id 1 would have stopped decompressing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", ROOT / "tools" / "train_dictionary.py")
    assert spec is not None and spec.loader is not None
    trainer = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train", trainer)
    spec.loader.exec_module(trainer)
    published = tmp_path / "chat-v1.zdict"
    shipped = trainer.DICT_PATH.read_bytes()
    published.write_bytes(shipped[:-1] + bytes([shipped[-1] ^ 1]))  # any other bytes
    monkeypatch.setattr(trainer, "DICT_PATH", published)
    assert trainer.main([]) == 1
    assert published.read_bytes() == shipped[:-1] + bytes([shipped[-1] ^ 1])
    assert "never replaced" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "{not json\n", '{"turns": [{"role": "user"}]}\n'])
def test_the_trainer_names_a_corpus_it_cannot_read_in_one_line(
    content: str | None, tmp_path: Path
) -> None:
    """A missing --corpus file or a line that is no conversation was a traceback (and
    the trainer's own refusals went to stdout)."""
    corpus = tmp_path / "chats.jsonl"
    if content is not None:
        corpus.write_text(content)
    trainer = str(ROOT / "tools" / "train_dictionary.py")
    result = subprocess.run(
        [sys.executable, trainer, "--corpus", str(corpus), "--dict-id", "209",
         "--out", str(tmp_path / "app.zdict")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert str(corpus) in result.stderr and len(result.stderr.strip().splitlines()) == 1
