"""A tiny Flask app used only by tests/test_support_*.py to exercise LiveServer/browser."""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>support demo</title></head>
<body style="font-family: sans-serif; margin: 2em">
  <h1>Support demo</h1>
  <input id="msg" value="hello"> <button id="send">Send</button>
  <p id="out">(nothing yet)</p>
  <script>
    document.getElementById("send").addEventListener("click", async () => {
      const msg = document.getElementById("msg").value;
      const r = await fetch("/echo?msg=" + encodeURIComponent(msg));
      document.getElementById("out").textContent = (await r.json()).echo;
    });
  </script>
</body></html>
"""


def create_app(greeting: str | None = None) -> Flask:
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/")
    def index():
        return PAGE

    @app.get("/echo")
    def echo():
        return jsonify(echo=request.args.get("msg", ""))

    @app.get("/info")
    def info():
        return jsonify(
            pid=os.getpid(),
            greeting=greeting,
            env=os.environ.get("SUPPORT_DEMO_VALUE"),
        )

    return app
