"""A run folder whose newest knowledge version is damaged (cut in half, as an interrupted copy
leaves it): the served run loads the newest intact version and names paths relative to the run;
a run with no intact version at all is refused before Ray starts. ``gaisnet serve`` serving the
previous version and saying which one it skipped is in ``test_serve_cli.py`` (on a copy of the run it
trains there); the live app's side (health, hot swap never taking a damaged version) is in
``test_serve_hostile.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from conftest import free_port
from servecheck import damage, make_damaged_run


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """The serving tests' run folder (round 1: v1), plus v2 published and then cut in half."""
    return make_damaged_run(tmp_path_factory.mktemp("damaged") / "run")


def test_served_run_loads_the_newest_intact_version_and_names_paths_relative(hostile_run):
    from gaisnet_ray.inference.served import DamagedVersionError, ServedRun

    run = ServedRun(hostile_run)
    version, skipped = run.intact_version("global")
    assert version == 1 and list(skipped) == [2] and skipped[2].startswith("v0002: adapter_model.safetensors")
    assert run.skipped_versions("global") == skipped and run.verify("global", 1) is None
    model, loaded = run.load_model("global")
    assert loaded == 1
    with pytest.raises(DamagedVersionError, match="version 2 of 'global' is damaged: v0002"):
        run.load_model("global", 2)
    assert run.rel(hostile_run / "knowledge" / "bases" / "b0001") == "knowledge/bases/b0001"
    assert run.rel("/etc/passwd") == "passwd"
    assert run.redact(f"cannot read {hostile_run.resolve()}/knowledge/v0002/x") == "cannot read knowledge/v0002/x"


def test_serving_a_run_without_an_intact_version_fails_before_ray(hostile_run, tmp_path):
    from gaisnet_ray.config import load_config
    from gaisnet_ray.serve.app import serve_run_dir

    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("v0003", "v0004"))
    for v in ("v0000", "v0001"):  # v0002 is damaged already
        damage(run / "knowledge" / v / "adapter_model.safetensors")
    cfg = load_config(run / "config.yaml", [f"serve.port={free_port()}"])
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no intact knowledge version to serve: v0002: .*; v0001: .*; v0000: "):
        handle = serve_run_dir(run, cfg, blocking=False)
        handle.shutdown()  # only if the check failed to refuse
    assert time.monotonic() - started < 10
