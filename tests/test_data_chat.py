"""Tests of gaisnet_ray.data's chat domains, the ones the pretrained model learns: record tables
fixed and the same in every process, record and skill splits by phrasing, capitals as the public
domain, short questions, every record fact landing on some device, and their eval examples.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from gaisnet_ray.config import DataConfig
from gaisnet_ray.data import (
    BUILTIN_DOMAINS,
    BYTE_LEVEL_DOMAINS,
    DOMAINS,
    RECORD_DOMAINS,
    DatasetError,
    Example,
    UnknownDomainError,
    device_examples,
    eval_examples,
    get_domain,
    public_examples,
    record_facts,
    sample_examples,
)
from gaisnet_ray.data import records
from gaisnet_ray.data.capitals import CAPITAL_ROWS
from gaisnet_ray.data.domains import MAX_CHAT_EXAMPLE_CHARS, split_of
from gaisnet_ray.data.records import RECORDS_PER_DOMAIN
from gaisnet_ray.data.skills import CONVERSIONS

SPLITS = ("eval", "public", "private")
DEVICES = ["end-0-0", "end-0-1", "end-1-0", "end-1-1"]


CHAT_DOMAINS = tuple(d for d in BUILTIN_DOMAINS if d not in BYTE_LEVEL_DOMAINS)
SKILLS = ("addition", "conversion")
TYPICAL_DOMAINS = ["catalogue", "town", "codes", "addition", "conversion"]
SIX_DEVICES = [f"end-{e}-{i}" for e in range(2) for i in range(3)]


def _fact_of(domain):
    """prompt -> (record, field) over all four phrasings; fails if a prompt names two facts."""
    out = {}
    for f in record_facts(domain):
        for p in f.prompts:
            assert p not in out, f"prompt {p!r} asks two facts"
            out[p] = (f.record, f.field)
    return out


def test_chat_domains_registered():
    assert RECORD_DOMAINS == ("catalogue", "town", "codes")
    assert CHAT_DOMAINS == (*RECORD_DOMAINS, *SKILLS, "capitals")
    assert DOMAINS["catalogue"].splits == ("private", "eval")
    assert DOMAINS["capitals"].splits == SPLITS and DOMAINS["addition"].kind == "generated"
    assert get_domain("town") is DOMAINS["town"]
    with pytest.raises(UnknownDomainError, match="'towns'.*town, codes, addition"):
        get_domain("towns")


@pytest.mark.parametrize("domain", RECORD_DOMAINS)
def test_record_table_is_fixed_and_consistent(domain):
    facts = record_facts(domain)
    assert len(facts) == RECORDS_PER_DOMAIN * 4 == 16
    assert len({(f.record, f.field) for f in facts}) == len(facts)  # one answer per fact
    assert len({f.record for f in facts}) == RECORDS_PER_DOMAIN
    for field in {f.field for f in facts}:  # records differ in every field: no lucky guesses
        answers = [f.answer for f in facts if f.field == field]
        assert len(set(answers)) == len(answers), (field, answers)
    _fact_of(domain)  # every prompt names exactly one fact
    # the table does not depend on data.seed: any seed's rows carry the same prompt -> answer
    answer_of = {p: f.answer for f in facts for p in f.prompts}
    for seed in (0, 1, 99):
        for split in ("private", "eval"):
            for ex in sample_examples(domain, split, 100, seed):
                assert answer_of[ex.prompt] == ex.answer, ex


def test_record_tables_same_in_another_process():
    script = ("from gaisnet_ray.data.records import record_facts, RECORD_SPECS; "
              "print(repr([record_facts(d) for d in RECORD_SPECS]))")  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == repr([record_facts(d) for d in RECORD_DOMAINS])


@pytest.mark.parametrize("domain", RECORD_DOMAINS)
def test_record_splits_by_phrasing(domain):
    facts = record_facts(domain)
    fact_of = _fact_of(domain)
    trained = {p for f in facts for p in f.prompts[:3]}
    held_out = {f.prompts[3] for f in facts}
    n_rows = 3 * len(facts)
    for seed in (0, 1):
        private = sample_examples(domain, "private", 2 * n_rows + 5, seed)
        assert len(private) == 2 * n_rows + 5
        assert {ex.prompt for ex in private} == trained  # never a held-out phrasing
        # each round of 3F rows holds every (fact, phrasing) once; its first F rows ask every fact
        assert sorted(ex.prompt for ex in private[:n_rows]) == sorted(trained)
        assert sorted(ex.prompt for ex in private[n_rows : 2 * n_rows]) == sorted(trained)
        assert {fact_of[ex.prompt] for ex in private[: len(facts)]} == set(fact_of.values())
        evals = sample_examples(domain, "eval", 100, seed)  # capped: each fact once
        assert len(evals) == len(facts) and {ex.prompt for ex in evals} == held_out
        assert {fact_of[ex.prompt] for ex in evals} <= {fact_of[ex.prompt] for ex in private}
    assert len(sample_examples(domain, "eval", 5, 0)) == 5
    assert sample_examples(domain, "private", 30, 0) != sample_examples(domain, "private", 30, 1)
    assert sample_examples(domain, "private", 30, 2) == sample_examples(domain, "private", 30, 2)


def test_record_domain_has_no_public_split():
    with pytest.raises(ValueError, match="'catalogue' has no 'public' split .*data.public_domains"):
        sample_examples("catalogue", "public", 4, seed=0)
    cfg = DataConfig(domains=[*TYPICAL_DOMAINS, "capitals"], public_samples=30)
    public = public_examples(cfg)  # public_domains None: the record domains are skipped
    assert [ex.domain for ex in public] == ["addition"] * 10 + ["conversion"] * 10 + ["capitals"] * 10
    # addition splits by its operand pair (checked below), the others by the prompt itself
    assert {split_of(ex.prompt) for ex in public if ex.domain != "addition"} == {"public"}
    assert public_examples(cfg.model_copy(update={"domains": ["town"]})) == []
    bad = cfg.model_copy(update={"public_domains": ["capitals", "town", "codes"]})
    with pytest.raises(DatasetError, match=r"public_domains lists \['town', 'codes'\]"):
        public_examples(bad)


def _addition_key(prompt):
    a, b = map(int, re.fullmatch(r"What is (\d{3}) \+ (\d{3})\?", prompt).groups())
    return a, b


@pytest.mark.parametrize("domain", SKILLS)
def test_skill_splits_are_disjoint_and_correct(domain):
    by_split = {s: [ex for seed in (0, 1) for ex in sample_examples(domain, s, 150, seed)]
                for s in SPLITS}  # fmt: skip
    prompts = {s: {ex.prompt for ex in exs} for s, exs in by_split.items()}
    assert not prompts["eval"] & prompts["public"] and not prompts["eval"] & prompts["private"]
    assert not prompts["public"] & prompts["private"]
    assert len({ex.prompt for ex in sample_examples(domain, "eval", 150, 0)}) == 150  # distinct
    for exs in by_split.values():
        for ex in exs:
            if domain == "addition":
                a, b = _addition_key(ex.prompt)
                assert ex.answer == str(a + b), ex
            else:
                dst, q, src = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", ex.prompt).groups()
                factor = {(s, d): f for s, d, f in CONVERSIONS}[(src, dst)]
                assert ex.answer == str(int(q) * factor) and 2 <= int(q) <= 99, ex
    if domain == "addition":  # a + b and b + a never straddle two splits
        keys = {s: {tuple(sorted(_addition_key(p))) for p in ps} for s, ps in prompts.items()}
        assert not keys["eval"] & keys["private"] and not keys["eval"] & keys["public"]


def test_capitals_splits():
    rows = dict(CAPITAL_ROWS)
    seen = {}
    for s in SPLITS:
        exs = sample_examples("capitals", s, 200, seed=0)
        assert all(rows[ex.prompt] == ex.answer and split_of(ex.prompt) == s for ex in exs)
        seen[s] = {ex.prompt for ex in exs}
    assert set().union(*seen.values()) == set(rows)  # every row, each in one split
    n_eval = len(seen["eval"])
    assert n_eval >= 8 and len(sample_examples("capitals", "eval", 200, seed=0)) == n_eval
    assert len(sample_examples("capitals", "private", 200, seed=0)) == 200  # training cycles
    assert Example("What is the capital of Kenya?", "Nairobi", "capitals") in [
        ex for s in SPLITS for ex in sample_examples("capitals", s, 200, seed=1)
    ]


@pytest.mark.parametrize("domain", CHAT_DOMAINS)
def test_chat_examples_are_short_questions(domain):
    for s in DOMAINS[domain].splits:
        for ex in sample_examples(domain, s, 200, seed=0):
            assert len(ex.prompt) + len(ex.answer) <= MAX_CHAT_EXAMPLE_CHARS, ex
            assert ex.prompt.isascii() and ex.answer.isascii(), ex
            assert ex.prompt.endswith("?") and ex.prompt[0].isupper(), ex
            assert 1 <= len(ex.answer.split()) <= 4 and ex.answer == ex.answer.strip(), ex
            assert not ex.answer.endswith("."), ex


def test_max_chat_chars_holds_for_the_largest_tables(monkeypatch):
    monkeypatch.setattr(records, "RECORDS_PER_DOMAIN", 20)  # every name pool fully used
    records.record_facts.cache_clear()
    try:
        longest = max(len(p) + len(f.answer) for d in RECORD_DOMAINS
                      for f in records.record_facts(d) for p in f.prompts)  # fmt: skip
        assert len(records.record_facts("town")) == 80 and longest <= MAX_CHAT_EXAMPLE_CHARS
    finally:
        records.record_facts.cache_clear()


@pytest.mark.parametrize(("samples", "seed"), [(64, 0), (48, 1), (48, 3), (96, 2), (64, 7)])
def test_every_record_fact_lands_on_a_device(samples, seed):
    """The typical real-model job: 6 devices, Dirichlet(0.5) over record and skill domains."""
    cfg = DataConfig(domains=TYPICAL_DOMAINS, samples_per_device=samples, dirichlet_alpha=0.5,
                     seed=seed)  # fmt: skip
    devices = device_examples(cfg, SIX_DEVICES)
    pool = [ex for exs in devices.values() for ex in exs]
    assert len(pool) == 6 * samples and min(len(v) for v in devices.values()) >= samples // 8
    for d in RECORD_DOMAINS:
        fact_of = _fact_of(d)
        held = {fact_of[ex.prompt] for ex in pool if ex.domain == d}
        assert held == set(fact_of.values()), f"{d}: facts on no device"
    holders = {d: {dev for dev, exs in devices.items() if any(ex.domain == d for ex in exs)}
               for d in TYPICAL_DOMAINS}  # fmt: skip
    if (samples, seed) == (64, 0):  # non-IID: most of a record domain sits on few devices
        town = [sum(ex.domain == "town" for ex in exs) for exs in devices.values()]
        assert max(town) >= 0.6 * sum(town) and min(len(h) for h in holders.values()) <= 3


def test_eval_examples_chat_domains():
    cfg = DataConfig(domains=[*TYPICAL_DOMAINS, "capitals"], eval_samples_per_domain=40)
    evals = eval_examples(cfg)
    assert list(evals) == cfg.domains
    assert {d: len(v) for d, v in evals.items()} == {
        "catalogue": 16, "town": 16, "codes": 16, "addition": 40, "conversion": 40,
        "capitals": sum(split_of(p) == "eval" for p, _ in CAPITAL_ROWS),
    }  # fmt: skip
    private = {ex.prompt for exs in device_examples(cfg, SIX_DEVICES).values() for ex in exs}
    assert not private & {ex.prompt for exs in evals.values() for ex in exs}
