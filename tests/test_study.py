"""``gaisnet study`` (issue 10 item 2) on the tiny job, no Ray: a 3-cell grid (two runs, one cell
sharing a run with another effect) writes rows with every field and finite values, resumes without
running a finished cell again, re-runs a cell that was interrupted midway, writes the plot, and
refuses an unknown ``--only`` name with one line. One cell goes through the real command (a fresh
process per cell)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gaisnet_ray.cli import main
from gaisnet_ray.study import default_grid, run_study, select
from gaisnet_ray.study.grid import EFFECTS, Cell
from gaisnet_ray.study.store import STUDY_JSONL, STUDY_PNG, StudyStore

from tinycfg import TINY_YAML

torch.set_num_threads(1)

# every cell: 1 edge, 2 devices, 1 round of 2 steps, no pre-training (STUDY_BASE's 2 rounds overridden)
SETS = ["training.rounds=1", "training.eval_every=1", "training.pretrain_steps=0", "topology.edges=1",
        "topology.devices_per_edge=2", "topology.cluster_size=1", "data.samples_per_device=8",
        "data.eval_samples_per_domain=2", "data.domains=[arithmetic, strings]", "data.public_domains=[units]",
        "training.local_steps=2", "training.batch_size=4"]
GRID = [
    Cell("schemes", "hfsl", "training.scheme", "hfsl", ("training.scheme=hfsl",)),
    Cell("schemes", "fl", "training.scheme", "fl", ("training.scheme=fl",)),
    Cell("clustering", "size 1", "topology.cluster_size", 1, ("topology.cluster_size=1",)),  # = schemes/hfsl
]


def _study(out, runs: list | None = None, **kw):
    """run_study in this process; ``runs`` collects the cells that actually ran."""
    hook = (lambda cell, key: runs.append(cell.name)) if runs is not None else None
    return run_study(TINY_YAML, out, SETS, grid=GRID, isolate=False, on_run=hook, log=lambda s: None, **kw)


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    runs: list[str] = []
    _study(out, runs)
    return out, runs


def test_rows_have_every_field_with_finite_values(study):
    out, runs = study
    assert runs == ["schemes/hfsl", "schemes/fl"]  # clustering/size 1 is the hfsl run: shared, not run
    rows = StudyStore(out).rows()
    assert [r["cell"] for r in rows] == ["schemes/hfsl", "schemes/fl", "clustering/size 1"]
    hfsl, fl, shared = rows
    assert shared["key"] == hfsl["key"] != fl["key"] and shared["shared_from"] == "schemes/hfsl"
    assert hfsl["shared_from"] is None and shared["run_dir"] == hfsl["run_dir"] == f"cells/{hfsl['key']}"
    for r in rows:
        assert _finite(r), r
        assert r["private_domains"] == ["arithmetic", "strings"] and r["public_domains"] == ["units"]
        assert set(r["eval"]) == set(r["eval_round0"]) == {"arithmetic", "strings", "units"}
        for d, e in r["eval"].items():
            assert set(e) >= {"loss", "exact_match"} and e["loss"] > 0 and 0 <= e["exact_match"] <= 1
        assert r["private_loss"] == pytest.approx((r["eval"]["arithmetic"]["loss"] + r["eval"]["strings"]["loss"]) / 2)
        assert r["public_loss"] == pytest.approx(r["eval"]["units"]["loss"])
        assert r["round0_private_loss"] > 0 and r["wall_s"] > 0 and r["rounds"] == 1
        assert set(r["bytes"]) == {"end_edge_up", "end_edge_down", "edge_cloud_up", "edge_cloud_down"}
        assert r["bytes_up"] > 0 and r["modeled_comm_s"] > 0
        assert r["cloud_alone"] == r["eval_round0"]  # relay none: the base alone never changes
        assert r["privacy_note"] is None and r["runtime"].startswith("in-process")
        assert r["study_overrides"][-len(SETS):] == SETS
    assert hfsl["scheme"] == "hfsl" and fl["scheme"] == "fl" and fl["swept_value"] == "fl"
    # one round-0 evaluation per base: the fl cell (same model, same eval data) took the hfsl cell's
    assert hfsl["base_key"] == fl["base_key"] and not hfsl["eval_round0_shared"] and fl["eval_round0_shared"]
    assert fl["eval_round0"] == hfsl["eval_round0"]
    assert hfsl["bytes"] != fl["bytes"]  # split: hidden states cross the end-edge link; fl: only adapters
    # the run folder of a cell holds the usual run files
    cell = out / hfsl["run_dir"]
    for name in ("config.yaml", "metrics.jsonl", "run.json", "report.png", "result.json", "cloud/initial_eval.json",
                 "knowledge/v0001/adapter_model.safetensors"):
        assert (cell / name).is_file(), name
    assert json.loads((cell / "run.json").read_text())["eval_final"] == hfsl["eval"]


def test_the_plot_is_written(study):
    out, _ = study
    png = out / STUDY_PNG
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_second_invocation_runs_no_cell(study):
    out, _ = study
    before = (out / STUDY_JSONL).read_text()
    runs: list[str] = []
    _study(out, runs)
    assert runs == []
    assert (out / STUDY_JSONL).read_text() == before  # no row added or changed


def test_a_cell_interrupted_midway_runs_again_and_only_it(tmp_path, monkeypatch):
    from gaisnet_ray.inprocess import InProcessGaisNet

    real = InProcessGaisNet.run_round
    calls = {"n": 0}

    def dies_in_second_cell(self, round_idx):
        calls["n"] += 1
        if calls["n"] == 2:  # the fl cell's first round: killed midway (its folder is half written)
            raise KeyboardInterrupt
        return real(self, round_idx)

    monkeypatch.setattr(InProcessGaisNet, "run_round", dies_in_second_cell)
    runs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _study(tmp_path, runs)
    assert runs == ["schemes/hfsl", "schemes/fl"]
    assert [r["cell"] for r in StudyStore(tmp_path).rows()] == ["schemes/hfsl"]
    fl_dirs = [p for p in (tmp_path / "cells").iterdir() if not (p / "result.json").exists()]
    assert len(fl_dirs) == 1 and (fl_dirs[0] / "config.yaml").is_file()  # the interrupted cell's folder
    (tmp_path / STUDY_JSONL).open("a").write('{"cell": "schemes/fl", "key": "')  # and a half-written row

    runs = []
    _study(tmp_path, runs)
    assert runs == ["schemes/fl"]  # the finished cell is not run again
    rows = StudyStore(tmp_path).rows()
    assert [r["cell"] for r in rows] == ["schemes/hfsl", "schemes/fl", "clustering/size 1"]
    assert (fl_dirs[0] / "result.json").is_file() and rows[1]["run_dir"] == f"cells/{fl_dirs[0].name}"


def test_unknown_only_names_are_refused_with_one_line(tmp_path, capsys):
    assert main(["study", str(TINY_YAML), "--out", str(tmp_path / "s"), "--only", "schemes", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown study effect(s) ['nonsense']" in err and "schemes" in err
    assert not (tmp_path / "s").exists()  # refused before any work
    with pytest.raises(ValueError, match="unknown study effect"):
        select(GRID, ["relay"])


def test_a_bad_set_is_refused_before_any_cell_runs(tmp_path, capsys):
    assert main(["study", str(TINY_YAML), "--out", str(tmp_path / "s"), "--set", "training.roundz=1"]) == 2
    assert "unknown config key 'training.roundz'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_default_grid_covers_every_effect_and_resolves(tmp_path, capsys):
    cells = default_grid()
    assert [e for e in EFFECTS] == list(dict.fromkeys(c.effect for c in cells))
    assert len({c.name for c in cells}) == len(cells)
    assert main(["study", "--out", str(tmp_path / "s"), "--list"]) == 0
    out = capsys.readouterr().out
    assert "schemes/centralized" in out and "same run as schemes/hfsl" in out
    ref = next(x for x in out.splitlines() if x.startswith("schemes/hfsl ")).split()[1]
    # the reference is shared by the one-change cells that land on it
    for name in ("pretraining/public off", "noniid/alpha 0.5", "clustering/size 3 balanced", "relay/none",
                 "knowledge/lora", "finetuning/base vs rounds"):
        line = next(x for x in out.splitlines() if x.startswith(name))
        assert f" {ref} " in line and "same run as schemes/hfsl" in line, line
    assert len([x for x in out.splitlines() if "same run as" in x]) == 6


def test_one_cell_through_the_command_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["study", str(TINY_YAML), "--out", str(out), "--only", "finetuning", *sum((["--set", s] for s in SETS), [])]
    assert main([*args]) == 0  # the default grid's fine-tuning effect: one cell, the reference
    rows = StudyStore(out).rows()
    assert [r["cell"] for r in rows] == ["finetuning/base vs rounds"] and _finite(rows[0])
    assert (out / rows[0]["run_dir"] / "logs" / "cell.log").is_file() and (out / STUDY_PNG).is_file()
    capsys.readouterr()
    assert main([*args]) == 0
    assert "ran 0 cell(s)" in capsys.readouterr().out


def test_a_random_init_cell_gets_its_model_folder(tmp_path):
    """The pre-training effect's strongest contrast: the same architecture randomly initialised,
    made once under the study folder; the cell's config.yaml names it (loadable on its own)."""
    from gaisnet_ray.config import load_config
    from gaisnet_ray.study.grid import RANDOM_INIT

    grid = [Cell("pretraining", "random init", "model.path", "random init", (f"model.path={RANDOM_INIT}",))]
    run_study(TINY_YAML, tmp_path, SETS, grid=grid, isolate=False, log=lambda s: None)
    (row,) = StudyStore(tmp_path).rows()
    cfg = load_config(tmp_path / row["run_dir"] / "config.yaml")
    assert cfg.model.path == str((tmp_path / "foundations" / "random-init").absolute())
    assert (tmp_path / "foundations" / "random-init" / "config.json").is_file() and _finite(row)


