"""The run folder contract (design.md): config.yaml, model/, metrics.jsonl, knowledge/, report.png."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from .config import Config, config_to_yaml

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "run.json"
REPORT_NAME = "report.png"


class RunFolderError(ValueError):
    pass


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """Create the run folder and write the resolved config; never overwrite an earlier run."""
    run_dir = Path(out or cfg.run.out_dir or default_run_dir())
    if (run_dir / METRICS_NAME).exists() or (run_dir / "knowledge").exists():
        raise RunFolderError(f"run folder '{run_dir}' already holds a run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_NAME).write_text(config_to_yaml(cfg))
    return run_dir


def append_metrics(run_dir: Path, record: dict) -> None:
    """One JSON line per round, flushed at once so a crash keeps every finished round."""
    with open(run_dir / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "transformers", "peft", "gaisnet-ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_summary(run_dir: Path, summary: dict) -> None:
    summary = {**summary, "versions": library_versions()}
    (run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
