"""Lifecycle policies: window, LLM-token budget, turn cap, TTL, grouping, summarizers."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from satchel import Context, LifecycleAction, OpaqueBlock, ToolCall, Turn
from satchel.errors import TokenExpired
from satchel.lifecycle import (
    ExtractiveSummarizer,
    LifecyclePolicy,
    apply_policies,
    cap_turn_sizes,
    check_age,
    default_counter,
    drop_oldest,
    estimate_tokens,
    expires_at,
    oldest_groups_covering,
    turn_groups,
)
from satchel.lifecycle.policy import DAY, TRUNCATION_MARK
from satchel.lifecycle.summarize import first_sentence
from satchel.lifecycle.tokens import MESSAGE_OVERHEAD, turn_tokens

NOW = 1_767_225_600


def chat(exchanges: int, *, text: str = "message number {i}. More words follow here.") -> Context:
    ctx = Context.new(now=NOW, session_id=b"\x05" * 16)
    for i in range(exchanges):
        ctx.add_turn("user", "Q" + text.format(i=i), ts=NOW + i)
        ctx.add_turn("assistant", "A" + text.format(i=i), ts=NOW + i)
    return ctx


class Recorder:
    """A summarizer hook that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Turn], str]] = []

    def __call__(self, dropped: Sequence[Turn], previous: str) -> str:
        self.calls.append((list(dropped), previous))
        return f"{previous}+{len(dropped)}"


def policy(**kwargs: object) -> LifecyclePolicy:
    defaults: dict[str, object] = {
        "max_turns": None,
        "max_llm_tokens": None,
        "max_token_bytes": None,
        "max_turn_chars": None,
        "token_counter": estimate_tokens,
    }
    defaults.update(kwargs)
    return LifecyclePolicy(**defaults)  # type: ignore[arg-type]


# -- grouping ------------------------------------------------------------------------------


def test_groups_are_exchanges() -> None:
    ctx = chat(3)
    assert turn_groups(ctx.turns) == [(0, 2), (2, 4), (4, 6)]
    assert oldest_groups_covering(ctx.turns, 1) == 2  # never half an exchange
    assert oldest_groups_covering(ctx.turns, 2) == 2
    assert oldest_groups_covering(ctx.turns, 3) == 4
    assert oldest_groups_covering(ctx.turns, 0) == 0
    assert oldest_groups_covering(ctx.turns, 99) == 6


def test_a_tool_result_after_the_next_question_widens_the_group() -> None:
    turns = [
        Turn("user", "q1"),
        Turn("assistant", "", tool_calls=(ToolCall("c1", "slow"),)),
        Turn("user", "q2 while waiting"),
        Turn("tool", "r1", tool_call_id="c1"),
        Turn("assistant", "a2"),
        Turn("user", "q3"),
        Turn("assistant", "a3"),
    ]
    assert turn_groups(turns) == [(0, 5), (5, 7)]


def test_an_unanswered_tool_call_does_not_hold_the_rest_in_one_group() -> None:
    """A call whose result never came (a failed tool the app did not record, an
    interrupted turn) used to pull every later tool call into its group: one group
    from there to the end, which no window or budget could trim."""
    turns = [Turn("user", "q0"), Turn("assistant", "", tool_calls=(ToolCall("lost", "f"),))]
    for i in range(1, 30):
        turns += [
            Turn("user", f"q{i}"),
            Turn("assistant", "", tool_calls=(ToolCall(f"c{i}", "f"),)),
            Turn("tool", f"r{i}", tool_call_id=f"c{i}"),
            Turn("assistant", f"a{i}"),
        ]
    groups = turn_groups(turns)
    assert groups[0] == (0, 2) and len(groups) == 30
    assert all(end - start == 4 for start, end in groups[1:])
    ctx = Context.new(now=NOW)
    ctx.turns = turns
    apply_policies(ctx, policy(max_turns=10), NOW)
    assert len(ctx.turns) == 8 and ctx.turns[0].content == "q28"  # whole exchanges, <= 10


