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
  cores=1   : then, in the same Ray session, the whole process tree (this process, GCS, raylet,
              every actor, thread by thread) is pinned to one CPU with sched_setaffinity, so both
              sides have the same compute: the ratio is Ray's own overhead.

    python benchmarks/overhead.py                  # both phases, 3 measured rounds each, ~3 min on 2 cores
    python benchmarks/overhead.py --rounds 5 --phases all
    python benchmarks/overhead.py --model smollm2 --phases 1 --rounds 1 --tag smollm2   # the real model

Writes benchmarks/results/overhead.{json,md}. Exits 1 if the knowledge differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import TINY_YAML, descendants, envelope, footer, make_config, md_table, quiet, write_results

NAME = "overhead"
BASE_OVERRIDES = ["training.pretrain_steps=0", "run.progress=false"]
# the real model (--model smollm2): the embedded default job without the relay into the base (a
# relay would add the base's download to every node to each round, on both sides alike), and the
# cloud on one torch thread like every other actor and the in-process side (the default job gives it
# 2: pinned to one core, its two OpenMP threads spin against each other, and the first measurement,
# 988 s a Ray round against 107 s in process, was that, not Ray)
SMOLLM2_OVERRIDES = ["relay.policy=none", "topology.cloud.torch_threads=1"]


def _model_label(model: dict) -> str:
    """``gpt2 `tiny```; a real preset by its name alone (its family comes from its weights)."""
    from gaisnet_ray.models.sources import REAL_PRESETS

    return f"`{model['preset']}`" if model.get("path") is None and model["preset"] in REAL_PRESETS \
        else f"{model['family']} `{model['preset']}`"


def _round_record(m: dict, wall: float) -> dict:
    return {"wall_s": wall, "train_loss": m["train_loss"], "bytes": m["bytes"], "version": m["version"],
            "edge_wall_s": m.get("edge_wall_s"), "evaluated": bool(m.get("eval"))}


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


def pin_tree(cpus: set[int]) -> dict:
    """Pin this process and every descendant, thread by thread, to ``cpus`` (new threads and
    processes inherit it). Returns what was pinned and the affinity read back."""
    pids = [os.getpid(), *descendants(os.getpid())]
    tasks = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                    tasks += 1
                except OSError:
                    pass
        except OSError:
            pass
    readback = {}
    for pid in pids:
        try:
            readback[pid] = sorted(os.sched_getaffinity(pid))
        except OSError:
            pass
    return {"processes": len(pids), "threads": tasks, "all_pinned": all(set(v) == cpus for v in readback.values()),
            "affinity_by_pid": readback}


def _summary(inproc: list[dict], onray: list[dict]) -> dict:
    measured_in = [x["wall_s"] for x in inproc]
    measured_ray = [x["wall_s"] for x in onray]
    return {
        "median_inprocess_s": statistics.median(measured_in),
        "median_ray_s": statistics.median(measured_ray),
        "ratio_ray_over_inprocess": statistics.median(measured_ray) / statistics.median(measured_in),
        "paired_ratios": [b / a for a, b in zip(measured_in, measured_ray)],
        "rounds": [x["round"] for x in inproc],
        "wall_inprocess_s": measured_in,
        "wall_ray_s": measured_ray,
    }


