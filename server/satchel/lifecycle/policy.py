"""Lifecycle policies applied before every seal: pure functions of a Context.

``LifecyclePolicy`` is the configuration; :func:`apply_policies` runs the per-turn
cap, the rolling window and the LLM-token budget, and returns what each did. The byte
budget needs the codec (to measure) and maybe the overflow tier, so it lives in the
request pipeline (satchel.pipeline), which calls these first.

Every removal goes through :func:`drop_oldest`, which never splits a tool call from
its results, never edits an opaque block, never touches pinned items, and always
hands the removed turns to the summarizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..context import Context, LifecycleAction, Turn
from ..errors import TokenExpired
from .groups import oldest_groups_covering, turn_groups
from .summarize import ExtractiveSummarizer, Summarizer, grapheme_cut, summarize
from .tokens import TokenCounter, default_counter, turn_tokens

DAY = 86400.0
#: The default hard cap: a token this long still passes the common header limits on
#: the way (gunicorn refuses a header field over 8190 bytes, "Satchel-Context: "
#: included; nginx's default header buffer is 8 KB).
DEFAULT_HARD_MAX_TOKEN_BYTES = 8000
TRUNCATION_MARK = "\n[… truncated by Satchel: {n} characters removed]"


#: Each limit and the config key that sets it, for error messages.
_LIMIT_KEYS = {
    "max_turns": "SATCHEL_MAX_TURNS",
    "max_llm_tokens": "SATCHEL_MAX_LLM_TOKENS",
    "max_token_bytes": "SATCHEL_MAX_TOKEN_BYTES",
    "hard_max_token_bytes": "SATCHEL_HARD_MAX_TOKEN_BYTES",
    "max_turn_chars": "SATCHEL_MAX_TURN_CHARS",
    "idle_ttl": "SATCHEL_IDLE_TTL",
    "max_age": "SATCHEL_MAX_AGE",
}
_ZERO_ALLOWED = frozenset({"max_turns", "max_llm_tokens"})
#: The longest a time limit may be: 100 years (a token's expiry stops at 2106 anyway).
#: "Forever" written as sys.maxsize passed, and Redis refused every write's TTL.
MAX_DURATION = 100 * 365.25 * 86400
_DURATIONS = frozenset({"idle_ttl", "max_age"})
#: The smallest hard cap: a context with no turns seals to about 220 bytes, and under
#: a cap smaller than that every request was refused 413 budget_exceeded.
MIN_HARD_MAX_TOKEN_BYTES = 512


def limit_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the lifecycle limit ``name``, naming its config key; or None."""
    if value is None:
        return None
    zero_ok = name in _ZERO_ALLOWED
    if isinstance(value, bool) or not isinstance(value, int | float):
        fine = False
    else:
        # Finite: an infinite max_age or idle_ttl made every save's expiry inf, which
        # no token can carry (None is how a limit is turned off).
        finite = not isinstance(value, float) or math.isfinite(value)  # an int always is
        fine = finite and (value >= 0 if zero_ok else value > 0)
        if fine and name == "hard_max_token_bytes" and value < MIN_HARD_MAX_TOKEN_BYTES:
            return (
                f"{_LIMIT_KEYS[name]} ({name}) must be at least {MIN_HARD_MAX_TOKEN_BYTES} "
                "bytes (a context with no turns takes about 220), or None to turn it "
                f"off; got {value!r}"
            )
        if fine and name in _DURATIONS and value > MAX_DURATION:
            return (
                f"{_LIMIT_KEYS[name]} ({name}) must be at most 100 years "
                f"({MAX_DURATION:.0f} seconds), or None to turn it off; got {value!r}"
            )
    if fine:
        return None
    return (
        f"{_LIMIT_KEYS[name]} ({name}) must be {'0 or more' if zero_ok else 'positive'} "
        f"and finite, or None to turn it off; got {value!r}"
    )


