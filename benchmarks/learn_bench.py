"""Does inference feed fine-tuning? (issue 13 item 4, ``serve.learn_from_escalations``)

A repeating workload is served round after round; each request is routed as the Serve router
routes it (the edge adapter that knows the domain answers first; the routing policy decides on
its confidence; an escalated request gets the cloud's answer). With learning on, each edge keeps
what it escalated with the cloud's answers (``serve.escalations.EscalationStore``, the edge's
private area of the run folder) and, between rounds, ``EscalationLearner.learn_into`` distils
them into the edge adapter it serves, the very call the edge replica makes on its poll tick.

Two modes:

``--mode train`` (served while training, the tiny preset): ``InProcessGaisNet`` runs the rounds
(the same core as ``gaisnet run``, edges folding the learned delta into their aggregation, as
under ``gaisnet run --serve``); after each round the workload is served on the new versions
(hot swap), the learner first distilling the escalations kept so far into the new edge adapter.
Run twice, learning on and off, same seed.

``--mode serve RUN_DIR`` (a finished run, e.g. the SmolLM2 default job): the knowledge is fixed
(what ``gaisnet run --serve`` keeps serving after its last round, or ``gaisnet serve``); a
"round" is one pass of the workload, after which the learner distils (as with
``serve.learn.every_records``).

Per round: escalation share, edge exact match (the edge's own answer vs the truth), routed exact
match (what the client gets), and agreement of the edge's answer with the cloud's. The Ray
transport (router -> edge replica, the replica's background thread) is tested in
tests/test_learn_escalations.py; this measures the learning itself, in one process, no Ray.

    python benchmarks/learn_bench.py --mode train --rounds 4 --out /tmp/learn
    python benchmarks/learn_bench.py --mode serve --run /work/runs/s5default --rounds 3 --out /tmp/learn-real
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@dataclass
class Served:
    """What the in-process 'replicas' hold: the edge adapters' slots and the cloud's model."""

    edges: dict  # adapter -> slot (SimpleNamespace(current=ServedModel))
    cloud: object  # ServedModel of global


def load_models(run, adapters: list[str]) -> Served:
    from gaisnet_ray.inference.served import GLOBAL
    from gaisnet_ray.serve.slots import load_served

    edges = {a: SimpleNamespace(adapter=a, current=load_served(run, a, None, max_prompt_tokens=None))
             for a in adapters}
    return Served(edges, load_served(run, GLOBAL, None, max_prompt_tokens=None))


def serve_round(run, served: Served, workload, policy, new_tokens: int, learner, cloud_cache: dict | None = None) -> dict:
    """Route every request of the workload once; keep escalations when ``learner`` is given.
    ``cloud_cache``: the cloud's answers by prompt, when its knowledge is fixed (serve mode)."""
    from gaisnet_ray.inference.routing import route_after_edge
    from gaisnet_ray.serve.escalations import escalation_record, kept_record
    from gaisnet_ray.serve.slots import GenerationRequest

    try:  # the calibrated per-version rule, where the version has one (as the router reads it)
        from gaisnet_ray.inference.routing import policy_for
    except ImportError:
        policy_for = None
    domain_adapters = run.domain_adapters()
    rows = []
    for ex in workload:
        adapter = domain_adapters.get(ex.domain)
        slot = served.edges.get(adapter)
        if slot is None:
            continue
        req = GenerationRequest(ex.prompt, new_tokens)
        first = slot.current.generate("edge", req)
        rule = policy
        if policy_for is not None and getattr(run, "routing_table", None) is not None:
            rule = policy_for(run.routing_table(adapter, first.version), ex.domain, policy)
        verdict = route_after_edge(first.generation, rule)
        cloud = cloud_cache.get(ex.prompt) if cloud_cache is not None else None
        if cloud is None:
            cloud = served.cloud.generate("cloud", req)
            if cloud_cache is not None:
                cloud_cache[ex.prompt] = cloud
        final = cloud if verdict.escalated else first
        if not verdict.escalated and learner is not None and learner.learn.anchors:
            record = kept_record(req, ex.domain, first)
            if record is not None:
                learner.record(record)
        if verdict.escalated and learner is not None:
            record = escalation_record(req, ex.domain, first, cloud)
            if record is not None:
                learner.record(record)
        rows.append({"prompt": ex.prompt, "domain": ex.domain, "escalated": verdict.escalated,
                     "edge_em": first.generation.text.strip() == ex.answer,
                     "cloud_em": cloud.generation.text.strip() == ex.answer,
                     "routed_em": final.generation.text.strip() == ex.answer,
                     "agree": first.generation.text.strip() == cloud.generation.text.strip()})
    n = len(rows)
    out = {"requests": n}
    for key in ("escalated", "edge_em", "cloud_em", "routed_em", "agree"):
        out[key] = round(sum(r[key] for r in rows) / n, 3)
    out["per_domain"] = {d: {k: round(sum(r[k] for r in rows if r["domain"] == d) /
                                      sum(1 for r in rows if r["domain"] == d), 3)
                             for k in ("escalated", "edge_em", "cloud_em")}
                         for d in sorted({r["domain"] for r in rows})}
    out["rows"] = rows
    return out


def escalated_set(rounds: list[dict]) -> None:
    """Add, per round, edge EM / cloud EM / agreement on the prompts the edge escalated in round 1
    (what the learning is about), and drop the per-prompt rows from the printed summary."""
    first = {r["prompt"] for r in rounds[0]["rows"] if r["escalated"]}
    for row in rounds:
        sub = [r for r in row["rows"] if r["prompt"] in first]
        if sub:
            row["round1_escalated"] = {"n": len(sub), **{k: round(sum(r[k] for r in sub) / len(sub), 3)
                                                        for k in ("escalated", "edge_em", "cloud_em", "agree")}}


