"""``satchel bench chaos``: one real ``--quick`` run (a subprocess), and its verdicts on
made-up samples (what counts as accounted, what fails the run)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from satchel.bench import chaos
from satchel.bench.chaos import ConvResult, Fault, Load, Readback, Sample
from tests.support import REPO_ROOT, SERVER_DIR, require_binary

# ------------------------------------------------------------------------ real run


@pytest.mark.redis
@pytest.mark.slow
def test_quick_run_passes_with_no_5xx(tmp_path: Path) -> None:
    require_binary("redis-server")
    out = tmp_path / "chaos.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SERVER_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    argv = [sys.executable, "-m", "satchel.cli", "bench", "chaos", "--quick", "--json", str(out)]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    text = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text}\n{proc.stderr[-4000:]}"

    for section in (
        "schedule (s from load start, actual)",
        "requests",
        "turns (read back",
        "latency, POST /api/chat (ms)",
        "breaker closed (healthy)",
        "breaker open (tier-flagged, impaired)",
        "recovery (from Redis answering again",
        "counted by the app (/metrics) vs seen by the clients: match",
        "problems: none",
        "result: PASS",
    ):
        assert section in text, f"{section!r} missing from:\n{text}"
    assert re.search(r"\b5xx 0\b", text), text
    assert re.search(r"\btransport errors 0\b", text), text
    assert re.findall(r"\bunaccounted (\d+)", text) == ["0", "0"], text  # warm and cold
    assert re.search(r"^\s+tier_write_failed\s+[1-9]", text, re.M), text
    assert re.search(r"^\s+kill\s+SIGKILL/restart", text, re.M)
    assert re.search(r"^\s+hang\s+SIGSTOP/SIGCONT", text, re.M)

    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["requests"]["5xx"] == 0 and report["requests"]["transport_errors"] == 0
    assert report["requests"]["not_sent"] == 0
    assert all(t["unaccounted"] == 0 and t["unreported"] == 0 for t in report["turns"].values())
    assert report["latency"]["breaker_closed"]["n"] > 0
    assert report["latency"]["breaker_open"]["n"] > 0
    assert [r["fault"] for r in report["recovery"]] == ["kill", "hang"]
    assert report["counted"]["match"] is True
    assert report["environment"]["nproc"] >= 1 and report["environment"]["cpu"]


# ---------------------------------------------------------------- verdicts, offline


def test_schedule_leaves_the_breaker_time_to_close() -> None:
    for quick in (True, False):
        faults, duration = chaos.build_schedule(quick, 10.0)
        assert [f.label for f in faults][:2] == ["kill", "hang"]
        for prev, nxt in itertools.pairwise(faults):
            assert nxt.planned_start - prev.planned_start > 10.0
        assert duration - faults[-1].planned_start > 10.0
    assert chaos.build_schedule(True, 10.0)[1] <= 28


def turns_of(conv: int, exchanges: range) -> list[dict[str, Any]]:
    out = []
    for n in exchanges:
        marker = f"c{conv:03d}t{n:04d}"
        out.append({"role": "user", "content": f"{marker} hello"})
        out.append({"role": "assistant", "content": f'(turn {n + 1}) You said: "{marker} hello"'})
    return out


def context(
    conv: int,
    present: range,
    *,
    overflowed: int = 0,
    rehydrated: int = 0,
    lost: int = 0,
    dropped: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "all_turns": turns_of(conv, present),
        "overflowed_turns": overflowed,
        "rehydrated_turns": rehydrated,
        "overflow": [],
        "lifecycle": {"lost": lost, "dropped": dict(dropped or {})},
    }


def load_with(
    data: dict[str, Any],
    *,
    exchanges: int = 10,
    readback_header: tuple[str, ...] = (),
    samples: list[Sample] | None = None,
) -> Load:
    load = Load(port=0, conversations=1, requests=exchanges, duration=10, warmup=1, t0=0)
    result = ConvResult(0, requests_sent=exchanges, ok=list(range(exchanges)))
    for label in chaos.READ_BACKS:
        result.readbacks[label] = Readback(200, data, readback_header)
    load.results = [result]
    load.samples = [
        Sample(0, n, "/api/chat", n * 0.5, 0.003, 200, (), ()) for n in range(exchanges)
    ]
    load.samples += samples or []
    return load


def verdict(load: Load) -> dict[str, Any]:
    faults = [Fault("kill", 1.0, 2.0, 1.0, 2.0)]
    return chaos.analyse(load, faults, [])


def test_every_turn_present_passes() -> None:
    report = verdict(load_with(context(0, range(10))))
    assert report["passed"]
    assert report["turns"]["warm"]["present"] == 20 and report["turns"]["warm"]["missing"] == 0


def test_missing_turns_are_accounted_by_flagged_segments_loss_and_policy() -> None:
    # 20 sent: 8 present; 6 in an unreadable (flagged) segment; 4 lost (flagged);
    # 2 dropped by the window policy; the overflowed turns that came back are present
    data = context(
        0,
        range(6, 10),
        overflowed=10,
        rehydrated=4,
        lost=4,
        dropped={"overflow": 10, "data_loss": 4, "window": 2},
    )
    loss = Sample(0, 3, "/api/chat", 1.5, 0.003, 200, ("tier_write_failed", "data_loss"), ())
    load = load_with(data, readback_header=("segment_missing",), samples=[loss])
    report = verdict(load)
    warm = report["turns"]["warm"]
    assert (warm["present"], warm["in_missing_segments"], warm["data_loss"]) == (8, 6, 4)
    assert warm["policy_drops"] == {"window": 2}
    assert warm["unaccounted"] == 0 and warm["unreported"] == 0
    assert report["passed"]


def test_unaccounted_turns_fail_the_run() -> None:
    report = verdict(load_with(context(0, range(2, 10))))  # 4 turns gone, no record
    assert report["turns"]["warm"]["unaccounted"] == 4
    assert not report["passed"]


def test_unflagged_losses_fail_the_run() -> None:
    # the counters account for everything, but no response ever said so
    data = context(0, range(4, 10), overflowed=4, rehydrated=0, lost=4, dropped={"data_loss": 4})
    report = verdict(load_with(data))
    assert report["turns"]["warm"]["unaccounted"] == 0
    assert report["turns"]["warm"]["unreported"] == 8
    assert not report["passed"]


def test_a_5xx_or_a_duplicate_fails_the_run() -> None:
    boom = Sample(0, 10, "/api/chat", 5.0, 0.003, 500, (), None, "HTTP 500")
    assert not verdict(load_with(context(0, range(10)), samples=[boom]))["passed"]
    data = context(0, range(10))
    data["all_turns"] += turns_of(0, range(9, 10))
    report = verdict(load_with(data))
    assert report["turns"]["warm"]["duplicates"] == 2 and not report["passed"]


def test_save_time_reasons_only_in_the_header_are_told_apart() -> None:
    extra = [
        Sample(0, 10, "/api/chat", 5.0, 0.003, 200, ("tier_write_failed",), ()),
        Sample(0, 11, "/api/chat", 5.5, 0.003, 200, ("segment_missing",), ()),
    ]
    report = verdict(load_with(context(0, range(10)), samples=extra))
    assert report["requests"]["header_json_disagree"] == 2
    assert report["requests"]["header_json_disagree_save_time_only"] == 1


def test_main_exits_1_on_a_failed_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = verdict(load_with(context(0, range(2, 10))))
    report["environment"] = {
        "server": "x",
        "redis": "7",
        "redis_url": "redis://127.0.0.1:1/0",
        "conversations": 1,
        "requests": 10,
        "duration_s": 10.0,
        "max_token_bytes": 1500,
        "hard_max_token_bytes": 4096,
        "breaker_fail_max": 5,
        "breaker_reset_s": 10.0,
        "tier_read_timeout_s": 0.05,
        "tier_connect_timeout_s": 0.1,
        "nproc": 2,
        "cpu": "cpu",
        "python": "3",
    }
    monkeypatch.setattr(chaos, "run", lambda args: report)
    out = tmp_path / "r.json"
    assert chaos.main(argparse.Namespace(json_out=str(out))) == 1
    text = capsys.readouterr().out
    assert "result: FAIL" in text and "turns unaccounted" in text
    assert json.loads(out.read_text())["passed"] is False


def test_chaos_names_missing_redis_py_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Without redis-py the example app died at start-up and the bench printed its whole
    traceback; it now says what is missing in one line, exit 2, before starting any
    process."""
    from satchel.bench import chaos

    monkeypatch.setitem(sys.modules, "redis", None)  # import raises ImportError
    monkeypatch.setattr(chaos, "RedisProcess", lambda *a: pytest.fail("a process started"))
    assert chaos.main(argparse.Namespace(quick=True, json_out=None)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "redis" in err and "pip install 'satchel[redis]'" in err


def test_markers_read_back_past_999_conversations_and_9999_turns() -> None:
    """c1000t0000 did not match the three-digit marker: every turn of the 1001st
    conversation on was unaccounted, a false FAIL."""
    import random

    from satchel.bench.chaos import MARKER, message_for

    for conv, turn in ((7, 3), (1000, 0), (12345, 10000)):
        match = MARKER.search(message_for(conv, turn, random.Random(1)))
        assert match and (int(match.group(1)), int(match.group(2))) == (conv, turn)


@pytest.mark.redis
def test_a_port_taken_by_another_redis_is_not_taken_for_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port free when picked but bound by another Redis before ours (or while ours is
    down between a kill and its restart): its PING passed for our server's, so the
    benches ran, killed and (compare) FLUSHALLed the other one."""
    from satchel.bench import _procs

    require_binary("redis-server")
    other = _procs.RedisProcess(tmp_path / "other").start()
    try:
        monkeypatch.setattr(_procs, "free_port", lambda: other.port)
        ours = _procs.RedisProcess(tmp_path / "ours")
        with pytest.raises(_procs.ProcError, match="did not start"):
            ours.start()
        assert other.proc is not None and other.proc.poll() is None
    finally:
        other.kill()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_tuning_value_the_app_would_refuse_is_one_line_before_anything_starts(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SATCHEL_BREAKER_RESET_TIMEOUT=-1 started Redis and the app, and relayed the app's
    start-up traceback: the bench checks it as the app does."""
    from satchel import cli
    from satchel.bench import chaos

    monkeypatch.setenv("SATCHEL_BREAKER_RESET_TIMEOUT", value)
    monkeypatch.setattr(chaos, "RedisProcess", lambda *a: pytest.fail("a process started"))
    assert cli.main(["bench", "chaos", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("satchel: SATCHEL_BREAKER_RESET_TIMEOUT must be") and "\n" not in err
