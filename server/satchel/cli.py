"""``satchel``: keygen | inspect | erase | bench codec | bench chaos | compare.

Exit codes: 0 success, 1 the token was refused (inspect) or a target was missed
(bench with --check), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from . import __version__, schema, serialize
from .codec import Algorithm, Codec, Mode, peek
from .errors import BadToken, ConfigurationError, InvalidContext, SatchelError
from .keys import KEY_PURPOSE_RULE, Keyring, generate_key, is_key_purpose
from .lifecycle import LifecyclePolicy, check_age
from .schema import CURRENT_VERSION as SCHEMA_VERSION


def cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_key(args.kid)
    if args.append:
        current = os.environ.get("SATCHEL_KEYS", "").strip()
        if not current:
            # Appending to nothing printed a ring of the new key alone, exit 0: stored
            # as the new SATCHEL_KEYS (a mistyped "$CURRENT_KEYS"), it refuses every
            # token the old keys sealed. A first key is plain `satchel keygen`.
            print(
                "satchel keygen: --append needs the current ring in $SATCHEL_KEYS, which "
                "is empty or unset (for a first key, run without --append)",
                file=sys.stderr,
            )
            return 2
        try:
            ring = Keyring.from_string(current)
        except ConfigurationError as exc:
            print(f"satchel keygen: $SATCHEL_KEYS: {exc.message}", file=sys.stderr)
            return 2
        if key.kid in ring.kids:
            # The ring would hold one kid twice, which every app refuses to load.
            print(
                f"satchel keygen: $SATCHEL_KEYS already has a key {key.kid!r}; pass another --kid",
                file=sys.stderr,
            )
            return 2
        # Written back as parsed: the same keys, without the stray spaces, line breaks
        # or trailing comma the variable may hold.
        print(key.to_string() + "," + ring.to_string())
    else:
        if key.kid in _current_kids():
            # Each call makes a new secret: a key printed alone under a kid the ring
            # already has is a second secret for that kid (an operator running keygen
            # again for the first deploy's ring): replicas holding the two disagree, and
            # every token one seals is a bad signature on the other.
            print(
                f"satchel keygen: $SATCHEL_KEYS already has a key {key.kid!r}, and every "
                "call makes a new secret: take that key's entry from the ring you have "
                "(or pass another --kid)",
                file=sys.stderr,
            )
            return 2
        print(key.to_string())
    return 0


def _current_kids() -> list[str]:
    """The key ids of the ring in ``$SATCHEL_KEYS``; none when it is unset or does not
    parse (a first key needs no ring, and a broken one is the app's error to report)."""
    try:
        return Keyring.from_string(os.environ.get("SATCHEL_KEYS", "")).kids
    except ConfigurationError:
        return []


def _header_dict(token: str) -> dict[str, Any]:
    header = peek(token)
    return {
        "format_version": header.version,
        "mode": header.mode,
        "algorithm": header.algorithm,
        "compressed": header.compressed,
        "padded": header.padded,
        "dictionary_id": header.dictionary_id,
        "kid": header.kid,
        "issued_at": header.issued_at,
        "expires_at": header.expires_at or None,
        "length": len(token),
    }


def register_cli_dictionaries(values: Sequence[str] | None) -> None:
    """``--dictionary ID=PATH`` (repeatable): an app's own zstd dictionaries."""
    from .compress import register_dictionaries

    sources: dict[str, str] = {}
    for value in values or ():
        ident, sep, path = value.partition("=")
        if not sep:
            raise ConfigurationError(f"--dictionary {value}: expected ID=PATH")
        sources[ident] = path
    try:
        register_dictionaries(sources)
    except ValueError as exc:
        raise ConfigurationError(f"--dictionary: {exc}") from None


def _purpose(text: str) -> str:
    """A purpose as the app's SATCHEL_PURPOSE takes it; argparse's exit 2 (one line)
    otherwise, not the codec's ValueError (a traceback, and exit 1: "refused")."""
    if not is_key_purpose(text):
        raise argparse.ArgumentTypeError(
            f"the purpose must be {KEY_PURPOSE_RULE}, not {text!r} "
            "(from --purpose or SATCHEL_PURPOSE)"
        )
    return text


def _add_purpose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--purpose",
        type=_purpose,  # also applied to the default, read from the environment
        default=os.environ.get("SATCHEL_PURPOSE", "satchel"),
        help="the app's SATCHEL_PURPOSE (default: $SATCHEL_PURPOSE, else 'satchel')",
    )