def test_a_relay_cell_records_the_cloud_alone_and_the_relay_bytes(tmp_path):
    """relay merge: the cloud alone after the run is the last relay's measurement (not round 0's),
    and the bytes the relay sent down are summed per link (not its per-node split)."""
    grid = [Cell("relay", "merge", "relay.policy", "merge", ("relay.policy=merge",))]
    run_study(TINY_YAML, tmp_path, SETS, grid=grid, isolate=False, log=lambda s: None)
    (row,) = StudyStore(tmp_path).rows()
    metrics = [json.loads(x) for x in (tmp_path / row["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    relay = metrics[-1]["relay"]
    assert row["cloud_alone"] == relay["cloud_after"] != row["eval_round0"] and _finite(row)
    sent = relay["bytes_down"]
    assert row["relay_bytes_down"] == sent["edge_cloud_down"] + sent["end_edge_down"] > 0


def test_the_end_actor_pool_does_not_change_a_cells_key():
    """A cell runs in one process: how devices would map onto actors (topology.end_workers) is not
    part of its identity, so a finished cell stays finished whatever the pool default is."""
    from gaisnet_ray.study.grid import resolve

    cell = GRID[0]
    keys = {resolve(cell, TINY_YAML, [*SETS, f"topology.end_workers={w}"])[1] for w in ("auto", "null", "2")}
    assert len(keys) == 1


def test_the_centralized_cell_at_hfsls_sequential_steps_halves_whatever_budget_is_set():
    """The control cell takes half the local steps the study resolves to: 2 of the study's 4, and
    4 when the user runs the grid at the default job's 8 (a fixed 2 would be a quarter there)."""
    from gaisnet_ray.study.grid import resolve

    cell = next(c for c in default_grid() if c.name == "schemes/centralized, hfsl's sequential steps")
    cfg, _ = resolve(cell, None, None)
    assert (cfg.training.scheme, cfg.training.local_steps) == ("centralized", 2)
    cfg, _ = resolve(cell, None, ["training.local_steps=8", "training.rounds=4"])
    assert (cfg.training.local_steps, cfg.training.rounds) == (4, 4)


def test_a_cell_that_finished_without_its_row_is_not_run_again(study, tmp_path):
    """Killed between a cell's result.json and its row: the next invocation writes the row from the
    cell's result, no run."""
    import shutil

    out, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    rows = StudyStore(copy).rows()
    (copy / STUDY_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))  # the fl row lost
    runs: list[str] = []
    _study(copy, runs)
    assert runs == []
    again = StudyStore(copy).rows()
    assert [r["cell"] for r in again] == ["schemes/hfsl", "schemes/fl", "clustering/size 1"]
    assert again[1]["eval"] == rows[1]["eval"] and again[1]["key"] == rows[1]["key"]


def test_rows_copied_without_their_run_folders_still_share_and_do_not_run(study, tmp_path):
    """study.jsonl copied alone into a new folder (the committed results, say): its runs are not
    repeated, and a cell that shares one of them takes that row's numbers."""
    out, _ = study
    rows = StudyStore(out).rows()
    (tmp_path / STUDY_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # no cells/ folder
    runs: list[str] = []
    _study(tmp_path, runs)
    assert runs == []
    shared = StudyStore(tmp_path).rows()[2]
    assert shared["cell"] == "clustering/size 1" and shared["shared_from"] == "schemes/hfsl"
    assert shared["eval"] == rows[0]["eval"] and shared["swept_key"] == "topology.cluster_size"


def test_a_failing_cell_does_not_stop_the_others(tmp_path, capsys):
    """A cell whose run fails (here: a cut the tiny model cannot take, found only when the cell's
    process builds the model) is reported with its log; the other cells still run; exit 1."""
    grid = [Cell("a", "broken", "topology.cut.front_layers", 9, ("topology.cut.front_layers=9",)),
            Cell("a", "fine", "training.scheme", "fl", ("training.scheme=fl",))]
    from gaisnet_ray.study import StudyError

    with pytest.raises(StudyError, match=r"1 cell\(s\) failed.*cell\.log"):
        run_study(TINY_YAML, tmp_path, SETS, grid=grid, log=lambda s: None)
    assert [r["cell"] for r in StudyStore(tmp_path).rows()] == ["a/fine"]
    assert (tmp_path / STUDY_PNG).is_file()
