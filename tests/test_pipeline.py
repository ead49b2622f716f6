"""The request pipeline: load (open, age, migrate, rehydrate) and save (trim, budget, seal)."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from satchel import Codec, Context, Key, Keyring, OpaqueBlock, SegmentRef, ToolCall, peek
from satchel.errors import BadSignature, ContextNotSerializable, TokenExpired
from satchel.lifecycle import LifecyclePolicy
from satchel.observe import Observer
from satchel.pipeline import Pipeline
from satchel.segments import SegmentStore
from satchel.tiers import MemoryTier
from tests.fixtures import make_fixtures
from tests.support.clock import FakeClock

NOW = 1_767_225_600
RING = Keyring([Key("kp", bytes(range(64, 96)))])
FIXTURES = Path(__file__).parent / "fixtures"


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.timings: list[str] = []
        self.tokens: list[dict[str, int]] = []

    def event(self, name: str, /, **fields: Any) -> None:
        self.events.append((name, fields))

    def timing(self, step: str, seconds: float) -> None:
        assert seconds >= 0
        self.timings.append(step)

    def token(self, *, size: int, raw_size: int, turns: int) -> None:
        self.tokens.append({"size": size, "raw_size": raw_size, "turns": turns})

    def names(self) -> list[str]:
        return [n for n, _ in self.events]

    def fields(self, name: str) -> dict[str, Any]:
        return next(f for n, f in self.events if n == name)


def make(
    *, mode: str = "sealed", ring: Keyring = RING, clock: FakeClock | None = None, **policy: Any
) -> tuple[Pipeline, Recorder, FakeClock]:
    clock = clock or FakeClock(NOW)
    rec = Recorder()
    codec = Codec(ring, mode, clock=clock)
    settings_: dict[str, Any] = {"max_turns": None, "max_token_bytes": None}
    settings_.update(policy)
    return Pipeline(codec, LifecyclePolicy(**settings_), observer=rec, clock=clock), rec, clock


def noise(i: int, n: int = 3) -> str:
    """Text that does not compress away (the trained dictionary is good at chat)."""
    return " ".join(hashlib.sha256(f"{i}:{k}".encode()).hexdigest()[:20] for k in range(n))


def talk(pipe: Pipeline, token: str | None, text: str, *, reply: str | None = None) -> str:
    ctx = pipe.load(token)
    ctx.add_turn("user", text, ts=pipe.clock())
    ctx.add_turn("assistant", reply or f"Answer to: {text}", ts=pipe.clock())
    return pipe.save(ctx).token


# -- load ----------------------------------------------------------------------------------


def test_no_token_starts_a_fresh_context() -> None:
    pipe, rec, _ = make()
    ctx = pipe.load(None)
    assert ctx.turns == [] and ctx.seq == 0 and ctx.created_at == NOW
    assert pipe.load("").seq == 0
    # Started when its first token is issued, not when made: a request that never
    # gets one (a page load, a read-only route) started no session.
    assert "session_started" not in rec.names()
    ctx.add_turn("user", "hi")
    token = pipe.save(ctx).token
    assert rec.names()[-2:] == ["session_started", "issued"]
    assert len(rec.fields("session_started")["session"]) == 16
    pipe.save(pipe.load(token))
    assert rec.names().count("session_started") == 1


def test_a_preview_token_at_seq_0_does_not_start_a_session() -> None:
    """A 0.0 preview token may say seq 0: its first save is not a new session."""
    from pathlib import Path

    from tests.fixtures.make_fixtures import load_keyring

    fixtures = Path(__file__).parent / "fixtures"
    token = (fixtures / "schema1-minimal-s1-signed.token").read_text().strip()
    pipe, rec, _ = make(mode="signed", ring=load_keyring(), idle_ttl=None, max_age=None)
    ctx = pipe.load(token)
    assert ctx.seq == 0
    ctx.add_turn("user", "hi")
    pipe.save(ctx)
    assert "session_started" not in rec.names() and "issued" in rec.names()


def test_round_trip_over_many_requests() -> None:
    pipe, rec, clock = make()
    token = None
    for i in range(25):
        clock.now = NOW + i * 60
        token = talk(pipe, token, f"message {i}")
    ctx = pipe.load(token)
    assert ctx.seq == 25 and len(ctx.turns) == 50
    assert ctx.last_active == NOW + 24 * 60
    assert ctx.turns[-2].content == "message 24"
    assert {"opened", "issued"} <= set(rec.names())
    assert {"open", "verify", "decompress", "unpack", "migrate", "trim", "seal"} <= set(rec.timings)
    issued = [f for n, f in rec.events if n == "issued"]
    assert [f["seq"] for f in issued] == list(range(1, 26))
    assert rec.tokens[-1]["size"] == len(token) and rec.tokens[-1]["turns"] == 50


def test_save_sets_the_envelope_expiry_from_the_policy() -> None:
    pipe, _, clock = make(idle_ttl=3600, max_age=86400)
    token = talk(pipe, None, "hi")
    assert peek(token).expires_at == NOW + 3600  # idle TTL from now
    clock.now = NOW + 3000
    token = talk(pipe, token, "again")
    assert peek(token).expires_at == NOW + 3000 + 3600  # moves with activity
    ctx = pipe.load(token)
    late = pipe.save(ctx, now=NOW + 86000).token  # near the maximum age: capped by it
    assert peek(late).expires_at == NOW + 86400


def test_expired_tokens_are_refused_with_an_injected_clock() -> None:
    pipe, rec, clock = make(idle_ttl=3600, max_age=30 * 86400)
    token = talk(pipe, None, "hi")
    clock.now = NOW + 3600 + 30  # inside the skew allowance
    assert pipe.load(token).seq == 1
    clock.now = NOW + 3600 + 31
    with pytest.raises(TokenExpired):
        pipe.load(token)
    assert ("refused", {"reason": "token_expired"}) in rec.events
    assert rec.names()[-1] == "expired"


def test_age_policies_apply_to_tokens_without_an_envelope_expiry() -> None:
    minted, _, _ = make(idle_ttl=None, max_age=None)
    token = talk(minted, None, "hi")
    assert peek(token).expires_at == 0
    strict, rec, clock = make(idle_ttl=600, max_age=None)
    clock.now = NOW + 600 + 31
    with pytest.raises(TokenExpired) as info:
        strict.load(token)
    assert info.value.facts["reason"] == "idle"
    assert rec.fields("expired") == {"reason": "idle"}
    aged, _, clock = make(idle_ttl=None, max_age=3600)
    clock.now = NOW + 3600 + 31
    with pytest.raises(TokenExpired) as info:
        aged.load(token)
    assert info.value.facts["reason"] == "max_age"


def test_refusals_are_reported_and_raised() -> None:
    pipe, rec, _ = make()
    other, _, _ = make(ring=Keyring([Key("kp", b"another key entirely!!" * 2)]))
    with pytest.raises(BadSignature):
        pipe.load(talk(other, None, "hi"))
    assert rec.events[-1] == ("refused", {"reason": "token_bad_signature"})


def test_a_token_at_the_last_sequence_number_is_refused_as_a_bad_token() -> None:
    """It opens, but no token can follow it: the seal after the view was a 500 (and a
    paid stream ended in an error). Refused when opened, as a bad token (a 4xx, or a
    fresh context by the app's policy). Only a key holder can make one."""
    from satchel.errors import InvalidContext
    from satchel.schema import SEQ_LIMIT

    pipe, rec, _ = make()
    ctx = pipe.load(None)
    ctx.seq = SEQ_LIMIT - 2
    token = pipe.codec.seal(ctx)  # seq SEQ_LIMIT - 1: the largest a token carries
    assert pipe.codec.open(token).seq == SEQ_LIMIT - 1  # the codec opens it (inspect)
    with pytest.raises(InvalidContext, match="last one"):
        pipe.load(token)
    assert rec.events[-1] == ("refused", {"reason": "token_invalid_context"})
    ctx.seq = SEQ_LIMIT - 3
    assert pipe.load(pipe.codec.seal(ctx)).seq == SEQ_LIMIT - 2  # the one before: fine


def test_old_schema_tokens_are_migrated_and_reported() -> None:
    record = FIXTURES / "schema1-s1-signed.token"
    rec = Recorder()
    pipe = Pipeline(
        Codec(make_fixtures.load_keyring(), "signed"),
        LifecyclePolicy(idle_ttl=None, max_age=None, max_turns=None, max_token_bytes=None),
        observer=rec,
        clock=lambda: NOW,
    )
    ctx = pipe.load(record.read_text().strip())
    assert ctx.opened_version == 1
    assert rec.fields("migrated")["from_version"] == 1
    assert rec.fields("migrated")["to_version"] == 2
    assert rec.fields("opened")["kid"] == "fx1"
    token = pipe.save(ctx).token
    assert peek(token).kid == "fx2"  # rotation: resealed under the newest key
    assert pipe.load(token).opened_version == 2


def test_overflow_references_without_a_tier_degrade_instead_of_failing() -> None:
    pipe, rec, _ = make()
    ctx = pipe.load(None)
    ctx.overflow.append(SegmentRef(b"d" * 12, 4, 100, 1, NOW))
    token = pipe.save(ctx).token
    opened = pipe.load(token)
    assert opened.degraded == ["tier_unavailable"]
    assert opened.overflow == ctx.overflow  # the reference survives for when it returns
    assert (
        "degraded",
        {"session": rec.fields("opened")["session"], "reason": "tier_unavailable"},
    ) in rec.events


# -- save: lifecycle and the byte budget ---------------------------------------------------


def test_window_runs_before_sealing_and_is_reported() -> None:
    pipe, rec, _ = make(max_turns=6)
    token = None
    for i in range(5):
        token = talk(pipe, token, f"message {i}")
    ctx = pipe.load(token)
    assert len(ctx.turns) == 6
    assert ctx.lifecycle.dropped == {"window": 4}
    assert ctx.summary.startswith("(4 earlier turns summarized)")
    trimmed = [f for n, f in rec.events if n == "trimmed"]
    assert [(f["reason"], f["turns"]) for f in trimmed] == [("window", 2), ("window", 2)]
    assert "summarized" in rec.names()


def test_byte_budget_without_a_tier_trims_and_summarizes() -> None:
    pipe, rec, _ = make(max_token_bytes=1200)
    token = None
    for i in range(30):
        token = talk(pipe, token, f"Question {i}: {noise(i)}")
        assert len(token) <= 1200
    ctx = pipe.load(token)
    assert ctx.lifecycle.dropped["byte_budget"] > 0
    assert ctx.lifecycle.summarized == ctx.lifecycle.dropped["byte_budget"]
    assert ctx.summary.startswith(f"({ctx.lifecycle.summarized} earlier turns summarized)")
    assert ctx.turns[-2].content.startswith("Question 29")
    assert ("trimmed", "byte_budget") in {(n, f.get("reason")) for n, f in rec.events}


@pytest.mark.parametrize("seq", [126, 127, 128, 254, 255, 256, 65534, 65535])
def test_byte_budget_holds_where_the_sequence_number_grows(seq: int) -> None:
    """The budget check must measure the token as sealed, with its incremented seq."""
    for mode in ("signed", "sealed"):
        pipe, _, _ = make(mode=mode)
        ctx = pipe.load(None)
        # Text that does not compress away: dropping an exchange must save more than
        # the summary line it adds, or no drop could meet a budget one byte short.
        for i in range(6):
            ctx.add_turn("user", f"question {i} {noise(i)}", ts=NOW)
            ctx.add_turn("assistant", f"answer {i} {noise(100 + i)}", ts=NOW)
        ctx.seq = seq
        probe = Context(**{f: getattr(ctx, f) for f in ("session_id", "seq", "created_at")})
        probe.turns, probe.last_active = list(ctx.turns), ctx.last_active
        budget = len(pipe.codec.seal(probe)) - 1  # one byte short of what it needs
        pipe.policy.max_token_bytes = budget
        token = pipe.save(ctx).token
        assert len(token) <= budget, (mode, seq)


def test_pinned_and_the_newest_exchange_survive_an_impossible_budget() -> None:
    pipe, _, _ = make(max_token_bytes=200)
    ctx = pipe.load(None)
    ctx.pinned.system = "Always answer in French."
    ctx.pinned.facts = ["User is called Ada."]
    for i in range(5):
        ctx.add_turn("user", f"q{i} " * 30, ts=NOW)
        ctx.add_turn("assistant", f"a{i} " * 30, ts=NOW)
    token = pipe.save(ctx).token
    opened = pipe.load(token)
    assert opened.pinned.system == "Always answer in French."
    assert opened.pinned.facts == ["User is called Ada."]
    assert [t.content[:3] for t in opened.turns] == ["q4 ", "a4 "]  # the soft budget bends


# Printable ASCII drawn at random barely compresses, so the budget really binds; the
# newest exchange plus a full summary (800 chars) always fits the smallest budget.
ASCII = string.ascii_letters + string.digits + string.punctuation + " "


@st.composite
def conversations(draw: st.DrawFn) -> list[list[tuple[str, str, bool, bytes]]]:
    return draw(
        st.lists(
            st.tuples(
                st.text(alphabet=ASCII, min_size=60, max_size=200),
                st.text(alphabet=ASCII, min_size=60, max_size=300),
                st.booleans(),
                st.binary(max_size=40),
            ),
            min_size=8,
            max_size=25,
        ).map(lambda xs: [xs])
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.integers(2500, 4000), st.sampled_from(["signed", "sealed"]))
def test_byte_budget_holds_over_random_conversations(
    batches: list[list[tuple[str, str, bool, bytes]]], budget: int, mode: str
) -> None:
    pipe, _, _ = make(mode=mode, max_token_bytes=budget, max_turns=None)
    token = None
    n = 0
    for question, answer, tool, blob in batches[0]:
        ctx = pipe.load(token)
        ctx.add_turn("user", question, ts=NOW)
        if tool:
            n += 1
            ctx.add_turn(
                "assistant",
                "",
                ts=NOW,
                tool_calls=[ToolCall(f"c{n}", "fn", "{}")],
                blocks=[OpaqueBlock("sig", blob, "p")],
            )
            ctx.add_turn("tool", answer[:50], ts=NOW, tool_call_id=f"c{n}")
        ctx.add_turn("assistant", answer, ts=NOW)
        token = pipe.save(ctx).token
        assert len(token) <= budget
        kept = pipe.load(token)
        calls = {c.id for t in kept.turns for c in t.tool_calls}
        assert {t.tool_call_id for t in kept.turns if t.role == "tool"} <= calls
        assert kept.turns[-1].content == answer  # the newest exchange is always kept


# -- the byte budget with an overflow tier -------------------------------------------------


def test_overflow_moves_old_turns_to_the_tier_and_brings_them_back() -> None:
    clock = FakeClock(NOW)
    codec = Codec(RING, "sealed", clock=clock)
    store = SegmentStore(MemoryTier(), codec)
    rec = Recorder()
    pipe = Pipeline(
        codec,
        LifecyclePolicy(max_turns=None, max_token_bytes=1500),
        segments=store,
        observer=rec,
        clock=clock,
    )
    token = None
    for i in range(30):
        token = talk(pipe, token, f"Question {i}: {noise(i)}")
        assert len(token) <= 1500
    ctx = pipe.load(token)
    assert ctx.overflow, "old turns moved to the tier"
    assert ctx.degraded == []
    everything = ctx.all_turns()
    assert len(everything) == 60  # nothing lost: token turns + rehydrated turns
    assert [t.content for t in everything[::2]] == [f"Question {i}: {noise(i)}" for i in range(30)]
    assert ctx.overflowed_turns == len(ctx.rehydrated)
    assert ctx.lifecycle.overflowed >= ctx.overflowed_turns
    assert ctx.summary.startswith("(")  # the summary covers what left the token
    assert "overflowed" in rec.names() and "rehydrated" in rec.names()


def test_a_summarizer_is_timed_as_its_own_step() -> None:
    """The summarize step has its own latency histogram (an LLM-backed summarizer is
    the slow part of a trim): reported when a summarizer ran, and only then."""
    calls: list[int] = []

    def summarizer(dropped: Any, previous: str) -> str:
        calls.append(len(dropped))
        return f"{previous} +{len(dropped)}"

    recorder = Recorder()
    codec = Codec(Keyring.generate("k1"))
    policy = LifecyclePolicy(max_turns=4, summarizer=summarizer)
    pipeline = Pipeline(codec, policy, observer=recorder)
    token = None
    for i in range(4):
        recorder.timings.clear()
        ctx = pipeline.load(token)
        ctx.add_turn("user", f"question {i}")
        ctx.add_turn("assistant", f"answer {i}")
        result = pipeline.save(ctx)
        token = result.token
        assert ("summarize" in recorder.timings) == bool(calls)
        assert ("summarize" in result.timings) == bool(calls)
        calls.clear()
    assert "+2" in codec.open(token).summary


def test_a_save_walks_large_metadata_and_tool_arguments_once(monkeypatch: Any) -> None:
    """Every measurement of the budget packed the context again and walked all of its
    metadata and tool-call arguments again: a 7.8 KB token (a key holder's) of a million
    empty maps cost about 2 s per walk, and a save of several measurements ran past
    gunicorn's 30 s worker timeout. The values are walked by the first measurement of
    a save; the rest trust them (the save only moves turns out and rewrites the summary
    and lifecycle record, which are still checked every time)."""
    from satchel import schema

    walked: list[str] = []
    walk = schema._value_problem

    def counting(value: Any, where: str, limits: Any, depth: int) -> Any:
        if depth == 0:
            walked.append(where.split(".")[-1].split("[")[0])
        return walk(value, where, limits, depth)

    monkeypatch.setattr(schema, "_value_problem", counting)
    codec = Codec(Keyring.generate())
    p = Pipeline(codec, LifecyclePolicy(max_turns=None, max_token_bytes=1500), clock=lambda: NOW)
    ctx = Context.new(now=NOW)
    ctx.metadata["ids"] = list(range(500))
    for i in range(30):
        ctx.add_turn("user", f"look up order {i}: " + "x" * 200, ts=NOW)
        call = ToolCall(f"call_{i}", "lookup", {"order": i, "fields": ["a", "b"]})
        ctx.add_turn("assistant", "", ts=NOW, tool_calls=[call])
        ctx.add_turn("tool", "found", ts=NOW, tool_call_id=f"call_{i}")
    walked.clear()
    result = p.save(ctx, now=NOW)
    opened = codec.open(result.token, now=NOW)
    assert opened.metadata["ids"] == list(range(500)) and len(opened.turns) < 90
    assert walked.count("metadata") == 1
    assert walked.count("arguments") <= 30  # each turn's once, not once per measurement
    # Text the estimates misjudge (logs compress far better than prose, CJK far worse)
    # sends the budget to measuring trial copies: they are not walked again either.
    import random

    rng = random.Random(1)
    logs = Context.new(now=NOW)
    logs.metadata["m"] = [{} for _ in range(20_000)]
    for _ in range(60):
        logs.add_turn("user", "ERROR connection reset by peer\n" * 100, ts=NOW)
        logs.add_turn("assistant", "Retry.", ts=NOW)
    for _ in range(12):
        for role in ("user", "assistant"):
            cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(60))
            logs.add_turn(role, cjk, ts=NOW)
    bisected: list[int] = []
    original_fit = Pipeline._turns_to_fit

    def counting_fit(self: Pipeline, *args: Any, **kwargs: Any) -> int:
        bisected.append(1)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_turns_to_fit", counting_fit)
    walked.clear()
    policy = LifecyclePolicy(max_turns=None, max_token_bytes=3800, hard_max_token_bytes=60_000)
    assert Pipeline(codec, policy, clock=lambda: NOW).save(logs, now=NOW).size <= 3800
    assert bisected and walked.count("metadata") <= 2  # the first measurement's walks
    # A context changed after a save is walked again by the next one.
    ctx.metadata["bad"] = {1: "int key"}
    with pytest.raises(ContextNotSerializable, match="metadata"):
        p.save(ctx, now=NOW)
