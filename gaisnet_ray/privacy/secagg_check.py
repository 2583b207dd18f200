"""Where secure aggregation cannot work, refused before anything starts (``privacy.secure_aggregation``).

Separate from ``secround.py`` because ``precheck`` runs it before torch is imported (this module
imports only the config and the schemes, which import no torch).
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..schemes import scheme_of
from ..schemes.topology import devices_by_edge


def check_secure_aggregation(cfg: Config) -> None:
    """Refuse (``ConfigError``) a configuration where the edge could not aggregate masked updates,
    or where masking would hide nothing. No-op when ``privacy.secure_aggregation`` is off."""
    if not cfg.privacy.secure_aggregation:
        return
    scheme = scheme_of(cfg)
    why = None
    if not scheme.secure_aggregation:
        why = (f"training.scheme '{scheme.name}' cannot use it: "
               + ("a cluster's members train in turn and the edge relays each member's adapter to the next "
                  "and trains the middle adapter on their hidden states, so it must hold each adapter in "
                  "the clear (use training.scheme fl)" if scheme.splits else
                  "its edges do not average single devices' adapters (use training.scheme fl)"))
    elif cfg.training.aggregation != "fedavg":
        why = (f"training.aggregation '{cfg.training.aggregation}' needs each update in the clear "
               "(a median or trimmed mean cannot run on masked inputs); use fedavg")
    elif cfg.training.clip_norm is not None:
        why = "training.clip_norm clips each update at the edge, which sees only masked ones; unset it"
    else:
        small = sorted(e for e, ds in devices_by_edge(cfg.topology).items() if len(ds) < 2)
        per_round = cfg.training.participants_per_edge
        if small:
            why = f"edges {small} serve fewer than 2 devices: the sum of one adapter is that adapter"
        elif per_round is not None and per_round < 2:
            why = "training.participants_per_edge < 2: the sum of one adapter is that adapter"
    if why:
        raise ConfigError(f"privacy.secure_aggregation: {why}")
