"""Built-in domains: short ``prompt -> answer`` pairs checked by exact string match.

Two families, one registry (``DOMAINS``, a ``Domain`` record per name):

- byte-level (``arithmetic``, ``strings``, ``units``, ``facts``): terse ``"23+58="`` prompts for the
  tiny byte-level model, each at most ``MAX_EXAMPLE_CHARS`` characters with its answer;
- chat (natural questions for a pretrained chat model, at most ``MAX_CHAT_EXAMPLE_CHARS``):
  record domains of invented private knowledge (``catalogue``, ``town``, ``codes``; splits
  ``private`` and ``eval`` by phrasing, see ``records``), skills (``addition``, ``conversion``;
  see ``skills``) and the public ``capitals``.

In hash-split domains each prompt (or instance key) belongs to exactly one split (``eval`` 15%,
``public`` 25%, ``private`` 60%) decided by a SHA-256 hash of its text, so the splits of a domain
never share a prompt whatever the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Literal, Mapping

import numpy as np

from gaisnet_ray.data import skills
from gaisnet_ray.data.capitals import CAPITAL_ROWS
from gaisnet_ray.data.facts import FACTS
from gaisnet_ray.data.records import RECORD_SPECS, sample_records

__all__ = [
    "BUILTIN_DOMAINS",
    "BYTE_LEVEL_DOMAINS",
    "DOMAINS",
    "Domain",
    "Example",
    "MAX_CHAT_EXAMPLE_CHARS",
    "MAX_EXAMPLE_CHARS",
    "RECORD_DOMAINS",
    "Split",
    "UnknownDomainError",
    "get_domain",
    "sample_examples",
    "split_of",
]

Split = Literal["public", "private", "eval"]
SPLITS: tuple[str, ...] = ("eval", "public", "private")
_SPLIT_BOUNDS = ((15, "eval"), (40, "public"), (100, "private"))  # cumulative percent
MAX_EXAMPLE_CHARS = 28  # len(prompt) + len(answer) of every byte-level example
_STALL_LIMIT = 2000  # draws without a new prompt before repeats are allowed
Pair = tuple[str, str]  # (prompt, answer)
Draw = Callable[[np.random.Generator, int], list[tuple[str, str, str]]]  # -> (prompt, answer, key)


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


def _keyed(draw: Callable[[np.random.Generator, int], list[Pair]]) -> Draw:
    """A byte-level generator whose split key is the prompt itself."""
    return lambda rng, k: [(p, a, p) for p, a in draw(rng, k)]


# ------------------------------------------------------------------------------- sampling
def _rng(domain: str, split: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{domain}|{split}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _sample_table(
    rows: tuple[Pair, ...], split: str, n: int, rng: np.random.Generator, eval_once: bool
) -> list[Pair]:
    """Rows of ``split`` in shuffled order, reshuffled and cycled when ``n`` exceeds them; with
    ``eval_once`` the eval split gives each row at most once (``n`` capped)."""
    pool = [(p, a) for p, a in rows if split_of(p) == split]
    if not pool and n:
        raise RuntimeError(f"the table has no prompt in split {split!r}")
    if eval_once and split == "eval":
        n = min(n, len(pool))
    out: list[Pair] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool))[: n - len(out)])
    return out


def _sample_generated(draw: Draw, split: str, n: int, rng: np.random.Generator) -> list[Pair]:
    """Draw until ``n`` prompts whose key hashes to ``split``; distinct unless the space runs dry."""
    out: list[Pair] = []
    seen: set[str] = set()
    stall = 0
    while len(out) < n:
        for prompt, answer, key in draw(rng, _BATCH):
            if split_of(key) != split or prompt in seen:
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


# ------------------------------------------------------------------------------- registry
DomainKind = Literal["generated", "table", "records"]


@dataclass(frozen=True)
class Domain:
    """A built-in domain: how it samples, which splits it has, and which model family it suits.

    kind: ``generated`` (instances drawn from a generator, split by a hash of the instance),
    ``table`` (a fixed list of rows split by a hash of the prompt) or ``records`` (invented facts
    split by phrasing: ``private`` = trained phrasings, ``eval`` = the held-out one; no ``public``).
    """

    name: str
    kind: DomainKind
    sample: Callable[[str, int, np.random.Generator], list[Pair]]  # (split, n, rng) -> pairs
    splits: tuple[str, ...] = SPLITS
    byte_level: bool = False  # terse "x=" prompts within MAX_EXAMPLE_CHARS, for the tiny model


def _generated(name: str, draw: Draw, byte_level: bool = False) -> Domain:
    return Domain(name, "generated", lambda s, n, rng: _sample_generated(draw, s, n, rng),
                  byte_level=byte_level)  # fmt: skip


def _table(name: str, rows: tuple[Pair, ...], eval_once: bool, byte_level: bool = False) -> Domain:
    return Domain(name, "table", lambda s, n, rng: _sample_table(rows, s, n, rng, eval_once),
                  byte_level=byte_level)  # fmt: skip


def _records(name: str) -> Domain:
    return Domain(name, "records", lambda s, n, rng: sample_records(name, s, n, rng),
                  splits=("private", "eval"))  # fmt: skip


_FACT_ROWS = tuple((f"{rel} {subj}=", ans) for rel, subj, ans in FACTS)

DOMAINS: Mapping[str, Domain] = MappingProxyType({d.name: d for d in (
    # byte-level, for the tiny model; facts cycles its eval split (kept as it always was)
    _generated("arithmetic", _keyed(_arithmetic), byte_level=True),
    _generated("strings", _keyed(_strings), byte_level=True),
    _generated("units", _keyed(_units), byte_level=True),
    _table("facts", _FACT_ROWS, eval_once=False, byte_level=True),
    # chat: invented private records (one per spec in records.RECORD_SPECS), skills, public
    *(_records(name) for name in RECORD_SPECS),
    _generated("addition", skills.addition),
    _generated("conversion", skills.conversion),
    _table("capitals", CAPITAL_ROWS, eval_once=True),
)})  # fmt: skip
BUILTIN_DOMAINS: tuple[str, ...] = tuple(DOMAINS)
BYTE_LEVEL_DOMAINS: tuple[str, ...] = tuple(n for n, d in DOMAINS.items() if d.byte_level)
RECORD_DOMAINS: tuple[str, ...] = tuple(n for n, d in DOMAINS.items() if d.kind == "records")
# Bound on len(prompt) + len(answer) of every chat-domain example, for any RECORDS_PER_DOMAIN (the
# longest name pools in the longest catalogue template); the default tables reach 62. Test-checked.
MAX_CHAT_EXAMPLE_CHARS = 64


def get_domain(name: str) -> Domain:
    """The registered domain ``name``; UnknownDomainError listing the known ones otherwise."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise UnknownDomainError(name) from None


def sample_examples(domain: str, split: Split, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``domain`` from ``split``; deterministic given all four arguments.

    Exactly ``n``, repeating once a finite split runs out, except the ``eval`` split of record
    domains and ``capitals``, which gives each held-out prompt at most once (``n`` capped).
    A split the domain lacks (``public`` of a record domain) raises ValueError.
    """
    spec = get_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split not in spec.splits:
        raise ValueError(
            f"domain {domain!r} has no {split!r} split (it has {', '.join(spec.splits)}): its "
            "records are device-private; leave it out of data.public_domains"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = spec.sample(split, n, _rng(domain, split, seed))
    return [Example(prompt=p, answer=a, domain=domain) for p, a in pairs]
