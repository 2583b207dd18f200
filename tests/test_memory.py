"""Each actor holds only what it runs: foundation parts, their transport, relay down by part, the
cloud's copies, and training memory (the back loss, block checkpointing). Tiny presets, no Ray.
The memory estimate and the refusal of a run that cannot fit: test_memory_estimate.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from gaisnet_ray.config import PeftConfig
from gaisnet_ray.models.adapters import (
    _merged_base_state_by_copy,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_base_state,
    merged_base_state,
    trainable_parameters,
)
from gaisnet_ray.models.build import FoundationPackage
from gaisnet_ray.models.parts import Pruned
from gaisnet_ray.models.cuts import Cut, ModelPart, layer_of_key
from gaisnet_ray.models.split import SplitModel, build_tier_model
from loracheck import lora_grads, randomize_lora
from tinycfg import tiny_config, tiny_package

torch.set_num_threads(1)

FAMILIES = ["gpt2", "llama"]
PEFT = PeftConfig(r=4, alpha=8.0)
CUT = Cut(1, 3)  # 4 blocks: device holds 0 and 3, the edge 1 and 2


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
    package = tiny_package(family)
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
    edge = tiny_package("gpt2").part({1, 2}, embeddings=False, head=False)
    assert edge.part({1}, embeddings=False, head=False).part_spec.layers == frozenset({1})
    with pytest.raises(ValueError, match=r"cannot cut blocks 0, 3 \+ embeddings \+ final norm and head out of a "
                                         r"package holding blocks 1-2"):
        edge.cut(CUT.device_part(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_part_segments_equal_the_whole_models_segments_and_lora_grads(family):
    """Device and edge built from their parts (received the way Ray hands them over: read-only
    buffers) compute the same segment outputs, loss and LoRA gradients as the whole model."""
    package = tiny_package(family)
    whole = build_tier_model(package, PEFT)
    randomize_lora(whole.peft, seed=1)
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
    reference = lora_grads(whole.peft)

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
    grads = {**lora_grads(device.peft), **lora_grads(edge.peft)}
    assert set(grads) == set(reference)
    for k, v in reference.items():
        assert v.abs().max() > 0, k
        torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")


def test_tied_embeddings_travel_once_and_are_retied_on_the_device():
    package = tiny_package("llama", tie_word_embeddings=True)
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
    package = tiny_package("gpt2")
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
    package = tiny_package("gpt2")
    cloud = attach_lora(package.materialize(), PEFT, "gpt2")
    randomize_lora(cloud, seed=5)
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
    from gaisnet_ray.inprocess import InProcessGaisNet

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
    package = tiny_package(family)
    peft = attach_lora(package.materialize(), PEFT, family)
    randomize_lora(peft, seed=3)
    ours, peft_merge = merged_base_state(peft), _merged_base_state_by_copy(peft)
    assert set(ours) == set(peft_merge)
    assert all(torch.equal(ours[k], peft_merge[k]) for k in ours)  # bit for bit
    assert any(not torch.equal(ours[k], package.state_dict[k]) for k in ours)


def test_edge_clusters_share_the_frozen_base_and_copy_only_lora():
    from gaisnet_ray.hfsl.factory import edge_trainer

    cfg = tiny_config("training.pretrain_steps=0", "topology.devices_per_edge=3", "topology.cluster_size=1",
                      "data.samples_per_device=8")
    package = tiny_package("gpt2")
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
    package = tiny_package(family)
    a, b = build_tier_model(package, PEFT), build_tier_model(package, PEFT)
    randomize_lora(a.peft, 4)
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
    ga, gb = lora_grads(a.peft), lora_grads(b.peft)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-7)


def test_block_checkpointing_gives_the_same_gradients_bit_for_bit():
    package = tiny_package("llama")
    a = build_tier_model(package, PEFT, ModelPart.of({1, 2}, False, False))
    randomize_lora(a.peft, 6)
    b = SplitModel(copy.deepcopy(a.peft))
    x = torch.randn(2, 12, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a.blocks(xa, 1, 3), b.blocks(xb, 1, 3, checkpoint=True)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    ga, gb = lora_grads(a.peft), lora_grads(b.peft)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
