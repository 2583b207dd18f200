"""Differentially private aggregation of what is relayed up (DP-FedAvg, McMahan et al. 2018).

At the aggregator (the cloud, over edge updates) each update's delta from the current knowledge
is clipped to L2 norm ``clip``, the deltas are averaged with the sample weights, and Gaussian noise
of std ``z * clip * max_i w_i / sum_i w_i`` (the weighted mean's sensitivity to one update) is
added to every coordinate. The privacy unit is one relayed update (an edge's, i.e. its devices'
together). The accountant is Opacus's RDP accountant: every round is one step of the subsampled
Gaussian mechanism with ``sample_rate`` = the fraction of updaters that take part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..knowledge.aggregate import validate_updates

StateDict = dict[str, torch.Tensor]


def noise_multiplier_for(epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier z that keeps ``rounds`` rounds within (epsilon, delta)-DP."""
    from opacus.accountants.utils import get_noise_multiplier

    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1 and 0 < sample_rate <= 1):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, rounds >= 1, 0 < sample_rate <= 1; got "
                         f"epsilon={epsilon}, delta={delta}, rounds={rounds}, sample_rate={sample_rate}")
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant="rdp", epsilon_tolerance=0.005))


def epsilon_after(rounds: int, noise_multiplier: float, delta: float, sample_rate: float = 1.0) -> float:
    """The epsilon spent after ``rounds`` rounds at noise multiplier z (Opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(acc.get_epsilon(delta))


def dp_fedavg(updates: Sequence[StateDict], weights: Sequence[float], reference: StateDict, clip: float,
              noise_multiplier: float, generator: torch.Generator | None = None) -> tuple[StateDict, dict]:
    """``reference`` + noisy weighted mean of the clipped deltas; returns it and what was done
    (norms before clipping, how many were clipped, the noise std)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.dp_clip must be finite and > 0; got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"the DP noise multiplier must be >= 0; got {noise_multiplier}")
    if len(updates) != len(weights) or not updates or min(weights) <= 0:
        raise ValueError(f"need one positive weight per update; got {len(updates)} updates, weights {list(weights)}")
    validate_updates([reference, *updates], ["reference", *[f"update {i}" for i in range(len(updates))]])
    total = float(sum(weights))
    keys = [k for k in reference if reference[k].is_floating_point()]
    mean = {k: torch.zeros_like(reference[k], dtype=torch.float64) for k in keys}
    norms = []
    for u, w in zip(updates, weights):
        delta = {k: u[k].double() - reference[k].double() for k in keys}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
        norms.append(norm)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in keys:
            mean[k] += delta[k] * scale * (w / total)
    std = noise_multiplier * clip * max(weights) / total
    out = dict(reference)
    for k in keys:
        # only coordinates some update can change carry noise (LoRA A under FFA-LoRA is fixed everywhere)
        moved = any(not torch.equal(u[k], reference[k]) for u in updates)
        noise = torch.randn(mean[k].shape, generator=generator, dtype=torch.float64) * std if moved else 0.0
        out[k] = (reference[k].double() + mean[k] + noise).to(reference[k].dtype)
    return out, {"update_norms": norms, "clipped": sum(n > clip for n in norms), "noise_std": std}


class DPAggregator:
    """The cloud's DP aggregation for a run (``privacy.dp_*``): fixes the noise multiplier once,
    then aggregates each round and reports the epsilon spent so far."""

    def __init__(self, privacy, rounds: int, aggregation: str, sample_rate: float = 1.0):
        if privacy.dp_clip is None:
            raise ValueError("DPAggregator needs privacy.dp_clip")
        if aggregation != "fedavg":
            raise ValueError(f"privacy.dp_clip needs training.aggregation 'fedavg' (got '{aggregation}'): "
                             "the DP noise is calibrated to a weighted mean")
        self.clip, self.delta, self.sample_rate = privacy.dp_clip, privacy.dp_delta, sample_rate
        self.target_epsilon = privacy.dp_epsilon
        self.noise_multiplier = (privacy.dp_noise_multiplier if privacy.dp_noise_multiplier is not None
                                 else noise_multiplier_for(privacy.dp_epsilon, privacy.dp_delta, rounds, sample_rate))
        import secrets

        self._gen = torch.Generator().manual_seed(secrets.randbits(63))  # DP noise must not be predictable

    def aggregate(self, round_idx: int, updates: Sequence[StateDict], weights: Sequence[float],
                  reference: StateDict) -> tuple[StateDict, dict]:
        out, info = dp_fedavg(updates, weights, reference, self.clip, self.noise_multiplier, self._gen)
        eps = epsilon_after(round_idx, self.noise_multiplier, self.delta, self.sample_rate) \
            if self.noise_multiplier > 0 else float("inf")
        return out, {"dp_epsilon": eps, "dp_delta": self.delta, "dp_noise_multiplier": self.noise_multiplier,
                     "dp_clip": self.clip, "dp_clipped": info["clipped"], "dp_noise_std": info["noise_std"],
                     "dp_update_norms": info["update_norms"]}
