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


def _loaded_after(code: str) -> list[str]:
    """The model libraries a fresh interpreter has loaded after running ``code`` (``transformers``
    counts once its model code is in, not for its light ``utils``)."""
    probe = (code + "\nimport sys\nprint(sorted(m for m in ('torch', 'transformers.modeling_utils', 'peft', "
             "'deepspeed', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_the_driver_checks_plans_and_sizes_a_preset_run_without_torch():
    """Everything `gaisnet run` does before and while placing the actors of the tiny job (model and cut
    checks, the memory check, the plan, each device's data count, Ray's init arguments, each node's
    part) loads no model library in the driver: that is ~300 MB and ~3 s of CPU it does not spend.
    A split scheme's plan calibrates the host's speed with a measured training step: in a child
    process, which takes torch with it when it exits."""
    code = """
from gaisnet_ray.config import load_config
from gaisnet_ray.run_command import check_model, _plan
from gaisnet_ray.hfsl.memory import check_fits
from gaisnet_ray.cluster.local import check_local_gpus, local_init_kwargs
from gaisnet_ray.hfsl.factory import tier_parts
from gaisnet_ray.models.sources import num_blocks
for scheme, given in (('fl', []), ('hfsl', []), ('hfsl', ['planner.host_gflops=20'])):
    cfg = load_config('examples/tiny.yaml', ['training.scheme=' + scheme, *given])
    model_config = check_model(cfg)
    check_fits(cfg, model_config=model_config)
    planned, plan = _plan(cfg, model_config, None)
    check_local_gpus(planned)
    assert local_init_kwargs(planned)['num_gpus'] == 0  # nothing asks for a GPU: torch is not asked either
    parts = tier_parts(planned, num_blocks(model_config))
    assert parts['edge-0'].is_empty == (scheme == 'fl')
    if scheme == 'hfsl':  # measured in a child process, or as given
        assert plan.host_gflops > 0 and (plan.host_gflops == 20) == bool(given)
"""
    assert _loaded_after(code) == []


def test_an_fl_edge_loads_no_model_library():
    """Under FL an edge only averages its devices' adapters: it is handed ``NoWeights`` (no tensors, no
    tokenizer), and building its trainer loads torch but neither transformers' model code nor peft."""
    code = """
from gaisnet_ray.config import load_config
from gaisnet_ray.hfsl.factory import edge_trainer
from gaisnet_ray.logs import quiet_libraries
from gaisnet_ray.models.cuts import NoWeights
quiet_libraries('cpu')
cfg = load_config('examples/tiny.yaml', ['training.scheme=fl'])
edge = edge_trainer(cfg, 'edge-0', ['end-0-0', 'end-0-1', 'end-0-2'], NoWeights(4))
assert edge.split is None and edge.update_base(NoWeights(4)) == 0
"""
    assert _loaded_after(code) == ["torch"]


def test_workers_silence_transformers_before_it_is_loaded():
    """``quiet_libraries`` in a worker that has not loaded transformers yet: once loaded, it still
    prints errors only and shows no progress bars."""
    code = """
from gaisnet_ray.logs import quiet_libraries
quiet_libraries('cpu')
import logging
from transformers.utils import logging as hf_logging
assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()
"""
    _loaded_after(code)


def test_a_presets_light_config_has_the_shape_of_its_transformers_config():
    """``preset_config_dict`` (what the driver reads without transformers) gives the same geometry
    and block count as the preset's real config object, for every preset and family."""
    from gaisnet_ray.models.geometry import ModelGeometry
    from gaisnet_ray.models.presets import PRESETS, preset_config, preset_config_dict
    from gaisnet_ray.models.sources import num_blocks
    from gaisnet_ray.models.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    for family in ("gpt2", "llama"):
        for preset in PRESETS:
            light = preset_config_dict(family, preset, 64)
            full = preset_config(family, preset, len(tok), 64, tok).to_dict()
            assert ModelGeometry.from_config(light) == ModelGeometry.from_config(full), (family, preset)
            assert num_blocks(light) == num_blocks(full) == PRESETS[preset][0]
            assert {k: full[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
                {k: light[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


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
    from gaisnet_ray.models.cuts import NoWeights

    assert fetch_deferred(deferred(NoWeights(4))) == NoWeights(4)  # not a ref: handed as it is


def test_a_deferred_part_loads_the_model_code_before_waiting_for_it():
    """An actor handed a deferred part of the foundation imports transformers' model code and peft
    before it blocks on the ref (they then load while the cloud pre-trains, not after it: 2.5 s of
    the tiny FL job's start); a part handed as it is (``NoWeights``) loads neither."""
    code = """
import sys, ray
from gaisnet_ray.actors.audited import deferred, fetch_deferred
from gaisnet_ray.models.cuts import NoWeights
loaded = lambda: [m for m in ('transformers.modeling_utils', 'peft') if m in sys.modules]
assert fetch_deferred(deferred(NoWeights(4))) == NoWeights(4) and loaded() == []
ray.get = lambda ref: loaded()  # what is loaded at the moment the actor would wait
assert fetch_deferred(deferred(ray.ObjectRef.nil())) == ['transformers.modeling_utils', 'peft']
"""
    _loaded_after(code)


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
