"""Device, public and eval example sets built from a ``DataConfig``."""

from __future__ import annotations

from typing import Sequence

from gaisnet_ray.config import DataConfig
from gaisnet_ray.data.domains import (
    BUILTIN_DOMAINS,
    Example,
    Split,
    UnknownDomainError,
    sample_examples,
)
from gaisnet_ray.data.jsonl import DatasetError, load_jsonl
from gaisnet_ray.data.partition import partition_dirichlet, partition_iid

__all__ = ["device_examples", "eval_examples", "public_examples"]


def _check_domains(domains: Sequence[str]) -> None:
    for d in domains:
        if d not in BUILTIN_DOMAINS:
            raise UnknownDomainError(d)
    repeated = sorted({d for d in domains if list(domains).count(d) > 1})
    if repeated:
        raise DatasetError(f"data.domains lists {repeated} more than once")


def _spread(cfg: DataConfig, split: Split, total: int, domains: Sequence[str] | None = None) -> list[Example]:
    """``total`` examples of ``split`` spread evenly over ``domains`` (leftovers go first)."""
    domains = list(cfg.domains if domains is None else domains)
    _check_domains(domains)
    k = len(domains)
    return [
        ex
        for i, d in enumerate(domains)
        for ex in sample_examples(d, split, total // k + (i < total % k), cfg.seed)
    ]


def device_examples(cfg: DataConfig, device_ids: Sequence[str]) -> dict[str, list[Example]]:
    """Private examples of each device, partitioned by ``cfg.partition``; deterministic."""
    ids = list(device_ids)
    if not ids:
        raise ValueError("device_ids must name at least one device")
    if len(set(ids)) != len(ids):
        raise ValueError(f"device_ids must be unique, got {ids}")
    if cfg.source == "builtin":
        pool = _spread(cfg, "private", len(ids) * cfg.samples_per_device)
    elif cfg.train_path:
        pool = load_jsonl(cfg.train_path)
        if len(pool) < len(ids):
            raise DatasetError(
                f"train file '{cfg.train_path}' has {len(pool)} examples for {len(ids)} devices"
            )
    else:
        raise DatasetError("data.train_path is needed when data.source is 'jsonl'")
    if cfg.partition == "iid":
        parts = partition_iid(len(pool), len(ids), cfg.seed)
    else:
        min_size = max(1, min(cfg.samples_per_device // 8, len(pool) // len(ids)))
        labels = [ex.domain for ex in pool]
        parts = partition_dirichlet(labels, len(ids), cfg.dirichlet_alpha, cfg.seed, min_size)
    return {dev: [pool[i] for i in part] for dev, part in zip(ids, parts)}


def public_examples(cfg: DataConfig) -> list[Example]:
    """Examples the cloud may see: split ``public`` of ``cfg.public_domains`` (builtin; default
    ``cfg.domains``) or ``cfg.public_path`` (jsonl)."""
    if cfg.source == "builtin":
        domains = cfg.domains if cfg.public_domains is None else cfg.public_domains
        return _spread(cfg, "public", cfg.public_samples, domains) if domains else []
    return load_jsonl(cfg.public_path) if cfg.public_path else []


def eval_examples(cfg: DataConfig) -> dict[str, list[Example]]:
    """Held-out examples grouped by domain, in ``cfg.domains`` (builtin) or file order (jsonl)."""
    if cfg.source == "builtin":
        _check_domains(cfg.domains)
        n = cfg.eval_samples_per_domain
        return {d: sample_examples(d, "eval", n, cfg.seed) for d in cfg.domains}
    if not cfg.eval_path:
        raise DatasetError("data.eval_path is needed for evaluation when data.source is 'jsonl'")
    grouped: dict[str, list[Example]] = {}
    for ex in load_jsonl(cfg.eval_path):
        grouped.setdefault(ex.domain, []).append(ex)
    return grouped
