"""Wall time of HFSL rounds on Ray vs the same steps in one plain process, and a correctness check.

Both sides run the same config and seeds: ``GaisNetDriver.run_round`` (tier actors on a private
local Ray, each actor with run.torch_threads=1) and ``InProcessGaisNet.run_round`` (the same core
objects called directly, with ``torch.set_num_threads(1)`` to match the actors). After a warm-up
round on each side, rounds alternate between the two sides (so load from other processes on the
host hits both alike) and the median of N rounds is compared. Actor start-up is measured
separately. At the end the two sides' knowledge (the global adapter) must be bit-identical.

Two phases by default:
  cores=all : the host's CPUs as they are. Ray runs the clusters of both edges in parallel
              processes, the in-process baseline runs everything serially on one thread, so the
              ratio mixes Ray's overhead with the parallelism it buys.
  cores=1   : the whole process tree (this process, raylet, every actor) pinned to one CPU with
              sched_setaffinity, so both sides have the same compute: the ratio is Ray's overhead.

    python benchmarks/overhead.py                  # both phases, 3 measured rounds, ~2-3 min on 2 cores
    python benchmarks/overhead.py --rounds 5 --phases all

Writes benchmarks/results/overhead.{json,md}. Exits 1 if the knowledge differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import envelope, make_config, md_table, quiet, versions_line, write_results

NAME = "overhead"
BASE_OVERRIDES = ["training.pretrain_steps=0", "run.progress=false"]


def _round_record(m: dict, wall: float) -> dict:
    return {"wall_s": wall, "train_loss": m["train_loss"], "bytes": m["bytes"], "version": m["version"],
            "edge_wall_s": m.get("edge_wall_s"), "evaluated": "eval" in m}


def compare_knowledge(a: dict, b: dict) -> dict:
    import torch

    keys_a, keys_b = set(a), set(b)
    common = sorted(keys_a & keys_b)
    differ = [k for k in common if not torch.equal(a[k], b[k])]
    max_abs = max((float((a[k].float() - b[k].float()).abs().max()) for k in differ), default=0.0)
    return {
        "equal": keys_a == keys_b and not differ,
        "num_keys": len(keys_a),
        "missing_on_ray": sorted(keys_a - keys_b),
        "missing_in_process": sorted(keys_b - keys_a),
        "keys_differing": differ,
        "max_abs_diff": max_abs,
    }


def run_phase(cfg, warmup: int, rounds: int, pin_cpu: int | None) -> dict:
    import ray
    import torch

    from gaisnet_ray.cluster import connect
    from gaisnet_ray.driver import GaisNetDriver
    from gaisnet_ray.hfsl.inprocess import InProcessGaisNet

    old_affinity = os.sched_getaffinity(0)
    if pin_cpu is not None:
        os.sched_setaffinity(0, {pin_cpu})  # inherited by raylet and every actor started below
    torch.set_num_threads(cfg.run.torch_threads)  # = what each actor sets (run.torch_threads)
    out: dict = {"cores": "1 (pinned to cpu %d)" % pin_cpu if pin_cpu is not None else "all",
                 "affinity": sorted(os.sched_getaffinity(0)), "torch_threads_in_process": torch.get_num_threads()}
    try:
        with tempfile.TemporaryDirectory(prefix="gaisnet-bench-") as tmp:
            # ---- in-process: setup + the initial evaluation the driver's start() also does
            t0 = time.perf_counter()
            g = InProcessGaisNet(cfg, os.path.join(tmp, "inprocess"))
            t1 = time.perf_counter()
            g.cloud.evaluate()
            t2 = time.perf_counter()
            out["inprocess_setup_s"] = t1 - t0
            out["inprocess_initial_eval_s"] = t2 - t1

            # ---- Ray: private local instance, tier actors placed by resources
            t0 = time.perf_counter()
            with connect(cfg) as info:
                out["ray_init_s"] = time.perf_counter() - t0
                out["ray_mode"] = info.mode
                out["ray_resources"] = info.resources
                out["ray_worker_affinity"] = sorted(ray.get(
                    ray.remote(num_cpus=0)(lambda: sorted(os.sched_getaffinity(0))).remote()))
                driver = GaisNetDriver(cfg, os.path.join(tmp, "ray"))
                try:
                    t0 = time.perf_counter()
                    driver.start()
                    out["ray_driver_start_s"] = time.perf_counter() - t0

                    inproc, onray = [], []
                    for r in range(1, warmup + rounds + 1):
                        # alternate which side goes first, so drift in host load hits both alike
                        order = ("inprocess", "ray") if r % 2 else ("ray", "inprocess")
                        for side in order:
                            t0 = time.perf_counter()
                            m = g.run_round(r) if side == "inprocess" else driver.run_round(r)
                            wall = time.perf_counter() - t0
                            rec = _round_record(m, wall)
                            rec["round"], rec["warmup"] = r, r <= warmup
                            (inproc if side == "inprocess" else onray).append(rec)
                        print(f"  round {r}{' (warm-up)' if r <= warmup else ''}: in-process "
                              f"{inproc[-1]['wall_s']:.2f}s  ray {onray[-1]['wall_s']:.2f}s", flush=True)
                    knowledge_ray = ray.get(driver.knowledge_ref)
                finally:
                    driver.close()
    finally:
        os.sched_setaffinity(0, old_affinity)

    measured_in = [x["wall_s"] for x in inproc if not x["warmup"]]
    measured_ray = [x["wall_s"] for x in onray if not x["warmup"]]
    out["rounds_inprocess"], out["rounds_ray"] = inproc, onray
    out["median_inprocess_s"] = statistics.median(measured_in)
    out["median_ray_s"] = statistics.median(measured_ray)
    out["ratio_ray_over_inprocess"] = out["median_ray_s"] / out["median_inprocess_s"]
    out["paired_ratios"] = [b / a for a, b in zip(measured_in, measured_ray)]
    out["warmup_inprocess_s"] = [x["wall_s"] for x in inproc if x["warmup"]]
    out["warmup_ray_s"] = [x["wall_s"] for x in onray if x["warmup"]]
    out["knowledge"] = compare_knowledge(g.knowledge, knowledge_ray)
    out["same_train_loss_every_round"] = all(a["train_loss"] == b["train_loss"] for a, b in zip(inproc, onray))
    out["same_bytes_every_round"] = all(a["bytes"] == b["bytes"] for a, b in zip(inproc, onray))
    out["final_version"] = {"inprocess": inproc[-1]["version"], "ray": onray[-1]["version"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per side (median; default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds per side, not measured (default 1)")
    ap.add_argument("--phases", nargs="+", choices=["all", "1"], default=["all", "1"],
                    help="CPU sets to run: 'all' (host as is) and/or '1' (everything pinned to one CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override, as `gaisnet run --set` (repeatable)")
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")

    quiet()
    overrides = BASE_OVERRIDES + [f"training.rounds={args.warmup + args.rounds}"] + args.overrides
    cfg = make_config(overrides)
    if cfg.training.scheme != "hfsl":
        print(f"note: training.scheme={cfg.training.scheme} (this benchmark is meant for hfsl)")

    data = envelope(NAME, vars(args))
    data["overrides"] = overrides
    data["config"] = cfg.model_dump(mode="json")
    phases = {}
    started = time.perf_counter()
    for ph in args.phases:
        pin = None if ph == "all" else min(os.sched_getaffinity(0))
        print(f"phase cores={ph}:", flush=True)
        phases[ph] = run_phase(cfg, args.warmup, args.rounds, pin)
    data["phases"] = phases
    data["wall_s"] = time.perf_counter() - started
    data["knowledge_equal"] = all(p["knowledge"]["equal"] for p in phases.values())
    write_results(NAME, data, render(data))
    if not data["knowledge_equal"]:
        print("\n!!! KNOWLEDGE DIFFERS between Ray and in-process runs: see knowledge in the JSON !!!",
              file=sys.stderr)
        sys.exit(1)


def render(data: dict) -> str:
    cfg = data["config"]
    topo, tr = cfg["topology"], cfg["training"]
    a = data["args"]
    out = ["# Ray overhead: HFSL rounds on Ray vs one plain process", ""]
    out.append(
        f"Default config, training.pretrain_steps=0: {cfg['model']['family']} `{cfg['model']['preset']}`, "
        f"{topo['edges']} edges x {topo['devices_per_edge']} devices, cluster_size {topo['cluster_size']}, "
        f"local_steps {tr['local_steps']}, batch {tr['batch_size']}, evaluation every {tr['eval_every']} round(s) "
        f"(inside the round on both sides). Median of {a['rounds']} rounds per side after {a['warmup']} warm-up "
        f"round(s), rounds alternating between the sides. In-process: `InProcessGaisNet.run_round` with "
        f"`torch.set_num_threads({cfg['run']['torch_threads']})`, matching each actor's run.torch_threads="
        f"{cfg['run']['torch_threads']}. Ray: `GaisNetDriver.run_round` on a private local Ray.")
    out.append("")
    rows = []
    for ph, p in data["phases"].items():
        rows.append([p["cores"], f"{p['median_inprocess_s']:.2f}", f"{p['median_ray_s']:.2f}",
                     f"**{p['ratio_ray_over_inprocess']:.2f}x**",
                     ", ".join(f"{x:.2f}" for x in p["paired_ratios"]),
                     "yes" if p["knowledge"]["equal"] else "**NO**"])
    out.append(md_table(["CPUs", "in-process round (s)", "Ray round (s)", "Ray / in-process", "per-round ratios",
                         "same knowledge"], rows, "lrrrll"))
    out.append("")
    out.append("Start-up (not in the round times):")
    out.append("")
    rows = []
    for ph, p in data["phases"].items():
        rows.append([p["cores"], f"{p['ray_init_s']:.1f}", f"{p['ray_driver_start_s']:.1f}",
                     f"{p['inprocess_setup_s'] + p['inprocess_initial_eval_s']:.1f}",
                     ", ".join(f"{x:.2f}" for x in p["warmup_ray_s"]) or "-",
                     ", ".join(f"{x:.2f}" for x in p["warmup_inprocess_s"]) or "-"])
    out.append(md_table(["CPUs", "ray.init (s)", "actor start-up: driver.start() (s)", "in-process setup (s)",
                         "Ray warm-up round (s)", "in-process warm-up round (s)"], rows, "lrrrrr"))
    out.append("")
    out.append(
        "driver.start() places 1 cloud + the edge + the device actors, builds the foundation on the cloud, ships it "
        "to every actor, and runs the initial evaluation; the in-process setup column is the same work "
        "(InProcessGaisNet construction + one evaluation) in one process.")
    out.append("")
    out.append("Notes:")
    out.append("")
    out.append(
        "- cores=all: Ray runs each edge's clusters in parallel actor processes; the in-process baseline is serial "
        "on one thread. A ratio below 1 there is parallel speed-up, not negative overhead.")
    out.append(
        "- cores=1: this process, the raylet and every actor are pinned to one CPU (sched_setaffinity, inherited; "
        "the Ray workers' affinity is checked and recorded), so both sides have the same compute and the ratio is "
        "Ray's own cost: actor calls per split step (2 per step per device), serialization through the object "
        "store, process switches.")
    ke = all(p["knowledge"]["equal"] for p in data["phases"].values())
    sl = all(p["same_train_loss_every_round"] and p["same_bytes_every_round"] for p in data["phases"].values())
    out.append(
        f"- Correctness of the comparison: final global adapter state dicts are "
        f"{'bit-identical (torch.equal on every key)' if ke else 'NOT identical (see JSON)'}; per-round train "
        f"loss and bytes {'identical' if sl else 'NOT identical'} on both sides.")
    loads = [data["host"]["loadavg_at_start"][0]]
    out.append(
        f"- The host is shared: 1-min load average {loads[0]:.2f} at start (JSON has start and end). "
        f"Other processes on the host inflate both sides; rerun on an idle machine for clean numbers.")
    out.append("")
    out.append(f"Command: `{data['command']}` - wall {data['wall_s']:.0f} s on {data['host']['cpu_count']} CPUs, "
               f"{data['date']}. Versions: {versions_line(data['versions'])}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
