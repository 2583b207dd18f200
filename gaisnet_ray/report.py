"""report.png: training loss, per-domain eval, bytes per link, modeled vs measured time, and (with a
relay) the cloud foundation model's eval before and after each round's relay."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .layout import RunLayout  # noqa: E402
from .runfolder import read_metrics  # noqa: E402


def write_report(run_dir: str | Path, initial_eval: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    relays = [(r["round"], r["relay"]) for r in rows if r.get("relay")]
    fig, axes = plt.subplots(3 if relays else 2, 2, figsize=(11, 12 if relays else 8))
    rounds = [r["round"] for r in rows]

    ax = axes[0, 0]
    ax.plot(rounds, [r["train_loss"] for r in rows], marker="o")
    ax.set(title="device training loss", xlabel="round", ylabel="loss")

    evals = [(r["round"], r["eval"]) for r in rows if r.get("eval")]
    if initial_eval:
        evals = [(0, initial_eval)] + evals
    domains = sorted({d for _, e in evals for d in e})
    for d in domains:
        xs = [x for x, e in evals if d in e]
        axes[0, 1].plot(xs, [e[d]["loss"] for x, e in evals if d in e], marker="o", label=d)
        axes[1, 0].plot(xs, [e[d]["exact_match"] for x, e in evals if d in e], marker="o", label=d)
    axes[0, 1].set(title="held-out loss per domain (global knowledge)", xlabel="round", ylabel="loss")
    axes[1, 0].set(title="held-out exact match per domain", xlabel="round", ylabel="exact match")
    for ax in (axes[0, 1], axes[1, 0]):
        if domains:
            ax.legend(fontsize=8)

    ax = axes[1, 1]
    if rows:
        links = list(rows[0]["bytes"])
        bottom = [0.0] * len(rows)
        for link in links:
            vals = [r["bytes"][link] / 1e6 for r in rows]
            ax.bar(rounds, vals, bottom=bottom, label=link)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(title="MB moved per round by link and direction", xlabel="round", ylabel="MB")
        ax.legend(fontsize=7, loc="center left")
        twin = ax.twinx()
        twin.plot(rounds, [r["modeled_comm_s"] for r in rows], "k--", marker="x", label="modeled link delay")
        twin.plot(rounds, [r["wall_s"] for r in rows], "k-", marker="+", label="measured wall time")
        planned = [r for r in rows if r.get("plan")]
        if planned:  # the cost model's round (planner.*) next to the measured devices' turns + edge updates
            emulated = " (emulated devices)" if planned[0]["plan"].get("emulated") else ""
            xs = [r["round"] for r in planned]
            twin.plot(xs, [r["plan"]["modeled_round_s"] for r in planned], "r--", marker="x",
                      label=f"modeled round ({planned[0]['plan']['planner']} plan){emulated}")
            twin.plot(xs, [r["plan"]["measured_train_s"] for r in planned], "r-", marker="+",
                      label=f"measured training part{emulated}")
        twin.set_ylabel("seconds")
        twin.set_ylim(bottom=0)
        twin.legend(fontsize=7, loc="center right")
    if relays:
        _plot_relay(axes[2, 0], axes[2, 1], relays)
    fig.tight_layout()
    path = RunLayout(run_dir).report
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_relay(ax_loss, ax_em, relays: list[tuple[int, dict]]) -> None:
    """Per domain: the foundation model alone before (dashed) and after (solid) each relay."""
    policy = relays[0][1].get("policy", "?")
    domains = sorted({d for _, rel in relays for d in rel.get("cloud_after", {})})
    for i, d in enumerate(domains):
        color = f"C{i}"
        xs = [r for r, _ in relays]
        for key, style, label in (("cloud_before", "--", "before"), ("cloud_after", "-", "after")):
            for ax, metric in ((ax_loss, "loss"), (ax_em, "exact_match")):
                ax.plot(xs, [rel[key][d][metric] for _, rel in relays], style, color=color, marker="o",
                        label=f"{d} {label}")
    ax_loss.set(title=f"cloud foundation model, held-out loss: before / after relay ({policy})", xlabel="round",
                ylabel="loss")
    ax_em.set(title="cloud foundation model, exact match: before / after relay", xlabel="round",
              ylabel="exact match")
    for ax in (ax_loss, ax_em):
        ax.legend(fontsize=6, ncol=2)