def test_parallel_calls_answered_out_of_order_share_one_group() -> None:
    turns = [
        Turn("user", "q"),
        Turn("assistant", "", tool_calls=(ToolCall("a", "f"), ToolCall("b", "g"))),
        Turn("tool", "rb", tool_call_id="b"),
        Turn("assistant", "", tool_calls=(ToolCall("c", "h"),)),  # a follow-up call
        Turn("tool", "ra", tool_call_id="a"),
        Turn("tool", "rc", tool_call_id="c"),
        Turn("assistant", "done"),
        Turn("user", "next"),
        Turn("assistant", "ok"),
    ]
    assert turn_groups(turns) == [(0, 7), (7, 9)]


def test_leading_system_turns_form_their_own_group() -> None:
    turns = [Turn("system", "s"), Turn("user", "q"), Turn("assistant", "a"), Turn("system", "x")]
    assert turn_groups(turns) == [(0, 1), (1, 4)]


# -- window --------------------------------------------------------------------------------


def test_window_keeps_the_newest_turns_and_records_why() -> None:
    ctx = chat(10)
    oldest = ctx.turns[:14]
    rec = Recorder()
    dropped = apply_policies(ctx, policy(max_turns=6, summarizer=rec), NOW + 100)
    assert len(ctx.turns) == 6
    assert dropped == oldest
    assert [t.content for t in ctx.turns] == [t.content for t in chat(10).turns[14:]]
    assert ctx.lifecycle.dropped == {"window": 14}
    assert ctx.lifecycle.summarized == 14
    assert ctx.lifecycle.recent[-1] == LifecycleAction("window", "dropped", 14, NOW + 100, "")
    assert ctx.lifecycle.to_dict()["dropped"] == {"window": 14}
    assert len(rec.calls) == 1 and rec.calls[0] == (oldest, "")


def test_window_rounds_up_to_whole_exchanges() -> None:
    ctx = chat(10)
    apply_policies(ctx, policy(max_turns=5), NOW)
    assert len(ctx.turns) == 4  # 15 must go: 8 exchanges (16 turns) do
    assert ctx.turns[0].role == "user"


def tool_loop(ctx: Context) -> None:
    """One exchange of 4 turns: a question, a tool call, its result, the answer."""
    ctx.add_turn("user", "q", ts=NOW)
    ctx.add_turn("assistant", "", ts=NOW, tool_calls=[ToolCall("c1", "f")])
    ctx.add_turn("tool", "r", ts=NOW, tool_call_id="c1")
    ctx.add_turn("assistant", "a", ts=NOW)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_turns": 3},
        {"max_turns": 1},
        {"max_turns": 0},
        {"max_llm_tokens": 0},
        {"max_llm_tokens": 5},
        {"max_turns": 0, "max_llm_tokens": 0},
    ],
)
def test_the_newest_exchange_stays_even_when_it_alone_is_over_a_limit(
    limits: dict[str, int],
) -> None:
    """docs/lifecycle.md: a window or LLM budget of 0 keeps the newest exchange. It
    used to drop every turn when that exchange alone was longer than the limit."""
    ctx = chat(2)
    tool_loop(ctx)
    dropped = apply_policies(ctx, policy(**limits), NOW)
    assert [t.content for t in ctx.turns] == ["q", "", "r", "a"]
    assert len(dropped) == 4 and sum(ctx.lifecycle.dropped.values()) == 4
    # Alone in the token, it stays: nothing is dropped, nothing recorded.
    assert apply_policies(ctx, policy(**limits), NOW) == []
    assert len(ctx.turns) == 4 and sum(ctx.lifecycle.dropped.values()) == 4


def test_window_under_the_limit_does_nothing() -> None:
    ctx = chat(3)
    assert apply_policies(ctx, policy(max_turns=6), NOW) == []
    assert len(ctx.turns) == 6 and ctx.lifecycle.recent == [] and ctx.summary == ""


# -- LLM-token budget ----------------------------------------------------------------------


