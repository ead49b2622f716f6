"""The browser client (``client_js/src/satchel.js`` and its type declarations), served
by the Flask app that carries the tokens.

The files ship inside the wheel and the sdist-built package (``satchel/client_js/``,
copied there at build time by ``setup.py``; the repository keeps one copy, in
``client_js/src``), so an app installed from them (``pip install .``, or from an index
that has the package) serves the client without a checkout or a build step::

    from satchel.flask_ext.client_js import client_js_blueprint

    app.register_blueprint(client_js_blueprint(), url_prefix="/static/satchel")
    # <script type="module"> import { createClient } from '/static/satchel/satchel.js';

From a checkout (an editable install) the same functions find ``client_js/src``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flask import Blueprint, Response, request

#: The files served: the ES module and its TypeScript declarations.
CLIENT_FILES = {"satchel.js": "text/javascript", "satchel.d.ts": "text/plain"}

_HERE = Path(__file__).resolve()
#: where an installed package carries them (satchel/client_js/), and where a checkout
#: keeps them
_PACKAGED = _HERE.parent.parent / "client_js"
_REPO = _HERE.parents[3]  # server/satchel/flask_ext/ in a checkout
_CHECKOUT = _REPO / "client_js" / "src"


def client_js_dir() -> Path:
    """The directory holding ``satchel.js`` and ``satchel.d.ts``: the installed
    package's copy, else the checkout's ``client_js/src``. FileNotFoundError when
    neither has them (a package built without its build step)."""
    # The checkout only when this file is in one (its pyproject.toml beside server/):
    # an installed package's parents[3] is site-packages' parent, not a repository.
    in_checkout = (_REPO / "pyproject.toml").is_file() and (_REPO / "server").is_dir()
    for directory in (_PACKAGED, _CHECKOUT) if in_checkout else (_PACKAGED,):
        if all((directory / name).is_file() for name in CLIENT_FILES):
            return directory
    raise FileNotFoundError(
        "the browser client (satchel.js) is in neither the installed package "
        f"({_PACKAGED}) nor a checkout ({_CHECKOUT}): reinstall satchel from a wheel "
        "or its source distribution"
    )


def client_js_blueprint(
    directory: str | Path | None = None, *, name: str = "satchel_client_js"
) -> Blueprint:
    """A blueprint serving ``satchel.js`` and ``satchel.d.ts`` at the root of its
    ``url_prefix``: nothing else (any other name under it is not its route).

    ``directory``: where to read them (default :func:`client_js_dir`). A file is read
    again when its size or time changes, so an edited or upgraded file is served at
    once; the ETag is a hash of the content, the same on every replica whatever the
    files' times, and
    ``Cache-Control: no-cache`` makes browsers revalidate (a 304 while unchanged).
    ``text/javascript``, as module scripts require, and ``nosniff``. ``name``: the
    blueprint's name (endpoints ``<name>.satchel_js`` and ``<name>.satchel_d_ts``),
    for registering it twice.
    """
    folder = client_js_dir() if directory is None else Path(directory)
    missing = [n for n in CLIENT_FILES if not (folder / n).is_file()]
    if missing:  # found now: a wrong directory fails at start-up, not on a page load
        raise FileNotFoundError(f"{', '.join(missing)} not found in {folder}")
    blueprint = Blueprint(name, __name__)

    # Read and hashed again only when the file changed (its size or time): every page
    # load revalidates, and the answer is most often a 304 for the same bytes.
    read: dict[str, tuple[tuple[int, int], bytes, str]] = {}

    def serve(filename: str) -> Response:
        path = folder / filename
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        known = read.get(filename)
        if known is None or known[0] != stamp:
            data = path.read_bytes()
            known = read[filename] = (stamp, data, hashlib.sha256(data).hexdigest()[:32])
        _stamp, data, etag = known
        response = Response(data, mimetype=CLIENT_FILES[filename])
        response.set_etag(etag)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.make_conditional(request)  # a 304 while the browser's copy is current
        return response

    for filename in CLIENT_FILES:
        blueprint.add_url_rule(
            f"/{filename}",
            endpoint=filename.replace(".", "_"),
            view_func=lambda filename=filename: serve(filename),
        )
    return blueprint


__all__ = ["CLIENT_FILES", "client_js_blueprint", "client_js_dir"]
