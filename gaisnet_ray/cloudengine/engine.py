"""CloudTrainer: full-parameter training of the cloud's causal LM, in plain torch or DeepSpeed.

One object, two engines chosen by ``CloudEngineConfig.engine``:

- ``torch``: AdamW on the model as it is; the reference, and what ``hfsl/pretrain.py`` does
  (``train`` reproduces ``pretrain_foundation`` exactly: same batch sampling, optimizer, schedule).
- ``deepspeed``: a DeepSpeed engine built from the settings (ZeRO stage, optimizer / parameter
  offload, bf16, gradient accumulation) around a ``torch.optim.AdamW`` (no op to compile), or
  ``DeepSpeedCPUAdam`` when optimizer offload runs on a GPU machine (or when asked for).

Both engines share the semantics of a step: ``step`` takes one micro-batch, backpropagates its
mean token loss divided by ``grad_accum_steps`` and steps the optimizer (and the cosine schedule)
every ``grad_accum_steps`` micro-batches, so an optimizer step follows the mean of the micro-batch
mean losses. Under ZeRO-3 the module's parameters are partitioned (shape (0,)) outside forward;
read them with ``state_dict_for``, which gathers them.

deepspeed is imported lazily, inside the methods that need it, so importing gaisnet_ray stays fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch

from ..data import Example, encode_examples
from .settings import CloudEngineConfig
from .world import World, WorldSpec, close_world, ensure_accelerator, open_world

__all__ = ["CheckpointError", "CloudTrainer", "deepspeed_config"]

LATEST = "latest"  # DeepSpeed's name for the file holding the newest checkpoint tag; used for both engines
META_NAME = "cloud_engine.json"  # beside each checkpoint tag: settings, steps, time
TORCH_STATE_NAME = "trainer_state.pt"  # the torch engine's checkpoint inside a tag folder

KeySelection = Iterable[str] | Callable[[str], bool] | None
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]  # (logits, batch) -> scalar loss


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointError(ValueError):
    """A checkpoint folder is missing, or was written by a different engine or ZeRO stage."""


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(settings: CloudEngineConfig, micro_batch_size: int = 1, overrides: dict | None = None) -> dict:
    """The DeepSpeed config dict for ``settings`` (one process: train batch = micro x accumulation).

    ``micro_batch_size`` only feeds DeepSpeed's bookkeeping (samples counted, throughput logs); the
    batches ``step`` receives may have any size. ``overrides`` is merged in last (nested dicts
    merge), for DeepSpeed options the settings do not cover, e.g.
    ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``.
    """
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "train_batch_size": micro_batch_size * settings.grad_accum_steps * settings.workers,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.precision == "bf16"},
        "gradient_clipping": 0.0,
        # a torch optimizer with offload is allowed (on the CPU it is the same work as cpu_adam)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merged(config, overrides or {})


class CloudTrainer:
    """Trains every trainable parameter of ``model`` (a Hugging Face causal LM, or a peft model).

    ``lr`` and ``weight_decay`` are AdamW's (0.01 is torch's default, what ``pretrain_foundation``
    uses); ``total_steps`` > 0 decays the learning rate with a cosine over that many optimizer
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

        Batches are drawn as in ``pretrain_foundation``: one ``torch.Generator`` seeded with
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
                        if _rank() == 0:
                            t.data.copy_(value.to(t.device, t.dtype))
                else:
                    t.data.copy_(value.to(t.device, t.dtype))
        return len(done)

    # ------------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {"settings": self.settings.model_dump(mode="json"), "micro_steps": self.micro_steps,
                "optimizer_steps": self.optimizer_steps, "optimizer": self.optimizer_kind,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Everything needed to resume (model, optimizer, schedule, steps, RNG) under
        ``directory/step<N>``; ``directory/latest`` names the newest tag. DeepSpeed writes its own
        (per-rank, ZeRO-partitioned) checkpoint; the torch engine one ``trainer_state.pt``."""
        self._check_open()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f"step{self.optimizer_steps}"
        client = {"micro_steps": self.micro_steps, "torch_rng": torch.get_rng_state()}
        if self._engine is not None:
            self._engine.save_checkpoint(str(directory), tag=tag, client_state=client)
        else:
            (directory / tag).mkdir(exist_ok=True)
            state = {
                "model": self._module.state_dict(),
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
                "optimizer_steps": self._optimizer_steps,
                **client,
            }
            torch.save(state, directory / tag / TORCH_STATE_NAME)
            (directory / LATEST).write_text(tag)
        if _rank() == 0:
            (directory / tag / META_NAME).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return directory / tag

    def load_checkpoint(self, directory: str | Path) -> int:
        """Resume from the newest checkpoint in ``directory`` (written by the same engine and ZeRO
        stage); returns the optimizer step it was saved at."""
        self._check_open()
        directory = Path(directory)
        if not (directory / LATEST).is_file():
            raise CheckpointError(f"'{directory}' holds no checkpoint (no '{LATEST}' file)")
        tag = (directory / LATEST).read_text().strip()
        meta_path = directory / tag / META_NAME
        if not meta_path.is_file():
            raise CheckpointError(f"checkpoint '{directory / tag}' has no {META_NAME}")
        saved = json.loads(meta_path.read_text())["settings"]
        for key in ("engine", "zero_stage"):
            if saved[key] != getattr(self.settings, key):
                raise CheckpointError(
                    f"checkpoint '{directory / tag}' was written with cloud.{key}={saved[key]!r}, this trainer "
                    f"has cloud.{key}={getattr(self.settings, key)!r}; resume with the same settings, or start "
                    "from its exported Hugging Face folder instead")
        if self._engine is not None:
            path, client = self._engine.load_checkpoint(str(directory), tag=tag)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint '{directory / tag}'")
        else:
            # CPU first (the RNG state must stay a CPU tensor); load_state_dict moves to the model's device
            client = torch.load(directory / tag / TORCH_STATE_NAME, map_location="cpu", weights_only=False)
            self._module.load_state_dict(client["model"])
            self._optimizer.load_state_dict(client["optimizer"])
            if self._scheduler is not None and client["scheduler"] is not None:
                self._scheduler.load_state_dict(client["scheduler"])
            self._optimizer_steps = client["optimizer_steps"]
        self.micro_steps = int(client["micro_steps"])
        torch.set_rng_state(client["torch_rng"])
        return self.optimizer_steps

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
        if _rank() == 0:
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
