"""Shared fixtures. Ray starts once per session, only for tests that ask for it."""

from __future__ import annotations

import pytest

# What the session's local Ray node declares: enough tier resources for the small test topologies
# (two cloud units: a 2-worker cloud world).
RAY_TEST_RESOURCES = {"gaisnet_cloud": 2, "gaisnet_edge": 2, "gaisnet_end": 4}


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance (never joins or stops another cluster on the host)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, resources=RAY_TEST_RESOURCES, include_dashboard=False,
             namespace="gaisnet-tests", configure_logging=False)
    yield ray
    ray.shutdown()
