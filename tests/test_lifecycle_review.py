"""Lifecycle policies held to their promises with provider-shaped data (an adversarial
review found each of these broken): the per-turn cap cuts once, a summarizer's bad
output never fails a request, budgets see opaque blocks, the hard cap moves older
exchanges before it cuts the summary, and what a policy did reaches the token."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence

import pytest

from satchel import Codec, Context, Keyring, OpaqueBlock, ToolCall, Turn
from satchel.lifecycle import LifecyclePolicy, turn_groups
from satchel.lifecycle.policy import TRUNCATION_MARK
from satchel.pipeline import Pipeline

NOW = 1_795_000_000
CODEC = Codec(Keyring.generate(), mode="signed")


def pipeline(**policy: object) -> Pipeline:
    return Pipeline(CODEC, LifecyclePolicy(**policy), clock=lambda: NOW)  # type: ignore[arg-type]


def test_the_per_turn_cap_cuts_a_turn_once_and_keeps_its_count() -> None:
    """The mark made a cut turn longer than the cap, so every later save cut it again:
    "400 characters removed", then "49", then "48", and a record each time, which
    pushed the real drop records out of the six kept."""
    p = pipeline(max_turn_chars=100)
    ctx = p.load(None, now=NOW)
    ctx.add_turn("user", "x" * 500, ts=NOW)
    token = p.save(ctx, now=NOW).token
    for _ in range(4):
        ctx = p.load(token, now=NOW)
        token = p.save(ctx, now=NOW).token
    opened = CODEC.open(token, now=NOW)
    assert opened.turns[0].content == "x" * 100 + TRUNCATION_MARK.format(n=400)
    assert [a.policy for a in opened.lifecycle.recent] == ["turn_cap"]
    # A cap lowered since cuts again, and the counts add up.
    lower = Pipeline(CODEC, LifecyclePolicy(max_turn_chars=60), clock=lambda: NOW)
    ctx = lower.load(token, now=NOW)
    lower.save(ctx, now=NOW)
    assert ctx.turns[0].content == "x" * 60 + TRUNCATION_MARK.format(n=440)


@pytest.mark.parametrize("bad", ["summary \ud83d", "\udc00"])
def test_a_summary_that_no_token_can_hold_falls_back_to_the_extractive_one(bad: str) -> None:
    """A lone surrogate (an LLM reply cut mid-emoji) failed the seal, on this request
    and every later one (the same turns drop each time): a 500, blamed on metadata."""
    p = pipeline(max_turns=1, summarizer=lambda dropped, previous: bad)
    ctx = Context.new(now=NOW)
    for i in range(3):
        ctx.add_turn("user", f"q{i}", ts=NOW)
        ctx.add_turn("assistant", f"a{i}", ts=NOW)
    token = p.save(ctx, now=NOW).token
    summary = CODEC.open(token, now=NOW).summary
    assert summary.startswith("(4 earlier turns summarized)") and "- user: q0" in summary


def thinking(ctx: Context, exchanges: int) -> None:
    for _ in range(exchanges):
        ctx.add_turn("user", "next?", ts=NOW)
        signature = base64.b64encode(os.urandom(300)).decode()
        block = OpaqueBlock(
            "thinking", json.dumps({"thinking": "", "signature": signature}), "anthropic"
        )
        ctx.add_turn("assistant", "done", ts=NOW, blocks=[block])


def test_the_byte_budget_counts_opaque_blocks() -> None:
    """Trimming weighed turns by their text alone: recent turns carrying signed thinking
    blocks (incompressible) looked light, the estimates fell short round after round,
    and the token left 20% over its budget with a dozen exchanges still in it."""
    ctx = Context.new(now=NOW)
    for _ in range(40):  # older: long, very compressible text
        ctx.add_turn("user", "please read this log " + "all good. " * 200, ts=NOW)
        ctx.add_turn("assistant", "ok", ts=NOW)
    thinking(ctx, 10)
    result = pipeline(max_turns=None, max_token_bytes=3800).save(ctx, now=NOW)
    assert result.size <= 3800
    assert len(turn_groups(ctx.turns)) > 1
    for turn in ctx.turns:  # blocks kept byte for byte
        for block in turn.blocks:
            assert json.loads(block.data)["signature"]


def test_the_hard_cap_moves_older_exchanges_before_it_cuts_the_summary() -> None:
    """With no soft budget, the hard cap compared the summary with the newest exchange
    alone: it cut the summary (mid-word, with its "(N earlier turns summarized)"
    header) while older exchanges stayed, and the count went wrong afterwards."""
    p = pipeline(max_turns=None, max_token_bytes=None, hard_max_token_bytes=1200)
    token = None
    for i in range(40):
        ctx = p.load(token, now=NOW)
        text = f"Question {i}: " + hashlib.sha256(str(i).encode()).hexdigest() * 3 + "."
        ctx.add_turn("user", text, ts=NOW)
        ctx.add_turn("assistant", "Sure.", ts=NOW)
        result = p.save(ctx, now=NOW)
        token = result.token
        assert result.size <= 1200
    opened = CODEC.open(token, now=NOW)
    assert "summary_cap" not in [a.policy for a in opened.lifecycle.recent]
    header = opened.summary.splitlines()[0]
    assert header == f"({opened.lifecycle.summarized} earlier turns summarized)"


def verbose(dropped: Sequence[Turn], previous: str) -> str:
    """An app's own summarizer with no length limit (an LLM asked for "a summary")."""
    lines = [
        hashlib.sha256(f"{t.content}{k}".encode()).hexdigest() for t in dropped for k in range(20)
    ]
    return previous + "".join(line + "\n" for line in lines)


