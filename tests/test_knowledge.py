"""Tests for gaisnet_ray.knowledge: aggregation, errors, byte accounting (the store: test_knowledge_store.py).

Expected values are worked out by hand in the comments. No Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import math
import pickle
import struct

import pytest
import torch

from gaisnet_ray.knowledge import (
    KeyMismatchError,
    KnowledgeError,
    NonFiniteUpdateError,
    ShapeMismatchError,
    aggregate,
    check_compatible,
    check_finite,
    clip_update,
    content_hash,
    coordinate_median,
    fedavg,
    payload_nbytes,
    tensor_nbytes,
    trimmed_mean,
)

# `gaisnet_ray.knowledge.aggregate` as an attribute is the re-exported function; fetch the module itself.
aggregate_module = importlib.import_module("gaisnet_ray.knowledge.aggregate")


def sd(**tensors: list) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def assert_sd_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# --- aggregation rules --------------------------------------------------------------------------


def test_fedavg_weighted_by_samples():
    # (1*[1,2] + 3*[3,6]) / 4 = [10, 20] / 4 = [2.5, 5.0]
    out = fedavg([sd(a=[1.0, 2.0]), sd(a=[3.0, 6.0])], weights=[1, 3])
    assert_sd_equal(out, sd(a=[2.5, 5.0]))


def test_fedavg_keeps_dtype_and_does_not_mutate_inputs():
    u1 = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    u2 = {"a": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}
    before = copy.deepcopy([u1, u2])
    out = fedavg([u1, u2], weights=[1.0, 1.0])
    assert out["a"].dtype == torch.bfloat16
    assert torch.equal(out["a"], torch.tensor([2.0, 3.0], dtype=torch.bfloat16))
    assert all(torch.equal(x["a"], y["a"]) for x, y in zip([u1, u2], before))
    assert out["a"] is not u1["a"]


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], r"len\(weights\) \(1\)"), ([1.0, -1.0], ">= 0"), ([1.0, math.nan], "finite"), ([0.0, 0.0], "sum to > 0")],
)
def test_fedavg_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg([sd(a=[1.0]), sd(a=[2.0])], weights=weights)


def test_coordinate_median_odd_count():
    # per coordinate: {1,2,7} -> 2, {5,0,4} -> 4, {3,9,1} -> 3
    updates = [sd(a=[1.0, 5.0, 3.0]), sd(a=[2.0, 0.0, 9.0]), sd(a=[7.0, 4.0, 1.0])]
    assert_sd_equal(coordinate_median(updates), sd(a=[2.0, 4.0, 3.0]))


def test_coordinate_median_even_count_is_mean_of_middle_values():
    # sorted {1, 2, 4, 10}: middle values 2 and 4 -> 3 (torch.quantile semantics, not torch.median's 2)
    updates = [sd(a=[10.0]), sd(a=[1.0]), sd(a=[4.0]), sd(a=[2.0])]
    out = coordinate_median(updates)
    assert_sd_equal(out, sd(a=[3.0]))
    stacked = torch.stack([u["a"] for u in updates])
    assert torch.equal(out["a"], torch.quantile(stacked, 0.5, dim=0))


def test_trimmed_mean_quarter_of_four():
    # n=4, floor(0.25*4)=1 dropped each end: {1,2,4,100} -> mean(2,4)=3; {-50,0,1,3} -> mean(0,1)=0.5
    updates = [sd(a=[100.0, 0.0]), sd(a=[1.0, -50.0]), sd(a=[4.0, 3.0]), sd(a=[2.0, 1.0])]
    assert_sd_equal(trimmed_mean(updates, trim_ratio=0.25), sd(a=[3.0, 0.5]))


def test_trimmed_mean_zero_ratio_is_plain_mean_and_bad_ratio_rejected():
    assert_sd_equal(trimmed_mean([sd(a=[1.0]), sd(a=[2.0]), sd(a=[6.0])], 0.0), sd(a=[3.0]))
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean([sd(a=[1.0])], 0.5)


def test_clip_update_scales_delta_to_exact_norm():
    # delta = ([3,0], [4]) has norm 5; clipped to 1 -> ([0.6,0], [0.8]); result = reference + delta
    reference = sd(a=[0.0, 0.0], b=[1.0])
    update = sd(a=[3.0, 0.0], b=[5.0])
    out = clip_update(update, reference, max_norm=1.0)
    assert_sd_equal(out, sd(a=[0.6, 0.0], b=[1.8]))
    delta_norm = math.sqrt(sum(float((out[k] - reference[k]).pow(2).sum()) for k in out))
    assert delta_norm == pytest.approx(1.0, abs=1e-6)
    # within the bound: unchanged copy
    unclipped = clip_update(update, reference, max_norm=10.0)
    assert_sd_equal(unclipped, update)
    assert unclipped["a"] is not update["a"]


def test_aggregate_clips_then_averages():
    # reference 0; u1 delta norm 5 -> clipped to norm 1: [0.6, 0.8]; u2 = [0.0, 1.0] norm 1 kept.
    # fedavg weights 1,1 -> [0.3, 0.9]
    reference = sd(a=[0.0, 0.0])
    out = aggregate("fedavg", [sd(a=[3.0, 4.0]), sd(a=[0.0, 1.0])], [1, 1], reference=reference, clip_norm=1.0)
    assert_sd_equal(out, sd(a=[0.3, 0.9]))


def test_server_step_worked_by_hand():
    """reference + lr * (aggregate - reference): 1 + 3 * (2 - 1) = 4, 0 + 3 * (-1 - 0) = -3; lr 1 is the
    aggregate itself; a bad lr or mismatched keys are refused."""
    from gaisnet_ray.knowledge.aggregate import server_step

    ref = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0], dtype=torch.float16)}
    agg = {"a": torch.tensor([2.0, -1.0]), "b": torch.tensor([2.5], dtype=torch.float16)}
    out = server_step(ref, agg, 3.0)
    assert out["a"].tolist() == [4.0, -3.0] and out["b"].tolist() == [3.5] and out["b"].dtype == torch.float16
    assert server_step(ref, agg, 1.0) is agg
    with pytest.raises(ValueError, match="server_lr"):
        server_step(ref, agg, float("nan"))
    with pytest.raises(KeyMismatchError):
        server_step({"a": ref["a"]}, agg, 2.0)


def test_aggregate_dispatches_rules():
    updates = [sd(a=[1.0]), sd(a=[2.0]), sd(a=[9.0])]
    assert_sd_equal(aggregate("fedavg", updates, [1, 1, 1]), sd(a=[4.0]))
    assert_sd_equal(aggregate("median", updates, None), sd(a=[2.0]))
    # n=3, floor(0.34*3)=1 -> mean of {2} = 2
    assert_sd_equal(aggregate("trimmed_mean", updates, None, trim_ratio=0.34), sd(a=[2.0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "krum"}, "unknown aggregation rule 'krum'"),
        ({"updates": []}, "no updates"),
        ({"weights": None}, "requires weights"),
        ({"clip_norm": 1.0}, "no reference"),
        ({"sources": ["only-one"]}, r"len\(sources\)"),
    ],
)
def test_aggregate_rejects_bad_arguments(kwargs, match):
    args = {"rule": "fedavg", "updates": [sd(a=[1.0]), sd(a=[2.0])], "weights": [1, 1]} | kwargs
    rule, updates, weights = args.pop("rule"), args.pop("updates"), args.pop("weights")
    with pytest.raises(ValueError, match=match):
        aggregate(rule, updates, weights, **args)


# --- validation errors --------------------------------------------------------------------------


def test_key_mismatch_names_missing_and_extra_keys_per_source():
    updates = [sd(a=[1.0], b=[1.0]), sd(a=[1.0], b=[1.0]), sd(a=[1.0], c=[1.0])]
    with pytest.raises(KeyMismatchError, match=r"'edge-2': missing \['b'\], extra \['c'\]") as info:
        check_compatible(updates, sources=["edge-0", "edge-1", "edge-2"])
    assert info.value.mismatches == {"edge-2": (("b",), ("c",))}
    assert "edge-1" not in str(info.value)


def test_shape_mismatch_names_key_source_and_shapes():
    with pytest.raises(ShapeMismatchError, match=r"key 'a'.*'edge-1' has \(3,\).*'edge-0' has \(2,\)"):
        fedavg([sd(a=[1.0, 2.0]), sd(a=[1.0, 2.0, 3.0])], [1, 1], sources=["edge-0", "edge-1"])


def test_nonfinite_rejected_before_any_arithmetic(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("arithmetic ran before validation")

    for name in ("_fedavg", "_median", "_trimmed_mean", "_clip"):
        monkeypatch.setattr(aggregate_module, name, must_not_run)
    updates = [sd(a=[1.0], b=[0.0]), sd(a=[1.0], b=[math.nan])]
    for rule in ("fedavg", "median", "trimmed_mean"):
        with pytest.raises(NonFiniteUpdateError, match=r"key 'b' from source 'edge-1'"):
            aggregate(rule, updates, [1, 1], reference=sd(a=[0.0], b=[0.0]), clip_norm=1.0, sources=["e0", "edge-1"])
    with pytest.raises(NonFiniteUpdateError, match="key 'a'.*'reference'"):
        aggregate("fedavg", [sd(a=[1.0])], [1], reference=sd(a=[math.inf]), clip_norm=1.0)


def test_check_finite_accepts_finite_and_ignores_integer_tensors():
    check_finite({"a": torch.ones(2), "n": torch.tensor([1, 2])})
    with pytest.raises(NonFiniteUpdateError, match="key 'x' from source <unlabelled>"):
        check_finite({"x": torch.tensor([math.inf, 1.0])})


@pytest.mark.parametrize(
    "error",
    [
        KnowledgeError("plain message"),
        KeyMismatchError("edge-0", {"edge-1": (["b"], ["c"])}),
        ShapeMismatchError("w", "edge-1", (3, 2), "edge-0", (2, 2)),
        NonFiniteUpdateError("w", "edge-1", (2,), 1),
    ],
)
def test_errors_pickle_with_message_and_payload(error):
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert str(restored) == str(error)
    assert vars(restored) == vars(error)
    assert isinstance(restored, ValueError)


# --- codec ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Message:
    step: int
    session: str
    acts: torch.Tensor
    extras: list


def test_tensor_and_payload_nbytes():
    assert tensor_nbytes(torch.zeros(3, 4)) == 48  # 12 * 4 bytes
    assert tensor_nbytes(torch.zeros(10, dtype=torch.bfloat16)) == 20
    msg = _Message(step=7, session="s", acts=torch.zeros(2, 3), extras=[torch.zeros(4, dtype=torch.int64), 1.5])
    # 24 (acts) + 32 (int64 x4) + dict of 2 float16 (4) = 60; ints/strings/floats count 0
    assert payload_nbytes({"m": msg, "t": (torch.zeros(2, dtype=torch.float16), "label")}) == 60
    with pytest.raises(TypeError, match="object"):
        payload_nbytes(object())


def test_content_hash_stable_and_sensitive():
    x = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2)}
    reordered = {"a": torch.ones(2, 2), "b": torch.arange(3, dtype=torch.float32)}
    assert content_hash(x) == content_hash(reordered)
    assert content_hash({"a": torch.ones(2, 2).t()}) == content_hash({"a": torch.ones(2, 2)})  # layout-free
    # the hash depends only on (key, dtype, shape, nbytes, little-endian bytes): no id(), no pickling,
    # so it is the same in every process
    header = b"a\0torch.float32\0(2,)\08\0"
    expected = hashlib.sha256(header + struct.pack("<2f", 1, 2)).hexdigest()
    assert content_hash({"a": torch.tensor([1.0, 2.0])}) == expected
    assert content_hash({"a": torch.tensor([1.0, 2.0])}) == GOLDEN_HASH
    changed = {**x, "b": torch.tensor([0.0, 1.0, 2.5])}
    assert content_hash(changed) != content_hash(x)
    assert content_hash({**x, "b": x["b"].double()}) != content_hash(x)  # dtype matters
    assert content_hash({**x, "a": torch.ones(4)}) != content_hash(x)  # shape matters


GOLDEN_HASH = "c2fb1aba1e2cca4caeda682c71e501f98647f486cfa88511afe3d5b9b5f61251"