@dataclass(slots=True)
class LifecyclePolicy:
    """What to keep in the token. ``None`` disables a limit.

    The byte budget default (3,800 bytes) keeps the token inside a 4 KB cookie with
    room for the cookie's name and attributes. The hard cap (8,000 bytes) is a
    ceiling no token crosses: the pipeline moves or drops even the newest exchange
    rather than issue a token that a proxy would refuse on the next request.
    """

    #: keep at most this many turns in the token (rolling window)
    max_turns: int | None = 40
    #: keep the token's turns within this many LLM tokens (tiktoken or estimate)
    max_llm_tokens: int | None = None
    #: soft byte budget of the final token; over it, turns overflow or are trimmed
    max_token_bytes: int | None = 3800
    #: no token is longer than this; while the overflow tier refuses writes, turns stay
    #: inline up to it (past it they are summarized, dropped and reported as lost)
    hard_max_token_bytes: int | None = DEFAULT_HARD_MAX_TOKEN_BYTES
    #: the longest a single turn's text may be, in characters (longer is truncated)
    max_turn_chars: int | None = 32_000
    #: a token not used for this long expires (seconds)
    idle_ttl: float | None = 7 * DAY
    #: a context older than this expires whatever its activity (seconds)
    max_age: float | None = 30 * DAY
    summarizer: Summarizer = field(default_factory=ExtractiveSummarizer)
    token_counter: TokenCounter | None = None

    def __post_init__(self) -> None:
        # None turns a limit off. A window or LLM budget of 0 keeps only what is never
        # removed (the newest exchange, pinned items, the summary); any other limit at 0
        # or below would break every request (a token that expires at once, a cap no
        # token fits), and a negative one means nothing.
        for name in _LIMIT_KEYS:
            problem = limit_problem(name, getattr(self, name))
            if problem is not None:
                raise ValueError(problem)
        soft, hard = self.max_token_bytes, self.hard_max_token_bytes
        if soft is not None and hard is not None and soft > hard:
            raise ValueError(
                f"the byte budget ({soft}) must not exceed the hard cap ({hard}): "
                "raise hard_max_token_bytes too"
            )
        # Called on every save: a name ("cl100k_base") in place of a function failed
        # every request instead of this one line.
        if not callable(self.summarizer):
            raise ValueError("summarizer must be a callable (dropped_turns, summary) -> str")
        if self.token_counter is not None and not callable(self.token_counter):
            raise ValueError("token_counter must be a callable (text) -> int, or None")

    def counter(self) -> TokenCounter:
        """``token_counter`` if one was given, else :func:`default_counter` (tiktoken's
        ``cl100k_base`` when installed, else the estimate). The process's first call may
        load, or download, tiktoken's encoding."""
        return self.token_counter or default_counter()


def drop_oldest(
    ctx: Context, count: int, *, policy: str, summarizer: Summarizer | None, now: float
) -> list[Turn]:
    """Remove at least ``count`` oldest turns (whole groups) and summarize them."""
    return _drop_leading(ctx, oldest_groups_covering(ctx.turns, count), policy, summarizer, now)


def _drop_leading(
    ctx: Context, n: int, policy: str, summarizer: Summarizer | None, now: float
) -> list[Turn]:
    """Remove the first ``n`` turns (a group boundary) and summarize them."""
    if n == 0:
        return []
    dropped = ctx.turns[:n]
    # Summarized before they leave: a turn the summarizer cannot read (a view's
    # malformed tool call) is still in the context for the caller to name.
    summary = summarize(summarizer, dropped, ctx.summary) if summarizer is not None else None
    del ctx.turns[:n]
    if summary is not None:
        ctx.summary = summary
        ctx.lifecycle.summarized += len(dropped)
    ctx.lifecycle.record(LifecycleAction(policy, "dropped", len(dropped), now))
    return dropped


# At most 10 digits: a mark Satchel wrote counts the characters of one turn. A longer
# number is the user's text imitating a mark (to slip past the cap, or to make int()
# refuse a 5,000-digit number): such a turn is cut like any other.
_MARK_AT_END = re.compile(re.escape(TRUNCATION_MARK).replace(r"\{n\}", r"(\d{1,10})") + r"\Z")


def cap_turn_sizes(ctx: Context, max_chars: int, now: float) -> int:
    """Truncate turn texts longer than ``max_chars``; opaque blocks are never touched.

    A turn truncated before carries the mark, which makes it longer than ``max_chars``:
    it is left alone (it was cut on an earlier request, and counting it again would
    rewrite the mark's count and fill the lifecycle record with the same turn), unless
    the cap has been lowered since, when its text is cut again and the counts add up.
    """
    truncated = 0
    for turn in ctx.turns:
        content = turn.content
        if len(content) <= max_chars:
            continue
        text, already = content, 0
        marked = _MARK_AT_END.search(content)
        if marked is not None:
            text, already = content[: marked.start()], int(marked.group(1))
            if len(text) <= max_chars:
                continue
        # Never inside a character as the reader sees it (an accent, a Thai vowel, an
        # emoji family, a flag): the cut backs off to the boundary before it.
        cut = grapheme_cut(text, max_chars)
        removed = already + len(text) - cut
        turn.content = text[:cut] + TRUNCATION_MARK.format(n=removed)
        truncated += 1
    if truncated:
        ctx.lifecycle.record(
            LifecycleAction("turn_cap", "truncated", truncated, now, f"max {max_chars} chars")
        )
    return truncated


