"""The browser client ships inside the Python package and is served by a blueprint.

An app installed with ``pip install satchel`` has no checkout: the wheel carries
``satchel/client_js/satchel.js`` and ``satchel.d.ts`` (copied there by setup.py), and
``client_js_blueprint()`` serves them. The packaging test builds a real sdist, then a
wheel from it, as pip does for ``pip install satchel`` from source.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from flask import Flask

from satchel.flask_ext.client_js import CLIENT_FILES, client_js_blueprint, client_js_dir
from tests.support import REPO_ROOT

SOURCE = REPO_ROOT / "client_js" / "src"


def test_the_checkout_serves_the_client_from_client_js_src() -> None:
    directory = client_js_dir()
    for name in CLIENT_FILES:
        assert (directory / name).read_bytes() == (SOURCE / name).read_bytes()


def test_the_blueprint_serves_the_module_as_a_module_script_needs_it() -> None:
    app = Flask(__name__)
    app.register_blueprint(client_js_blueprint(), url_prefix="/static/satchel")
    client = app.test_client()
    module = client.get("/static/satchel/satchel.js")
    assert module.status_code == 200
    assert module.mimetype == "text/javascript"  # module scripts refuse anything else
    assert module.data == (SOURCE / "satchel.js").read_bytes()
    assert module.headers["X-Content-Type-Options"] == "nosniff"
    assert module.headers["Cache-Control"] == "no-cache" and module.headers["ETag"]
    etag = module.headers["ETag"]
    again = client.get("/static/satchel/satchel.js", headers={"If-None-Match": etag})
    assert again.status_code == 304  # revalidated, not sent again
    types = client.get("/static/satchel/satchel.d.ts")
    assert types.status_code == 200 and b"export declare function createClient" in types.data
    assert client.get("/static/satchel/fakes.js").status_code == 404
    assert client.get("/static/satchel/../app.py").status_code == 404


def test_the_etag_is_the_contents_so_every_replica_answers_304_alike(tmp_path: Path) -> None:
    """The ETag was made from the file's time and path: two replicas installed apart
    (pip stamps files with the install time) answered each other's revalidation 200."""
    copies = []
    for replica in ("a", "b"):
        folder = tmp_path / replica
        folder.mkdir()
        for name in CLIENT_FILES:
            (folder / name).write_bytes((SOURCE / name).read_bytes())
        app = Flask(replica)
        app.register_blueprint(client_js_blueprint(folder), url_prefix="/s")
        copies.append(app.test_client())
    etag = copies[0].get("/s/satchel.js").headers["ETag"]
    assert copies[1].get("/s/satchel.js", headers={"If-None-Match": etag}).status_code == 304
    # An edited file is served at once, under a new ETag.
    (tmp_path / "b" / "satchel.js").write_text("export const edited = 1;\n")
    edited = copies[1].get("/s/satchel.js", headers={"If-None-Match": etag})
    assert edited.status_code == 200 and edited.data == b"export const edited = 1;\n"
    with pytest.raises(FileNotFoundError, match=r"satchel\.js"):
        client_js_blueprint(tmp_path / "nowhere")


@pytest.mark.slow
def test_the_wheel_built_from_the_sdist_carries_the_client(tmp_path: Path) -> None:
    """What `pip install satchel` installs from a source distribution: the sdist must
    hold the client and the build hook, and the wheel built from it the package data."""
    sdist_dir = tmp_path / "sdist"
    # --egg-base: the build's metadata goes to tmp_path, not into the checkout (where
    # it rewrote the editable install's server/satchel.egg-info under a running suite)
    egg_base = tmp_path / "egg-info"
    egg_base.mkdir()
    checkout_metadata = {
        path: path.stat().st_mtime_ns for path in REPO_ROOT.glob("server/*.egg-info/*")
    }
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base),
         "sdist", "-d", str(sdist_dir)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert {
        path: path.stat().st_mtime_ns for path in REPO_ROOT.glob("server/*.egg-info/*")
    } == checkout_metadata  # the checkout is left as it was
    (sdist,) = sdist_dir.glob("satchel-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "src", filter="data")
    assert any(n.endswith("/client_js/src/satchel.js") for n in names)
    assert not any("/tests/" in n or "/examples/" in n for n in names)
    (unpacked,) = (tmp_path / "src").iterdir()
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(wheel_dir), str(unpacked)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("satchel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in CLIENT_FILES:
            assert archive.read(f"satchel/client_js/{name}") == (SOURCE / name).read_bytes()
        assert "satchel/py.typed" in archive.namelist()


def test_the_checkout_fallback_is_taken_only_inside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package missing its copy looked for client_js/src beside
    site-packages' parent (or a vendoring app's own folder): only a checkout counts."""
    from satchel.flask_ext import client_js

    repo = tmp_path / "repo"
    (repo / "client_js" / "src").mkdir(parents=True)
    for name in CLIENT_FILES:
        (repo / "client_js" / "src" / name).write_text("x")
    monkeypatch.setattr(client_js, "_PACKAGED", tmp_path / "no-copy")
    monkeypatch.setattr(client_js, "_REPO", repo)
    monkeypatch.setattr(client_js, "_CHECKOUT", repo / "client_js" / "src")
    with pytest.raises(FileNotFoundError, match="neither the installed package"):
        client_js_dir()
    (repo / "pyproject.toml").write_text("")
    (repo / "server").mkdir()
    assert client_js_dir() == repo / "client_js" / "src"