def test_token_budget_keeps_the_newest_turns_within_budget() -> None:
    ctx = chat(20)
    counter = estimate_tokens
    per_turn = [turn_tokens(t, counter) for t in ctx.turns]
    assert per_turn[0] == estimate_tokens(ctx.turns[0].content) + MESSAGE_OVERHEAD
    budget = sum(per_turn) // 3
    apply_policies(ctx, policy(max_llm_tokens=budget), NOW)
    remaining = sum(turn_tokens(t, counter) for t in ctx.turns)
    assert 0 < remaining <= budget
    assert ctx.lifecycle.dropped["token_budget"] == 40 - len(ctx.turns)
    assert ctx.turns[-1].content == chat(20).turns[-1].content


def test_token_budget_counts_tool_calls_and_uses_the_injected_counter() -> None:
    seen: list[str] = []

    def counter(text: str) -> int:
        seen.append(text)
        return len(text)

    turn = Turn("assistant", "abc", tool_calls=(ToolCall("c", "fname", "{args}"),))
    assert turn_tokens(turn, counter) == 3 + MESSAGE_OVERHEAD + 5 + 6
    assert seen == ["abc", "fname", "{args}"]


def test_default_counter_is_cached_and_counts() -> None:
    counter = default_counter()
    assert counter is default_counter()
    assert counter("") == 0
    assert counter("hello world " * 10) > 0
    assert estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2


def test_the_estimate_counts_utf8_bytes_so_other_scripts_are_not_a_quarter() -> None:
    """Characters / 4 let a budget of 4,000 through about 14,000 real tokens of
    Chinese (each character is about one token): bytes / 4 is the same for English."""
    assert estimate_tokens("hello world!") == 3  # ASCII: as before
    assert estimate_tokens("你好世界") == 3  # 12 bytes, not 1
    assert estimate_tokens("😀" * 4) == 4  # 16 bytes, not 1


