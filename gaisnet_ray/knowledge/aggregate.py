"""Aggregation of knowledge updates (PEFT adapter state dicts).

Pure functions: inputs are never mutated and results are new tensors. Arithmetic
runs in float64 and each result tensor is cast back to the dtype (and device)
of the first update's tensor for that key.

Each rule validates its inputs (same keys, same shapes, all finite) before any
arithmetic. Robust rules (``coordinate_median``, ``trimmed_mean``) are
unweighted by design.

The rules are also classes behind one interface (``AggregationRule``: ``FedAvg``,
``Median``, ``TrimmedMean``), with ``ClipNorm`` as the optional step before any
of them; an ``Aggregator`` is a rule plus that step, and ``aggregator_of`` is
the one place the config (``training.aggregation`` / ``trim_ratio`` /
``clip_norm``) picks them. Adding a rule: a class here and a line in ``_RULES``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

import torch

from gaisnet_ray.knowledge.errors import KeyMismatchError, NonFiniteUpdateError, ShapeMismatchError

if TYPE_CHECKING:
    from gaisnet_ray.config import TrainingConfig

StateDict = dict[str, torch.Tensor]
Rule = Literal["fedavg", "median", "trimmed_mean"]
RULES: tuple[str, ...] = get_args(Rule)


# --- validation ---------------------------------------------------------------------------------


def check_finite(update: StateDict, source: str | None = None) -> None:
    """Raise NonFiniteUpdateError naming the first key (sorted) that holds NaN/Inf."""
    for key in sorted(update):
        t = update[key]
        if not (t.is_floating_point() or t.is_complex()):
            continue  # integer/bool tensors are always finite
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise NonFiniteUpdateError(key, source, tuple(t.shape), int((~finite).sum()))


def _labels(n: int, sources: Sequence[str] | None) -> list[str]:
    if sources is None:
        return [f"update[{i}]" for i in range(n)]
    if len(sources) != n:
        raise ValueError(f"len(sources) ({len(sources)}) must equal the number of updates ({n})")
    return [str(s) for s in sources]


def check_compatible(updates: Sequence[StateDict], sources: Sequence[str] | None = None) -> None:
    """All updates must have the first update's key set and per-key shapes.

    Raises KeyMismatchError listing missing/extra keys for every offending
    source, or ShapeMismatchError for the first (source, key) with a wrong shape.
    """
    if len(updates) == 0:
        raise ValueError("no updates given")
    labels = _labels(len(updates), sources)
    ref, ref_label = updates[0], labels[0]
    ref_keys = set(ref)
    mismatches = {}
    for update, label in zip(updates[1:], labels[1:]):
        keys = set(update)
        if keys != ref_keys:
            mismatches[label] = (sorted(ref_keys - keys), sorted(keys - ref_keys))
    if mismatches:
        raise KeyMismatchError(ref_label, mismatches)
    for update, label in zip(updates[1:], labels[1:]):
        for key in sorted(ref_keys):
            if update[key].shape != ref[key].shape:
                raise ShapeMismatchError(key, label, tuple(update[key].shape), ref_label, tuple(ref[key].shape))


def validate_updates(updates: Sequence[StateDict], sources: Sequence[str] | None = None) -> None:
    """check_compatible plus check_finite on every update; no arithmetic happens here."""
    check_compatible(updates, sources)
    for update, label in zip(updates, _labels(len(updates), sources)):
        check_finite(update, label)


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"len(weights) ({len(w)}) must equal the number of updates ({n})")
    bad = [(i, x) for i, x in enumerate(w) if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"weights must be finite and >= 0; got {bad} as (index, weight)")
    if sum(w) <= 0:
        raise ValueError(f"weights must sum to > 0; got {w}")
    return w


def _stack(updates: Sequence[StateDict], key: str) -> torch.Tensor:
    first = updates[0][key]
    return torch.stack([u[key].to(device=first.device, dtype=torch.float64) for u in updates])  # (n, *shape)


def _cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=like.dtype, device=like.device)


# --- rules (unchecked cores, then validated public functions) -----------------------------------


def _fedavg(updates: Sequence[StateDict], w: list[float]) -> StateDict:
    total = sum(w)
    out: StateDict = {}
    for key, first in updates[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for wi, update in zip(w, updates):
            acc += wi * update[key].to(device=first.device, dtype=torch.float64)
        out[key] = _cast_like(acc / total, first)
    return out


def _median(updates: Sequence[StateDict]) -> StateDict:
    n = len(updates)
    out: StateDict = {}
    for key, first in updates[0].items():
        s = _stack(updates, key).sort(dim=0).values  # (n, *shape)
        mid = s[n // 2] if n % 2 == 1 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[key] = _cast_like(mid, first)
    return out


def _trimmed_mean(updates: Sequence[StateDict], trim_ratio: float) -> StateDict:
    n = len(updates)
    k = math.floor(trim_ratio * n)  # dropped at each end; n - 2k >= 1 since trim_ratio < 0.5
    out: StateDict = {}
    for key, first in updates[0].items():
        s = _stack(updates, key).sort(dim=0).values  # (n, *shape)
        out[key] = _cast_like(s[k : n - k].mean(dim=0), first)
    return out


def _check_trim_ratio(trim_ratio: float) -> None:
    if not (math.isfinite(trim_ratio) and 0 <= trim_ratio < 0.5):
        raise ValueError(f"trim_ratio must satisfy 0 <= trim_ratio < 0.5; got {trim_ratio}")


def fedavg(updates: Sequence[StateDict], weights: Sequence[float], sources: Sequence[str] | None = None) -> StateDict:
    """Sample-weighted average: sum(w_i * x_i) / sum(w_i), per key."""
    validate_updates(updates, sources)
    return _fedavg(updates, _check_weights(weights, len(updates)))


def coordinate_median(updates: Sequence[StateDict], sources: Sequence[str] | None = None) -> StateDict:
    """Element-wise median. For an even count it is the mean of the two middle
    values, i.e. ``torch.quantile(x, 0.5, dim=0)`` (linear interpolation)
    semantics, not ``torch.median`` (which returns the lower middle value)."""
    validate_updates(updates, sources)
    return _median(updates)


def trimmed_mean(
    updates: Sequence[StateDict], trim_ratio: float, sources: Sequence[str] | None = None
) -> StateDict:
    """Element-wise: drop the floor(trim_ratio * n) smallest and largest values, mean the rest."""
    _check_trim_ratio(trim_ratio)
    validate_updates(updates, sources)
    return _trimmed_mean(updates, trim_ratio)


def _clip(update: StateDict, reference: StateDict, max_norm: float) -> StateDict:
    deltas = {
        k: update[k].to(torch.float64) - reference[k].to(device=update[k].device, dtype=torch.float64)
        for k in update
    }
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))  # joint L2 over all tensors
    if norm <= max_norm:
        return {k: v.clone() for k, v in update.items()}
    scale = max_norm / norm
    return {
        k: _cast_like(reference[k].to(device=update[k].device, dtype=torch.float64) + d * scale, update[k])
        for k, d in deltas.items()
    }


def _check_max_norm(max_norm: float) -> None:
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"clip max_norm must be finite and > 0; got {max_norm}")


def clip_update(
    update: StateDict, reference: StateDict, max_norm: float, source: str | None = None
) -> StateDict:
    """Bound the joint L2 norm of ``update - reference`` (over all tensors) by ``max_norm``.

    Returns ``reference + delta * min(1, max_norm / ||delta||)``; when no
    scaling is needed the result is a copy of ``update``.
    """
    _check_max_norm(max_norm)
    validate_updates([reference, update], ["reference", source if source is not None else "update"])
    return _clip(update, reference, max_norm)


# --- rules as classes: one interface, chosen from the config in one place -----------------------


class AggregationRule(ABC):
    """How validated updates (same keys and shapes, all finite) become one state dict."""

    name: ClassVar[str]  # the ``training.aggregation`` value
    weighted: ClassVar[bool] = False  # uses the per-update weights (sample counts)

    @classmethod
    def from_params(cls, *, trim_ratio: float) -> AggregationRule:
        """The rule with its parameters from the config (each rule takes the ones it has)."""
        return cls()

    def check(self) -> None:
        """Raise ValueError for a bad parameter; called before any update is looked at."""

    @abstractmethod
    def combine(self, updates: Sequence[StateDict], weights: list[float]) -> StateDict:
        """The arithmetic, on updates already validated; ``weights`` checked (all 1.0 if none)."""


@dataclass(frozen=True)
class FedAvg(AggregationRule):
    """Sample-weighted average: sum(w_i * x_i) / sum(w_i), per key."""

    name: ClassVar[str] = "fedavg"
    weighted: ClassVar[bool] = True

    def combine(self, updates: Sequence[StateDict], weights: list[float]) -> StateDict:
        return _fedavg(updates, weights)


@dataclass(frozen=True)
class Median(AggregationRule):
    """Element-wise median (mean of the two middle values for an even count); unweighted."""

    name: ClassVar[str] = "median"

    def combine(self, updates: Sequence[StateDict], weights: list[float]) -> StateDict:
        return _median(updates)


@dataclass(frozen=True)
class TrimmedMean(AggregationRule):
    """Element-wise mean after dropping floor(trim_ratio * n) values at each end; unweighted."""

    trim_ratio: float = 0.1
    name: ClassVar[str] = "trimmed_mean"

    @classmethod
    def from_params(cls, *, trim_ratio: float) -> AggregationRule:
        return cls(trim_ratio)

    def check(self) -> None:
        _check_trim_ratio(self.trim_ratio)

    def combine(self, updates: Sequence[StateDict], weights: list[float]) -> StateDict:
        return _trimmed_mean(updates, self.trim_ratio)


_RULES: dict[str, type[AggregationRule]] = {r.name: r for r in (FedAvg, Median, TrimmedMean)}


@dataclass(frozen=True)
class ClipNorm:
    """Before the rule: bound each update's joint L2 distance from the reference (the knowledge
    the round started from) by ``max_norm`` (``training.clip_norm``)."""

    max_norm: float

    def check(self) -> None:
        _check_max_norm(self.max_norm)

    def __call__(self, update: StateDict, reference: StateDict) -> StateDict:
        return _clip(update, reference, self.max_norm)


@dataclass(frozen=True)
class Aggregator:
    """A rule, with clipping against the reference first when ``clip`` is set. Every check (count,
    weights, parameters, keys, shapes, finiteness) happens before any arithmetic."""

    rule: AggregationRule
    clip: ClipNorm | None = None

    def __call__(self, updates: Sequence[StateDict], weights: Sequence[float] | None, *,
                 reference: StateDict | None = None, sources: Sequence[str] | None = None) -> StateDict:
        if len(updates) == 0:
            raise ValueError("no updates to aggregate")
        if self.rule.weighted and weights is None:
            raise ValueError(f"rule '{self.rule.name}' requires weights (e.g. per-update sample counts)")
        # Unweighted rules ignore w (length-checked when given).
        w = _check_weights(weights, len(updates)) if weights is not None else [1.0] * len(updates)
        self.rule.check()
        if self.clip is not None:
            self.clip.check()
            if reference is None:
                raise ValueError("clip_norm is set but no reference state dict was given")
        labels = _labels(len(updates), sources)

        validate_updates(updates, labels)
        if reference is not None:
            check_compatible([updates[0], reference], [labels[0], "reference"])
            check_finite(reference, "reference")
            if self.clip is not None:
                updates = [self.clip(u, reference) for u in updates]
        return self.rule.combine(updates, w)


def server_step(reference: StateDict, aggregate: StateDict, lr: float) -> StateDict:
    """FedOpt's global step with plain SGD (Reddi et al. 2021, "Adaptive Federated Optimization"):
    ``reference + lr * (aggregate - reference)`` per key, in float64, cast back to the aggregate's
    dtype. ``lr`` 1 returns ``aggregate`` itself. The pseudo-gradient is ``reference - aggregate``;
    with LoRA B only (``peft.freeze_a``) it is the exact average weight update, so ``lr`` > 1 moves
    the knowledge further along the average of the edges' updates."""
    if lr == 1.0:
        return aggregate
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be a finite positive number, got {lr!r}")
    check_compatible([aggregate, reference], ["aggregate", "reference"])
    return {k: (reference[k].double() + lr * (v.double() - reference[k].double())).to(v.dtype)
            for k, v in aggregate.items()}


