"""Planning the round: modeled and measured delay of the planned round vs the fixed cut and the
balanced clustering, on a heterogeneous fleet, and the planner at 1,000 devices.

1. **Measured, with emulation** (local dev mode, `planner.emulate: true`): the tiny preset (a 0.19M
   GPT-2) with the default job's topology (2 edges x 3 devices, `cluster_size: 3`, cut 1+1), 6 steps
   of 16 x 48 tokens per turn, 2 rounds per planner through `gaisnet run`. The host's speed is
   calibrated once (`planner.host_gflops` then fixed for all runs); the fleet is phones, laptops and
   gateways at 1/12, 1/4 and 1/1.2 of the host's speed (emulation can only slow a device down), with
   their own links, sharing a 60 Mbit/s edge link. Measured: each round's devices' turns and edge
   updates (`plan.measured_train_s`), beside the cost model's round (`plan.modeled_round_s`).
2. **Modeled, the real model** (SmolLM2-135M's shapes, the default job's batch): the default fleet
   size with the built-in device classes, and 1,000 devices (10 edges x 100) on 1 Gbit/s, 500 GFLOP/s
   edges: delay, energy per device, planning time, and the optimized plan against a lower bound.
3. **Heuristic vs exact**: 40 random 6-device edges planned both ways (the gap of the heuristic).

    python benchmarks/planner_bench.py              # about 3-5 minutes on 2 CPUs
    python benchmarks/planner_bench.py --no-measure # the modeled parts only (seconds)

Writes benchmarks/results/planner_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, TINY_YAML, envelope, footer, make_config, md_table, quiet, write_results

PLANNERS = ("fixed", "balanced", "optimized")
ENERGY_WEIGHTS = (0.0001, 0.01)  # seconds of round delay one joule of device energy is worth
TOPOLOGY = ["topology.edges=2", "topology.devices_per_edge=3", "topology.cluster_size=3",
            "topology.cut={front_layers: 1, back_layers: 1}"]


def emulated_fleet(host: float) -> list[str]:
    classes = {
        "phone": dict(gflops=host / 12, memory_gb=0.7, uplink_mbps=8, downlink_mbps=30, latency_ms=30,
                      j_per_gflop=0.25, j_per_mb_up=2.0, j_per_mb_down=0.8, share=0.5, spread=0.2),
        "laptop": dict(gflops=host / 4, memory_gb=2, uplink_mbps=40, downlink_mbps=80, latency_ms=15,
                       j_per_gflop=0.4, j_per_mb_up=0.6, j_per_mb_down=0.3, share=0.3, spread=0.2),
        "gateway": dict(gflops=host / 1.2, memory_gb=4, uplink_mbps=200, downlink_mbps=200, latency_ms=5,
                        j_per_gflop=0.2, j_per_mb_up=0.1, j_per_mb_down=0.1, share=0.2, spread=0.1),
    }
    return [f"planner.host_gflops={host}", f"planner.classes={json.dumps(classes)}", "planner.fleet=classes",
            "planner.edge_bandwidth_mbps=60", "planner.seed=0"]


def measured(host: float, rounds: int) -> dict:
    out = {}
    base = [*TOPOLOGY, *emulated_fleet(host), "planner.emulate=true", "training.pretrain_steps=0",
            f"training.rounds={rounds}", "training.eval_every=100", "relay.policy=none",
            "data.eval_samples_per_domain=8"]
    for planner in PLANNERS:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "gaisnet_ray", "run", str(TINY_YAML), "--out", str(run_dir), "--no-progress"]
            for o in [*base, f"topology.planner={planner}"]:
                cmd += ["--set", o]
            started = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"{planner} run failed: {p.stderr[-2000:]}")
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            plan = json.loads((run_dir / "plan.json").read_text())
        out[planner] = {
            "measured_train_s": [r["plan"]["measured_train_s"] for r in rows],
            "modeled_round_s": rows[0]["plan"]["modeled_round_s"],
            "round_wall_s": [r["wall_s"] for r in rows],
            "clusters": rows[0]["clusters"],
            "cuts": plan["plan"]["cuts"],
            "run_s": time.perf_counter() - started,
        }
        print(f"{planner}: measured {out[planner]['measured_train_s']} modeled {out[planner]['modeled_round_s']:.2f}",
              flush=True)
    return out


def lower_bound(plan_space, fleet) -> float:
    """No plan beats, per edge: all its devices' bytes through its link, its slowest device alone
    with the whole link, or the middles its edge must compute; plus the least overheads."""
    from gaisnet_ray.planner.cost import cloud_overhead_s, edge_overhead_s, turn_seconds, turn_terms

    shape = plan_space
    worst = 0.0
    for e, devs in fleet.by_edge().items():
        edge = fleet.edge(e)
        opts = {d.device_id: range(2, (shape.max_blocks_within(d.memory_bytes) or 1) + 1) for d in devs}
        devs = [d for d in devs if len(opts[d.device_id])]
        if not devs:
            continue
        bits = sum(min(turn_terms(shape, d, edge, b, 1).up_bits * 2 for b in opts[d.device_id]) for d in devs)
        alone = max(min(turn_seconds(turn_terms(shape, d, edge, b, 1), d, edge, 1.0) for b in opts[d.device_id])
                    for d in devs)
        # the edge computes every device's middle, at least that of the largest cut each device holds
        middle = sum(shape.steps * shape.edge_flops(max(opts[d.device_id])) for d in devs) / edge.flops
        worst = max(worst, max(bits / edge.bandwidth_bps, alone, middle) + edge_overhead_s(shape, edge, 1))
    return worst + cloud_overhead_s(shape, fleet, len(fleet.edges))


def modeled(cfg_overrides: list[str], label: str) -> dict:
    from gaisnet_ray.hfsl.memory import model_config_of
    from gaisnet_ray.planner.cost import RoundShape
    from gaisnet_ray.planner.planning import alternatives, plan_round
    from gaisnet_ray.planner.profiles import build_fleet

    cfg = make_config(cfg_overrides, config=None)  # the embedded default: SmolLM2-135M
    shape = RoundShape.from_config(cfg, model_config_of(cfg))
    fleet = build_fleet(cfg, cfg.planner.host_gflops)
    if cfg.topology.num_devices > 50:
        plans = [plan_round(cfg, shape, fleet, planner=p) for p in PLANNERS]
        for w in ENERGY_WEIGHTS:
            weighted = cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"energy_weight": w})})
            plans.append(plan_round(weighted, shape, fleet, planner="optimized"))
            plans[-1].name = f"optimized, energy_weight {w:g}"
    else:
        plans = alternatives(cfg, shape, fleet)
    kinds = {}
    for d in fleet.devices:
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    rows = []
    for p in plans:
        e = list(p.energy_j.values())
        rows.append({"plan": p.name, "delay_s": p.delay_s, "energy_total_j": sum(e),
                     "energy_mean_j": statistics.mean(e), "energy_max_j": max(e),
                     "max_memory_gb": max(p.memory_bytes.values()) / 1e9, "clusters": sum(map(len, p.clusters.values())),
                     "excluded": len(p.excluded), "planning_s": p.planning_s,
                     "methods": sorted(set(p.methods.values()))})
    return {"label": label, "devices": len(fleet.devices), "kinds": kinds, "plans": rows,
            "lower_bound_s": lower_bound(shape, fleet)}


def heuristic_gap(instances: int = 40) -> dict:
    from gaisnet_ray.hfsl.memory import model_config_of
    from gaisnet_ray.planner.cost import RoundShape
    from gaisnet_ray.planner.planning import optimized_plan
    from gaisnet_ray.planner.profiles import build_fleet

    gaps = []
    for seed in range(instances):
        cfg = make_config(["topology.edges=1", "topology.devices_per_edge=6", "planner.fleet=classes",
                           f"planner.seed={seed}", "planner.host_gflops=20", "planner.edge_gflops=100",
                           "planner.edge_bandwidth_mbps=200"], config=None)
        shape = RoundShape.from_config(cfg, model_config_of(cfg))
        fleet = build_fleet(cfg, 20.0)
        exact = optimized_plan(cfg, shape, fleet, force="exact").objective
        heur = optimized_plan(cfg, shape, fleet, force="heuristic").objective
        gaps.append(heur / exact - 1)
    return {"instances": instances, "mean_gap": statistics.mean(gaps), "max_gap": max(gaps),
            "optimal_share": sum(g < 1e-6 for g in gaps) / len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-measure", action="store_true", help="skip the emulated runs")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    quiet()
    started = time.perf_counter()
    data = envelope("planner_bench", vars(args))
    from gaisnet_ray.hfsl.memory import model_config_of
    from gaisnet_ray.planner.calibrate import measure_host_gflops

    tiny = make_config(TOPOLOGY)
    host = round(measure_host_gflops(tiny, model_config_of(tiny), steps=3), 2)
    data["host_gflops_tiny"] = host
    print(f"host: {host} GFLOP/s (tiny preset, calibrated)", flush=True)
    md = ["## Planner benchmark", ""]
    if not args.no_measure:
        m = measured(host, args.rounds)
        data["measured"] = m
        fixed = statistics.mean(m["fixed"]["measured_train_s"])
        rows = []
        for p in PLANNERS:
            mean = statistics.mean(m[p]["measured_train_s"])
            rows.append([p, f"{m[p]['modeled_round_s']:.2f}", f"{mean:.2f}", f"{fixed / mean:.2f}x",
                         " ".join("+".join(map(str, (c["front_layers"], c["back_layers"]))) for c in m[p]["cuts"].values()),
                         "; ".join(" ".join(f"[{','.join(x[4:] for x in c)}]" for c in cs) for cs in m[p]["clusters"].values())])
        md += ["### Measured with emulation: tiny preset, the default job's topology (2 x 3, cluster_size 3, cut 1+1)",
               "", f"Host calibrated at {host} GFLOP/s; phones / laptops / gateways at 1/12, 1/4, 1/1.2 of it, "
               "60 Mbit/s edge links; mean of the rounds' measured training part (device turns + edge updates).", "",
               md_table(["planner", "modeled s", "measured s", "speed-up vs fixed", "cuts", "clusters"],
                        rows, "lrrrll"), ""]
    default_fleet = ["planner.fleet=classes", "planner.host_gflops=20", "planner.edge_gflops=500",
                     "planner.edge_bandwidth_mbps=1000"]
    small = modeled([*default_fleet], "default fleet size (2 x 3), SmolLM2-135M, modeled")
    big = modeled([*default_fleet, "topology.edges=10", "topology.devices_per_edge=100", "data.partition=iid"],
                  "1,000 devices (10 x 100), SmolLM2-135M, modeled")
    data["modeled"] = [small, big]
    for res in (small, big):
        fixed = next(r for r in res["plans"] if r["plan"] == "fixed")["delay_s"]
        rows = [[r["plan"], f"{r['delay_s']:.1f}", f"{fixed / r['delay_s']:.2f}x", f"{r['energy_mean_j']:.1f}",
                 f"{r['energy_max_j']:.1f}", f"{r['max_memory_gb']:.2f}", r["clusters"], r["excluded"],
                 f"{r['planning_s']:.2f}", ",".join(r["methods"])] for r in res["plans"]]
        md += [f"### {res['label']}", "", f"Fleet: {res['kinds']}; lower bound on any plan's round: "
               f"{res['lower_bound_s']:.1f} s.", "",
               md_table(["plan", "delay s", "vs fixed", "J/device mean", "J/device max", "max mem GB", "clusters",
                         "excluded", "plan s", "search"], rows, "lrrrrrrrrl"), ""]
    gap = heuristic_gap()
    data["heuristic_gap"] = gap
    md += ["### Heuristic vs exact", "",
           f"{gap['instances']} random 6-device edges (SmolLM2-135M shapes): the heuristic found the optimum in "
           f"{gap['optimal_share']:.0%}; mean gap {gap['mean_gap']:.2%}, max {gap['max_gap']:.2%}.", ""]
    data["wall_s"] = time.perf_counter() - started
    md.append(footer(data))
    write_results("planner_bench", data, "\n".join(md))


if __name__ == "__main__":
    main()
