"""The data-free relay, in one process (no Ray): merge folds the adapter into the base exactly,
a new base reaches pruned tier models, distillation lowers the held-out KL in both engines and its
inputs are the cloud's own, and the in-process cycle versions the base with lineage."""

from __future__ import annotations

import json

import pytest
import torch

from gaisnet_ray.config import load_config

from gaisnet_ray.models.cuts import ModelPart
from conftest import small_job
from tinycfg import TINY_YAML

TINY = small_job("data.samples_per_device=48", "data.eval_samples_per_domain=8", "training.local_steps=4",
                 "training.rounds=2")


@pytest.fixture(scope="module")
def foundation():
    from gaisnet_ray.models.build import FoundationPackage, build_foundation

    cfg = load_config(TINY_YAML, TINY)
    model, tok = build_foundation(cfg.model)
    return cfg, FoundationPackage.from_model(model, tok), tok


def _lora(cfg, package, seed: int, scale: float = 0.05):
    """base + a LoRA adapter with random B (a non-trivial adapter)."""
    from gaisnet_ray.models.adapters import attach_lora

    peft = attach_lora(package.materialize(), cfg.peft, "gpt2")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return peft.eval()


def test_merge_folds_the_adapter_into_the_base_exactly(foundation):
    from gaisnet_ray.models.adapters import merged_base_state
    from gaisnet_ray.models.build import FoundationPackage

    cfg, package, tok = foundation
    peft = _lora(cfg, package, seed=1)
    state = merged_base_state(peft)
    assert set(state) == set(package.state_dict)
    assert any(not torch.equal(state[k], package.state_dict[k]) for k in state)  # the base did change
    merged = FoundationPackage(package.config, state, tok, package.attn_implementation).materialize()
    ids = torch.randint(4, 200, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert peft.get_base_model().transformer.h[0].attn.c_attn.lora_A["default"] is not None  # left unmerged


def test_a_new_base_reaches_a_pruned_tier_model_in_place(foundation):
    from gaisnet_ray.models.adapters import adapter_state, load_base_state, merged_base_state
    from gaisnet_ray.models.build import FoundationPackage
    from gaisnet_ray.models.split import build_tier_model

    cfg, package, tok = foundation
    state = merged_base_state(_lora(cfg, package, seed=2))
    device = build_tier_model(package, cfg.peft, ModelPart.of({0}, True, True))
    adapter_before = adapter_state(device.peft)
    written = load_base_state(device.peft, state)
    fresh = build_tier_model(FoundationPackage(package.config, state, tok, package.attn_implementation), cfg.peft,
                             ModelPart.of({0}, True, True))
    held = {k: v for k, v in device.peft.state_dict().items() if "lora_" not in k}
    assert held and all(torch.equal(v, fresh.peft.state_dict()[k]) for k, v in held.items())
    assert 0 < written < sum(v.numel() * v.element_size() for v in state.values())  # only what it holds
    assert all(torch.equal(adapter_before[k], v) for k, v in adapter_state(device.peft).items())
    bad = {k: v[..., :1] if v.dim() else v for k, v in state.items()}
    with pytest.raises(ValueError, match="shape"):
        load_base_state(device.peft, bad)


@pytest.mark.parametrize("engine", [{}, {"engine": "deepspeed", "zero_stage": 3}], ids=["torch", "deepspeed-zero3"])
def test_distillation_lowers_the_heldout_kl_to_the_teachers(foundation, engine):
    from gaisnet_ray.cloudengine import CloudEngineConfig
    from gaisnet_ray.models.adapters import adapter_state
    from gaisnet_ray.relay.distill import distill, generate_inputs

    cfg, package, tok = foundation
    teachers = [adapter_state(_lora(cfg, package, seed=s, scale=0.1)) for s in (3, 4)]
    teacher = _lora(cfg, package, seed=5)
    restore = adapter_state(teacher)
    student = package.materialize()
    result = distill(student, teacher, tok, teachers, [2.0, 1.0], engine=CloudEngineConfig(**engine),
                     num_inputs=48, num_heldout=16, seq_len=24, steps=12, batch_size=16, lr=2e-3, temperature=1.0,
                     seed=7, restore=restore)
    assert result.kl_before > 0.01
    assert result.kl_after < 0.5 * result.kl_before, (result.kl_before, result.kl_after)
    assert result.train_kl[-1] < result.train_kl[0]
    assert set(result.state) == set(package.state_dict) and all(torch.isfinite(v).all() for v in result.state.values())
    assert all(torch.equal(restore[k], v) for k, v in adapter_state(teacher).items())  # global knowledge restored

    # the inputs are the cloud's own: a function of the base, the relayed adapters and the seed
    a = generate_inputs(teacher, tok, teachers, 8, 24, 1.0, seed=11)
    b = generate_inputs(teacher, tok, teachers, 8, 24, 1.0, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0][:, 0] == tok.bos_token_id).all() and a[0].shape == (8, 24)


# ------------------------------------------------------------------------- the whole cycle
@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    from gaisnet_ray.inprocess import InProcessGaisNet

    torch.set_num_threads(1)
    cfg = load_config(TINY_YAML, TINY)
    out = tmp_path_factory.mktemp("relay") / "run"
    out.mkdir()
    g = InProcessGaisNet(cfg, out)
    metrics = [g.run_round(r) for r in (1, 2)]
    return cfg, g, out, metrics


