"""Where a tier actor goes: ``tier_options``, the ``.options(...)`` of one actor of a tier.

The shape itself (tier resource, CPUs, GPUs, node labels) is ``tiers.resource_shape``, the one
function the Serve deployments, local dev mode and the cluster pre-check use too. A real
cluster's nodes declare the tier resources (``ray start --resources='{"gaisnet_edge": 4}'``); local
dev mode declares them on the single node. Nothing here assumes one node.
"""

from __future__ import annotations

from ..config import TierResources
from ..tiers import TIER_RESOURCES, resource_shape

__all__ = ["TIER_RESOURCES", "tier_options"]


def tier_options(tier: str, res: TierResources, name: str | None = None) -> dict:
    """``Actor.options(...)`` for one actor of ``tier`` (``res``: ``topology.<tier>``)."""
    opts = resource_shape(tier, res).ray_options()
    if name:
        opts["name"] = name
    return opts