def test_a_cut_summary_keeps_whole_lines_and_the_token_records_the_cut() -> None:
    """The summary_cap record was made after the last measurement, and those stale bytes
    were sealed: the app saw a record the next request no longer had."""
    p = pipeline(max_turns=2, summarizer=verbose)
    ctx = Context.new(now=NOW)
    for i in range(6):
        ctx.add_turn("user", f"question {i}", ts=NOW)
        ctx.add_turn("assistant", f"answer {i}", ts=NOW)
    token = p.save(ctx, now=NOW).token
    opened = CODEC.open(token, now=NOW)
    cuts = [a for a in opened.lifecycle.recent if a.policy == "summary_cap"]
    assert len(cuts) == 1 and cuts[0].detail.endswith(" characters")
    assert opened.summary.startswith("[… earlier summary cut by Satchel]\n")
    body = opened.summary.split("\n", 1)[1]
    assert all(len(line) == 64 for line in body.splitlines())  # whole lines only


def test_a_context_that_unpacks_past_the_open_limit_is_trimmed_not_refused() -> None:
    """Thirty repetitive CSV exports make an 869-byte token that unpacks past 1 MiB:
    sealing raised BudgetExceeded although dropping the old exchange fixed it."""
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "export the sensor table", ts=NOW)
    calls = [ToolCall(f"call_{i}", "query", "{}") for i in range(30)]
    ctx.add_turn("assistant", "", ts=NOW, tool_calls=calls)
    for i in range(30):
        csv = ("温度,湿度,状态\n" + "0,0,正常\n" * 4000)[:30000]
        ctx.add_turn("tool", csv, ts=NOW, tool_call_id=f"call_{i}")
    ctx.add_turn("assistant", "Exported.", ts=NOW)
    ctx.add_turn("user", "thanks", ts=NOW)
    ctx.add_turn("assistant", "welcome", ts=NOW)
    result = pipeline().save(ctx, now=NOW)
    opened = CODEC.open(result.token, now=NOW)
    assert [t.content for t in opened.turns] == ["thanks", "welcome"]
    assert opened.lifecycle.dropped == {"byte_budget": 33}


def test_a_tool_result_in_a_user_message_stays_with_its_call() -> None:
    """Anthropic's Messages API sends tool results in *user* messages; grouping knew
    only role "tool", so a window could keep the result and drop its call."""
    ctx = Context.new(now=NOW)
    ctx.add_turn("user", "weather in Paris?", ts=NOW)
    ctx.add_turn(
        "assistant",
        "",
        ts=NOW,
        tool_calls=[ToolCall("toolu_01A", "get_weather", {"city": "Paris"})],
    )
    ctx.add_turn("user", "18C, sunny", ts=NOW, tool_call_id="toolu_01A")
    ctx.add_turn("assistant", "It is 18C and sunny.", ts=NOW)
    ctx.add_turn("user", "thanks", ts=NOW)
    ctx.add_turn("assistant", "welcome", ts=NOW)
    assert turn_groups(ctx.turns) == [(0, 4), (4, 6)]
    pipeline(max_turns=3).save(ctx, now=NOW)
    assert [t.content for t in ctx.turns] == ["thanks", "welcome"]


