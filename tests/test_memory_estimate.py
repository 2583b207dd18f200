"""The memory estimate a run is checked against before Ray starts: the weights each tier holds, the
refusal (exit 2, with the numbers) of a job that cannot fit, the real model's estimate, a cluster's
nodes per tier, the cloud's evaluation batch; and one Ray test: the driver sends each tier its part
and the round metrics carry each actor kind's peak RSS."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from gaisnet_ray.config import PeftConfig
from gaisnet_ray.models.adapters import attach_lora, trainable_parameters
from gaisnet_ray.models.cuts import Cut, ModelPart
from tinycfg import tiny_config, tiny_package, write_tiny_yaml

torch.set_num_threads(1)

FAMILIES = ["gpt2", "llama"]
PEFT = PeftConfig(r=4, alpha=8.0)
CUT = Cut(1, 3)  # 4 blocks: device holds 0 and 3, the edge 1 and 2


def test_estimate_counts_the_weights_each_tier_holds():
    from gaisnet_ray.hfsl.memory import ModelGeometry, estimate_job

    for family in FAMILIES:
        package = tiny_package(family)
        g = ModelGeometry.from_config(package.config)
        for part in (ModelPart.whole(), CUT.device_part(4), ModelPart.of({1, 2}, False, False)):
            assert g.part_bytes(part) == package.cut(part).nbytes(), (family, part)
        peft = attach_lora(package.materialize(), PEFT, family)
        assert g.lora_params_per_block(PEFT.r, None) * 4 == sum(p.numel() for p in trainable_parameters(peft))
    est = estimate_job(tiny_config(), tiny_package("gpt2").config).by_kind()
    assert (est["cloud"].count, est["edge"].count, est["end"].count) == (1, 2, 6)


def _fake(total_gb: float, in_use_gb: float = 0.0):
    from gaisnet_ray.hfsl.memory import MemoryCapacity

    return MemoryCapacity(int(total_gb * 1e9), int(in_use_gb * 1e9), 0.95)


def test_estimate_refuses_a_job_that_cannot_fit_with_the_numbers():
    from gaisnet_ray.hfsl.memory import InsufficientMemoryError, check_fits

    cfg = tiny_config("topology.devices_per_edge=40")  # 80 end devices, each a whole Python + torch process
    config = tiny_package("gpt2").config
    est = check_fits(cfg, _fake(256), config)  # fits a big machine
    assert est.by_kind()["end"].count == 80
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(cfg, _fake(24, in_use_gb=2), config)
    msg = str(err.value)
    assert f"needs about {est.total_bytes / 1e9:.1f} GB" in msg
    assert "lets it use 20.8 GB (total 24.0 GB x Ray's memory monitor threshold 0.95, minus 2.0 GB in use" in msg
    assert "end   x80" in msg and "cloud x1" in msg and "edge  x2" in msg
    assert pickle.loads(pickle.dumps(err.value)).message == msg


def test_estimate_of_the_real_model_grows_with_what_each_tier_runs():
    """SmolLM2-135M's geometry (config only, no weights): the device holds embeddings + 2 blocks,
    the edge 28 blocks; activations grow with the batch; pre-training adds AdamW for the cloud."""
    from gaisnet_ray.hfsl.memory import GB, estimate_job

    smollm2 = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
               "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
               "tie_word_embeddings": True}
    base = tiny_config("training.pretrain_steps=0", "training.batch_size=8")
    est = estimate_job(base, smollm2).by_kind()
    assert est["end"].breakdown["weights"] == pytest.approx(0.1416 * GB, rel=0.01)  # 28.3M embed + 2 blocks
    assert est["edge"].breakdown["weights"] == pytest.approx(0.3965 * GB, rel=0.01)
    assert est["cloud"].breakdown["weights"] == pytest.approx(0.538 * GB, rel=0.01)
    bigger = estimate_job(base.model_copy(update={"training": base.training.model_copy(update={"batch_size": 16})}),
                          smollm2).by_kind()
    assert bigger["edge"].breakdown["activations"] == pytest.approx(2 * est["edge"].breakdown["activations"])
    pre = estimate_job(tiny_config("training.batch_size=8"), smollm2).by_kind()
    assert pre["cloud"].peak_bytes > est["cloud"].peak_bytes + 3 * 0.538 * GB


def test_cluster_memory_check_places_each_actor_on_a_node_of_its_tier():
    from gaisnet_ray.cluster.preflight import memory_problems
    from gaisnet_ray.hfsl.memory import estimate_job

    est = estimate_job(tiny_config(), tiny_package("gpt2").config, local=False)

    def node(tier: str, units: int, gb: float) -> dict:
        return {"Alive": True, "Resources": {f"gaisnet_{tier}": units, "CPU": 4, "memory": gb * 1e9 * 0.7,
                                             "object_store_memory": gb * 1e9 * 0.3}}

    roomy = [node("cloud", 1, 8), node("edge", 2, 8), node("end", 6, 8)]
    assert memory_problems(est, roomy) == []
    cramped = [node("cloud", 1, 8), node("edge", 2, 8), node("end", 6, 2)]
    problems = memory_problems(est, cramped)
    fit = int(2e9 * 0.95 // est.by_kind()["end"].peak_bytes)  # end actors that fit the 2 GB node
    assert 0 < fit < 6
    assert len(problems) == 1 and problems[0].startswith(f"end actor {fit + 1} of 6 needs about 0.")
    assert "the most memory left on a node declaring gaisnet_end is" in problems[0]


def test_cli_refuses_a_run_that_cannot_fit_with_exit_code_2(tmp_path):
    """Thousands of end devices, each its own Python + torch process: refused before Ray starts."""
    cfg = write_tiny_yaml(tmp_path / "huge.yaml", {"topology": {"edges": 64, "devices_per_edge": 512}})
    proc = subprocess.run([sys.executable, "-m", "gaisnet_ray", "run", str(cfg), "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "this run does not fit this machine's memory: the run needs about" in proc.stderr
    assert "end   x32768" in proc.stderr and "GB each" in proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- on Ray, briefly
@pytest.mark.ray
def test_ray_tiers_receive_their_parts_and_rounds_report_peak_rss(ray_local, tmp_path):
    import ray

    from gaisnet_ray.driver import GaisNetDriver

    cfg = tiny_config("training.pretrain_steps=0", "training.rounds=1", "training.local_steps=1",
                      "topology.devices_per_edge=1", "topology.cluster_size=1", "data.samples_per_device=16",
                      "data.eval_samples_per_domain=4", "data.public_samples=16", "run.actor_timeout_s=300")
    driver = GaisNetDriver(cfg, tmp_path / "run")
    try:
        driver.start()
        assert set(map(str, {p for ps in driver.node_parts.values() for p in ps})) == {
            "blocks 0, 3 + embeddings + final norm and head", "blocks 1-2"}

        def held(self):
            core = self.core
            return sorted(core.split.held_layers()), sum(p.numel() for p in core.split.peft.parameters())

        dev = ray.get(driver.devices["end-0-0"].__ray_call__.remote(held))
        edge = ray.get(driver.edges["edge-0"].__ray_call__.remote(held))
        assert dev[0] == [0, 3] and edge[0] == [1, 2]
        m = driver.run_round(1)
        rss = m["peak_rss_mb"]
        assert {k: rss[k]["actors"] for k in ("cloud", "edge", "end")} == {"cloud": 1, "edge": 2, "end": 2}
        assert all(100 < rss[k]["max"] <= rss[k]["sum"] for k in ("cloud", "edge", "end"))
        assert rss["all_actors"] == pytest.approx(sum(rss[k]["sum"] for k in ("cloud", "edge", "end")), abs=0.2)
        assert m["relay"]["bytes_down"]["end_edge_down"] > 0
    finally:
        driver.close()


def test_the_estimate_assumes_the_evaluation_batch_the_cloud_uses():
    from gaisnet_ray.hfsl import evaluate, memory

    assert memory.EVAL_BATCH == evaluate.LOSS_BATCH
