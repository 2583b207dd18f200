"""Each actor holds only what it runs: foundation parts, their transport, relay down by part, the
cloud's copies, the memory estimate and the refusal of a run that cannot fit. Tiny presets; one
Ray test (the driver sends parts and the round metrics carry each actor kind's peak RSS)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
import torch

from gaisnet_ray.config import ModelConfig, PeftConfig
from gaisnet_ray.models.adapters import (
    _merged_base_state_by_copy,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_base_state,
    merged_base_state,
    trainable_parameters,
)
from gaisnet_ray.models.build import FoundationPackage, build_foundation
from gaisnet_ray.models.parts import ModelPart, Pruned, layer_of_key
from gaisnet_ray.models.split import Cut, SplitModel, build_tier_model
from tinycfg import tiny_config, write_tiny_yaml

torch.set_num_threads(1)

FAMILIES = ["gpt2", "llama"]
PEFT = PeftConfig(r=4, alpha=8.0)
CUT = Cut(1, 3)  # 4 blocks: device holds 0 and 3, the edge 1 and 2


def _package(family: str, **config) -> FoundationPackage:
    model, tok = build_foundation(ModelConfig(family=family))
    if config:  # e.g. tied embeddings on a Llama preset
        cfg = model.config
        for k, v in config.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        model = type(model)(cfg)
        model.tie_weights()
    return FoundationPackage.from_model(model, tok)


def _randomize(peft_model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(peft_model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_grads(peft_model) -> dict[str, torch.Tensor]:
    return {n.replace(".default.", "."): p.grad.detach().clone()
            for n, p in peft_model.named_parameters() if p.requires_grad}


def _param_bytes(module) -> int:
    distinct = {id(p): p for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in distinct.values())


def _ray_pickle(obj):
    """Pickle as Ray does (protocol 5, buffers out of band): the receiver gets read-only buffers."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[memoryview(b.raw()).toreadonly() for b in buffers])


# ------------------------------------------------------------------------------------- parts
@pytest.mark.parametrize("family", FAMILIES)
def test_a_part_holds_only_its_tensors(family):
    package = _package(family)
    sd = package.state_dict
    device, edge = package.cut(CUT.device_part(4)), package.part({1, 2}, embeddings=False, head=False)

    assert {layer_of_key(k) for k in device.state_dict} == {0, 3, None}
    assert {layer_of_key(k) for k in edge.state_dict} == {1, 2}
    assert all(device.state_dict[k] is sd[k] for k in device.state_dict)  # cut, never copied

    def nbytes(keys):
        return sum(sd[k].numel() * sd[k].element_size() for k in keys)

    block = {i: nbytes([k for k in sd if layer_of_key(k) == i]) for i in range(4)}
    unlayered = [k for k in sd if layer_of_key(k) is None and not (k == "lm_head.weight" and package.config.get(
        "tie_word_embeddings"))]  # a tied head is the embedding, counted once
    assert device.nbytes() == block[0] + block[3] + nbytes(unlayered)
    assert edge.nbytes() == block[1] + block[2]
    assert device.nbytes() + edge.nbytes() == package.nbytes()
    assert device.part_spec == ModelPart.of({0, 3}, True, True) and edge.part_spec == ModelPart.of({1, 2}, False, False)

    # built: exactly those weights are allocated, the rest are parameter-free placeholders
    dev_model, edge_model = device.materialize(), edge.materialize()
    assert _param_bytes(dev_model) == device.nbytes()
    assert _param_bytes(edge_model) == edge.nbytes()
    blocks = edge_model.transformer.h if family == "gpt2" else edge_model.model.layers
    assert [isinstance(b, Pruned) for b in blocks] == [True, False, False, True]
    assert isinstance(edge_model.lm_head, Pruned)


