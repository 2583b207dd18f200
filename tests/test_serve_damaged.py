"""A run folder whose newest knowledge version is damaged (cut in half, as an interrupted copy
leaves it): the served run loads the newest intact version and names paths relative to the run;
``gaisnet serve`` serves the previous version and says which one it skipped; a run with no intact
version at all is refused before Ray starts. The live app's side (health, hot swap never taking a
damaged version) is in ``test_serve_hostile.py``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from servecheck import PROMPT, damage, make_damaged_run


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


@pytest.mark.ray
def test_gaisnet_serve_serves_the_previous_version_of_a_damaged_run(hostile_run, tmp_path):
    """The CLI as a user runs it, on a copy of the run folder whose v0002 is cut in half."""
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("v0003", "v0004"))
    for v in ("v0003", "v0004"):  # what the swap test may have added to the shared folder
        assert not (run / "knowledge" / v).exists()
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gaisnet_ray", "serve", str(run), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def health():
            try:
                return httpx.get(f"{url}/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None

        deadline = time.monotonic() + 240
        while (h := health()) is None or h.get("served_version") is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert h["served_version"] == 1 and "2" in h["skipped_versions"]["global"], h
        r = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "tier": "cloud"}, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == 1
        while "OpenAI-compatible API under" not in (text := log.read_text()):  # announced once the app is up
            assert proc.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
        assert "(knowledge v0001) at" in text, text[-3000:]
        assert "skipped knowledge v0002, which fails verification (v0002: adapter_model.safetensors" in text, text
        assert "Traceback" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
