"""``privacy_audit.png``: what leaks next to what the run learned, for every audit of a run folder.

One row of bars per audit (the run's own settings, then each ``privacy-audit --set`` what-if): the
share of tokens, content tokens and whole answers each attack recovered, and the run's mean exact
match on its private domains beside them, so a defense's price and its effect read off one picture.
Written by ``gaisnet privacy-audit`` after each audit, from the JSON files alone (no model needed).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..layout import RunLayout

ATTACKS = ("search_exact_weights", "search_public_base", "learned_public_base")
MEASURES = ("tokens", "content", "answers")


def _label(audit: dict) -> str:
    over = audit.get("overrides") or []
    return ", ".join(o.removeprefix("privacy.") for o in over) if over else "run's own settings"


def leakage_rows(audits: list[dict]) -> list[dict]:
    """One row per audit: its label, the recovery of each attack and measure, mean exact match and AUC."""
    rows = []
    for a in audits:
        inv = a.get("inversion") if isinstance(a.get("inversion"), dict) else {}
        em = a.get("exact_match") or {}
        rows.append({
            "label": _label(a),
            "recovery": {k: {m: inv[k].get(m) for m in MEASURES} for k in ATTACKS if k in inv},
            "exact_match": sum(em.values()) / len(em) if em else None,
            "membership_auc": (a.get("membership") or {}).get("auc"),
        })
    return rows


def write_leakage_plot(run_dir: str | Path) -> Path | None:
    """Draw every audit in ``run_dir`` into ``privacy_audit.png``; None when there is no audit yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunLayout(run_dir)
    audits = [json.loads(p.read_text()) for p in run.privacy_audits()]
    if not audits:
        return None
    rows = leakage_rows(audits)
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 1.6 + 0.9 * len(rows)), sharey=True)
    ys = range(len(rows))
    height = 0.8 / (len(ATTACKS) + 1)
    for ax, measure in zip(axes, MEASURES):
        for i, attack in enumerate(ATTACKS):
            vals = [(r["recovery"].get(attack) or {}).get(measure) for r in rows]
            ax.barh([y + i * height for y in ys], [v if v is not None else 0.0 for v in vals], height,
                    label=attack.replace("_", " "))
        em = [r["exact_match"] for r in rows]
        ax.barh([y + len(ATTACKS) * height for y in ys], [v if v is not None else 0.0 for v in em], height,
                color="black", label="exact match (mean, private domains)")
        ax.set(title=f"recovered: {measure.replace('_', ' ')}", xlim=(0, 1))
        ax.axvline(0.10, color="grey", linestyle=":", linewidth=1)
    axes[0].set_yticks([y + 0.4 - height / 2 for y in ys], [r["label"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"what a curious edge recovers vs what the run learned ({Path(run_dir).name})")
    fig.tight_layout()
    fig.savefig(run.privacy_plot, dpi=90)
    plt.close(fig)
    return run.privacy_plot
