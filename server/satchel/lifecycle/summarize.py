"""Summarizers: fold turns that leave the token into the running summary.

A summarizer is any callable ``(dropped_turns, previous_summary) -> new_summary``.
The default, :class:`ExtractiveSummarizer`, is deterministic and offline: it keeps
the first sentence of each dropped turn, newest last, within a character budget.
examples/chat/llm_summarizer.py shows one backed by an LLM.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence

from ..context import Turn, check_text, plain_str
from .report import SUMMARIZER_FAILED, current_report, note_fault

Summarizer = Callable[[Sequence[Turn], str], str]
log = logging.getLogger("satchel")

#: A sentence ends at ``.``, ``!`` or ``?`` (or the Arabic question mark, the Urdu full
#: stop, the Devanagari danda and double danda, the Armenian full stop), closing quotes
#: or brackets after it, before whitespace; or at the CJK full stop, exclamation and
#: question marks, which need none (Chinese and Japanese put no space between
#: sentences: without them a whole message was its "first sentence").
_SENTENCE_END = re.compile(
    # Only from the start of a run of marks, taken whole (possessive): tried from each
    # mark of a long run not followed by whitespace (32,000 dots), the search was
    # quadratic, tens of seconds of CPU for one dropped turn.
    "(?<![.!?\u061f\u06d4\u0964\u0965\u0589])"
    "[.!?\u061f\u06d4\u0964\u0965\u0589]++[\"'\u2019\u201d\u00bb)\\]]*+(?=\\s)"
    "|[\u3002\uff01\uff1f\uff61]+[\u300d\u300f\uff09\u201d\u2019]*"
)
#: The count has at most 18 digits: a summarizer's text that only looks like this
#: header (a prompt-injected model's, 5,000 digits long) made int() raise in the
#: fallback itself, and every later save failed while the summarizer did.
SUMMARY_HEADER = re.compile(r"^\((\d{1,18}) earlier turns? summarized\)\n?")
SUMMARY_CUT_MARK = "[… earlier summary cut by Satchel]\n"
#: The longest summary kept, in characters. A summarizer's longer result keeps its
#: newest part (:func:`cut_summary`): a summary must fit in one string of a token
#: (512 KiB of UTF-8 by default, so at most 131,072 characters of up to 4 bytes), and
#: a repetitive one can outgrow that while the compressed token stays small, which
#: made every later save of the conversation fail.
MAX_SUMMARY_CHARS = 131_072


def first_sentence(text: str, limit: int) -> str:
    """``text``'s first sentence (up to a run of ``.``, ``!``, ``?`` or another script's
    sentence end, with any closing quotes, followed by whitespace; or up to the CJK
    full stop, exclamation or question mark, which need none) with its whitespace
    collapsed, cut to ``limit`` characters (never inside a character as a reader sees
    it) with a trailing ``…``."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    sentence = text[: match.end()] if match else text
    if len(sentence) > limit:
        sentence = sentence[: grapheme_cut(sentence, limit - 1)].rstrip() + "…"
    return sentence


_ZWJ = "\u200d"
#: How far a cut moves to reach a character boundary; a longer cluster (a "zalgo" text
#: of hundreds of combining marks) is cut inside, as before.
_MAX_CLUSTER = 32


