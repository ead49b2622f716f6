"""The shipped dictionary is trained on English chat: for Hebrew, Arabic, Japanese or
Russian text it made tokens larger than zstd without a dictionary."""

from __future__ import annotations

import pytest

from satchel.compress import Compressor

HEBREW = (
    "שלום, אני צריך עזרה בכתיבת מכתב לבעל הדירה. הדוד לא עובד כבר שבוע. "
    "בטח! הנה טיוטה: שלום רב, אני כותב לך בנוגע לדוד המים בדירה ברחוב הרצל 12. "
    "הדוד אינו פועל מאז יום ראשון שעבר, ואין לנו מים חמים. אבקש לתאם תיקון בהקדם."
)
ARABIC = (
    "مرحبا! أريد أن أتعلم كيف أكتب سيرة ذاتية جيدة. هل يمكنك مساعدتي؟ أنا مهندس برمجيات "
    "ولدي خمس سنوات من الخبرة. بالتأكيد! السيرة الذاتية الجيدة يجب أن تكون واضحة ومختصرة."
)


@pytest.mark.parametrize("text", [HEBREW, ARABIC])
def test_non_english_text_is_no_larger_than_without_the_dictionary(text: str) -> None:
    payload = text.encode()
    shipped, plain = Compressor(), Compressor(dictionary_id=0)
    packed = shipped.compress(payload)
    assert len(packed.data) <= len(plain.compress(payload).data)
    assert shipped.decompress(packed.data, packed.dictionary_id) == payload


def test_english_keeps_the_dictionary() -> None:
    payload = b"Of course! The simplest way to handle CSV files is Python's csv module. " * 2
    assert Compressor().compress(payload).dictionary_id == 1


def test_a_sealed_token_does_not_tell_its_language_by_its_dictionary_id() -> None:
    """The header is in the clear: in sealed mode a dictionary id of 0 for a Hebrew
    context (1 for an English one) said something of what the token hides."""
    from satchel import Codec, Context, Keyring
    from satchel.codec import peek

    ring = Keyring.generate()
    ids = {}
    for mode in ("sealed", "signed"):
        ctx = Context.new()
        ctx.add_turn("user", HEBREW)
        ids[mode] = peek(Codec(ring, mode=mode).seal(ctx)).dictionary_id
    assert ids == {"sealed": 1, "signed": 0}
