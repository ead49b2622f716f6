"""``python -m examples.chat``: serve the chat example on 127.0.0.1:$PORT (default 8000).

Uses werkzeug's threaded server (several tabs can stream at once). ``HOST`` overrides
the interface (``--host`` and ``--port`` override both); the demo is meant for loopback
only. Satchel's warnings go to stderr as
JSON lines (``SATCHEL_LOG_LEVEL``, see ``examples/_config.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

from werkzeug.serving import make_server

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat", description="Serve the Satchel chat example."
    )
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    # Given as a str: argparse converts it as it does --port, and a bad $PORT is an
    # error naming the option, not a ValueError traceback before parsing starts.
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "8000"))
    args = parser.parse_args(argv)
    host, port = args.host, args.port
    app = create_app()
    server = make_server(host, port, app, threaded=True)
    model = app.config["CHAT_MODEL"]
    tier = app.config.get("SATCHEL_OVERFLOW_URL") or "none"
    print(f"Satchel chat: http://{host}:{server.port}/", flush=True)
    print(f"  model: {model.name}   overflow tier: {tier.split('://')[0]}", flush=True)
    print("  Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nbye", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