def rule_named(name: str, *, trim_ratio: float = 0.1) -> AggregationRule:
    rule = _RULES.get(name)
    if rule is None:
        raise ValueError(f"unknown aggregation rule {name!r}; expected one of {RULES}")
    return rule.from_params(trim_ratio=trim_ratio)


def aggregator_of(training: TrainingConfig) -> Aggregator:
    """The aggregation ``training`` configures (``aggregation``, ``trim_ratio``, ``clip_norm``),
    used by the edges over their clusters and by the cloud over the edges."""
    return Aggregator(rule_named(training.aggregation, trim_ratio=training.trim_ratio),
                      None if training.clip_norm is None else ClipNorm(training.clip_norm))


def aggregate(
    rule: Rule,
    updates: Sequence[StateDict],
    weights: Sequence[float] | None,
    *,
    reference: StateDict | None = None,
    trim_ratio: float = 0.1,
    clip_norm: float | None = None,
    sources: Sequence[str] | None = None,
) -> StateDict:
    """Validate every update, optionally clip each against ``reference``, then apply ``rule``
    (the rule's name; ``Aggregator`` is the same with the rule chosen once).

    ``weights`` are required for "fedavg" and ignored (but length-checked when
    given) by the unweighted robust rules "median" and "trimmed_mean".
    """
    chosen = Aggregator(rule_named(rule, trim_ratio=trim_ratio), None if clip_norm is None else ClipNorm(clip_norm))
    return chosen(updates, weights, reference=reference, sources=sources)
