"""Thin Ray actors, one file per node role; the algorithm lives in ``gaisnet_ray.hfsl``."""

from .cloud import CloudNode
from .edge import EdgeNode
from .end import EndNode, EndWorker
from .placement import TIER_RESOURCES, tier_options

__all__ = ["CloudNode", "EdgeNode", "EndNode", "EndWorker", "TIER_RESOURCES", "tier_options"]
