"""Does the cascade pay? Tiered vs cloud-only vs edge-only serving of a real-model run, with the
configured link latency on every hop.

1. A copy of the run folder (``--run-dir``, default the SmolLM2 default job; hard links, so the copy
   is cheap and the original is never written) is measured once (``inference.calibrate.measure_run``:
   the cloud's answers, newest global version, and each edge adapter's, newest version, on the
   run's held-out eval sets, with the confidence signals the router judges).
2. Two-fold cross-fitting, so no threshold ever sees the prompts it is measured on: the held-out
   prompts split by a stable hash into folds A and B; thresholds calibrated on A serve the B prompts
   and vice versa (the sidecar ``routing/<edge>/vNNNN.json`` is rewritten between the folds; the
   router re-reads it by file stamp). Cloud-only and edge-only do not depend on thresholds.
3. The Serve app as ``gaisnet serve`` starts it, on a private local Ray; a mixed, shuffled workload of
   every domain's held-out prompts, ``--concurrency`` closed-loop clients, ``POST /v1/generate``,
   greedy, in three modes: tiered (no hint), cloud-only (tier hint ``cloud``), edge-only (tier hint
   ``edge``: the domain's adapter), alternating over ``--repeats`` passes.
4. Links (``links.end_edge``, ``links.edge_cloud`` of the run's config; ``hfsl.linkmodel.transfer_s``):
   every request crosses end->edge and back (request and response bytes); one the cloud answers
   also crosses edge->cloud and back (cloud-only: devices reach the cloud through their edge). The
   client waits the modeled link time after each answer, so latency AND closed-loop throughput
   include it.

    python benchmarks/cascade_bench.py                          # ~6 min on 2 cores
    python benchmarks/cascade_bench.py --run-dir runs/X --repeats 2

Writes benchmarks/results/cascade_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import closed_loop_clients, envelope, footer, md_table, quiet, write_results

NAME = "cascade_bench"
MODES = {"tiered": {}, "cloud-only": {"tier": "cloud"}, "edge-only": {"tier": "edge"}}
FOLDS = ((0, 2), (1, 2))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def link_s(body: bytes, answer: bytes, to_cloud: bool, links) -> float:
    """Modeled link time of one request: end<->edge always, edge<->cloud when the cloud answered."""
    from gaisnet_ray.hfsl.linkmodel import transfer_s

    t = transfer_s(len(body), 1, links.end_edge) + transfer_s(len(answer), 1, links.end_edge)
    if to_cloud:
        t += transfer_s(len(body), 1, links.edge_cloud) + transfer_s(len(answer), 1, links.edge_cloud)
    return t


def run_workload(url: str, examples: list, extra: dict, concurrency: int, max_new_tokens: int, links) -> dict:
    """Closed loop: each client takes the next example, waits for the answer, then the modeled link time."""

    def ask(c, item) -> dict:
        i, ex = item
        body = json.dumps({"prompt": ex.prompt, "max_new_tokens": max_new_tokens, **extra}).encode()
        t0 = time.perf_counter()
        r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        serve_s = time.perf_counter() - t0
        rec = {"i": i, "domain": ex.domain, "status": r.status_code, "serve_s": serve_s}
        if r.status_code == 200:
            a = r.json()
            to_cloud = a["tier"] == "cloud" or bool(a.get("escalated"))
            wire = link_s(body, r.content, to_cloud, links)
            time.sleep(wire)
            rec.update(tier=a["tier"], adapter=a["adapter"], escalated=bool(a.get("escalated")),
                       exact=a["text"].strip() == ex.answer, link_s=wire, latency_s=serve_s + wire)
        return rec

    records, wall = closed_loop_clients(url, list(enumerate(examples)), concurrency, ask)
    return {"records": records, "wall_s": wall}


def summarize(passes: list[dict]) -> dict:
    records = [r for p in passes for r in p["records"]]
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    wall = sum(p["wall_s"] for p in passes)
    per_domain = {}
    for d in sorted({r["domain"] for r in ok}):
        mine = [r for r in ok if r["domain"] == d]
        per_domain[d] = {"answers": len(mine), "exact_match": sum(r["exact"] for r in mine) / len(mine),
                         "cloud_share": sum(r["tier"] == "cloud" for r in mine) / len(mine)}
    return {
        "requests": len(records), "ok": len(ok),
        "errors": {str(s): sum(r["status"] == s for r in records) for s in {r["status"] for r in records} if s != 200},
        "throughput_rps": len(ok) / wall if wall else 0.0, "wall_s": wall,
        "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99),
        "serve_p50_ms": 1000 * percentile([r["serve_s"] for r in ok], 0.5),
        "link_mean_ms": 1000 * sum(r["link_s"] for r in ok) / max(len(ok), 1),
        "cloud_share": sum(r["tier"] == "cloud" for r in ok) / max(len(ok), 1),
        "escalated_share": sum(r["escalated"] for r in ok) / max(len(ok), 1),
        "exact_match": sum(r["exact"] for r in ok) / max(len(ok), 1), "per_domain": per_domain,
    }


def replay(m, domain_adapters: dict[str, str], fixed) -> dict:
    """The cascade's decisions replayed offline on the measured answers (no timing): each held-out
    prompt judged by its domain's adapter under thresholds calibrated on the other fold, and under
    the fixed serve.routing.* limits; exact match and cloud share per mode and domain."""
    from gaisnet_ray.inference.calibrate import calibrate_table, in_fold
    from gaisnet_ray.inference.generate import Confidence
    from gaisnet_ray.inference.routing import policy_for, route_after_edge

    def tables(fold):
        def part(items):
            return {d: [x for x, e in zip(xs, m.examples[d]) if in_fold(e.prompt, fold)] for d, xs in items.items()}
        return {e: calibrate_table(e, v, h, part(m.examples), part(a), part(m.cloud), {}, m.probe_tokens)
                for e, (v, h, a) in m.edges.items()}

    by_fold = {f: tables(f) for f in FOLDS}
    modes = ("tiered", "tiered, fixed limits", "cloud-only", "edge-only")
    rows: dict[str, dict[str, list]] = {mode: {} for mode in modes}
    for d, exs in m.examples.items():
        adapter = domain_adapters.get(d)
        if adapter not in m.edges:
            continue
        for i, ex in enumerate(exs):
            other = FOLDS[1] if in_fold(ex.prompt, FOLDS[0]) else FOLDS[0]
            e, c = m.edges[adapter][2][d][i], m.cloud[d][i]
            e_ok, c_ok = e.text.strip() == ex.answer, c.text.strip() == ex.answer
            probe = Confidence(m.probe_tokens or 0, e.mean_entropy, e.min_token_prob)
            calibrated = policy_for(by_fold[other][adapter], d, fixed)
            for mode, policy in (("tiered", calibrated), ("tiered, fixed limits", fixed)):
                keep = route_after_edge(probe, policy).tier == "edge"
                rows[mode].setdefault(d, []).append((e_ok if keep else c_ok, not keep))
            rows["cloud-only"].setdefault(d, []).append((c_ok, True))
            rows["edge-only"].setdefault(d, []).append((e_ok, False))
    out = {}
    for mode, per in rows.items():
        flat = [x for xs in per.values() for x in xs]
        out[mode] = {"answers": len(flat), "exact_match": sum(a for a, _ in flat) / max(len(flat), 1),
                     "cloud_share": sum(b for _, b in flat) / max(len(flat), 1),
                     "per_domain": {d: {"exact_match": sum(a for a, _ in xs) / len(xs),
                                        "cloud_share": sum(b for _, b in xs) / len(xs)} for d, xs in per.items()}}
    return out


def copy_run(src: Path, dst: Path) -> None:
    """The model and knowledge hard-linked (``cp -al``: cheap; serving only reads them and writes new
    files, never into an existing one), the small files copied; no logs, no earlier routing tables."""
    dst.mkdir(parents=True)
    for name in ("model", "knowledge"):
        subprocess.run(["cp", "-al", str(src / name), str(dst / name)], check=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="/work/runs/s5default")
    p.add_argument("--repeats", type=int, default=3, help="passes per mode (and per fold for tiered)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measurement", default=None,
                   help="JSON of the run's measured answers: read if it exists (same run), else written there")
    args = p.parse_args()
    quiet()
    started = time.perf_counter()
    data = envelope(NAME, vars(args))

    from gaisnet_ray.config import load_config
    from gaisnet_ray.data import eval_examples
    from gaisnet_ray.inference.calibrate import RunMeasurement, in_fold, measure_run, write_sidecars
    from gaisnet_ray.serve.app import serve_run_dir

    tmp = tempfile.TemporaryDirectory(prefix="cascade-")
    run_dir = Path(tmp.name) / "run"
    copy_run(Path(args.run_dir), run_dir)
    t0 = time.perf_counter()
    saved = Path(args.measurement) if args.measurement else None
    if saved is not None and saved.is_file():  # measured before on this run (greedy: deterministic)
        m = RunMeasurement.from_json(saved.read_text(), eval_examples(load_config(run_dir / "config.yaml").data))
        data["measurement"] = f"read from {saved}"
    else:
        m = measure_run(run_dir)
        data["measurement"] = "measured here"
        if saved is not None:
            saved.write_text(m.to_json())
    data["measure_s"] = time.perf_counter() - t0
    tables = {}
    for fold in FOLDS:
        write_sidecars(run_dir, m, fold)
        tables[f"{fold[0]}/{fold[1]}"] = {e: json.loads(p.read_text()) for e in m.edges
                                          for p in (run_dir / "routing" / e).glob("v*.json")}
    print(f"measured in {data['measure_s']:.0f} s; edges {list(m.edges)}, cloud v{m.cloud_version}", flush=True)
    from gaisnet_ray.inference.routing import RoutingPolicy
    from gaisnet_ray.inference.served import ServedRun

    r = load_config(run_dir / "config.yaml").serve.routing
    fixed = RoutingPolicy(r.max_mean_entropy, r.min_token_prob)
    data["replay"] = replay(m, ServedRun(run_dir).domain_adapters(), fixed)
    print({k: (round(v["exact_match"], 3), round(v["cloud_share"], 3)) for k, v in data["replay"].items()}, flush=True)
    examples = [e for exs in m.examples.values() for e in exs]
    rng = random.Random(args.seed)
    by_fold = {f: [e for e in examples if in_fold(e.prompt, f)] for f in FOLDS}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(run_dir / "config.yaml",
                      [f"serve.port={port}", f"serve.max_new_tokens={max(64, args.max_new_tokens)}"])
    links = cfg.links
    data["config"] = cfg.model_dump(mode="json")
    t0 = time.perf_counter()
    handle = serve_run_dir(run_dir, cfg, blocking=False)
    data["serve_start_s"] = time.perf_counter() - t0
    print(f"app up in {data['serve_start_s']:.0f} s at {handle.url}", flush=True)
    passes: dict[str, list] = {mode: [] for mode in MODES}
    try:
        import httpx

        data["health"] = httpx.get(f"{handle.url}/health", timeout=60).json()
        warm = rng.sample(examples, min(8, len(examples)))
        for mode in MODES:
            run_workload(handle.url, warm, MODES[mode], args.concurrency, args.max_new_tokens, links)
        for rep in range(args.repeats):
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
            for mode in order:
                if mode == "tiered":  # each fold's prompts under the other fold's thresholds
                    for test, calib in ((FOLDS[1], FOLDS[0]), (FOLDS[0], FOLDS[1])):
                        write_sidecars(run_dir, m, calib)
                        work = list(by_fold[test])
                        rng.shuffle(work)
                        passes[mode].append(run_workload(handle.url, work, {}, args.concurrency,
                                                         args.max_new_tokens, links))
                else:
                    work = list(examples)
                    rng.shuffle(work)
                    passes[mode].append(run_workload(handle.url, work, MODES[mode], args.concurrency,
                                                     args.max_new_tokens, links))
                done = passes[mode][-1]
                print(f"  pass {rep + 1} {mode:10s}: {len(done['records'])} in {done['wall_s']:.1f} s", flush=True)
    finally:
        handle.shutdown()
        tmp.cleanup()
    data["calibration"] = tables
    data["modes"] = {mode: summarize(ps) for mode, ps in passes.items()}
    data["wall_s"] = time.perf_counter() - started
    write_results(NAME, data, markdown(data, args))
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(data: dict, args) -> str:
    m, c = data["modes"], data["config"]
    rows = [[mode, r["ok"], _pct(r["exact_match"]), _pct(r["cloud_share"]), f"{r['p50_ms']:.0f}",
             f"{r['p99_ms']:.0f}", f"{r['throughput_rps']:.2f}", f"{r['serve_p50_ms']:.0f}", f"{r['link_mean_ms']:.0f}",
             sum(r["errors"].values())] for mode, r in m.items()]
    domains = sorted(m["tiered"]["per_domain"])
    drows = [[d, _pct(m["tiered"]["per_domain"][d]["exact_match"]), _pct(m["tiered"]["per_domain"][d]["cloud_share"]),
              _pct(m["cloud-only"]["per_domain"].get(d, {}).get("exact_match")),
              _pct(m["edge-only"]["per_domain"].get(d, {}).get("exact_match"))] for d in domains]
    rp = data["replay"]
    rrows = [[mode, r["answers"], _pct(r["exact_match"]), _pct(r["cloud_share"]),
              *(_pct(r["per_domain"].get(d, {}).get("exact_match")) for d in domains)] for mode, r in rp.items()]
    crows = []
    for fold, tables in data["calibration"].items():
        for edge, t in sorted(tables.items()):
            for d, cal in sorted(t["domains"].items()):
                thr = "escalate all" if cal["threshold"] is None else f"{cal['signal']} {cal['threshold']:.3f}"
                crows.append([fold, edge, d, thr, f"{cal['kept']}/{cal['samples']}", _pct(cal["edge_em"]),
                              _pct(cal["cloud_em"]), _pct(cal["tiered_em"])])
    le, lc = c["links"]["end_edge"], c["links"]["edge_cloud"]
    h = data["health"]
    return "\n".join([
        "# Does the cascade pay? Tiered vs cloud-only vs edge-only on the real model, links included",
        "",
        f"Run folder `{args.run_dir}` (model `{c['model']['preset']}`, knowledge version {h.get('knowledge_version')}, "
        f"domain -> edge adapter {h.get('domain_adapters')}); one replica per tier on a private local Ray "
        f"(app up in {data['serve_start_s']:.0f} s). Links: end<->edge {le['latency_ms']:g} ms + bytes at "
        f"{le['bandwidth_mbps']:g} Mbit/s each way; edge<->cloud {lc['latency_ms']:g} ms + bytes at "
        f"{lc['bandwidth_mbps']:g} Mbit/s each way, on requests the cloud answers.",
        "",
        f"Workload: every held-out prompt of the run's domains, shuffled, {args.repeats} passes per mode, "
        f"{args.concurrency} closed-loop clients, greedy, up to {args.max_new_tokens} new tokens, `POST /v1/generate`. "
        "Tiered thresholds are cross-fitted: each half of the prompts is served with thresholds calibrated on the "
        "other half.",
        "",
        md_table(["mode", "answers", "exact match", "to cloud", "p50 ms", "p99 ms", "req/s", "serve p50 ms",
                  "link mean ms", "errors"], rows),
        "",
        "Exact match per domain (tiered: share that reached the cloud):",
        "",
        md_table(["domain", "tiered EM", "tiered to cloud", "cloud-only EM", "edge-only EM"], drows),
        "",
        "The same decisions replayed offline on the measured answers (no serving, no timing; each prompt "
        "judged under the other fold's thresholds, or under the fixed serve.routing.* limits):",
        "",
        md_table(["mode", "answers", "exact match", "to cloud", *(f"{d} EM" for d in domains)], rrows),
        "",
        "Calibration (per fold it was calibrated on; the other fold is served with it):",
        "",
        md_table(["fold", "edge", "domain", "keep when", "kept", "edge EM", "cloud EM", "tiered EM"], crows),
        "",
        f"- The run's answers for calibration: {data['measurement']} ({data['measure_s']:.0f} s).",
        f"- The host is shared with other work: 1-min load average {data['host']['loadavg_at_start'][0]:.2f} at start "
        "(start and end in the JSON); all replicas and the clients share its CPU cores.",
        "",
        footer(data),
    ])


if __name__ == "__main__":
    sys.exit(main())
