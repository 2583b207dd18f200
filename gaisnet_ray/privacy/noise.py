"""What a device does to the hidden states it sends its edge: clip each row, add Gaussian noise
(``privacy.activation_clip`` / ``privacy.activation_noise``), and the NoPeek penalty
(``privacy.nopeek_weight``) that trains the front to decorrelate its output from its input.

Everything here stays inside the autograd graph, so the front adapter trains through the clip and
the noise exactly as it would through the plain hidden state.
"""

from __future__ import annotations

import math

import torch


def clip_rows(hidden: torch.Tensor, max_norm: float) -> torch.Tensor:
    """(..., H) -> (..., H): every row (one token's hidden state) scaled to L2 norm <= ``max_norm``."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"privacy.activation_clip must be finite and > 0; got {max_norm}")
    norms = hidden.norm(dim=-1, keepdim=True)  # (..., 1)
    return hidden * torch.clamp(max_norm / (norms + 1e-12), max=1.0)


def noise_std(max_norm: float, noise: float, hidden_size: int) -> float:
    """Per-coordinate std: ``noise`` is the noise-to-signal ratio of a row clipped to ``max_norm``
    (the noise vector's expected L2 norm is ``noise * max_norm``)."""
    return noise * max_norm / math.sqrt(hidden_size)


def privatize_hidden(hidden: torch.Tensor, max_norm: float | None, noise: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, H) hidden state -> what crosses the end-edge link: rows clipped to ``max_norm``
    (None: not clipped), plus N(0, std^2) per coordinate with ``std = noise_std(...)``."""
    if noise < 0:
        raise ValueError(f"privacy.activation_noise must be >= 0; got {noise}")
    if noise > 0 and max_norm is None:
        raise ValueError("privacy.activation_noise needs privacy.activation_clip (the noise is relative to it)")
    out = hidden if max_norm is None else clip_rows(hidden, max_norm)
    if noise > 0:
        std = noise_std(max_norm, noise, hidden.shape[-1])
        eps = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype).to(hidden.device)
        out = out + std * eps
    return out


# ----------------------------------------------------------------------------------- NoPeek
def _centered_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) doubly centred Euclidean distance matrix."""
    d = torch.cdist(x, x)  # (N, N)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) between the rows of ``x`` (N, D1) and
    ``z`` (N, D2): 0 for independent rows, 1 for rows that determine each other up to a similarity.
    Differentiable in both; NoPeek (Vepakomma et al. 2020) minimises it w.r.t. the front."""
    if x.shape[0] != z.shape[0] or x.shape[0] < 2:
        raise ValueError(f"distance correlation needs the same number (>= 2) of rows; got {x.shape[0]} and {z.shape[0]}")
    a, b = _centered_distances(x.double()), _centered_distances(z.double())
    dcov_xz = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    return (dcov_xz.clamp(min=0) / dvar.clamp(min=1e-24).sqrt()).sqrt().to(z.dtype)


def nopeek_penalty(inputs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   max_rows: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distance correlation between each token's input embedding and its hidden state.

    ``inputs`` (B, T, E) (the token embeddings, no gradient needed), ``hidden`` (B, T, H);
    ``mask`` (B, T) bool selects the rows that count (real tokens, not padding); at most ``max_rows``
    rows are drawn (the N x N distance matrices grow quadratically).
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    z = hidden.reshape(-1, hidden.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1)
        x, z = x[keep], z[keep]
    if x.shape[0] > max_rows:
        idx = torch.randperm(x.shape[0], generator=generator)[:max_rows].to(x.device)
        x, z = x[idx], z[idx]
    return distance_correlation(x.detach(), z)
