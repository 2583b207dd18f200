"""Shared fixtures and helpers. Ray starts once per session, only for tests that ask for it.

Helpers that test modules import (``from conftest import free_port, small_job``): the one way to
find free loopback ports, and the small job most Ray and serving tests run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# What the session's local Ray node declares: enough tier resources for the small test topologies
# (two cloud units: a 2-worker cloud world).
RAY_TEST_RESOURCES = {"gaisnet_cloud": 2, "gaisnet_edge": 2, "gaisnet_end": 4}

# The small job on the tiny model (``tinycfg.tiny_config`` takes these as ``--set`` overrides): 2 edges
# with one device each, 32 private samples per device, no pre-training, one round of 2 local steps.
SMALL_JOB = (
    "topology.edges=2", "topology.devices_per_edge=1", "topology.cluster_size=1",
    "data.samples_per_device=32", "data.eval_samples_per_domain=4", "data.public_samples=64",
    "training.pretrain_steps=0", "training.local_steps=2", "training.batch_size=8", "training.rounds=1",
    "run.progress=false",
)


# The HFSL mechanics job (test_hfsl.py, test_hfsl_nodes.py), byte sizes worked out by hand from it.
# Tiny run: 2 edges x 2 devices, 16 private samples each, batch 8 (so B = 8), 4 local steps,
# T = max_seq_len = 48, H = 64 (gpt2 tiny), LoRA r = 8 on 4 blocks, cut front 1 / back 1.
HFSL_JOB = [
    "training.pretrain_steps=0", "topology.edges=2", "topology.devices_per_edge=2",
    "data.samples_per_device=16", "data.partition=iid", "data.eval_samples_per_domain=4",
    "data.domains=[arithmetic, strings]", "data.public_domains=[arithmetic]", "training.batch_size=8",
    "training.local_steps=4", "training.rounds=3", "training.lr=0.003",
    "relay.policy=none",  # the HFSL mechanics on one fixed base; tests/test_relay.py covers the relay
]
B, T, H, STEPS = 8, 48, 64, 4
ACT = B * T * H * 4  # one float32 (B, T, H) activation or gradient: 98304 bytes
# LoRA params per gpt2 block with r=8, H=64, MLP 192 (A is (8, in), B is (out, 8)):
#   c_attn 8*64 + 192*8 = 2048; attn.c_proj 8*64 + 64*8 = 1024; c_fc 8*64 + 192*8 = 2048;
#   mlp.c_proj 8*192 + 64*8 = 2048  ->  7168 params = 28672 bytes.
BLOCK_ADAPTER = 7168 * 4
FULL_ADAPTER = 4 * BLOCK_ADAPTER  # 114688 bytes: what an edge relays, what an FL device trains
DEVICE_ADAPTER = 2 * BLOCK_ADAPTER  # 57344 bytes: blocks 0 and 3 under the default cut


def small_job(*changes: str) -> list[str]:
    """``SMALL_JOB`` with ``key=value`` changes: a key it already sets takes the new value in place,
    a new key is added at the end (one entry per key, so it also reads as ``--set`` flags)."""
    out = {item.split("=", 1)[0]: item for item in SMALL_JOB}
    for item in changes:
        out[item.split("=", 1)[0]] = item
    return list(out.values())


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on now (all bound at once, so the
    kernel hands out different ones, then released for the caller to use)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free TCP port on 127.0.0.1 (``free_ports(1)``)."""
    return free_ports(1)[0]


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
