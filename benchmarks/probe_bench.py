"""Does the router's edge probe (the first k tokens) stand in for the edge's whole answer?

The tier router decides kept/escalated on the confidence of the edge's first
``serve.routing.probe_tokens`` tokens, so a stream can name its tier in its first chunk
(``gaisnet_ray/serve/router.py``). For held-out prompts of a run's domains, with the adapter the
router picks, this measures: answer lengths; for k = 2, 4, 8 whether the probe's decision equals the
whole answer's, at the fixed ``serve.routing.*`` thresholds and at a ``min_token_prob`` threshold
that escalates ``--escalate`` of the whole answers; and the time of the first k tokens against the
whole answer (a kept edge answer's time to first chunk, now vs judging the whole answer). One
process, real model, 1 torch thread, no Ray.

    python benchmarks/probe_bench.py --run-dir runs/X            # ~3 min on 2 cores (SmolLM2, 30 prompts)

Writes benchmarks/results/probe_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import envelope, md_table, quiet, write_results  # noqa: E402

KS = (2, 4, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a finished run folder (read only)")
    p.add_argument("--per-domain", type=int, default=10, help="held-out prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--escalate", type=float, default=0.4, help="share of whole answers the second threshold escalates")
    args = p.parse_args()
    quiet()
    import torch

    from gaisnet_ray.config import ServeSettings, load_config
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.inference import CausalGenerator, infer_domain
    from gaisnet_ray.inference.routing import RoutingPolicy, route_after_edge
    from gaisnet_ray.inference.served import ServedRun

    torch.set_num_threads(1)
    run = ServedRun(args.run_dir)
    domains = list(load_config(Path(args.run_dir) / "config.yaml").data.domains)
    by_domain, models, rows = run.domain_adapters(), {}, []
    for d in domains:
        for e in sample_examples(d, "eval", args.per_domain, 0):
            adapter = by_domain.get(infer_domain(e.prompt, domains), "global")
            if adapter not in models:
                m, _ = run.load_model(adapter)
                models[adapter] = CausalGenerator(m, run.tokenizer, 256, args.max_new_tokens + 256,
                                                  system=run.system_prompt)
            g, probes, times = models[adapter], {}, {}
            for k in (*KS, args.max_new_tokens):  # confidence of the first k tokens == of a k-token generation
                t0 = time.perf_counter()
                probes[k] = g.generate(e.prompt, max_new_tokens=k)
                times[k] = time.perf_counter() - t0
            rows.append({"domain": d, "adapter": adapter, "probes": probes, "times": times})

    whole = [r["probes"][args.max_new_tokens] for r in rows]
    r = ServeSettings().routing
    fixed = RoutingPolicy(r.max_mean_entropy, r.min_token_prob)
    probs = sorted(w.min_token_prob for w in whole)
    cut = RoutingPolicy(float("inf"), probs[min(len(probs) - 1, int(args.escalate * len(probs)))])
    result, table = {"prompts": len(rows), "domains": domains, "answer_tokens": [w.completion_tokens for w in whole]}, []
    for name, policy in (("fixed serve.routing.*", fixed), (f"min_token_prob {cut.min_token_prob:.4f}", cut)):
        tiers = [route_after_edge(w, policy).tier for w in whole]
        for k in KS:
            same = sum(route_after_edge(row["probes"][k], policy).tier == t for row, t in zip(rows, tiers))
            result[f"{name} k={k}"] = {"same_decision": same, "whole_escalates": tiers.count("cloud")}
            table.append([name, k, f"{tiers.count('cloud')}/{len(rows)}", f"{same}/{len(rows)}",
                          f"{statistics.median(row['times'][k] for row in rows) * 1000:.0f}"])
    lengths = result["answer_tokens"]
    whole_ms = statistics.median(row["times"][args.max_new_tokens] for row in rows) * 1000
    md = (f"# Edge probe vs whole answer\n\n{len(rows)} held-out prompts of {domains}; answers "
          f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths)}); whole answer median "
          f"{whole_ms:.0f} ms.\n\n"
          + md_table(["thresholds", "k", "whole answers escalated", "probe decides the same", "first k tokens, ms"],
                     table) + "\n")
    write_results("probe_bench", {**envelope("probe_bench", vars(args)), "result": result}, md)


if __name__ == "__main__":
    main()
