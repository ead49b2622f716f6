"""``satchel erase SESSION_ID``, run as the console script against a real redis-server."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from examples.minimal_chat.app import create_app
from satchel import Codec
from satchel.keys import Keyring
from tests.support.env import satchel_command, satchel_env

ROOT = Path(__file__).resolve().parents[1]
KEYS = Keyring.generate("erase1")


def erase(*args: str, cwd: Path | None = None, **env_vars: str) -> tuple[int, Any, str]:
    env = satchel_env(KEYS.to_string(), **env_vars)
    proc = subprocess.run(
        [*satchel_command(), "erase", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr


def chat(client: Any, token: str | None, message: str) -> Any:
    headers = {"Satchel-Context": token} if token else {}
    return client.post("/api/chat", json={"message": message}, headers=headers)


def overflowed_token(client: Any) -> str:
    """Ten exchanges of text that does not compress: past a small budget, so some
    turns have moved to the tier. Returns the last token."""
    token = None
    for i in range(10):
        noise = hashlib.sha256(str(i).encode()).hexdigest()
        response = chat(client, token, f"message {i} {noise} {noise[::-1]}")
        assert response.status_code == 200
        token = response.headers["Satchel-Context"]
    assert token is not None
    return token


def test_erase_deletes_overflowed_turns_and_refuses_monotonic_tokens(redis_server: Any) -> None:
    app = create_app(
        {
            "SATCHEL_KEYS": KEYS.to_string(),
            "SATCHEL_OVERFLOW_URL": redis_server.url,
            "SATCHEL_MAX_TOKEN_BYTES": 900,
            "SATCHEL_CONSISTENCY": "monotonic",
            "TESTING": True,
        }
    )
    client = app.test_client()
    token = overflowed_token(client)
    ctx = Codec(KEYS).open(token)
    assert ctx.overflow, "the small budget should have moved turns to Redis"
    keys_before = redis_server.client().dbsize()

    code, out, err = erase(ctx.session, "--overflow-url", redis_server.url)
    assert code == 0, err
    assert out["tokens_refused"] is True and out["deleted_keys"] >= len(ctx.overflow)
    assert redis_server.client().dbsize() < keys_before
    refused = chat(client, token, "after erasure")
    assert refused.status_code == 410
    assert refused.get_json()["error"]["code"] == "token_erased"


def test_erase_reaches_a_server_mode_store(redis_server: Any) -> None:
    app = create_app(
        {
            "SATCHEL_KEYS": KEYS.to_string(),
            "SATCHEL_MODE": "server",
            "SATCHEL_STORE_URL": redis_server.url,
            "TESTING": True,
        }
    )
    client = app.test_client()
    carrier = chat(client, None, "remember my address").headers["Satchel-Context"]
    session = app.extensions["satchel"].pipeline.session_id_of(carrier).hex()
    code, out, err = erase(session, "--store-url", redis_server.url)
    assert code == 0, err
    assert out["deleted_keys"] >= 1 and out["tokens_refused"] is True
    # The erased id does not come back to life as a new, empty conversation.
    after = chat(client, carrier, "what is my address?")
    assert after.status_code == 410 and after.get_json()["error"]["code"] == "token_erased"
    assert client.get("/api/context", headers={"Satchel-Context": carrier}).status_code == 410


def test_erase_needs_a_tier_and_a_session_id(tmp_path: Path) -> None:
    code, _, err = erase("00" * 16)
    assert code == 2 and "SATCHEL_OVERFLOW_URL" in err
    # The id is refused before the tier is opened (this file does not exist).
    code, _, err = erase("not-a-session", "--overflow-url", f"sqlite:///{tmp_path}/t.db")
    assert code == 2 and "32 hexadecimal characters" in err
    # ...and before the settings are looked at: with none, it is still the id at fault.
    code, _, err = erase("not-a-session")
    assert code == 2 and "32 hexadecimal characters" in err


@pytest.mark.parametrize(
    "args",
    [
        ("--overflow-url", "memory://"),
        ("--store-url", "MEMORY://"),  # schemes are case-insensitive, as for the app
    ],
)
def test_a_memory_tier_url_is_refused(args: tuple[str, str]) -> None:
    """A memory:// tier lives in the app's process: the CLI used to open a new, empty
    one of its own, erase nothing in it and exit 0 with tokens_refused: true."""
    code, out, err = erase("00" * 16, *args)
    assert code == 2 and out is None
    assert "memory://" in err and args[0] in err and "Satchel.erase" in err


def test_a_memory_tier_url_next_to_a_real_one_erases_nothing(redis_server: Any) -> None:
    redis_server.client().set("satchel:{x}:seg", b"v")
    code, out, err = erase(
        "00" * 16, "--overflow-url", redis_server.url, "--store-url", "memory://"
    )
    assert code == 2 and out is None and "--store-url" in err
    assert redis_server.client().dbsize() == 1  # no tombstone either


def test_a_memory_mode_app_is_refused_and_erased_through_the_app(redis_server: Any) -> None:
    """Run with a memory-mode app's environment, erase used to write its tombstone in
    the SATCHEL_OVERFLOW_URL Redis, which such an app never reads (its contexts and
    tombstones live in its process), and exit 0 while the app kept serving the
    session."""
    env = {"SATCHEL_MODE": "memory", "SATCHEL_OVERFLOW_URL": redis_server.url}
    app = create_app({"SATCHEL_KEYS": KEYS.to_string(), **env, "TESTING": True})
    client = app.test_client()
    carrier = chat(client, None, "remember my address").headers["Satchel-Context"]
    state = app.extensions["satchel"]
    session = state.pipeline.session_id_of(carrier).hex()
    assert redis_server.client().dbsize() == 0  # the app keeps nothing in Redis

    code, out, err = erase(session, **env)
    assert code == 2 and out is None
    assert "SATCHEL_MODE=memory" in err and "Satchel.erase" in err
    assert redis_server.client().dbsize() == 0
    assert chat(client, carrier, "still here?").status_code == 200  # as the exit says

    # What the message points to does reach it.
    with app.app_context():
        result = state.extension.erase(session)
    assert result["tokens_refused"] is True and result["deleted_keys"] >= 1
    after = chat(client, carrier, "what is my address?")
    assert after.status_code == 410 and after.get_json()["error"]["code"] == "token_erased"


def test_a_relative_sqlite_url_from_another_directory_is_an_error(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """SATCHEL_OVERFLOW_URL=sqlite:///data/tier.db resolves from the current directory.
    Run from elsewhere, erase used to create an empty data/tier.db there, exit 0 with
    deleted_keys 0, and leave the real rows."""
    app_dir, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(app_dir)  # the app resolves its relative path from here
    url = "sqlite:///data/tier.db"
    app = create_app(
        {
            "SATCHEL_KEYS": KEYS.to_string(),
            "SATCHEL_OVERFLOW_URL": url,
            "SATCHEL_MAX_TOKEN_BYTES": 900,
            "TESTING": True,
        }
    )
    client = app.test_client()
    token = overflowed_token(client)
    ctx = Codec(KEYS).open(token)
    assert ctx.overflow and (app_dir / "data" / "tier.db").exists()

    code, out, err = erase(ctx.session, cwd=elsewhere, SATCHEL_OVERFLOW_URL=url)
    assert code == 2 and out is None
    assert str(elsewhere / "data" / "tier.db") in err  # the absolute path it looked at
    assert "current directory" in err and "SATCHEL_OVERFLOW_URL" in err
    assert not (elsewhere / "data").exists()

    code, out, err = erase(ctx.session, cwd=app_dir, SATCHEL_OVERFLOW_URL=url)
    assert code == 0, err
    assert out["deleted_keys"] >= len(ctx.overflow) and out["tokens_refused"] is True


@pytest.mark.parametrize("kind", ["app_db", "empty"])
def test_erase_refuses_a_sqlite_file_that_is_not_a_tier(tmp_path: Path, kind: str) -> None:
    """Pointed at the app's own database (or an empty file), erase switched it to WAL,
    created satchel_kv in it and exited 0. Now: exit 2, one line, the file untouched."""
    path = tmp_path / "app.db"
    if kind == "empty":
        path.write_bytes(b"")
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('alice')")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    code, out, err = erase("00" * 16, SATCHEL_OVERFLOW_URL=f"sqlite:///{path}")
    assert code == 2 and out is None, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "SATCHEL_OVERFLOW_URL" in lines[0] and str(path) in lines[0]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_bad_second_url_erases_nothing(redis_server: Any, tmp_path: Path) -> None:
    """Every URL is checked before anything is erased: a typo in --store-url must not
    leave the overflow tier erased and the store not."""
    redis_server.client().set("satchel:{x}:seg", b"v")
    code, _, err = erase(
        "00" * 16,
        "--overflow-url",
        redis_server.url,
        "--store-url",
        f"sqlite:///{tmp_path}/missing.db",
    )
    assert code == 2 and "--store-url" in err and "missing.db" in err
    assert redis_server.client().dbsize() == 1
    assert not (tmp_path / "missing.db").exists()


def test_with_several_keys_the_anchor_must_be_named(redis_server: Any) -> None:
    """An app anchored at a dedicated key (its ring k2,k1,anchor with SATCHEL_ANCHOR_KID):
    erase without the anchor found nothing under the names it guessed and reported
    success. Now it refuses (exit 2); named, it deletes the session's data."""
    from satchel.keys import generate_key

    ring = Keyring([generate_key("k2"), *Keyring.generate("k1").keys, generate_key("anchor")])
    anchored = {"SATCHEL_ANCHOR_KID": "anchor"}
    app = create_app(
        {
            "SATCHEL_KEYS": ring.to_string(),
            "SATCHEL_OVERFLOW_URL": redis_server.url,
            "SATCHEL_MAX_TOKEN_BYTES": 900,
            "TESTING": True,
            **anchored,
        }
    )
    client = app.test_client()
    token = overflowed_token(client)
    with app.app_context():
        session = app.extensions["satchel"].codec.open(token).session
    keys_before = redis_server.client().dbsize()

    def run(**env: str) -> tuple[int, Any, str]:
        proc = subprocess.run(
            [*satchel_command(), "erase", session, "--overflow-url", redis_server.url],
            env=satchel_env(ring.to_string(), **env),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.returncode, proc.stdout, proc.stderr

    code, out, err = run()
    assert code == 2 and not out.strip()
    assert "SATCHEL_ANCHOR_KID" in err and "'anchor'" in err
    assert redis_server.client().dbsize() == keys_before
    code, out, err = run(**anchored)
    assert code == 0, err
    assert json.loads(out)["deleted_keys"] >= 1
    assert redis_server.client().dbsize() < keys_before


def test_a_tier_that_fails_midway_is_named_with_what_was_erased(
    redis_server: Any, tmp_path: Path
) -> None:
    """Erasing the overflow tier and then a store that does not answer printed only the
    store's error: nothing said that the first tier was erased already, nor which URL
    failed."""
    from satchel.tiers import SQLiteTier

    db = tmp_path / "tier.db"
    SQLiteTier(db).put("satchel:{x}:seg", b"v", 60)
    redis_server.kill()
    code, out, err = erase(
        "00" * 16,
        "--overflow-url",
        f"sqlite:///{db}",
        "--store-url",
        redis_server.url,
    )
    assert code == 2 and out is None
    assert err.startswith("satchel erase: --store-url ($SATCHEL_STORE_URL) redis://")
    assert "already erased in --overflow-url ($SATCHEL_OVERFLOW_URL) sqlite:///" in err
    assert "run it again" in err


def test_the_tombstone_outlives_the_session_lifetimes_the_environment_gives(
    redis_server: Any,
) -> None:
    """The tombstone lived 31 days whatever the app's maximum age: an app whose
    sessions live 60 days took an erased session's tokens again after a month."""
    session = "ab" * 16
    tag = Codec(KEYS).session_tag(bytes.fromhex(session))
    redis = redis_server.client()
    code, _out, err = erase(session, SATCHEL_OVERFLOW_URL=redis_server.url)
    assert code == 0, err
    (mark,) = redis.keys(f"*{tag}*:hwm")
    assert 31 * 86400 - 5 <= redis.ttl(mark) <= 31 * 86400
    code, _out, err = erase(
        session, SATCHEL_OVERFLOW_URL=redis_server.url, SATCHEL_MAX_AGE=str(60 * 86400)
    )
    assert code == 0, err
    assert redis.ttl(mark) >= 60 * 86400
    code, out, err = erase(session, SATCHEL_OVERFLOW_URL=redis_server.url, SATCHEL_MAX_AGE="soon")
    assert code == 2 and out is None and "SATCHEL_MAX_AGE" in err


def test_erase_under_a_wrong_pinned_anchor_says_it_found_nothing(redis_server: Any) -> None:
    """A pinned SATCHEL_ANCHOR_KID that is not the app's looks in the wrong place: it
    reported success (exit 0, deleted_keys 0) and the token went on being served. It
    still cannot tell (0 is normal for a session that never spilled), but says so."""
    ring = Keyring.from_string(
        ",".join([Keyring.generate("new").to_string(), Keyring.generate("old").to_string()])
    )
    app = create_app(
        {
            "SATCHEL_KEYS": ring.to_string(),
            "SATCHEL_ANCHOR_KID": "old",
            "SATCHEL_OVERFLOW_URL": redis_server.url,
            "SATCHEL_MAX_TOKEN_BYTES": 900,
            "TESTING": True,
        }
    )
    client = app.test_client()
    token = overflowed_token(client)
    session = Codec(ring).open(token).session
    common = {"SATCHEL_KEYS": ring.to_string(), "SATCHEL_OVERFLOW_URL": redis_server.url}

    code, out, err = erase(session, **common, SATCHEL_ANCHOR_KID="new")
    assert code == 0 and out["deleted_keys"] == 0 and out["anchor_kid"] == "new"
    assert "nothing was stored" in err and "SATCHEL_ANCHOR_KID" in err
    assert chat(client, token, "still here").status_code == 200  # nothing was erased

    code, out, err = erase(session, **common, SATCHEL_ANCHOR_KID="old")
    assert code == 0 and out["deleted_keys"] >= 1 and out["anchor_kid"] == "old"
    assert "nothing was stored" not in err


def test_a_mode_the_app_would_refuse_is_refused_before_anything_is_erased(
    redis_server: Any,
) -> None:
    """SATCHEL_MODE=bogus stops the app at start-up; erase went ahead in an environment
    no app runs in."""
    code, out, err = erase("00" * 16, SATCHEL_MODE="sever", SATCHEL_OVERFLOW_URL=redis_server.url)
    assert code == 2 and out is None
    assert "SATCHEL_MODE must be 'client', 'server' or 'memory', not 'sever'" in err
    assert redis_server.client().dbsize() == 0
