"""README.md's Python blocks run as printed (with a real key in place of the
placeholder), so the first code a newcomer copies works."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from satchel import Keyring

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = '"k1:...."'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_quick_start_serves_a_conversation_across_requests() -> None:
    quick = next(b for b in python_blocks() if "Satchel(app)" in b)
    assert PLACEHOLDER in quick
    key = Keyring.generate("k1").current
    namespace: dict[str, Any] = {"__name__": "readme_quick_start"}
    exec(compile(quick.replace(PLACEHOLDER, repr(key.to_string())), "README.md", "exec"), namespace)
    client = namespace["app"].test_client()
    first = client.post("/api/chat", json={"message": "hello"})
    assert first.status_code == 200 and first.get_json() == {"reply": "You said: hello"}
    token = first.headers["Satchel-Context"]
    second = client.post("/api/chat", json={"message": "again"}, headers={"Satchel-Context": token})
    assert second.status_code == 200
    assert second.headers["Satchel-Context"] != token
    assert "Server-Timing" in second.headers
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    refused = client.post("/api/chat", json={"message": "x"}, headers={"Satchel-Context": tampered})
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"].startswith("token_")
    # What a client may send instead of a message: a JSON 400 that says so, never a
    # 500 (the quick start's view passed a null straight on, a plain TypeError).
    for body in ({"message": None}, {"message": 5}, {"message": ["hi"]}, {}, [], "hi"):
        bad = client.post("/api/chat", json=body, headers={"Satchel-Context": token})
        assert bad.status_code == 400, body
        assert bad.get_json()["error"]["code"] == "invalid_turn", body


def test_every_other_python_block_runs() -> None:
    for block in python_blocks():
        if "Satchel(app)" in block:
            continue
        exec(compile(block, "README.md", "exec"), {})