@pytest.mark.parametrize("digits", [3000, 5000])
def test_text_that_imitates_the_truncation_mark_is_cut_like_any_other(digits: int) -> None:
    """A turn ending in a mark with a many-digit count passed as "already cut" (3,147
    characters under a 100-character cap), and 5,000 digits made int() raise: a 500."""
    p = pipeline(max_turn_chars=100)
    ctx = p.load(None, now=NOW)
    fake = "x" * 100 + TRUNCATION_MARK.format(n="0" * (digits - 1) + "1")
    ctx.add_turn("user", fake, ts=NOW)
    token = p.save(ctx, now=NOW).token
    content = CODEC.open(token, now=NOW).turns[0].content
    assert len(content) < 200 and content.startswith("x" * 100)


@pytest.mark.parametrize("mode", ["client", "memory"])
def test_a_summary_longer_than_a_token_holds_keeps_its_newest_part(mode: str) -> None:
    """An app's summarizer returned the verbatim transcript of what left the token;
    repetitive text (a pasted log) compresses, so the token stayed tiny while the
    summary passed the longest string a token opens with (512 KiB): from then on every
    save of the conversation raised ContextNotSerializable (a 500), for good."""
    from satchel.lifecycle.summarize import MAX_SUMMARY_CHARS
    from satchel.server_mode import ServerSidePipeline
    from satchel.tiers import GuardedTier, MemoryTier

    def transcript(dropped: Sequence[Turn], previous: str) -> str:
        return previous + "".join(f"\n{t.role}: {t.content}" for t in dropped)

    policy = LifecyclePolicy(max_turns=2, summarizer=transcript)
    p: Pipeline | ServerSidePipeline
    if mode == "client":
        p = Pipeline(CODEC, policy, clock=lambda: NOW)
    else:
        p = ServerSidePipeline(CODEC, policy, store=GuardedTier(MemoryTier()), clock=lambda: NOW)
    log = "2026-11-29 10:00:00 WARN pool exhausted, retrying\n" * 600  # 30,000 characters
    token = None
    for i in range(24):
        ctx, token = one_request(
            p, token, f"Here is the log of run {i}:\n" + log, f"Run {i}: the pool is exhausted."
        )
        assert len(ctx.summary) <= MAX_SUMMARY_CHARS
    assert len(ctx.summary) > MAX_SUMMARY_CHARS // 2  # it did grow to the cap
    assert ctx.summary.splitlines()[-1] == "assistant: Run 22: the pool is exhausted."


@pytest.mark.parametrize(
    "limits", [{"max_age": float("inf")}, {"idle_ttl": float("inf"), "max_age": None}]
)
def test_an_infinite_time_limit_is_refused_when_the_policy_is_built(limits: dict) -> None:
    """It was taken, and every save then raised ValueError (expires_at is inf): None is
    how a limit is turned off."""
    with pytest.raises(ValueError, match="finite"):
        LifecyclePolicy(**limits)


@pytest.mark.parametrize("name", ["idle_ttl", "max_age"])
def test_a_time_limit_past_a_century_is_refused_at_start_up(name: str) -> None:
    """sys.maxsize, "forever", passed, and Redis refused every write's TTL: a server-mode
    app answered 503 to every request, a client-mode one never overflowed."""
    import sys

    from flask import Flask

    from satchel import Satchel
    from satchel.errors import ConfigurationError

    for huge in (sys.maxsize, 10**400):  # a huge int too (math.isfinite raised on it)
        with pytest.raises(ValueError, match="100 years"):
            LifecyclePolicy(**{name: huge})
    LifecyclePolicy(**{name: 99 * 365 * 86400})  # long, but a tier can keep it
    app = Flask(__name__)
    app.config.update(
        SATCHEL_KEYS=CODEC.keyring.to_string(), **{f"SATCHEL_{name.upper()}": sys.maxsize}
    )
    with pytest.raises(ConfigurationError, match=f"SATCHEL_{name.upper()}"):
        Satchel(app)


