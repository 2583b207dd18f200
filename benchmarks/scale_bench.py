"""Scale: peak memory and round time against the number of logical end devices.

N logical devices (N = 10, 100, 1000 by default) run on a fixed pool of EndWorker actors
(`topology.end_workers`) with a fixed number of participants per edge and round
(`training.participants_per_edge`), on a private local Ray, through `GaisNetDriver` exactly as
`gaisnet run` does. For each N it reports

- the wall time of a round (mean over the rounds after the first) and of the start (placing the
  actors, every worker deriving its devices' data);
- peak memory: the high-water RSS (`ru_maxrss`) of every actor process (cloud, edges, end
  workers), summed, and of the end workers alone; plus the bytes of private data the workers hold.

With one actor per device instead (the default), memory grows with N (a model copy per device);
one such row at the smallest N is included for reference.

    python benchmarks/scale_bench.py                     # N = 10, 100, 1000; ~6 min on 2 cores
    python benchmarks/scale_bench.py --sizes 10 100 --rounds 3

Writes benchmarks/results/scale_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import envelope, fmt_bytes, footer, make_config, md_table, quiet, write_results

EDGES = 2


def overrides(n: int, args, pool: bool) -> list[str]:
    return [
        f"topology.edges={EDGES}", f"topology.devices_per_edge={n // EDGES}", "topology.cluster_size=2",
        *([f"topology.end_workers={args.workers}"] if pool else []),
        f"training.participants_per_edge={args.participants}", "data.partition=iid",
        f"data.samples_per_device={args.samples}", "data.eval_samples_per_domain=4", "data.public_samples=64",
        "training.pretrain_steps=0", f"training.local_steps={args.local_steps}", "training.batch_size=8",
        f"training.rounds={args.rounds}", "training.eval_every=1000", "relay.policy=none", "run.progress=false",
        "run.actor_timeout_s=1200",
    ]


def peak_rss_bytes(actor) -> int:
    import ray

    def maxrss(self) -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    return ray.get(actor.__ray_call__.remote(maxrss), timeout=120)


def measure(n: int, args, pool: bool) -> dict:
    import ray

    from gaisnet_ray.cluster import connect
    from gaisnet_ray.driver import GaisNetDriver

    cfg = make_config(overrides(n, args, pool))
    out: dict = {"devices": n, "mode": "pool" if pool else "actor per device",
                 "end_actors": args.workers if pool else n, "participants_per_round": EDGES * args.participants}
    with tempfile.TemporaryDirectory(prefix="gaisnet-scale-") as tmp, connect(cfg) as _:
        driver = GaisNetDriver(cfg, Path(tmp) / "run")
        t0 = time.perf_counter()
        driver.start()
        out["start_s"] = time.perf_counter() - t0
        try:
            walls = []
            for r in range(1, cfg.training.rounds + 1):
                m = driver.run_round(r)
                walls.append(m["wall_s"])
                assert not m["faults"]["dropped"], m["faults"]
            out["round_s"] = statistics.mean(walls[1:] or walls)
            out["round_s_all"] = walls
            ends = {id(a): a for a in driver.end_actors.values()}.values()
            end_rss = [peak_rss_bytes(a) for a in ends]
            other_rss = [peak_rss_bytes(a) for a in [driver.cloud, *driver.edges.values()]]
            out["peak_rss_end_workers"] = sum(end_rss)
            out["peak_rss_total"] = sum(end_rss) + sum(other_rss)
            out["private_data_bytes"] = n * args.samples * cfg.model.max_seq_len * 8 * 2  # input ids + labels, int64
        finally:
            driver.close()
        ray.shutdown()
    print(f"N={n} ({out['mode']}): start {out['start_s']:.1f} s, round {out['round_s']:.2f} s, "
          f"peak RSS {fmt_bytes(out['peak_rss_total'])} (end workers {fmt_bytes(out['peak_rss_end_workers'])})",
          flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--workers", type=int, default=2, help="EndWorker actors in the pool")
    p.add_argument("--participants", type=int, default=4, help="devices per edge and round")
    p.add_argument("--samples", type=int, default=32, help="private examples per device")
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the actor-per-device row")
    args = p.parse_args()
    quiet()
    data = envelope("scale_bench", vars(args))
    started = time.perf_counter()
    rows = []
    if not args.no_reference:
        rows.append(measure(min(args.sizes), args, pool=False))
    rows += [measure(n, args, pool=True) for n in args.sizes]
    data["rows"] = rows
    data["wall_s"] = time.perf_counter() - started
    table = md_table(
        ["logical devices", "mode", "end actors", "participants / round", "start (s)", "round (s)",
         "peak RSS, all actors", "peak RSS, end actors", "private data held"],
        [[r["devices"], r["mode"], r["end_actors"], r["participants_per_round"], f"{r['start_s']:.1f}",
          f"{r['round_s']:.2f}", fmt_bytes(r["peak_rss_total"]), fmt_bytes(r["peak_rss_end_workers"]),
          fmt_bytes(r["private_data_bytes"])] for r in rows], align="rlrrrrrrr")
    write_results("scale_bench", data, "# Scale: logical devices on a bounded worker pool\n\n" + table + "\n\n"
                  + footer(data))


if __name__ == "__main__":
    main()
