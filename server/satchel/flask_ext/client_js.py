"""The browser client (``client_js/src/satchel.js`` and its type declarations), served
by the Flask app that carries the tokens.

The files ship inside the wheel (``satchel/client_js/``, copied there at build time by
``setup.py``; the repository keeps one copy, in ``client_js/src``), so an app installed
with ``pip install satchel`` can serve them without a checkout or a build step::

    from satchel.flask_ext.client_js import client_js_blueprint

    app.register_blueprint(client_js_blueprint(), url_prefix="/static/satchel")
    # <script type="module"> import { createClient } from '/static/satchel/satchel.js';

From a checkout (an editable install) the same functions find ``client_js/src``.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

#: The files served: the ES module and its TypeScript declarations.
CLIENT_FILES = {"satchel.js": "text/javascript", "satchel.d.ts": "text/plain"}

_HERE = Path(__file__).resolve()
#: where a wheel carries them (satchel/client_js/), and where a checkout keeps them
_PACKAGED = _HERE.parent.parent / "client_js"
_CHECKOUT = _HERE.parents[3] / "client_js" / "src"


def client_js_dir() -> Path:
    """The directory holding ``satchel.js`` and ``satchel.d.ts``: the installed
    package's copy, else the checkout's ``client_js/src``. FileNotFoundError when
    neither has them (a package built without its build step)."""
    for directory in (_PACKAGED, _CHECKOUT):
        if all((directory / name).is_file() for name in CLIENT_FILES):
            return directory
    raise FileNotFoundError(
        "the browser client (satchel.js) is in neither the installed package "
        f"({_PACKAGED}) nor a checkout ({_CHECKOUT}): reinstall satchel from a wheel "
        "or its source distribution"
    )


def client_js_blueprint(name: str = "satchel_client_js") -> Blueprint:
    """A blueprint serving ``satchel.js`` and ``satchel.d.ts`` at the root of its
    ``url_prefix``, as module scripts need them (``text/javascript``), revalidated on
    every load (``no-cache`` with an ETag: an upgraded package is picked up at once)
    and ``nosniff``. Anything else under the prefix is a 404."""
    directory = client_js_dir()  # found now: a missing file fails at start-up
    blueprint = Blueprint(name, __name__)

    def serve(filename: str) -> Response:
        response = send_from_directory(
            directory, filename, mimetype=CLIENT_FILES[filename], max_age=0
        )
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    for filename in CLIENT_FILES:
        blueprint.add_url_rule(
            f"/{filename}",
            endpoint=filename.replace(".", "_"),
            view_func=lambda filename=filename: serve(filename),
        )
    return blueprint


__all__ = ["CLIENT_FILES", "client_js_blueprint", "client_js_dir"]
