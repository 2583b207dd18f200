"""Where the driver meets Ray: local dev mode, or an existing multi-node cluster (same calls)."""

from .local import (
    ClusterConnectError,
    ClusterError,
    ClusterInfo,
    ClusterResourceError,
    check_address,
    check_cluster_resources,
    connect,
    joins_cluster,
    local_init_kwargs,
    required_resources,
    resolve_address,
)

__all__ = [
    "ClusterConnectError", "ClusterError", "ClusterInfo", "ClusterResourceError", "check_address",
    "check_cluster_resources",
    "connect", "joins_cluster", "local_init_kwargs", "required_resources", "resolve_address",
]
