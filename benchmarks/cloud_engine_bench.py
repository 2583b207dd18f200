"""Cloud training on DeepSpeed vs plain torch: throughput (tokens/s, and the ratio) and peak memory
per ZeRO stage, with and without optimizer (and parameter) offload.

Model: the `base` GPT-2 preset (8 layers, 256 wide, 5.35 M parameters; 28x the default `tiny`),
trained full-parameter by `gaisnet_ray.cloudengine.CloudTrainer` on the built-in public examples
(batch 8 x 48 tokens, AdamW lr 1e-3). Every configuration runs in its own subprocess (fresh
interpreter, OMP_NUM_THREADS=1 and torch.set_num_threads(1)) so memory peaks never mix:

  1. import torch/transformers/deepspeed, build the model (seeded, identical in every config);
  2. reset the RSS high-water mark (write "5" to /proc/self/clear_refs) -> rss_before;
  3. build the trainer (DeepSpeed engine or torch AdamW), `--warmup` steps, then `--steps` timed
     steps -> tokens/s = steps x batch x seq_len / wall of the timed steps;
  4. VmHWM -> peak RSS of phase 3 (engine + gradients + optimizer state + activations).

`torch` runs first and last; the ratio divides by the mean of the two, so drifting load from other
processes hits both sides. Optimizer offload uses torch AdamW by default (the engine's choice on a
CPU: the same work as cpu_adam, no compile); one extra row runs DeepSpeedCPUAdam and reports its op
build time (a compile on a cold cache) separately from throughput.

    python benchmarks/cloud_engine_bench.py            # ~4 min on 2 busy cores with a warm op cache;
                                                       # a cold cpu_adam compile adds 1-4 min
    python benchmarks/cloud_engine_bench.py --no-cpu-adam --steps 6
    python benchmarks/cloud_engine_bench.py --with-bf16  # adds ZeRO-2 bf16 (slow without AVX512-BF16/AMX)

Writes benchmarks/results/cloud_engine_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _common import REPO, envelope, fmt_bytes, footer, md_table, write_results

NAME = "cloud_engine_bench"

# name -> (settings for CloudEngineConfig, optimizer choice)
CONFIGS: dict[str, tuple[dict, str]] = {
    "torch": ({"engine": "torch"}, "auto"),
    "ds-zero0": ({"engine": "deepspeed", "zero_stage": 0}, "auto"),
    "ds-zero1": ({"engine": "deepspeed", "zero_stage": 1}, "auto"),
    "ds-zero2": ({"engine": "deepspeed", "zero_stage": 2}, "auto"),
    "ds-zero3": ({"engine": "deepspeed", "zero_stage": 3}, "auto"),
    "ds-zero1+offload_opt": ({"engine": "deepspeed", "zero_stage": 1, "offload_optimizer": True}, "auto"),
    "ds-zero2+offload_opt": ({"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True}, "auto"),
    "ds-zero3+offload_opt": ({"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": True}, "auto"),
    "ds-zero3+offload_opt+params": (
        {"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True}, "auto"),
}
CPU_ADAM = ("ds-zero2+offload_opt (cpu_adam)",
            ({"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True}, "cpu_adam"))
BF16 = ("ds-zero2 bf16", ({"engine": "deepspeed", "zero_stage": 2, "precision": "bf16"}, "auto"))


# ------------------------------------------------------------------------------ one configuration
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(spec: dict) -> dict:
    """Runs inside the subprocess: build, warm up, time, measure the peak."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from gaisnet_ray.cloudengine import CloudEngineConfig, CloudTrainer
    from gaisnet_ray.cloudengine.world import ensure_accelerator
    from gaisnet_ray.config import DataConfig, ModelConfig
    from gaisnet_ray.data import encode_examples, public_examples
    from gaisnet_ray.models.build import build_foundation

    settings = CloudEngineConfig(**spec["settings"])
    if settings.engine == "deepspeed":
        ensure_accelerator()
        import deepspeed  # noqa: F401  (import cost outside the measured phases)
    mcfg = ModelConfig(preset=spec["preset"], max_seq_len=spec["seq_len"])
    model, tok = build_foundation(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    data = encode_examples(public_examples(DataConfig(public_samples=256)), tok, spec["seq_len"])
    gen = torch.Generator().manual_seed(0)
    n, b = data["input_ids"].shape[0], spec["batch_size"]
    batches = []
    for _ in range(spec["warmup"] + spec["steps"]):
        idx = torch.randint(0, n, (b,), generator=gen)
        batches.append({"input_ids": data["input_ids"][idx], "labels": data["labels"][idx]})

    peak_import_kib = _status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS
        reset = True
    except OSError:
        reset = False
    rss_before_kib = _status_kib("VmRSS")

    t0 = time.perf_counter()
    trainer = CloudTrainer(model, settings, lr=1e-3, micro_batch_size=b, optimizer=spec["optimizer"])
    build_s = time.perf_counter() - t0
    losses = []
    for batch in batches[: spec["warmup"]]:
        losses.append(trainer.step(batch))
    t1 = time.perf_counter()
    for batch in batches[spec["warmup"]:]:
        losses.append(trainer.step(batch))
    timed_s = time.perf_counter() - t1
    peak_kib = _status_kib("VmHWM")
    result = {
        "name": spec["name"],
        "settings": settings.model_dump(mode="json"),
        "optimizer": trainer.optimizer_kind,
        "op_build_s": trainer.op_build_s,
        "params": n_params,
        "tokens_per_step": b * spec["seq_len"],
        "engine_build_s": build_s,
        "timed_steps": spec["steps"],
        "timed_s": timed_s,
        "tokens_per_s": spec["steps"] * b * spec["seq_len"] / timed_s,
        "s_per_step": timed_s / spec["steps"],
        "rss_before_bytes": rss_before_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
        "peak_above_before_bytes": (peak_kib - rss_before_kib) * 1024,
        "peak_import_and_model_bytes": peak_import_kib * 1024,
        "hwm_reset": reset,
        "losses": losses,
        "loadavg_1m": os.getloadavg()[0],
    }
    trainer.close()
    return result


def run_config(name: str, settings: dict, optimizer: str, args) -> dict:
    spec = {"name": name, "settings": settings, "optimizer": optimizer, "preset": args.preset,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"[{name}] FAILED (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"name": name, "settings": settings, "failed": True, "exit": proc.returncode, "stderr_tail": tail,
                "subprocess_wall_s": wall}
    result = json.loads(lines[-1][len("RESULT "):])
    result["subprocess_wall_s"] = wall
    print(f"[{name}] {result['tokens_per_s']:.0f} tok/s, peak {fmt_bytes(result['peak_rss_bytes'])} "
          f"(+{fmt_bytes(result['peak_above_before_bytes'])}), build {result['engine_build_s']:.1f} s, "
          f"subprocess {wall:.0f} s", flush=True)
    return result


def _cpu_adam_cached() -> bool:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return any(root.glob("*/cpu_adam*/*.so"))


# --------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    res = [r for r in data["results"] if not r.get("failed")]
    base = data["summary"]["torch_tokens_per_s_mean"]
    a = data["args"]
    p = res[0]["params"] if res else 0
    rows = []
    for i, r in enumerate(res):
        s = r["settings"]
        label = r["name"] if r["name"] != "torch" else ("torch (first)" if i == 0 else "torch (last)")
        rows.append([
            label, s["zero_stage"] if s["engine"] == "deepspeed" else "-",
            ("opt" if s["offload_optimizer"] else "") + ("+params" if s["offload_params"] else "") or "-",
            r["optimizer"].rsplit(".", 1)[-1],
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}",
            fmt_bytes(r["peak_rss_bytes"]), fmt_bytes(r["peak_above_before_bytes"]), f"{r['engine_build_s']:.1f}",
        ])
    failed = [r["name"] for r in data["results"] if r.get("failed")]
    torch_runs = data["summary"]["torch_tokens_per_s"]
    lines = [
        f"# Cloud training: DeepSpeed engine vs plain torch (`{a['preset']}` GPT-2, {p / 1e6:.2f} M parameters)",
        "",
        f"Batch {a['batch_size']} x {a['seq_len']} tokens, fp32, AdamW, 1 thread per process, {a['warmup']} warm-up "
        f"+ {a['steps']} timed steps per configuration, each in its own subprocess. Ratio = tokens/s over the "
        f"mean of the two torch runs (first and last: {', '.join(f'{x:.0f}' for x in torch_runs)} tok/s). "
        "Peak = RSS high-water mark of the training phase (engine build + steps; the mark is reset after "
        "imports and model build); `+peak` = that peak minus the RSS at the reset (the model weights are "
        "already in it).",
        "",
        md_table(["config", "ZeRO", "offload", "optimizer", "tokens/s", "ratio vs torch", "peak RSS", "+peak",
                  "engine build s"], rows, align="llllrrrrr"),
        "",
    ]
    ca = data["summary"].get("cpu_adam")
    if ca:
        how = "loaded from the torch extensions cache" if ca["cached_before"] else "compiled: cold cache"
        lines += [f"DeepSpeedCPUAdam op build: {ca['op_build_s']:.1f} s ({how}); included in that row's engine "
                  "build time, not in any throughput (timed steps start after the engine is built).", ""]
    if failed:
        lines += [f"FAILED configurations: {', '.join(failed)} (see the JSON for stderr).", ""]
    lines += [
        "Reading: in one CPU process ZeRO has nothing to partition over (one rank holds every shard) and "
        "offload moves state from CPU memory to CPU memory, so neither saves memory here; they add the fp32 "
        "flat buffers and (stage 3) gather hooks. The savings they are for come with several cloud workers "
        "(ZeRO: each rank keeps 1/N of optimizer state, gradients, parameters) and on GPUs (offload: "
        "optimizer state leaves GPU memory). What this table shows is the engine's overhead on the same "
        "model and the memory cost of each stage's bookkeeping.",
        "",
        footer(data),
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-cpu-adam", action="store_true", help="skip the DeepSpeedCPUAdam row (and its compile)")
    ap.add_argument("--with-bf16", action="store_true", help="add a ZeRO-2 bf16 row")
    ap.add_argument("--configs", nargs="*", help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration subprocess")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    names = args.configs or [n for n in CONFIGS if n != "torch"]
    plan = [("torch", *CONFIGS["torch"])] + [(n, *CONFIGS[n]) for n in names if n != "torch"]
    if args.with_bf16:
        plan.append((BF16[0], *BF16[1]))
    cached_before = _cpu_adam_cached()
    if not args.no_cpu_adam:
        plan.append((CPU_ADAM[0], *CPU_ADAM[1]))
    plan.append(("torch", *CONFIGS["torch"]))  # again at the end: the ratio uses the mean of both

    data = envelope(NAME, vars(args) | {"configs": [n for n, _, _ in plan]})
    data["versions"]["deepspeed"] = metadata.version("deepspeed")
    t0 = time.perf_counter()
    results = [run_config(n, s, o, args) for n, s, o in plan]
    data["wall_s"] = time.perf_counter() - t0
    torch_runs = [r["tokens_per_s"] for r in results if r["name"] == "torch" and not r.get("failed")]
    summary = {
        "torch_tokens_per_s": torch_runs,
        "torch_tokens_per_s_mean": statistics.mean(torch_runs) if torch_runs else float("nan"),
    }
    summary["ratio_vs_torch"] = {r["name"]: r["tokens_per_s"] / summary["torch_tokens_per_s_mean"]
                                 for r in results if not r.get("failed") and r["name"] != "torch"}
    ca = next((r for r in results if r["name"] == CPU_ADAM[0] and not r.get("failed")), None)
    if ca:
        summary["cpu_adam"] = {"op_build_s": ca["op_build_s"], "cached_before": cached_before}
    data["summary"] = summary
    data["results"] = results
    write_results(NAME, data, markdown(data))
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
