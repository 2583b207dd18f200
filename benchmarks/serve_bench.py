"""Tiered serving vs cloud-only serving on Ray Serve, and the cost of serving through HTTP.

1. A run folder: ``--run-dir`` when it already holds one (e.g. a ``gaisnet run`` output), else the
   default config's run made in this process (``InProcessGaisNet``: pre-training, HFSL rounds, global
   and per-edge knowledge) and written there (or to a temporary folder).
2. The app on a private local Ray (``serve_run_dir(..., blocking=False)``, as ``gaisnet serve`` starts
   it), default ``ServeSettings`` (routing: escalate when the edge's mean token entropy > 2.5 nats or
   a token's probability < 0.05) on a free loopback port.
3. A mixed workload: held-out prompts of every built-in domain the run knows
   (``sample_examples(d, "eval", n, seed)``), shuffled, sent by ``--concurrency`` closed-loop clients
   to ``POST /v1/generate`` (greedy, ``--max-new-tokens``) in three modes: tiered (no hint: the edge
   answers with the domain's adapter, the unsure escalate to the cloud), cloud-only (tier hint
   ``cloud``) and edge-only (tier hint ``edge``). The modes alternate over ``--repeats`` passes so
   load from other processes hits them alike. Per mode: throughput, p50/p99 latency, the share each
   tier served, exact match overall and per serving tier.
4. Serve overhead: the same greedy generations (cloud model: base + latest global knowledge), one at
   a time, in this process (``CausalGenerator``, 1 torch thread like a replica), through a
   ``DeploymentHandle`` to the cloud deployment, and through HTTP (proxy -> ingress -> cloud); the
   answers must be identical; ratios of the medians.

    python benchmarks/serve_bench.py                         # ~8 min on 2 cores (most of it the run)
    python benchmarks/serve_bench.py --run-dir runs/X        # serve an existing run folder

Writes benchmarks/results/serve_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import closed_loop_clients, envelope, footer, make_config, md_table, quiet, write_results

NAME = "serve_bench"
MODES = {"tiered": {}, "cloud-only": {"tier": "cloud"}, "edge-only": {"tier": "edge"}}


def build_run(run_dir: Path, overrides: list[str]) -> dict:
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = make_config(overrides + ["run.progress=false"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    t0 = time.perf_counter()
    net = InProcessGaisNet(cfg, run_dir)
    last = {}
    for r in range(1, cfg.training.rounds + 1):
        last = net.run_round(r)
        print(f"  round {r}: train loss {last['train_loss']:.3f}", flush=True)
    return {"built": True, "build_s": time.perf_counter() - t0, "rounds": cfg.training.rounds,
            "final_eval": last.get("eval"), "overrides": overrides}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_workload(url: str, examples: list, body_extra: dict, concurrency: int, max_new_tokens: int) -> dict:
    """Closed loop: ``concurrency`` threads, each with its own keep-alive connection, take the next
    example until none is left. Returns per-request records and the wall time."""

    def ask(c, item) -> dict:
        i, ex = item
        body = {"prompt": ex.prompt, "max_new_tokens": max_new_tokens, **body_extra}
        t0 = time.perf_counter()
        r = c.post("/v1/generate", json=body)
        dt = time.perf_counter() - t0
        rec = {"i": i, "domain": ex.domain, "latency_s": dt, "status": r.status_code}
        if r.status_code == 200:
            a = r.json()
            rec.update(tier=a["tier"], adapter=a["adapter"], escalated=a["escalated"],
                       exact=a["text"].strip() == ex.answer, version=a["version"])
        return rec

    records, wall = closed_loop_clients(url, list(enumerate(examples)), concurrency, ask, timeout=300)
    return {"records": records, "wall_s": wall}


def summarize(passes: list[dict]) -> dict:
    records = [r for p in passes for r in p["records"]]
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    tiers = sorted({r["tier"] for r in ok})
    per_tier = {}
    for t in ("edge", "cloud"):
        mine = [r for r in ok if r["tier"] == t]
        per_tier[t] = {"served": len(mine), "share": len(mine) / len(ok) if ok else 0.0,
                       "exact_match": sum(r["exact"] for r in mine) / len(mine) if mine else None}
    per_domain = {}
    for d in sorted({r["domain"] for r in ok}):
        mine = [r for r in ok if r["domain"] == d]
        per_domain[d] = {"exact_match": sum(r["exact"] for r in mine) / len(mine),
                         "edge_share": sum(r["tier"] == "edge" for r in mine) / len(mine)}
    wall = sum(p["wall_s"] for p in passes)
    return {
        "requests": len(records), "ok": len(ok), "errors": {str(s): sum(r["status"] == s for r in records)
                                                          for s in sorted({r["status"] for r in records}) if s != 200},
        "throughput_rps": len(ok) / wall, "wall_s": wall, "pass_wall_s": [p["wall_s"] for p in passes],
        "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99),
        "mean_ms": 1000 * statistics.fmean(lat), "tiers_seen": tiers, "per_tier": per_tier,
        "exact_match": sum(r["exact"] for r in ok) / len(ok), "per_domain": per_domain,
    }


def overhead(url: str, run_dir: Path, prompts: list[str], max_new_tokens: int) -> dict:
    """One generation at a time, the three paths interleaved per prompt (same greedy answer)."""
    import httpx
    import torch
    from ray import serve

    from gaisnet_ray.inference import CausalGenerator
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.slots import GenerationRequest, load_served

    torch.set_num_threads(1)  # what each replica sets (serve.torch_threads)
    run = ServedRun(run_dir)
    local = load_served(run, "global", None, max_prompt_tokens=None)
    gen: CausalGenerator = local.generator
    cloud = serve.get_deployment_handle("cloud", app_name="gaisnet")
    times = {"in_process": [], "handle": [], "http": []}
    mismatches = []
    with httpx.Client(base_url=url, timeout=300) as c:
        for p in prompts[:3]:  # warm-up on every path
            gen.generate(p, max_new_tokens=max_new_tokens)
            cloud.generate.remote(GenerationRequest(p, max_new_tokens)).result()
            c.post("/v1/generate", json={"prompt": p, "tier": "cloud", "max_new_tokens": max_new_tokens})
        for p in prompts:
            t0 = time.perf_counter()
            a = gen.generate(p, max_new_tokens=max_new_tokens)
            t1 = time.perf_counter()
            b = cloud.generate.remote(GenerationRequest(p, max_new_tokens)).result()
            t2 = time.perf_counter()
            r = c.post("/v1/generate", json={"prompt": p, "tier": "cloud", "max_new_tokens": max_new_tokens})
            t3 = time.perf_counter()
            times["in_process"].append(t1 - t0)
            times["handle"].append(t2 - t1)
            times["http"].append(t3 - t2)
            if not (a.token_ids == b.generation.token_ids and r.status_code == 200 and r.json()["text"] == a.text):
                mismatches.append(p)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompts": len(prompts), "version": local.version,
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "p99_ms": {k: 1000 * percentile(v, 0.99) for k, v in times.items()},
        "ratio_http_over_in_process": med["http"] / med["in_process"],
        "ratio_handle_over_in_process": med["handle"] / med["in_process"],
        "added_ms_http": 1000 * (med["http"] - med["in_process"]),
        "identical_answers": not mismatches, "mismatched_prompts": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="serve this run folder (made here with the default config if absent)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the run made here (repeatable)")
    ap.add_argument("--per-domain", type=int, default=24, help="held-out prompts per domain per pass")
    ap.add_argument("--repeats", type=int, default=2, help="passes per mode (modes alternate)")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop HTTP clients")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--overhead-prompts", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1, help="seed of the eval prompts drawn")
    args = ap.parse_args(argv)
    quiet()
    started = time.perf_counter()
    data = envelope(NAME, vars(args))

    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gaisnet-serve-bench-")
        run_dir = Path(tmp.name) / "run"
    if (run_dir / "model" / "config.json").is_file():
        data["run"] = {"built": False, "path": str(run_dir)}
        print(f"serving the existing run folder {run_dir}", flush=True)
    else:
        print(f"making a run folder in {run_dir} (default config{', ' + ' '.join(args.overrides) if args.overrides else ''})",
              flush=True)
        data["run"] = {**build_run(run_dir, args.overrides), "path": str(run_dir)}

    from gaisnet_ray.config import load_config
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.serve.app import serve_run_dir
    
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(run_dir / "config.yaml", [f"serve.port={port}", f"serve.max_new_tokens={max(64, args.max_new_tokens)}"])
    settings = cfg.serve
    data["config"] = cfg.model_dump(mode="json")
    data["serve_settings"] = settings.model_dump(mode="json")
    domains = list(cfg.data.domains)
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    handle = serve_run_dir(run_dir, cfg, blocking=False)
    data["serve_start_s"] = time.perf_counter() - t0
    print(f"app up in {data['serve_start_s']:.1f} s at {handle.url}", flush=True)
    try:
        import httpx

        data["health"] = httpx.get(f"{handle.url}/health", timeout=60).json()
        passes: dict[str, list] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            examples = [e for d in domains for e in sample_examples(d, "eval", args.per_domain, args.seed + rep)]
            rng.shuffle(examples)
            run_workload(handle.url, examples[: 2 * len(domains)], {}, args.concurrency, args.max_new_tokens)  # warm
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
            for mode in order:
                res = run_workload(handle.url, examples, MODES[mode], args.concurrency, args.max_new_tokens)
                passes[mode].append(res)
                ok = [r for r in res["records"] if r["status"] == 200]
                print(f"  pass {rep + 1} {mode:10s}: {len(ok)}/{len(res['records'])} ok in {res['wall_s']:.1f} s",
                      flush=True)
        data["modes"] = {m: summarize(p) for m, p in passes.items()}
        prompts = [e.prompt for d in domains for e in sample_examples(d, "eval", args.overhead_prompts, 99)]
        rng.shuffle(prompts)
        data["overhead"] = overhead(handle.url, run_dir, prompts[: args.overhead_prompts], args.max_new_tokens)
        print(f"  overhead: {data['overhead']['median_ms']}", flush=True)
    finally:
        handle.shutdown()
        if tmp is not None:
            tmp.cleanup()
    data["wall_s"] = time.perf_counter() - started
    write_results(NAME, data, markdown(data, args))
    return 0 if data["overhead"]["identical_answers"] else 1


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(data: dict, args) -> str:
    s, m = data["serve_settings"], data["modes"]
    rows = []
    for mode, r in m.items():
        rows.append([mode, r["ok"], f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                     _pct(r["per_tier"]["edge"]["share"]), _pct(r["per_tier"]["cloud"]["share"]),
                     _pct(r["exact_match"]), _pct(r["per_tier"]["edge"]["exact_match"]),
                     _pct(r["per_tier"]["cloud"]["exact_match"]), sum(r["errors"].values())])
    domain_rows = []
    for d in m["tiered"]["per_domain"]:
        domain_rows.append([d, _pct(m["tiered"]["per_domain"][d]["edge_share"]),
                            _pct(m["tiered"]["per_domain"][d]["exact_match"]),
                            _pct(m["cloud-only"]["per_domain"][d]["exact_match"]),
                            _pct(m["edge-only"]["per_domain"][d]["exact_match"])])
    o = data["overhead"]
    orows = [["in one process (CausalGenerator)", f"{o['median_ms']['in_process']:.1f}", f"{o['p99_ms']['in_process']:.1f}", "1.00x"],
             ["DeploymentHandle -> cloud replica", f"{o['median_ms']['handle']:.1f}", f"{o['p99_ms']['handle']:.1f}",
              f"{o['ratio_handle_over_in_process']:.2f}x"],
             ["HTTP -> proxy -> ingress -> cloud", f"{o['median_ms']['http']:.1f}", f"{o['p99_ms']['http']:.1f}",
              f"**{o['ratio_http_over_in_process']:.2f}x**"]]
    run = data["run"]
    made = (f"made here with the default config ({run['rounds']} HFSL rounds, {run['build_s']:.0f} s)"
            if run.get("built") else f"existing run folder `{run['path']}`")
    routing = s["routing"]
    return "\n".join([
        "# Tiered serving on Ray Serve: tiered vs cloud-only, and the cost of HTTP",
        "",
        f"Run folder: {made}; model `{data['config']['model']['family']}` `{data['config']['model']['preset']}`, "
        f"knowledge version {data['health']['knowledge_version']}, edge adapters "
        f"{sorted(a for a in data['health']['adapters'] if a.startswith('edge'))}, domain -> adapter "
        f"{data['health']['domain_adapters']}. One replica per tier on a private local Ray "
        f"(app up in {data['serve_start_s']:.0f} s). Routing: escalate when the edge answer's mean token entropy "
        f"> {routing['max_mean_entropy']} nats or a token's probability < {routing['min_token_prob']}.",
        "",
        f"Workload: {args.per_domain} held-out prompts per domain x {len(m['tiered']['per_domain'])} domains, "
        f"shuffled, {args.repeats} passes per mode (modes alternating), {args.concurrency} concurrent "
        f"closed-loop clients, greedy, up to {args.max_new_tokens} new tokens, `POST /v1/generate`.",
        "",
        md_table(["mode", "answers", "req/s", "p50 ms", "p99 ms", "edge share", "cloud share", "exact match",
                  "EM at edge", "EM at cloud", "errors"], rows),
        "",
        "Exact match per domain (tiered: share the edge kept):",
        "",
        md_table(["domain", "tiered edge share", "tiered EM", "cloud-only EM", "edge-only EM"], domain_rows),
        "",
        f"Serve overhead: {o['prompts']} greedy generations one at a time on the cloud model (base + global "
        f"v{o['version']}), the three paths interleaved per prompt; identical answers on all paths: "
        f"{o['identical_answers']}.",
        "",
        md_table(["path", "median ms", "p99 ms", "vs in-process"], orows),
        "",
        "Notes:",
        "",
        "- Tiered answers every request at the edge first; an escalated request costs the edge attempt plus the "
        "cloud's answer, so tiered latency is above cloud-only when most requests escalate and the edge and "
        "the cloud are the same size (here: the same base model on the same machine). The saving the tiers buy "
        "on a real deployment is cloud load: the cloud share is what reaches the cloud.",
        "- All replicas and the clients share the host's CPU cores; throughput is CPU-bound.",
        f"- The host may be shared: 1-min load average {data['host']['loadavg_at_start'][0]:.2f} at start "
        "(start and end in the JSON).",
        "",
        footer(data),
    ])


if __name__ == "__main__":
    sys.exit(main())