def test_a_reused_tool_call_id_pairs_each_result_with_the_nearest_call_before_it() -> None:
    """A call was paired with the last result of its id anywhere: with ids reused (a
    function's name for Gemini-style calls without ids, call_0 per response), the
    first call reached the newest result and the whole history was one group: the
    window held nothing back, then the hard cap dropped everything at once."""

    def exchange(i: int) -> list[Turn]:
        return [
            Turn("user", f"what is the weather in city {i}?", NOW),
            Turn("assistant", "", NOW, tool_calls=[ToolCall("call_0", "weather", {"i": i})]),
            Turn("tool", f"sunny in city {i}", NOW, tool_call_id="call_0"),
            Turn("assistant", f"It is sunny in city {i}.", NOW),
        ]

    turns = [t for i in range(5) for t in exchange(i)]
    assert turn_groups(turns) == [(4 * i, 4 * i + 4) for i in range(5)]

    p = pipeline(max_turns=8)
    token = None
    for i in range(30):
        ctx = p.load(token, now=NOW)
        for turn in exchange(i):
            ctx.turns.append(turn)
        token = p.save(ctx, now=NOW).token
    opened = CODEC.open(token, now=NOW)
    # The window of 8 turns: the two newest exchanges, whole.
    assert len(opened.turns) == 8
    assert [t.content for t in opened.turns][::4] == [
        "what is the weather in city 28?",
        "what is the weather in city 29?",
    ]


def one_request(p: Pipeline, token: str | None, user: str, assistant: str) -> tuple[Context, str]:
    """One request: open ``token``, add a user turn and its reply, save; the context as
    saved and the next token."""
    ctx = p.load(token, now=NOW)
    ctx.add_turn("user", user, ts=NOW)
    ctx.add_turn("assistant", assistant, ts=NOW)
    return ctx, p.save(ctx, now=NOW).token


def _with_tier(**policy: object) -> Pipeline:
    from satchel.segments import SegmentStore
    from satchel.tiers import GuardedTier, MemoryTier

    store = SegmentStore(GuardedTier(MemoryTier()), CODEC)
    return Pipeline(CODEC, LifecyclePolicy(**policy), segments=store, clock=lambda: NOW)  # type: ignore[arg-type]


def test_the_hard_cap_with_a_tier_moves_older_exchanges_and_keeps_the_newest() -> None:
    """With a tier, the hard cap moved every turn, the newest exchange included, when
    moving the older ones was enough (docs/lifecycle.md: older exchanges go first)."""
    p = _with_tier(max_turns=None, max_token_bytes=None)
    token = None
    for i in range(200):
        ctx = p.load(token, now=NOW)
        ctx.add_turn("user", f"Check order {hashlib.sha1(str(i).encode()).hexdigest()}", ts=NOW)
        ctx.add_turn(
            "assistant", f"Order {hashlib.md5(str(i).encode()).hexdigest()} shipped.", ts=NOW
        )
        token = p.save(ctx, now=NOW).token
        opened = CODEC.open(token, now=NOW)
        if opened.overflow:
            break
    assert opened.overflow, "the hard cap was never reached"
    newest_question = f"Check order {hashlib.sha1(str(i).encode()).hexdigest()}"
    assert [t.content for t in opened.turns][:1] == [newest_question]
    assert p.load(token, now=NOW).overflowed_turns == 2 * i


def test_the_hard_cap_with_a_tier_cuts_a_large_summary_before_moving_the_newest() -> None:
    """When the summary was the large part, a tier took the newest exchange out of the
    token (which then held no turn) and the summary was cut anyway."""

    def verbose(dropped: Sequence[Turn], previous: str) -> str:
        lines = [
            f"- {t.role}: "
            + "".join(hashlib.sha256(f"{t.content}{k}".encode()).hexdigest() for k in range(4))
            for t in dropped
        ]
        return previous + "\n" + "\n".join(lines)

    p = _with_tier(max_turns=4, max_token_bytes=2000, hard_max_token_bytes=4000, summarizer=verbose)
    token = None
    for i in range(30):
        _, token = one_request(
            p, token, f"question {i}: what is the status of ticket {i}?", f"Ticket {i} is closed."
        )
        opened = CODEC.open(token, now=NOW)
        assert opened.turns and opened.turns[-1].content == f"Ticket {i} is closed.", i
    assert "summary_cap" in [a.policy for a in opened.lifecycle.recent]


