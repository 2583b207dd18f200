"""The cloud alone on the device domains after a short run, per relay variant (issue 10, item 3).

Runs the embedded default job (SmolLM2-135M-Instruct) in one process (``InProcessGaisNet``) for a
few rounds per variant and reads, from the last round's relay metrics, the foundation model alone
(no adapter) on every domain's held-out set (``cloud_after``), next to the base before round 1
(the first round's ``cloud_before``). One JSON line per variant into ``--out``.

    flock /tmp/gaisnet-ray.lock nice -n 5 python benchmarks/relay_bench.py --variants merge \
        --rounds 2 --out /tmp/relay_bench.jsonl

Variants: ``merge``; ``distill-bos-token`` (the inputs and targets before issue 10);
``distill-chat-token``; ``distill-chat-sequence`` (the defaults). Extra ``--set key=value``
overrides apply to every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "merge": ["relay.policy=merge"],
    "distill-bos-token": ["relay.policy=distill", "relay.distill_inputs=bos", "relay.distill_targets=token"],
    "distill-chat-token": ["relay.policy=distill", "relay.distill_inputs=chat", "relay.distill_targets=token"],
    "distill-chat-sequence": ["relay.policy=distill", "relay.distill_inputs=chat", "relay.distill_targets=sequence"],
}


def cloud_alone(metrics: list[dict]) -> dict:
    """From a run's round metrics: the base alone before round 1 and after the last relay, per
    domain ({"em", "loss", ...} as the cloud evaluates them)."""
    relays = [m["relay"] for m in metrics if "relay" in m]
    if not relays:
        raise ValueError("no relay in these rounds (relay.policy none?)")
    return {"before": relays[0]["cloud_before"], "after": relays[-1]["cloud_after"],
            "distill": [r.get("distill") for r in relays]}


def run_variant(name: str, rounds: int, extra: list[str], out: Path | None = None, threads: int = 1) -> dict:
    """One variant; with ``out``, one JSON line after every round (a run cut short keeps its rounds)."""
    import torch

    from gaisnet_ray.config import load_config
    from gaisnet_ray.inprocess import InProcessGaisNet

    torch.set_num_threads(threads)  # a loaded 2-core machine: more threads than cores left oversubscribe it
    cfg = load_config(None, [*VARIANTS[name], f"training.rounds={rounds}", *extra])
    started = time.perf_counter()
    metrics: list[dict] = []
    row: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        g = InProcessGaisNet(cfg, Path(tmp))
        for r in range(1, rounds + 1):
            metrics.append(g.run_round(r))
            row = {"variant": name, "rounds": r, "of_rounds": rounds, "overrides": [*VARIANTS[name], *extra],
                   "wall_s": round(time.perf_counter() - started, 1), **cloud_alone(metrics),
                   "relay_wall_s": [m["relay"].get("wall_s") for m in metrics],
                   "device_domains": list(cfg.data.domains), "public_domains": list(cfg.data.public_domains)}
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            _print(row)
    return row


def _print(row: dict) -> None:
    doms = row["device_domains"] + row["public_domains"]
    print(row["variant"], f"round {row['rounds']}/{row['of_rounds']}", f"{row['wall_s']}s",
          {d: {"loss": [round(row["before"][d]["loss"], 3), round(row["after"][d]["loss"], 3)],
               "em": [round(row["before"][d]["exact_match"], 3), round(row["after"][d]["exact_match"], 3)]}
           for d in doms}, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="key=value for every variant")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    args = ap.parse_args(argv)
    for name in args.variants:
        run_variant(name, args.rounds, args.extra, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
