"""Every path of a run folder, named once (like peft's ``adapter_config.json`` constants).

The run folder is an outside contract (docs/architecture.md): ``gaisnet run`` writes it, ``serve``,
``inspect``, ``privacy-audit`` and ``--resume`` read it. Code that needs a path asks a
``RunLayout`` instead of joining string literals, so a name changes in one place and a reader
finds the whole on-disk shape here::

    RUN_DIR/
      config.yaml            the resolved config                       RunLayout.config
      metrics.jsonl          one JSON object per round                 .metrics
      run.json               summary + library versions                .summary
      report.png             plots                                     .report
      plan.json              the planner's record of this host         .plan
      privacy_audit*.json    ``gaisnet privacy-audit`` results         .privacy_audit(tag)
      model/                 the latest foundation (HF folder)         .model
      knowledge/             global adapter versions vNNNN/            .knowledge, .version_dir(v)
        bases/bNNNN/         foundation versions (relay)               .bases, .base_dir(b)
        edges/<edge>/vNNNN/  each edge's own adapter                   .edges, .edge_store(e)
      edges_private/<edge>/  what the edge escalated + the cloud's     .edge_private(e)
                             answers (serve.learn_from_escalations; never relayed)
      cloud/checkpoints/     DeepSpeed checkpoints of pre-training     .cloud_checkpoints
      cloud/initial_eval.json  the eval before round 1                 .initial_eval
      audit/                 per-actor message audits                  .audit
      logs/gaisnet.log       library chatter kept off the console      .log_file
      orphaned/<time>/       what ``--resume`` moved aside             .orphaned_at(stamp)
      .model-<hex>/          model/ being rebuilt (or the old one being removed)   .model_swaps()

No imports beyond pathlib: every layer (core, actors, Serve, CLI) may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "run.json"
REPORT_NAME = "report.png"
PLAN_NAME = "plan.json"
PRIVACY_AUDIT_NAME = "privacy_audit.json"
PRIVACY_PLOT_NAME = "privacy_audit.png"  # every audit of the run: leakage next to exact match
MODEL_DIR = "model"
MODEL_CONFIG_NAME = "config.json"  # what makes model/ a Hugging Face folder
MODEL_SWAP_PREFIX = ".model-"  # model/ is rebuilt beside itself under this name, then swapped in
KNOWLEDGE_DIR = "knowledge"
BASES_DIR = "bases"
EDGES_DIR = "edges"
CLOUD_DIR = "cloud"
CHECKPOINTS_DIR = "checkpoints"
INITIAL_EVAL_NAME = "initial_eval.json"
AUDIT_DIR = "audit"
LOGS_DIR = "logs"
LOG_NAME = "gaisnet.log"
ORPHANED_DIR = "orphaned"
ROUTING_DIR = "routing"  # routing/<adapter>/vNNNN.json: cascade thresholds calibrated after the run
EDGES_PRIVATE_DIR = "edges_private"  # each edge's own serving data, outside knowledge/ (which is relayed)

VERSION_PREFIX = "v"  # knowledge/v0000, knowledge/edges/<edge>/v0000
BASE_PREFIX = "b"  # knowledge/bases/b0000


def version_name(version: int, prefix: str = VERSION_PREFIX) -> str:
    """``v0007`` for version 7 (four digits at least, more when needed)."""
    return f"{prefix}{version:04d}"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. Pure naming: creates and writes nothing."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # --- files at the top ---------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_NAME

    @property
    def report(self) -> Path:
        return self.root / REPORT_NAME

    @property
    def plan(self) -> Path:
        return self.root / PLAN_NAME

    def routing_table(self, adapter: str, version: int) -> Path:
        """Thresholds calibrated for ``adapter`` at ``version`` after the run (versions published
        since the cascade existed carry theirs inside the version folder instead)."""
        return self.root / ROUTING_DIR / adapter / f"{version_name(version)}.json"

    @property
    def privacy_plot(self) -> Path:
        return self.root / PRIVACY_PLOT_NAME

    def privacy_audits(self) -> list[Path]:
        """Every audit written in this run folder: the run's own first, then the what-ifs by name."""
        stem, suffix = PRIVACY_AUDIT_NAME.rsplit(".", 1)
        own = self.root / PRIVACY_AUDIT_NAME
        others = sorted(self.root.glob(f"{stem}-*.{suffix}"))
        return ([own] if own.is_file() else []) + others

    def privacy_audit(self, tag: str | None = None) -> Path:
        """``privacy_audit.json``, or ``privacy_audit-<tag>.json`` (tag made file-name safe) for an
        audit run with overrides, so it does not overwrite the plain one."""
        if not tag:
            return self.root / PRIVACY_AUDIT_NAME
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        stem, suffix = PRIVACY_AUDIT_NAME.rsplit(".", 1)
        return self.root / f"{stem}-{safe}.{suffix}"

    # --- the model and the knowledge stores ----------------------------------------------------
    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def model_config(self) -> Path:
        return self.model / MODEL_CONFIG_NAME

    def model_swaps(self) -> list[Path]:
        """Folders a model/ swap left beside model/ (a crash between building and swapping)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(MODEL_SWAP_PREFIX))

    @property
    def knowledge(self) -> Path:
        return self.root / KNOWLEDGE_DIR

    def version_dir(self, version: int) -> Path:
        return self.knowledge / version_name(version)

    @property
    def bases(self) -> Path:
        return self.knowledge / BASES_DIR

    def base_dir(self, version: int) -> Path:
        return self.bases / version_name(version, BASE_PREFIX)

    @property
    def edges(self) -> Path:
        return self.knowledge / EDGES_DIR

    def edge_store(self, edge_id: str) -> Path:
        return self.edges / edge_id

    def edge_private(self, edge_id: str) -> Path:
        """The edge's own area: what its serving replica escalated, with the cloud's answers
        (``serve.learn_from_escalations``); user prompts, so never under ``knowledge/``."""
        return self.root / EDGES_PRIVATE_DIR / edge_id

    # --- the cloud's own files, audits, logs, what resume set aside ----------------------------
    @property
    def cloud(self) -> Path:
        return self.root / CLOUD_DIR

    @property
    def cloud_checkpoints(self) -> Path:
        return self.cloud / CHECKPOINTS_DIR

    @property
    def initial_eval(self) -> Path:
        return self.cloud / INITIAL_EVAL_NAME

    @property
    def audit(self) -> Path:
        return self.root / AUDIT_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def log_file(self) -> Path:
        return self.logs / LOG_NAME

    @property
    def orphaned(self) -> Path:
        return self.root / ORPHANED_DIR

    def orphaned_at(self, stamp: str) -> Path:
        return self.orphaned / stamp

    # --- helpers ----------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """True when a run already wrote here (its metrics or its knowledge store)."""
        return self.metrics.exists() or self.knowledge.exists()

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run folder, POSIX style (``knowledge/v0003``); ``.`` for the folder
        itself. For messages and records that must not carry server paths."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix() or "."
        except ValueError:
            return p.name
