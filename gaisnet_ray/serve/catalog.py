"""What a run folder serves right now, as the ingress sees it (no Ray): adapters, the version each
serves (the newest intact one), the versions skipped as damaged, and which edge knows which domain."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import ConfigError, load_config
from ..data.domains import BUILTIN_DOMAINS
from ..inference.served import ServedRun
from .slots import BASE, latest_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Catalog:
    """Re-read at most every poll interval."""

    adapters: list[str]  # base, global, edge-0 ...
    versions: dict[str, int | None]  # the version served per adapter: the newest intact one on disk
    skipped: dict[str, dict[int, str]]  # adapter -> {newer version that failed verification: why}
    domain_adapters: dict[str, str]  # domain -> the edge adapter that knows it best
    domains: list[str]
    read_at: float


def read_catalog(run: ServedRun) -> Catalog:
    adapters = [BASE, *run.adapter_names()]
    versions = {a: latest_of(run, a) for a in adapters}
    skipped = {a: s for a in adapters if a != BASE and (s := run.skipped_versions(a))}
    domain_adapters = run.domain_adapters()
    domains = list(BUILTIN_DOMAINS)
    cfg_path = run.layout.config
    if cfg_path.is_file():
        try:
            data = load_config(cfg_path).data
            domains = list(data.domains) if data.source == "builtin" else []
        except ConfigError as e:  # a run folder written by another version: serve it all the same
            log.warning("%s: %s; inferring the built-in domains", run.rel(cfg_path), e)
    domains += [d for d in domain_adapters if d not in domains]
    return Catalog(adapters, versions, skipped, domain_adapters, domains, time.monotonic())
