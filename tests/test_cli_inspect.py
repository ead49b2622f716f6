"""``satchel inspect TOKEN``, run as the installed console script in a subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from satchel.codec import Codec
from satchel.context import Context
from satchel.flask_ext import Satchel
from satchel.keys import Keyring
from satchel.schema import CURRENT_VERSION as SCHEMA_VERSION
from tests.support.env import satchel_command, satchel_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
KEYS = Keyring.generate("cli1")


def strict_json(text: str) -> Any:
    """Parse as RFC 8259 JSON: NaN and Infinity are not JSON (jq refuses them)."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def run(
    *args: str, keys: str | None = None, stdin: str | None = None, **env_vars: str
) -> tuple[int, Any, str]:
    env = satchel_env(keys, **env_vars)
    proc = subprocess.run(
        [*satchel_command(), "inspect", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = strict_json(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out, proc.stderr


def mint(mode: str = "sealed", *, keys: Keyring = KEYS, expires_at: float | None = None) -> str:
    ctx = Context.new(now=time.time())
    ctx.add_turn("user", "What are the shop hours?")
    ctx.add_turn("assistant", "Nine to six, Monday to Saturday.")
    return Codec(keys, mode=mode).seal(ctx, expires_at=expires_at)


def tamper(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


@pytest.mark.parametrize("mode", ["sealed", "signed"])
def test_prints_header_and_context(mode: str) -> None:
    token = mint(mode)
    code, out, err = run(token, keys=KEYS.to_string())
    assert code == 0, err
    assert out["verified"] is True
    header = out["header"]
    assert header["kid"] == "cli1"
    assert header["mode"] == mode
    assert header["length"] == len(token)
    assert header["expires_at"] is None
    assert [t["content"] for t in out["context"]["turns"]] == [
        "What are the shop hours?",
        "Nine to six, Monday to Saturday.",
    ]
    assert out["context"]["seq"] == 1
    assert len(bytes.fromhex(out["digest"])) > 0


def test_reads_the_token_from_stdin() -> None:
    code, out, _ = run("-", keys=KEYS.to_string(), stdin=mint() + "\n")
    assert code == 0 and out["verified"] is True


def test_golden_tokens_of_older_releases_open_and_report_the_migration() -> None:
    keys = ",".join(
        line.strip()
        for line in (FIXTURES / "keys.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    for name in ("schema1-s1-signed", "schema2-s1-sealed-chacha"):
        token = (FIXTURES / f"{name}.token").read_text().strip()
        expected = json.loads((FIXTURES / f"{name}.json").read_text())
        # Sealed long ago: the app's default idle TTL and maximum age refuse them
        # (checked below), so they are looked into with both off, as docs say.
        code, out, err = run(token, keys=keys, SATCHEL_IDLE_TTL="none", SATCHEL_MAX_AGE="none")
        assert code == 0, (name, err)
        assert out["header"]["kid"] == expected["kid"]
        assert out["header"]["algorithm"] == expected["algorithm"]
        migrated = expected["schema_version"] != SCHEMA_VERSION
        assert out["migrated_from"] == (expected["schema_version"] if migrated else None)
        assert out["context"]["session_id"] == expected["content"]["session_id"]


def test_tampered_token_exits_1_with_bad_signature() -> None:
    code, out, _ = run(tamper(mint()), keys=KEYS.to_string())
    assert code == 1
    assert out["verified"] is False
    assert out["error"]["code"] == "token_bad_signature"
    assert "context" not in out


def test_expired_token_exits_1_with_token_expired() -> None:
    code, out, _ = run(mint(expires_at=time.time() - 3600), keys=KEYS.to_string())
    assert code == 1
    assert out["error"]["code"] == "token_expired"


def test_wrong_keys_exit_1_with_unknown_key() -> None:
    code, out, _ = run(mint(), keys=Keyring.generate("other").to_string())
    assert code == 1
    assert out["error"]["code"] == "token_unknown_key"


def test_same_kid_other_secret_is_a_bad_signature() -> None:
    code, out, _ = run(mint(), keys=Keyring.generate("cli1").to_string())
    assert code == 1
    assert out["error"]["code"] == "token_bad_signature"


def test_no_verify_prints_only_the_header_without_keys() -> None:
    token = mint(expires_at=time.time() + 600)
    code, out, _ = run("--no-verify", token)
    assert code == 0
    assert out["verified"] is False
    assert set(out) == {"verified", "header"}
    assert out["header"]["kid"] == "cli1"
    assert out["header"]["mode"] == "sealed"
    assert out["header"]["expires_at"] > time.time()
    # a sealed token's content is not in the output, even its plain words
    assert "shop hours" not in json.dumps(out)


def test_no_keys_exits_2() -> None:
    code, out, err = run(mint())
    assert code == 2
    assert out is None
    assert "SATCHEL_KEYS" in err


@pytest.mark.parametrize("command", ["inspect", "erase"])
@pytest.mark.parametrize("given", ["option", "environment"])
@pytest.mark.parametrize("purpose", ["", "ab\udcff"])  # the latter: a byte not UTF-8
def test_a_purpose_that_cannot_scope_keys_exits_2_with_one_line(
    command: str, given: str, purpose: str
) -> None:
    """An empty purpose (``--purpose ""``, or ``SATCHEL_PURPOSE`` set but empty), or one
    that is not UTF-8, reached the codec's ValueError: a traceback, and exit 1, which
    says "token refused"."""
    args = ["--purpose", purpose] if given == "option" else []
    extra = {"SATCHEL_PURPOSE": purpose} if given == "environment" else {}
    target = mint() if command == "inspect" else "00112233445566778899aabbccddeeff"
    proc = subprocess.run(
        [*satchel_command(), command, *args, target],
        env=satchel_env(KEYS.to_string(), SATCHEL_OVERFLOW_URL="memory://", **extra),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "purpose must be a non-empty str" in proc.stderr.strip().splitlines()[-1]


def test_malformed_token_exits_1() -> None:
    code, out, _ = run("not-a-token", keys=KEYS.to_string())
    assert code == 1
    assert out["error"]["code"] == "token_malformed"


def test_inspect_opens_tokens_of_an_app_dictionary_given_with_dictionary(tmp_path: Path) -> None:
    from satchel.compress import register_dictionary
    from tests.test_dictionaries import chat, trained

    data = trained(210)
    register_dictionary(210, data)
    path = tmp_path / "app.zdict"
    path.write_bytes(data)
    token = Codec(KEYS, dictionary_id=210).seal(chat())
    code, out, _ = run(token, keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "token_unsupported_version"
    code, out, _ = run(token, "--dictionary", f"210={path}", keys=KEYS.to_string())
    assert code == 0 and out["verified"] and out["header"]["dictionary_id"] == 210
    assert len(out["context"]["turns"]) == 4
    code, _, err = run(token, "--dictionary", f"210={tmp_path / 'missing'}", keys=KEYS.to_string())
    assert code == 2 and "--dictionary" in err


def test_a_server_mode_carrier_is_verified_and_its_stored_context_opened(
    redis_server: Any,
) -> None:
    """``sv1.`` carriers hold no context: inspect verifies the signature, names the store
    key and, given the store, opens what is stored there like a token."""
    from examples.minimal_chat.app import create_app

    app = create_app(
        {"SATCHEL_KEYS": KEYS.to_string(), "SATCHEL_MODE": "server", "TESTING": True}
        | {"SATCHEL_STORE_URL": redis_server.url}
    )
    carrier = (
        app.test_client()
        .post("/api/chat", json={"message": "Where is my parcel?"})
        .headers["Satchel-Context"]
    )
    assert carrier.startswith("sv1.")

    code, out, _ = run(carrier, "--store-url", redis_server.url, keys=KEYS.to_string())
    assert code == 0, out
    out_before = out
    assert out["verified"] is True and out["carrier"] == "server"
    assert out["store_key"].endswith(":ctx") and len(out["session_id"]) == 32
    assert out["context"]["turns"][0]["content"] == "Where is my parcel?"
    assert out["header"]["mode"] == "sealed"

    code, out, _ = run(carrier, keys=KEYS.to_string())  # no store: the carrier alone
    assert code == 0 and out["context"] is None and out["session_id"]
    code, out, _ = run(carrier, "--no-verify")
    assert code == 0 and out == {
        "verified": False,
        "carrier": "server",
        "session_id": out["session_id"],
    }
    code, out, _ = run(tamper(carrier), keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "token_bad_signature"
    # Another session's context copied over this one's key: refused as the app refuses
    # it, not "verified" with another user's conversation under this carrier.
    other = app.test_client().post("/api/chat", json={"message": "someone else's"})
    other_key = run(other.headers["Satchel-Context"], keys=KEYS.to_string())[1]["store_key"]
    client = redis_server.client()
    client.set(out_before["store_key"], client.get(other_key))
    code, out, _ = run(carrier, "--store-url", redis_server.url, keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "token_invalid_context", out
    # ...saying which key holds the bad value (the carrier itself verified), as for a
    # missing or erased context: these facts were dropped
    assert out["verified"] is True and out["store_key"] == out_before["store_key"]
    assert out["session_id"] == out_before["session_id"]
    # A foreign value at the key, not even ASCII: refused like a bad token.
    redis_server.client().set(out_before["store_key"], b"\xff not a token")
    code, out, _ = run(carrier, "--store-url", redis_server.url, keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "token_malformed"
    assert out["store_key"] == out_before["store_key"]
    redis_server.flushall()
    code, out, _ = run(carrier, "--store-url", redis_server.url, keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "session_not_found"

    # Erased: said so, as the app answers (410 token_erased), not merely missing.
    fresh = app.test_client().post("/api/chat", json={"message": "Forget me"})
    carrier = fresh.headers["Satchel-Context"]
    session_id = run(carrier, keys=KEYS.to_string())[1]["session_id"]
    with app.app_context():
        Satchel.state(app).extension.erase(session_id)
    code, out, _ = run(carrier, "--store-url", redis_server.url, keys=KEYS.to_string())
    assert code == 1 and out["error"]["code"] == "token_erased"
    assert (
        app.test_client()
        .post("/api/chat", json={"message": "hi"}, headers={"Satchel-Context": carrier})
        .status_code
        == 410
    )


def test_output_is_strict_json_with_bytes_and_non_finite_numbers_tagged() -> None:
    """inf and NaN printed as Infinity and NaN (not JSON: jq refuses the whole output),
    and bytes as bare hex, the same as a str of hex digits."""
    from satchel.context import ToolCall

    ctx = Context.new(now=time.time())
    ctx.metadata = {
        "raw": b"\x01",
        "hex": "01",
        "nan": float("nan"),
        "big": float("inf"),
        "small": float("-inf"),
        "fine": 1.5,
        "looks_tagged": {"$bytes": "01"},
        "deep": [b"\xff", {"x": float("nan")}],
    }
    ctx.add_turn("user", "hi")
    ctx.add_turn("assistant", "", tool_calls=[ToolCall("c1", "f", {"blob": b"\x02", "n": 2})])
    code, out, err = run(Codec(KEYS).seal(ctx), keys=KEYS.to_string())
    assert code == 0, err
    meta = out["context"]["metadata"]
    assert meta["raw"] == {"$bytes": "01"} and meta["hex"] == "01"
    assert meta["nan"] == {"$float": "NaN"}
    assert meta["big"] == {"$float": "Infinity"} and meta["small"] == {"$float": "-Infinity"}
    assert meta["fine"] == 1.5
    assert meta["looks_tagged"] == {"$map": {"$bytes": "01"}}  # a map, not bytes
    assert meta["deep"] == [{"$bytes": "ff"}, {"x": {"$float": "NaN"}}]
    turns = out["context"]["turns"]
    assert turns[1]["tool_calls"][0]["arguments"] == {"blob": {"$bytes": "02"}, "n": 2}
    assert out["context"]["session_id"] == ctx.session_id.hex()  # ids stay plain hex


def keygen(*args: str, keys: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*satchel_command(), "keygen", *args],
        env=satchel_env(keys),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_keygen_prints_a_key_and_appends_in_front_of_the_ring() -> None:
    alone = keygen("--kid", "k2")
    assert alone.returncode == 0
    assert Keyring.from_string(alone.stdout.strip()).kids == ["k2"]
    ring = keygen("--kid", "k3", "--append", keys=KEYS.to_string())
    assert ring.returncode == 0
    assert Keyring.from_string(ring.stdout.strip()).kids == ["k3", "cli1"]  # newest first
    # The ring as the variable held it, stray spaces and a trailing comma included:
    # written back as parsed, the same keys in one clean line.
    messy = keygen("--kid", "k3", "--append", keys=f"  {KEYS.to_string()} ,\n")
    assert messy.returncode == 0
    line = messy.stdout.strip()
    assert " " not in line and "\n" not in line and not line.endswith(",")
    assert line.endswith("," + KEYS.to_string())


def test_keygen_refuses_to_print_a_ring_no_app_would_load() -> None:
    duplicate = keygen("--kid", "cli1", "--append", keys=KEYS.to_string())
    assert duplicate.returncode == 2 and duplicate.stdout == ""
    assert "already has a key 'cli1'" in duplicate.stderr
    broken = keygen("--append", keys="k1:not base64!")
    assert broken.returncode == 2 and "SATCHEL_KEYS" in broken.stderr
    assert "not base64!" not in broken.stderr  # never the secret
    # The runbook's SATCHEL_KEYS="$CURRENT_KEYS" with the variable mistyped: a ring of
    # the new key alone would refuse every token the current keys sealed.
    for nothing in ("", "  ", None):
        empty = keygen("--append", keys=nothing)
        assert empty.returncode == 2 and empty.stdout == "", nothing
        assert "empty or unset" in empty.stderr


def test_keygen_alone_refuses_a_kid_the_ring_already_has() -> None:
    """Every call makes a new secret: printing a key alone under a kid $SATCHEL_KEYS
    already holds is a second secret for that kid (a key-rotation drill built the first
    deploy's ring that way, and every token one replica sealed was a bad signature on
    the other). Refused, exit 2, nothing printed; another kid still prints."""
    again = keygen("--kid", "cli1", keys=KEYS.to_string())
    assert again.returncode == 2 and again.stdout == ""
    assert "already has a key 'cli1'" in again.stderr and "new secret" in again.stderr
    other = keygen("--kid", "k9", keys=KEYS.to_string())
    assert other.returncode == 0
    assert Keyring.from_string(other.stdout.strip()).kids == ["k9"]


def test_keygen_append_warns_about_a_secret_that_looks_cut_short() -> None:
    """The app warns about such a secret; `keygen --append` said nothing and wrote the
    ring back canonical, so the app loading its output did not warn either."""
    from satchel.keys import b64url_decode, generate_key, is_canonical_b64url

    while True:  # a secret whose last character was lost in a paste
        cut = generate_key("k1").to_string()[:-1]
        secret = cut.split(":", 1)[1]
        if not is_canonical_b64url(secret, b64url_decode(secret)):
            break
    ring = keygen("--kid", "k2", "--append", keys=cut)
    assert ring.returncode == 0
    (warning,) = ring.stderr.strip().splitlines()
    assert warning.startswith("satchel: warning:") and "cut short" in warning
    assert secret not in ring.stderr


def test_the_parent_is_the_token_it_was_made_from_and_the_digest_its_own() -> None:
    """An operator tracing a fork chains tokens: each names its parent's digest."""
    codec = Codec(KEYS)
    ctx = Context.new(now=time.time())
    ctx.add_turn("user", "one")
    first = codec.seal(ctx)
    ctx = codec.open(first)
    ctx.add_turn("user", "two")
    second = codec.seal(ctx)
    _, one, _ = run(first, keys=KEYS.to_string())
    code, two, err = run(second, keys=KEYS.to_string())
    assert code == 0, err
    assert one["context"]["parent"] is None  # the first token of a conversation
    assert two["context"]["parent"] == one["digest"] != two["digest"]


def test_a_context_past_the_apps_idle_ttl_or_maximum_age_is_refused_as_the_app_refuses_it() -> None:
    """inspect checked only the envelope's expiry: a token the app refuses as
    token_expired (its context idle or old past SATCHEL_IDLE_TTL / SATCHEL_MAX_AGE,
    lowered since it was sealed, or a token sealed without an expiry) printed
    verified: true, exit 0."""
    now = time.time()
    ctx = Context.new(now=now - 40 * 86400)  # created 40 days ago, used 10 days ago
    ctx.add_turn("user", "What are the shop hours?")
    ctx.last_active = int(now - 10 * 86400)
    token = Codec(KEYS).seal(ctx)  # no expiry in the envelope
    keys = KEYS.to_string()
    code, out, _ = run(token, keys=keys)
    assert code == 1 and out["error"]["code"] == "token_expired"  # the defaults: 30 days
    code, out, _ = run(token, keys=keys, SATCHEL_MAX_AGE="none")
    assert code == 1 and "idle" in out["error"]["message"]  # 7 days idle, by default
    code, out, _ = run(token, keys=keys, SATCHEL_MAX_AGE="none", SATCHEL_IDLE_TTL="2592000")
    assert code == 0 and out["verified"] is True
    code, out, err = run(token, keys=keys, SATCHEL_IDLE_TTL="soon")
    assert code == 2 and "SATCHEL_IDLE_TTL" in err
    # Parsed, then checked as the app checks it: 0 was a ValueError traceback.
    code, out, err = run(token, keys=keys, SATCHEL_MAX_AGE="0")
    assert code == 2 and out is None and "max_age" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_version_is_the_packages_one_and_the_installed_distributions() -> None:
    """``satchel --version`` did not exist, and the version was written twice (pyproject
    and ``satchel.__version__``); pyproject now reads it from the package."""
    import importlib.metadata

    import satchel

    proc = subprocess.run(
        [*satchel_command(), "--version"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"satchel {satchel.__version__}"
    assert importlib.metadata.version("satchel") == satchel.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        'dynamic = ["version"]' in pyproject
        and "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
    )


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C (in `bench chaos`, `compare`, or `inspect -` waiting on stdin) printed a
    KeyboardInterrupt traceback; the benches' own finally blocks do the cleanup."""
    from satchel import cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "-"]) == 130
    assert capsys.readouterr().err == "satchel: interrupted\n"


def test_a_reader_that_leaves_early_is_exit_141_not_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`satchel inspect BAD | head -c0` under pipefail exited 0: the broken pipe hid the
    refused token's exit 1. 141 is what a shell reports for a writer killed by SIGPIPE."""
    from satchel import cli

    def reader_gone(args: object) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(cli, "cmd_inspect", reader_gone)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # main closes it, as the pipe is gone
    assert cli.main(["inspect", "-"]) == 141


def test_the_command_ends_by_sigint_after_ctrl_c_so_a_calling_script_stops() -> None:
    """An exit status of 130 tells a shell the command handled Ctrl-C itself, and a
    script looping over `satchel` went on; ending by SIGINT (as an uncaught
    KeyboardInterrupt does, without its traceback) stops it."""
    import signal

    program = (
        "from satchel import cli\n"
        "def interrupted(args):\n"
        "    raise KeyboardInterrupt\n"
        "cli.cmd_inspect = interrupted\n"
        "cli.console_main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program, "inspect", "-"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stderr == "satchel: interrupted\n"


def test_a_memory_store_url_is_refused_not_reported_empty(tmp_path: Path) -> None:
    """A memory-mode app's store lives in its own process: inspect opened a new, empty
    one of its own and said session_not_found, as if the app had lost the context."""
    from examples.minimal_chat.app import create_app

    app = create_app({"SATCHEL_KEYS": KEYS.to_string(), "SATCHEL_MODE": "memory"})
    carrier = app.test_client().post("/api/chat", json={"message": "hi"})
    code, out, err = run(
        carrier.headers["Satchel-Context"], "--store-url", "memory://", keys=KEYS.to_string()
    )
    assert code == 2 and out is None
    assert "memory:// is a store inside the app's own process" in err
    # Nor with the memory-mode app's environment, whose overflow URL is the default
    # store URL here: no context of that app is ever stored there.
    code, out, err = run(
        carrier.headers["Satchel-Context"],
        keys=KEYS.to_string(),
        SATCHEL_MODE="memory",
        SATCHEL_OVERFLOW_URL=f"sqlite:///{tmp_path / 'overflow.db'}",
    )
    assert code == 2 and out is None and "SATCHEL_MODE=memory" in err
