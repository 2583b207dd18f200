"""Tests for gaisnet_ray.cloudengine: settings, and CloudTrainer on plain torch and DeepSpeed (CPU).

Tiny GPT-2 models built from config, one process. Each DeepSpeed trainer creates its own
single-process gloo world and ends it on close() (DeepSpeed's destroy_process_group also drops
its cached groups, so the next trainer starts a fresh world); one test joins a world that
already exists and must leave it alone. DeepSpeed tests are skipped only if deepspeed does not
import.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GPT2Config

from gaisnet_ray.cloudengine import CheckpointError, CloudEngineConfig, CloudTrainer, deepspeed_config
from gaisnet_ray.cloudengine.world import close_world, ensure_accelerator, open_world
from gaisnet_ray.config import DataConfig, ModelConfig, PeftConfig
from gaisnet_ray.data import Example, encode_examples, public_examples
from gaisnet_ray.models.adapters import attach_lora
from gaisnet_ray.models.build import build_foundation
from gaisnet_ray.models.tokenizer import build_byte_tokenizer

torch.set_num_threads(1)
# DeepSpeed 0.19 decorates with torch.jit.script_method at import; torch 2.13 deprecates it (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _deepspeed_imports() -> bool:
    ensure_accelerator()  # DS_ACCELERATOR=cpu before the import when there is no CUDA
    try:
        import deepspeed  # noqa: F401
    except Exception:  # any import failure (missing, broken build) means: skip, never fail
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not _deepspeed_imports(), reason="deepspeed does not import here")

VOCAB, T = 64, 12


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """2 layers, 32 wide, ~30k parameters, no dropout (so steps are deterministic)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1,
                     pad_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.loss_type = "ForCausalLM"
    return model


