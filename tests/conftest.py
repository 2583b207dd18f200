"""Shared fixtures. Ray starts once per session, only for tests that ask for it."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """The model cache for real-weight tests: ``$GAISNET_CACHE`` when set (reuses a conversion made
    before), else a temp folder for this session (one conversion, ~20 s)."""
    env = os.environ.get("GAISNET_CACHE")
    return Path(env).expanduser() if env else tmp_path_factory.mktemp("gaisnet-cache")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache) -> Path:
    """SmolLM2-135M-Instruct (the ``smollm2-135m`` preset) as a Hugging Face folder, converted once
    per session. Without the weights package this errors with the install command: never a skip."""
    from gaisnet_ray.config import ModelConfig
    from gaisnet_ray.models.sources import resolve_model_dir

    return resolve_model_dir(ModelConfig(preset="smollm2-135m"), cache_dir=smollm2_cache)