def apply_policies(ctx: Context, policy: LifecyclePolicy, now: float) -> list[Turn]:
    """Per-turn cap, window, then LLM-token budget. Returns the turns dropped.

    Neither the window nor the LLM-token budget removes the newest exchange: when it
    alone is over a limit (a tool loop longer than the window, a window of 0), it
    stays, with the pinned items and the summary. Only the byte budget's hard cap, in
    the pipeline, can move it.
    """
    dropped: list[Turn] = []
    if policy.max_turn_chars is not None:
        cap_turn_sizes(ctx, policy.max_turn_chars, now)
    if policy.max_turns is not None and len(ctx.turns) > policy.max_turns:
        dropped += _drop_older(ctx, len(ctx.turns) - policy.max_turns, "window", policy, now)
    dropped += apply_token_budget(ctx, policy, now)
    return dropped


def apply_token_budget(
    ctx: Context, policy: LifecyclePolicy, now: float, reason: str = "token_budget"
) -> list[Turn]:
    """Drop (and summarize) the oldest groups past the LLM-token budget, never the
    newest; recorded as ``reason / dropped``. Returns the turns dropped."""
    count = llm_budget_excess(ctx, policy)
    return _drop_older(ctx, count, reason, policy, now) if count else []


def llm_budget_excess(ctx: Context, policy: LifecyclePolicy, *, down_to: int | None = None) -> int:
    """How many of the oldest turns must leave for the rest to fit the LLM-token budget
    (0 when they fit, or there is no budget). The caller removes whole groups covering
    them, never the newest: dropped here, or moved to the tier by the pipeline for a
    session that already keeps turns there. ``down_to``: once over the budget, as many
    as leave the rest within that many tokens (the pipeline spills below the budget,
    so that it does not spill again on the next exchange); the turns counted once."""
    if policy.max_llm_tokens is None:
        return 0
    counter = policy.counter()
    sizes = [turn_tokens(t, counter) for t in ctx.turns]
    total = sum(sizes)
    if total <= policy.max_llm_tokens:
        return 0
    excess, count = total - (policy.max_llm_tokens if down_to is None else down_to), 0
    for size in sizes:
        if excess <= 0:
            break
        excess -= size
        count += 1
    return count


def _drop_older(
    ctx: Context, count: int, reason: str, policy: LifecyclePolicy, now: float
) -> list[Turn]:
    """:func:`drop_oldest`, never reaching into the newest exchange."""
    groups = turn_groups(ctx.turns)
    if not groups:
        return []
    # Whole groups covering ``count``, but none past the start of the newest one.
    n = min(oldest_groups_covering(ctx.turns, count, groups), groups[-1][0])
    return _drop_leading(ctx, n, reason, policy.summarizer, now)


def expires_at(ctx: Context, policy: LifecyclePolicy, now: float) -> float | None:
    """The token's expiry: idle TTL from now, never past the context's maximum age."""
    candidates = []
    if policy.idle_ttl is not None:
        candidates.append(now + policy.idle_ttl)
    if policy.max_age is not None:
        candidates.append(ctx.created_at + policy.max_age)
    return min(candidates) if candidates else None


def check_age(ctx: Context, policy: LifecyclePolicy, now: float, skew: float = 30) -> None:
    """Refuse a context past its idle TTL or maximum age (the envelope expiry is the
    first line; this also covers tokens minted without one)."""
    if policy.max_age is not None and now > ctx.created_at + policy.max_age + skew:
        raise TokenExpired("context is older than its maximum age", reason="max_age")
    if policy.idle_ttl is not None and now > ctx.last_active + policy.idle_ttl + skew:
        raise TokenExpired("context has been idle longer than its TTL", reason="idle")


__all__ = [
    "DEFAULT_HARD_MAX_TOKEN_BYTES",
    "LifecyclePolicy",
    "apply_policies",
    "cap_turn_sizes",
    "check_age",
    "drop_oldest",
    "expires_at",
    "turn_groups",
]
