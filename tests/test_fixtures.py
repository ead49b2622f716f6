"""Golden tokens of every released schema and format version, and the spec's test vectors.

tests/fixtures/ holds a real token per released version with the test-only key ring
that made it; each must still open, with the right content, and migrate. The test
vectors are read from docs/token-format.md itself, so the document and the code
cannot drift apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import zstandard

from satchel import Codec, Key, Keyring, envelope, keys, protect, schema, serialize
from satchel.codec import DIGEST_SIZE
from satchel.compress import DICTIONARY_FILES
from satchel.errors import BadSignature, MigrationFailed, UnsupportedVersion
from satchel.keys import b64url_encode
from satchel.limits import Limits
from tests.fixtures import make_fixtures

FIXTURES = Path(__file__).parent / "fixtures"
DOC = Path(__file__).parents[1] / "docs" / "token-format.md"
RECORDS = sorted(FIXTURES.glob("*.json"))


def load(record_path: Path) -> tuple[dict[str, Any], str]:
    record = json.loads(record_path.read_text(encoding="utf-8"))
    token = (FIXTURES / record["token_file"]).read_text(encoding="ascii").strip()
    return record, token


def opener(record: dict[str, Any], ring: Keyring | None = None) -> Codec:
    algorithm = record["algorithm"] if record["mode"] == "sealed" else "aes-256-gcm"
    return Codec(
        ring or make_fixtures.load_keyring(),
        record["mode"],
        purpose=record["purpose"],
        algorithm=algorithm,
    )


# -- the fixture set itself ---------------------------------------------------------------


def test_keys_are_marked_test_only() -> None:
    assert "test-only" in (FIXTURES / "README.md").read_text().lower()
    assert "TEST-ONLY" in (FIXTURES / "keys.txt").read_text()
    assert make_fixtures.load_keyring().kids == ["fx2", "fx1"]


def test_every_released_version_has_a_fixture() -> None:
    records = [load(p)[0] for p in RECORDS]
    assert {r["schema_version"] for r in records} == set(range(1, schema.CURRENT_VERSION + 1))
    assert {r["format"] + "." for r in records} == set(envelope.KNOWN_PREFIXES)
    current = [r for r in records if r["schema_version"] == schema.CURRENT_VERSION]
    assert {r["algorithm"] for r in current} == {
        "hmac-sha256",
        "aes-256-gcm",
        "chacha20-poly1305",
    }
    assert {r["compressed"] for r in records} == {True, False}
    assert {r["padded"] for r in records} == {True, False}
    # Every zstd dictionary id ever shipped has a token: its bytes may never change.
    assert {r["dictionary_id"] for r in records} == {0, *DICTIONARY_FILES}


def test_make_fixtures_regenerates_identical_files() -> None:
    built = make_fixtures.build_all()
    on_disk = {
        p.relative_to(FIXTURES).as_posix()
        for p in FIXTURES.rglob("*")
        if p.suffix in (".token", ".json", ".cookie")
    }
    assert set(built) == on_disk
    ring = make_fixtures.load_keyring()
    for name, text in built.items():
        stored = (FIXTURES / name).read_text(encoding="utf-8")
        if stored == text:
            continue
        # The libzstd that made them must make them again, byte for byte: anything else
        # is the generator drifting (a changed level rewrote six tokens once).
        assert zstandard.ZSTD_VERSION != make_fixtures.FIXTURE_ZSTD_VERSION, name
        # Only a different zstd encoder may change a compressed body; then the stored
        # token (what clients hold) must still open to exactly the same payload.
        if name.endswith(".cookie"):
            fx = next(
                f for f in make_fixtures.SESSION_FIXTURES if name.endswith(f"/{f.name}.cookie")
            )
            app = make_fixtures.session_app(fx, ring)
            codec = Codec(app.session_interface.get_keyring(app), fx.mode)
            at = make_fixtures.V2_TIME
            assert (
                codec.open_payload(stored.strip(), now=at)[1]
                == (codec.open_payload(text.strip(), now=at)[1])
            )
            continue
        assert name.endswith(".token"), name
        record = json.loads((FIXTURES / name.replace(".token", ".json")).read_text())
        assert record["compressed"], name
        codec = opener(record, ring)
        assert codec.open_payload(stored.strip())[1] == codec.open_payload(text.strip())[1]


# -- flask.session cookies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fx", make_fixtures.SESSION_FIXTURES, ids=[f.name for f in make_fixtures.SESSION_FIXTURES]
)
def test_a_flask_session_cookie_of_an_earlier_release_still_reads(fx: Any) -> None:
    """The session interface's payload (kind, version, tagged JSON) and its keys taken
    from SECRET_KEY (a long one, a short one stretched first; key id "f" + a hash) or
    SATCHEL_KEYS: a change to any of them would sign every user out, and only these
    golden cookies would notice. Read through a real request, as Flask reads it."""
    from flask import session

    from satchel import SatchelSessionInterface

    folder = FIXTURES / make_fixtures.SESSION_DIR
    record = json.loads((folder / f"{fx.name}.json").read_text())
    cookie = (folder / record["cookie_file"]).read_text(encoding="ascii").strip()
    app = make_fixtures.session_app(fx, make_fixtures.load_keyring())
    # Read a minute after it was written (inside PERMANENT_SESSION_LIFETIME).
    app.session_interface = SatchelSessionInterface(clock=lambda: record["issued_at"] + 60.0)
    assert envelope.parse(cookie).header.kid == record["kid"]
    assert envelope.parse(cookie).header.mode == record["mode"] == fx.mode
    expected = app.session_interface.serializer.loads(record["session"])
    seen: dict[str, Any] = {}

    @app.get("/")
    def read() -> str:
        seen.update(session)
        return "ok"

    client = app.test_client()
    client.set_cookie("session", cookie)
    assert client.get("/").status_code == 200
    assert seen == expected
    assert type(seen["cart"]) is tuple and seen["seen"].tzinfo is not None


# -- each fixture opens, with the right content, and migrates --------------------------------


@pytest.mark.parametrize("record_path", RECORDS, ids=[p.stem for p in RECORDS])
def test_fixture_opens_with_expected_content(record_path: Path) -> None:
    record, token = load(record_path)
    codec = opener(record)
    opened = codec.open_verbose(token, now=record["issued_at"])
    header = opened.header
    assert token.startswith(record["format"] + ".")
    assert header.kid == record["kid"]
    assert header.mode == record["mode"]
    assert header.algorithm == record["algorithm"]
    assert header.compressed == record["compressed"]
    assert header.dictionary_id == record["dictionary_id"]
    assert header.padded == record["padded"]
    if header.padded:
        assert len(envelope.parse(token).raw) % 256 == 0
    assert (header.issued_at, header.expires_at) == (record["issued_at"], record["expires_at"])
    ctx = opened.context
    assert ctx.opened_version == record["schema_version"]
    assert ctx.schema_version == schema.CURRENT_VERSION
    assert make_fixtures.content_of(ctx) == record["content"]
    # Tokens made with the older key open, and ask to be resealed under the newest.
    assert codec.needs_reseal(ctx) == (record["kid"] != "fx2")


@pytest.mark.parametrize("record_path", RECORDS, ids=[p.stem for p in RECORDS])
def test_fixture_reseals_as_the_current_version(record_path: Path) -> None:
    record, token = load(record_path)
    codec = opener(record)
    ctx = codec.open(token)
    resealed = codec.seal(ctx)
    assert envelope.parse(resealed).header.kid == "fx2"
    again = codec.open(resealed)
    assert again.opened_version == schema.CURRENT_VERSION
    content = make_fixtures.content_of(again)
    expected = dict(record["content"], seq=record["content"]["seq"] + 1)
    assert content == expected


def test_fixtures_need_their_keys() -> None:
    record, token = load(FIXTURES / "schema2-s1-signed.json")
    with pytest.raises(BadSignature):
        opener(record, Keyring([Key("fx2", b"not the fixture key!" * 2)])).open(token)


def test_schema1_fields_migrate_as_documented() -> None:
    record, token = load(FIXTURES / "schema1-s1-signed.json")
    ctx = opener(record).open(token)
    v1 = make_fixtures.v1_full()
    assert ctx.session_id.hex() == v1["session_id"]
    assert ctx.pinned.system == v1["system_prompt"] and ctx.pinned.facts == []
    assert ctx.summary == v1["summary"]
    assert ctx.metadata == v1["metadata"]
    assert (ctx.seq, ctx.created_at, ctx.last_active) == (7, v1["created"], v1["updated"])
    assert [(t.role, t.content, t.ts) for t in ctx.turns] == [
        (t["role"], t["content"], t["ts"]) for t in v1["turns"]
    ]


def test_schema2_fixture_keeps_opaque_blocks_and_tool_calls() -> None:
    record, token = load(FIXTURES / "schema2-s1-sealed-chacha.json")
    ctx = opener(record).open(token)
    assert ctx.turns[2].blocks[0].data == bytes(range(256)) + b"\x00\xff"
    assert [c.id for c in ctx.turns[2].tool_calls] == ["call_1", "call_2"]
    assert [t.tool_call_id for t in ctx.turns[3:5]] == ["call_1", "call_2"]
    assert ctx.metadata["big"] == 2**63 and ctx.metadata["raw"] == b"\x00\x01"


# -- versions this release does not know --------------------------------------------------


def _fixture_codec() -> Codec:
    return Codec(Keyring([make_fixtures.load_keyring().get("fx2")]), "sealed")


def test_future_schema_version_is_refused() -> None:
    wire = make_fixtures.v2_minimal() | {"v": 99}
    token, _ = _fixture_codec().seal_payload(serialize.pack(wire))
    with pytest.raises(UnsupportedVersion) as info:
        _fixture_codec().open(token)
    assert info.value.code == "token_unsupported_version"


def test_future_format_prefix_is_refused() -> None:
    _record, token = load(FIXTURES / "schema2-s1-sealed-aesgcm.json")
    for prefix in ("s9.", "s2."):
        with pytest.raises(UnsupportedVersion) as info:
            _fixture_codec().open(prefix + token[3:])
        assert info.value.code == "token_unsupported_version"


def test_schema1_payload_missing_required_fields_fails_migration() -> None:
    codec = _fixture_codec()
    broken = make_fixtures.v1_full()
    del broken["session_id"]
    token, _ = codec.seal_payload(serialize.pack(broken))
    with pytest.raises(MigrationFailed) as info:
        codec.open(token)
    assert info.value.code == "token_migration_failed"
    turnless = make_fixtures.v1_full()
    del turnless["turns"][1]["content"]
    token, _ = codec.seal_payload(serialize.pack(turnless))
    with pytest.raises(MigrationFailed):
        codec.open(token)


# -- docs/token-format.md test vectors -------------------------------------------------------

_BLOCK = re.compile(r"^```(vector|subkeys)\n(.*?)^```", re.S | re.M)


def _fields(body: str) -> dict[str, str]:
    """``label value`` lines; indented lines continue the previous value."""
    fields: dict[str, str] = {}
    last = None
    for line in body.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            assert last is not None
            fields[last] += line.strip()
        else:
            label, _, value = line.partition(" ")
            fields[label] = value.strip()
            last = label
    return fields


def doc_blocks(kind: str) -> list[dict[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    return [_fields(body) for k, body in _BLOCK.findall(text) if k == kind]


def _ring(field: str) -> Keyring:
    kid, _, secret_hex = field.partition(":")
    return Keyring([Key(kid, bytes.fromhex(secret_hex))])


def test_doc_lists_vectors_for_every_mode() -> None:
    vectors = doc_blocks("vector")
    assert len(vectors) >= 5
    assert {v["algorithm"] for v in vectors} == {
        "hmac-sha256",
        "aes-256-gcm",
        "chacha20-poly1305",
    }
    assert {envelope.parse(v["token"]).header.compressed for v in vectors} == {True, False}
    assert len(doc_blocks("subkeys")) == 1


def test_doc_subkeys_match_the_derivation() -> None:
    (block,) = doc_blocks("subkeys")
    ring = _ring(block["key"])
    uses = [k for k in block if k not in ("key", "purpose")]
    assert sorted(uses) == ["aes-256-gcm", "chacha20-poly1305", "mac"]
    for use in uses:
        assert ring.derive(ring.current.kid, block["purpose"], use).hex() == block[use]


@pytest.mark.parametrize("vector", doc_blocks("vector"), ids=lambda v: v["name"])
def test_doc_vector_is_reproduced_exactly(vector: dict[str, str]) -> None:
    ring = _ring(vector["key"])
    nonce = b"" if vector["nonce"] == "-" else bytes.fromhex(vector["nonce"])
    issued, expires = int(vector["issued"]), int(vector["expires"])
    codec = Codec(
        ring,
        vector["mode"],
        purpose=vector["purpose"],
        algorithm=vector["algorithm"] if vector["mode"] == "sealed" else "aes-256-gcm",
        dictionary_id=0,
        clock=lambda: issued,
        random_bytes=lambda n: nonce[:n],
    )
    payload = bytes.fromhex(vector["payload"])
    env = envelope.parse(vector["token"])
    # The token is determined by the key, header, nonce and body. The body of a
    # compressed vector is zstd's output, which another zstd release may spell
    # differently (any release decompresses it), so the envelope is rebuilt from the
    # vector's own body; the payload itself is sealed end to end where zstd agrees.
    body = codec.protector.unprotect(env.header.kid, env.header_bytes, env.body)
    header = envelope.pack_header(
        env.header.flags, env.header.dictionary_id, ring.current.kid, issued, expires
    )
    rebuilt = header + codec.protector.protect(ring.current.kid, b"s1." + header, body)
    assert envelope.encode(rebuilt) == vector["token"]
    token, _raw = codec.seal_payload(payload, expires_at=expires)
    if not env.header.compressed or codec.compressor.compress(payload).data == body:
        assert token == vector["token"]
    # ... and it opens to the payload, with the header the doc describes.
    env, opened = codec.open_payload(vector["token"], now=issued)
    assert opened == payload
    assert env.header.issued_at == issued and env.header.expires_at == expires
    assert env.header.algorithm == vector["algorithm"]
    assert env.header.kid == ring.current.kid
    if nonce:
        assert env.body[:12] == nonce
    ctx = codec.open(vector["token"], now=issued)
    assert ctx.session_id == bytes(range(16, 32))
    assert ctx.opened_version == 2


def test_doc_worked_example_matches_the_first_vector() -> None:
    text = DOC.read_text(encoding="utf-8")
    first = doc_blocks("vector")[0]
    raw = envelope.parse(first["token"]).raw
    size = int(re.search(r"The token decodes to (\d+) bytes", text).group(1))
    assert size == len(raw)
    mac = raw[-32:]
    assert f"{mac[:4].hex(' ')} ... {mac[-3:].hex(' ')}" in text
    header_hex = raw[:16].hex(" ")
    assert header_hex.startswith("01 00 00 02 74 76")
    assert "payload (44 bytes" in text and len(bytes.fromhex(first["payload"])) == 44


def test_doc_vector_key_is_not_a_fixture_key() -> None:
    (block,) = doc_blocks("subkeys")
    secret = bytes.fromhex(block["key"].partition(":")[2])
    assert b64url_encode(secret) not in (FIXTURES / "keys.txt").read_text()


def test_doc_limits_table_matches_the_defaults() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)`\s*\|\s*([\d ]+?)(?: s)?\s*\|", text, re.M))
    defaults = Limits()
    documented = {name: int(value.replace(" ", "")) for name, value in rows.items()}
    assert documented == {
        name: getattr(defaults, name)
        for name in (
            "max_token_bytes",
            "max_decompressed_bytes",
            "max_str_bytes",
            "max_array_len",
            "max_map_len",
            "clock_skew",
        )
    }


def test_doc_derivation_constants_match_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f'salt = "{keys._HKDF_SALT.decode()}"' in text
    assert "info = purpose || 0x00 || use" in text
    assert f"({protect.MAC_SIZE}-byte tag" in text
    assert f"nonce ({protect.NONCE_SIZE} bytes)" in text
    assert f"tag ({protect.TAG_SIZE} bytes)" in text
    assert f"last {DIGEST_SIZE} bytes of its raw form" in text
