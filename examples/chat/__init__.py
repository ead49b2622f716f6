"""A complete chat web app on Satchel (see docs/chat-example.md).

``python -m examples.chat`` (or ``make demo``) serves it on http://127.0.0.1:8000/.
"""

from .app import create_app

__all__ = ["create_app"]
