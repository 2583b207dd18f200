"""The run folder's life: choose and create it, check it before serving or inspecting, append
metrics, get it ready to ``--resume``. Its paths are named in ``layout.RunLayout``."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from .config import Config, config_to_yaml
from .layout import CONFIG_NAME, KNOWLEDGE_DIR, METRICS_NAME, MODEL_CONFIG_NAME, MODEL_DIR, RunLayout


class RunFolderError(ValueError):
    pass


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """Where the run folder goes (``out``, else ``run.out_dir``, else runs/<timestamp>); refuses a
    folder that already holds a run. Creates nothing."""
    run_dir = Path(out or cfg.run.out_dir or default_run_dir())
    if RunLayout(run_dir).holds_run():
        raise RunFolderError(f"run folder '{run_dir}' already holds a run; choose another --out")
    return run_dir


def check_creatable(run_dir: Path) -> None:
    """Refuse a run folder that cannot be made here: a file (``/dev/null``), a path under a file,
    one where folders cannot be created (``/proc/x``, read-only or no permission). Leaves nothing
    behind: the test is an empty folder made and removed in the nearest folder that exists."""
    import tempfile

    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder '{run_dir}' exists and is not a folder; choose another --out")
    base = run_dir
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():  # a path under a regular file (or a broken link)
        raise RunFolderError(f"run folder '{run_dir}' cannot be created: '{base}' is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gaisnet-probe-", dir=base))
    except OSError as e:
        raise RunFolderError(f"run folder '{run_dir}' cannot be created: {e.strerror or e} in '{base}'") from None


def usable_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """``resolve_run_dir`` and ``check_creatable``: the folder a run on this machine will write."""
    run_dir = resolve_run_dir(cfg, out)
    check_creatable(run_dir)
    return run_dir


def prepare_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """Create the run folder and write the resolved config; never overwrite an earlier run."""
    run_dir = resolve_run_dir(cfg, out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunLayout(run_dir).config.write_text(config_to_yaml(cfg))
    except OSError as e:
        raise RunFolderError(f"run folder '{run_dir}' cannot be created: {e.strerror or e}") from None
    return run_dir


def check_run_folder(run_dir: str | Path, serving: bool = False) -> Path:
    """``run_dir`` as a run folder to inspect (or, with ``serving``, to serve); else one
    ``RunFolderError`` line saying what is missing. Reads nothing but the folder's names."""
    path = Path(run_dir)
    run = RunLayout(path)
    if not path.is_dir():
        why = "it does not exist" if not path.exists() else "it is not a folder"
        raise RunFolderError(f"'{path}' is not a run folder: {why}")
    if not run.config.is_file():
        raise RunFolderError(f"'{path}' is not a run folder (no {CONFIG_NAME})")
    if serving and not run.model_config.is_file():
        raise RunFolderError(f"'{path}' is not a run folder to serve: no {MODEL_DIR}/{MODEL_CONFIG_NAME} in it")
    if serving and not run.knowledge.is_dir():
        raise RunFolderError(f"'{path}' has no {KNOWLEDGE_DIR}/ folder: nothing to serve yet")
    return path


def resume_run_dir(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, int]:
    """Get a run folder ready to continue: (its config, the last round that completed).

    A round is complete when its metrics line is on disk (written after the round's knowledge,
    base and edge versions). Whatever a killed driver left of a later round (a version folder, a
    base version, a half-written metrics line, a half-built ``model/`` swap) is moved to
    ``orphaned/<time>/``, not deleted, and ``model/`` is reset to the base of the last complete
    round. The versions the continuation loads must be intact (``VersionedStore.verify``), else it
    is refused before anything but the metrics tail moved. ``overrides`` may change only
    ``training.rounds`` (to extend the run) and ``run.*``/``serve.*``/``faults.*`` keys: anything
    else would make the continuation differ from the run it continues.
    """
    from .config import load_config

    run = RunLayout(run_dir)
    run_dir = run.root
    check_resumable(run_dir, overrides)
    cfg = load_config(run.config, overrides)
    stash = run.orphaned_at(time.strftime("%Y%m%d-%H%M%S"))
    rows = _complete_metrics(run_dir, stash)
    if [r["round"] for r in rows] != list(range(1, len(rows) + 1)):
        raise RunFolderError(f"'{run_dir}/{METRICS_NAME}' does not hold rounds 1..n in order: cannot resume")
    done = len(rows)
    if done == 0 and not run.version_dir(0).is_dir():
        raise RunFolderError(f"'{run_dir}' never finished its start (no {run.rel(run.version_dir(0))}): start it "
                             "again instead of resuming")
    _check_resume_inputs(run, done, relay=cfg.relay.policy != "none")
    _stash_later_versions(run, done, stash)
    run.config.write_text(config_to_yaml(cfg))
    return cfg, done


