"""What the example apps share: configuration from the environment, request parsing.

Each app reads a fixed list of ``SATCHEL_*`` variables into its Flask config (a value
passed to ``create_app(config)`` wins over the environment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from satchel.audit import configure_json_logging
from satchel.context import check_text
from satchel.errors import ConfigurationError, InvalidRequest
from satchel.flask_ext import json_body
from satchel.flask_ext.config import parse_flag, warn_misspelled_keys

#: Largest request body the example apps accept (Flask's MAX_CONTENT_LENGTH): a
#: maximal message (8000 characters, up to 6 bytes each as a JSON escape) plus a token
#: in a JSON field, with room to spare. Larger bodies are a JSON 413 before being read.
MAX_BODY_BYTES = 256 * 1024

#: Read by every example app.
COMMON_ENV_KEYS = (
    "SATCHEL_KEYS",
    "SATCHEL_OVERFLOW_URL",
    "SATCHEL_MAX_TOKEN_BYTES",
    "SATCHEL_HARD_MAX_TOKEN_BYTES",
    "SATCHEL_MAX_TURNS",
    "SATCHEL_TOKEN_MODE",
    "SATCHEL_CONSISTENCY",
    "SATCHEL_MODE",
    "SATCHEL_ON_BAD_TOKEN",
    "SATCHEL_TIER_DOWN_POLICY",
    "SATCHEL_MARK_IDS",
    "SATCHEL_KEEP_NEWEST",
    "SATCHEL_STORE_URL",
    "SATCHEL_ANCHOR_KID",
    "SATCHEL_PURPOSE",
    "SATCHEL_PAD_TO",
    "SATCHEL_MAX_LLM_TOKENS",
    "SATCHEL_IDLE_TTL",
    "SATCHEL_MAX_AGE",
    "SATCHEL_TIER_READ_TIMEOUT",
    "SATCHEL_TIER_CONNECT_TIMEOUT",
    "SATCHEL_BREAKER_FAIL_MAX",
    "SATCHEL_BREAKER_RESET_TIMEOUT",
    "SATCHEL_SEGMENT_CACHE_BYTES",
    "SATCHEL_SEGMENT_GRACE",
    "SATCHEL_HEADER",
    "SATCHEL_COOKIE",
    "SATCHEL_COOKIE_SECURE",
    "SATCHEL_COOKIE_SAMESITE",
    "SATCHEL_COOKIE_PATH",
    "SATCHEL_COOKIE_MAX_AGE",
    "SATCHEL_COOKIE_PARTITIONED",
    "SATCHEL_JSON_FIELD",
    "SATCHEL_METRICS_ROUTE",
    "SATCHEL_HEALTH_ROUTES",
    "SATCHEL_AEAD",
    "SATCHEL_DICTIONARIES",
    "SATCHEL_DICTIONARY_ID",
    "SATCHEL_TOKEN_LIMIT",
    "SATCHEL_MAX_TURN_CHARS",
    "SATCHEL_METADATA_VERSION",
    "SATCHEL_METADATA_WRITE_VERSION",
    "SATCHEL_DEV_KEY_FILE",
)
# Not from the environment: SATCHEL_SUMMARIZER and SATCHEL_USER_BINDING are callables
# (set them in create_app's config).
# Also read: SATCHEL_LOG_LEVEL (configure_logging).


def read_message(max_chars: int) -> str:
    """The request's ``{"message": "..."}``, checked; bad input is a JSON 400."""
    body = json_body()  # nested past the recursion limit: a JSON 400, not a 500
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        raise InvalidRequest('send JSON {"message": "..."}')
    # Kept exactly as sent (a pasted code block keeps its first line's indentation);
    # only a message of nothing but whitespace is refused.
    message = body["message"]
    check_text(message, "message")  # an unpaired surrogate: JSON 400 invalid_text
    if not message.strip():
        raise InvalidRequest("message is empty")
    if len(message) > max_chars:
        raise InvalidRequest(f"message is longer than {max_chars} characters")
    return message


#: The example apps' own SATCHEL_* variables (not Satchel settings): never warned
#: about as misspellings (SATCHEL_LLM_SUMMARIZER is close to SATCHEL_SUMMARIZER).
EXAMPLE_ENV_KEYS = frozenset(
    {
        "SATCHEL_LLM_SUMMARIZER",
        "SATCHEL_LOG_LEVEL",
        "SATCHEL_MODEL_API_KEY",
        "SATCHEL_MODEL_BASE_URL",
        "SATCHEL_MODEL_DELAY",
        "SATCHEL_MODEL_NAME",
        "SATCHEL_MODEL_TEMPERATURE",
        "SATCHEL_MODEL_TIMEOUT",
    }
)


def env_flag(name: str) -> bool:
    """A boolean environment variable in Satchel's words (``1/true/yes/on`` or
    ``0/false/no/off``, unset or empty: false); ConfigurationError naming it otherwise
    (``false`` was read as on)."""
    try:
        return parse_flag(os.environ.get(name, ""))
    except ValueError:
        raise ConfigurationError(
            f"{name} must be true or false (1/0, yes/no, on/off), not {os.environ[name]!r}"
        ) from None


def env_config(keys: Iterable[str]) -> dict[str, Any]:
    """The ``keys`` that are set in the environment, with their values. A variable that
    looks like a misspelled Satchel setting (``SATCHEL_OVERFLOW``) is warned about."""
    keys = list(keys)
    warn_misspelled_keys(
        {k: None for k in os.environ if k not in keys and k not in EXAMPLE_ENV_KEYS}
    )
    return {key: os.environ[key] for key in keys if key in os.environ}


def configure_logging() -> None:
    """Send the ``satchel`` logger to stderr as JSON lines, at ``SATCHEL_LOG_LEVEL``
    (default WARNING: data loss, forks, stale tokens, the breaker opening; INFO adds an
    audit record per event), unless logging is already set up.

    The library only installs a NullHandler, and gunicorn configures its own loggers,
    not the root: without this, an example app run by gunicorn would report data loss
    to nobody. An app that configured logging itself (a ``logging.basicConfig`` call,
    pytest's capture) keeps its own.
    """
    logger = logging.getLogger("satchel")
    configured = any(not isinstance(h, logging.NullHandler) for h in logger.handlers)
    if configured or logging.getLogger().handlers:
        return
    level = os.environ.get("SATCHEL_LOG_LEVEL", "WARNING").strip().upper() or "WARNING"
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigurationError(
            "SATCHEL_LOG_LEVEL must be a logging level (DEBUG, INFO, WARNING, ERROR), "
            f"not {level!r}"
        )
    configure_json_logging(level=logging.getLevelName(level))
