"""Batched vs one-at-a-time generation: requests/s and tokens/s at 1, 4 and 16 concurrent clients.

For each model (the tiny preset, and SmolLM2-135M-Instruct from a finished run folder):

1. Core, in this process (1 torch thread, like a replica): ``--requests`` held-out prompts of the
   run's built-in domains generated one after another (``CausalGenerator``) and in batches of B
   (``inference.batch.generate_batch``), greedy, ``--max-new-tokens``; B = each client count. Also
   counts how many batched answers have exactly the one-at-a-time tokens.
2. Served, over HTTP on a private local Ray: the app of ``gaisnet serve`` on the run folder, cloud
   tier (tier hint ``cloud``: base + latest global knowledge), ``max_ongoing_requests`` 16, once
   with ``serve.batch_max_size=1`` (each request generates on its own, the behaviour before batching:
   concurrent requests run side by side in worker threads) and once with ``serve.batch_max_size=16``.
   ``c`` closed-loop clients (each its own keep-alive connection) send ``--requests`` requests; req/s,
   tokens/s, p50 latency, and from the cloud's /health ``batching`` counters the mean number of
   requests one forward pass served.

    python benchmarks/batch_bench.py                                   # tiny + SmolLM2, ~6 min on 2 cores
    python benchmarks/batch_bench.py --models tiny                     # one model (others kept from the last file)
    python benchmarks/batch_bench.py --smollm2-run runs/X              # another SmolLM2 run folder

The tiny run folder is made here once (``/tmp/gaisnet-batch-bench/tiny-run``: the tiny job, one
round). Writes benchmarks/results/batch_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import time
from pathlib import Path

from _common import RESULTS, closed_loop_clients, envelope, footer, make_config, md_table, quiet, write_results

NAME = "batch_bench"
WHY_SMALL = ("Served gain is small for a measured reason: Ray Serve 2.60's `@serve.batch` forms a batch when its first request arrives (plus `serve.batch_wait_timeout_s`), not when the model is free, and queues formed batches behind the running one (`max_concurrent_batches` 1); requests arriving during a batch therefore form small batches of their own (1.2-2.5 requests per forward at 4-16 clients, against up to 16 in the core table), and a batch runs until its longest answer ends. The one-at-a-time path runs requests side by side in threads on both cores. Next step: a queue of our own that takes every waiting request when the model frees up, or rows joining a running batch between steps (continuous batching).\n")
TINY_RUN = Path("/tmp/gaisnet-batch-bench/tiny-run")
TINY_JOB = ["topology.edges=2", "topology.devices_per_edge=1", "topology.cluster_size=1", "data.samples_per_device=32",
            "data.eval_samples_per_domain=4", "data.public_samples=64", "training.pretrain_steps=0",
            "training.local_steps=2", "training.batch_size=8", "training.rounds=1", "run.progress=false"]


def tiny_run() -> Path:
    """The tiny job's run folder (one in-process round), made once."""
    if (TINY_RUN / "knowledge" / "v0001").is_dir():
        return TINY_RUN
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = make_config(TINY_JOB)
    TINY_RUN.mkdir(parents=True, exist_ok=True)
    (TINY_RUN / "config.yaml").write_text(config_to_yaml(cfg))
    InProcessGaisNet(cfg, TINY_RUN).run_round(1)
    return TINY_RUN


