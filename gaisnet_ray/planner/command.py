"""``gaisnet plan [CONFIG] [--set ...] [--out FILE]``: the chosen plan with its modeled delay, energy
and device memory next to the alternatives (fixed cut, sequential, balanced, each cluster size),
written as JSON. Bad input exits 2 with one line, like the other commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import Config, ConfigError
from ..schemes import scheme_of
from .cost import RoundShape
from .planning import PlanError, RoundPlan, alternatives, plan_round
from .profiles import Fleet, build_fleet


def host_gflops(cfg: Config, model_config: dict) -> tuple[float, str]:
    """``planner.host_gflops``, or calibrated now from a measured step: (GFLOP/s, how)."""
    if cfg.planner.host_gflops:
        return cfg.planner.host_gflops, "planner.host_gflops"
    from .calibrate import measure_apart

    return measure_apart(cfg, model_config), "calibrated from a measured training step on this host"


def sample_counts(cfg: Config) -> dict[str, int] | None:
    """Each device's data size (what today's clustering balances), derived as devices derive it."""
    from ..data import DatasetError, device_examples
    from ..schemes.topology import devices_by_edge

    ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    try:
        return {d: len(ex) for d, ex in device_examples(cfg.data, ids).items()}
    except (DatasetError, ValueError):
        return None  # counted as data.samples_per_device each


def plan_for(cfg: Config, model_config: dict) -> tuple[RoundShape, Fleet, float, str]:
    gflops, how = host_gflops(cfg, model_config)
    return RoundShape.from_config(cfg, model_config), build_fleet(cfg, gflops), gflops, how


def _table(plans: list[RoundPlan], chosen: str) -> str:
    head = f"{'plan':16s} {'delay s':>10s} {'energy J':>10s} {'max J/dev':>10s} {'max mem GB':>10s} " \
           f"{'clusters':>8s} {'sizes':>10s} {'excluded':>8s} {'plan s':>7s}"
    lines = [head]
    for p in plans:
        s = p.summary()
        mark = " <- chosen" if p.name == chosen else ""
        sizes = ",".join(map(str, s["cluster_sizes"]))
        lines.append(f"{p.name:16s} {s['delay_s']:10.2f} {s['energy_j']:10.1f} {s['max_device_energy_j']:10.2f} "
                     f"{s['max_device_memory_gb']:10.3f} {s['clusters']:8d} {sizes[:10]:>10s} {s['excluded']:8d} "
                     f"{s['planning_s']:7.3f}{mark}")
    return "\n".join(lines)


def _devices(plan: RoundPlan, fleet: Fleet, limit: int = 24) -> str:
    where = {d: (e, i, plan.shares[e][i]) for e, cs in plan.clusters.items() for i, c in enumerate(cs) for d in c}
    lines = [f"{'device':12s} {'kind':9s} {'GFLOP/s':>8s} {'mem GB':>7s} {'up Mb/s':>8s} {'cut':>6s} "
             f"{'cluster':>10s} {'share':>6s} {'turn s':>8s} {'energy J':>9s} {'peak GB':>8s}"]
    for d in fleet.devices[:limit]:
        i = d.device_id
        mem = "-" if d.memory_bytes is None else f"{d.memory_bytes / 1e9:.2f}"
        if i in plan.excluded:
            lines.append(f"{i:12s} {d.kind:9s} {d.flops / 1e9:8.1f} {mem:>7s} {d.up_bps / 1e6:8.1f}  excluded: "
                         f"{plan.excluded[i]}")
            continue
        e, c, share = where[i]
        f, b = plan.cuts[i]
        lines.append(f"{i:12s} {d.kind:9s} {d.flops / 1e9:8.1f} {mem:>7s} {d.up_bps / 1e6:8.1f} {f'{f}+{b}':>6s} "
                     f"{f'{e}/c{c}':>10s} {share:6.2f} {plan.turn_s[i]:8.2f} {plan.energy_j[i]:9.2f} "
                     f"{plan.memory_bytes[i] / 1e9:8.3f}")
    if len(fleet.devices) > limit:
        lines.append(f"... {len(fleet.devices) - limit} more devices in the JSON")
    return "\n".join(lines)


def plan_command(cfg: Config, out: str | None) -> int:
    from ..hfsl.memory import model_config_of
    from ..models.cuts import UnknownModelFamilyError
    from ..models.sources import ModelSourceError

    if not scheme_of(cfg).splits:  # before anything loads
        print(f"config error: {PlanError.no_cut(cfg.training.scheme)}", file=sys.stderr)
        return 2
    try:
        model_config = model_config_of(cfg)
        shape, fleet, gflops, how = plan_for(cfg, model_config)
        counts = sample_counts(cfg)
        chosen = plan_round(cfg, shape, fleet, counts)
        plans = alternatives(cfg, shape, fleet, counts)
    except (ConfigError, PlanError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ModelSourceError, UnknownModelFamilyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {cfg.model.path or cfg.model.preset} ({shape.num_layers} blocks), batch {shape.batch} x "
          f"{shape.seq} tokens, {shape.steps} steps per turn; host {gflops:.1f} GFLOP/s ({how}); "
          f"fleet: {cfg.planner.fleet}, {len(fleet.devices)} devices on {len(fleet.edges)} edges")
    print(f"topology.planner: {cfg.topology.planner}  (planner.energy_weight {cfg.planner.energy_weight:g} s/J)")
    print(_table(plans, chosen.name))
    print()
    print(f"chosen plan ({chosen.name}): modeled round {chosen.delay_s:.2f} s, device energy "
          f"{chosen.total_energy_j:.1f} J, search {', '.join(sorted(set(chosen.methods.values())))}")
    print(_devices(chosen, fleet))
    for d, why in list(chosen.excluded.items())[:8]:
        print(f"excluded from training: {d}: {why}")
    if out:
        doc = {"host_gflops": gflops, "host_gflops_source": how, "chosen": chosen.to_dict(),
               "alternatives": [p.to_dict() for p in plans],
               "fleet": [d.to_dict() for d in fleet.devices]}
        try:
            Path(out).write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            print(f"error: cannot write '{out}': {e}", file=sys.stderr)
            return 2
        print(f"plan written to {out}")
    return 0