def _add_dictionary_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dictionary",
        action="append",
        metavar="ID=PATH",
        help="register an app's own zstd dictionary (repeatable)",
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    register_cli_dictionaries(args.dictionary)
    token = args.token
    if token == "-":
        token = sys.stdin.read()
    token = token.strip()
    from .server_mode import CARRIER_PREFIX

    if token.startswith(CARRIER_PREFIX):
        return _inspect_carrier(token, args)
    return _inspect_token(token, args)


def _inspect_token(
    token: str, args: argparse.Namespace, *, expect_session: bytes | None = None, **extra: Any
) -> int:
    """``expect_session``: the session a server-mode carrier names; a stored context of
    another session is refused, as the app refuses it (token_invalid_context)."""
    try:
        header = _header_dict(token)
        if args.no_verify:
            _print_inspect({"verified": False, "header": header})
            return 0
        keyring = Keyring.from_env()
        header_obj = peek(token)
        algorithm = header_obj.algorithm if header_obj.sealed else "aes-256-gcm"
        codec = Codec(
            keyring,
            mode=cast(Mode, header_obj.mode),
            purpose=args.purpose,
            algorithm=cast(Algorithm, algorithm),
        )
        opened = codec.open_verbose(token)
        # The app also refuses a context past its idle TTL or maximum age (the token's
        # expiry covers both under the settings it was sealed with, not under lowered
        # ones, nor for a token sealed without one): as the app would, from the same
        # variables and defaults.
        policy = _lifecycle_from_env("SATCHEL_IDLE_TTL", "SATCHEL_MAX_AGE")
        check_age(opened.context, policy, time.time(), codec.limits.clock_skew)
        # Opening makes ctx.parent this token's own digest (the parent of the next
        # seal); an operator chaining tokens wants the parent sealed in this one.
        _env, payload = codec.open_payload(token)
        sealed_parent = schema.from_wire(serialize.unpack(payload, codec.limits)).parent
        if expect_session is not None and not hmac.compare_digest(
            opened.context.session_id, expect_session
        ):
            raise InvalidContext("the stored context belongs to another session")
    except (ConfigurationError, BadToken) as exc:
        return _refused(exc, **extra)
    ctx = opened.context
    context = ctx.to_dict()
    context["parent"] = sealed_parent.hex() if sealed_parent else None
    # The app's own values as they are (to_dict() writes bytes as bare hex, which reads
    # the same as a str of hex digits): _print_inspect tags them.
    context["metadata"] = ctx.metadata
    for turn, out in zip(ctx.turns, context["turns"], strict=True):
        for call, call_out in zip(turn.tool_calls, out.get("tool_calls", ()), strict=True):
            call_out["arguments"] = call.arguments
    _print_inspect(
        {
            "verified": True,
            **extra,
            "header": header,
            "digest": opened.digest.hex(),
            # The schema version the token was written in, only when it was migrated.
            "migrated_from": (ctx.opened_version if ctx.opened_version != SCHEMA_VERSION else None),
            "context": context,
        }
    )
    return 0


def _lifecycle_from_env(*names: str) -> LifecyclePolicy:
    """The lifecycle policy the app would build from the variables ``names`` (the rest
    at the app's defaults), parsed and checked as the app does: a bad value is a
    ConfigurationError naming it, as at the app's start-up."""
    from .flask_ext.config import SatchelConfig

    settings = {name: os.environ[name] for name in names if name in os.environ}
    return SatchelConfig.from_settings(settings).lifecycle_policy()


def _refused(exc: SatchelError, **carrier: Any) -> int:
    """Exit 2 for a configuration problem (stderr), 1 for a refused token (JSON).

    ``carrier``: the facts of the server-mode carrier whose stored context was refused
    (its session id, the store key holding the bad value): the carrier itself verified,
    as when the stored context is missing or erased."""
    if isinstance(exc, ConfigurationError):
        print(f"satchel inspect: {exc.message}", file=sys.stderr)
        return 2
    error = {"code": exc.code, "message": exc.message}
    _print_inspect({"verified": bool(carrier), **carrier, "error": error})
    return 1


