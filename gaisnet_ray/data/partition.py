"""Split example indices among devices: IID or Dirichlet label skew. NumPy only."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["partition_dirichlet", "partition_iid"]

_MAX_TRIES = 1000  # Dirichlet resamples before giving up on min_size


def _check_parts(n_parts: int) -> None:
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")


def partition_iid(n_items: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n_items)`` into ``n_parts`` near-equal parts of sorted int64 indices."""
    _check_parts(n_parts)
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    perm = np.random.default_rng(seed).permutation(n_items)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_parts)]


def _one_draw(
    by_label: list[np.ndarray], n_items: int, n_parts: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One Dirichlet assignment: each label's indices split by proportions ~ Dir(alpha)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    sizes = np.zeros(n_parts, dtype=np.int64)
    for idx in by_label:
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(n_parts, alpha))
        open_parts = sizes < n_items / n_parts  # parts already holding their share get no more
        p = p * open_parts
        # a tiny alpha can underflow every open part's share to 0: fall back to uniform
        p = p / p.sum() if p.sum() > 0 else open_parts / open_parts.sum()
        cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
        for j, chunk in enumerate(np.split(idx, cuts)):
            parts[j].append(chunk)
            sizes[j] += len(chunk)
    return parts


def _merge(chunks: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.zeros(0, np.int64)


def partition_dirichlet(
    labels: Sequence[str] | Sequence[int], n_parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: per label, proportions over parts ~ Dir(alpha).

    Small ``alpha`` gives parts dominated by few labels; large ``alpha`` approaches IID. The draw is
    repeated until every part holds at least ``min_size`` items (ValueError if that fails).
    """
    _check_parts(n_parts)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    n_items = len(labels)
    if n_items < n_parts * min_size:
        raise ValueError(
            f"cannot give each of n_parts={n_parts} parts min_size={min_size} items "
            f"from only {n_items} items"
        )
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    by_label = [np.flatnonzero(inverse == k) for k in range(int(inverse.max(initial=-1)) + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_TRIES):
        parts = _one_draw(by_label, n_items, n_parts, alpha, rng)
        sizes = [sum(len(c) for c in chunks) for chunks in parts]
        if min(sizes) >= min_size:
            return [_merge(chunks) for chunks in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n_items} items gave all {n_parts} parts "
        f">= min_size={min_size} items in {_MAX_TRIES} tries; raise alpha or lower min_size"
    )
