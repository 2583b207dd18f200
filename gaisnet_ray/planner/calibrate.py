"""Calibrate this host's compute speed from a measured training step of the model.

One block of the model (its real hidden, intermediate and head sizes, random weights: nothing is
loaded) trains a few LoRA-like steps at the run's batch and sequence length (weights frozen, input
gradients computed, as under LoRA), on the torch threads an end device gets; the speed is the cost
model's FLOPs of that step over its measured time.
"""

from __future__ import annotations

import sys
import time

from ..config import Config
from .cost import RoundShape

WARMUP_STEPS = 1


def measure_apart(cfg: Config, model_config: dict) -> float:
    """``measure_host_gflops``, in a fresh child process when this one has not loaded torch (the
    ``gaisnet run`` driver): the step needs torch and transformers (~3 s of imports, ~400 MB), which
    then leave with the child instead of staying in the driver for the whole run. The child measures
    on the same torch threads, so the speed is the same."""
    if "torch" in sys.modules:
        return measure_host_gflops(cfg, model_config)
    import multiprocessing

    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_measure_quietly, cfg, model_config).result()


def _measure_quietly(cfg: Config, model_config: dict) -> float:
    """The child's measurement. It has no run log to route transformers' advisories into (the
    driver's ``RunLog`` does that in process), so they are silenced here rather than printed on the
    user's console; errors still print."""
    from ..logs import quiet_libraries

    quiet_libraries("cpu")
    return measure_host_gflops(cfg, model_config)


def measure_host_gflops(cfg: Config, model_config: dict, steps: int = 2) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.sources import quiet_transformers

    shape = RoundShape.from_config(cfg, model_config)
    one = {k: v for k, v in model_config.items() if k != "model_type"}
    one["num_hidden_layers" if "num_hidden_layers" in one else "n_layer"] = 1
    one.pop("quantization_config", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.topology.end.torch_threads or cfg.run.torch_threads)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_config["model_type"], **one))
        model.loss_type = "ForCausalLM"  # as models.build does: transformers need not guess (and say so)
        model.float().train()
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        b, t, h = shape.batch, shape.seq, shape.geometry.hidden
        labels = torch.randint(0, shape.geometry.vocab, (b, t), generator=gen)
        elapsed = 0.0
        for i in range(WARMUP_STEPS + steps):
            x = torch.randn(b, t, h, generator=gen, requires_grad=True)
            started = time.perf_counter()
            loss = model(inputs_embeds=x, labels=labels).loss
            loss.backward()
            if i >= WARMUP_STEPS:
                elapsed += time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    flops = steps * (shape.block_train_flops() + shape.head_train_flops(supervised=1.0))
    return flops / max(elapsed, 1e-9) / 1e9
