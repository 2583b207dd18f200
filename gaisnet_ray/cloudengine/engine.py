"""CloudTrainer: full-parameter training of the cloud's causal LM, in plain torch or DeepSpeed.

One object, two engines chosen by ``CloudEngineConfig.engine``:

- ``torch``: AdamW on the model as it is; the reference engine (the cloud's pre-training,
  ``hfsl/cloud_spmd.pretrain``, and its relay training run on whichever engine ``cloud.engine`` names).
- ``deepspeed``: a DeepSpeed engine built from the settings (ZeRO stage, optimizer / parameter
  offload, bf16, gradient accumulation) around a ``torch.optim.AdamW`` (no op to compile), or
  ``DeepSpeedCPUAdam`` when optimizer offload runs on a GPU machine (or when asked for).

Both engines share the semantics of a step: ``step`` takes one micro-batch, backpropagates its
mean token loss divided by ``grad_accum_steps`` and steps the optimizer (and the cosine schedule)
every ``grad_accum_steps`` micro-batches, so an optimizer step follows the mean of the micro-batch
mean losses. Under ZeRO-3 the module's parameters are partitioned (shape (0,)) outside forward;
read them with ``state_dict_for``, which gathers them. The DeepSpeed config comes from
``dsconfig.deepspeed_config``; saving and resuming from ``checkpoint.TrainerCheckpoints``.

deepspeed is imported lazily, inside the methods that need it, so importing gaisnet_ray stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch

from ..config import CloudEngineConfig
from ..data import Example, encode_examples
from .checkpoint import CheckpointError, TrainerCheckpoints
from .dsconfig import deepspeed_config
from .world import World, WorldSpec, close_world, ensure_accelerator, open_world, process_rank

__all__ = ["CheckpointError", "CloudTrainer", "deepspeed_config"]

KeySelection = Iterable[str] | Callable[[str], bool] | None
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]  # (logits, batch) -> scalar loss


class CloudTrainer(TrainerCheckpoints):
    """Trains every trainable parameter of ``model`` (a Hugging Face causal LM, or a peft model).

    ``lr`` and ``weight_decay`` are AdamW's (0.01 is torch's default, what cloud
    pre-training uses); ``total_steps`` > 0 decays the learning rate with a cosine over that many optimizer
    steps (``CosineAnnealingLR``), None keeps it constant. ``optimizer``: ``auto`` picks
    ``DeepSpeedCPUAdam`` only for optimizer offload on a non-CPU accelerator, torch AdamW otherwise;
    ``cpu_adam`` forces it (its op compiles on first use, ~50 s on 2 cores).
    ``deepspeed_overrides`` is merged into the generated DeepSpeed config (see ``deepspeed_config``).
    ``world``: this process's rank in a ``cloud.workers``-process world (``WorldSpec``); every rank
    builds the same model and makes the same calls (DeepSpeed averages gradients across ranks, so
    parameters stay identical), each on its own batches. None: one process.
    """

    def __init__(self, model: torch.nn.Module, settings: CloudEngineConfig | None = None, *, lr: float,
                 weight_decay: float = 0.01, total_steps: int | None = None, micro_batch_size: int = 1,
                 optimizer: Literal["auto", "torch", "cpu_adam"] = "auto", deepspeed_overrides: dict | None = None,
                 world: WorldSpec | None = None):
        self.settings = settings or CloudEngineConfig()
        self.world_spec = world
        self.rank = world.rank if world is not None else 0
        self.micro_steps = 0  # micro-batches seen (across checkpoints)
        self._world: World | None = None
        self._engine = None
        self._closed = False
        self.op_build_s: float | None = None  # DeepSpeedCPUAdam op load (a compile on a cold cache)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad) to train")

        def schedule(opt: torch.optim.Optimizer):
            if total_steps is None or total_steps <= 0:
                return None
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)

        if self.settings.engine == "torch":
            if world is not None and world.size > 1:
                raise ValueError("a multi-worker world needs cloud.engine 'deepspeed'")
            if optimizer == "cpu_adam" or deepspeed_overrides:
                raise ValueError("optimizer='cpu_adam' and deepspeed_overrides need cloud.engine 'deepspeed'")
            self._module = model
            self._optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            self._scheduler = schedule(self._optimizer)
            self._optimizer_steps = 0
            self.device = next(model.parameters()).device
            self.optimizer_kind = "torch.optim.AdamW"
        else:
            ds_config = deepspeed_config(self.settings, micro_batch_size, deepspeed_overrides)
            self._build_deepspeed(model, params, lr, weight_decay, schedule, ds_config, optimizer, world)

    # ------------------------------------------------------------------------------- building
    def _build_deepspeed(self, model, params, lr, weight_decay, schedule, ds_config, optimizer, world) -> None:
        accelerator = ensure_accelerator()
        self._world = open_world(self.settings.workers, world)
        try:
            import deepspeed

            use_cpu_adam = optimizer == "cpu_adam" or (
                optimizer == "auto" and self.settings.offload_optimizer and accelerator != "cpu")
            if use_cpu_adam:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                t0 = time.perf_counter()
                opt = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
                self.op_build_s = time.perf_counter() - t0
                self.optimizer_kind = "deepspeed.ops.adam.DeepSpeedCPUAdam"
            else:
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
                self.optimizer_kind = "torch.optim.AdamW"
            # the callable gets the torch optimizer; ZeRO keeps its param_groups, so lr changes apply
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule, config=ds_config)
        except BaseException:
            close_world(self._world)
            raise
        self._engine = engine
        self._module = engine.module
        self.device = engine.device

    # ------------------------------------------------------------------------------- training
    @property
    def model(self) -> torch.nn.Module:
        """The module, usable for eval (``model(**batch)``); under ZeRO-3 its forward gathers the
        partitioned parameters, but reading ``.weight`` directly gives shape (0,): use
        ``state_dict_for``."""
        return self._module

    @property
    def optimizer_steps(self) -> int:
        return int(self._engine.global_steps) if self._engine is not None else self._optimizer_steps

    def current_lr(self) -> float:
        if self._engine is not None:
            return float(self._engine.get_lr()[0])
        return float(self._optimizer.param_groups[0]["lr"])

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn | None = None) -> float:
        """Forward + backward one micro-batch (``input_ids``, ``labels`` ...; (B, T) each); the
        optimizer steps after every ``grad_accum_steps``-th call. Returns the micro-batch loss.

        ``loss_fn(logits, batch)`` replaces the model's own LM loss (e.g. a distillation KL against
        teacher probabilities carried in ``batch``); the model then sees only ``input_ids`` and
        ``attention_mask``. The loss is backpropagated through the engine either way, so ZeRO,
        offload, bf16 and accumulation apply unchanged."""
        self._check_open()
        self._module.train()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        model_in = batch if loss_fn is None else {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        accum = self.settings.grad_accum_steps
        if self._engine is not None:
            out = self._engine(**model_in)
            loss = out.loss if loss_fn is None else loss_fn(out.logits, batch)
            self._engine.backward(loss)  # divides by grad_accum_steps
            self._engine.step()  # optimizer + schedule only at the accumulation boundary
        else:
            out = self._module(**model_in)
            loss = out.loss if loss_fn is None else loss_fn(out.logits, batch)
            (loss / accum if accum > 1 else loss).backward()
            if (self.micro_steps + 1) % accum == 0:
                self._optimizer.step()
                if self._scheduler is not None:
                    self._scheduler.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._optimizer_steps += 1
        self.micro_steps += 1
        return float(loss.detach().float())

    def train(self, examples: list[Example], tokenizer, *, steps: int, batch_size: int, seq_len: int, seed: int,
              checkpoint_dir: str | Path | None = None, system: str | None = None) -> list[float]:
        """``steps`` optimizer steps on ``examples``; returns each step's mean micro-batch loss.
        ``system``: the chat template's system turn (``data.system_prompt``), as in every tier.

        Batches are drawn from one ``torch.Generator`` seeded with
        ``seed`` (plus the rank in a multi-worker world, so each rank trains on its own batches),
        ``batch_size`` row indices with replacement per micro-batch. The stream is a
        function of (seed, micro-batches already seen), so a trainer resumed from a checkpoint
        continues it where the saved run stopped (given the same examples and batch size). With
        ``checkpoint_dir``, saves every ``checkpoint_every`` optimizer steps and at the end.
        """
        if steps <= 0 or not examples:
            return []
        data = encode_examples(examples, tokenizer, seq_len, system)  # input_ids, labels: (N, T)
        n = data["input_ids"].shape[0]
        b = min(batch_size, n)
        gen = torch.Generator().manual_seed(seed + 1_000_003 * self.rank)
        for _ in range(self.micro_steps):  # skip the batches an earlier (saved) run consumed
            torch.randint(0, n, (b,), generator=gen)
        every = self.settings.checkpoint_every
        losses = []
        for _ in range(steps):
            micro = []
            for _ in range(self.settings.grad_accum_steps):
                idx = torch.randint(0, n, (b,), generator=gen)
                micro.append(self.step({"input_ids": data["input_ids"][idx], "labels": data["labels"][idx]}))
            losses.append(sum(micro) / len(micro))
            if checkpoint_dir is not None and every and self.optimizer_steps % every == 0:
                self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None and not (every and self.optimizer_steps % every == 0):
            self.save_checkpoint(checkpoint_dir)
        self._module.eval()
        return losses

    # ------------------------------------------------------------------------------- reading
    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """state_dict names -> live tensors (parameters as the Parameter objects, tied ones shared)."""
        return self._module.state_dict(keep_vars=True)

    def state_dict_for(self, select: KeySelection = None) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the full values of the selected state-dict entries.

        ``select``: None (everything), an iterable of keys, or a predicate on the key. Names are
        the module's ``state_dict`` names (a peft model's keep the adapter name, e.g.
        ``...lora_A.default.weight``). Under ZeRO-3 each parameter is gathered with
        ``deepspeed.zero.GatheredParameters`` (one at a time, so at most one full tensor beyond
        the copies is live). Tied parameters stay shared in the result.
        """
        self._check_open()
        tensors = self._named_tensors()
        if select is None:
            keys = list(tensors)
        elif callable(select):
            keys = [k for k in tensors if select(k)]
        else:
            keys = list(select)
            unknown = [k for k in keys if k not in tensors]
            if unknown:
                raise KeyError(f"not in the model's state dict: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        out: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}  # id(tensor) -> copy, so tied weights stay tied
        for k in keys:
            t = tensors[k]
            if id(t) not in copies:
                copies[id(t)] = self._full_copy(t)
            out[k] = copies[id(t)]
        return out

    def _full_copy(self, t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "ds_id"):  # a ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                return t.detach().to("cpu", copy=True)
        return t.detach().to("cpu", copy=True)

    def load_params(self, state: dict[str, torch.Tensor]) -> int:
        """Write full values into the named parameters (state-dict names, full shapes); returns
        how many were written. The optimizer's moments are kept.

        Under ZeRO 1-3 (and DeepSpeed bf16) the optimizer holds its own fp32 master copy of each
        trainable parameter and overwrites the module's copy from it at the next step, so writing
        the module copy alone (even under ``GatheredParameters(modifier_rank=0)``) is undone by
        the next step. This writes both: the master (``deepspeed.utils.safe_set_full_fp32_param``)
        and the module copy (gathered under ZeRO-3).
        """
        self._check_open()
        tensors = self._named_tensors()
        unknown = [k for k in state if k not in tensors]
        if unknown:
            raise KeyError(f"not in the model's state dict: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for k, value in state.items():
            t = tensors[k]
            shape = tuple(getattr(t, "ds_shape", t.shape))
            if tuple(value.shape) != shape:
                raise ValueError(f"'{k}': shape {tuple(value.shape)} != model {shape}")
        done: set[int] = set()
        with torch.no_grad():
            for k, value in state.items():
                t = tensors[k]
                if id(t) in done:
                    continue
                done.add(id(t))
                if self._engine is not None and isinstance(t, torch.nn.Parameter) and t.requires_grad:
                    from deepspeed.utils import safe_set_full_fp32_param

                    safe_set_full_fp32_param(t, value.to(t.device, torch.float32))  # no-op without a master copy
                if hasattr(t, "ds_id"):  # ZeRO-3: write the gathered tensor, re-partitioned on exit
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                        if process_rank() == 0:
                            t.data.copy_(value.to(t.device, t.dtype))
                else:
                    t.data.copy_(value.to(t.device, t.dtype))
        return len(done)

    def export_hf(self, directory: str | Path, tokenizer=None, dtype: torch.dtype | None = torch.float32) -> Path:
        """A consolidated Hugging Face folder (``AutoModelForCausalLM.from_pretrained`` loads it).

        Under ZeRO-3 the full parameters are gathered first (``state_dict_for``). Floating-point
        weights are written as ``dtype`` (default fp32, so a bf16-trained model exports the bf16
        weights it computes with, widened; None keeps the module's dtype). Only plain
        ``PreTrainedModel``s export this way; a peft model's adapter goes through the knowledge
        store instead.
        """
        self._check_open()
        from transformers import AutoConfig, PreTrainedModel

        if not isinstance(self._module, PreTrainedModel):
            raise TypeError(f"export_hf writes a full causal LM; the trained module is a {type(self._module).__name__}")
        directory = Path(directory)
        state = self.state_dict_for(None)  # a collective under ZeRO-3: every rank gathers
        if dtype is not None:
            cast: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
            for k, v in state.items():
                if id(v) not in cast:
                    cast[id(v)] = v.to(dtype) if v.is_floating_point() else v
                state[k] = cast[id(v)]
        if process_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            self._module.save_pretrained(directory, state_dict=state)
            if dtype is not None:  # config.json records the module's dtype; make it say what was written
                config = AutoConfig.from_pretrained(directory)
                if config.dtype != dtype:
                    config.dtype = dtype
                    config.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        return directory

    # ------------------------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CloudTrainer is closed")

    def close(self) -> None:
        """Release the DeepSpeed engine and, if this trainer created the process group, end it
        (barrier, destroy). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            try:
                self._engine.destroy()
            finally:
                self._engine = None
                if self._world is not None:
                    close_world(self._world)

    def __enter__(self) -> "CloudTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
