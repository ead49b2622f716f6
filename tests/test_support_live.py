"""LiveServer runs a WSGI app factory in a subprocess (werkzeug and gunicorn)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import LiveServer, LiveServerError
from tests.support.procs import proc_state

APP = "tests.support._demo_app:create_app"


def test_werkzeug_serves_factory_with_env(live_server_factory) -> None:
    srv = live_server_factory(APP, env={"SUPPORT_DEMO_VALUE": "from-env"})
    assert srv.health_status == 200
    assert srv.get("/healthz").json() == {"ok": True}
    info = srv.get("/info").json()
    assert info["env"] == "from-env"
    assert info["greeting"] is None
    assert srv.get("/missing").status == 404
    assert srv.url == f"http://127.0.0.1:{srv.port}"


def test_factory_call_with_literal_args(live_server_factory) -> None:
    srv = live_server_factory(APP.replace("create_app", "create_app('hi')"))
    assert srv.get("/info").json()["greeting"] == "hi"


def test_gunicorn_workers_and_stop(live_server_factory) -> None:
    srv = live_server_factory(APP, server="gunicorn", workers=2)
    pids = {srv.get("/info").json()["pid"] for _ in range(20)}
    assert srv.pid not in pids  # answered by forked workers
    master = srv.pid
    srv.stop()
    assert proc_state(master) is None
    for pid in pids:
        assert proc_state(pid) in (None, "Z")


def test_restart_keeps_port_and_updates_env(live_server_factory) -> None:
    srv = live_server_factory(APP, env={"SUPPORT_DEMO_VALUE": "one"})
    port = srv.port
    srv.restart(env={"SUPPORT_DEMO_VALUE": "two"})
    assert srv.port == port
    assert srv.get("/info").json()["env"] == "two"


def test_broken_app_reports_logs() -> None:
    srv = LiveServer("tests.support.no_such_module:create_app", startup_timeout=15)
    try:
        with pytest.raises(LiveServerError, match="no_such_module"):
            srv.start()
    finally:
        srv.cleanup()


def test_kill_reaches_a_group_whose_leader_was_already_reaped(tmp_path: Path) -> None:
    """kill() signals a group only while a member is left once its leader is reaped (an
    empty group's id may be another group's by then); a leader that exited leaving a
    worker behind, seen by a poll(), still has that worker killed."""
    import time

    from satchel.bench import _procs

    pid_file = tmp_path / "worker.pid"
    proc = _procs.spawn(
        ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; exit 0"], log_path=tmp_path / "log"
    )
    deadline = time.monotonic() + 10
    while proc.poll() is None or not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the leader did not exit"
        time.sleep(0.01)
    worker = int(pid_file.read_text())
    assert _procs.proc_state(worker) not in (None, "Z")
    _procs.kill(proc)
    deadline = time.monotonic() + 10
    while _procs.proc_state(worker) not in (None, "Z"):
        assert time.monotonic() < deadline, "the worker outlived kill()"
        time.sleep(0.01)
    assert not _procs._group_members(proc.pid) or _procs.proc_state(worker) == "Z"
    _procs.kill(proc)  # again: nothing left to signal, nothing raised
