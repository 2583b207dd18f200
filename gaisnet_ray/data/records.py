"""Invented record tables: private knowledge a pretrained model cannot know.

Three record domains, each a small self-consistent table built from a fixed seed:

- ``catalogue``: products ("the Zorvex kettle") with price, colour, warehouse aisle, weight;
- ``town``: fictional towns with founding year, mayor, river, twin town;
- ``codes``: internal error codes with meaning, owning team, runbook, release.

One *fact* is a (record, field) pair with exactly one answer, asked in four phrasings: phrasings
0-2 are the training (``private``) split, phrasing 3 is the held-out (``eval``) split. Evaluation so
asks facts that devices trained on, in words they never trained on. There is no ``public`` split:
the cloud never holds private records.

The tables depend only on ``TABLE_SEED`` (never on ``data.seed``), so every device, edge and cloud
process builds the same facts; ``data.seed`` only orders the sampled rows.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "EVAL_PHRASING",
    "RECORDS_PER_DOMAIN",
    "RECORD_SPECS",
    "TABLE_SEED",
    "TRAIN_PHRASINGS",
    "RecordFact",
    "record_facts",
    "sample_records",
]

RECORDS_PER_DOMAIN = 4  # records per domain; facts per domain = records x 4 fields (16); max 20
TABLE_SEED = 20261130  # fixed: the tables are the same in every process, whatever data.seed is
TRAIN_PHRASINGS = (0, 1, 2)  # phrasings in the private split
EVAL_PHRASING = 3  # the held-out phrasing
Pair = tuple[str, str]  # (prompt, answer)
Answers = dict[str, str]  # field name -> answer


@dataclass(frozen=True)
class FieldSpec:
    """One field of a record domain: four question templates with a ``{subject}`` slot."""

    name: str
    templates: tuple[str, str, str, str]  # [0..2] trained on, [3] held out


@dataclass(frozen=True)
class RecordSpec:
    """A record domain: its fields and how to invent ``k`` records from a seeded generator."""

    name: str
    fields: tuple[FieldSpec, ...]
    invent: Callable[[np.random.Generator, int], list[tuple[str, Answers]]]  # -> (subject, answers)


@dataclass(frozen=True)
class RecordFact:
    """One (record, field) fact: its single answer and its four phrasings."""

    domain: str
    record: str  # the subject, e.g. "Zorvex kettle"
    field: str
    answer: str
    prompts: tuple[str, str, str, str]  # phrasing 0..3; EVAL_PHRASING is held out


# ------------------------------------------------------------------------ invented name pools
# Made up for this project; 20 of each so RECORDS_PER_DOMAIN can go up to 20.
_MAX_RECORDS = 20
_BRANDS = (
    "Zorvex", "Talmori", "Kestrune", "Vellico", "Drumbex", "Quorrin", "Pelvane", "Marzoth",
    "Brintle", "Sorvani", "Yundrel", "Glimmox", "Frestel", "Noktavi", "Halvenor", "Crumzel",
    "Obrisk", "Wendarro", "Jastiv", "Plonmer",
)  # fmt: skip
_PRODUCTS = (
    "kettle", "desk lamp", "backpack", "blender", "toaster", "umbrella", "thermos", "desk fan",
    "rice cooker", "water filter", "bike pump", "hair dryer", "alarm clock", "doormat", "teapot",
    "phone stand", "lunch box", "step stool", "bread bin", "coat hook",
)  # fmt: skip
_COLOURS = (
    "teal", "amber", "crimson", "olive", "navy", "coral", "ivory", "plum", "mustard", "slate",
    "lilac", "rust", "mint", "charcoal", "saffron", "maroon", "sand", "jade", "peach", "cobalt",
)  # fmt: skip
_TOWNS = (
    "Velmora", "Quistead", "Dunmarrow", "Orvikstead", "Tessaly Cross", "Bramwick Fen", "Calvoria",
    "Hestermoor", "Yarrowgate", "Pellinor", "Skelbourne", "Maudrith", "Ostwenby", "Lorrenhal",
    "Fennimar", "Grisvane", "Aldercombe", "Witherlay", "Corsivale", "Nettlebury",
)  # fmt: skip
_TWIN_TOWNS = (
    "Kovalje", "Brennstadt", "Orsolin", "Valdemor", "Lindqvara", "Mezzavalle", "Saint-Varnel",
    "Trevallon", "Ardensk", "Holmfjara", "Castelbrio", "Zelenov", "Port Aubrac", "Ristovo",
    "Emmerdorf", "Villaquinta", "Skarnholm", "Belvoir-sur-Lune", "Dravonja", "Kilmarrach",
)  # fmt: skip
_RIVERS = (
    "Kesh", "Amberlin", "Thole", "Varrow", "Quenna", "Lisk", "Dorran", "Mirel", "Sallow", "Ebbin",
    "Corrant", "Wendle", "Ylla", "Brisk", "Harnow", "Olvey", "Tamsel", "Fyrn", "Oddle", "Caskin",
)  # fmt: skip
_FIRST_NAMES = (
    "Edda", "Tomas", "Ilse", "Bram", "Nadia", "Oren", "Petra", "Joss", "Maren", "Felix", "Una",
    "Casimir", "Livia", "Hugo", "Saskia", "Rolf", "Agnes", "Tobin", "Wilma", "Ansel",
)  # fmt: skip
_SURNAMES = (
    "Marlow", "Quint", "Averell", "Dunmore", "Keswick", "Thorne", "Vantreight", "Ollerby",
    "Pashley", "Greaves", "Holloway", "Strand", "Merriweather", "Aske", "Bellamy", "Crane",
    "Fairbrook", "Lindqvist", "Roper", "Tallis",
)  # fmt: skip
_MEANINGS = (
    "badge expired", "cold store full", "label printer jam", "pallet scan failed",
    "dock door open", "forklift battery low", "route not found", "duplicate order",
    "invoice locked", "courier timeout", "scale out of range", "shelf sensor offline",
    "stale price list", "customs hold", "tote missing", "seal broken", "clock drift",
    "night lockout", "quota exceeded", "conveyor stalled",
)  # fmt: skip
_TEAMS = (
    "Falcon", "Juniper", "Basalt", "Marigold", "Osprey", "Tundra", "Quartz", "Heron", "Cobalt",
    "Saffron", "Lynx", "Ember", "Willow", "Granite", "Kestrel", "Nimbus", "Thistle", "Puffin",
    "Obsidian", "Bramble",
)  # fmt: skip


def _pick(rng: np.random.Generator, pool: tuple[str, ...] | list[str], k: int) -> list[str]:
    """``k`` distinct items of ``pool`` in random order."""
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False).tolist()]


def _distinct_ints(rng: np.random.Generator, low: int, high: int, k: int) -> list[int]:
    """``k`` distinct integers from ``[low, high)``."""
    return (low + rng.choice(high - low, size=k, replace=False)).tolist()


def _invent_products(rng: np.random.Generator, k: int) -> list[tuple[str, Answers]]:
    names = [f"{b} {p}" for b, p in zip(_pick(rng, _BRANDS, k), _pick(rng, _PRODUCTS, k))]
    prices = _distinct_ints(rng, 12, 300, k)
    colours = _pick(rng, _COLOURS, k)
    aisles = [f"{'ABCDEFGH'[c // 20]}{c % 20 + 1}" for c in _distinct_ints(rng, 0, 160, k)]
    weights = _distinct_ints(rng, 3, 100, k)  # tenths of a kilogram
    return [
        (name, {"price": f"${price}", "colour": colour, "aisle": aisle,
                "weight": f"{w // 10}.{w % 10} kg"})
        for name, price, colour, aisle, w in zip(names, prices, colours, aisles, weights)
    ]  # fmt: skip


def _invent_towns(rng: np.random.Generator, k: int) -> list[tuple[str, Answers]]:
    names = _pick(rng, _TOWNS, k)
    years = _distinct_ints(rng, 1150, 1890, k)
    mayors = [f"{f} {s}" for f, s in zip(_pick(rng, _FIRST_NAMES, k), _pick(rng, _SURNAMES, k))]
    rivers = _pick(rng, _RIVERS, k)
    twins = _pick(rng, _TWIN_TOWNS, k)
    return [
        (name, {"founded": str(year), "mayor": mayor, "river": river, "twin": twin})
        for name, year, mayor, river, twin in zip(names, years, mayors, rivers, twins)
    ]


def _invent_codes(rng: np.random.Generator, k: int) -> list[tuple[str, Answers]]:
    codes = [f"E{n}" for n in _distinct_ints(rng, 100, 1000, k)]
    meanings = _pick(rng, _MEANINGS, k)
    teams = _pick(rng, _TEAMS, k)
    runbooks = [f"RB-{n}" for n in _distinct_ints(rng, 100, 1000, k)]
    releases = [f"v{n // 10}.{n % 10}" for n in _distinct_ints(rng, 10, 100, k)]
    return [
        (code, {"meaning": meaning, "team": team, "runbook": runbook, "release": release})
        for code, meaning, team, runbook, release in zip(codes, meanings, teams, runbooks, releases)
    ]


RECORD_SPECS: dict[str, RecordSpec] = {
    spec.name: spec
    for spec in (
        RecordSpec("catalogue", (
            FieldSpec("price", (
                "What is the price of the {subject}?",
                "How much does the {subject} cost?",
                "What does the {subject} sell for?",
                "How much would I pay for the {subject}?",
            )),
            FieldSpec("colour", (
                "What colour is the {subject}?",
                "Which colour does the {subject} come in?",
                "In what colour is the {subject} sold?",
                "What is the colour of the {subject}?",
            )),
            FieldSpec("aisle", (
                "In which warehouse aisle is the {subject} stored?",
                "Which aisle holds the {subject}?",
                "Where in the warehouse is the {subject} kept?",
                "What aisle is the {subject} in?",
            )),
            FieldSpec("weight", (
                "How much does the {subject} weigh?",
                "What is the weight of the {subject}?",
                "How heavy is the {subject}?",
                "What does the {subject} weigh?",
            )),
        ), _invent_products),
        RecordSpec("town", (
            FieldSpec("founded", (
                "When was {subject} founded?",
                "In what year was {subject} founded?",
                "Which year was {subject} established?",
                "What is the founding year of {subject}?",
            )),
            FieldSpec("mayor", (
                "Who is the mayor of {subject}?",
                "Who serves as mayor of {subject}?",
                "Who runs {subject} as its mayor?",
                "Who is {subject}'s mayor?",
            )),
            FieldSpec("river", (
                "Which river flows through {subject}?",
                "What river runs through {subject}?",
                "What is the name of the river in {subject}?",
                "On which river does {subject} lie?",
            )),
            FieldSpec("twin", (
                "What is the twin town of {subject}?",
                "Which town is twinned with {subject}?",
                "What town is {subject} twinned with?",
                "Which town is {subject}'s twin town?",
            )),
        ), _invent_towns),
        RecordSpec("codes", (
            FieldSpec("meaning", (
                "What does error code {subject} mean?",
                "What problem does code {subject} signal?",
                "What is error code {subject} about?",
                "What does the code {subject} stand for?",
            )),
            FieldSpec("team", (
                "Which team handles error code {subject}?",
                "Who owns error {subject}?",
                "What team is responsible for code {subject}?",
                "Which team should fix error {subject}?",
            )),
            FieldSpec("runbook", (
                "Which runbook covers error {subject}?",
                "What runbook should I follow for code {subject}?",
                "Which runbook page documents code {subject}?",
                "What is the runbook for error {subject}?",
            )),
            FieldSpec("release", (
                "In which release was error code {subject} introduced?",
                "Which version added code {subject}?",
                "What release first had error {subject}?",
                "In what version did code {subject} first appear?",
            )),
        ), _invent_codes),
    )
}  # fmt: skip


@functools.cache
def record_facts(domain: str) -> tuple[RecordFact, ...]:
    """The facts of record domain ``domain``, record-major then field order; a pure function of
    ``TABLE_SEED`` and ``RECORDS_PER_DOMAIN`` (KeyError for a name not in ``RECORD_SPECS``)."""
    spec = RECORD_SPECS[domain]
    if not 1 <= RECORDS_PER_DOMAIN <= _MAX_RECORDS:
        raise ValueError(f"RECORDS_PER_DOMAIN must be in 1..{_MAX_RECORDS} (the invented name pools' "
                         f"size), got {RECORDS_PER_DOMAIN}")
    digest = hashlib.sha256(f"records|{domain}|{TABLE_SEED}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    facts = []
    for subject, answers in spec.invent(rng, RECORDS_PER_DOMAIN):
        for field in spec.fields:
            prompts = tuple(t.format(subject=subject) for t in field.templates)
            facts.append(RecordFact(domain, subject, field.name, answers[field.name], prompts))
    return tuple(facts)


def sample_records(domain: str, split: str, n: int, rng: np.random.Generator) -> list[Pair]:
    """``n`` rows of ``split`` (``private`` or ``eval``) of record domain ``domain``.

    private: rounds of 3 x F rows (F facts), each round every (fact, trained phrasing) once, in
    three passes over all facts in shuffled order with each fact's phrasings in shuffled order; so
    any ``n >= F`` asks every fact and any ``n >= 3F`` holds every row. Rounds repeat past 3F.
    eval: every fact once in its held-out phrasing, shuffled; ``n`` is capped at F (no repeats).
    """
    facts = record_facts(domain)
    if split == "eval":
        return [(facts[i].prompts[EVAL_PHRASING], facts[i].answer)
                for i in rng.permutation(len(facts))[:n].tolist()]  # fmt: skip
    if split != "private":
        raise ValueError(f"record domain {domain!r} has only the splits 'private' and 'eval'")
    out: list[Pair] = []
    while len(out) < n:
        phrasing = [rng.permutation(TRAIN_PHRASINGS).tolist() for _ in facts]  # per fact, per pass
        for p in range(len(TRAIN_PHRASINGS)):
            for i in rng.permutation(len(facts)).tolist():
                out.append((facts[i].prompts[phrasing[i][p]], facts[i].answer))
    return out[:n]
