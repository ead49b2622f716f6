"""Run a WSGI app in a subprocess on a free loopback port (werkzeug or gunicorn).

>>> with LiveServer("examples.minimal_chat.app:create_app", env={"SATCHEL_SECRET": "x"}) as srv:
...     srv.get("/healthz").status
200

The child runs with ``sys.executable`` (the venv's interpreter), ``cwd`` = repo root and
``PYTHONPATH=<repo root>:<repo root>/server``, so ``examples.*``, ``tests.support.*`` and
``satchel`` import without being installed. Output goes to ``.log_path`` for post-mortem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from . import procs
from .env import LOOPBACK, REPO_ROOT, SERVER_DIR, free_port, tail, wait_until

__all__ = ["HttpResponse", "LiveServer", "LiveServerError", "http_request"]

RUNNER = Path(__file__).with_name("_wsgi_runner.py")
GUNICORN_CONF = Path(__file__).with_name("_gunicorn_conf.py")
FACTORY_PREFIXES = ("create_", "make_")


class LiveServerError(RuntimeError):
    """The app process failed to start or to answer HTTP."""


@dataclass
class HttpResponse:
    status: int
    headers: Message
    body: bytes
    url: str = ""
    cookies: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http_request(
    url: str,
    method: str = "GET",
    *,
    data: bytes | str | Mapping[str, Any] | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    follow_redirects: bool = False,
) -> HttpResponse:
    """Plain-urllib HTTP call that never uses a proxy and returns 4xx/5xx as responses."""
    hdrs = dict(headers or {})
    body: bytes | None
    if json_body is not None:
        body = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif isinstance(data, Mapping):
        from urllib.parse import urlencode

        body = urlencode(data).encode()
        hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif isinstance(data, str):
        body = data.encode()
    else:
        body = data
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if not follow_redirects:
        handlers.append(_NoRedirect())
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=body, headers=hdrs, method=method.upper())
    try:
        with opener.open(req, timeout=timeout) as resp:
            return HttpResponse(
                resp.status, resp.headers, resp.read(), resp.url,
                resp.headers.get_all("Set-Cookie") or [],
            )  # fmt: skip
    except urllib.error.HTTPError as err:
        with err:
            return HttpResponse(
                err.code, err.headers, err.read(), url, err.headers.get_all("Set-Cookie") or []
            )


def _split_spec(app: str) -> tuple[str, str]:
    module, _, attr = app.partition(":")
    if not module:
        raise ValueError(f"bad app import string {app!r} (want 'pkg.module:create_app')")
    return module, attr


class LiveServer:
    """A WSGI app served by a child process on ``127.0.0.1:<free port>``.

    Arguments:
        app: ``"pkg.module:create_app"`` (factory, called with no args),
            ``"pkg.module:create_app('x')"`` (literal args), or ``"pkg.module:app"``.
        env: extra environment variables for the child (on top of ``os.environ``).
        server: ``"werkzeug"`` (threaded dev server, default) or ``"gunicorn"``.
        workers: gunicorn ``-w`` (ignored by werkzeug).
        factory: whether the attribute is a factory; default: werkzeug introspects,
            gunicorn assumes a factory when the name starts with ``create_``/``make_``.
        health_path: polled until ANY HTTP response arrives (404 means the app has no
            such route but is serving, which also counts).
        extra_args: appended to the gunicorn command line (e.g. ``["--threads", "4"]``).
        gunicorn_config: ``-c`` file for gunicorn; the default one only makes workers
            die with their master. Pass your own (or None) to replace it.
    """

    def __init__(
        self,
        app: str,
        *,
        env: Mapping[str, str] | None = None,
        server: str = "werkzeug",
        workers: int = 1,
        factory: bool | None = None,
        port: int | None = None,
        health_path: str = "/healthz",
        startup_timeout: float = 30.0,
        extra_args: Iterable[str] = (),
        cwd: Path | str = REPO_ROOT,
        gunicorn_config: Path | str | None = GUNICORN_CONF,
    ) -> None:
        if server not in ("werkzeug", "gunicorn"):
            raise ValueError(f"server must be 'werkzeug' or 'gunicorn', not {server!r}")
        _split_spec(app)
        self.app = app
        self.env = dict(env or {})
        self.server = server
        self.workers = workers
        self.factory = factory
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port = port or 0
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.cwd = Path(cwd)
        self.gunicorn_config = gunicorn_config
        self._tmp = Path(tempfile.mkdtemp(prefix="satchel-live-"))
        self.log_path = self._tmp / f"{server}.log"
        self.proc: subprocess.Popen | None = None
        self.health_status: int | None = None

    # -- info ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    def url_for(self, path: str = "/") -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, max_chars: int = 8000) -> str:
        return tail(self.log_path, max_chars)

    def __repr__(self) -> str:
        return f"<LiveServer {self.app} [{self.server}] {self.url} pid={self.pid}>"

    # -- HTTP ----------------------------------------------------------------------

    def request(self, method: str, path: str = "/", **kwargs: Any) -> HttpResponse:
        """``http_request(self.url_for(path), method, **kwargs)``."""
        return http_request(self.url_for(path), method, **kwargs)

    def get(self, path: str = "/", **kwargs: Any) -> HttpResponse:
        return self.request("GET", path, **kwargs)

    def post(self, path: str = "/", **kwargs: Any) -> HttpResponse:
        return self.request("POST", path, **kwargs)

    # -- lifecycle -----------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(REPO_ROOT), str(SERVER_DIR)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def _is_factory(self) -> bool:
        if self.factory is not None:
            return self.factory
        _, attr = _split_spec(self.app)
        return attr.startswith(FACTORY_PREFIXES) or attr == ""

    def argv(self) -> list[str]:
        if self.server == "gunicorn":
            module, attr = _split_spec(self.app)
            attr = attr or "create_app"
            if "(" not in attr and self._is_factory():
                attr += "()"
            conf = ["-c", str(self.gunicorn_config)] if self.gunicorn_config else []
            return [
                sys.executable, "-m", "gunicorn", *conf,
                "-w", str(self.workers),
                "-b", f"{self.host}:{self.port}",
                "--access-logfile", "-",
                "--error-logfile", "-",
                "--graceful-timeout", "3",
                "--chdir", str(self.cwd),
                *self.extra_args,
                f"{module}:{attr}",
            ]  # fmt: skip
        factory = "auto" if self.factory is None else ("yes" if self.factory else "no")
        return [
            sys.executable, str(RUNNER),
            "--app", self.app,
            "--host", self.host,
            "--port", str(self.port),
            "--factory", factory,
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LiveServer:
        if self.running:
            return self
        attempts = 4 if self._auto_port else 1
        for attempt in range(attempts):
            if self._auto_port and (attempt or not self.port):
                self.port = free_port()
            if self._launch():
                return self
        raise LiveServerError(f"{self!r} could not bind a port:\n{self.logs()}")

    def _launch(self) -> bool:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv())}\n".encode())
        self.proc = procs.spawn(
            self.argv(), log_path=self.log_path, env=self.child_env(), cwd=self.cwd
        )

        def answered() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                resp = http_request(self.url_for(self.health_path), timeout=2)
            except (OSError, ValueError):  # refused / reset / not HTTP yet
                return False
            self.health_status = resp.status
            return True

        try:
            wait_until(answered, timeout=self.startup_timeout, message=f"{self!r} to answer")
        except TimeoutError:
            procs.terminate(self.proc, grace=2)
            raise LiveServerError(
                f"{self!r} gave no HTTP answer within {self.startup_timeout}s:\n{self.logs()}"
            ) from None
        if self.proc.poll() is None:
            return True
        new_log = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
        procs.kill(self.proc)
        if "address already in use" in new_log.lower() and self._auto_port:
            return False
        raise LiveServerError(
            f"{self!r} exited with code {self.proc.returncode} during startup:\n{new_log[-8000:]}"
        )

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` s. Returns the exit code."""
        if self.proc is None:
            return None
        return procs.terminate(self.proc, grace=grace)

    def restart(self, env: Mapping[str, str] | None = None) -> LiveServer:
        """Stop and start again on the same port, optionally with updated env vars."""
        self.stop()
        if env:
            self.env.update(env)
        auto, self._auto_port = self._auto_port, False
        try:
            return self.start()
        finally:
            self._auto_port = auto

    def cleanup(self) -> None:
        """stop() and delete the temp dir holding the log."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
