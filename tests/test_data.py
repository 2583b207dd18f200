"""Tests of gaisnet_ray.data: built-in domains, JSONL loading, partitions, encoding, builders. The
chat domains the pretrained model learns (records, skills, capitals): test_data_chat.py."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch

from gaisnet_ray.config import DataConfig
from gaisnet_ray.data import (
    BYTE_LEVEL_DOMAINS,
    DatasetError,
    Example,
    UnknownDomainError,
    device_examples,
    encode_examples,
    encode_prompt,
    eval_examples,
    load_jsonl,
    partition_dirichlet,
    partition_iid,
    public_examples,
    sample_examples,
)
from gaisnet_ray.data.domains import split_of
from gaisnet_ray.data.facts import FACTS

SPLITS = ("eval", "public", "private")
DEVICES = ["end-0-0", "end-0-1", "end-1-0", "end-1-1"]


# ------------------------------------------------------------------------------ domains
@pytest.mark.parametrize("domain", BYTE_LEVEL_DOMAINS)
def test_sampling_is_deterministic(domain):
    a = sample_examples(domain, "private", 40, seed=3)
    assert a == sample_examples(domain, "private", 40, seed=3)
    assert len(a) == 40 and all(ex.domain == domain for ex in a)
    assert a != sample_examples(domain, "private", 40, seed=4)


@pytest.mark.parametrize("domain", BYTE_LEVEL_DOMAINS)
def test_splits_are_disjoint(domain):
    prompts = {
        s: {ex.prompt for seed in (0, 1) for ex in sample_examples(domain, s, 60, seed)}
        for s in SPLITS
    }
    assert not prompts["eval"] & prompts["public"]
    assert not prompts["eval"] & prompts["private"]
    assert not prompts["public"] & prompts["private"]
    for s, ps in prompts.items():
        assert {split_of(p) for p in ps} == {s}


@pytest.mark.parametrize("domain", BYTE_LEVEL_DOMAINS)
def test_examples_are_short_ascii(domain):
    for s in SPLITS:
        for ex in sample_examples(domain, s, 100, seed=0):
            assert len(ex.prompt) + len(ex.answer) <= 28, ex
            assert ex.prompt.isascii() and ex.answer.isascii(), ex
            assert ex.prompt.endswith("=") and ex.answer


def test_split_of_known_prompts():
    # fixed by SHA-256 of the text, so these never change between runs, processes or machines
    prompts = ("23+58=", "cap France=", "rev abc=", "sym Iron=")
    assert [split_of(p) for p in prompts] == ["public", "private", "private", "public"]
    counts = {s: 0 for s in SPLITS}
    for i in range(2000):
        counts[split_of(f"{i}+{i}=")] += 1
    assert 200 <= counts["eval"] <= 400  # ~15%
    assert 400 <= counts["public"] <= 600  # ~25%
    assert 1000 <= counts["private"] <= 1400  # ~60%


def test_arithmetic_answers_are_correct():
    ops = set()
    for ex in sample_examples("arithmetic", "private", 300, seed=0):
        a, op, b = re.fullmatch(r"(\d+)([+*-])(\d+)=", ex.prompt).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert ex.answer == str(expected), ex
        ops.add(op)
    assert ops == {"+", "-", "*"}


def test_units_answers_are_correct():
    factors = {("km", "m"): 1000, ("h", "min"): 60, ("kg", "g"): 1000, ("h", "s"): 3600,
               ("m", "cm"): 100, ("week", "day"): 7, ("ft", "in"): 12, ("yd", "ft"): 3}  # fmt: skip
    checked = 0
    for ex in sample_examples("units", "private", 300, seed=0):
        q, src, dst = re.fullmatch(r"(\d+) (\w+) in (\w+)=", ex.prompt).groups()
        assert 1 <= int(q) <= 99
        if (src, dst) in factors:
            assert ex.answer == str(int(q) * factors[(src, dst)]), ex
            checked += 1
    assert checked > 50


def test_strings_answers_are_correct():
    for ex in sample_examples("strings", "public", 200, seed=0):
        op, word = re.fullmatch(r"(rev|up|len) ([a-z]{3,6})=", ex.prompt).groups()
        expected = {"rev": word[::-1], "up": word.upper(), "len": str(len(word))}[op]
        assert ex.answer == expected, ex


def test_facts_table():
    prompts = {f"{r} {s}=": a for r, s, a in FACTS}
    assert len(prompts) == len(FACTS) >= 60
    assert prompts["cap France="] == "Paris"
    assert prompts["sym Iron="] == "Fe"
    assert prompts["opp hot="] == "cold"
    sampled = sample_examples("facts", split_of("cap France="), 200, seed=0)
    assert Example("cap France=", "Paris", "facts") in sampled


def test_large_space_gives_distinct_prompts_small_space_repeats():
    strings = sample_examples("strings", "private", 500, seed=0)
    assert len({ex.prompt for ex in strings}) == 500
    n_eval_facts = sum(split_of(f"{r} {s}=") == "eval" for r, s, _ in FACTS)
    facts = sample_examples("facts", "eval", 2 * n_eval_facts + 1, seed=0)
    assert len(facts) == 2 * n_eval_facts + 1
    assert len({ex.prompt for ex in facts[:n_eval_facts]}) == n_eval_facts  # all before repeats
    assert len({ex.prompt for ex in facts}) == n_eval_facts


def test_unknown_domain():
    known = "arithmetic, strings, units, facts, catalogue, town, codes, addition, conversion, capitals"
    with pytest.raises(UnknownDomainError, match=rf"'poetry'.*{known}"):
        sample_examples("poetry", "eval", 3, seed=0)
    with pytest.raises(UnknownDomainError, match="poetry"):
        device_examples(DataConfig(domains=["arithmetic", "poetry"]), DEVICES)
    err = pickle.loads(pickle.dumps(UnknownDomainError("poetry")))
    assert err.domain == "poetry" and "poetry" in str(err)


def test_bad_split_and_n():
    with pytest.raises(ValueError, match="split"):
        sample_examples("facts", "train", 3, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        sample_examples("facts", "eval", -1, seed=0)
    assert sample_examples("strings", "eval", 0, seed=0) == []


# -------------------------------------------------------------------------------- jsonl
def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt": "2+2=", "answer": "4", "domain": "arithmetic"}),
        "",
        "   ",
        json.dumps({"prompt": "hi=", "answer": "HI", "extra": 1}),
    ])  # fmt: skip
    assert load_jsonl(path) == [
        Example("2+2=", "4", "arithmetic"),
        Example("hi=", "HI", "custom"),
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "a=", "answer": ', "invalid JSON"),
        ('["a=", "b"]', "expected a JSON object, got list"),
        ('{"prompt": "a="}', "missing field 'answer'"),
        ('{"prompt": 3, "answer": "b"}', "field 'prompt' must be a string, got int"),
        ('{"prompt": "a=", "answer": "b", "domain": null}', "field 'domain' must be a string"),
    ],
)
def test_load_jsonl_bad_line(tmp_path, line, problem):
    path = _write(tmp_path, ['{"prompt": "ok=", "answer": "1"}', "", line])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: {problem}")):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl' does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- partition
def _assert_exact_cover(parts, n_items):
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_items))


def test_partition_iid():
    parts = partition_iid(103, 5, seed=0)
    _assert_exact_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    again = partition_iid(103, 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], np.arange(21))  # shuffled, not contiguous
    with pytest.raises(ValueError, match="n_parts"):
        partition_iid(10, 0, seed=0)


def _label_skew(labels, parts):
    """Mean total-variation distance between each part's label mix and the global mix."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    glob = np.array([np.mean(labels == v) for v in values])
    tvs = [0.5 * np.abs(np.array([np.mean(labels[p] == v) for v in values]) - glob).sum()
           for p in parts]  # fmt: skip
    return float(np.mean(tvs))


