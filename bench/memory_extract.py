"""The rule extractor on phrasings the dialogue generator never uses: how much it catches, and how fast.

    python bench/memory_extract.py

The memory evaluation's oracle scores 1.000 because the extractor's rules and the generator's templates
were written together; this is the check on language neither was written for. ``PHRASINGS`` were
written once, before this script was first run, and are not to be tuned against: a statement with the
operations a careful reader would store, and sentences that must store nothing. Reported: the share of
statements whose operations come out exactly, the false operations on the non-statements, and the
extractor's time per message on the generator's own conversations.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba_moe.data.memory_dialogues import generate  # noqa: E402
from mamba_moe.memory.extract import Extractor  # noqa: E402

NOW = "2026-03-04T10:00:00+00:00"   # a Wednesday

PHRASINGS: list[tuple[str, list[tuple[str, str | None, str | None]]]] = [
    ("The name's Bond, James Bond.", [("set", "name", "James Bond")]),
    ("Everyone calls me Kat.", [("set", "name", "Kat")]),
    ("I'm Priya, nice to meet you!", [("set", "name", "Priya")]),
    ("My full name is Ana María López.", [("set", "name", "Ana María López")]),
    ("I reside in Vienna.", [("set", "city", "Vienna")]),
    ("I'm based in Lagos these days.", [("set", "city", "Lagos")]),
    ("Home for me is Lisbon.", [("set", "city", "Lisbon")]),
    ("We moved to Ghent last month.", [("set", "city", "Ghent")]),
    ("I just relocated to Cape Town for work.", [("set", "city", "Cape Town")]),
    ("I'm employed at Initech.", [("set", "employer", "Initech")]),
    ("I've been working for Globex since 2019.", [("set", "employer", "Globex")]),
    ("I got hired by Hooli last week!", [("set", "employer", "Hooli")]),
    ("I'm a nurse.", [("set", "job", "nurse")]),
    ("I work as an electrician.", [("set", "job", "electrician")]),
    ("By trade I am a carpenter.", [("set", "job", "carpenter")]),
    ("Green is my favourite colour.", [("set", "favourite_colour", "green")]),
    ("I love sushi more than any other food.", [("set", "favourite_food", "sushi")]),
    ("My favourite food has to be ramen.", [("set", "favourite_food", "ramen")]),
    ("Tennis is my favourite sport.", [("set", "favourite_sport", "tennis")]),
    ("My lucky number's 13.", [("set", "lucky_number", "13")]),
    ("We have a cat named Mochi.", [("set", "pet_name", "Mochi")]),
    ("My dog, Pepper, is three years old.", [("set", "pet_name", "Pepper")]),
    ("I went to the dentist on Monday.", [("set", "dentist", "2026-03-02")]),
    ("Got a haircut yesterday.", [("set", "haircut", "2026-03-03")]),
    ("I saw a great concert two days ago.", [("set", "concert", "2026-03-02")]),
    ("My sister lives in Oslo now.", [("set", "sister.city", "Oslo")]),
    ("My brother is a pilot.", [("set", "brother.job", "pilot")]),
    ("My husband's name is Tom.", [("set", "partner.name", "Tom")]),
    ("My mother works at Contoso.", [("set", "mother.employer", "Contoso")]),
    ("I don't work at Initech anymore.", [("retract", "employer", "Initech")]),
    ("I'm no longer living in Paris.", [("retract", "city", "Paris")]),
    ("Please don't remember my address any more.", [("forget", "city", None)]),
    ("Delete everything you know about me.", [("forget_all", None, None)]),
    ("Remove my lucky number from your memory.", [("forget", "lucky_number", None)]),
    # must store nothing
    ("I wish I lived in Paris.", []),
    ("Would you call me Bob if I asked?", []),
    ("My name isn't important.", []),
    ("I used to live in Rome.", []),
    ("I'm going to move to Lima next year.", []),
    ("Do you know what my favourite colour is?", []),
    ("My friend's name is hard to pronounce.", []),
    ("I never worked at Globex.", []),
    ("Pretend my name is Zed.", []),
    ("I live in fear of spiders.", []),
    ("I work at night mostly.", []),
    ("My favourite colour used to be red.", []),
    ("Tell my brother I live in Oslo.", []),
    ("What's your favourite food?", []),
    ("I'm a little tired today.", []),
]


def coverage() -> tuple[int, int, int, int, list[str]]:
    statements = [(m, e) for m, e in PHRASINGS if e]
    negatives = [m for m, e in PHRASINGS if not e]
    exact, misses = 0, []
    for message, expected in statements:
        got = [(o.op, o.slot, o.value) for o in Extractor().extract(message, now=NOW)]
        if got == expected:
            exact += 1
        else:
            misses.append(f"  {message!r}: expected {expected}, got {got}")
    false_ops = 0
    for message in negatives:
        got = [(o.op, o.slot, o.value) for o in Extractor().extract(message, now=NOW)]
        false_ops += len(got)
        if got:
            misses.append(f"  {message!r}: expected nothing, got {got}")
    return exact, len(statements), false_ops, len(negatives), misses


def latency(conversations: int = 5) -> tuple[float, float, int]:
    messages = [(t.content, t.at) for c in generate(0, conversations) for _, t in c.user_turns()]
    times = []
    extractor = Extractor()
    for text, at in messages:
        start = time.perf_counter()
        extractor.extract(text, now=at)
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.95 * len(times))] * 1e6, len(times)


def main() -> int:
    exact, n, false_ops, negatives, misses = coverage()
    print(f"unseen statements extracted exactly: {exact}/{n} ({exact / n:.0%})")
    print(f"false operations on {negatives} non-statements: {false_ops}")
    print("\n".join(misses))
    p50, p95, count = latency()
    print(f"extraction time per message ({count} generator messages): p50 {p50:.0f} us, p95 {p95:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