def _is_ri(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


#: Extenders of the character before them that are no combining mark by category:
#: ZWJ and ZWNJ, Thai and Lao SARA AM (spacing marks in UAX #29), the halfwidth
#: katakana voiced and semi-voiced sound marks.
_EXTENDERS = frozenset({_ZWJ, "\u200c", "\u0e33", "\u0eb3", "\uff9e", "\uff9f"})
#: Prepended concatenation marks (Arabic number signs): they belong to what follows.
_PREPEND = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f")


def _extends(ch: str) -> bool:
    """``ch`` belongs to the character before it: a combining mark (accents, Thai and
    Indic vowel signs, variation selectors, the keycap), ZWJ or ZWNJ, Thai and Lao SARA
    AM, the halfwidth katakana sound marks, a skin tone, an emoji tag (subdivision
    flags), a Hangul vowel or final jamo."""
    return (
        unicodedata.category(ch) in ("Mn", "Mc", "Me")
        or ch in _EXTENDERS
        or "\U0001f3fb" <= ch <= "\U0001f3ff"
        or "\U000e0020" <= ch <= "\U000e007f"
        or "\u1160" <= ch <= "\u11ff"
        or "\ud7b0" <= ch <= "\ud7ff"
    )


def is_boundary(text: str, i: int) -> bool:
    """Whether ``text[:i]`` ends between two user-perceived characters (an
    approximation of Unicode's grapheme clusters, UAX #29, with the stdlib only): never
    inside an accented letter, an emoji ZWJ sequence, a flag, a skin-toned emoji, an
    Indic conjunct, a decomposed Hangul syllable or a CR LF."""
    if i <= 0 or i >= len(text):
        return True
    before, after = text[i - 1], text[i]
    if _extends(after) or before == _ZWJ or before in _PREPEND:
        return False
    if before == "\r" and after == "\n":
        return False
    if unicodedata.combining(before) == 9 and after.isalpha():  # virama: a conjunct
        return False
    if "\u1100" <= before <= "\u115f" and (
        "\u1100" <= after <= "\u11ff" or "\uac00" <= after <= "\ud7a3"
    ):
        return False  # a leading jamo and its vowel or syllable
    if _is_ri(before) and _is_ri(after):
        run = 0
        while run < i and _is_ri(text[i - 1 - run]):
            run += 1
        return run % 2 == 0  # flags are pairs: an odd run ends half a flag
    return True


def grapheme_cut(text: str, n: int) -> int:
    """The largest ``i <= n`` where ``text`` may be cut (:func:`is_boundary`)."""
    i = min(n, len(text))
    for _ in range(_MAX_CLUSTER):
        if is_boundary(text, i):
            return i
        i -= 1
    return min(n, len(text))


def grapheme_start(text: str, n: int) -> int:
    """The smallest ``i >= n`` where ``text`` may be cut (:func:`is_boundary`)."""
    i = max(n, 0)
    for _ in range(_MAX_CLUSTER):
        if is_boundary(text, i):
            return i
        i += 1
    return max(n, 0)


class ExtractiveSummarizer:
    """Keep one line per dropped turn (``role: first sentence``) within ``max_chars``.

    When the summary outgrows ``max_chars`` its oldest lines go first, and a header
    keeps count of how many turns the summary stands for, so it always says how much
    left the token even when it can no longer say what.
    """

    def __init__(self, max_chars: int = 800, line_chars: int = 120) -> None:
        self.max_chars = max_chars
        self.line_chars = line_chars

    def __call__(self, dropped: Sequence[Turn], previous: str) -> str:
        covered = 0
        match = SUMMARY_HEADER.match(previous)
        body = previous[match.end() :] if match else previous
        if match:
            covered = int(match.group(1))
        previous_lines = [line for line in body.splitlines() if line]
        if previous and not match:
            covered += len(previous_lines)  # a summary written by another summarizer
        covered += len(dropped)
        header = f"({covered} earlier turn{'s' if covered != 1 else ''} summarized)\n"
        # The newest lines that fit, found from the newest back: only those are made
        # (one drop can hold thousands of turns; making every line and then removing
        # the oldest one by one, re-adding the rest each time, was quadratic).
        room = self.max_chars - len(header)
        lines: list[str] = []
        for line in self._newest_first(dropped, previous_lines):
            room -= len(line) + 1
            if room < 0:
                break
            lines.append(line)
        lines.reverse()
        return header + "\n".join(lines)

    def _newest_first(self, dropped: Sequence[Turn], previous_lines: list[str]) -> Iterator[str]:
        """The summary's candidate lines, newest first: the dropped turns', then the
        previous summary's."""
        for turn in reversed(dropped):
            if turn.role == "tool" or turn.tool_call_id is not None:
                # A tool result, whatever its role (Anthropic's come in user turns): its
                # size only, said as the tool's. Quoted, it read as what the user said,
                # and put raw tool output (an IBAN, say) into the summary.
                yield f"- tool: tool result ({len(turn.content)} chars)"
                continue
            if turn.tool_calls and not turn.content:
                text = "called " + ", ".join(c.name for c in turn.tool_calls)
            else:
                text = first_sentence(turn.content, self.line_chars)
            yield f"- {turn.role}: {text}"
        yield from reversed(previous_lines)


_FALLBACK = ExtractiveSummarizer()


def cut_summary(summary: str, keep: int) -> str:
    """The newest part of ``summary``, about ``keep`` characters: from a line break (or a
    sentence end or a space, in a summary with no line break near the cut) within the
    first half of what may be kept, else from a character boundary.

    A header line saying how many turns the summary stands for (the extractive
    summarizer's ``(N earlier turns summarized)``) stays in front, so the count
    survives the cut; the cut itself is marked.
    """
    header = ""
    match = SUMMARY_HEADER.match(summary)
    if match:
        header, summary = summary[: match.end()], summary[match.end() :]
    if summary.startswith(SUMMARY_CUT_MARK):
        summary = summary[len(SUMMARY_CUT_MARK) :]
    keep -= len(header) + len(SUMMARY_CUT_MARK) + 16
    if keep <= 0:
        return header.rstrip("\n")
    tail = (
        summary[grapheme_start(summary, len(summary) - keep) :] if keep < len(summary) else summary
    )
    if keep < len(summary):
        # Whole lines; in a summary with no line break near the cut (an LLM's one
        # paragraph), whole sentences or words; in one without spaces either (Chinese,
        # Japanese, Thai), whole characters. A boundary is taken only within the first
        # half of what may be kept: the first line break of a long paragraph's last
        # line threw away almost all of it (2,000 characters allowed, 50 kept).
        for boundary in ("\n", "\u3002", "\uff01", "\uff1f", " "):
            cut = tail.find(boundary, 0, max(1, len(tail) // 2))
            if 0 <= cut < len(tail) - 1:
                tail = tail[cut + 1 :]
                break
    return header + SUMMARY_CUT_MARK + tail


def summarize(summarizer: Summarizer, dropped: Sequence[Turn], previous: str) -> str:
    """Run ``summarizer``; if it fails (an LLM timing out, say), fall back to the
    extractive one, so a summarizer's failure never fails the request or loses the
    record of what left the token. A str subclass (``markupsafe.Markup``...) becomes
    the plain str it holds, as the token carries it: sealing refuses a subclass.

    The time spent and a failure go to the save's :class:`~.report.LifecycleReport`
    (the pipeline flags the response ``summarizer_failed`` and reports the
    ``summarize`` step; the calls happen deep inside trim and overflow)."""
    report = current_report.get()
    started = time.perf_counter()
    try:
        # A copy: a summarizer that empties the list it gets must not change what the
        # caller then records as dropped.
        summary = summarizer(list(dropped), previous)
        if not isinstance(summary, str):
            raise TypeError("a summarizer must return a str")
        # A lone surrogate (an LLM's reply cut mid-emoji) can be in no token: sealing
        # would refuse it on this request and every one after, which drop the same turns.
        check_text(summary, "the summary")
        summary = plain_str(summary)
        if len(summary) > MAX_SUMMARY_CHARS:
            log.info(
                "satchel summarizer returned %d characters; kept the newest %d",
                len(summary),
                MAX_SUMMARY_CHARS,
            )
            summary = cut_summary(summary, MAX_SUMMARY_CHARS)
        return summary
    except Exception as exc:
        # The exception's text and traceback are not logged at any level: a
        # summarizer's errors (an LLM API's, say) can quote the prompt, which is
        # conversation content, and log pipelines keep DEBUG too. The type and the
        # line that raised are enough to alert on and to find it.
        log.warning(
            "satchel summarizer failed (%s at %s); used the extractive fallback",
            type(exc).__name__,
            raised_at(exc),
        )
        note_fault(SUMMARIZER_FAILED, type(exc).__name__)
        return _FALLBACK(dropped, previous)
    finally:
        if report is not None:
            report.summarize_seconds.append(time.perf_counter() - started)


def raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame that raised (no message, no locals)."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


__all__ = [
    "MAX_SUMMARY_CHARS",
    "ExtractiveSummarizer",
    "Summarizer",
    "cut_summary",
    "first_sentence",
    "grapheme_cut",
    "grapheme_start",
    "is_boundary",
    "summarize",
]
