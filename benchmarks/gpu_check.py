"""Helpers of ``benchmarks/gpu_check.sh``: one subcommand per measurement, each writing one JSON file.

    python benchmarks/gpu_check.py env          --out F          # nvidia-smi, torch/CUDA, libraries
    python benchmarks/gpu_check.py overrides    [--cpu]          # the `gaisnet run --set` list, one a line
    python benchmarks/gpu_check.py train-stats  RUN_DIR --out F  # tokens/s per round from metrics.jsonl
    python benchmarks/gpu_check.py gen          RUN_DIR --out F  # greedy generation tokens/s, in-process
    python benchmarks/gpu_check.py http         URL --out F      # the served API, a few requests
    python benchmarks/gpu_check.py summary      OUT_DIR          # everything above -> summary.json

The module imports only the standard library at the top, so ``summary`` works with any python3
even when the set-up stage failed; torch, transformers and gaisnet_ray load inside the
subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL_PRESET = "smollm2-135m"

# Fractions of the one GPU each actor asks for: 1 cloud + 2 edges + 6 devices = 0.2 + 0.2 + 0.48 =
# 0.88 of a GPU (Ray refuses to place past 1.0); serving replicas ask for their own (the run is over).
GPU_SHARES = {"cloud": 0.2, "edge": 0.1, "end": 0.08}
SERVE_GPU_SHARES = {"end": 0.2, "edge": 0.2, "cloud": 0.2}


def _write(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _share(env: str, default: float) -> float:
    return float(os.environ.get(env, default))


# ------------------------------------------------------------------------------------------- env
def cmd_env(args) -> int:
    """GPU and library facts: nvidia-smi's view and torch's."""
    out: dict = {"python": sys.version.split()[0], "host_cpus": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    import torch

    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               device_count=torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu_name=p.name, gpu_total_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    for name in ("ray", "transformers", "peft", "deepspeed", "gguf"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception as e:  # noqa: BLE001 - reported in the summary
            out[name] = f"missing ({type(e).__name__})"
    _write(args.out, out)
    print(json.dumps(out, indent=2))
    return 0 if out["cuda_available"] or args.allow_cpu else 1


# ------------------------------------------------------------------------------------- overrides
def run_overrides(cpu: bool = False) -> tuple[list[str], list[str]]:
    """The ``--set`` list for the GPU run of the default job, and notes on why each was chosen.

    Tiers on CUDA with fractional ``num_gpus`` (0 with ``cpu``, for a dry run), the cloud on
    DeepSpeed ZeRO-2; pre-training kept as the default job has it if it pre-trains, else a few
    steps at a fine-tuning learning rate, so the engine trains on CUDA either way. The default's
    model stays unless it is not the real model, in which case the real preset is forced.
    """
    sys.path.insert(0, str(REPO))
    from gaisnet_ray.config import load_config

    cfg = load_config(None, [])
    sets, notes = [], []
    for tier, share in GPU_SHARES.items():
        value = 0.0 if cpu else _share(f"GPU_CHECK_{tier.upper()}_GPUS", share)
        sets.append(f"topology.{tier}.num_gpus={value:g}")
    sets += ["cloud.engine=deepspeed", "cloud.zero_stage=2"]
    if cfg.model.path is None and cfg.model.preset != REAL_PRESET and not cpu:
        sets.append(f"model.preset={REAL_PRESET}")
        notes.append(f"the embedded default's model is preset '{cfg.model.preset}', not the real model: "
                     f"forced model.preset={REAL_PRESET}")
    steps = int(os.environ.get("GPU_CHECK_PRETRAIN_STEPS", 0))
    if steps > 0:
        sets.append(f"training.pretrain_steps={steps}")
        notes.append(f"training.pretrain_steps={steps} (GPU_CHECK_PRETRAIN_STEPS)")
    elif cfg.training.pretrain_steps == 0:
        sets += ["training.pretrain_steps=20", "training.pretrain_lr=2e-05"]
        notes.append("the default job does not pre-train: 20 cloud steps at lr 2e-05 so DeepSpeed trains on CUDA")
    else:
        notes.append(f"the default's training.pretrain_steps={cfg.training.pretrain_steps} kept")
    extra = os.environ.get("GPU_CHECK_SET", "").split()
    if extra:
        sets += extra
        notes.append(f"GPU_CHECK_SET: {extra}")
    return sets, notes


def cmd_overrides(args) -> int:
    sets, notes = run_overrides(cpu=args.cpu)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print("\n".join(sets))
    return 0


def serve_overrides(cpu: bool = False) -> list[str]:
    return [f"serve.{t}.num_gpus={0.0 if cpu else _share(f'GPU_CHECK_SERVE_{t.upper()}_GPUS', s):g}"
            for t, s in SERVE_GPU_SHARES.items()]


def cmd_serve_overrides(args) -> int:
    print("\n".join(serve_overrides(cpu=args.cpu)))
    return 0


# ----------------------------------------------------------------------------------- train-stats
def _simple_yaml_get(text: str, dotted: str):
    """``dotted`` (a.b.c) from ``gaisnet config``-style YAML, with PyYAML when it imports."""
    try:
        import yaml

        node = yaml.safe_load(text)
        for part in dotted.split("."):
            node = node[part]
        return node
    except Exception:  # noqa: BLE001 - no PyYAML on a bare python3: the summary says "unknown"
        return None


def devices_in_round(row: dict, cfg_yaml: str) -> tuple[int, str]:
    """How many devices trained in the round: from the round's ``clusters`` when it lists them, else
    the config (participants_per_edge x edges, or every device)."""
    clusters = row.get("clusters")
    ids: set[str] = set()

    def walk(x):
        if isinstance(x, str):
            ids.add(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                if k in ("devices", "members") or isinstance(v, (list, dict)):
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    if clusters:
        walk(clusters)  # {edge: {cluster id: [device ids]}}: the strings in the lists
        if ids:
            return len(ids), "metrics.jsonl clusters"
    edges = _simple_yaml_get(cfg_yaml, "topology.edges") or 0
    per_edge = _simple_yaml_get(cfg_yaml, "topology.devices_per_edge") or 0
    part = _simple_yaml_get(cfg_yaml, "training.participants_per_edge")
    return int(edges) * int(part or per_edge), "config (participants_per_edge or devices_per_edge) x edges"


def train_stats(run_dir: str | Path) -> dict:
    """Training throughput per round, from the run folder alone.

    tokens per round = training.batch_size x model.max_seq_len x training.local_steps x devices that
    trained in the round (padded positions: every step processes batch x max_seq_len tokens through
    the split model, forward and backward). Divided by the round's ``wall_s`` (training, edge and
    cloud aggregation, evaluation and relay: end to end) and by ``edge_wall_s`` (the edges' training
    phase) when the round records it.
    """
    run_dir = Path(run_dir)
    cfg_yaml = (run_dir / "config.yaml").read_text()
    b = _simple_yaml_get(cfg_yaml, "training.batch_size")
    t = _simple_yaml_get(cfg_yaml, "model.max_seq_len")
    steps = _simple_yaml_get(cfg_yaml, "training.local_steps")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = []
    for row in rows:
        n, source = devices_in_round(row, cfg_yaml)
        tokens = int(b) * int(t) * int(steps) * n
        wall = float(row.get("wall_s") or 0.0)
        edge_wall = row.get("edge_wall_s")
        edge_wall = max(edge_wall.values()) if isinstance(edge_wall, dict) and edge_wall else edge_wall
        rounds.append({
            "round": row.get("round"), "devices": n, "devices_from": source, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
            "edge_wall_s": round(float(edge_wall), 3) if edge_wall else None,
            "tokens_per_s_edge_phase": round(tokens / float(edge_wall), 1) if edge_wall else None,
            "train_loss": row.get("train_loss"),
        })
    total_tokens = sum(r["tokens"] for r in rounds)
    total_wall = sum(r["wall_s"] for r in rounds)
    last = rows[-1] if rows else {}
    run = _read_json(run_dir / "run.json") or {}
    return {
        "how": "tokens/round = batch_size x max_seq_len x local_steps x devices trained that round "
               "(padded positions); tokens/s = tokens/round / round wall_s (end to end) and / edge_wall_s "
               "(training phase only)",
        "batch_size": b, "max_seq_len": t, "local_steps": steps,
        "rounds": rounds,
        "tokens_per_s_mean": round(total_tokens / total_wall, 1) if total_wall > 0 else None,
        "exact_match_final": {d: e.get("exact_match") for d, e in (last.get("eval") or {}).items()},
        "exact_match_initial": {d: e.get("exact_match") for d, e in (run.get("eval_initial") or {}).items()},
        "cloud_alone_after_relay": {d: e.get("exact_match") for d, e in
                                    ((last.get("relay") or {}).get("cloud_after") or {}).items()},
        "run_wall_s": run.get("wall_s"),
        "final_version": run.get("final_version"),
    }


def cmd_train_stats(args) -> int:
    stats = train_stats(args.run_dir)
    _write(args.out, stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "rounds"}, indent=2))
    for r in stats["rounds"]:
        print(f"round {r['round']}: {r['tokens']} tokens in {r['wall_s']} s -> {r['tokens_per_s']} tok/s "
              f"(edge phase {r['tokens_per_s_edge_phase']} tok/s)")
    return 0


# ------------------------------------------------------------------------------------------- gen
QUESTIONS = ["What is {a}+{b}?", "Convert {a} meters to centimeters.", "What is {a} times {b}?",
             "Spell the word '{w}' backwards.", "Name a city in {c}.", "How many days are in {a} weeks?",
             "What comes after {a}?", "Write one sentence about {w}."]
WORDS = ["river", "lantern", "copper", "meadow", "signal", "harbor", "pepper", "glacier"]
COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Norway", "Canada", "India", "Chile"]


def fixed_prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)].format(a=7 + 13 * i, b=3 + 5 * i, w=WORDS[i % len(WORDS)],
                                                c=COUNTRIES[(i // len(QUESTIONS)) % len(COUNTRIES)])
            for i in range(n)]


def cmd_gen(args) -> int:
    """Greedy generation of exactly ``new_tokens`` tokens for ``prompts`` prompts in one batch (and
    for one prompt alone) with the run's final model (``RUN_DIR/model``: the newest base, with the
    last relayed knowledge folded in under relay merge), KV cache, left padding; timed after a warm-up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = Path(args.run_dir) / "model"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    load_s = time.perf_counter() - t0
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = fixed_prompts(args.prompts)
    if getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        texts = [f"{p}\n" for p in prompts]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def generate(batch: list[str], new: int):
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=not getattr(tok, "chat_template", None))
        enc = {k: v.to(device) for k, v in enc.items()}
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tok.pad_token_id, use_cache=True)
        sync()
        return out[:, enc["input_ids"].shape[1]:], time.perf_counter() - start, enc["input_ids"].shape

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    generate(texts[: min(8, len(texts))], 4)  # warm-up: kernels, allocator
    new_ids, batch_s, shape = generate(texts, args.new_tokens)
    _, single_s, _ = generate(texts[:1], args.new_tokens)
    generated = int(new_ids.numel())
    out = {
        "how": f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy (min_new_tokens = max_new_tokens), "
               "one batch, KV cache, left padding, fp32, after a warm-up; tokens/s = generated tokens / wall",
        "model_dir": str(model_dir), "device": device, "dtype": "float32", "load_s": round(load_s, 2),
        "prompts": args.prompts, "new_tokens": args.new_tokens, "prompt_shape": list(shape),
        "generated_tokens": generated, "batch_wall_s": round(batch_s, 4),
        "tokens_per_s_batch": round(generated / batch_s, 1),
        "single_prompt_wall_s": round(single_s, 4), "tokens_per_s_single": round(args.new_tokens / single_s, 1),
        "sample": {"prompt": prompts[0], "answer": tok.decode(new_ids[0], skip_special_tokens=True)},
    }
    if device.startswith("cuda"):
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    _write(args.out, out)
    print(json.dumps(out, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ http
def _request(url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, object, float]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    elapsed = time.perf_counter() - start
    try:
        return status, json.loads(raw), elapsed
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")[:500], elapsed


def _devices(health) -> dict:
    """Each tier's torch device, as /health reports it."""
    tiers = (health or {}).get("tiers", {}) if isinstance(health, dict) else {}
    return {t: (info or {}).get("device") for t, info in tiers.items() if isinstance(info, dict)}


def cmd_http(args) -> int:
    """Wait for /health to answer 200, then /v1/models, /v1/generate, /v1/chat/completions.
    Passes when all answer 200 and, with ``--expect-device``, every tier reports that device."""
    base = args.url.rstrip("/")
    deadline = time.time() + args.wait_s
    health, status = None, None
    while time.time() < deadline:
        try:
            status, health, _ = _request(f"{base}/health", timeout=10)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(2)
    results: dict = {"url": base, "ready_after_s": round(args.wait_s - (deadline - time.time()), 1),
                     "health": {"status": status, "body": health}}
    calls = [
        ("models", "/v1/models", None),
        ("generate", "/v1/generate", {"prompt": "What is the capital of France?", "max_new_tokens": 16}),
        ("chat", "/v1/chat/completions", {"model": "gaisnet", "max_tokens": 16,
                                          "messages": [{"role": "user", "content": "What is 23+58?"}]}),
        ("generate_cloud", "/v1/generate", {"prompt": "Name a planet.", "max_new_tokens": 8, "tier": "cloud"}),
    ]
    if status == 200:
        for name, path, body in calls:
            try:
                st, answer, elapsed = _request(base + path, body)
            except (urllib.error.URLError, OSError) as e:
                st, answer, elapsed = None, f"{type(e).__name__}: {e}", 0.0
            results[name] = {"status": st, "latency_s": round(elapsed, 3), "body": answer}
    devices = _devices(health)
    results["tier_devices"] = devices
    ok = status == 200 and all(results.get(n, {}).get("status") == 200 for n, _, _ in calls)
    if args.expect_device:
        ok = ok and bool(devices) and all(str(d).startswith(args.expect_device) for d in devices.values())
    results["pass"] = ok
    _write(args.out, results)
    brief = {"ready_after_s": results["ready_after_s"], "health": status, "tier_devices": devices, "pass": ok}
    for name, _, _ in calls:
        r = results.get(name) or {}
        body = r.get("body")
        if isinstance(body, dict) and "text" in body:  # the answer text (and tier), not the whole body
            body = f"{body['text']!r} (tier {body.get('tier')})"
        elif isinstance(body, dict) and body.get("choices"):
            body = repr((body["choices"][0].get("message") or {}).get("content"))
        elif isinstance(body, dict) and "data" in body:
            body = [m.get("id") for m in body["data"]]
        brief[name] = {"status": r.get("status"), "latency_s": r.get("latency_s"), "answer": str(body)[:300]}
    print(json.dumps(brief, indent=2))
    return 0 if ok else 1


# --------------------------------------------------------------------------------------- summary
def _gpu_samples(path: Path) -> list[tuple[float, float, float, int]]:
    """(unix time, MiB used, utilization %, processes on the GPU) rows of the background sampler."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                procs = int(parts[3]) if len(parts) > 3 and parts[3] else -1
                rows.append((float(parts[0]), float(parts[1]), float(parts[2]), procs))
            except (IndexError, ValueError):
                continue
    return rows


def summarize(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    stages = []
    samples = _gpu_samples(out / "gpu_samples.csv")
    stage_file = out / "stages.tsv"
    if stage_file.is_file():
        for line in stage_file.read_text().splitlines():
            name, rc, start, end = line.split("\t")[:4]
            start_f, end_f = float(start), float(end)
            inside = [x for x in samples if start_f - 1 <= x[0] <= end_f + 1]
            stages.append({"stage": name, "pass": rc == "0", "rc": int(rc), "wall_s": round(end_f - start_f, 1),
                           "timed_out": rc in ("124", "137"), "skipped": rc == "125",
                           "gpu_mem_peak_mib": max((x[1] for x in inside), default=None),
                           "gpu_util_max_pct": max((x[2] for x in inside), default=None),
                           "gpu_processes_max": max((x[3] for x in inside), default=None)})
    env = _read_json(out / "env.json") or {}
    train = _read_json(out / "train_stats.json") or {}
    gen = _read_json(out / "gen.json") or {}
    http = _read_json(out / "http.json") or {}
    pytest_file = out / "pytest_gpu.txt"
    pytest_tail = pytest_file.read_text().strip().splitlines() if pytest_file.is_file() else []
    summary = {
        "gpu": env.get("gpu_name") or env.get("nvidia_smi"),
        "gpu_total_gib": env.get("gpu_total_gib"),
        "torch": env.get("torch"), "torch_cuda": env.get("torch_cuda"), "cudnn": env.get("cudnn"),
        "libraries": {k: env.get(k) for k in ("ray", "transformers", "peft", "deepspeed", "gguf")},
        "all_passed": bool(stages) and all(s["pass"] for s in stages),
        "stages": stages,
        "training_tokens_per_s": train.get("tokens_per_s_mean"),
        "training_tokens_per_s_how": train.get("how"),
        "training_rounds": [{k: r.get(k) for k in ("round", "tokens", "wall_s", "tokens_per_s",
                                                   "tokens_per_s_edge_phase")} for r in train.get("rounds", [])],
        "run_wall_s": train.get("run_wall_s"),
        "exact_match_initial": train.get("exact_match_initial"),
        "exact_match_final": train.get("exact_match_final"),
        "cloud_alone_after_last_relay": train.get("cloud_alone_after_relay"),
        "generation_tokens_per_s": gen.get("tokens_per_s_batch"),
        "generation_tokens_per_s_single_prompt": gen.get("tokens_per_s_single"),
        "generation_how": gen.get("how"),
        "generation_peak_allocated_gib": gen.get("peak_allocated_gib"),
        "gpu_mem_peak_mib_all_processes": max((x[1] for x in samples), default=None),
        "gpu_mem_how": "nvidia-smi memory.used sampled every second (all processes: Ray actors, Serve replicas, "
                       "tests); per stage in `stages`, with the most processes seen on the GPU at once "
                       "(-1: nvidia-smi lists none, e.g. in a container's PID namespace)",
        "serve_tier_devices": http.get("tier_devices"),
        "serve_latency_s": {k: (http.get(k) or {}).get("latency_s") for k in ("models", "generate", "chat",
                                                                               "generate_cloud")} if http else None,
        "pytest_gpu": pytest_tail[-1] if pytest_tail else None,
    }
    _write(out / "summary.json", summary)
    return summary


def cmd_summary(args) -> int:
    summary = summarize(args.out_dir)
    print(json.dumps(summary, indent=2))
    return 0 if summary["all_passed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    e.add_argument("--allow-cpu", action="store_true", help="exit 0 without CUDA (dry run)")
    o = sub.add_parser("overrides")
    o.add_argument("--cpu", action="store_true", help="num_gpus 0 everywhere, default model (dry run)")
    so = sub.add_parser("serve-overrides")
    so.add_argument("--cpu", action="store_true")
    t = sub.add_parser("train-stats")
    t.add_argument("run_dir")
    t.add_argument("--out", required=True)
    g = sub.add_parser("gen")
    g.add_argument("run_dir")
    g.add_argument("--out", required=True)
    g.add_argument("--prompts", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--device", default=None, help="default: cuda when available")
    h = sub.add_parser("http")
    h.add_argument("url")
    h.add_argument("--out", required=True)
    h.add_argument("--wait-s", type=float, default=180.0)
    h.add_argument("--expect-device", default=None, help="e.g. cuda: every tier must report it in /health")
    s = sub.add_parser("summary")
    s.add_argument("out_dir")
    args = p.parse_args(argv)
    return {"env": cmd_env, "overrides": cmd_overrides, "serve-overrides": cmd_serve_overrides,
            "train-stats": cmd_train_stats, "gen": cmd_gen, "http": cmd_http, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
