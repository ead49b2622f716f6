"""``Vary`` as a list of names across every ``Vary`` header of a response.

werkzeug's ``response.vary`` parses only the first ``Vary`` header and writes back
one: adding a name through it drops a second header another hook added (a CORS
extension's ``headers.add("Vary", "Origin")``), so a cache could serve one origin's
answer to another. These helpers read and write all of them.
"""

from __future__ import annotations

from werkzeug.datastructures import Headers
from werkzeug.wrappers import Response


def vary_names(headers: Headers) -> list[str]:
    """Every name in every ``Vary`` header, in order."""
    return [
        name.strip()
        for value in headers.getlist("Vary")
        for name in value.split(",")
        if name.strip()
    ]


def add_vary(response: Response, *names: str) -> None:
    """Add ``names`` to the response's ``Vary``, as one header holding every name the
    response varied on before, and set directly when there is none (werkzeug's parsed
    header costs microseconds on every response)."""
    if not names:
        return
    headers = response.headers
    if "Vary" not in headers:  # the usual case, on every response with a token
        headers.add("Vary", ", ".join(dict.fromkeys(names)))
        return
    present = vary_names(headers)
    if not present:  # only empty Vary headers
        headers["Vary"] = ", ".join(dict.fromkeys(names))
        return
    seen = {name.lower() for name in present}
    if "*" in seen:
        return  # varies on everything already
    merged = present + [n for n in dict.fromkeys(names) if n.lower() not in seen]
    headers["Vary"] = ", ".join(dict.fromkeys(merged))


__all__ = ["add_vary", "vary_names"]