def test_a_part_cannot_be_cut_out_of_a_part_that_lacks_it():
    edge = _package("gpt2").part({1, 2}, embeddings=False, head=False)
    assert edge.part({1}, embeddings=False, head=False).part_spec.layers == frozenset({1})
    with pytest.raises(ValueError, match=r"cannot cut blocks 0, 3 \+ embeddings \+ final norm and head out of a "
                                         r"package holding blocks 1-2"):
        edge.cut(CUT.device_part(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_part_segments_equal_the_whole_models_segments_and_lora_grads(family):
    """Device and edge built from their parts (received the way Ray hands them over: read-only
    buffers) compute the same segment outputs, loss and LoRA gradients as the whole model."""
    package = _package(family)
    whole = build_tier_model(package, PEFT)
    _randomize(whole.peft, seed=1)
    knowledge = adapter_state(whole.peft)
    device = build_tier_model(_ray_pickle(package.cut(CUT.device_part(4))), PEFT)
    edge = build_tier_model(_ray_pickle(package.part({1, 2}, False, False)), PEFT)
    for tier in (device, edge):
        load_adapter_state(tier.peft, knowledge)
        tier.peft.train()
    whole.peft.train()
    if family == "llama":  # rotary buffers were rebuilt from the config, not left uninitialised
        for tier in (device, edge):
            assert torch.equal(tier.lm.model.rotary_emb.inv_freq, whole.lm.model.rotary_emb.inv_freq)

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 260, (3, 16), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, :6] = -100

    ref_k = whole.front(ids, 1)
    ref_m = whole.blocks(ref_k, 1, 3)
    ref_loss = whole.loss(whole.back(ref_m, 3), labels)
    ref_loss.backward()
    reference = _lora_grads(whole.peft)

    h_k = device.front(ids, 1)
    torch.testing.assert_close(h_k, ref_k, rtol=1e-5, atol=1e-6)
    x = h_k.detach().requires_grad_()
    y = edge.blocks(x, 1, 3)
    torch.testing.assert_close(y, ref_m, rtol=1e-5, atol=1e-6)
    h_m = y.detach().requires_grad_()
    loss = device.loss(device.back(h_m, 3), labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    y.backward(h_m.grad)
    h_k.backward(x.grad)
    grads = {**_lora_grads(device.peft), **_lora_grads(edge.peft)}
    assert set(grads) == set(reference)
    for k, v in reference.items():
        assert v.abs().max() > 0, k
        torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")


def test_tied_embeddings_travel_once_and_are_retied_on_the_device():
    package = _package("llama", tie_word_embeddings=True)
    sd = package.state_dict
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]  # one tensor under both names
    device = _ray_pickle(package.cut(CUT.device_part(4)))
    assert device.state_dict["lm_head.weight"] is device.state_dict["model.embed_tokens.weight"]
    model = device.materialize()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _param_bytes(model) == device.nbytes()
    whole = package.materialize()
    ids = torch.randint(4, 260, (2, 9))
    with torch.no_grad():
        split, ref = SplitModel(attach_lora(model, PEFT, "llama")), SplitModel(attach_lora(whole, PEFT, "llama"))
        torch.testing.assert_close(split.back(split.front(ids, 1), 3), ref.back(ref.front(ids, 1), 3), rtol=0, atol=0)


def test_package_transport_is_zero_copy_and_tied_weights_travel_once():
    package = _package("gpt2")
    buffers = []
    pickle.dumps(package, protocol=5, buffer_callback=buffers.append)
    assert sum(memoryview(b.raw()).nbytes for b in buffers) == package.nbytes()  # out of band, tied once
    again = _ray_pickle(package)
    assert all(torch.equal(again.state_dict[k], v) for k, v in package.state_dict.items())
    assert again.state_dict["lm_head.weight"] is again.state_dict["transformer.wte.weight"]


# -------------------------------------------------------------------------------- relay down
def test_relay_down_with_parts_equals_the_whole_package_relay():
    """Each tier loads its part of the new base; the result (weights and bytes) is what loading the
    whole state dict into it gave before. A part that does not fit the tier is refused by name."""
    package = _package("gpt2")
    cloud = attach_lora(package.materialize(), PEFT, "gpt2")
    _randomize(cloud, seed=5)
    new = FoundationPackage(package.config, merged_base_state(cloud), package.tokenizer, package.attn_implementation)
    for part in (CUT.device_part(4), ModelPart.of({1, 2}, False, False)):
        by_part = build_tier_model(package, PEFT, part)
        by_whole = build_tier_model(package, PEFT, part)
        assert load_base_state(by_part.peft, new.cut(part)) == load_base_state(by_whole.peft, new.state_dict) > 0
        base = {k: v for k, v in by_whole.peft.state_dict().items() if "lora_" not in k}
        assert base and all(torch.equal(by_part.peft.state_dict()[k], v) for k, v in base.items())
        assert any(not torch.equal(v, package.state_dict[k.replace("base_model.model.", "").replace(
            ".base_layer.", ".")]) for k, v in base.items())  # the new base did arrive
    edge = build_tier_model(package, PEFT, ModelPart.of({1, 2}, False, False))
    with pytest.raises(ValueError, match=r"holds .* tensor\(s\) this tier model does not, e.g. \['lm_head.weight'"):
        load_base_state(edge.peft, new.cut(ModelPart.of({1, 2}, False, True)))


def test_inprocess_relay_sends_parts_and_every_tier_runs_the_new_base(tmp_path):
    from gaisnet_ray.hfsl.inprocess import InProcessGaisNet

    cfg = tiny_config("training.pretrain_steps=0", "training.rounds=1", "training.local_steps=2",
                      "topology.devices_per_edge=2", "data.samples_per_device=16", "data.eval_samples_per_domain=4",
                      "data.public_samples=16")
    g = InProcessGaisNet(cfg, tmp_path / "run")
    for d in g.devices.values():
        assert d.split.held_layers() == {0, 3} and d.part == CUT.device_part(4)
    m = g.run_round(1)
    new = g.cloud.package.state_dict
    written = m["relay"]["bytes_down"]["per_node"]
    for name, tier in [*g.devices.items(), *g.edges.items()]:
        held = {k.replace(".base_layer.", "."): v for k, v in tier.split.peft.get_base_model().state_dict().items()
                if "lora_" not in k}
        assert held and all(torch.equal(v, new[k]) for k, v in held.items()), name
        assert written[name] == _param_bytes(tier.split.peft) - sum(
            p.numel() * p.element_size() for p in trainable_parameters(tier.split.peft))


# ----------------------------------------------------------------------- copies of the base
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_base_state_equals_peft_merge_without_a_model_copy(family):
    package = _package(family)
    peft = attach_lora(package.materialize(), PEFT, family)
    _randomize(peft, seed=3)
    ours, peft_merge = merged_base_state(peft), _merged_base_state_by_copy(peft)
    assert set(ours) == set(peft_merge)
    assert all(torch.equal(ours[k], peft_merge[k]) for k in ours)  # bit for bit
    assert any(not torch.equal(ours[k], package.state_dict[k]) for k in ours)


def test_edge_clusters_share_the_frozen_base_and_copy_only_lora():
    from gaisnet_ray.hfsl.inprocess import edge_trainer

    cfg = tiny_config("training.pretrain_steps=0", "topology.devices_per_edge=3", "topology.cluster_size=1",
                      "data.samples_per_device=8")
    package = _package("gpt2")
    edge = edge_trainer(cfg, "edge-0", ["end-0-0", "end-0-1", "end-0-2"], package)
    knowledge = adapter_state(build_tier_model(package, cfg.peft).peft)
    edge.begin_round(knowledge, {f"edge-0/c{i}": [f"end-0-{i}"] for i in range(3)})
    frozen = {n: p.data_ptr() for n, p in edge.split.peft.named_parameters() if not p.requires_grad}
    lora = {n: p.data_ptr() for n, p in edge.split.peft.named_parameters() if p.requires_grad}
    assert frozen and lora
    for st in edge._clusters.values():
        named = dict(st.split.peft.named_parameters())
        assert all(named[n].data_ptr() == ptr for n, ptr in frozen.items())  # the same base weights
        assert all(named[n].data_ptr() != ptr for n, ptr in lora.items())  # its own adapter
        opt_params = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
        assert opt_params == {id(p) for p in trainable_parameters(st.split.peft)}  # AdamW: LoRA only
    snapshot = edge.begin_turn("edge-0/c0", "end-0-0", None)
    assert all("lora_" in k for k in snapshot) and all("lora_" in k for k in edge._clusters["edge-0/c0"].snapshot)


def test_the_clouds_package_is_a_view_of_its_model(tmp_path):
    from gaisnet_ray.hfsl.cloud import CloudCore

    core = CloudCore(tiny_config("training.pretrain_steps=0", "data.eval_samples_per_domain=4"), tmp_path / "run")
    live = {t.data_ptr() for t in core.peft.get_base_model().state_dict().values()}
    assert all(t.data_ptr() in live for t in core.package.state_dict.values())  # no second copy of the base


# ------------------------------------------------------------------------- training memory
@pytest.mark.parametrize("family", FAMILIES)
def test_back_loss_equals_the_full_logits_loss(family):
    package = _package(family)
    a, b = build_tier_model(package, PEFT), build_tier_model(package, PEFT)
    _randomize(a.peft, 4)
    load_adapter_state(b.peft, adapter_state(a.peft))
    ids = torch.randint(4, 260, (3, 16))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 14:] = -100
    full = a.loss(a.back(a.blocks(a.front(ids, 1), 1, 3), 3), labels)
    slim = b.back_loss(b.blocks(b.front(ids, 1), 1, 3), 3, labels)
    torch.testing.assert_close(slim, full, rtol=1e-6, atol=1e-7)
    full.backward()
    slim.backward()
    ga, gb = _lora_grads(a.peft), _lora_grads(b.peft)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-7)


