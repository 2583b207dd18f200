"""Device, public and eval example sets built from a ``DataConfig``."""

from __future__ import annotations

from typing import Sequence

from gaisnet_ray.config import DataConfig
from gaisnet_ray.data.domains import Example, Split, get_domain, sample_examples
from gaisnet_ray.data.jsonl import DatasetError, load_jsonl
from gaisnet_ray.data.partition import partition_dirichlet, partition_iid

__all__ = ["device_examples", "eval_examples", "public_examples"]


def _check_domains(domains: Sequence[str]) -> None:
    for d in domains:
        get_domain(d)  # UnknownDomainError naming the known ones
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
    """Private examples of each device, partitioned by ``cfg.partition``; deterministic.

    Dirichlet labels are the domains, so record and skill domains mix freely and each domain
    lands mostly on a few devices. Every fact of a record domain is on some device as soon as
    that domain's share of the pool (``len(device_ids) * samples_per_device // len(domains)``)
    reaches its number of facts (16 by default): its private rows ask every fact first.
    """
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
    """Examples the cloud may see: split ``public`` of ``cfg.public_domains`` (builtin) or
    ``cfg.public_path`` (jsonl).

    ``public_domains`` None means those of ``cfg.domains`` that have a public split: record
    domains (device-private facts) are skipped. Naming a record domain in ``public_domains``
    explicitly is a DatasetError.
    """
    if cfg.source != "builtin":
        return load_jsonl(cfg.public_path) if cfg.public_path else []
    if cfg.public_domains is None:
        _check_domains(cfg.domains)
        domains = [d for d in cfg.domains if "public" in get_domain(d).splits]
    else:
        _check_domains(cfg.public_domains)
        private_only = [d for d in cfg.public_domains if "public" not in get_domain(d).splits]
        if private_only:
            raise DatasetError(
                f"data.public_domains lists {private_only}, whose records are device-private and "
                "have no public split; remove them from data.public_domains"
            )
        domains = list(cfg.public_domains)
    return _spread(cfg, "public", cfg.public_samples, domains) if domains else []


def eval_examples(cfg: DataConfig) -> dict[str, list[Example]]:
    """Held-out examples grouped by domain: the devices' ``cfg.domains``, then the cloud's public
    domains they do not already name (what the knowledge should not make worse), or file order (jsonl).

    Builtin: ``cfg.eval_samples_per_domain`` each, except record domains and ``capitals``, which
    ask each held-out prompt once (at most their number of facts / eval rows).
    """
    if cfg.source == "builtin":
        public = [d for d in (cfg.public_domains or []) if d not in cfg.domains]
        domains = [*cfg.domains, *public]
        _check_domains(domains)
        n = cfg.eval_samples_per_domain
        return {d: sample_examples(d, "eval", n, cfg.seed) for d in domains}
    if not cfg.eval_path:
        raise DatasetError("data.eval_path is needed for evaluation when data.source is 'jsonl'")
    grouped: dict[str, list[Example]] = {}
    for ex in load_jsonl(cfg.eval_path):
        grouped.setdefault(ex.domain, []).append(ex)
    return grouped
