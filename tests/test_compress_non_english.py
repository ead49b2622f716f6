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
