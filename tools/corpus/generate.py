"""Deterministic generator for Satchel's English chat corpus.

The corpus is *composed*, not invented: every user message and assistant reply
comes from the hand-written banks in ``tools/corpus/banks/*.txt``. The generator
only decides which topics a conversation covers, which follow-ups are asked,
which phrasing variant is used, light surface variation on user messages
(casing, greetings, missing question marks) and a few slot values (names,
order numbers, amounts) so that no two conversations are byte-identical.

Honest held-out split
---------------------
* Every topic in the banks is tagged ``split=train`` or ``split=heldout``.
  Held-out topics (their openers, answers and follow-ups) never appear in
  ``train.jsonl``.
* Domain-independent exchanges ("thanks!", "can you make it shorter?") are
  tagged ``split=mixed``: their phrasing variants are partitioned by index,
  so no variant is shared between the splits either.
* The small inline phrase banks below (greetings, topic switches, assistant
  openers) are partitioned the same way.
* The two splits are generated with different seeds.

Nothing in a held-out conversation is therefore a passage the dictionary
trainer has seen; only the English language, the markdown conventions and the
msgpack framing are shared, which is exactly what a real deployment shares.

Bank file format
----------------
::

    @topic <name> domain=<domain> split=train|heldout|mixed
    @user
    <message>
    @or
    <alternative phrasing of the same message>
    @assistant
    <reply>
    @or
    <alternative reply>
    @user
    <follow-up, may rely on the opener but not on other follow-ups>
    @assistant
    ...

The first user/assistant pair of a topic is its opener; later pairs are
follow-ups, of which each conversation asks an ordered random subset.
``<<slot>>`` placeholders are filled per conversation (see ``SLOTS``).
A reply consisting only of ``@shorten`` is computed from the previous reply.

Usage::

    .venv/bin/python tools/corpus/generate.py            # writes both splits
    .venv/bin/python tools/corpus/generate.py --stats    # also prints stats
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BANKS = HERE / "banks"

TRAIN_SEED = 0x5A7C_4E11
HELDOUT_SEED = 0x0BAD_5EED
TRAIN_CONVERSATIONS = 2000
HELDOUT_CONVERSATIONS = 300
# Held-out conversations that are forced to be long, so that 200-turn
# contexts can be measured on unseen text.
HELDOUT_LONG = 14
MAX_TURNS = 200

MARKER = re.compile(r"^@(topic|user|assistant|or)\b(.*)$")
SLOT = re.compile(r"<<([a-z_]+)>>")


# --------------------------------------------------------------------------
# Small inline phrase banks. Partitioned by index like split=mixed topics.
# --------------------------------------------------------------------------

USER_GREETINGS = [
    "Hi! ",
    "Hey, ",
    "Hello — ",
    "Quick question: ",
    "ok so ",
    "Hi there. ",
    "hey ",
    "Hello! ",
    "Hi, hoping you can help. ",
    "Morning! ",
    "Good evening. ",
    "Hey there! ",
]

TOPIC_SWITCHES = [
    "Different question: ",
    "Unrelated, but ",
    "Switching topics — ",
    "Another thing: ",
    "Also, ",
    "Totally different topic. ",
    "While I have you, ",
    "New question. ",
    "Changing gears: ",
    "One more, unrelated: ",
    "Random question, ",
    "Ok, something else. ",
]

ASSISTANT_OPENERS = [
    "Sure! ",
    "Good question. ",
    "Happy to help. ",
    "Absolutely. ",
    "Great question! ",
    "Of course. ",
    "Sure thing. ",
    "Yes — ",
    "Got it. ",
    "Definitely. ",
    "Sure — ",
    "Okay! ",
]

ASSISTANT_CLOSERS = [
    "\n\nLet me know if you'd like me to go deeper on any of these.",
    "\n\nWant me to tailor this to your exact situation?",
    "\n\nHope that helps! Happy to clarify anything.",
    "\n\nIf you share more details, I can be more specific.",
    "\n\nWould you like an example?",
    "\n\nShall I put this into a checklist for you?",
    "\n\nAnything else you'd like to adjust?",
    "\n\nFeel free to follow up if something doesn't work as expected.",
    "\n\nIf you tell me a bit more about your setup, I can narrow it down.",
    "\n\nWant a shorter version too?",
    "\n\nTell me how it goes!",
    "\n\nI can also walk through it step by step if that's easier.",
]

SHORTEN_INTROS = [
    "Sure — here's the short version:\n\n",
    "In short:\n\n",
    "TL;DR:\n\n",
    "Condensed:\n\n",
    "Here it is in a nutshell:\n\n",
    "Shorter version:\n\n",
    "The gist:\n\n",
    "Boiled down:\n\n",
]


def split_list(items: list[str], split: str) -> list[str]:
    """Partition a phrase bank: every 4th item (index % 4 == 3) is held out."""
    if split == "heldout":
        return [s for i, s in enumerate(items) if i % 4 == 3]
    return [s for i, s in enumerate(items) if i % 4 != 3]


# --------------------------------------------------------------------------
# Slots: vocabulary, not passages, so shared by both splits.
# --------------------------------------------------------------------------

SLOTS: dict[str, list[str]] = {
    "name": [
        "Priya",
        "Marcus",
        "Elena",
        "Tom",
        "Aisha",
        "Daniel",
        "Sofia",
        "Kenji",
        "Grace",
        "Omar",
        "Hannah",
        "Luis",
        "Mei",
        "Jonas",
        "Fatima",
        "Ryan",
        "Chloe",
        "Ibrahim",
        "Nora",
        "Sam",
    ],
    "manager": [
        "Dana",
        "Michael",
        "Rebecca",
        "Arjun",
        "Claire",
        "Pete",
        "Yuki",
        "Laura",
        "Ben",
        "Natalie",
        "Victor",
        "Joanne",
    ],
    "company": [
        "Northwind",
        "Bluefin Analytics",
        "Harbor & Pine",
        "Lumen Health",
        "Crescent Logistics",
        "Greyhawk Studios",
        "Sunfield Foods",
        "Orbital Labs",
        "Maple Street Bank",
        "Tidewater Media",
    ],
    "service": [
        "Parcelly",
        "Streambox",
        "Fitloop",
        "Brightcart",
        "Nestly",
        "Cloudnote",
        "Ridewise",
        "Tasteful Box",
    ],
    "agent": ["Alex", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Quinn"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    "month": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    "pet": ["Biscuit", "Luna", "Milo", "Pepper", "Olive", "Ziggy", "Mochi", "Rufus"],
}


def fill_slots(rng: random.Random) -> dict[str, str]:
    values = {k: rng.choice(v) for k, v in SLOTS.items()}
    values["order_id"] = f"{rng.randint(100, 999)}-{rng.randint(1000000, 9999999)}"
    values["ticket"] = f"{rng.randint(100000, 999999)}"
    values["amount"] = f"${rng.randint(12, 240)}.{rng.choice(['00', '99', '49', '95', '50'])}"
    values["day"] = str(rng.randint(2, 28))
    values["last4"] = f"{rng.randint(0, 9999):04d}"
    return values


# --------------------------------------------------------------------------
# Bank parsing
# --------------------------------------------------------------------------


@dataclass
class Exchange:
    users: list[str]
    assistants: list[str]


@dataclass
class Topic:
    name: str
    domain: str
    split: str
    exchanges: list[Exchange] = field(default_factory=list)


def _parse_attrs(text: str) -> tuple[str, dict[str, str]]:
    parts = text.split()
    if not parts:
        raise ValueError("@topic needs a name")
    attrs = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        attrs[key] = value
    return parts[0], attrs


def parse_bank(path: Path) -> list[Topic]:
    topics: list[Topic] = []
    topic: Topic | None = None
    role: str | None = None
    buf: list[str] = []
    pending_user: list[str] | None = None
    pending_assistant: list[str] | None = None

    def flush_text() -> None:
        nonlocal buf
        if role is None:
            buf = []
            return
        text = "\n".join(buf).strip("\n").rstrip()
        buf = []
        if not text:
            raise ValueError(f"{path.name}: empty {role} block in topic {topic and topic.name}")
        if role == "user":
            assert pending_user is not None
            pending_user.append(text)
        else:
            assert pending_assistant is not None
            pending_assistant.append(text)

    def flush_exchange() -> None:
        nonlocal pending_user, pending_assistant
        if pending_user is not None:
            if not pending_assistant:
                raise ValueError(f"{path.name}: user block without reply in {topic and topic.name}")
            assert topic is not None
            topic.exchanges.append(Exchange(pending_user, pending_assistant))
        pending_user = None
        pending_assistant = None

    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = MARKER.match(line)
        if not m:
            buf.append(line)
            continue
        kind, rest = m.group(1), m.group(2)
        flush_text()
        if kind == "topic":
            flush_exchange()
            name, attrs = _parse_attrs(rest)
            split = attrs.get("split", "")
            if split not in {"train", "heldout", "mixed"}:
                raise ValueError(f"{path.name}:{lineno}: bad split for {name}")
            topic = Topic(name, attrs.get("domain", path.stem), split)
            topics.append(topic)
            role = None
        elif kind == "user":
            flush_exchange()
            pending_user = []
            role = "user"
        elif kind == "assistant":
            if pending_user is None or role != "user":
                raise ValueError(f"{path.name}:{lineno}: @assistant must follow @user")
            pending_assistant = []
            role = "assistant"
        elif kind == "or":
            if role is None:
                raise ValueError(f"{path.name}:{lineno}: @or outside a block")
    flush_text()
    flush_exchange()
    return topics


def load_banks() -> list[Topic]:
    topics: list[Topic] = []
    for path in sorted(BANKS.glob("*.txt")):
        topics.extend(parse_bank(path))
    names = [t.name for t in topics]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate topic names: {sorted(dupes)}")
    for t in topics:
        if not t.exchanges:
            raise ValueError(f"topic {t.name} has no exchanges")
        for ex in t.exchanges:
            for text in ex.users + ex.assistants:
                for slot in SLOT.findall(text):
                    if slot not in SLOTS and slot not in {
                        "order_id",
                        "ticket",
                        "amount",
                        "day",
                        "last4",
                    }:
                        raise ValueError(f"topic {t.name}: unknown slot <<{slot}>>")
    return topics


def select_split(topics: list[Topic], split: str) -> tuple[list[Topic], list[Topic]]:
    """Return (content topics, generic topics) for one split."""
    content = [t for t in topics if t.split == split]
    generic: list[Topic] = []
    for t in topics:
        if t.split != "mixed":
            continue
        exchanges = []
        for ex in t.exchanges:
            users = split_list(ex.users, split)
            assistants = split_list(ex.assistants, split)
            if not users or not assistants:
                raise ValueError(f"mixed topic {t.name} needs >= 4 variants per block")
            exchanges.append(Exchange(users, assistants))
        generic.append(Topic(t.name, t.domain, split, exchanges))
    return content, generic


# --------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------


def sample_length(rng: random.Random) -> int:
    """Turns in one conversation: log-normal around ~10 turns, plus a long tail.

    Most conversations are a handful of exchanges; a few run to 100-200 turns.
    """
    if rng.random() < 0.006:
        n = rng.randint(60, 100) * 2  # 120..200
    else:
        n = round(math.exp(rng.gauss(math.log(8), 0.85)) / 2) * 2
    n = max(2, min(MAX_TURNS, n))
    if n > 2 and rng.random() < 0.04:
        n -= 1  # the last user message is still awaiting a reply
    return n


def shorten(previous: str) -> str:
    """A compressed restatement of the previous reply (bullets or 2 sentences)."""
    lines = [ln for ln in previous.splitlines() if ln.strip()]
    bullets = [ln for ln in lines if re.match(r"^\s*(?:[-*]|\d+\.)\s", ln)]
    if len(bullets) >= 3:
        return "\n".join(bullets[:3])
    prose = " ".join(ln for ln in lines if not ln.startswith(("```", "    ", "|")))
    sentences = re.split(r"(?<=[.!?])\s+", prose)
    return " ".join(sentences[:2]).strip()


def lower_first(text: str) -> str:
    """Lower-case the first letter unless it is "I" or part of an acronym."""
    if re.match(r"^(I\b|I'|[A-Z]{2}|[A-Z][a-z]*[A-Z])", text):
        return text
    return text[:1].lower() + text[1:]


def surface_user(rng: random.Random, text: str, style: dict[str, float]) -> str:
    if "\n" not in text and rng.random() < style["lower"]:
        text = lower_first(text)
    if text.endswith("?") and "\n" not in text and rng.random() < style["noq"]:
        text = text[:-1]
    return text


class Composer:
    def __init__(self, content: list[Topic], generic: list[Topic], split: str) -> None:
        self.content = content
        self.generic = {t.name: t for t in generic}
        self.greetings = split_list(USER_GREETINGS, split)
        self.switches = split_list(TOPIC_SWITCHES, split)
        self.openers = split_list(ASSISTANT_OPENERS, split)
        self.closers = split_list(ASSISTANT_CLOSERS, split)
        self.shorten_intros = split_list(SHORTEN_INTROS, split)
        self.by_domain: dict[str, list[Topic]] = {}
        for t in content:
            self.by_domain.setdefault(t.domain, []).append(t)

    def _topic_order(self, rng: random.Random) -> list[Topic]:
        # Conversations usually stay near one domain for a while, then wander.
        order: list[Topic] = []
        remaining = list(self.content)
        rng.shuffle(remaining)
        while remaining:
            t = remaining.pop(0)
            order.append(t)
            if rng.random() < 0.45:
                same = [u for u in remaining if u.domain == t.domain]
                if same:
                    nxt = rng.choice(same)
                    remaining.remove(nxt)
                    remaining.insert(0, nxt)
        return order

    def conversation(self, rng: random.Random, target: int) -> list[dict[str, str]]:
        slots = fill_slots(rng)
        style = {
            "lower": rng.choice([0.0, 0.1, 0.5, 0.9]),
            "noq": rng.choice([0.0, 0.2, 0.7]),
            "greet": rng.choice([0.0, 0.3, 0.8]),
            "opener": rng.choice([0.05, 0.25, 0.5]),
            "closer": rng.choice([0.0, 0.15, 0.35]),
            "generic": rng.choice([0.05, 0.12, 0.2]),
        }
        turns: list[dict[str, str]] = []
        used_generic: set[tuple[str, int, int]] = set()

        def sub(text: str) -> str:
            return SLOT.sub(lambda m: slots[m.group(1)], text)

        def add(role: str, text: str) -> None:
            turns.append({"role": role, "content": sub(text)})

        def generic_exchange() -> None:
            names = sorted(self.generic)
            name = rng.choice(names)
            ex = self.generic[name].exchanges[0]
            ui, ai = rng.randrange(len(ex.users)), rng.randrange(len(ex.assistants))
            if (name, ui, ai) in used_generic:
                return
            used_generic.add((name, ui, ai))
            reply = ex.assistants[ai]
            if reply == "@shorten":
                prev = turns[-1]["content"]
                short = shorten(prev)
                if len(short) < 40 or len(short) > len(prev) * 0.7:
                    used_generic.discard((name, ui, ai))
                    return
                reply = rng.choice(self.shorten_intros) + short
            add("user", surface_user(rng, ex.users[ui], style))
            add("assistant", reply)

        for n_topic, topic in enumerate(self._topic_order(rng)):
            if len(turns) >= target:
                break
            follow = topic.exchanges[1:]
            # Long conversations go deep into each topic; short ones skim.
            k = len(follow) if target >= 60 else rng.randint(0, len(follow))
            picked = sorted(rng.sample(range(len(follow)), k))
            plan = [topic.exchanges[0]] + [follow[i] for i in picked]
            for i, ex in enumerate(plan):
                if len(turns) >= target:
                    break
                user = surface_user(rng, rng.choice(ex.users), style)
                if i == 0 and n_topic == 0:
                    if rng.random() < style["greet"]:
                        user = rng.choice(self.greetings) + lower_first(user)
                elif i == 0 and rng.random() < 0.5:
                    user = rng.choice(self.switches) + lower_first(user)
                reply = rng.choice(ex.assistants)
                if (
                    i == 0
                    and rng.random() < style["opener"]
                    and not reply.startswith(
                        ("Sure", "Yes", "Good", "Great", "Of course", "Happy", "Absolutely")
                    )
                ):
                    reply = rng.choice(self.openers) + reply
                if rng.random() < style["closer"] and not reply.rstrip().endswith("?"):
                    reply = reply + rng.choice(self.closers)
                add("user", user)
                add("assistant", reply)
                if len(turns) < target and rng.random() < style["generic"]:
                    generic_exchange()
        return turns[:target]


def generate(
    split: str,
    seed: int,
    count: int,
    long_count: int = 0,
    topic_filter: Callable[[Topic], bool] | None = None,
) -> list[dict]:
    """``count`` conversations of one split; the first ``long_count`` run to MAX_TURNS.

    ``topic_filter`` restricts the content topics (tools/train_dictionary.py uses it
    to build a topic-disjoint validation set out of the training split).
    """
    topics = load_banks()
    content, generic = select_split(topics, split)
    if topic_filter is not None:
        content = [t for t in content if topic_filter(t)]
    composer = Composer(content, generic, split)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        target = MAX_TURNS if i < long_count else sample_length(rng)
        conv_rng = random.Random(rng.getrandbits(64))
        turns = composer.conversation(conv_rng, target)
        out.append({"turns": turns})
    # Long forced conversations are spread out rather than all at the front.
    random.Random(seed + 1).shuffle(out)
    return out


def write_jsonl(path: Path, conversations: list[dict]) -> int:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for conv in conversations:
            fh.write(json.dumps(conv, ensure_ascii=False, separators=(",", ":")) + "\n")
    return path.stat().st_size


def describe(name: str, conversations: list[dict]) -> None:
    lengths = [len(c["turns"]) for c in conversations]
    words_a = [
        len(t["content"].split())
        for c in conversations
        for t in c["turns"]
        if t["role"] == "assistant"
    ]
    words_u = [
        len(t["content"].split()) for c in conversations for t in c["turns"] if t["role"] == "user"
    ]
    print(
        f"{name}: {len(conversations)} conversations, {sum(lengths)} turns; "
        f"turns/conv median {statistics.median(lengths)}, min {min(lengths)}, "
        f"max {max(lengths)}, >=50: {sum(n >= 50 for n in lengths)}, "
        f">=200: {sum(n >= 200 for n in lengths)}; "
        f"assistant words median {statistics.median(words_a)}; "
        f"user words median {statistics.median(words_u)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory")
    ap.add_argument("--stats", action="store_true", help="print corpus statistics")
    args = ap.parse_args(argv)

    topics = load_banks()
    n_train = sum(t.split == "train" for t in topics)
    n_held = sum(t.split == "heldout" for t in topics)
    train = generate("train", TRAIN_SEED, TRAIN_CONVERSATIONS)
    heldout = generate("heldout", HELDOUT_SEED, HELDOUT_CONVERSATIONS, HELDOUT_LONG)
    size_t = write_jsonl(args.out / "train.jsonl", train)
    size_h = write_jsonl(args.out / "heldout.jsonl", heldout)
    print(
        f"topics: {n_train} train, {n_held} held-out, "
        f"{sum(t.split == 'mixed' for t in topics)} generic (variants split)"
    )
    print(f"wrote {args.out / 'train.jsonl'} ({size_t:,} bytes)")
    print(f"wrote {args.out / 'heldout.jsonl'} ({size_h:,} bytes)")
    if args.stats:
        describe("train", train)
        describe("heldout", heldout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
