"""Start-up: what the driver imports, the block count it reads from config, and the vs-Flower
benchmark's own arithmetic. Ray-free (no cluster is started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tinycfg import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_driver_and_the_actor_classes_loads_no_torch():
    """The driver places actors and wires refs; torch, transformers, peft and matplotlib are loaded
    by the actors that use them (and by the driver only where a step needs them), not at import."""
    code = ("import sys, gaisnet_ray.run_command, gaisnet_ray.driver, gaisnet_ray.actors; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_the_block_count_from_config_is_the_built_foundations():
    from gaisnet_ray.driver import _config_num_layers
    from gaisnet_ray.models.build import FoundationPackage, build_foundation

    cfg = tiny_config()
    model, tokenizer = build_foundation(cfg.model)
    assert _config_num_layers(cfg) == FoundationPackage.from_model(model, tokenizer).num_layers == 4


def test_an_unreadable_model_source_leaves_the_block_count_to_the_cloud():
    from gaisnet_ray.driver import _config_num_layers

    cfg = tiny_config("model.path=/nonexistent/model")
    assert _config_num_layers(cfg) is None


def test_deferred_values_are_fetched_and_plain_values_pass_through():
    import ray

    from gaisnet_ray.actors.audited import deferred, fetch_deferred

    assert fetch_deferred({"a": 1}) == {"a": 1}
    assert fetch_deferred([1]) == [1]  # a plain one-element list is not a deferred ref
    ref = ray.ObjectRef.nil()
    assert deferred(ref) == [ref]


def test_vs_flower_loss_match_and_summary():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_flower import loss_match, summarize

    def run(side, wall, loss):
        return {"side": side, "wall_s": wall, "round1_start_s": wall / 2, "round1_end_s": wall / 2 + 1,
                "round_s": [3.0, 1.0, 2.0, 4.0], "peak_rss_mb": 100.0, "peak_pss_mb": 80.0, "max_processes": 5,
                "final_loss": {"a": loss, "b": 2.0}}

    runs = [run("gaisnet-ray fl", 10.0, 1.00001), run("Flower", 12.0, 1.0), run("gaisnet-ray fl", 14.0, 1.00001)]
    m = loss_match(runs, 1e-4)
    assert m["match"] and abs(m["max_abs_diff"]["a"] - 1e-5) < 1e-9 and m["max_abs_diff"]["b"] == 0
    assert not loss_match(runs, 1e-6)["match"]
    s = summarize(runs)
    assert s["gaisnet-ray fl"]["wall_median_s"] == 12.0 and s["gaisnet-ray fl"]["wall_min_s"] == 10.0
    assert s["gaisnet-ray fl"]["steady_round_s"] == 2.0  # median of rounds 2..N over both runs: 1, 2, 4, 1, 2, 4