def test_partition_dirichlet_covers_and_is_deterministic():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    parts = partition_dirichlet(labels, 4, alpha=0.5, seed=1, min_size=5)
    _assert_exact_cover(parts, 100)
    assert min(len(p) for p in parts) >= 5
    again = partition_dirichlet(labels, 4, alpha=0.5, seed=1, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partition_dirichlet_skew_follows_alpha():
    labels = [k for k in range(4) for _ in range(250)]
    skewed = [_label_skew(labels, partition_dirichlet(labels, 5, 0.05, seed=s)) for s in range(5)]
    flat = [_label_skew(labels, partition_dirichlet(labels, 5, 1000.0, seed=s)) for s in range(5)]
    iid = _label_skew(labels, partition_iid(1000, 5, seed=0))
    assert np.mean(skewed) > 0.4
    assert np.mean(flat) < 0.05 and iid < 0.05


def test_partition_dirichlet_errors():
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet([0, 1], 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="n_parts"):
        partition_dirichlet([0, 1], 0, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="n_parts=4 parts min_size=3 items from only 10"):
        partition_dirichlet([0] * 10, 4, alpha=1.0, seed=0, min_size=3)


# ------------------------------------------------------------------------------- encode
class CharTokenizer:
    """One token per character (its code point); specials below 32."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def test_encode_layout():
    tok = CharTokenizer()
    batch = encode_examples([Example("2+2=", "4", "x"), Example("ab=", "ba", "y")], tok, 10)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"].tolist() == [
        [1, 50, 43, 50, 61, 52, 2, 0, 0, 0],
        [1, 97, 98, 61, 98, 97, 2, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, -100, -100, 52, 2, -100, -100, -100],
        [-100, -100, -100, -100, 98, 97, 2, -100, -100, -100],
    ]


def test_encode_exact_fit_and_overlong():
    tok = CharTokenizer()
    full = encode_examples([Example("ab=", "c", "x")], tok, 6)  # bos a b = c eos
    assert full["input_ids"].tolist() == [[1, 97, 98, 61, 99, 2]]
    with pytest.raises(DatasetError, match=r"'ab=' needs 6 tokens .* seq_len is 5"):
        encode_examples([Example("ab=", "c", "x")], tok, 5)
    assert encode_examples([], tok, 8)["labels"].shape == (0, 8)


def test_encode_prompt_and_missing_pad():
    tok = CharTokenizer()
    assert encode_prompt("1+1=", tok) == [1, 49, 43, 49, 61]
    tok.pad_token_id = None
    with pytest.raises(DatasetError, match="pad_token_id"):
        encode_examples([Example("a=", "b", "x")], tok, 8)


# ----------------------------------------------------------------------------- builders
def test_device_examples_builtin():
    cfg = DataConfig(samples_per_device=40, dirichlet_alpha=0.3, seed=7)
    devices = device_examples(cfg, DEVICES)
    assert list(devices) == DEVICES
    assert sum(len(v) for v in devices.values()) == 160
    assert min(len(v) for v in devices.values()) >= 40 // 8
    pool = [ex for v in devices.values() for ex in v]
    assert {split_of(ex.prompt) for ex in pool} == {"private"}
    assert {d: sum(ex.domain == d for ex in pool) for d in cfg.domains} == dict.fromkeys(
        cfg.domains, 40
    )
    assert device_examples(cfg, DEVICES) == devices
    iid = device_examples(cfg.model_copy(update={"partition": "iid"}), DEVICES)
    assert [len(v) for v in iid.values()] == [40, 40, 40, 40]


def test_public_and_eval_builtin_never_overlap_private():
    cfg = DataConfig(domains=["arithmetic", "facts", "units"], public_samples=10,
                     eval_samples_per_domain=6, samples_per_device=30)  # fmt: skip
    public = public_examples(cfg)
    assert [ex.domain for ex in public] == ["arithmetic"] * 4 + ["facts"] * 3 + ["units"] * 3
    evals = eval_examples(cfg)
    assert list(evals) == ["arithmetic", "facts", "units"]
    assert all(len(v) == 6 for v in evals.values())
    private = {ex.prompt for v in device_examples(cfg, DEVICES).values() for ex in v}
    eval_prompts = {ex.prompt for v in evals.values() for ex in v}
    public_prompts = {ex.prompt for ex in public}
    assert not eval_prompts & private and not eval_prompts & public_prompts
    assert not public_prompts & private


def test_builders_jsonl(tmp_path):
    rows = [{"prompt": f"q{i}=", "answer": str(i), "domain": "ab"[i % 2]} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    ev = tmp_path / "eval.jsonl"
    ev.write_text('{"prompt": "x=", "answer": "1", "domain": "a"}\n{"prompt": "y=", "answer": "2"}')
    cfg = DataConfig(source="jsonl", train_path=str(train), eval_path=str(ev), seed=1)
    devices = device_examples(cfg, DEVICES)
    assert sorted(ex.prompt for v in devices.values() for ex in v) == sorted(
        r["prompt"] for r in rows
    )
    assert all(len(v) >= 1 for v in devices.values())
    assert public_examples(cfg) == []
    assert eval_examples(cfg) == {
        "a": [Example("x=", "1", "a")],
        "custom": [Example("y=", "2", "custom")],
    }
    with pytest.raises(DatasetError, match="eval_path"):
        eval_examples(cfg.model_copy(update={"eval_path": None}))
    with pytest.raises(DatasetError, match="20 examples for 21 devices"):
        device_examples(cfg, [f"d{i}" for i in range(21)])