def test_a_history_over_the_payload_cap_moves_to_a_working_tier_not_dropped() -> None:
    """The payload cap (1 MiB unpacked) moved one group per round and, its rounds spent,
    dropped the rest as byte_budget while the tier took every write: an imported
    history of fifty 30 KB exports lost turns with nothing degraded."""
    p = _with_tier(max_turns=None)
    ctx = p.load(None, now=NOW)
    row = "2026-11-29,order,42,EUR,19.99,shipped\n"
    for i in range(50):
        ctx.add_turn("user", f"Export {i}:\n" + row * 780, ts=NOW)
        ctx.add_turn("assistant", f"Export {i} has 780 rows.", ts=NOW)
    token = p.save(ctx, now=NOW).token
    opened = p.load(token, now=NOW)
    assert opened.lifecycle.dropped.keys() <= {"overflow"}
    assert len(opened.all_turns()) == 100 and opened.overflowed_turns > 0


@pytest.mark.parametrize("tier", [False, True])
def test_the_soft_budget_holds_when_text_compresses_unlike_prose(tier: bool) -> None:
    """The rounds estimate what to remove by text length (prose compresses about 3x):
    pasted logs that compress to nothing, then CJK text that barely compresses, misled
    them round after round; the rounds ran out with the token over its budget and many
    groups still removable. Later rounds now measure instead."""
    import random

    rng = random.Random(1)
    p = (
        _with_tier(max_turns=None, max_token_bytes=3800)
        if tier
        else pipeline(max_turns=None, max_token_bytes=3800)
    )
    ctx = Context.new(now=NOW)
    for _ in range(60):
        ctx.add_turn("user", "ERROR connection reset by peer\n" * 100, ts=NOW)
        ctx.add_turn("assistant", "Retry.", ts=NOW)
    for _ in range(12):
        for role in ("user", "assistant"):
            ctx.add_turn(role, "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(60)), ts=NOW)
    token = p.save(ctx, now=NOW).token
    assert len(token) <= 3800
    assert CODEC.open(token, now=NOW).turns  # the newest exchange is still there


def _write_file_exchange(ctx: Context, i: int) -> None:
    args = json.dumps({"path": f"f{i}.csv", "content": "2026-11-29,widget,42,ok\n" * 1300})
    ctx.add_turn("user", f"save file {i}", ts=NOW)
    ctx.add_turn("assistant", "", ts=NOW, tool_calls=[ToolCall(f"call_{i}", "write_file", args)])
    ctx.add_turn("tool", "ok", ts=NOW, tool_call_id=f"call_{i}")
    ctx.add_turn("assistant", f"saved f{i}.csv", ts=NOW)


@pytest.mark.parametrize("window", [None, 40])
def test_tool_arguments_past_the_payload_cap_move_to_the_tier_in_segments_that_fit(
    window: int | None,
) -> None:
    """Turns whose size is in tool-call arguments (a write_file tool) weighed 16 bytes
    each: the payload cap moved the whole history, the newest exchange included, into
    one segment too large to write, and every later request answered 413."""
    p = _with_tier(max_turns=window)
    token = None
    for i in range(45):  # one exchange per request
        ctx = p.load(token, now=NOW)
        _write_file_exchange(ctx, i)
        token = p.save(ctx, now=NOW).token
    opened = p.load(token, now=NOW)
    assert opened.turns[-1].content == "saved f44.csv"
    # Every turn is held (inline or in the tier) or was dropped by the window.
    dropped = opened.lifecycle.dropped.get("window", 0)
    assert (dropped > 0) == (window is not None)
    assert len(opened.all_turns()) + dropped == 4 * 45
    # An import of sixty such exchanges in one request: more than one segment holds.
    ctx = p.load(None, now=NOW)
    for i in range(60):
        _write_file_exchange(ctx, i)
    token = p.save(ctx, now=NOW).token
    opened = p.load(token, now=NOW)
    assert len(opened.all_turns()) + opened.lifecycle.dropped.get("window", 0) == 4 * 60


@pytest.mark.parametrize("with_tier", [False, True], ids=["no tier", "tier"])
def test_the_summary_is_not_cut_for_an_exchange_whose_bytes_are_in_its_blocks(
    with_tier: bool,
) -> None:
    """The hard cap weighed the newest exchange by its content alone: "ok" / "Sure."
    with 12 KB of encrypted reasoning (an OpenAI Responses item) looked smaller than a
    731-character summary, so the summary was cut to a stub, and the exchange then moved
    (or was dropped) anyway: the summary no longer said what had left the token."""
    p = _with_tier() if with_tier else pipeline()
    token = None
    for i in range(40):
        ctx = p.load(token, now=NOW)
        ctx.add_turn("user", f"Question {i}: a good name for a cat that likes boxes?", ts=NOW)
        ctx.add_turn("assistant", f"Answer {i}: Sunny Boxington, playful and sunny.", ts=NOW)
        token = p.save(ctx, now=NOW).token
    ctx = p.load(token, now=NOW)
    summary = ctx.summary
    assert len(summary) > 500
    encrypted = base64.b64encode(os.urandom(9000)).decode()
    reasoning = json.dumps({"type": "reasoning", "id": "rs_1", "encrypted_content": encrypted})
    ctx.add_turn("user", "ok", ts=NOW)
    block = OpaqueBlock("reasoning", reasoning, "openai")
    ctx.add_turn("assistant", "Sure.", ts=NOW, blocks=[block])
    opened = CODEC.open(p.save(ctx, now=NOW).token, now=NOW)
    assert "summary_cap" not in [a.policy for a in opened.lifecycle.recent]
    assert not opened.turns  # the exchange left the token: the summary says so, in full
    assert "- user: ok\n- assistant: Sure." in opened.summary
    assert len(opened.summary) >= len(summary)


def test_a_hard_cap_no_empty_context_fits_under_is_refused_at_start_up() -> None:
    """A hard cap of 100 bytes started, then every request, a read included, was 413
    budget_exceeded: a context with no turns seals to about 220 bytes."""
    from flask import Flask

    from satchel import Satchel
    from satchel.errors import ConfigurationError

    for cap in (1, 100, 511):
        with pytest.raises(ValueError, match="at least 512"):
            LifecyclePolicy(max_token_bytes=None, hard_max_token_bytes=cap)
        app = Flask(__name__)
        app.config.update(
            SATCHEL_KEYS=CODEC.keyring.to_string(),
            SATCHEL_MAX_TOKEN_BYTES=50,
            SATCHEL_HARD_MAX_TOKEN_BYTES=cap,
        )
        with pytest.raises(ConfigurationError, match="SATCHEL_HARD_MAX_TOKEN_BYTES"):
            Satchel(app)
    # The smallest cap allowed still serves a conversation (overflowing or trimming).
    p = pipeline(max_turns=None, max_token_bytes=None, hard_max_token_bytes=512)
    token = None
    for i in range(3):
        _, token = one_request(p, token, f"message {i}", f"reply {i}")
        assert len(token) <= 512


def test_a_summary_that_only_looks_like_a_long_header_does_not_break_the_fallback() -> None:
    """A model's summary opening with "(" + 5,000 nines + " earlier turns summarized)":
    the extractive fallback read it as its own header, int() refused the digits, and
    every save failed (a 500) while the model did."""
    from satchel.lifecycle.summarize import ExtractiveSummarizer, summarize

    fake = "(" + "9" * 5000 + " earlier turns summarized)\nthe rest"
    turns = [Turn("user", "hello there", NOW), Turn("assistant", "hi", NOW)]

    def failing(dropped: Sequence[Turn], previous: str) -> str:
        raise TimeoutError("the model timed out")

    for summarizer in (failing, ExtractiveSummarizer()):
        summary = summarize(summarizer, turns, fake)
        assert summary.startswith("(") and "earlier turns summarized)" in summary
        assert len(summary) < 1000


def test_a_summary_with_no_line_breaks_is_cut_at_a_word() -> None:
    from satchel.lifecycle.summarize import SUMMARY_CUT_MARK, cut_summary

    words = " ".join(f"word{i:05d}" for i in range(2000))  # one paragraph
    cut = cut_summary(words, 1000)
    assert cut.startswith(SUMMARY_CUT_MARK)
    kept = cut[len(SUMMARY_CUT_MARK) :]
    assert words.endswith(kept) and kept.split()[0].startswith("word")
    assert all(len(w) == 9 for w in kept.split())  # no half word at the start
    assert len(cut) <= 1000
