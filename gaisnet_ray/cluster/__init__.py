"""Where the driver meets Ray: local dev mode today, the same calls for a multi-node cluster."""

from .local import ClusterInfo, connect, local_init_kwargs, required_resources

__all__ = ["ClusterInfo", "connect", "local_init_kwargs", "required_resources"]
