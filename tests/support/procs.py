"""Subprocess management for the tests: the same helpers the benchmarks use.

Every helper process runs in its own process group, is registered, and is killed at
teardown (and at interpreter exit as a last resort). With ``setpriv --pdeathsig`` the
child also gets SIGKILL if the test process dies abruptly, so a crashed or killed
pytest leaves no servers behind. One implementation lives in
``satchel.bench._procs``; this module names what the fixtures use.
"""

from __future__ import annotations

from satchel.bench._procs import kill, kill_all, proc_state, spawn, terminate

__all__ = ["kill", "kill_all", "proc_state", "spawn", "terminate"]