def test_cycle_versions_the_base_and_runs_the_next_round_on_it(cycle):
    from safetensors.torch import load_file

    from gaisnet_ray.knowledge.bases import BaseStore

    cfg, g, out, metrics = cycle
    bases = BaseStore(out / "knowledge" / "bases")
    assert bases.versions() == [0, 1, 2]
    assert [bases.lineage(v)["parent_version"] for v in (0, 1, 2)] == [None, 0, 1]
    assert [json.loads((out / "knowledge" / f"v{v:04d}" / "lineage.json").read_text())["base"]["version"]
            for v in (0, 1, 2)] == [0, 0, 1]
    model = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(v, g.cloud.package.state_dict[k]) for k, v in model.items())
    # relay down: every device and edge now runs base b2 (the keys it holds)
    new = g.cloud.package.state_dict
    for tier in [*g.devices.values(), *g.edges.values()]:
        held = {k: v for k, v in tier.split.peft.get_base_model().state_dict().items() if "lora_" not in k}
        assert held and all(torch.equal(v, new[k.replace(".base_layer.", ".")]) for k, v in held.items())
    # the next round starts from a fresh adapter (B = 0) on the new base
    assert all(not v.any() for k, v in g.knowledge.items() if "lora_B" in k)
    for m in metrics:
        assert m["relay"]["bytes_down"]["end_edge_down"] > 0 and m["relay"]["policy"] == "merge"


def test_merge_makes_the_cloud_model_what_base_plus_knowledge_was(cycle):
    cfg, g, out, metrics = cycle
    for m in metrics:
        after, with_adapter = m["relay"]["cloud_after"], m["eval"]
        for d in after:
            assert after[d]["loss"] == pytest.approx(with_adapter[d]["loss"], abs=1e-4)
        mean = lambda ev: sum(ev[d]["loss"] for d in ("units", "facts")) / 2  # noqa: E731
        assert mean(after) < mean(m["relay"]["cloud_before"])


def test_a_non_finite_relay_changes_nothing(cycle, monkeypatch):
    from gaisnet_ray.hfsl import cloud as cloud_module
    from gaisnet_ray.knowledge.errors import KnowledgeError

    cfg, g, out, metrics = cycle
    core = g.cloud
    before = (core.base_version, core.base_hash, dict(core.knowledge))

    def poisoned(model):
        state = {k: v.clone() for k, v in core.package.state_dict.items()}
        state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
        return state

    monkeypatch.setattr(cloud_module, "merged_base_state", poisoned)
    with pytest.raises(KnowledgeError, match="relay.policy=merge"):
        core.relay(3, [])
    assert (core.base_version, core.base_hash) == before[:2]
    assert not (out / "knowledge" / "bases" / "b0003").exists()


def test_rehearsal_trains_the_new_base_on_public_data_and_lowers_its_public_loss(tmp_path):
    """relay.rehearse_steps: after the merge the cloud trains the whole new base on its public data;
    the public domain's held-out loss of the base alone is lower than without rehearsal, and the
    rehearsal's steps are reported."""
    from gaisnet_ray.inprocess import InProcessGaisNet

    common = [*TINY, "training.rounds=1", "data.public_domains=[arithmetic]", "relay.policy=merge"]
    torch.set_num_threads(1)
    (tmp_path / "plain").mkdir()
    (tmp_path / "rehearsed").mkdir()
    m0 = InProcessGaisNet(load_config(TINY_YAML, common), tmp_path / "plain").run_round(1)
    cfg = load_config(TINY_YAML, [*common, "relay.rehearse_steps=8", "relay.rehearse_lr=3e-3"])
    m1 = InProcessGaisNet(cfg, tmp_path / "rehearsed").run_round(1)
    assert "rehearse" not in m0["relay"]
    assert m1["relay"]["rehearse"]["steps"] == 8 and len(m1["relay"]["rehearse"]["losses"]) == 8
    # before the relay both clouds are the same; after it, the rehearsed base is better on public data
    assert m1["relay"]["cloud_before"] == m0["relay"]["cloud_before"]
    assert m1["relay"]["cloud_after"]["arithmetic"]["loss"] < m0["relay"]["cloud_after"]["arithmetic"]["loss"] - 0.05


def test_an_adapter_that_adds_nothing_is_evaluated_once_for_the_relay(tmp_path):
    """Version 0 is LoRA with B = 0: its evaluation (the one before round 1) is the base's own, to the
    bit, so the first relay takes it as the base's 'before' instead of evaluating the base again.
    An adapter with any non-zero B is not taken for the base."""
    from gaisnet_ray.hfsl.cloud import CloudCore

    torch.set_num_threads(1)
    core = CloudCore(load_config(TINY_YAML, TINY), tmp_path)
    core.initial_knowledge()
    first = core.evaluate()
    assert core._base_eval is first and first == core.evaluate_base()
    core._base_eval = None
    with torch.no_grad():
        next(p for n, p in core.peft.named_parameters() if "lora_B" in n)[0, 0] = 0.5
    assert core.evaluate() != first and core._base_eval is None