def test_a_token_counter_that_fails_is_replaced_by_the_estimate_for_that_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tokenizer called without disallowed_special raises on "<|endoftext|>" typed
    by a user: every save of that conversation was a 500. The text is estimated
    instead, and the failure is logged once, by type."""
    import logging

    def strict(text: str) -> int:
        if "<|endoftext|>" in text:
            raise ValueError(f"disallowed special token in {text!r}")
        return len(text.split())

    turn = Turn("user", "hi <|endoftext|> there", 0.0)
    with caplog.at_level(logging.WARNING, logger="satchel"):
        n = turn_tokens(turn, strict)
        turn_tokens(turn, strict)
    assert n == estimate_tokens(turn.content) + MESSAGE_OVERHEAD
    assert caplog.text.count("token counter failed (ValueError)") == 1
    assert "endoftext" not in caplog.text  # the text it counted is not logged
    for nonsense in (None, "3", -1, float("nan"), True):
        assert turn_tokens(turn, lambda _t, v=nonsense: v) == n  # type: ignore[misc]
    assert turn_tokens(Turn("user", "a b c", 0.0), lambda _t: 2.5) == 3 + MESSAGE_OVERHEAD
    from fractions import Fraction

    assert turn_tokens(Turn("user", "a", 0.0), lambda _t: Fraction(3, 2)) == 2 + MESSAGE_OVERHEAD


def test_a_policy_refuses_a_counter_or_summarizer_that_cannot_be_called() -> None:
    with pytest.raises(ValueError, match="token_counter must be a callable"):
        LifecyclePolicy(token_counter="cl100k_base")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="summarizer must be a callable"):
        LifecyclePolicy(summarizer="extractive")  # type: ignore[arg-type]


def test_a_summarizer_that_empties_its_list_does_not_change_the_record() -> None:
    def emptying(dropped: list[Turn], previous: str) -> str:
        dropped.clear()
        return previous + "+"

    ctx = chat(4)
    apply_policies(ctx, policy(max_turns=2, summarizer=emptying), now=NOW)
    assert ctx.lifecycle.dropped.get("window") == 6
    assert ctx.lifecycle.summarized == 6


# -- per-turn cap --------------------------------------------------------------------------


def test_turn_cap_truncates_text_and_never_touches_blocks() -> None:
    ctx = Context.new(now=NOW)
    block = OpaqueBlock("thinking", bytes(range(256)) * 100, "anthropic")
    ctx.add_turn("assistant", "x" * 500, ts=NOW, blocks=[block])
    ctx.add_turn("user", "short", ts=NOW)
    assert cap_turn_sizes(ctx, 100, NOW) == 1
    assert ctx.turns[0].content == "x" * 100 + TRUNCATION_MARK.format(n=400)
    assert ctx.turns[0].blocks[0].data == bytes(range(256)) * 100
    assert ctx.turns[1].content == "short"
    assert ctx.lifecycle.recent[-1].policy == "turn_cap"
    assert ctx.lifecycle.recent[-1].action == "truncated"
    assert ctx.lifecycle.dropped == {}  # truncation is not a drop
    assert cap_turn_sizes(ctx, 10_000, NOW) == 0


# -- TTL and maximum age -------------------------------------------------------------------


def test_expiry_is_idle_ttl_capped_by_max_age() -> None:
    ctx = Context.new(now=NOW)
    pol = policy(idle_ttl=7 * DAY, max_age=30 * DAY)
    assert expires_at(ctx, pol, NOW) == NOW + 7 * DAY
    assert expires_at(ctx, pol, NOW + 28 * DAY) == NOW + 30 * DAY
    assert expires_at(ctx, policy(idle_ttl=None, max_age=None), NOW) is None
    assert expires_at(ctx, policy(idle_ttl=60, max_age=None), NOW + 5) == NOW + 65


def test_check_age_with_injected_clock_and_skew() -> None:
    ctx = Context.new(now=NOW)
    pol = policy(idle_ttl=3600, max_age=86400)
    check_age(ctx, pol, NOW + 3600 + 30)  # idle, but within the 30 s skew
    with pytest.raises(TokenExpired) as info:
        check_age(ctx, pol, NOW + 3600 + 31)
    assert info.value.facts["reason"] == "idle"
    ctx.last_active = NOW + 86000  # active, but too old
    check_age(ctx, pol, NOW + 86400 + 30)
    with pytest.raises(TokenExpired) as info:
        check_age(ctx, pol, NOW + 86400 + 31)
    assert info.value.facts["reason"] == "max_age"
    check_age(ctx, pol, NOW + 86400 + 100, skew=100)
    check_age(ctx, policy(idle_ttl=None, max_age=None), NOW + 10**9)


# -- summarizer hook -----------------------------------------------------------------------


def test_summarizer_receives_dropped_turns_and_previous_summary() -> None:
    ctx = chat(6)
    ctx.summary = "previous"
    rec = Recorder()
    first = ctx.turns[:4]
    assert drop_oldest(ctx, 3, policy="window", summarizer=rec, now=NOW) == first
    assert rec.calls == [(first, "previous")]
    assert ctx.summary == "previous+4"
    second = ctx.turns[:2]
    drop_oldest(ctx, 1, policy="token_budget", summarizer=rec, now=NOW + 1)
    assert rec.calls[1] == (second, "previous+4")
    assert ctx.summary == "previous+4+2"
    assert ctx.lifecycle.summarized == 6
    assert ctx.lifecycle.dropped == {"window": 4, "token_budget": 2}
    assert [(a.policy, a.turns) for a in ctx.lifecycle.recent] == [
        ("window", 4),
        ("token_budget", 2),
    ]


def test_without_a_summarizer_turns_are_dropped_and_recorded() -> None:
    ctx = chat(3)
    drop_oldest(ctx, 2, policy="window", summarizer=None, now=NOW)
    assert ctx.summary == "" and ctx.lifecycle.summarized == 0
    assert ctx.lifecycle.dropped == {"window": 2}
    assert drop_oldest(ctx, 0, policy="window", summarizer=None, now=NOW) == []


def test_lifecycle_record_is_bounded_and_uses_whole_seconds() -> None:
    ctx = Context.new(now=NOW)
    for i in range(10):
        ctx.lifecycle.record(LifecycleAction("window", "dropped", 1, NOW + i + 0.9))
    assert len(ctx.lifecycle.recent) == ctx.lifecycle.MAX_RECENT == 6
    assert [a.ts for a in ctx.lifecycle.recent] == [NOW + i for i in range(4, 10)]
    assert ctx.lifecycle.dropped == {"window": 10}  # totals outlive the recent list
    ctx.lifecycle.record(LifecycleAction("turn_cap", "truncated", 3, NOW))
    assert "turn_cap" not in ctx.lifecycle.dropped


# -- extractive summarizer -----------------------------------------------------------------


def test_extractive_summary_lines() -> None:
    summarize = ExtractiveSummarizer()
    turns = [
        Turn("user", "What is the capital of France? Also, Spain?"),
        Turn("assistant", "", tool_calls=(ToolCall("c", "lookup"), ToolCall("d", "geo"))),
        Turn("tool", "x" * 123, tool_call_id="c"),
        Turn("assistant", "Paris.   Madrid is Spain's."),
    ]
    out = summarize(turns, "")
    assert out == (
        "(4 earlier turns summarized)\n"
        "- user: What is the capital of France?\n"
        "- assistant: called lookup, geo\n"
        "- tool: tool result (123 chars)\n"
        "- assistant: Paris."
    )
    again = summarize([Turn("user", "Next one")], out)
    assert again.startswith("(5 earlier turns summarized)\n- user: What is")
    assert again.endswith("- user: Next one")
    # A summary written by someone else counts one turn per line.
    assert summarize([Turn("user", "x")], "a\nb").startswith("(3 earlier turns summarized)")


def test_a_summarizer_returning_a_str_subclass_gives_a_plain_str() -> None:
    """A summarizer returning markupsafe.Markup (or any str subclass) made every later
    seal fail: ContextNotSerializable, "summary is Markup, not str"."""
    from markupsafe import Markup

    from satchel import Codec, Keyring

    ctx = chat(3)
    pol = policy(max_turns=2, summarizer=lambda dropped, previous: Markup("<b>gist</b>"))
    apply_policies(ctx, pol, NOW)
    assert ctx.summary == "<b>gist</b>" and type(ctx.summary) is str
    codec = Codec(Keyring.generate())
    assert codec.open(codec.seal(ctx)).summary == "<b>gist</b>"


def test_first_sentence_is_bounded() -> None:
    assert first_sentence("One. Two.", 50) == "One."
    assert first_sentence("  spaced\n\nout  text ", 50) == "spaced out text"
    long = first_sentence("word " * 100, 20)
    assert len(long) <= 20 and long.endswith("…")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(
            st.builds(
                Turn,
                role=st.sampled_from(["system", "user", "assistant", "tool"]),
                content=st.text(max_size=300),
            ),
            max_size=8,
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(60, 2000),
)
def test_extractive_summarizer_is_deterministic_and_bounded(
    batches: list[list[Turn]], max_chars: int
) -> None:
    summarize = ExtractiveSummarizer(max_chars=max_chars, line_chars=40)
    summary, replay = "", ""
    covered = 0
    for batch in batches:
        summary = summarize(batch, summary)
        replay = ExtractiveSummarizer(max_chars=max_chars, line_chars=40)(batch, replay)
        covered += len(batch)
        assert summary == replay  # deterministic
        assert len(summary) <= max_chars  # bounded
        s = "s" if covered != 1 else ""
        assert summary.startswith(f"({covered} earlier turn{s} summarized)")


def naive_summary(summarizer: ExtractiveSummarizer, dropped: Sequence[Turn], previous: str) -> str:
    """The extractive summary as its docstring states it: one line per dropped turn
    after the previous summary's lines, the oldest removed until the whole fits."""
    header_match = re.match(r"^\((\d+) earlier turns? summarized\)\n?", previous)
    body = previous[header_match.end() :] if header_match else previous
    lines = [line for line in body.splitlines() if line]
    covered = int(header_match.group(1)) if header_match else (len(lines) if previous else 0)
    for turn in dropped:
        if turn.role == "tool" or turn.tool_call_id is not None:
            lines.append(f"- tool: tool result ({len(turn.content)} chars)")
            continue
        if turn.tool_calls and not turn.content:
            text = "called " + ", ".join(c.name for c in turn.tool_calls)
        else:
            text = first_sentence(turn.content, summarizer.line_chars)
        lines.append(f"- {turn.role}: {text}")
    covered += len(dropped)
    header = f"({covered} earlier turn{'s' if covered != 1 else ''} summarized)\n"
    while lines and len(header) + sum(len(line) + 1 for line in lines) > summarizer.max_chars:
        lines.pop(0)
    return header + "\n".join(lines)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.builds(
            Turn,
            role=st.sampled_from(["system", "user", "assistant", "tool"]),
            content=st.text(alphabet="ab .!?\n", max_size=200),
        ),
        max_size=30,
    ),
    st.sampled_from(
        ["", "free text\nfrom another summarizer", "(3 earlier turns summarized)\n- user: x"]
    ),
    st.integers(20, 1500),
    st.integers(5, 120),
)
def test_extractive_summary_keeps_the_newest_lines_that_fit(
    dropped: list[Turn], previous: str, max_chars: int, line_chars: int
) -> None:
    summarizer = ExtractiveSummarizer(max_chars=max_chars, line_chars=line_chars)
    assert summarizer(dropped, previous) == naive_summary(summarizer, dropped, previous)


