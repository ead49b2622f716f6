"""Counting LLM tokens: tiktoken when it is installed, else a documented estimate.

The estimate is ``ceil(len(text) / 4)`` plus 4 tokens of per-message overhead: OpenAI's
rule of thumb for English text. It over-counts code and under-counts some scripts; when
the budget matters, install tiktoken (``pip install tiktoken``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache

from ..context import Turn

TokenCounter = Callable[[str], int]
MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


@lru_cache(maxsize=1)
def default_counter() -> TokenCounter:
    try:
        import tiktoken  # type: ignore[import-not-found]

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # not installed, or its data file cannot be had offline
        return estimate_tokens

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count


def turn_tokens(turn: Turn, counter: TokenCounter) -> int:
    n = counter(turn.content) + MESSAGE_OVERHEAD
    for call in turn.tool_calls:
        arguments = call.arguments
        if not isinstance(arguments, str):  # a map: count it as the JSON the model sees
            arguments = json.dumps(arguments, separators=(",", ":"), default=str)
        n += counter(call.name) + counter(arguments)
    return n


__all__ = ["TokenCounter", "default_counter", "estimate_tokens", "turn_tokens"]
