"""Built-in synthetic domains: short ``prompt -> answer`` pairs checked by exact string match.

Each prompt belongs to exactly one split (``eval`` 15%, ``public`` 25%, ``private`` 60%) decided by
a SHA-256 hash of its text, so the splits of a domain never share a prompt whatever the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from gaisnet_ray.data.facts import FACTS

__all__ = [
    "BUILTIN_DOMAINS",
    "Example",
    "MAX_EXAMPLE_CHARS",
    "Split",
    "UnknownDomainError",
    "sample_examples",
    "split_of",
]

Split = Literal["public", "private", "eval"]
SPLITS: tuple[str, ...] = ("eval", "public", "private")
_SPLIT_BOUNDS = ((15, "eval"), (40, "public"), (100, "private"))  # cumulative percent
BUILTIN_DOMAINS: tuple[str, ...] = ("arithmetic", "strings", "units", "facts")
MAX_EXAMPLE_CHARS = 28  # len(prompt) + len(answer) of every built-in example
_STALL_LIMIT = 2000  # draws without a new prompt before repeats are allowed
Pair = tuple[str, str]  # (prompt, answer)


@dataclass(frozen=True)
class Example:
    """One prompt and its exact expected answer."""

    prompt: str
    answer: str
    domain: str


class UnknownDomainError(ValueError):
    """A domain name is not one of ``BUILTIN_DOMAINS``."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        super().__init__(f"unknown domain {domain!r}; known domains: {', '.join(BUILTIN_DOMAINS)}")

    def __reduce__(self):  # pickle with the payload, not the formatted message
        return (type(self), (self.domain,))


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return next(name for bound, name in _SPLIT_BOUNDS if bucket < bound)


# ---------------------------------------------------------------------------- generators
_UNITS = (  # (from, to, factor)
    ("km", "m", 1000), ("m", "cm", 100), ("m", "mm", 1000), ("cm", "mm", 10),
    ("h", "min", 60), ("h", "s", 3600), ("min", "s", 60), ("day", "h", 24),
    ("week", "day", 7), ("kg", "g", 1000), ("g", "mg", 1000), ("t", "kg", 1000),
    ("L", "mL", 1000), ("ft", "in", 12), ("yd", "ft", 3),
)  # fmt: skip
_BATCH = 256  # candidates drawn per generator call


def _arithmetic(rng: np.random.Generator, k: int) -> list[Pair]:
    ops = rng.integers(3, size=k).tolist()
    a = rng.integers(0, 100, size=k)
    b = rng.integers(0, 100, size=k).tolist()
    sub = rng.integers(0, a + 1).tolist()  # b <= a keeps differences non-negative
    m1, m2 = rng.integers(2, 13, size=(2, k)).tolist()
    out: list[Pair] = []
    for i, (op, x) in enumerate(zip(ops, a.tolist())):
        if op == 0:
            out.append((f"{x}+{b[i]}=", str(x + b[i])))
        elif op == 1:
            out.append((f"{x}-{sub[i]}=", str(x - sub[i])))
        else:
            out.append((f"{m1[i]}*{m2[i]}=", str(m1[i] * m2[i])))
    return out


def _strings(rng: np.random.Generator, k: int) -> list[Pair]:
    ops = rng.integers(3, size=k).tolist()
    lengths = rng.integers(3, 7, size=k).tolist()
    letters = rng.integers(ord("a"), ord("z") + 1, size=(k, 6)).tolist()
    out: list[Pair] = []
    for op, n, row in zip(ops, lengths, letters):
        word = "".join(map(chr, row[:n]))
        if op == 0:
            out.append((f"rev {word}=", word[::-1]))
        elif op == 1:
            out.append((f"up {word}=", word.upper()))
        else:
            out.append((f"len {word}=", str(n)))
    return out


def _units(rng: np.random.Generator, k: int) -> list[Pair]:
    pairs = rng.integers(len(_UNITS), size=k).tolist()
    qs = rng.integers(1, 100, size=k).tolist()
    out: list[Pair] = []
    for j, q in zip(pairs, qs):
        src, dst, factor = _UNITS[j]
        out.append((f"{q} {src} in {dst}=", str(q * factor)))
    return out


_GENERATORS: dict[str, Callable[[np.random.Generator, int], list[Pair]]] = {
    "arithmetic": _arithmetic,
    "strings": _strings,
    "units": _units,
}


# ------------------------------------------------------------------------------- sampling
def _rng(domain: str, split: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{domain}|{split}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _sample_table(split: str, n: int, rng: np.random.Generator) -> list[Pair]:
    """Facts of ``split`` in shuffled order, reshuffled and cycled when ``n`` exceeds them."""
    facts = [(f"{rel} {subj}=", ans) for rel, subj, ans in FACTS]
    pool = [(p, a) for p, a in facts if split_of(p) == split]
    if not pool and n:
        raise RuntimeError(f"the facts table has no prompt in split {split!r}")
    out: list[Pair] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool))[: n - len(out)])
    return out


def _sample_generated(
    draw: Callable[[np.random.Generator, int], list[Pair]], split: str, n: int,
    rng: np.random.Generator,
) -> list[Pair]:  # fmt: skip
    """Draw until ``n`` prompts of ``split``; distinct unless the space runs dry."""
    out: list[Pair] = []
    seen: set[str] = set()
    stall = 0
    while len(out) < n:
        for prompt, answer in draw(rng, _BATCH):
            if split_of(prompt) != split or prompt in seen:
                stall += 1
                if stall > _STALL_LIMIT:  # space exhausted: start a new round of distinct prompts
                    seen.clear()
                    stall = 0
                continue
            seen.add(prompt)
            out.append((prompt, answer))
            stall = 0
            if len(out) == n:
                break
    return out


def sample_examples(domain: str, split: Split, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``domain`` from ``split``; deterministic given all four arguments."""
    if domain not in BUILTIN_DOMAINS:
        raise UnknownDomainError(domain)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _rng(domain, split, seed)
    if domain in _GENERATORS:
        pairs = _sample_generated(_GENERATORS[domain], split, n, rng)
    else:
        pairs = _sample_table(split, n, rng)
    return [Example(prompt=p, answer=a, domain=domain) for p, a in pairs]