def test_block_checkpointing_gives_the_same_gradients_bit_for_bit():
    package = _package("llama")
    a = build_tier_model(package, PEFT, ModelPart.of({1, 2}, False, False))
    _randomize(a.peft, 6)
    b = SplitModel(copy.deepcopy(a.peft))
    x = torch.randn(2, 12, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a.blocks(xa, 1, 3), b.blocks(xb, 1, 3, checkpoint=True)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    ga, gb = _lora_grads(a.peft), _lora_grads(b.peft)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


# ---------------------------------------------------------------------------- the estimate
def test_estimate_counts_the_weights_each_tier_holds():
    from gaisnet_ray.hfsl.memory import ModelGeometry, estimate_job

    for family in FAMILIES:
        package = _package(family)
        g = ModelGeometry.from_config(package.config)
        for part in (ModelPart.whole(), CUT.device_part(4), ModelPart.of({1, 2}, False, False)):
            assert g.part_bytes(part) == package.cut(part).nbytes(), (family, part)
        peft = attach_lora(package.materialize(), PEFT, family)
        assert g.lora_params_per_block(PEFT.r, None) * 4 == sum(p.numel() for p in trainable_parameters(peft))
    est = estimate_job(tiny_config(), _package("gpt2").config).by_kind()
    assert (est["cloud"].count, est["edge"].count, est["end"].count) == (1, 2, 6)


def _fake(total_gb: float, in_use_gb: float = 0.0):
    from gaisnet_ray.hfsl.memory import MemoryCapacity

    return MemoryCapacity(int(total_gb * 1e9), int(in_use_gb * 1e9), 0.95)


def test_estimate_refuses_a_job_that_cannot_fit_with_the_numbers():
    from gaisnet_ray.hfsl.memory import InsufficientMemoryError, check_fits

    cfg = tiny_config("topology.devices_per_edge=40")  # 80 end devices, each a whole Python + torch process
    config = _package("gpt2").config
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

    est = estimate_job(tiny_config(), _package("gpt2").config, local=False)

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
                      "topology.devices_per_edge=2", "data.samples_per_device=16", "data.eval_samples_per_domain=4",
                      "data.public_samples=16", "run.actor_timeout_s=300")
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
        assert {k: rss[k]["actors"] for k in ("cloud", "edge", "end")} == {"cloud": 1, "edge": 2, "end": 4}
        assert all(100 < rss[k]["max"] <= rss[k]["sum"] for k in ("cloud", "edge", "end"))
        assert rss["all_actors"] == pytest.approx(sum(rss[k]["sum"] for k in ("cloud", "edge", "end")), abs=0.2)
        assert m["relay"]["bytes_down"]["end_edge_down"] > 0
    finally:
        driver.close()


def test_the_estimate_assumes_the_evaluation_batch_the_cloud_uses():
    from gaisnet_ray.hfsl import evaluate, memory

    assert memory.EVAL_BATCH == evaluate.LOSS_BATCH
