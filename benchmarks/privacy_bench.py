"""Privacy trade-off: what a curious edge recovers from each run, next to that run's exact match.

Every RUN_DIR is a finished `gaisnet run` folder (trained under some `privacy.*` setting); the
benchmark runs `gaisnet privacy-audit`'s attacks on it (``privacy.command.audit_run``) and puts the
recovery rates beside the run's final exact match and DP epsilon. ``--noise`` adds, for the FIRST
run, audits as if it had sent its hidden states at those noise ratios (the leak side of the curve
without training a run per point); ``--secagg`` times secure aggregation of adapters of the run's
size.

    python benchmarks/privacy_bench.py RUN_DIR [RUN_DIR ...] [--examples 48] [--noise 1 2 4] [--secagg]
        [--dp-epsilon 1 8] [--reuse] [--no-search] [--name privacy_bench]

Writes benchmarks/results/NAME.{json,md} (default privacy_bench).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import envelope, footer, md_table, quiet, write_results

NAME = "privacy_bench"


def _row(label: str, audit: dict, metrics: list[dict]) -> list:
    inv = audit["inversion"] if isinstance(audit["inversion"], dict) else {}
    em = audit["exact_match"]
    private = [v for d, v in em.items() if d != "capitals"]
    eps = next((m["privacy"].get("dp_epsilon") for m in reversed(metrics) if m.get("privacy", {}).get("dp")), None)
    fmt = lambda r: "-" if r is None else f"{r['tokens']:.2f} / {r['content']:.2f} / {r['answers']:.2f}"  # noqa: E731
    return [label, f"{sum(private) / len(private):.2f}" if private else "-", f"{em['capitals']:.2f}" if "capitals" in em else "-",
            fmt(inv.get("search_exact_weights")), fmt(inv.get("search_public_base")),
            fmt(inv.get("learned_public_base")),
            (f"{g['labels']:.2f} / {g['answers']:.2f}" if isinstance(g := audit.get("labels_from_gradients"), dict)
             else "none sent" if g else "-"),
            f"{audit['membership']['auc']:.2f}",
            "-" if eps is None else f"{eps:.2f}"]


def _label(audit: dict) -> str:
    p = audit["privacy"]
    parts = []
    if audit.get("front_layers", 1) != 1:
        parts.append(f"cut {audit['front_layers']}")
    if p["activation_noise"] or p["activation_clip"]:
        parts.append(f"clip {p['activation_clip']:g}, noise {p['activation_noise']:g}"
                     + (", denoised" if p.get("activation_denoise") else ""))
    if p["nopeek_weight"]:
        parts.append(f"NoPeek {p['nopeek_weight']:g}")
    if p["dp"]:
        parts.append("DP")
    return ", ".join(parts) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--noise", type=float, nargs="*", default=[], help="extra audits of the first run at these ratios")
    ap.add_argument("--clip", type=float, default=120.0, help="privacy.activation_clip of the --noise audits")
    ap.add_argument("--reuse", action="store_true", help="take an audit a run folder already holds (same --examples)")
    ap.add_argument("--no-search", dest="search", action="store_false",
                    help="leave out the search inversions (hours at a deep cut without noise)")
    ap.add_argument("--secagg", action="store_true", help="time secure aggregation at the run's adapter size")
    ap.add_argument("--dp-epsilon", type=float, nargs="*", default=[],
                    help="re-aggregate the FIRST run's round-1 edge updates under DP at these epsilons (over the "
                         "run's rounds) and evaluate the result on the public base")
    ap.add_argument("--name", default=NAME, help="results file stem under benchmarks/results (default: %(default)s)")
    args = ap.parse_args()
    quiet()
    from gaisnet_ray.privacy.command import audit_path, audit_run
    from gaisnet_ray.runfolder import read_metrics

    def get_audit(run: str, overrides: list[str] | None = None) -> dict:
        path = audit_path(run, overrides)
        if args.reuse and path.is_file():  # an earlier audit of the same run, settings and size
            done = json.loads(path.read_text())
            if done.get("examples") == args.examples:
                return done
        return audit_run(run, examples=args.examples, overrides=overrides, search=args.search)

    started = time.perf_counter()
    data = envelope(NAME, vars(args))  # its command line names this script, whatever --name is
    data["runs"], rows = [], []
    for run in args.run_dirs:
        audit = get_audit(run)
        metrics = read_metrics(Path(run))
        data["runs"].append({"run_dir": run, "audit": audit, "metrics_privacy": [m.get("privacy") for m in metrics]})
        rows.append(_row(f"{Path(run).name}: {_label(audit)}", audit, metrics))
    for r in args.noise:
        audit = get_audit(args.run_dirs[0], [f"privacy.activation_clip={args.clip:g}", f"privacy.activation_noise={r:g}"])
        data["runs"].append({"run_dir": args.run_dirs[0], "audit_only": True, "audit": audit})
        rows.append(_row(f"{Path(args.run_dirs[0]).name} audited at clip {args.clip:g}, noise {r:g} (not trained so)",
                         {**audit, "exact_match": {}}, []))
    if args.secagg:
        data["secagg"] = _secagg_timing(Path(args.run_dirs[0]))
    if args.dp_epsilon:
        cached = Path(args.run_dirs[0]) / "privacy_dp_round1.json"
        done = json.loads(cached.read_text()) if args.reuse and cached.is_file() else None
        if done is None or [r["epsilon"] for r in done["dp"]] != args.dp_epsilon:
            done = _dp_round1(Path(args.run_dirs[0]), args.dp_epsilon)
            cached.write_text(json.dumps(done, indent=1) + "\n")
        data["dp_round1"] = done
    headers = ["run: defense", "exact match (private)", "capitals", "search, exact weights",
               "search, public base", "learned, public base", "labels from gradients", "membership AUC",
               "DP epsilon"]
    md = ["# Privacy trade-off", "", "Recovery = tokens / content tokens (past the shared chat template) / "
          "answers fully recovered, on the run's private training examples; labels from gradients = "
          "label tokens / answers fully recovered from the gradients the devices send up"
          + (" (audits reused from the run folders: `--reuse`)." if args.reuse else "."), "", md_table(headers, rows)]
    if args.secagg:
        s = data["secagg"]
        md += ["", f"Secure aggregation of {s['members']} adapters of {s['numel']} values: {s['seconds']:.2f} s, "
                   f"max difference from plain FedAvg {s['max_abs_diff']:.1e}; with one dropout {s['seconds_dropout']:.2f} s."]
    if args.dp_epsilon:
        d = data["dp_round1"]
        dom = list(d["plain"]["exact_match"])
        md += ["", f"Round 1 of {d['run_dir']} re-aggregated at the cloud (clip {d['clip']:.3g} = the median edge "
                   f"update norm, {d['rounds']} rounds accounted): exact match per domain", "",
               md_table(["aggregate", "noise multiplier", "noise std", *dom],
                        [[r["label"], f"{r['z']:.3g}", f"{r['std']:.3g}", *[f"{r['exact_match'][x]:.2f}" for x in dom]]
                         for r in [d["plain"], *d["dp"]]])]
    data["wall_s"] = time.perf_counter() - started
    write_results(args.name, data, "\n".join(md) + "\n\n" + footer(data))


def _secagg_timing(run_dir: Path) -> dict:
    import torch

    from gaisnet_ray.knowledge.store import KnowledgeStore
    from gaisnet_ray.privacy.secagg import secure_fedavg

    store = KnowledgeStore(run_dir / "knowledge")
    state = store.load(store.latest_version() or 0)
    flat = torch.cat([v.flatten().double() for v in state.values()])
    g = torch.Generator().manual_seed(0)
    vecs = [flat + 1e-3 * torch.randn(flat.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    t0 = time.perf_counter()
    out = secure_fedavg(vecs, [1.0, 2.0, 3.0])
    secs = time.perf_counter() - t0
    plain = (vecs[0] + 2 * vecs[1] + 3 * vecs[2]) / 6
    t0 = time.perf_counter()
    secure_fedavg(vecs, [1.0, 2.0, 3.0], drop_after_sharing={2})
    return {"members": 3, "numel": int(flat.numel()), "seconds": secs, "seconds_dropout": time.perf_counter() - t0,
            "max_abs_diff": float((out - plain).abs().max())}


if __name__ == "__main__":
    main()


def _dp_round1(run_dir: Path, epsilons: list[float]) -> dict:
    """Round 1's edge updates (knowledge/edges), aggregated plainly and under DP at each epsilon,
    each applied to the round's base (bases/b0000) and evaluated as the cloud evaluates."""
    import statistics

    import torch

    from gaisnet_ray.config import load_config
    from gaisnet_ray.data import eval_examples
    from gaisnet_ray.hfsl.evaluate import evaluate_domains
    from gaisnet_ray.knowledge.aggregate import fedavg
    from gaisnet_ray.knowledge.store import KnowledgeStore
    from gaisnet_ray.models.adapters import attach_lora, load_adapter_state
    from gaisnet_ray.models.build import family_of, load_foundation
    from gaisnet_ray.privacy.dp import dp_fedavg, noise_multiplier_for

    cfg = load_config(run_dir / "config.yaml")
    lineage = json.loads((run_dir / "knowledge" / "v0001" / "lineage.json").read_text())
    edges = lineage["edges"]
    edge_store = lambda e: KnowledgeStore(run_dir / "knowledge" / "edges" / e)  # noqa: E731
    updates = [edge_store(e).load(1) for e in edges]
    weights = [float(edges[e]["num_samples"]) for e in edges]
    reference = KnowledgeStore(run_dir / "knowledge").load(0)
    norms = [sum(float((u[k].double() - reference[k].double()).pow(2).sum()) for k in u) ** 0.5 for u in updates]
    clip = statistics.median(norms)
    model, tok = load_foundation(run_dir / "knowledge" / "bases" / "b0000", cfg.model.attn_implementation)
    peft = attach_lora(model, cfg.peft, family_of(model))
    sets = eval_examples(cfg.data)

    def score(state):
        load_adapter_state(peft, state, strict=True)
        return evaluate_domains(peft, tok, sets, cfg.model.max_seq_len, cfg.data.system_prompt)

    def em(ev):
        return {d: v["exact_match"] for d, v in ev.items()}

    plain = {"label": "FedAvg (no DP)", "z": 0.0, "std": 0.0, "exact_match": em(score(fedavg(updates, weights)))}
    out = []
    gen = torch.Generator().manual_seed(0)
    for eps in epsilons:
        z = noise_multiplier_for(eps, cfg.privacy.dp_delta, cfg.training.rounds)
        state, info = dp_fedavg(updates, weights, reference, clip, z, gen)
        out.append({"label": f"DP, epsilon {eps:g}", "epsilon": eps, "z": z, "std": info["noise_std"],
                    "exact_match": em(score(state))})
    return {"run_dir": str(run_dir), "rounds": cfg.training.rounds, "update_norms": norms, "clip": clip,
            "plain": plain, "dp": out}