def _inspect_carrier(carrier: str, args: argparse.Namespace) -> int:
    """A server-mode carrier (``sv1.<id>.<signature>``): the context lives in the store.

    Verifies the signature, names the store key, and with a store URL (``--store-url``,
    else $SATCHEL_STORE_URL, else $SATCHEL_OVERFLOW_URL) reads and opens the stored
    context like a token.
    """
    from .server_mode import CARRIER_PREFIX, SessionCarriers
    from .tiers import GuardedTier, is_in_process_url, tier_from_url

    session_hex = carrier[len(CARRIER_PREFIX) :].partition(".")[0]
    if args.no_verify:
        _print_inspect({"verified": False, "carrier": "server", "session_id": session_hex})
        return 0
    try:
        carriers = SessionCarriers(
            Codec(Keyring.from_env(require_anchor=True), purpose=args.purpose)
        )
        session_id = carriers.session_id_of(carrier)
        # A store in the app's own process: read here, a new, empty one of this
        # command's own reported every session missing, as if the app had lost it. With
        # a memory-mode app's environment, its overflow URL (the store's default here)
        # is no store that app keeps contexts in either.
        memory_mode = os.environ.get("SATCHEL_MODE", "").strip().lower() == "memory"
        if args.store_url and (memory_mode or is_in_process_url(args.store_url)):
            where = (
                "SATCHEL_MODE=memory: the contexts live"
                if memory_mode
                else "--store-url: memory:// is a store"
            )
            raise ConfigurationError(
                f"{where} inside the app's own process, which this command cannot read; "
                "look at the context through the running app (GET /api/context in the "
                "examples)"
            )
        store = (
            GuardedTier(tier_from_url(args.store_url, setting="--store-url", create=False))
            if args.store_url
            else None
        )
    except (ConfigurationError, BadToken) as exc:
        return _refused(exc)
    key = carriers.key_for(session_id)
    facts = {"carrier": "server", "session_id": session_id.hex(), "store_key": key}
    if store is None:
        _print_inspect(
            {"verified": True, **facts, "context": None, "note": "pass --store-url to read it"}
        )
        return 0
    from .consistency import ERASED, mark_key

    # The erasure tombstone too, as the app reads it: an erased conversation is said
    # so (410 token_erased in the app), not reported merely missing.
    tombstone = mark_key(carriers.codec.session_tag(session_id))
    try:
        fetched = store.get_many([key, tombstone], cache=False)
    finally:
        store.close()
    if fetched.get(tombstone) == ERASED:
        error = {"code": "token_erased", "message": "this conversation was erased"}
        _print_inspect({"verified": True, **facts, "error": error})
        return 1
    stored = fetched.get(key)
    if stored is None:
        reason = fetched.reason(key)  # "missing", or why the store did not answer
        code = "session_not_found" if reason in (None, "missing") else reason
        error = {"code": code, "message": f"nothing readable at {key} ({reason or 'missing'})"}
        _print_inspect({"verified": True, **facts, "error": error})
        return 1
    # Not ASCII (a foreign write): the replacement characters make the parser refuse it.
    return _inspect_token(
        stored.decode("ascii", "replace"), args, expect_session=session_id, **facts
    )


def cmd_erase(args: argparse.Namespace) -> int:
    from .erase import erase_session

    try:
        result = erase_session(
            args.session_id,
            overflow_url=args.overflow_url,
            store_url=args.store_url,
            purpose=args.purpose,
            # From the environment, as the app reads it: run with a memory-mode app's
            # environment, erase must refuse even though SATCHEL_OVERFLOW_URL names a
            # Redis (which that app never reads).
            mode=os.environ.get("SATCHEL_MODE", ""),
            # The tombstone must outlive the session's tokens: the app's maximum age,
            # read as the app reads it (its default when unset; at least 31 days).
            max_age=_lifecycle_from_env("SATCHEL_MAX_AGE").max_age,
        )
    except SatchelError as exc:
        print(f"satchel erase: {exc.message}", file=sys.stderr)
        return 2
    _print(result)
    if not result["deleted_keys"]:
        # Normal for a session that never spilled (client mode, client level). But a
        # wrong SATCHEL_ANCHOR_KID looks in the wrong place and finds nothing too, and
        # the tombstone it writes is one the app never reads: say how to tell.
        print(
            f"satchel erase: nothing was stored under session tag {result['session']} "
            f"(anchor key {result['anchor_kid']!r}). That is normal for a session that "
            "never overflowed; if it did, check that SATCHEL_ANCHOR_KID is the app's: "
            "the app names this session by the same tag (Satchel-Session header, the "
            "audit log's 'session') only under its own anchor",
            file=sys.stderr,
        )
    return 0


def _context_sizes(text: str) -> tuple[int, ...]:
    """``--turns``: comma-separated context sizes, each 1..10000."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if not sizes or not all(1 <= n <= 10_000 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be 1 to 10000 turns: {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def check_output_file(path: str | None, option: str) -> None:
    """Refuse, before a run, an output path the run could not write at its end."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(f"{option} {path}: is a directory, not a file")
    if not target.parent.is_dir():
        raise ConfigurationError(f"{option} {path}: the directory {target.parent} does not exist")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise ConfigurationError(f"{option} {path}: not writable")