def run(cfg, warmup: int, rounds: int, phases: list[str]) -> dict:
    """One in-process GaisNet and one Ray GaisNet side by side; rounds alternate between them.

    Per phase: ``warmup`` unmeasured rounds then ``rounds`` measured ones. Phase 'all' uses the
    host's CPUs as they are; phase '1' first pins this process and the whole Ray process tree to
    one CPU. Rounds continue across phases on both sides (the same round numbers), so the final
    knowledge compared at the end is the result of every round.
    """
    import ray
    import torch

    from gaisnet_ray.cluster import connect
    from gaisnet_ray.driver import GaisNetDriver
    from gaisnet_ray.inprocess import InProcessGaisNet

    torch.set_num_threads(cfg.run.torch_threads)  # = what each actor sets (run.torch_threads)
    out: dict = {"torch_threads_in_process": torch.get_num_threads(), "affinity_at_start": sorted(os.sched_getaffinity(0))}
    old_affinity = os.sched_getaffinity(0)
    inproc, onray, pins = [], [], {}
    try:
        with tempfile.TemporaryDirectory(prefix="gaisnet-bench-") as tmp:
            # ---- in-process: setup + the initial evaluation the driver's start() also does
            t0 = time.perf_counter()
            g = InProcessGaisNet(cfg, os.path.join(tmp, "inprocess"))
            t1 = time.perf_counter()
            g.cloud.evaluate()
            out["inprocess_setup_s"] = t1 - t0
            out["inprocess_initial_eval_s"] = time.perf_counter() - t1

            # ---- Ray: private local instance, tier actors placed by resources
            t0 = time.perf_counter()
            with connect(cfg) as info:
                out["ray_init_s"] = time.perf_counter() - t0
                out["ray_mode"], out["ray_resources"] = info.mode, info.resources
                driver = GaisNetDriver(cfg, os.path.join(tmp, "ray"))
                try:
                    t0 = time.perf_counter()
                    driver.start()
                    out["ray_driver_start_s"] = time.perf_counter() - t0
                    r = 0
                    for ph in phases:
                        if ph == "all" and pins:  # a later 'all' phase: undo an earlier pinning
                            pin_tree(old_affinity)
                        if ph == "1":
                            cpu = min(old_affinity)
                            pins[ph] = pin_tree({cpu})
                            print(f"pinned {pins[ph]['processes']} processes ({pins[ph]['threads']} threads) "
                                  f"to cpu {cpu}: all pinned = {pins[ph]['all_pinned']}", flush=True)
                        print(f"phase cores={ph}:", flush=True)
                        for i in range(warmup + rounds):
                            r += 1
                            # alternate which side goes first, so drift in host load hits both alike
                            order = ("inprocess", "ray") if r % 2 else ("ray", "inprocess")
                            for side in order:
                                t0 = time.perf_counter()
                                m = g.run_round(r) if side == "inprocess" else driver.run_round(r)
                                rec = _round_record(m, time.perf_counter() - t0)
                                rec.update(round=r, phase=ph, warmup=i < warmup)
                                (inproc if side == "inprocess" else onray).append(rec)
                            print(f"  round {r}{' (warm-up)' if i < warmup else ''}: in-process "
                                  f"{inproc[-1]['wall_s']:.2f}s  ray {onray[-1]['wall_s']:.2f}s", flush=True)
                    knowledge_ray = ray.get(driver.knowledge_ref)
                finally:
                    driver.close()
    finally:
        pin_tree(old_affinity)

    out["rounds_inprocess"], out["rounds_ray"] = inproc, onray
    out["phases"] = {}
    for ph in phases:
        measured = lambda xs: [x for x in xs if x["phase"] == ph and not x["warmup"]]  # noqa: E731
        out["phases"][ph] = {
            "cores": "all" if ph == "all" else f"1 (whole process tree pinned to cpu {min(old_affinity)})",
            **_summary(measured(inproc), measured(onray)),
            "warmup_inprocess_s": [x["wall_s"] for x in inproc if x["phase"] == ph and x["warmup"]],
            "warmup_ray_s": [x["wall_s"] for x in onray if x["phase"] == ph and x["warmup"]],
            "pinning": pins.get(ph),
        }
    out["knowledge"] = compare_knowledge(g.knowledge, knowledge_ray)
    out["same_train_loss_every_round"] = all(a["train_loss"] == b["train_loss"] for a, b in zip(inproc, onray))
    out["same_bytes_every_round"] = all(a["bytes"] == b["bytes"] for a, b in zip(inproc, onray))
    out["final_version"] = {"inprocess": inproc[-1]["version"], "ray": onray[-1]["version"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per side and phase (median; default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds per side and phase, not measured (default 1)")
    ap.add_argument("--phases", nargs="+", choices=["all", "1"], default=["all", "1"],
                    help="CPU sets, in order: 'all' (host as is) and/or '1' (everything pinned to one CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override, as `gaisnet run --set` (repeatable)")
    ap.add_argument("--tag", default=None, help="write results/%s-TAG.{json,md} instead (keeps the default results)" % NAME)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                    help="tiny: examples/tiny.yaml (default); smollm2: the embedded default job on the real model "
                         "SmolLM2-135M (relay off, so rounds are training + evaluation only)")
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")

    quiet()
    total = len(args.phases) * (args.warmup + args.rounds)
    overrides = BASE_OVERRIDES + (SMOLLM2_OVERRIDES if args.model == "smollm2" else []) + \
        [f"training.rounds={total}"] + args.overrides
    cfg = make_config(overrides, config=None if args.model == "smollm2" else TINY_YAML)
    if cfg.training.scheme != "hfsl":
        print(f"note: training.scheme={cfg.training.scheme} (this benchmark is meant for hfsl)")

    data = envelope(NAME, vars(args))
    data["overrides"] = overrides
    data["config"] = cfg.model_dump(mode="json")
    started = time.perf_counter()
    data.update(run(cfg, args.warmup, args.rounds, args.phases))
    data["wall_s"] = time.perf_counter() - started
    data["knowledge_equal"] = data["knowledge"]["equal"]
    write_results(NAME + (f"-{args.tag}" if args.tag else ""), data, render(data))
    if not data["knowledge_equal"]:
        print("\n!!! KNOWLEDGE DIFFERS between the Ray and the in-process run: see 'knowledge' in the JSON !!!",
              file=sys.stderr)
        sys.exit(1)


def render(data: dict) -> str:
    cfg = data["config"]
    topo, tr = cfg["topology"], cfg["training"]
    a = data["args"]
    n_rounds = len(data["rounds_ray"])
    if tr["eval_every"] > n_rounds and tr["rounds"] > n_rounds:
        evals = "no evaluation in these rounds (training.eval_every and training.rounds set above the rounds run)"
    else:
        evals = f"evaluation every {tr['eval_every']} round(s), inside the round on both sides"
    out = ["# Ray overhead: HFSL rounds on Ray vs one plain process", ""]
    out.append(
        f"Default config with training.pretrain_steps=0: {_model_label(cfg['model'])}, "
        f"{topo['edges']} edges x {topo['devices_per_edge']} devices, cluster_size {topo['cluster_size']}, "
        f"local_steps {tr['local_steps']}, batch {tr['batch_size']}, {evals}. Median of {a['rounds']} rounds per side after {a['warmup']} warm-up "
        f"round(s), rounds alternating between the sides. In-process: `InProcessGaisNet.run_round` with "
        f"`torch.set_num_threads({cfg['run']['torch_threads']})`, matching each actor's run.torch_threads="
        f"{cfg['run']['torch_threads']}. Ray: `GaisNetDriver.run_round` on a private local Ray "
        f"(`cluster.connect`), after `GaisNetDriver.start()`.")
    out.append("")
    rows = []
    for ph, p in data["phases"].items():
        rows.append([p["cores"], f"{p['median_inprocess_s']:.2f}", f"{p['median_ray_s']:.2f}",
                     f"**{p['ratio_ray_over_inprocess']:.2f}x**",
                     ", ".join(f"{x:.2f}" for x in p["paired_ratios"])])
    out.append(md_table(["CPUs", "in-process round (s)", "Ray round (s)", "Ray / in-process", "per-round ratios"],
                        rows, "lrrrl"))
    out.append("")
    out.append("Start-up (not in the round times):")
    out.append("")
    out.append(md_table(
        ["ray.init (s)", "actor start-up: driver.start() (s)", "in-process setup + initial eval (s)",
         "first Ray round (s)", "first in-process round (s)"],
        [[f"{data['ray_init_s']:.1f}", f"{data['ray_driver_start_s']:.1f}",
          f"{data['inprocess_setup_s'] + data['inprocess_initial_eval_s']:.1f}",
          f"{data['rounds_ray'][0]['wall_s']:.2f}", f"{data['rounds_inprocess'][0]['wall_s']:.2f}"]], "rrrrr"))
    out.append("")
    out.append(
        "driver.start() places 1 cloud, the edge and the device actors (one process each), builds the foundation "
        "on the cloud, ships it to every actor and runs the initial evaluation; the in-process column is the same "
        "work in one process. Most of driver.start() is every actor process importing torch, transformers and "
        "peft at once on the host's cores.")
    out.append("")
    k = data["knowledge"]
    same = data["same_train_loss_every_round"] and data["same_bytes_every_round"]
    out.append("Notes:")
    out.append("")
    out.append(
        "- cores=all: Ray runs the two edges' clusters in separate actor processes (in parallel where their "
        "dependencies allow); the in-process baseline is serial on one thread. So this ratio is Ray's overhead "
        "minus whatever parallel speed-up the host's cores give.")
    out.append(
        "- cores=1: after the cores=all rounds, this process and the whole Ray process tree (GCS, raylet, every "
        "actor, thread by thread) are pinned to one CPU with sched_setaffinity (read back and recorded in the "
        "JSON), so both sides have the same compute and the ratio is Ray's own cost: two actor calls per split "
        "step per device, serialization through the object store, process switches. In-process rounds are slower "
        "in this phase too: the idle Ray processes and any other load on the host share that one CPU.")
    out.append(
        f"- Correctness of the comparison: after all {data['final_version']['ray']} rounds the two global adapters "
        f"are {'bit-identical (torch.equal on all ' + str(k['num_keys']) + ' keys)' if k['equal'] else '**NOT identical** (see knowledge in the JSON)'}; "
        f"per-round train loss and bytes are {'identical' if same else '**NOT identical**'} on both sides.")
    out.append(
        f"- The host may be shared: 1-min load average {data['host']['loadavg_at_start'][0]:.2f} at start (start "
        f"and end in the JSON). Load from other processes slows both sides; rerun on an idle host for clean numbers.")
    out.append("")
    out.append(footer(data))
    return "\n".join(out)


if __name__ == "__main__":
    main()
