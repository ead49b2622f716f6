"""Build hook: the wheel carries the browser client as package data.

``client_js/src/satchel.js`` and ``satchel.d.ts`` are copied into the built package as
``satchel/client_js/`` (``satchel.flask_ext.client_js`` serves them), so an app
installed from the wheel or the sdist has the client without a checkout. The
repository keeps one copy, in ``client_js/src``; everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT_SOURCE = Path(__file__).resolve().parent / "client_js" / "src"
CLIENT_FILES = ("satchel.js", "satchel.d.ts")


class BuildPyWithClient(build_py):
    """``build_py`` that also copies the browser client into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "satchel" / "client_js"
        self.mkpath(str(target))
        for name in CLIENT_FILES:
            self.copy_file(str(CLIENT_SOURCE / name), str(target / name))


setup(cmdclass={"build_py": BuildPyWithClient})
