"""``satchel compare --quick``: the whole harness end to end, within two minutes.

It starts its own redis-server and gunicorn servers, drives them from a separate load
process, kills Redis mid-run, and writes the report and its plots to a temp dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT, SERVER_DIR, require_binary

pytestmark = [pytest.mark.slow, pytest.mark.redis]

LIMIT = 120.0
PLOTS = (
    "latency_vs_context.png",
    "bytes_vs_context.png",
    "throughput_cpu_vs_context.png",
    "memory_vs_sessions.png",
    "outage_timeline.png",
)


def test_compare_quick_writes_the_report_within_two_minutes(tmp_path: Path) -> None:
    require_binary("redis-server")  # gunicorn and matplotlib are dev dependencies
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATCHEL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SERVER_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    out = tmp_path / "report"

    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "satchel.cli", "compare", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT + 60,
        check=False,
    )
    elapsed = time.monotonic() - t0
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"

    assert proc.returncode == 0, log
    assert elapsed < LIMIT, f"satchel compare --quick took {elapsed:.0f}s\n{log}"

    report = out / "comparison.md"
    text = report.read_text(encoding="utf-8")
    for name in PLOTS:
        png = out / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 5000, name
        assert f"(img/{name})" in text, name
    for heading in ("## Targets", "## Redis outage", "## Where client-held context loses"):
        assert heading in text

    # The trade-offs never call one measurement both a loss and a win.
    loses, wins = text.split("**Loses:**", 1)[1].split("**Wins:**", 1)
    wins = wins.split("\n## ", 1)[0]
    for size in re.findall(r"\*\*Throughput at (\d+) turns", loses):
        assert f"**Throughput at {size} turns" not in wins, size

    match = re.search(r"<!-- satchel-compare-data: (.*) -->", text)
    assert match, "the report carries its figures for machines"
    data = json.loads(match.group(1))
    assert data["quick"] is True
    statuses = data["statuses"]
    for mode in ("client", "fault: client"):
        assert statuses[mode], mode
        server_errors = {code: n for code, n in statuses[mode].items() if code.startswith("5")}
        assert not server_errors, f"{mode}: {server_errors}"
        assert set(statuses[mode]) == {"200"}, f"{mode}: {statuses[mode]}"
    # Client mode met the outage with its Redis tier configured, not without one, and
    # its sessions under budget wrote nothing to Redis once it was back.
    assert re.search(r"0 errors in \d+ requests \(Redis tier configured; 0 keys", text), text
    # Server mode failed during the outage, and only with 503s: no 500s, no hangs.
    assert set(statuses["fault: server"]) <= {"200", "503"}, statuses["fault: server"]
    assert "targets:" in proc.stdout
    # The codec's own cost was measured on a context the client mode really carried.
    cost = data["codec_cost"]
    assert cost["turns"] >= 20, cost
    assert 0 < cost["floor_us"] < cost["satchel_us"] * 3, cost


def test_the_timed_phase_starts_a_conversation_over_at_restart_at(
    live_server_factory: Any,
) -> None:
    """The outage phase keeps client-mode conversations under the window however fast
    the machine: on a fast host a quick run grew them to 428 turns, past the 400-turn
    window, and they spilled to Redis (the report then said the under-budget sessions
    wrote keys)."""
    from satchel.bench._load import Driver

    server = live_server_factory(
        "examples.minimal_chat.app:create_app",
        env={"SATCHEL_KEYS": "bench:" + "A" * 43, "SATCHEL_OVERFLOW_URL": ""},
    )
    driver = Driver(server.port)
    driver.build("fault", count=2, turns=4, threads=1, deadline=30)
    result = driver.timed("fault", duration=1.0, threads=1, bucket=0.25, restart_at=8)
    # Enough requests that, without starting over, each would hold 14 turns or more.
    assert result["requests"] >= 10 and result["errors"] == 0
    assert all(c.turns <= 8 for c in driver.groups["fault"])


@pytest.mark.parametrize("blocked", ["matplotlib", "redis", "gunicorn"])
def test_compare_names_a_missing_package_before_it_runs(
    blocked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """matplotlib was first imported to draw the plots, after the whole run (two to five
    minutes), and the run ended in a traceback with no report; without redis-py the
    app servers died with theirs. Each is now named up front, in one line, exit 2."""
    import argparse

    from satchel.bench import compare

    monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError
    monkeypatch.setattr(compare.Harness, "run", lambda self: pytest.fail("the run started"))
    args = argparse.Namespace(quick=True, workers=2, out=str(tmp_path / "out"))
    assert compare.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert blocked in err and "pip install 'satchel[bench]'" in err
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_out_dir_it_could_not_create_before_it_runs(tmp_path: Path) -> None:
    """--out under a regular file passed the up-front check: the report failed to be
    written after the whole run (NotADirectoryError)."""
    from satchel.bench.compare import _out_problem

    (tmp_path / "a-file").write_text("x")
    assert _out_problem(tmp_path / "a-file") == "is a file, not a directory"
    assert "a-file is a file" in (_out_problem(tmp_path / "a-file" / "report" / "x") or "")
    assert _out_problem(tmp_path / "new" / "dir") is None
    assert _out_problem(tmp_path) is None


def test_compare_refuses_a_worker_count_no_machine_here_can_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workers 100000 forked that many gunicorn workers for every mode."""
    import argparse

    from satchel.bench.compare import main, max_workers

    args = argparse.Namespace(quick=True, workers=max_workers() + 1, out=str(tmp_path / "o"))
    assert main(args) == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("workers", [1, 4])
