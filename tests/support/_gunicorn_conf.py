"""gunicorn config used by LiveServer: workers die with their master (PR_SET_PDEATHSIG),
so a test process killed with SIGKILL leaves no orphaned workers behind."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def post_fork(server: object, worker: object) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: rely on gunicorn's own parent check
        pass
