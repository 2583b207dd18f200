"""``gaisnet study``: run the grid (``grid.py``), one cell at a time, resumably.

For each cell of the chosen effects: resolve its config (all cells first, so a bad ``--set`` is
refused before any work); a cell whose (cell, key) row is in ``study.jsonl`` is done; a cell whose
config another effect's cell already ran shares that run's measurement (a row of its own, no run);
a cell whose folder holds ``result.json`` (it finished, the study stopped before its row) gets
its row without a run; any other cell runs in ``OUT/cells/<key>/`` (a folder left by an
interrupted run of it is cleared first), in a fresh Python process (``python -m
gaisnet_ray.study.cell``) so no memory carries from one cell to the next, and its row is appended
when it is finished. ``study.png`` is written at the
end from every row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..config import Config, ConfigError, config_to_yaml
from ..layout import RunLayout
from .grid import RANDOM_INIT, STUDY_BASE, Cell, base_key, default_grid, resolve, select
from .store import RANDOM_INIT_DIR, RESULT_NAME, STUDY_PNG, StudyStore

CELLS_DIR = "cells"


class StudyError(RuntimeError):
    """A cell's run failed (its log is named)."""


def _mean(ev: dict | None, domains: list[str], metric: str) -> float | None:
    vals = [ev[d][metric] for d in domains if ev and d in ev]
    return sum(vals) / len(vals) if vals else None


def _summaries(prefix: str, ev: dict | None, private: list[str], public: list[str]) -> dict:
    return {f"{prefix}private_em": _mean(ev, private, "exact_match"),
            f"{prefix}private_loss": _mean(ev, private, "loss"),
            f"{prefix}public_em": _mean(ev, public, "exact_match"),
            f"{prefix}public_loss": _mean(ev, public, "loss")}


def make_row(cell: Cell, cfg: Config, key: str, result: dict, user_sets: list[str], cell_dir: str,
             shared_from: str | None = None) -> dict:
    """The study.jsonl row of ``cell`` from its run's ``result.json``."""
    private = list(cfg.data.domains)
    public = [d for d in (cfg.data.public_domains or []) if d not in private]
    row = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cell": cell.name, "effect": cell.effect, "label": cell.label,
        "swept_key": cell.key, "swept_value": cell.value,
        "overrides": list(cell.overrides), "study_overrides": [*STUDY_BASE, *user_sets],
        "key": key, "base_key": base_key(cfg), "run_dir": cell_dir, "runtime": "in-process (InProcessGaisNet)",
        "shared_from": shared_from,  # None: this cell ran; else the cell whose run it shares
        "scheme": cfg.training.scheme, "relay": cfg.relay.policy, "peft_method": cfg.peft.method,
        "rounds": cfg.training.rounds, "local_steps": cfg.training.local_steps,
        "private_domains": private, "public_domains": public,
        "eval": result["eval"], **_summaries("", result["eval"], private, public),
        "eval_round0": result["eval_round0"], **_summaries("round0_", result["eval_round0"], private, public),
        "eval_round0_shared": result.get("base_eval_shared", False),  # measured by an earlier cell of the same base
        "cloud_alone": result["cloud_alone"], "cloud_alone_source": result["cloud_alone_source"],
        **_summaries("cloud_alone_", result["cloud_alone"], private, public),
        "privacy_note": result["privacy_note"], "note": cell.note,
        "wall_s": result["wall_s"], "rounds_wall_s": result["rounds_wall_s"], "setup_s": result["setup_s"],
        "bytes": result["bytes"], "bytes_up": result["bytes_up"], "bytes_down": result["bytes_down"],
        "relay_bytes_down": result["relay_bytes_down"],
        "modeled_comm_s": result["modeled_comm_s"], "modeled_round_s": result["modeled_round_s"],
        "train_loss": result["train_loss"], "pretrain_losses": result["pretrain_losses"],
    }
    if result.get("eval_devices"):  # ``local``: each device's own adapter, on its own domains
        own = [e["own"] for e in result["eval_devices"].values() if e.get("own")]
        row["eval_devices"] = result["eval_devices"]
        row["devices_own_em"] = (sum(o["exact_match"] for o in own) / len(own)) if own else None
    return row