def write_output_file(path: str, text: str, option: str) -> None:
    """Write a run's figures at its end: a write that fails after all (a read-only or
    full file system, /proc) is a ConfigurationError (exit 2, one line), not a traceback
    and exit 1 (which reads as a missed target)."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ConfigurationError(f"{option} {path}: not written ({exc.strerror or exc})") from None


def cmd_bench(args: argparse.Namespace) -> int:
    check_output_file(args.json_out, "--json")
    register_cli_dictionaries(args.dictionary)
    if args.dictionary_id is not None:
        from .compress import load_dictionary

        try:
            load_dictionary(args.dictionary_id)
        except BadToken as exc:  # UnsupportedVersion: no such dictionary here
            raise ConfigurationError(f"--dictionary-id: {exc.message}") from None
    if args.what == "codec":
        from .bench.codec import main as bench_codec

        return bench_codec(args)
    from .bench.chaos import main as bench_chaos

    return bench_chaos(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from .bench.compare import main as compare_main

    return compare_main(args)


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


#: Tags of values JSON has no type for, in ``satchel inspect``'s output.
INSPECT_TAGS = ("$bytes", "$float", "$map")
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _print_inspect(data: dict[str, Any]) -> None:
    """``satchel inspect``'s output: strict JSON (RFC 8259), which jq and every parser
    read, with nothing two values share: bytes are ``{"$bytes": "<hex>"}`` (bare hex
    would read like a str of hex digits), NaN and the infinities ``{"$float": "NaN"}``
    (``"Infinity"``, ``"-Infinity"``), and a map whose only key is one of these tags
    ``{"$map": {...}}``, so it is not taken for one (docs/operations.md)."""
    print(json.dumps(_tagged(data), indent=2, sort_keys=True, allow_nan=False, default=str))


def _tagged(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": _NON_FINITE[repr(value)]}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        out = {str(k): _tagged(v) for k, v in value.items()}
        if len(out) == 1 and next(iter(out)) in INSPECT_TAGS:
            return {"$map": out}
        return out
    if isinstance(value, list | tuple):
        return [_tagged(v) for v in value]
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong and where the help is (argparse
    prints the whole usage block first; README promises one line on stderr)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="satchel", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"satchel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "keygen",
        help="print a new key as kid:secret",
        description="Print a new random 256-bit key as kid:secret (base64url), the form "
        "SATCHEL_KEYS takes; with --append, in front of the ring in $SATCHEL_KEYS, so it "
        "seals from the next deploy while the older keys still open (docs/operations.md, "
        "key rotation).",
    )
    p.add_argument("--kid", help="key id (default: k + 4 random hex digits)")
    p.add_argument(
        "--append", action="store_true", help="print it in front of $SATCHEL_KEYS (rotation)"
    )
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "inspect",
        help="verify and print a token (keys from SATCHEL_KEYS)",
        description="Verify and print a token, or say why the app would refuse it. Keys "
        "come from SATCHEL_KEYS; the idle TTL and maximum age from SATCHEL_IDLE_TTL and "
        "SATCHEL_MAX_AGE, with the app's defaults (set both to none to look inside an "
        "old token).",
    )
    p.add_argument("token", help="the token, or - to read it from stdin")
    p.add_argument("--no-verify", action="store_true", help="print only what the header says")
    _add_purpose_option(p)
    p.add_argument(
        "--store-url",
        default=os.environ.get("SATCHEL_STORE_URL") or os.environ.get("SATCHEL_OVERFLOW_URL", ""),
        help="server-mode carriers (sv1.): read the context from this store",
    )
    _add_dictionary_option(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "erase",
        help="erase a session's server-side data",
        description="Erase a session's data in the app's shared tiers (Redis, SQLite). "
        "Not for memory:// tiers or SATCHEL_MODE=memory apps, whose data lives in the "
        "app's process: erase those through the app, Satchel.erase(session_id).",
    )
    p.add_argument("session_id", help="the session id (32 hex characters)")
    p.add_argument(
        "--overflow-url",
        default=os.environ.get("SATCHEL_OVERFLOW_URL", ""),
        help="the app's overflow tier (default: $SATCHEL_OVERFLOW_URL); not memory://",
    )
    p.add_argument(
        "--store-url",
        default=os.environ.get("SATCHEL_STORE_URL", ""),
        help="server mode: the store holding the contexts, when not the overflow tier",
    )
    _add_purpose_option(p)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser(
        "bench",
        help="benchmarks: codec | chaos",
        description="codec: seal and open of 4-200-turn contexts of held-out chat text, "
        "side by side with Flask's session serializer and the primitive floor (msgpack + "
        "zstd + HMAC + base64 by hand), with token sizes and the targets. chaos: the "
        "example app under concurrent conversations while Redis is killed, hung and "
        "restarted (needs redis-server and a checkout). Options marked (codec) or (chaos) "
        "apply to that one. Exit codes: 0 done (and, with --check, every target met); 1 a "
        "target missed (codec with --check) or the chaos run failed; 2 bad arguments, or "
        "what the run needs is missing (redis-server, the examples).",
    )
    p.add_argument("what", choices=["codec", "chaos"])
    p.add_argument(
        "--quick", action="store_true", help="a smoke run (codec: fewer rounds; chaos: ~11 s)"
    )
    p.add_argument("--json", dest="json_out", help="also write the figures as JSON here")
    p.add_argument(
        "--check",
        action="store_true",
        help="codec: exit 1 when a target is missed (chaos exits 1 whenever it fails)",
    )
    p.add_argument(
        "--turns",
        default=(4, 20, 50, 200),
        type=_context_sizes,
        help="context sizes, comma separated (codec; default 4,20,50,200)",
    )
    p.add_argument("--corpus", help="JSONL of held-out conversations (codec)")
    _add_dictionary_option(p)
    p.add_argument(
        "--dictionary-id", type=int, help="compress with this dictionary (codec; default: 1)"
    )
    p.add_argument(
        "--conversations", type=_positive_int, default=8, help="concurrent chats (chaos)"
    )
    p.add_argument("--requests", type=_positive_int, default=40, help="turns per chat (chaos)")
    p.add_argument(
        "--server",
        choices=["embedded", "gunicorn"],
        default="embedded",
        help="chaos: serve the app with werkzeug (default) or gunicorn (2 workers)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "compare",
        help="client-held vs server-side modes, side by side",
        description="Start the example app under gunicorn in each mode (client, server, "
        "memory) and with no context handling, drive it from a separate load process at "
        "4, 20, 50 and 200 turns, kill Redis for a window mid-run, and write "
        "comparison.md with its plots (docs/comparison.md; needs a checkout and "
        "redis-server).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run, under two minutes")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="gunicorn workers per mode (default 2; at most 4 per CPU, or 64)",
    )
    p.add_argument(
        "--out",
        default="docs",
        help="directory for comparison.md and img/*.png, relative to the working "
        "directory (default: docs)",
    )
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = logging.getLogger("satchel")
    silencer: logging.Handler | None = None
    if not logging.getLogger().handlers and not quiet.handlers:
        # Each command reports a failure itself, in one line on stderr (exit code 2); a
        # tier's own warning about the same failure would only repeat it in other words.
        # For this command only: main() may be called from another program.
        silencer = logging.NullHandler()
        quiet.addHandler(silencer)
    # Except what is said about the keys themselves (a secret that looks cut short):
    # no command reports that, and `keygen --append` writes the ring back canonical,
    # so an app loading its output would not warn either.
    key_warnings: logging.Handler | None = None
    if silencer is not None:
        key_warnings = logging.StreamHandler(sys.stderr)
        key_warnings.setFormatter(logging.Formatter("satchel: warning: %(message)s"))
        key_warnings.setLevel(logging.WARNING)
        logging.getLogger("satchel.keys").addHandler(key_warnings)
    try:
        return _run(args)
    finally:
        if silencer is not None:
            quiet.removeHandler(silencer)
        if key_warnings is not None:
            logging.getLogger("satchel.keys").removeHandler(key_warnings)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"satchel: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: the benches' finally blocks have stopped their servers by now; a
        # traceback would only bury what they printed.
        print("satchel: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `satchel inspect ... | head`: the reader left early
        sys.stderr.close()
        # Not 0: the output was cut, and a refused token's exit 1 is not known here.
        # 141 (128 + SIGPIPE) is what a shell reports for a writer the pipe stopped.
        return 141


#: main()'s exit code after Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 128 + signal.SIGINT


def console_main() -> None:
    """The ``satchel`` command: :func:`main`, then exit with its code. After Ctrl-C the
    process ends *by* SIGINT, as an uncaught KeyboardInterrupt would (without its
    traceback): a shell running ``satchel`` in a script or a loop stops there too, where
    a plain exit status of 130 tells it the command handled the signal and let it go on.
    """
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
