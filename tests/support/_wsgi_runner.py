"""Tiny werkzeug runner used by LiveServer: ``python _wsgi_runner.py --app mod:create_app``.

Runs the threaded werkzeug server without reloader or debugger; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import signal
import sys
from pathlib import Path
from typing import Any

# Running a script puts its directory first on sys.path; tests/support must not shadow
# top-level modules of the app under test.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]


def parse_call(attr: str) -> tuple[str, tuple[Any, ...], dict[str, Any], bool]:
    """``"create_app('x', debug=True)"`` -> ("create_app", ("x",), {"debug": True}, True)."""
    if "(" not in attr:
        return attr, (), {}, False
    node = ast.parse(attr, mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"cannot parse app factory call {attr!r}")
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    return node.func.id, args, kwargs, True


def load_app(spec: str, factory: str) -> object:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        for candidate in ("app", "application", "create_app", "make_app"):
            if hasattr(module, candidate):
                attr = candidate
                break
        else:
            raise SystemExit(f"no app/application/create_app/make_app in {module_name}")
    name, args, kwargs, is_call = parse_call(attr)
    obj = getattr(module, name)
    if is_call or factory == "yes" or (factory == "auto" and inspect.isfunction(obj)):
        obj = obj(*args, **kwargs)
    return obj


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--factory", choices=("auto", "yes", "no"), default="auto")
    opts = parser.parse_args()

    app = load_app(opts.app, opts.factory)

    from werkzeug.serving import make_server

    server = make_server(opts.host, opts.port, app, threaded=True)

    def _term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    print(f"serving {opts.app} on http://{opts.host}:{opts.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