def _run_isolated(cell_dir: Path) -> None:
    """The cell in a fresh Python process; its output goes to ``logs/cell.log``."""
    log = cell_dir / "logs" / "cell.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gaisnet_ray.study.cell", str(cell_dir)],
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the study: end the cell too
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise StudyError(f"cell {cell_dir.name} failed (exit {rc}): {tail[0][:300]}; log: {log}")


def plan_cells(cells: list[Cell], config: str | Path | None, user_sets: list[str],
               log: Callable[[str], None]) -> list[tuple[Cell, Config, str]]:
    """Each cell's resolved config and key. A required cell the config refuses is a ConfigError
    naming the cell; an optional one (``peft.method: prefix`` before the config knows it) is left
    out with a message."""
    out = []
    for cell in cells:
        try:
            cfg, key = resolve(cell, config, user_sets)
        except ConfigError as e:
            if cell.optional:
                log(f"study: leaving out {cell.name}: the config does not accept it ({e})")
                continue
            raise ConfigError(f"study cell {cell.name}: {e}") from None
        out.append((cell, cfg, key))
    return out


def run_study(config: str | Path | None, out: str | Path, user_sets: list[str] | None = None,
              only: list[str] | None = None, grid: list[Cell] | None = None, isolate: bool = True,
              on_run: Callable[[Cell, str], None] | None = None,
              log: Callable[[str], None] = lambda s: print(s, flush=True)) -> Path:
    """Run the study into ``out`` (``study.jsonl``, ``study.png``, ``cells/<key>/``); returns ``out``.
    ``grid``: the cells (default ``default_grid()``); ``only``: effects to run (ValueError naming
    the known ones); ``isolate``: a process per cell (False: in this process, for tests);
    ``on_run(cell, key)``: called before each cell that actually runs."""
    user_sets = list(user_sets or [])
    out = Path(out)
    cells = select(grid if grid is not None else default_grid(), only)
    planned = plan_cells(cells, config, user_sets, log)  # every config error before any work
    store = StudyStore(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = store.rows()
    done = {(r["cell"], r["key"]) for r in rows}
    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], r)
    runs = len({k for _, _, k in planned if k not in by_key})
    log(f"study: {len(planned)} cells, {len({k for _, _, k in planned})} distinct runs, {runs} to run "
        f"(results: {store.path})")
    ran, failed = 0, []
    for i, (cell, cfg, key) in enumerate(planned, 1):
        tag = f"[{i}/{len(planned)}] {cell.name} ({key})"
        if (cell.name, key) in done:
            log(f"{tag}: done")
            continue
        cell_dir = out / CELLS_DIR / key
        if key in by_key:  # another effect's cell ran this very config
            src = by_key[key]
            src_result = out / src["run_dir"] / RESULT_NAME
            if src_result.is_file():
                row = make_row(cell, cfg, key, json.loads(src_result.read_text()), user_sets, src["run_dir"],
                               shared_from=src["cell"])
            else:  # the rows came without the run folders (results copied from elsewhere): the row's own numbers
                row = {**src, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "cell": cell.name, "effect": cell.effect, "label": cell.label, "swept_key": cell.key,
                       "swept_value": cell.value, "overrides": list(cell.overrides), "note": cell.note,
                       "shared_from": src["cell"]}
            store.append(row)
            log(f"{tag}: the same run as {src['cell']}")
            continue
        if (cell_dir / RESULT_NAME).is_file():  # it finished, but the study stopped before its row
            result = json.loads((cell_dir / RESULT_NAME).read_text())
            row = make_row(cell, cfg, key, result, user_sets, str(cell_dir.relative_to(out)))
            store.append(row)
            by_key[key] = row
            log(f"{tag}: finished earlier (its row written now)")
            continue
        t0 = time.perf_counter()
        # the round-0 evaluation (the base alone) once per base: from an earlier cell of the same base
        base_eval = next((r["eval_round0"] for r in store.rows()
                          if r.get("base_key") == base_key(cfg) and r.get("eval_round0")), None)
        _prepare_cell_dir(cell_dir, cfg, out, base_eval)
        if on_run is not None:
            on_run(cell, key)
        log(f"{tag}: running ({cell_dir})")
        if isolate:
            try:
                _run_isolated(cell_dir)
            except StudyError as e:  # the other cells still run; the study exits 1 at the end
                failed.append(str(e))
                log(f"{tag}: FAILED: {e}")
                continue
        else:
            from .cell import run_cell

            run_cell(cell_dir, base_eval, json.loads((cell_dir / "cell.json").read_text()).get("random_init"))
        ran += 1
        result = json.loads((cell_dir / RESULT_NAME).read_text())
        row = make_row(cell, cfg, key, result, user_sets, str(cell_dir.relative_to(out)))
        store.append(row)
        by_key[key] = row
        log(f"{tag}: {time.perf_counter() - t0:.0f} s, private EM {_fmt(row['private_em'])}, "
            f"public EM {_fmt(row['public_em'])}")
    from .plot import write_plot  # matplotlib: only once the cells are done

    rows = store.rows()
    write_plot(rows, out / STUDY_PNG)
    log(f"study: ran {ran} cell(s); {len(rows)} rows in {store.path}; plot {out / STUDY_PNG}")
    if failed:
        raise StudyError(f"{len(failed)} cell(s) failed (run the command again to retry them): " + "; ".join(failed))
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _prepare_cell_dir(cell_dir: Path, cfg: Config, out: Path, base_eval: dict | None) -> None:
    """A clean cell folder with the cell's config.yaml (the random-init marker replaced by the
    study's random-init model folder, made here once)."""
    if cell_dir.exists():  # an interrupted run of this cell: start it again from nothing
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    spec: dict = {"base_eval": base_eval}
    if cfg.model.path == RANDOM_INIT:  # the cell makes the model folder (once per study) before it starts
        folder = (out / RANDOM_INIT_DIR).absolute()
        spec["random_init"] = {"from": cfg.model.model_copy(update={"path": None}).model_dump(mode="json"),
                               "to": str(folder)}
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(folder)})})
    RunLayout(cell_dir).config.write_text(config_to_yaml(cfg))
    (cell_dir / "cell.json").write_text(json.dumps(spec) + "\n")


def list_study(config: str | Path | None, out: str | Path, user_sets: list[str] | None = None,
               only: list[str] | None = None, grid: list[Cell] | None = None) -> int:
    """Print one line per cell: its name, key, the overrides it applies, and done / shared / to run."""
    user_sets = list(user_sets or [])
    cells = select(grid if grid is not None else default_grid(), only)
    planned = plan_cells(cells, config, user_sets, print)
    rows = StudyStore(out).rows()
    done, keys = {(r["cell"], r["key"]) for r in rows}, {r["key"] for r in rows}
    first: dict[str, str] = {}
    for cell, _, key in planned:
        state = ("done" if (cell.name, key) in done else "shared" if key in keys or key in first else "to run")
        print(f"{cell.name:<28} {key}  {state:<7} {' '.join(cell.overrides) or '(the reference)'}"
              + (f"  [same run as {first[key]}]" if key in first else ""))
        first.setdefault(key, cell.name)
    print(f"{len(planned)} cells, {len(first)} distinct runs, {len([k for k in first if k not in keys])} to run; "
          f"every cell also: {' '.join([*STUDY_BASE, *user_sets])}")
    return 0