def distil_all(learner, served: Served) -> dict:
    """What the edge replica's poll tick does: every due edge slot gets the escalations distilled in."""
    out = {}
    for adapter, slot in served.edges.items():
        if learner.due(adapter, slot.current):
            state = learner.learn_into(adapter, slot)
            out[adapter] = {k: state[k] for k in ("records", "loss_before", "loss_after", "wall_s")}
    return out


def workload_of(cfg, per_domain: int, seed: int):
    from gaisnet_ray.data import sample_examples

    return [ex for d in cfg.data.domains for ex in sample_examples(d, "eval", per_domain, seed)]


def settings_of(cfg, args):
    from gaisnet_ray.config import ServeSettings

    return ServeSettings.model_validate({
        **cfg.serve.model_dump(), "learn_from_escalations": True,
        "learn": {**cfg.serve.learn.model_dump(), "steps": args.steps, "lr": args.lr, "min_records": 1,
                  "max_share": args.max_share, "every_records": args.every_records, "anchors": args.anchors}})


def run_train(args) -> dict:
    """Served while training (tiny preset), learning on and off."""
    from gaisnet_ray.config import load_config
    from gaisnet_ray.inference.routing import RoutingPolicy
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.serve.escalations import EscalationLearner
    from tinycfg import TINY_YAML

    results = {}
    for learn in (True, False):
        out = Path(args.out) / ("learn" if learn else "off")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cfg = load_config(TINY_YAML, [f"training.rounds={args.rounds}", "run.progress=false",
                                      "serve.routing.calibrate=false",  # the two fixed limits decide
                                      f"serve.routing.min_token_prob={args.min_token_prob}",
                                      f"serve.routing.max_mean_entropy={args.max_mean_entropy}",
                                      f"serve.learn_from_escalations={'true' if learn else 'false'}",
                                      f"serve.learn.max_share={args.max_share}", *args.set])
        from gaisnet_ray.config import config_to_yaml

        (out / "config.yaml").write_text(config_to_yaml(cfg))
        policy = RoutingPolicy(cfg.serve.routing.max_mean_entropy, cfg.serve.routing.min_token_prob)
        workload = workload_of(cfg, args.per_domain, args.seed)
        gais = InProcessGaisNet(cfg, out)
        learner, rounds = None, []
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            metrics = gais.run_round(r)
            run = ServedRun(out)
            served = load_models(run, run.edge_ids())  # the hot swap to version r
            if learn:
                learner = learner or EscalationLearner(out, settings_of(cfg, args), run.tokenizer, run.system_prompt)
                learned = distil_all(learner, served)
            row = {"round": r, "version": metrics["version"], **serve_round(run, served, workload, policy,
                                                                           args.new_tokens, learner)}
            if learn:
                row["distilled"] = learned
                row["folded"] = metrics.get("escalations_learned", {})
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print(("learn" if learn else "off  "), json.dumps({k: v for k, v in row.items() if k != "rows"}), flush=True)
            rounds.append(row)
        escalated_set(rounds)
        results["learn" if learn else "off"] = rounds
    return results


def run_serve(args) -> dict:
    """A finished run's fixed knowledge; each round = one pass of the workload, then a distillation."""
    from gaisnet_ray.config import load_config
    from gaisnet_ray.inference.routing import RoutingPolicy
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.escalations import EscalationLearner

    args.every_records = args.every_records or 1  # the knowledge is fixed: new escalations make it due
    src = Path(args.run)
    out = Path(args.out) / "run"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out, copy_function=lambda s, d: Path(d).hardlink_to(s), dirs_exist_ok=False,
                    ignore=shutil.ignore_patterns("logs", "cloud", "edges_private"))
    cfg = load_config(out / "config.yaml", list(args.set))
    policy = RoutingPolicy(args.max_mean_entropy, args.min_token_prob)
    run = ServedRun(out)
    workload = workload_of(cfg, args.per_domain, args.seed)
    served = load_models(run, run.edge_ids())
    learner = EscalationLearner(out, settings_of(cfg, args), run.tokenizer, run.system_prompt)
    rounds, cache = [], {}
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        row = {"round": r, **serve_round(run, served, workload, policy, args.new_tokens, learner, cache)}
        row["distilled_after"] = distil_all(learner, served) if r < args.rounds else {}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "rows"}), flush=True)
        rounds.append(row)
    escalated_set(rounds)
    for row in rounds:
        print(row["round"], "round-1 escalated prompts:", row.get("round1_escalated"))
    return {"learn": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["train", "serve"], default="train")
    p.add_argument("--run", help="--mode serve: the finished run folder (read only; hard-linked copy)")
    p.add_argument("--out", default="/tmp/learn_bench")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-domain", type=int, default=6, help="workload prompts per domain (repeated every round)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="serve.learn.steps")
    p.add_argument("--lr", type=float, default=0.0005, help="serve.learn.lr")
    p.add_argument("--max-share", type=float, default=0.25, help="serve.learn.max_share")
    p.add_argument("--every-records", type=int, default=0,
                   help="serve.learn.every_records (--mode serve: 1, distil again after new escalations)")
    p.add_argument("--min-token-prob", type=float, default=0.05, help="serve.routing.min_token_prob")
    p.add_argument("--max-mean-entropy", type=float, default=2.5, help="serve.routing.max_mean_entropy")
    p.add_argument("--anchors", action="store_true", help="serve.learn.anchors: distil the kept answers too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = run_train(args) if args.mode == "train" else run_serve(args)
    path = Path(args.out) / "learn_bench.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
