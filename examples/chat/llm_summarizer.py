"""An optional summarizer backed by a chat model.

Satchel folds the turns that leave the token (overflowed, or trimmed by a policy) into a
running summary with a *summarizer*: any callable ``(dropped_turns, previous_summary) ->
new_summary``. The default, :class:`satchel.lifecycle.ExtractiveSummarizer`, is
deterministic and offline. This one asks a model instead::

    from examples.chat.llm_summarizer import LLMSummarizer
    from examples.chat.models import model_from_env

    app.config["SATCHEL_SUMMARIZER"] = LLMSummarizer(model_from_env())

The chat example turns it on with ``SATCHEL_LLM_SUMMARIZER=1`` (it is off by default).

Things to know before using it:

* It runs inside the request that overflows, before the token is sealed, so the model
  call adds to that request's latency. Keep ``timeout`` short, or use a small model.
* On any failure (network, HTTP error, empty or silly output) it falls back to the
  extractive summarizer, so a model outage never breaks a chat: the summary is just
  less fluent for those turns.
* The summary travels in the token: ``max_chars`` bounds it (the extractive summarizer
  has the same bound) so a verbose model cannot eat the byte budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from satchel import Turn
from satchel.lifecycle import ExtractiveSummarizer
from satchel.lifecycle.summarize import grapheme_cut, raised_at

from .models import ChatModel, Message

log = logging.getLogger("satchel.examples.chat")

Summarizer = Callable[[Sequence[Turn], str], str]

PROMPT = (
    "You maintain the running summary of a conversation between a user and an "
    "assistant. Update the summary with the new turns below. Keep names, numbers, "
    "decisions, preferences and open questions; drop pleasantries. Write at most "
    "{max_chars} characters of plain text, no preamble."
)


class LLMSummarizer:
    """``(dropped_turns, previous_summary) -> summary`` using ``model.complete``."""

    def __init__(
        self,
        model: ChatModel,
        *,
        max_chars: int = 800,
        turn_chars: int = 2000,
        fallback: Summarizer | None = None,
    ) -> None:
        self.model = model
        self.max_chars = max_chars
        self.turn_chars = turn_chars
        self.fallback: Summarizer = fallback or ExtractiveSummarizer(max_chars=max_chars)
        #: how many times the fallback was used (for tests and metrics)
        self.fallbacks = 0

    def messages(self, dropped: Sequence[Turn], previous: str) -> list[Message]:
        lines = []
        for turn in dropped:
            if turn.role not in ("user", "assistant") or not turn.content:
                continue
            if turn.tool_call_id is not None:  # a tool result in a user turn (Anthropic's)
                continue
            text = " ".join(turn.content.split())
            if len(text) > self.turn_chars:
                text = text[: grapheme_cut(text, self.turn_chars - 1)] + "…"
            lines.append(f"{turn.role}: {text}")
        user = f"Current summary:\n{previous or '(none yet)'}\n\nNew turns:\n" + (
            "\n".join(lines) or "(no text turns)"
        )
        return [
            {"role": "system", "content": PROMPT.format(max_chars=self.max_chars)},
            {"role": "user", "content": user},
        ]

    def __call__(self, dropped: Sequence[Turn], previous: str) -> str:
        if not dropped:
            return previous
        try:
            summary = " ".join(self.model.complete(self.messages(dropped, previous)).split())
            if not summary:
                raise ValueError("the model returned an empty summary")
        except Exception as exc:
            # Any failure: never let the summary break the request that overflowed.
            self.fallbacks += 1
            # Type and place only: a model's error can quote the prompt, which holds the
            # very turns being summarized (as satchel.lifecycle.summarize logs it).
            log.warning(
                "LLM summarizer failed (%s at %s); using the extractive summary",
                type(exc).__name__,
                raised_at(exc),
            )
            return self.fallback(dropped, previous)
        if len(summary) > self.max_chars:
            summary = summary[: grapheme_cut(summary, self.max_chars - 1)].rstrip() + "…"
        return summary


__all__ = ["PROMPT", "LLMSummarizer"]
