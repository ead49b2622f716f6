"""Counting LLM tokens: tiktoken when it is installed, else a documented estimate.

The estimate is ``ceil(utf8_bytes(text) / 4)`` plus 4 tokens of per-message overhead:
OpenAI's rule of thumb of four characters a token for English, counted in UTF-8 bytes
so that scripts whose characters take several bytes (Chinese, Japanese, Cyrillic,
emoji) are not under-counted threefold or more. English text is over-counted by about
half, code is about right, and CJK and emoji are still under-counted (docs/lifecycle.md
has the measured ratios); when the budget matters, install tiktoken (``pip install
tiktoken``: ``cl100k_base``).

A counter passed in (``LifecyclePolicy(token_counter=...)``) that raises or returns
anything but a whole number >= 0 is not trusted for that text: the estimate counts it,
a warning names the failure once per counter, and the save that met it is flagged
``token_counter_failed`` (counted in ``satchel_degraded_total``), so a user's message
(``<|endoftext|>`` to a tokenizer called without ``disallowed_special``) cannot fail
every save, and a counter that fails on every save shows in the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import weakref
from collections.abc import Callable
from functools import lru_cache

from ..context import Turn
from .report import TOKEN_COUNTER_FAILED, note_fault

TokenCounter = Callable[[str], int]
MESSAGE_OVERHEAD = 4

log = logging.getLogger("satchel")


def estimate_tokens(text: str) -> int:
    """``ceil(utf8_bytes(text) / 4)``: the estimate the module docstring describes,
    without the per-message overhead (:func:`turn_tokens` adds it)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (size + 3) // 4


@lru_cache(maxsize=1)
def default_counter() -> TokenCounter:
    """tiktoken's ``cl100k_base`` when tiktoken is installed and its data file can be
    had (it downloads it on first use, unless ``TIKTOKEN_CACHE_DIR`` holds it), else the
    estimate. The Flask extension calls this at start-up, so a download happens (or
    stalls) there, not inside a request; the choice is kept for the process."""
    try:
        import tiktoken  # type: ignore[import-not-found]
    except ImportError:
        return estimate_tokens
    try:
        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # its data file cannot be had (offline, say)
        log.warning(
            "satchel: tiktoken is installed but its cl100k_base encoding could not be "
            "loaded (%s); LLM tokens are estimated instead (set TIKTOKEN_CACHE_DIR to a "
            "directory holding the file)",
            type(exc).__name__,
        )
        return estimate_tokens

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count


#: counters that already failed once (warned about once each); weakly, so a counter
#: freed and another made at its address is still warned about
_FAILED: weakref.WeakSet[Callable[..., object]] = weakref.WeakSet()


def _count(counter: TokenCounter, text: str) -> int:
    """``counter(text)``, or the estimate when it fails or answers nonsense."""
    if counter is estimate_tokens:
        return estimate_tokens(text)
    try:
        n = counter(text)
        # Any real number (numpy's integers, a Fraction), not a bool, a str or None.
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not 0 <= n < math.inf:
            raise TypeError("a token counter must return a number >= 0")
        return math.ceil(n)
    except Exception as exc:
        note_fault(TOKEN_COUNTER_FAILED, type(exc).__name__)
        try:
            first = counter not in _FAILED
            _FAILED.add(counter)
        except TypeError:  # not weakly referable (a builtin): warned about every time
            first = True
        if first:
            # Type only: the text it counted is conversation content.
            log.warning(
                "satchel token counter failed (%s); those texts are counted by the estimate",
                type(exc).__name__,
            )
        return estimate_tokens(text)


def turn_tokens(turn: Turn, counter: TokenCounter) -> int:
    n = _count(counter, turn.content) + MESSAGE_OVERHEAD
    for call in turn.tool_calls:
        arguments = call.arguments
        if not isinstance(arguments, str):  # a map: count it as the JSON the model sees
            arguments = json.dumps(arguments, separators=(",", ":"), default=str)
        n += _count(counter, call.name) + _count(counter, arguments)
    return n


__all__ = ["TokenCounter", "default_counter", "estimate_tokens", "turn_tokens"]
