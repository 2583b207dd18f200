"""Skills a small pretrained model is weak at, asked as natural questions: ``addition`` and
``conversion``. Generators draw ``k`` candidate ``(prompt, answer, split_key)`` triples; the split
of an instance comes from a hash of its ``split_key`` (``domains.split_of``), so held-out
instances are never trained on. ``addition`` keys by the unordered operand pair, so "a + b" and
"b + a" fall in the same split.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONVERSIONS", "addition", "conversion"]

Keyed = tuple[str, str, str]  # (prompt, answer, split_key)

CONVERSIONS = (  # (from, to, factor), from as written after a quantity >= 2
    ("kg", "grams", 1000), ("km", "metres", 1000), ("metres", "centimetres", 100),
    ("metres", "millimetres", 1000), ("cm", "millimetres", 10), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("hours", "seconds", 3600), ("days", "hours", 24),
    ("weeks", "days", 7), ("litres", "millilitres", 1000), ("feet", "inches", 12),
    ("yards", "feet", 3), ("tonnes", "kilograms", 1000),
)  # fmt: skip
CONVERSION_QUANTITIES = (2, 100)  # quantities drawn from [2, 100)
ADDEND_RANGE = (100, 1000)  # 3-digit + 3-digit


def addition(rng: np.random.Generator, k: int) -> list[Keyed]:
    """"What is 482 + 317?" -> "799"."""
    a, b = rng.integers(*ADDEND_RANGE, size=(2, k)).tolist()
    return [(f"What is {x} + {y}?", str(x + y), f"add {min(x, y)} {max(x, y)}") for x, y in zip(a, b)]


def conversion(rng: np.random.Generator, k: int) -> list[Keyed]:
    """"How many grams are in 7 kg?" -> "7000"."""
    pairs = rng.integers(len(CONVERSIONS), size=k).tolist()
    qs = rng.integers(*CONVERSION_QUANTITIES, size=k).tolist()
    out: list[Keyed] = []
    for j, q in zip(pairs, qs):
        src, dst, factor = CONVERSIONS[j]
        prompt = f"How many {dst} are in {q} {src}?"
        out.append((prompt, str(q * factor), prompt))
    return out
