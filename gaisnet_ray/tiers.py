"""The custom Ray resource each tier's actors and Serve deployments ask for; nodes declare them.

Its own module (no imports) so that both the config tree and its sections (``serve.settings``)
can use it without importing each other.
"""

TIER_RESOURCES = {"cloud": "gaisnet_cloud", "edge": "gaisnet_edge", "end": "gaisnet_end"}
