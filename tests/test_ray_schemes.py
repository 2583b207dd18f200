"""Tier actors on a shared session Ray: placement by tier resources and the FL scheme on actors (one
driver for both), and a clear error (not a hang) when the cluster lacks what a tier asks for. The
whole job through ``run_job`` on actors: ``test_baselines.py``, ``test_ray_run.py``."""

from __future__ import annotations

import pytest

from gaisnet_ray.config import load_config

from conftest import small_job
from tinycfg import TINY_YAML

pytestmark = pytest.mark.ray

TINY = small_job("topology.edges=1", "topology.devices_per_edge=2", "topology.cluster_size=2",
                 "data.eval_samples_per_domain=8", "training.pretrain_steps=10", "training.rounds=2")


def _wait_until_tier_resources_free(ray, timeout_s: float = 60.0) -> None:
    """Actors killed by an earlier test release their resources asynchronously."""
    import time

    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources()
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) == total[k] for k in ("gaisnet_cloud", "gaisnet_edge", "gaisnet_end")):
            return
        time.sleep(0.2)
    raise AssertionError(f"tier resources still held: {ray.available_resources()}")


def test_fl_actors_are_placed_by_tier_resources_and_move_only_adapters(ray_local, tmp_path):
    import ray

    from gaisnet_ray.driver import GaisNetDriver
    from gaisnet_ray.knowledge import KnowledgeStore, payload_nbytes

    _wait_until_tier_resources_free(ray)
    cfg = load_config(TINY_YAML, TINY + ["training.scheme=fl"])
    driver = GaisNetDriver(cfg, tmp_path / "fl")
    driver.start()
    try:
        used = ray.cluster_resources()["gaisnet_end"] - ray.available_resources().get("gaisnet_end", 0)
        assert used == 2  # one per device actor
        assert ray.cluster_resources()["gaisnet_edge"] - ray.available_resources().get("gaisnet_edge", 0) == 1
        assert ray.cluster_resources()["gaisnet_cloud"] - ray.available_resources().get("gaisnet_cloud", 0) == 1
        rows = [driver.run_round(r) for r in (1, 2)]
    finally:
        driver.close()
    store = KnowledgeStore(tmp_path / "fl" / "knowledge")
    adapter_bytes = payload_nbytes(store.load(2))
    for r in rows:
        # FL: each of the 2 devices pulls the whole adapter and pushes it back, nothing else
        assert r["bytes"]["end_edge_down"] == 2 * adapter_bytes
        assert r["bytes"]["end_edge_up"] == 2 * adapter_bytes
        assert r["clusters"] == {"edge-0": [["end-0-0"], ["end-0-1"]]}
    assert store.lineage(2)["scheme"] == "fl"


def test_missing_tier_resource_fails_with_a_clear_error(ray_local, tmp_path):
    from gaisnet_ray.driver import GaisNetDriver, PlacementError

    # the session node has no GPU: a cloud asking for one can never be placed
    cfg = load_config(TINY_YAML, TINY + ["topology.cloud.num_gpus=1", "run.actor_timeout_s=5"])
    driver = GaisNetDriver(cfg, tmp_path / "unplaced")
    with pytest.raises(PlacementError, match=r"not placed after 5s: \['cloud'\]"):
        driver.start()
    driver.close()


def test_a_call_past_the_actor_timeout_names_what_it_waited_for_and_the_key(ray_local):
    """Ray's GetTimeoutError says only "some object(s) not ready"; a run that times out says what it
    waited for and which key to raise."""
    import time

    from gaisnet_ray.driver import get_within

    ref = ray_local.remote(lambda: time.sleep(30)).remote()
    try:
        with pytest.raises(TimeoutError, match=r"the cloud's evaluation before round 1 did not finish within "
                                               r"run\.actor_timeout_s=0\.5s .*--set run\.actor_timeout_s=3600"):
            get_within(ref, 0.5, "the cloud's evaluation before round 1")
    finally:
        ray_local.cancel(ref, force=True)