def test_summarizing_a_huge_drop_reads_only_the_turns_that_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One drop of 20,000 turns (a token at the turn limit) took seconds: every turn's
    line was made, then the oldest removed one by one, the rest re-added each time."""
    from satchel.lifecycle import summarize as module

    calls = 0

    def counting(text: str, limit: int) -> str:
        nonlocal calls
        calls += 1
        return first_sentence(text, limit)

    monkeypatch.setattr(module, "first_sentence", counting)
    ctx = chat(10_000)
    summary = ExtractiveSummarizer()(ctx.turns, "")
    lines = summary.splitlines()
    assert lines[0] == "(20000 earlier turns summarized)"
    assert lines[-1] == "- assistant: Amessage number 9999."
    assert calls == len(lines)  # the lines kept, and the one that no longer fit


# -- trimming invariants over random histories ---------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[Turn]:
    """Conversations with tool calls whose results may come late (after other turns)."""
    turns: list[Turn] = []
    pending: list[str] = []
    n_calls = 0
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["user", "assistant", "system", "call", "result", "result"]))
        text = draw(st.text(max_size=60))
        if kind == "call":
            ids = []
            for _ in range(draw(st.integers(1, 3))):
                n_calls += 1
                ids.append(f"c{n_calls}")
            pending += ids
            block = OpaqueBlock("sig", draw(st.binary(max_size=40)), "p")
            turns.append(
                Turn(
                    "assistant",
                    text,
                    tool_calls=tuple(ToolCall(i, "fn", "{}") for i in ids),
                    blocks=(block,),
                )
            )
        elif kind == "result":
            if pending:
                call_id = pending.pop(draw(st.integers(0, len(pending) - 1)))
                turns.append(Turn("tool", text, tool_call_id=call_id))
        else:
            turns.append(Turn(kind, text))
    return turns


def assert_trim_invariants(original: list[Turn], ctx: Context, pinned: tuple) -> None:
    kept = ctx.turns
    # A suffix of the original, same objects: nothing edited, reordered or invented.
    assert kept == original[len(original) - len(kept) :]
    assert all(a is b for a, b in zip(kept, original[len(original) - len(kept) :], strict=True))
    kept_calls = {c.id for t in kept for c in t.tool_calls}
    kept_results = {t.tool_call_id for t in kept if t.role == "tool"}
    all_results = {t.tool_call_id for t in original if t.role == "tool"}
    # No result without its call, and no call without the results it got.
    assert kept_results <= kept_calls
    assert kept_calls & all_results <= kept_results
    assert (ctx.pinned.system, tuple(ctx.pinned.facts)) == pinned


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    histories(),
    st.one_of(st.none(), st.integers(0, 30)),
    st.one_of(st.none(), st.integers(0, 400)),
    st.integers(0, 45),
)
def test_trimming_never_splits_tool_calls_edits_blocks_or_drops_pinned(
    history: list[Turn], max_turns: int | None, max_llm_tokens: int | None, extra_drop: int
) -> None:
    blocks_before = [(id(b), b.data) for t in history for b in t.blocks]
    ctx = Context.new(now=NOW)
    ctx.pinned.system = "system prompt"
    ctx.pinned.facts = ["fact one", "fact two"]
    ctx.turns = list(history)
    pinned = ("system prompt", ("fact one", "fact two"))
    rec = Recorder()
    pol = policy(max_turns=max_turns, max_llm_tokens=max_llm_tokens, summarizer=rec)
    dropped = apply_policies(ctx, pol, NOW)
    assert dropped == history[: len(dropped)]
    assert_trim_invariants(history, ctx, pinned)
    # Each limit holds, unless only the newest exchange is left: that always stays.
    groups = turn_groups(history)
    newest_only = bool(groups) and ctx.turns == history[groups[-1][0] :]
    if max_turns is not None:
        assert len(ctx.turns) <= max_turns or newest_only
    if max_llm_tokens is not None:
        tokens = sum(turn_tokens(t, estimate_tokens) for t in ctx.turns)
        assert tokens <= max_llm_tokens or newest_only
    assert bool(ctx.turns) == bool(history)
    assert [t for call in rec.calls for t in call[0]] == dropped
    drop_oldest(ctx, extra_drop, policy="window", summarizer=rec, now=NOW)
    assert_trim_invariants(history, ctx, pinned)
    # Opaque blocks: same objects, same bytes, whether kept or dropped.
    assert [(id(b), b.data) for t in history for b in t.blocks] == blocks_before
    assert sum(ctx.lifecycle.dropped.values()) == len(history) - len(ctx.turns)


def test_a_tool_result_in_a_user_turn_is_summarized_as_a_tool_result() -> None:
    """Anthropic's tool results come in user turns (with a tool_call_id): the summary
    quoted them as what the user said, raw tool output (an IBAN) included."""
    ctx = Context.new()
    ctx.add_turn("user", "What's my balance?")
    ctx.add_turn("assistant", "", tool_calls=[ToolCall("toolu_1", "get_balance", {"acct": "42"})])
    result = '{"balance": 1234.56, "iban": "DE89370400440532013000"}'
    ctx.add_turn("user", result, tool_call_id="toolu_1")
    ctx.add_turn("assistant", "Your balance is 1,234.56.")
    summary = ExtractiveSummarizer()(ctx.turns, "")
    assert "DE89" not in summary and "1234.56" not in summary
    assert f"- tool: tool result ({len(result)} chars)" in summary.splitlines()
    assert "- user: What's my balance?" in summary.splitlines()


def test_the_default_counter_uses_tiktoken_when_installed_and_survives_its_failures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tiktoken is an optional install the suite does not have, so its path ran in no
    test: a module of tiktoken's shape stands in (cl100k_base's encode, with the
    disallowed_special the counter must pass so a user's "<|endoftext|>" counts as
    text), then one whose encoding file cannot be loaded (offline)."""
    import sys
    import types

    from satchel.lifecycle.tokens import default_counter, estimate_tokens

    calls: list[tuple[str, object]] = []

    class Encoding:
        def encode(self, text: str, *, disallowed_special: object = "all") -> list[int]:
            calls.append((text, disallowed_special))
            if "<|endoftext|>" in text and disallowed_special == "all":
                raise ValueError("disallowed special token")
            return list(range(len(text.split())))

    fake = types.ModuleType("tiktoken")
    fake.get_encoding = lambda name: Encoding() if name == "cl100k_base" else None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    default_counter.cache_clear()
    try:
        count = default_counter()
        assert count("hello there <|endoftext|> friend") == 4
        assert calls == [("hello there <|endoftext|> friend", ())]

        def offline(name: str) -> object:
            raise OSError("cannot download cl100k_base")

        fake.get_encoding = offline  # type: ignore[attr-defined]
        default_counter.cache_clear()
        with caplog.at_level("WARNING", logger="satchel"):
            assert default_counter() is estimate_tokens
        assert "could not be loaded (OSError)" in caplog.text
    finally:
        default_counter.cache_clear()
