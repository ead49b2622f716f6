# ruff: noqa: RUF001  (fullwidth CJK punctuation is what these tests are about)
"""Non-English text through the lifecycle's cuts: sentence ends beyond ASCII, and no cut
inside a character as a reader sees it (accent, Thai vowel, emoji sequence, flag)."""

from __future__ import annotations

import unicodedata

import pytest

from satchel.context import Context
from satchel.lifecycle.policy import cap_turn_sizes
from satchel.lifecycle.summarize import SUMMARY_CUT_MARK, cut_summary, first_sentence

NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("我们明天下午三点开会。请大家提前准备好季度报告。", "我们明天下午三点开会。"),
        ("了解しました。明日の会議は午後三時からです。", "了解しました。"),
        ("太好了！你能再解释一下吗？", "太好了！"),
        ("मैं कल दिल्ली जा रहा हूँ। वहाँ मेरी बहन की शादी है।", "मैं कल दिल्ली जा रहा हूँ।"),
        ("هل يجب أن أكتبها بالعربية؟ أنا أتقدم لشركات في دبي.", "هل يجب أن أكتبها بالعربية؟"),
        ('She said "it works." Then we shipped it.', 'She said "it works."'),
        ("One. Two.", "One."),
        ("We did it!!! Yes.", "We did it!!!"),
    ],
)
def test_first_sentence_knows_sentence_ends_beyond_ascii(text: str, first: str) -> None:
    assert first_sentence(text, 120) == first


CLUSTERS = [
    "👨\u200d👩\u200d👧\u200d👦",  # a family: a ZWJ sequence
    "🏳\ufe0f\u200d🌈",  # the rainbow flag
    "🇯🇵",  # a flag: two regional indicators
    "🙏🏽",  # a skin tone
    "e\u0301",  # a combining accent
    "ชี่",  # Thai: a consonant, a vowel and a tone mark
    "क्ष",  # a Devanagari conjunct
    unicodedata.normalize("NFD", "한"),  # a decomposed Hangul syllable
    "1\ufe0f\u20e3",  # a keycap
]


def _whole(kept: str, cluster: str) -> bool:
    """``kept`` (x's, then copies of ``cluster``) ends with whole clusters only."""
    rest = kept.rstrip("…").lstrip("x")
    return rest == cluster * (len(rest) // len(cluster)) if rest else True


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_no_cut_inside_a_character(cluster: str) -> None:
    for pad in range(1, len(cluster) + 2):
        text = "x" * (100 - pad) + cluster * 10
        assert _whole(first_sentence(text, 100)[:-1], cluster), (pad, cluster)
        ctx = Context.new(now=NOW)
        ctx.add_turn("user", text, ts=NOW)
        cap_turn_sizes(ctx, 100, NOW)
        kept = ctx.turns[0].content.split("\n[… truncated")[0]
        assert _whole(kept, cluster), (pad, cluster)
        removed = int(ctx.turns[0].content.rsplit(": ", 1)[1].split(" ")[0])
        assert len(kept) + removed == len(text)


@pytest.mark.parametrize(("unit", "width"), [("🇯🇵🇰🇷🇹🇼", 2), ("ชี่", 3), ("e\u0301", 2)])
def test_a_cut_summary_starts_on_a_whole_character(unit: str, width: int) -> None:
    """A summary with no line breaks or spaces (Thai, a row of flags) began with a
    lone vowel sign, or half a flag that re-paired every flag after it (Japan, Korea,
    Taiwan read as Pakistan and two unknown flags)."""
    summary = unit * 500
    for keep in range(1000, 1000 + 2 * len(unit)):
        body = cut_summary(summary, keep)[len(SUMMARY_CUT_MARK) :]
        assert summary.endswith(body)
        assert (len(summary) - len(body)) % width == 0, keep


def test_a_cut_summary_keeps_what_fits_when_the_only_line_break_is_late() -> None:
    """A one-paragraph summary with a short last line kept only that line (2,000
    characters allowed, 50 kept); a Chinese one with a space near its end likewise."""
    zh = "这是一个很常见的问题。Excel在Windows上导出CSV时通常使用GBK编码，而不是UTF-8。" * 300
    for summary in (zh + "\n要点：使用utf-8-sig。", zh + "最后提醒 Python 3。"):
        assert len(cut_summary(summary, 2000)) > 1500


@pytest.mark.parametrize("text", ["." * 32_000, "x" + "!?" * 16_000, "." * 16_000 + '"' * 16_000])
def test_a_long_run_of_sentence_marks_is_linear(text: str) -> None:
    """A 32,000-character message of dots took tens of seconds in first_sentence (the
    search retried the run from each of its marks)."""
    import time

    started = time.perf_counter()
    first_sentence(text, 120)
    assert time.perf_counter() - started < 2.0  # linear: milliseconds (quadratic: 30 s)


@pytest.mark.parametrize(
    ("text", "inside"),
    [
        ("กำลังทำ", 1),  # Thai SARA AM belongs to the consonant before it
        ("ｶﾞｷ", 1),  # a halfwidth katakana and its voiced sound mark
        ("a\u200cb", 1),  # ZWNJ stays with the letter before it
        ("\u0600١٢", 1),  # an Arabic number sign with the digits after it
    ],
)
def test_extenders_that_are_no_combining_mark_are_not_cut_off(text: str, inside: int) -> None:
    from satchel.lifecycle.summarize import is_boundary

    assert not is_boundary(text, inside)