def check_resumable(run_dir: Path, overrides: list[str] | None = None) -> None:
    """What ``--resume`` can refuse from names alone, before Ray is imported: a folder without
    config.yaml, an override outside the ones a continuation may change."""
    from .config import ConfigError

    if not RunLayout(run_dir).config.is_file():
        raise RunFolderError(f"'{run_dir}' is not a run folder to resume (no {CONFIG_NAME})")
    allowed = ("training.rounds=", "run.", "serve.", "faults.")
    bad = [o for o in overrides or [] if not o.strip().startswith(allowed)]
    if bad:
        raise ConfigError(f"--resume keeps the run's config; only training.rounds, run.*, serve.* and faults.* may "
                          f"change, not {bad}")
    from .config import load_config
    from .schemes import scheme_named

    scheme = load_config(RunLayout(run_dir).config).training.scheme
    if scheme_named(scheme).keeps_adapters:  # ``local``: each device's adapter is on the device, not here
        raise ConfigError(f"training.scheme '{scheme}' cannot resume: each device's own adapter lives on the "
                          "device, not in the run folder")


def _complete_metrics(run_dir: Path, stash: Path) -> list[dict]:
    rows, tail = split_metrics(run_dir)
    if tail:
        stash.mkdir(parents=True, exist_ok=True)
        (stash / METRICS_NAME).write_text("\n".join(tail) + "\n")
        RunLayout(run_dir).metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _stores(run: RunLayout) -> list:
    """Every versioned store of a run folder: global knowledge, bases, each edge's knowledge."""
    from .knowledge.bases import BaseStore  # torch loads with the knowledge package: not before the checks
    from .knowledge.store import KnowledgeStore

    stores = [KnowledgeStore(run.knowledge), BaseStore(run.bases)]
    if run.edges.is_dir():
        stores += [KnowledgeStore(p) for p in sorted(run.edges.iterdir()) if p.is_dir()]
    return stores


def _check_resume_inputs(run: RunLayout, done: int, relay: bool) -> None:
    """Refuse to continue from a damaged version: the cloud reloads v0000 and v<done> (and, with a
    relay, base b<done>, checked byte for byte: it becomes model/)."""
    knowledge, bases = _stores(run)[:2]
    damaged = [why for v in sorted({0, done}) if (why := knowledge.verify(v)) is not None]
    if relay and (why := bases.verify(done, deep=True)) is not None:
        damaged.append(f"bases/{why}")
    if damaged:
        raise RunFolderError(f"cannot resume '{run.root}' after round {done}: {'; '.join(damaged)}")


def _stash_later_versions(run: RunLayout, done: int, stash: Path) -> None:
    """Each store cuts itself back to version ``done`` (``VersionedStore.truncate``); a half-built
    model/ swap moves aside too; ``model/`` becomes base ``done`` again when the run has bases."""
    import shutil

    stores = _stores(run)
    for store in stores:
        store.truncate(after=done, stash=stash / store.root.relative_to(run.root))
    for leftover in run.model_swaps():
        stash.mkdir(parents=True, exist_ok=True)
        shutil.move(str(leftover), str(stash / leftover.name))
    bases = stores[1]
    if bases.folder(done).is_dir():  # model/ may already hold a later round's base
        from .knowledge.bases import refresh_model_dir

        refresh_model_dir(run.root, bases.folder(done))


def append_metrics(run_dir: Path, record: dict) -> None:
    """One JSON line per round, flushed at once so a crash keeps every finished round."""
    with open(RunLayout(run_dir).metrics, "a") as f:
        f.write(json.dumps(record) + "\n")


def split_metrics(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The rounds of ``metrics.jsonl`` that are complete, and the lines from the first one that is
    not a JSON object on (a half-written last line a killed driver left, and anything after it).
    ``--resume`` moves that tail to ``orphaned/``; ``inspect`` and the report skip it."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return [], []
    rows, lines = [], path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            return rows, lines[i:]
        rows.append(row)
    return rows, []


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The complete rounds of ``metrics.jsonl`` (see ``split_metrics``)."""
    return split_metrics(run_dir)[0]


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
    RunLayout(run_dir).summary.write_text(json.dumps(summary, indent=2) + "\n")
