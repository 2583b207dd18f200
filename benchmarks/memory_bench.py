"""Memory: peak RSS of every tier actor of a real-model run, beside the up-front estimate.

The default job (`gaisnet_ray/default.yaml`: SmolLM2-135M-Instruct, 1 cloud, 2 edges, 6 end
devices, cut 1+1) runs one round (with the relay and its relay down), on a private local Ray, through `GaisNetDriver` exactly as
`gaisnet run` does. It records

- each actor kind's peak RSS (`ru_maxrss`, what the round metrics' `peak_rss_mb` reports): the
  largest actor, the sum over the kind, and all actors together; and, per actor, its resident
  memory by kind at the end (anonymous, file-backed, shared: object-store pages count as shared);
- the machine's memory in use (MemTotal - MemAvailable, sampled every 0.2 s) above what it was
  before Ray started: what the run really took, shared pages counted once;
- an idle actor's RSS (Python, torch, transformers, peft imported): the runtime baseline;
- the estimate (`gaisnet_ray.hfsl.memory.estimate_job`) per actor kind, beside each measurement,
  and the targets of issue 9 (all actors <= 8 GB, an EndNode <= 0.8 GB).

    python benchmarks/memory_bench.py                          # the default job's model and topology, ~4 min
    python benchmarks/memory_bench.py --model /models/my-llama  # another model (folder, .gguf or Hub id)
    python benchmarks/memory_bench.py --set topology.end_workers=2 --tag pool

Writes benchmarks/results/memory_bench.{json,md} (or memory_bench-TAG.*).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from _common import envelope, footer, make_config, md_table, quiet, write_results

# Measured before issue 9's part-wise packages (the lead's run of `gaisnet run` with model.path at
# the SmolLM2 folder, default topology, round 1; the run died at round 1's relay down).
BEFORE_MB = {"cloud": 2600, "edge": 3800, "end": 1800}
TARGETS = {"all_actors_mb": 8000, "end_mb": 800}


class MachineMemory:
    """Samples MemTotal - MemAvailable in a thread; ``peak`` is the largest value seen."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MachineMemory":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def _status(self) -> dict:
    """Run inside an actor (``__ray_call__``): its peak and current resident memory, by kind (MB)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) / 1000  # kB -> MB
    return out


def runtime_baseline_mb(cfg) -> float:
    """Peak RSS of an idle actor placed like an EndNode, with the tier code imported."""
    import ray

    from gaisnet_ray.actors import tier_options

    @ray.remote
    class Idle:
        def __init__(self):
            import gaisnet_ray.actors  # noqa: F401  what every tier actor imports
            import gaisnet_ray.hfsl.device  # noqa: F401
            from gaisnet_ray.worker_setup import setup_worker

            setup_worker(1, 0)

        def peak(self) -> float:
            from gaisnet_ray.worker_setup import peak_rss_mb

            return peak_rss_mb()

    a = Idle.options(**tier_options("end", cfg.topology.end)).remote()
    try:
        return ray.get(a.peak.remote(), timeout=300)
    finally:
        ray.kill(a)


def measure(cfg) -> dict:
    import ray

    from gaisnet_ray.cluster import connect
    from gaisnet_ray.driver import GaisNetDriver

    out: dict = {}
    before = MachineMemory.used()
    with tempfile.TemporaryDirectory(prefix="gaisnet-mem-") as tmp, MachineMemory() as machine, \
            connect(cfg) as _:
        out["runtime_baseline_mb"] = runtime_baseline_mb(cfg)
        driver = GaisNetDriver(cfg, Path(tmp) / "run")
        t0 = time.perf_counter()
        try:
            driver.start()
            out["start_s"] = time.perf_counter() - t0
            rounds = []
            for r in range(1, cfg.training.rounds + 1):
                m = driver.run_round(r)
                rounds.append({"round": r, "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"],
                               "relay": "relay" in m, "dropped": m["faults"]["dropped"]})
                print(f"round {r}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']}", flush=True)
            out["rounds"] = rounds
            kinds = {"cloud": [driver.cloud], "edge": list(driver.edges.values()),
                     "end": list(driver.end_actors.values())}
            out["actors"] = {k: [ray.get(a.__ray_call__.remote(_status), timeout=120) for a in actors]
                             for k, actors in kinds.items()}
        finally:
            driver.close()
        ray.shutdown()
    out["machine_used_before_mb"] = before / 1e6
    out["machine_used_peak_mb"] = machine.peak / 1e6
    out["machine_used_by_run_mb"] = (machine.peak - before) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model.path: a Hugging Face folder, .gguf file or Hub id "
                                                   "(default: the default job's model)")
    src.add_argument("--preset", default=None, help="model.preset instead of a path, e.g. smollm2-135m")
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--pretrain-steps", type=int, default=0, help="cloud pre-training steps (0: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config override (repeatable)")
    p.add_argument("--tag", help="write results/memory_bench-TAG.* instead")
    args = p.parse_args()
    quiet()
    model = ([f"model.preset={args.preset}"] if args.preset else [f"model.path={args.model}"] if args.model else [])
    overrides = [*model, f"training.rounds={args.rounds}", f"training.local_steps={args.local_steps}",
                 f"training.pretrain_steps={args.pretrain_steps}", "run.progress=false", *args.overrides]
    cfg = make_config(overrides, config=None)  # the embedded default job, not the tiny one

    from gaisnet_ray.hfsl.memory import estimate_job, local_capacity, model_config_of

    estimate = estimate_job(cfg, model_config_of(cfg), local=True)
    name = "memory_bench" + (f"-{args.tag}" if args.tag else "")
    data = envelope("memory_bench", vars(args))
    data["overrides"] = overrides
    data["estimate"] = estimate.to_dict()
    data["capacity"] = vars(local_capacity())
    print(f"estimate for {estimate.model}:\n{estimate.table()}", flush=True)
    started = time.perf_counter()
    data["measured"] = measured = measure(cfg)
    data["wall_s"] = time.perf_counter() - started

    peaks = measured["rounds"][-1]["peak_rss_mb"]
    est = estimate.by_kind()
    rows = []
    for kind in ("cloud", "edge", "end"):
        e, m = est[kind], peaks[kind]
        rows.append([kind, m["actors"], f"{BEFORE_MB[kind]:,}", f"{m['max']:,.0f}", f"{e.peak_bytes / 1e6:,.0f}",
                     f"{m['sum']:,.0f}", f"{e.total_bytes / 1e6:,.0f}"])
    rows.append(["all actors", sum(peaks[k]["actors"] for k in ("cloud", "edge", "end")), "21,000",
                 "", "", f"{peaks['all_actors']:,.0f}", f"{estimate.actors_bytes / 1e6:,.0f}"])
    table = md_table(["actor kind", "actors", "before: peak RSS per actor (MB)", "peak RSS per actor (MB, max)",
                      "estimate per actor (MB)", "peak RSS, all of the kind (MB)", "estimate, all (MB)"], rows)
    checks = {"all actors <= 8 GB": peaks["all_actors"] <= TARGETS["all_actors_mb"],
              "each EndNode <= 0.8 GB": peaks["end"]["max"] <= TARGETS["end_mb"]}
    data["targets"] = checks
    status = md_table(["actor kind", "resident now: anonymous / file / shared (MB, largest actor)"],
                      [[k, " / ".join(f"{max(a[f] for a in v):,.0f}" for f in ("RssAnon", "RssFile", "RssShmem"))]
                       for k, v in measured["actors"].items()], align="ll")
    md = "\n\n".join([
        f"# Memory: peak RSS per actor, {estimate.model}",
        f"Default topology (1 cloud, 2 edges, {cfg.topology.num_devices} end devices, cut "
        f"{cfg.topology.cut.front_layers}+{cfg.topology.cut.back_layers}), {args.rounds} round(s) with relay "
        f"`{cfg.relay.policy}`, {cfg.training.local_steps} local steps, batch {cfg.training.batch_size} x "
        f"{cfg.model.max_seq_len} tokens, pre-training steps {cfg.training.pretrain_steps}. Before: the lead's "
        "measurement with whole-model packages (that run was killed at round 1's relay down).",
        table,
        "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()) + ".",
        f"Machine memory taken by the run (MemTotal - MemAvailable, peak minus before; shared pages once): "
        f"{measured['machine_used_by_run_mb']:,.0f} MB; estimate incl. Ray and the driver "
        f"{estimate.total_bytes / 1e6:,.0f} MB. Idle actor (runtime baseline): "
        f"{measured['runtime_baseline_mb']:,.0f} MB. Start {measured['start_s']:.0f} s, round "
        f"{measured['rounds'][-1]['wall_s']:.0f} s.",
        status,
        footer(data),
    ])
    write_results(name, data, md)


if __name__ == "__main__":
    main()