def test_the_memory_mode_caveat_names_the_worker_count_it_compares_with(workers: int) -> None:
    """The report said "two-worker modes" whatever --workers was; with one worker
    memory mode's throughput is comparable, and no caveat applies."""
    from types import SimpleNamespace

    from satchel.bench.compare import _caveats

    notes = " ".join(_caveats(SimpleNamespace(workers=workers, notes=[])))  # type: ignore[arg-type]
    assert "two-worker" not in notes
    assert ("4-worker modes" in notes) == (workers == 4)
    assert ("`memory` mode ran with one worker" in notes) == (workers > 1)


def test_compare_without_redis_server_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A traceback, exit 1, and a satchel-compare-* directory left behind."""
    env = {**os.environ, "PATH": str(tmp_path / "empty-path"), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "satchel.cli", "compare", "--quick", "--out", str(tmp_path / "o")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "redis-server" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("satchel-compare-*"))


def test_a_size_not_reached_by_every_conversation_is_not_reported_as_reached() -> None:
    """Builds cut short by the phase deadline (a slow or busy host) were measured and
    labelled "20 turns" while many conversations held far fewer."""
    from types import SimpleNamespace

    from satchel.bench import compare

    class FakeRedis:
        def flushall(self) -> None: ...
        def key_bytes(self, db: int) -> int:
            return 0

        def used_memory(self) -> int:
            return 0

        def keys(self) -> int:
            return 0

    plan = compare.QUICK
    harness = SimpleNamespace(
        plan=plan,
        redis=FakeRedis(),
        build=lambda load, group, count, size: {
            "complete": count - (1 if group.startswith("load") else 0),
            "requests": 1,
            "statuses": {"200": 1},
        },
    )
    with pytest.raises(RuntimeError, match=f"built only .* to {compare.TARGET_SIZE} turns"):
        loads = dict.fromkeys(compare.MODES)
        compare.Harness.measure_size(harness, compare.TARGET_SIZE, {}, loads)  # type: ignore[arg-type]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier}
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_compare_with_its_servers_and_files(tmp_path: Path) -> None:
    """A cancelled CI job or `timeout` sends SIGTERM: Python's default left the work
    directory behind, and gunicorn workers (whose master died) ran on as orphans."""
    require_binary("redis-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATCHEL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SERVER_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "satchel.cli", "compare", "--quick", "--out", str(tmp_path / "o")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while time.monotonic() < deadline and not workers:  # gunicorn forked its workers
            gunicorns = {p for p in _descendants(proc.pid) if "gunicorn" in _cmdline(p)}
            workers = {p for p in gunicorns if _descendants(p) == set() and _parent(p) in gunicorns}
            time.sleep(0.05)
        assert workers, "no gunicorn worker started within 60 s"
        started = _descendants(proc.pid)
        proc.terminate()
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in started):
            time.sleep(0.05)
        assert not [p for p in started if _alive(p)], "children outlived satchel compare"
        assert not list(tmp_path.glob("satchel-compare-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