def batch(rows: int = 4, seed: int = 1, mask_from: int | None = None) -> dict[str, torch.Tensor]:
    """(rows, T) random tokens; labels = inputs, with positions >= mask_from set to -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, T), generator=g)
    labels = ids.clone()
    if mask_from is not None:
        labels[:, mask_from:] = -100
    return {"input_ids": ids, "labels": labels}


def ds(**kw) -> CloudEngineConfig:
    return CloudEngineConfig(engine="deepspeed", **kw)


def params_of(trainer: CloudTrainer, select=None) -> dict[str, torch.Tensor]:
    return trainer.state_dict_for(select)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {float((a[k] - b[k]).abs().max())}"


# ------------------------------------------------------------------------------------ settings
def test_settings_defaults_are_plain_torch():
    s = CloudEngineConfig()
    assert (s.engine, s.zero_stage, s.precision, s.grad_accum_steps, s.workers, s.checkpoint_every) == (
        "torch", 0, "fp32", 1, 1, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(engine="deepspeed", zero_stage=2, offload_params=True),
     r"cloud\.offload_params \(true\) needs cloud\.zero_stage 3, got cloud\.zero_stage 2"),
    (dict(engine="torch", workers=2), r"cloud\.workers \(2\) > 1 needs cloud\.engine 'deepspeed'"),
    (dict(engine="deepspeed", offload_optimizer=True), r"cloud\.offload_optimizer .* needs cloud\.zero_stage >= 1"),
    (dict(engine="torch", zero_stage=2), r"cloud\.zero_stage \(2\) need cloud\.engine 'deepspeed'"),
    (dict(engine="torch", precision="bf16"), r"cloud\.precision \('bf16'\) need cloud\.engine 'deepspeed'"),
    (dict(zero_stage=4), r"less than or equal to 3"),
    (dict(grad_accum_steps=0), r"greater than or equal to 1"),
    (dict(stage=2), r"Extra inputs are not permitted"),
], ids=["offload_params-without-zero3", "workers-2-torch", "offload_optimizer-zero0", "torch-with-zero",
        "torch-with-bf16", "zero_stage-4", "grad_accum-0", "unknown-key"])
def test_bad_settings_name_the_fields(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        CloudEngineConfig(**kwargs)


def test_deepspeed_config_from_settings():
    cfg = deepspeed_config(ds(zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16",
                              grad_accum_steps=4), micro_batch_size=8)
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "cpu"}}
    assert cfg["bf16"] == {"enabled": True}
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        8, 4, 32)
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload: no cpu_adam compile


def test_importing_the_engine_does_not_import_deepspeed_or_ray():
    code = ("import sys; from gaisnet_ray.cloudengine import CloudTrainer; "
            "print(sorted(m for m in ('deepspeed', 'ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['torch']"  # deepspeed loads only when a DeepSpeed engine is built


# ------------------------------------------------------------------------------- torch engine
def reference_pretrain(model, tokenizer, examples: list[Example], *, steps: int, lr: float, batch_size: int,
                        seq_len: int, seed: int) -> list[float]:
    """The plain torch loop CloudTrainer(engine="torch") must reproduce bit for bit."""
    if steps <= 0 or not examples:
        return []
    batch = encode_examples(examples, tokenizer, seq_len)
    n = batch["input_ids"].shape[0]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = model(input_ids=batch["input_ids"][idx].to(device), labels=batch["labels"][idx].to(device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def test_torch_engine_reproduces_a_plain_torch_loop_exactly():
    """CloudTrainer(engine=torch) is plain AdamW + cosine schedule, same batch sampling, bit for bit."""
    mcfg = ModelConfig()
    examples = public_examples(DataConfig(public_samples=24))
    ref_model, tok = build_foundation(mcfg)
    ref_losses = reference_pretrain(ref_model, tok, examples, steps=3, lr=3e-3, batch_size=4,
                                     seq_len=mcfg.max_seq_len, seed=5)
    model, _ = build_foundation(mcfg)
    with CloudTrainer(model, lr=3e-3, total_steps=3) as trainer:
        losses = trainer.train(examples, tok, steps=3, batch_size=4, seq_len=mcfg.max_seq_len, seed=5)
        assert losses == ref_losses
        assert_same(params_of(trainer), {k: v.detach() for k, v in ref_model.state_dict().items()})
        assert not trainer.model.training  # left in eval mode, ready for evaluation


# ------------------------------------------------------------------------- deepspeed vs torch
@needs_deepspeed
@pytest.mark.parametrize("stage, offload", [(0, False), (2, False), (2, True), (3, True)],
                         ids=["zero0", "zero2", "zero2-offload", "zero3-offload-all"])
def test_deepspeed_step_matches_torch_adamw(stage, offload):
    """Tolerance 0 (bit-equal), and that is the truth here, not luck: in one fp32 process every
    step DeepSpeed adds is a copy or a multiplication by 1.0 (gradient averaging over a world of 1,
    no clipping), ZeRO-2 only flattens parameters into one buffer, and AdamW is elementwise, so
    flattening does not change any rounding. (With several ranks the all-reduce summation order
    would give ~1e-7 relative differences, and bf16 ~1e-2.) Offload only moves the optimizer
    state (and, at stage 3, the parameters) to the CPU, which here is where they already are."""
    b1, b2 = batch(seed=1), batch(seed=2)
    ref = CloudTrainer(tiny_gpt2(), lr=1e-2, total_steps=4)
    ref_losses = [ref.step(b1), ref.step(b2)]
    settings = ds(zero_stage=stage, offload_optimizer=offload, offload_params=offload and stage == 3)
    with CloudTrainer(tiny_gpt2(), settings, lr=1e-2, total_steps=4) as trainer:
        assert trainer.optimizer_kind == "torch.optim.AdamW"  # on the CPU: no cpu_adam compile
        losses = [trainer.step(b1), trainer.step(b2)]
        assert trainer.optimizer_steps == 2 and trainer.current_lr() == ref.current_lr() < 1e-2  # cosine moved
        assert losses == ref_losses
        after = params_of(trainer)
    before = {k: v.detach() for k, v in tiny_gpt2().state_dict().items()}
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the steps changed the weights
    assert_same(after, params_of(ref))


@needs_deepspeed
@pytest.mark.parametrize("persist", ["default", "none"])
def test_zero3_partitions_params_and_gathers_lora_adapter(persist):
    """Stage 3 with a peft LoRA model: parameters are (0,)-shaped outside forward, and
    state_dict_for gathers the adapter (and frozen base) values the torch reference has.

    What DeepSpeed really does: every parameter is partitioned when the engine is built, but those
    under ``stage3_param_persistence_threshold`` (default 1e5 elements: every tensor of this tiny
    model, and LoRA tensors of real ones) stay gathered after their first forward. With the
    threshold at 0 they are re-partitioned after every use. The gather is right either way."""
    pcfg = PeftConfig(r=4, alpha=8.0)
    b1, b2 = batch(seed=3), batch(seed=4)
    ref = CloudTrainer(attach_lora(tiny_gpt2(), pcfg, "gpt2"), lr=1e-2)
    ref.step(b1), ref.step(b2)
    lora = lambda k: "lora_" in k  # noqa: E731
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if persist == "none" else None
    with CloudTrainer(attach_lora(tiny_gpt2(), pcfg, "gpt2"), ds(zero_stage=3), lr=1e-2,
                      deepspeed_overrides=overrides) as trainer:
        shapes = lambda: [tuple(p.shape) for p in trainer.model.parameters()]  # noqa: E731
        assert shapes() and all(s == (0,) for s in shapes())  # partitioned as built
        trainer.step(b1), trainer.step(b2)
        if persist == "none":
            assert all(s == (0,) for s in shapes())  # re-partitioned after forward/backward
        else:
            assert all(s != (0,) for s in shapes())  # small tensors persist, gathered
        got = params_of(trainer, lora)
        assert len(got) == 2 * 4 * 2  # lora_A, lora_B x (c_attn, attn/mlp c_proj, c_fc) x 2 layers
        assert all(got[k].numel() > 0 for k in got)
        b_keys = [k for k in got if "lora_B" in k]
        assert all(got[k].abs().max() > 0 for k in b_keys)  # B starts at 0: training moved it
        assert_same(got, params_of(ref, lora))
        base_key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"
        assert_same(params_of(trainer, [base_key]), params_of(ref, [base_key]))  # frozen base, gathered
        if persist == "none":
            assert all(s == (0,) for s in shapes())  # the gather released the full tensors again


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_load_params_survives_the_next_step(stage):
    """Writing a parameter must reach the optimizer's fp32 master copy (ZeRO 1-3), or the next step
    puts the old value back: with lr=0 and no weight decay a step changes nothing, so the written
    values must still be there after it. Covers a frozen base weight and a LoRA weight."""
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None
    lora_key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
    base_key = "base_model.model.transformer.h.1.mlp.c_fc.base_layer.weight"
    with CloudTrainer(attach_lora(tiny_gpt2(), PeftConfig(r=4), "gpt2"), ds(zero_stage=stage), lr=0.0,
                      weight_decay=0.0, deepspeed_overrides=overrides) as trainer:
        trainer.step(batch())
        new = {lora_key: torch.full((96, 4), 0.5), base_key: torch.full((32, 64), -0.25)}
        assert trainer.load_params(new) == 2
        assert_same(params_of(trainer, list(new)), new)
        trainer.step(batch(seed=2))
        assert_same(params_of(trainer, list(new)), new)
        with pytest.raises(ValueError, match=r"shape \(3,\) != model \(96, 4\)"):
            trainer.load_params({lora_key: torch.zeros(3)})


# ------------------------------------------------------------------------ gradient accumulation
def _torch_step_on(model, losses_fn) -> dict[str, torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses_fn(model).backward()
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("settings", [
    CloudEngineConfig(grad_accum_steps=2),
    pytest.param(CloudEngineConfig(engine="deepspeed", zero_stage=2, grad_accum_steps=2), marks=needs_deepspeed),
], ids=["torch", "deepspeed-zero2"])
def test_grad_accumulation_is_mean_of_micro_batch_means(settings):
    """DeepSpeed divides each micro-batch loss by grad_accum_steps before backward (engine.backward,
    scale_wrt_gas=True), so one optimizer step follows mean(micro-batch mean losses). With equal
    label-token counts per micro-batch that is the loss of the concatenated batch; with unequal
    counts it is not, and the engine follows the mean of means. The torch engine does the same."""
    # equal counts: 2 x 4 rows, every label kept -> equals one step on the 8 concatenated rows
    m1, m2 = batch(seed=5), batch(seed=6)
    cat = {k: torch.cat([m1[k], m2[k]]) for k in m1}
    ref_cat = _torch_step_on(tiny_gpt2(), lambda m: m(**cat).loss)
    with CloudTrainer(tiny_gpt2(), settings, lr=1e-3) as trainer:
        trainer.step(m1)
        assert trainer.optimizer_steps == 0  # no optimizer step after the first micro-batch
        trainer.step(m2)
        assert trainer.optimizer_steps == 1
        got = params_of(trainer)
    # mean over 8 rows vs mean of two 4-row means: the same value up to float summation order
    # (~1e-7 relative in the gradient). AdamW's first step maps each gradient entry g to
    # lr * g / (|g| + eps), which amplifies absolute differences by up to 1/eps on near-zero
    # entries, so the weights agree to ~lr * 1e-3 (measured 7e-7 here), not bit for bit:
    # atol 1e-5 = lr / 100, still 200x below the gap between the two semantics below (2e-3).
    for k in ref_cat:
        torch.testing.assert_close(got[k], ref_cat[k], rtol=0, atol=1e-5)

    # unequal counts: the second micro-batch keeps 3 of 12 label positions per row
    u1, u2 = batch(seed=5), batch(seed=6, mask_from=3)
    ucat = {k: torch.cat([u1[k], u2[k]]) for k in u1}
    ref_means = _torch_step_on(tiny_gpt2(), lambda m: (m(**u1).loss + m(**u2).loss) / 2)
    ref_tokens = _torch_step_on(tiny_gpt2(), lambda m: m(**ucat).loss)
    with CloudTrainer(tiny_gpt2(), settings, lr=1e-3) as trainer:
        trainer.step(u1), trainer.step(u2)
        got = params_of(trainer)
    gap = max(float((ref_means[k] - ref_tokens[k]).abs().max()) for k in got)
    assert gap > 1e-3  # the two semantics really differ here (by ~2 lr on some weights)
    for k in got:  # same summands in a different order (measured 2e-9): 1e-6 is 1000x below the gap
        torch.testing.assert_close(got[k], ref_means[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("settings", [
    CloudEngineConfig(),
    pytest.param(CloudEngineConfig(engine="deepspeed", zero_stage=2), marks=needs_deepspeed),
], ids=["torch", "deepspeed-zero2"])
def test_checkpoint_then_resume_continues_exactly(tmp_path, settings):
    """Train 3 steps, checkpoint, resume in a fresh trainer (different init): step 4's loss and the
    weights after it equal those of an uninterrupted run, bit for bit (model, AdamW moments,
    cosine schedule, step counters and the batch stream are all restored)."""
    tok = build_byte_tokenizer()
    model_cfg = ModelConfig(max_seq_len=48)
    examples = public_examples(DataConfig(public_samples=16))
    run = dict(batch_size=4, seq_len=48, seed=7)

    def fresh(seed):
        model, _ = build_foundation(model_cfg.model_copy(update={"seed": seed}))
        return CloudTrainer(model, settings, lr=3e-3, total_steps=6)

    with fresh(0) as straight:
        straight_losses = straight.train(examples, tok, steps=4, **run)
        straight_params = params_of(straight)
    with fresh(0) as first:
        assert first.train(examples, tok, steps=3, **run, checkpoint_dir=tmp_path / "ckpt") == straight_losses[:3]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step3"
    with fresh(1) as resumed:
        assert resumed.load_checkpoint(tmp_path / "ckpt") == 3
        assert resumed.train(examples, tok, steps=1, **run) == straight_losses[3:]
        assert_same(params_of(resumed), straight_params)


@needs_deepspeed
def test_checkpoint_from_another_engine_is_refused(tmp_path):
    with CloudTrainer(tiny_gpt2(), lr=1e-3) as trainer:
        trainer.step(batch())
        trainer.save_checkpoint(tmp_path)
    with CloudTrainer(tiny_gpt2(), ds(zero_stage=2), lr=1e-3) as trainer:
        with pytest.raises(CheckpointError, match=r"cloud\.engine='torch'.*cloud\.engine='deepspeed'"):
            trainer.load_checkpoint(tmp_path)
        with pytest.raises(CheckpointError, match="holds no checkpoint"):
            trainer.load_checkpoint(tmp_path / "nothing")


# ----------------------------------------------------------------------------------- export
@needs_deepspeed
def test_export_hf_under_zero3_loads_with_the_engine_logits(tmp_path):
    b = batch(seed=8)
    with CloudTrainer(tiny_gpt2(), ds(zero_stage=3), lr=1e-2) as trainer:
        trainer.step(b)
        out = trainer.export_hf(tmp_path / "hf", build_byte_tokenizer())
        trainer.model.eval()
        with torch.no_grad():
            engine_logits = trainer.model(input_ids=b["input_ids"]).logits  # (B, T, V), params gathered in forward
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    with torch.no_grad():
        logits = loaded(input_ids=b["input_ids"]).logits
    # same fp32 weights, same kernels; only the ZeRO-3 gather path differs -> fp32 default tolerance
    torch.testing.assert_close(logits, engine_logits)
    assert (out / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- world lifecycle
@needs_deepspeed
def test_trainer_ends_the_world_it_created_and_leaves_one_it_joined():
    import torch.distributed as dist

    assert not dist.is_initialized()
    absent = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    trainer = CloudTrainer(tiny_gpt2(), ds(zero_stage=1), lr=1e-3)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    trainer.step(batch())
    trainer.close()
    trainer.close()  # idempotent
    assert not dist.is_initialized()
    assert all(k not in os.environ for k in absent)  # variables it set are gone again

    world = open_world()  # a group someone else owns: the trainer joins and leaves it open
    try:
        with CloudTrainer(tiny_gpt2(), ds(zero_stage=2), lr=1e-3) as trainer:
            trainer.step(batch())
        assert dist.is_initialized()
    finally:
        close_world(world)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="closed"):
        trainer.step(batch())


@needs_deepspeed
def test_bf16_step_tracks_fp32_and_exports_fp32(tmp_path):
    b = batch(seed=9)
    ref = CloudTrainer(tiny_gpt2(), lr=1e-3)
    ref_loss = ref.step(b)
    key = "transformer.h.0.attn.c_attn.weight"
    with CloudTrainer(tiny_gpt2(), ds(zero_stage=2, precision="bf16"), lr=1e-3) as trainer:
        loss = trainer.step(b)
        assert next(trainer.model.parameters()).dtype == torch.bfloat16
        weight = params_of(trainer, [key])[key]
        out = trainer.export_hf(tmp_path / "hf")  # default dtype fp32
    assert loss == pytest.approx(ref_loss, rel=2e-2)  # bf16 has 8 mantissa bits (~0.4% per op)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.dtype == torch.float32 and loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, weight.float())  # the bf16 weights, widened
