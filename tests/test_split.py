"""The U-shaped split computes the same function, loss and LoRA gradients as the unsplit model.

Device front (embeddings + blocks[0:k]) -> edge middle (blocks[k:m]) -> device back (blocks[m:L] +
norm + head + loss), with the activations detached at each cut and the gradients passed back by
hand, exactly as devices and edges exchange them. Tiny 4-layer presets; no Ray.
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import ModelConfig, PeftConfig, load_config
from gaisnet_ray.hfsl.factory import device_trainer, edge_trainer
from gaisnet_ray.inprocess import DirectEdgeLink
from gaisnet_ray.schemes.topology import device_cut
from gaisnet_ray.models.adapters import (
    adapter_state,
    attach_lora,
    load_adapter_state,
    trainable_parameters,
)
from gaisnet_ray.models.build import FoundationPackage, build_foundation
from gaisnet_ray.models.split import SplitModel, build_tier_model, select_keys
from gaisnet_ray.models.cuts import Cut, ModelPart, layer_of_key
from gaisnet_ray.privacy.noise import clip_rows

from loracheck import lora_grads, randomize_lora
from tinycfg import TINY_YAML

torch.set_num_threads(1)

FAMILIES = ["gpt2", "llama"]
CUTS = [(1, 3), (2, 3), (1, 2)]  # (k, m) on a 4-layer model: edge runs blocks[k:m]
PEFT = PeftConfig(r=4, alpha=8.0)




def _batch(seed: int = 1, b: int = 3, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (b, t), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions
    labels[0, 11:] = -100  # padding of a shorter row
    return ids, labels


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def package(request):
    family, attn = request.param
    model, tok = build_foundation(ModelConfig(family=family, attn_implementation=attn))
    return FoundationPackage.from_model(model, tok)


@pytest.fixture(scope="module")
def reference(package):
    """Loss and LoRA gradients of the whole (unsplit) peft model on the batch, plus its adapter."""
    whole = build_tier_model(package, PEFT, ModelPart.of(None, True, True))
    randomize_lora(whole.peft)
    ids, labels = _batch()
    whole.peft.train()
    loss = whole.peft(input_ids=ids, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": lora_grads(whole.peft), "adapter": adapter_state(whole.peft),
            "logits": whole.peft(input_ids=ids).logits.detach()}


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"k{c[0]}m{c[1]}")
def test_split_step_matches_unsplit_model(package, reference, cut):
    """Pruned device and edge tier models, adapters loaded from the same knowledge: same loss and
    the same gradient for every LoRA weight, each computed on the tier that holds it."""
    k, m = cut
    cut_obj = Cut(k, m)
    device = build_tier_model(package, PEFT, ModelPart.of(cut_obj.device_layers(4), True, True))
    edge = build_tier_model(package, PEFT, ModelPart.of(cut_obj.edge_layers(), False, False))
    assert load_adapter_state(device.peft, reference["adapter"]) == len(adapter_state(device.peft))
    assert load_adapter_state(edge.peft, reference["adapter"]) == len(adapter_state(edge.peft))
    device.peft.train()
    edge.peft.train()
    ids, labels = _batch()

    h_k = device.front(ids, k)  # (B, T, H) on the device
    x = h_k.detach().requires_grad_()  # arrives at the edge
    y = edge.blocks(x, k, m)  # (B, T, H) on the edge
    h_m = y.detach().requires_grad_()  # arrives back at the device
    logits = device.back(h_m, m)  # (B, T, V)
    loss = device.loss(logits, labels)
    loss.backward()
    y.backward(h_m.grad)  # edge: dL/dh_m -> dL/dh_k
    h_k.backward(x.grad)  # device: dL/dh_k -> front adapter grads

    torch.testing.assert_close(loss.detach(), reference["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), reference["logits"], rtol=1e-5, atol=1e-5)
    dev_grads, edge_grads = lora_grads(device.peft), lora_grads(edge.peft)
    assert {layer_of_key(k_) for k_ in dev_grads} == cut_obj.device_layers(4)
    assert {layer_of_key(k_) for k_ in edge_grads} == cut_obj.edge_layers()
    assert not set(dev_grads) & set(edge_grads)
    grads = {**dev_grads, **edge_grads}
    assert set(grads) == set(reference["grads"])
    for key, g in reference["grads"].items():
        assert g.abs().max() > 0, f"{key}: gradient is zero, the test would prove nothing"
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-7, msg=lambda s, key=key: f"{key}: {s}")


def test_split_through_one_model_without_pruning(package, reference):
    """SplitModel over one unpruned peft model (the serve path) gives the same logits and grads."""
    model = package.materialize()
    split = SplitModel(attach_lora(model, PEFT, model.config.model_type))
    load_adapter_state(split.peft, reference["adapter"], strict=True)
    split.peft.train()
    ids, labels = _batch()
    h1 = split.front(ids, 1)
    x = h1.detach().requires_grad_()
    y = split.blocks(x, 1, 3)
    h3 = y.detach().requires_grad_()
    loss = split.loss(split.back(h3, 3), labels)
    loss.backward()
    y.backward(h3.grad)
    h1.backward(x.grad)
    torch.testing.assert_close(loss.detach(), reference["loss"], rtol=1e-5, atol=1e-6)
    grads = lora_grads(split.peft)
    for key, g in reference["grads"].items():
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ cuts and adapter keys
def test_cut_from_layers():
    assert Cut.from_layers(4, 1, 1) == Cut(1, 3)
    assert Cut.from_layers(4, 2, 1) == Cut(2, 3)
    assert Cut.from_layers(6, 1, 2) == Cut(1, 4)
    assert Cut(1, 3).device_layers(4) == {0, 3}
    assert Cut(1, 3).edge_layers() == {1, 2}
    assert Cut(2, 3).device_layers(4) == {0, 1, 3}
    assert Cut(2, 3).edge_layers() == {2}


@pytest.mark.parametrize("front, back", [(2, 2), (3, 1), (1, 3), (4, 1)])
def test_cut_leaving_no_edge_block_is_rejected(front, back):
    with pytest.raises(ValueError, match=rf"front_layers={front} \+ back_layers={back} leaves no block for the "
                                         r"edge: the model has 4 blocks"):
        Cut.from_layers(4, front, back)


def test_device_cut_names_the_device():
    topo = load_config(TINY_YAML, ["topology.device_cuts.end-1-0.front_layers=3"]).topology
    assert device_cut(topo, "end-0-0", 4) == Cut(1, 3)
    with pytest.raises(ValueError, match=r"topology cut for end-1-0: cut front_layers=3 \+ back_layers=1"):
        device_cut(topo, "end-1-0", 4)


def test_layer_of_key_on_real_peft_keys():
    gpt2, _ = build_foundation(ModelConfig(family="gpt2"))
    llama, _ = build_foundation(ModelConfig(family="llama"))
    g_state = adapter_state(attach_lora(gpt2, PEFT, "gpt2"))
    l_state = adapter_state(attach_lora(llama, PEFT, "llama"))
    assert layer_of_key("base_model.model.transformer.h.3.mlp.c_fc.lora_A.weight") == 3
    assert layer_of_key("base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight") == 2
    assert layer_of_key("base_model.model.model.layers.12.mlp.up_proj.lora_A.weight") == 12
    assert layer_of_key("base_model.model.lm_head.weight") is None
    assert layer_of_key("base_model.model.transformer.wte.weight") is None
    # 4 blocks x (gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj | llama: q, k, v, o, gate, up, down) x (A, B)
    assert len(g_state) == 4 * 4 * 2 == 32
    assert len(l_state) == 4 * 7 * 2 == 56
    for state, per_layer in ((g_state, 8), (l_state, 14)):
        layers = [layer_of_key(k) for k in state]
        assert sorted(set(layers)) == [0, 1, 2, 3]
        assert all(layers.count(i) == per_layer for i in range(4))


def test_select_keys():
    model, _ = build_foundation(ModelConfig(family="gpt2"))
    state = adapter_state(attach_lora(model, PEFT, "gpt2"))
    extra = {"base_model.model.lm_head.lora_A.weight": torch.zeros(1)}  # an unlayered key
    both = {**state, **extra}
    picked = select_keys(both, {0, 3}, include_unlayered=False)
    assert len(picked) == 16
    assert {layer_of_key(k) for k in picked} == {0, 3}
    assert all(picked[k] is both[k] for k in picked)
    with_head = select_keys(both, {0, 3}, include_unlayered=True)
    assert set(with_head) == set(picked) | set(extra)
    assert select_keys(both, set(), include_unlayered=True) == extra
    assert select_keys(both, {1, 2}, include_unlayered=False).keys() == select_keys(
        state, {1, 2}, include_unlayered=False).keys()


# -------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("family, emb", [("gpt2", "wte"), ("llama", "embed_tokens")])
def test_pruned_tiers_hold_only_their_blocks(family, emb):
    model, tok = build_foundation(ModelConfig(family=family))
    pkg = FoundationPackage.from_model(model, tok)
    whole = build_tier_model(pkg, PEFT, ModelPart.of(None, True, True))
    device = build_tier_model(pkg, PEFT, ModelPart.of({0, 3}, True, True))
    edge = build_tier_model(pkg, PEFT, ModelPart.of({1, 2}, False, False))
    assert device.held_layers() == {0, 3}
    assert edge.held_layers() == {1, 2}
    assert whole.held_layers() == {0, 1, 2, 3}

    h = torch.zeros(2, 5, 64)  # (B, T, H)
    with pytest.raises(RuntimeError, match=r"block 1 is not held by this tier"):
        device.blocks(h, 1, 3)
    with pytest.raises(RuntimeError, match=rf"{emb} is not held by this tier"):
        edge.front(torch.ones(2, 5, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match=r"block 3 is not held by this tier"):
        edge.back(h, 3)
    with pytest.raises(RuntimeError, match=r"final norm is not held by this tier"):
        edge.back(h, 4)
    assert edge.blocks(h, 1, 3).shape == (2, 5, 64)  # what the edge does hold still runs

    per_layer = 8 if family == "gpt2" else 14
    full = adapter_state(whole.peft)
    dev_state, edge_state = adapter_state(device.peft), adapter_state(edge.peft)
    assert len(dev_state) == len(edge_state) == 2 * per_layer
    assert {layer_of_key(k) for k in dev_state} == {0, 3}
    assert {layer_of_key(k) for k in edge_state} == {1, 2}
    assert set(dev_state) | set(edge_state) == set(full)
    # Pruning frees the blocks: the tiers together hold no more parameters than the whole model,
    # plus the embeddings/head only on the device.
    count = lambda s: sum(p.numel() for p in s.peft.parameters())  # noqa: E731
    assert count(edge) < count(device) < count(whole)


def test_load_adapter_state_into_pruned_model():
    model, tok = build_foundation(ModelConfig())
    pkg = FoundationPackage.from_model(model, tok)
    whole = build_tier_model(pkg, PEFT, ModelPart.of(None, True, True))
    randomize_lora(whole.peft, seed=3)
    state = adapter_state(whole.peft)
    edge = build_tier_model(pkg, PEFT, ModelPart.of({1, 2}, False, False))
    assert load_adapter_state(edge.peft, state) == 16  # keys of blocks 0 and 3 are skipped
    for k, v in adapter_state(edge.peft).items():
        assert torch.equal(v, state[k])
    with pytest.raises(KeyError, match=r"adapter key 'base_model.model.transformer.h.0."):
        load_adapter_state(edge.peft, state, strict=True)
    bad = {k: torch.zeros(3) for k in list(adapter_state(edge.peft))[:1]}
    with pytest.raises(ValueError, match=r"shape \(3,\) != model"):
        load_adapter_state(edge.peft, bad)


# ------------------------------------------------------------ DeviceTrainer + EdgeTrainer, end to end
def _tiny_cfg(family: str, *extra: str):
    return load_config(TINY_YAML, [
        f"model.family={family}", "training.pretrain_steps=0", "topology.edges=1",
        "topology.devices_per_edge=2", "data.samples_per_device=12", "data.partition=iid",
        "training.batch_size=4", "training.local_steps=2", "training.weight_decay=0.01", *extra,
    ])


def _one_split_turn(cfg):
    """One device (end-0-0) trains a 2-step split turn with its edge from a random adapter: (the whole
    model holding that adapter, the adapter, a twin device that reproduces the batches, the turn,
    the edge's update)."""
    model, tok = build_foundation(cfg.model)
    pkg = FoundationPackage.from_model(model, tok)
    whole = build_tier_model(pkg, cfg.peft, ModelPart.of(None, True, True))
    randomize_lora(whole.peft, seed=7)
    knowledge = adapter_state(whole.peft)

    edge = edge_trainer(cfg, "edge-0", ["end-0-0"], pkg)
    dev = device_trainer(cfg, "end-0-0", pkg)
    twin = device_trainer(cfg, "end-0-0", pkg)  # same seed and data: reproduces the batches
    cid = "edge-0/c0"
    edge.begin_round(knowledge, {cid: ["end-0-0"]})
    adapter = edge.begin_turn(cid, "end-0-0", None)
    assert {layer_of_key(k) for k in adapter} == {0, 3}  # only the device's blocks travel down
    turn = dev.train_split_turn(adapter, DirectEdgeLink(edge, cid, "end-0-0"), cid, 2)
    return whole, knowledge, twin, turn, edge.finish_round({cid: turn})


def _whole_adamw_steps(whole, twin, cfg, steps: int) -> tuple[list[float], dict]:
    """``steps`` AdamW steps of the whole peft model (its trainable adapter weights) on the twin's
    batches: (losses, the adapter after them)."""
    opt = torch.optim.AdamW(trainable_parameters(whole.peft), lr=cfg.training.lr,
                            weight_decay=cfg.training.weight_decay)
    whole.peft.train()
    losses = []
    for _ in range(steps):
        ids, labels = twin._next_batch()
        assert ids.shape == (4, 48)
        loss = whole.peft(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, adapter_state(whole.peft)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainers_split_turn_equals_plain_adamw_steps(family):
    """One device, 2 split steps through DirectEdgeLink == 2 AdamW steps of the whole peft model on
    the same batches (AdamW is per parameter, so the device's and the edge's optimizers together
    act like one)."""
    cfg = _tiny_cfg(family)
    whole, knowledge, twin, turn, update = _one_split_turn(cfg)
    losses, expected = _whole_adamw_steps(whole, twin, cfg, 2)

    assert turn.losses == pytest.approx(losses, rel=1e-5)
    assert set(update.adapter) == set(expected)
    for key, value in expected.items():
        assert not torch.equal(value, knowledge[key]), f"{key} did not train"
        torch.testing.assert_close(update.adapter[key], value, rtol=1e-5, atol=1e-7)
    assert update.num_samples == 12
    assert update.clusters == [["end-0-0"]]


def test_edge_lr_zero_freezes_the_middle_and_still_passes_gradients_back():
    """training.edge_lr 0: the edge's blocks run the knowledge's middle adapter unchanged and pass
    gradients back; the device's blocks train exactly as the whole model does with the middle's LoRA
    frozen (AdamW on the rest, same batches)."""
    cfg = _tiny_cfg("gpt2", "training.edge_lr=0")
    whole, knowledge, twin, turn, update = _one_split_turn(cfg)
    middle = {1, 2}
    for name, param in whole.peft.named_parameters():
        if "lora_" in name and layer_of_key(name) in middle:
            param.requires_grad_(False)
    losses, expected = _whole_adamw_steps(whole, twin, cfg, 2)

    assert turn.losses == pytest.approx(losses, rel=1e-5)
    assert set(update.adapter) == set(expected)
    for key, value in expected.items():
        if layer_of_key(key) in middle:
            assert torch.equal(update.adapter[key], knowledge[key]), f"{key} trained on the edge"
        else:
            assert not torch.equal(value, knowledge[key]), f"{key} did not train"
            torch.testing.assert_close(update.adapter[key], value, rtol=1e-5, atol=1e-7)


def test_activation_denoise_takes_the_devices_own_noise_out_of_the_returned_residual():
    """privacy.activation_denoise: the edge gets the same clipped + noised rows, and the device's back
    runs on h_k + (h_m - h_link) (its own hidden state plus the middle's change on the noisy one) instead
    of h_m: worked out here from what crossed the link and a twin device's clean front."""
    noisy = ("privacy.activation_clip=2.0", "privacy.activation_noise=4.0", "training.local_steps=1")
    far = {}
    for denoise in (False, True):
        cfg = _tiny_cfg("gpt2", *noisy, f"privacy.activation_denoise={str(denoise).lower()}")
        model, tok = build_foundation(cfg.model)
        pkg = FoundationPackage.from_model(model, tok)
        edge = edge_trainer(cfg, "edge-0", ["end-0-0"], pkg)
        dev, twin = device_trainer(cfg, "end-0-0", pkg), device_trainer(cfg, "end-0-0", pkg)  # twin: same batches
        cid = "edge-0/c0"
        whole = build_tier_model(pkg, cfg.peft, ModelPart.of(None, True, True))  # the knowledge: LoRA as built
        edge.begin_round(adapter_state(whole.peft), {cid: ["end-0-0"]})
        adapter = edge.begin_turn(cid, "end-0-0", None)
        sent = []

        class Recording(DirectEdgeLink):
            def forward(self, hidden):
                out = super().forward(hidden)
                sent.append((hidden.clone(), out.clone()))
                return out

        turn = dev.train_split_turn(adapter, Recording(edge, cid, "end-0-0"), cid, 1)
        (h_link, h_m), = sent
        load_adapter_state(twin.split.peft, adapter)
        ids, labels = twin._next_batch()
        with torch.no_grad():
            h_k = twin.split.front(ids, dev.cut.front_end)
            assert (h_link - h_k).norm(dim=-1).mean() > 4.0  # the noise is there on the wire
            back_in = h_k + (h_m - h_link) if denoise else h_m
            expected = float(twin.split.back_loss(back_in, dev.cut.back_start, labels))
            clean = edge.forward(cid, "end-0-0", h_k)  # the middle's output had nothing been added
        assert turn.losses == pytest.approx([expected], rel=1e-5)
        far[denoise] = float((back_in - clean).norm(dim=-1).mean())
    assert far[True] < 0.25 * far[False]  # the back's input is far nearer the clean one than h_m is


def _sgd_probe():
    """For one SGD step of a device, worked out in one autograd graph: (the tiny package, the whole
    model with a random adapter, that adapter, the device's first batch (ids, labels), its cut, the
    whole model as a SplitModel, the median row norm at the cut: a clip that clips half the rows)."""
    probe = _tiny_cfg("gpt2")
    model, tok = build_foundation(probe.model)
    pkg = FoundationPackage.from_model(model, tok)
    whole = build_tier_model(pkg, probe.peft, ModelPart.of(None, True, True))
    randomize_lora(whole.peft, seed=7)
    ids, labels = device_trainer(probe, "end-0-0", pkg)._next_batch()
    cut = device_cut(probe.topology, "end-0-0", pkg.num_layers)
    ref = SplitModel(whole.peft)
    with torch.no_grad():
        clip = float(ref.front(ids, cut.front_end).norm(dim=-1).median())
    return pkg, whole, adapter_state(whole.peft), ids, labels, cut, ref, clip


def _sgd_turn(cfg, pkg, knowledge, forward_only: bool = False):
    """end-0-0's one-step turn with SGD of lr 1 through a recording link: (the edge, the turn, the
    hidden states sent). ``forward_only``: a gradient sent to the edge fails the test."""
    edge = edge_trainer(cfg, "edge-0", ["end-0-0"], pkg)
    dev = device_trainer(cfg, "end-0-0", pkg)
    dev._optimizer = lambda: torch.optim.SGD(trainable_parameters(dev.split.peft), lr=1.0)
    cid = "edge-0/c0"
    edge.begin_round(knowledge, {cid: ["end-0-0"]})
    sent = []

    class Recording(DirectEdgeLink):
        def forward(self, hidden):
            sent.append(hidden.clone())
            return super().forward(hidden)

        def backward(self, grad):
            assert not forward_only, "a gradient was sent to the edge"
            return super().backward(grad)

    turn = dev.train_split_turn(edge.begin_turn(cid, "end-0-0", None), Recording(edge, cid, "end-0-0"), cid, 1)
    (wire,) = sent
    return edge, turn, wire


def test_activation_denoise_gradient_is_that_of_the_function_the_back_sees():
    """With denoise the back runs on h_k + (middle(h_link) - h_link), h_link = clip(h_k) + noise: the
    front's gradient is that function's (the residual path straight to h_k, only the middle's own part
    through the clip), worked out here in one autograd graph of the whole model. One SGD step of lr 1,
    so the adapter's change is minus the gradient (AdamW's first step would only show its sign)."""
    pkg, whole, knowledge, ids, labels, cut, ref, clip = _sgd_probe()

    cfg = _tiny_cfg("gpt2", f"privacy.activation_clip={clip}", "privacy.activation_noise=2.0",
                    "privacy.activation_denoise=true", "training.local_steps=1")
    edge, turn, wire = _sgd_turn(cfg, pkg, knowledge)

    def gradient(exact: bool) -> dict[str, torch.Tensor]:
        whole.peft.zero_grad(set_to_none=True)
        h_k = ref.front(ids, cut.front_end)
        clipped = clip_rows(h_k, clip)
        h_link = clipped + (wire - clipped.detach())  # the same noise as was sent
        h_m = ref.blocks(h_link, cut.front_end, cut.back_start)
        back_in = h_m - h_link + h_k if exact else h_m - (h_link - h_k).detach()
        ref.back_loss(back_in, cut.back_start, labels).backward()
        return lora_grads(whole.peft)

    exact, through_clip = gradient(True), gradient(False)
    assert set(turn.adapter) and all(layer_of_key(k) in (0, 3) for k in turn.adapter)  # the device's blocks
    for key, value in turn.adapter.items():
        torch.testing.assert_close(knowledge[key] - value, exact[key], rtol=1e-4, atol=1e-6)
    front = [k for k in turn.adapter if layer_of_key(k) == 0]
    gap = max(float((exact[k] - through_clip[k]).abs().max()) for k in front)
    assert gap > 100 * 1e-6  # the clip's Jacobian on the residual path would give another gradient


def test_nopeek_adds_the_distance_correlations_gradient_to_the_fronts_step():
    """privacy.nopeek_weight w: the device's step is that of loss + w * dCor(token embeddings, h_k)
    over the real (unpadded) positions, worked out in one autograd graph of the whole model; the
    penalty's part is not negligible (the step without it differs), and only the front feels it."""
    from gaisnet_ray.data.encode import lengths_of
    from gaisnet_ray.privacy.noise import nopeek_penalty

    pkg, whole, knowledge, ids, labels, cut, ref, _ = _sgd_probe()
    w = 0.5
    _, turn, _ = _sgd_turn(_tiny_cfg("gpt2", f"privacy.nopeek_weight={w}", "training.local_steps=1"), pkg, knowledge)
    _, plain, _ = _sgd_turn(_tiny_cfg("gpt2", "training.local_steps=1"), pkg, knowledge)

    whole.peft.zero_grad(set_to_none=True)
    h_k = ref.front(ids, cut.front_end)
    with torch.no_grad():
        emb = ref.front(ids, 0)
    mask = torch.arange(ids.shape[1]) < lengths_of(labels)[:, None]
    assert int(mask.sum()) <= 256  # every real row counts: no sampling, so the penalty is deterministic
    loss = ref.back_loss(ref.blocks(h_k, cut.front_end, cut.back_start), cut.back_start, labels)
    (loss + w * nopeek_penalty(emb, h_k, mask)).backward()
    expected = lora_grads(whole.peft)
    for key, value in turn.adapter.items():
        torch.testing.assert_close(knowledge[key] - value, expected[key], rtol=1e-4, atol=1e-6)
    front = [k for k in turn.adapter if layer_of_key(k) == 0]
    assert max(float((turn.adapter[k] - plain.adapter[k]).abs().max()) for k in front) > 1e-4
    for k in turn.adapter:
        if layer_of_key(k) != 0:  # the back's step does not see the penalty
            torch.testing.assert_close(turn.adapter[k], plain.adapter[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("denoise", [True, False])
def test_without_gradients_to_the_edge_the_front_trains_through_the_residual_stream(denoise):
    """privacy.send_gradients false: the device calls its edge's forward only (a backward would fail
    here), the edge's blocks stay at the knowledge's adapter, and the device's step is that of the
    function with the middle's own contribution held constant: h_k + (h_m - h_link).detach() under
    denoise, h_link + (h_m - h_link).detach() (straight through the middle) without. One SGD step of
    lr 1, so the device's adapter change is minus that gradient."""
    pkg, whole, knowledge, ids, labels, cut, ref, clip = _sgd_probe()

    cfg = _tiny_cfg("gpt2", f"privacy.activation_clip={clip}", "privacy.activation_noise=2.0",
                    f"privacy.activation_denoise={str(denoise).lower()}", "privacy.send_gradients=false",
                    "training.local_steps=1")
    edge, turn, wire = _sgd_turn(cfg, pkg, knowledge, forward_only=True)
    cid = "edge-0/c0"
    adapter_bytes = sum(v.numel() * v.element_size() for v in turn.adapter.values())
    assert turn.link.messages_up == 2 and turn.link.bytes_up == wire.numel() * 4 + adapter_bytes  # h_k + adapter
    with pytest.raises(RuntimeError, match="send_gradients is false"):
        edge.backward(cid, "end-0-0", wire)
    update = edge.finish_round({cid: turn})
    for key in update.adapter:
        if layer_of_key(key) in (1, 2):  # the edge's blocks: frozen
            assert torch.equal(update.adapter[key], knowledge[key]), key

    for name, param in whole.peft.named_parameters():  # the middle's contribution is a constant here
        if "lora_" in name and layer_of_key(name) in (1, 2):
            param.requires_grad_(False)
    h_k = ref.front(ids, cut.front_end)
    clipped = clip_rows(h_k, clip)
    h_link = clipped + (wire - clipped.detach())  # the same noise as was sent
    h_m = ref.blocks(h_link, cut.front_end, cut.back_start)
    base = h_k if denoise else h_link
    ref.back_loss(base + (h_m - h_link).detach(), cut.back_start, labels).backward()
    expected = lora_grads(whole.peft)
    assert set(turn.adapter) and all(layer_of_key(k) in (0, 3) for k in turn.adapter)
    for key, value in turn.adapter.items():
        torch.testing.assert_close(knowledge[key] - value, expected[key], rtol=1e-4, atol=1e-6)
    assert any(float(expected[k].abs().max()) > 1e-4 for k in turn.adapter if layer_of_key(k) == 0)  # the front trained


def test_cluster_relay_with_mixed_cuts_equals_reference():
    """Three members in turn with different cuts (end-0-0 and end-0-2: k=1, m=3; end-0-1: k=2, m=3).
    The second member gets the first member's device blocks and the edge's block 1 via the edge; the
    third runs its middle through block 1 as the second member left it. Reference: one whole model
    where the edge's AdamW (blocks the edge ran) persists across the cluster and each device's AdamW
    is fresh for its turn, as in the trainers."""
    cfg = _tiny_cfg("gpt2", "topology.devices_per_edge=3", "topology.device_cuts.end-0-1.front_layers=2",
                    "training.local_steps=1")
    model, tok = build_foundation(cfg.model)
    pkg = FoundationPackage.from_model(model, tok)
    whole = build_tier_model(pkg, cfg.peft, ModelPart.of(None, True, True))
    randomize_lora(whole.peft, seed=11)
    knowledge = adapter_state(whole.peft)

    members = ["end-0-0", "end-0-1", "end-0-2"]
    edge = edge_trainer(cfg, "edge-0", members, pkg)
    assert edge.split.held_layers() == {1, 2}  # union of the members' middle blocks
    devs = {d: device_trainer(cfg, d, pkg) for d in members}
    twins = {d: device_trainer(cfg, d, pkg) for d in members}
    cid = "edge-0/c0"
    edge.begin_round(knowledge, {cid: members})
    previous = None
    held = []
    for d in members:
        adapter = edge.begin_turn(cid, d, previous)
        held.append({layer_of_key(k) for k in adapter})
        previous = devs[d].train_split_turn(adapter, DirectEdgeLink(edge, cid, d), cid, 1)
    update = edge.finish_round({cid: previous})
    assert held == [{0, 3}, {0, 1, 3}, {0, 3}]

    # Reference, parameter by parameter.
    params = {n.replace(".default.", "."): p for n, p in whole.peft.named_parameters() if p.requires_grad}
    by_layer = lambda layers: [p for k, p in params.items() if layer_of_key(k) in layers]  # noqa: E731
    edge_opt = torch.optim.AdamW(by_layer({1, 2}), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    whole.peft.train()
    for d in members:
        cut = devs[d].cut
        dev_opt = torch.optim.AdamW(by_layer(cut.device_layers(4)), lr=cfg.training.lr,
                                    weight_decay=cfg.training.weight_decay)
        ids, labels = twins[d]._next_batch()
        whole.peft(input_ids=ids, labels=labels).loss.backward()
        dev_opt.step()
        for k, p in params.items():  # the edge only gets gradients for the blocks it ran
            if layer_of_key(k) not in cut.edge_layers():
                p.grad = None
        edge_opt.step()
        whole.peft.zero_grad(set_to_none=True)
    expected = adapter_state(whole.peft)
    assert set(update.adapter) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(update.adapter[key], value, rtol=1e-5, atol=1e-7)
    assert update.num_samples == 36
    assert update.device_samples == {"end-0-0": 12, "end-0-1": 12, "end-0-2": 12}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_generation_with_a_kv_cache_per_segment_matches_unsplit_greedy(family):
    """Device front, edge middle and device back each keep their own KV cache; feeding one new
    token at a time gives exactly the unsplit model's greedy tokens (no cache, full recompute)."""
    from transformers import DynamicCache

    from gaisnet_ray.config import ModelConfig, PeftConfig
    from gaisnet_ray.models.adapters import attach_lora, trainable_parameters
    from gaisnet_ray.models.build import build_foundation
    from gaisnet_ray.models.split import SplitModel

    torch.manual_seed(0)
    model, tok = build_foundation(ModelConfig(family=family))
    peft_model = attach_lora(model, PeftConfig(), family)
    for p in trainable_parameters(peft_model):
        torch.nn.init.normal_(p, std=0.3)
    peft_model.eval()
    prompt = torch.tensor([[tok.bos_token_id] + tok.encode("12+7=", add_special_tokens=False)])
    ref = prompt
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, peft_model(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    split = SplitModel(peft_model)
    front, middle, back = (DynamicCache(config=model.config) for _ in range(3))
    out, step, past = prompt, prompt, 0
    with torch.no_grad():
        for _ in range(10):
            h = split.front(step, 1, cache=front, past_len=past)
            h = split.blocks(h, 1, 3, cache=middle, past_len=past)
            logits = split.back(h, 3, cache=back, past_len=past)
            past += step.shape[1]
            step = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, step], 1)
    assert torch.equal(out, ref)
    assert len(set(out[0, prompt.shape[1]:].tolist())) > 1  # a non-trivial continuation