def prompts_of(run_dir: Path, n: int) -> list[str]:
    """``n`` held-out prompts, round robin over the run's domains."""
    from gaisnet_ray.config import load_config
    from gaisnet_ray.data import sample_examples

    domains = list(load_config(run_dir / "config.yaml").data.domains)
    per = {d: sample_examples(d, "eval", n, 7) for d in domains}
    return [per[domains[i % len(domains)]][i // len(domains)].prompt for i in range(n)]


def core(run_dir: Path, sizes: list[int], n_prompts: int, max_new_tokens: int) -> list[dict]:
    """The same ``n_prompts`` prompts generated one at a time, then in batches of each size."""
    import torch

    from gaisnet_ray.inference import CausalGenerator
    from gaisnet_ray.inference.batch import generate_batch, rows_for
    from gaisnet_ray.inference.served import ServedRun

    torch.set_num_threads(1)
    run = ServedRun(run_dir)
    model, _ = run.load_model("global")
    context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    gen = CausalGenerator(model, run.tokenizer, context // 2, context, system=run.system_prompt)
    prompts = prompts_of(run_dir, n_prompts)
    gen.generate(prompts[0], max_new_tokens=2)  # warm
    t0 = time.perf_counter()
    singles = [gen.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
    t_single = time.perf_counter() - t0
    tokens = sum(g.completion_tokens for g in singles)
    out = [{"batch": 1, "mode": "one_at_a_time", "prompts": n_prompts, "tokens": tokens, "wall_s": t_single,
            "tok_s": tokens / t_single, "req_s": n_prompts / t_single, "same_tokens": n_prompts}]
    print(f"  core one at a time: {out[0]['tok_s']:.1f} tok/s, {out[0]['req_s']:.2f} req/s", flush=True)
    for b in sizes:
        t0 = time.perf_counter()
        batched = []
        for i in range(0, n_prompts, b):
            batched += generate_batch(model, run.tokenizer, rows_for(gen, prompts[i:i + b], max_new_tokens=max_new_tokens))
        wall = time.perf_counter() - t0
        same = sum(a.token_ids == c.token_ids for a, c in zip(singles, batched))
        row = {"batch": b, "mode": "batched", "prompts": n_prompts, "tokens": sum(g.completion_tokens for g in batched),
               "wall_s": wall, "req_s": n_prompts / wall, "same_tokens": same}
        row["tok_s"] = row["tokens"] / wall
        print(f"  core batches of {b}: {row['tok_s']:.1f} tok/s, {row['req_s']:.2f} req/s, {same}/{n_prompts} answers "
              f"identical to one at a time", flush=True)
        out.append(row)
    del model, gen
    gc.collect()
    return out


def closed_loop(url: str, prompts: list[str], clients: int, n: int, max_new_tokens: int) -> dict:
    def ask(c, i) -> dict:
        t0 = time.perf_counter()
        r = c.post("/v1/generate", json={"prompt": prompts[i % len(prompts)], "tier": "cloud",
                                         "max_new_tokens": max_new_tokens})
        return {"status": r.status_code, "latency_s": time.perf_counter() - t0,
                "tokens": r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0}

    records, wall = closed_loop_clients(url, list(range(n)), clients, ask)
    ok = [r for r in records if r["status"] == 200]
    return {"clients": clients, "requests": n, "ok": len(ok), "wall_s": wall, "req_s": len(ok) / wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall,
            "p50_ms": 1000 * statistics.median(r["latency_s"] for r in ok) if ok else None}


def served(run_dir: Path, clients: list[int], batch_size: int, n_requests: int, max_new_tokens: int) -> dict:
    import httpx

    from gaisnet_ray.config import load_config
    from gaisnet_ray.serve.app import serve_run_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    most = max(clients)
    cfg = load_config(run_dir / "config.yaml", [
        f"serve.port={port}", f"serve.max_new_tokens={max(64, max_new_tokens)}", f"serve.max_ongoing_requests={most}",
        f"serve.max_queued_requests={4 * most}", f"serve.batch_max_size={batch_size}", "serve.learn_from_escalations=false"])
    prompts = prompts_of(run_dir, n_requests)
    t0 = time.perf_counter()
    handle = serve_run_dir(run_dir, cfg, blocking=False)
    out = {"batch_max_size": batch_size, "start_s": time.perf_counter() - t0, "levels": []}
    try:
        closed_loop(handle.url, prompts, 2, 4, max_new_tokens)  # warm

        def counters():
            return httpx.get(f"{handle.url}/health", timeout=60).json()["tiers"]["cloud"].get("batching") or {}

        for c in clients:
            before = counters()
            level = closed_loop(handle.url, prompts, c, n_requests, max_new_tokens)
            after = counters()
            fw = after.get("forwards", 0) - before.get("forwards", 0)
            level["rows_per_forward"] = (after.get("row_steps", 0) - before.get("row_steps", 0)) / fw if fw else 1.0
            print(f"  served batch_max_size={batch_size} clients={c}: {level['req_s']:.2f} req/s, "
                  f"{level['tok_s']:.1f} tok/s, p50 {level['p50_ms']:.0f} ms, {level['rows_per_forward']:.2f} "
                  f"requests per forward", flush=True)
            out["levels"].append(level)
    finally:
        handle.shutdown()
    return out


def markdown(data: dict) -> str:
    parts = [f"# Batched generation vs one at a time (greedy, {data['args']['max_new_tokens']} new tokens, 1 torch "
             f"thread per replica)\n", "Machine shared with other jobs; figures are indicative.\n"]
    for name, m in data["models"].items():
        parts.append(f"## {name} ({m['run_dir']})\n")
        parts.append(f"Core, in one process ({m['core'][0]['prompts']} prompts, one at a time or in batches of B):\n")
        base = m["core"][0]
        parts.append(md_table(["mode", "tok/s", "req/s", "speed-up", "answers identical to one at a time"],
                              [[("one at a time" if r["mode"] == "one_at_a_time" else f"batches of {r['batch']}"),
                                f"{r['tok_s']:.1f}", f"{r['req_s']:.2f}", f"{r['wall_s'] and base['wall_s'] / r['wall_s']:.2f}x",
                                f"{r['same_tokens']}/{r['prompts']}"] for r in m["core"]], align="lrrrr"))
        rows = []
        one, batched = m["served"]["one_at_a_time"], m["served"]["batched"]
        for a, b in zip(one["levels"], batched["levels"]):
            rows.append([a["clients"], a["requests"], f"{a['req_s']:.2f}", f"{b['req_s']:.2f}", f"{a['tok_s']:.1f}",
                         f"{b['tok_s']:.1f}", f"{b['tok_s'] / a['tok_s']:.2f}x", f"{a['p50_ms']:.0f}",
                         f"{b['p50_ms']:.0f}", f"{b['rows_per_forward']:.2f}"])
        parts.append("\nServed (HTTP, cloud tier; one at a time = serve.batch_max_size 1, batched = 16):\n")
        parts.append(md_table(["clients", "requests", "req/s one", "req/s batched", "tok/s one", "tok/s batched",
                               "speed-up", "p50 ms one", "p50 ms batched", "requests per forward"], rows))
        parts.append("")
    parts.append(WHY_SMALL)
    parts.append(footer(data))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--smollm2-run", type=Path, default=Path("/work/runs/s5default"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="prompts per measurement (the same ones each time)")
    args = p.parse_args(argv)
    quiet()
    started = time.perf_counter()
    data = envelope(NAME, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    previous = RESULTS / f"{NAME}.json"
    data["models"] = json.loads(previous.read_text()).get("models", {}) if previous.is_file() else {}
    for name in args.models:
        run_dir = tiny_run() if name == "tiny" else args.smollm2_run.resolve()
        print(f"{name}: {run_dir}", flush=True)
        m = {"run_dir": str(run_dir), "core": core(run_dir, args.clients, args.requests, args.max_new_tokens),
             "served": {}}
        for mode, size in (("one_at_a_time", 1), ("batched", max(args.clients))):
            m["served"][mode] = served(run_dir, args.clients, size, args.requests, args.max_new_tokens)
        data["models"][name] = m
        data["wall_s"] = time.perf_counter() - started
        write_results(NAME, data, markdown(data))  # after each model: a cut-short run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
