"""``study.png``: one panel per effect, the device-private domains' mean exact match (bars; their
mean held-out loss on the right axis) and the public domain's exact match (dots) for each cell, with the MB the run moved over all links; the
fine-tuning panel shows the base alone (round 0) next to after the rounds, the relay panel also the
cloud alone (the base without the adapter) after the run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _em(ev: dict | None, domains: list[str], metric: str = "exact_match") -> float | None:
    vals = [ev[d][metric] for d in domains if ev and d in ev]
    return sum(vals) / len(vals) if vals else None


def _loss(ev: dict | None, domains: list[str]) -> float | None:
    return _em(ev, domains, "loss")


def write_plot(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    effects = list(dict.fromkeys(r["effect"] for r in rows)) or ["(no cells)"]
    cols = min(3, len(effects))
    nrows = -(-len(effects) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows + 0.6), squeeze=False)
    handles = []
    for ax in axes.flat[len(effects):]:
        ax.set_visible(False)
    for ax, effect in zip(axes.flat, effects):
        cells = [r for r in rows if r["effect"] == effect]
        bars = []  # (label, private EM, public EM, the cloud alone?)
        for r in cells:
            priv, pub = r.get("private_domains", []), r.get("public_domains", [])
            if effect == "finetuning":
                bars.append(("base alone (round 0)", _em(r.get("eval_round0"), priv), _em(r.get("eval_round0"), pub),
                             True, _loss(r.get("eval_round0"), priv)))
                bars.append((f"after {r.get('rounds')} rounds", _em(r.get("eval"), priv), _em(r.get("eval"), pub),
                             False, _loss(r.get("eval"), priv)))
                continue
            label = r["label"] + (" (NOT private)" if r.get("privacy_note") else "")
            if r.get("devices_own_em") is not None:  # ``local``: each device's own adapter on its own domains
                label += f" (own {r['devices_own_em']:.2f})"
            if r.get("bytes"):
                label += f"\n{sum(r['bytes'].values()) / 1e6:.0f} MB"
            bars.append((label, _em(r.get("eval"), priv), _em(r.get("eval"), pub), False, _loss(r.get("eval"), priv)))
            if effect == "relay":
                bars.append((f"{r['label']}: cloud alone", _em(r.get("cloud_alone"), priv),
                             _em(r.get("cloud_alone"), pub), True, _loss(r.get("cloud_alone"), priv)))
        xs = range(len(bars))
        ax.bar(xs, [b[1] or 0.0 for b in bars], color=["C1" if b[3] else "C0" for b in bars],
               label="device-private domains: mean exact match (orange: the base alone, no adapter)")
        ax.plot(xs, [b[2] if b[2] is not None else float("nan") for b in bars], "o", color="C3",
                label="public domain: exact match")
        for x, b in zip(xs, bars):
            if b[1] is not None:
                ax.text(x, (b[1] or 0) + 0.02, f"{b[1]:.2f}", ha="center", fontsize=7)
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=30, ha="right", fontsize=7)
        ax.set(title=effect, ylabel="held-out exact match", ylim=(0, 1.1))
        twin = ax.twinx()  # the held-out loss shows an effect where exact match is still ~0
        losses = [b[4] if b[4] is not None else float("nan") for b in bars]
        twin.plot(xs, losses, "kx--", lw=0.8, label="device-private domains: mean held-out loss (right axis)")
        twin.set_ylabel("held-out loss", fontsize=8)
        finite = [x for x in losses if x == x]
        twin.set_ylim(0, max(finite) * 1.15 if finite else 1)
        if ax is axes.flat[0]:
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=3, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
