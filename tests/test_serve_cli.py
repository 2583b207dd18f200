"""The serving CLI as a user runs it, in subprocesses with their own local Ray:

- ``gaisnet run --serve``: the app comes up after the first knowledge version, a stream of requests
  during training loses none and sees each new version (hot swap), and after the last round the final
  version is served until SIGTERM, which ends the command cleanly (exit 0).
- ``gaisnet serve RUN_DIR``: serves that finished run folder (its newest version damaged: the one
  before it, naming the one skipped); a taken port or a folder that is not a run exits 2 at once,
  naming the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import small_job
from servecheck import damage
from tinycfg import TINY_YAML

pytestmark = pytest.mark.ray

ROUNDS = 3
TINY = small_job(f"training.rounds={ROUNDS}", "run.progress=true", "serve.poll_interval_s=0.3",
                 "serve.edge.num_cpus=0.25", "serve.cloud.num_cpus=0.25")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "gaisnet_ray", *args], stdout=out, stderr=subprocess.STDOUT,
                            text=True)


def _wait(cond, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _announced(log: Path, url: str) -> bool:
    """Our CLI's own announcement line; Ray Serve's "Application ... is ready at URL" comes earlier and must not count."""
    return f") at {url} (OpenAI-compatible" in log.read_text()


def _stop(proc: subprocess.Popen, log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no clean exit within 120 s of SIGTERM:\n{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """`gaisnet run --serve` with a client streaming requests through training; returns what it saw."""
    base = tmp_path_factory.mktemp("runserve")
    run_dir, log, port = base / "run", base / "run.log", _free_port()
    proc = _cli("run", str(TINY_YAML), "--serve", "--out", str(run_dir), "--no-progress", "--set", f"serve.port={port}",
                *[a for kv in TINY for a in ("--set", kv)], log=log)
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, object]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json={"prompt": "12+", "max_new_tokens": 4, "tier": "cloud"})
                seen.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))

    try:
        _wait(lambda: _announced(log, url), 600, "the serving announcement", proc, log)
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        _wait(lambda: (run_dir / "run.json").is_file(), 600, "the end of training", proc, log)
        _wait(lambda: seen and seen[-1][1] == ROUNDS, 60, f"answers at version {ROUNDS}", proc, log)
        stop.set()
        thread.join(timeout=60)
        health = httpx.get(f"{url}/health", timeout=60).json()
        rc = _stop(proc, log)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    return run_dir, seen, health, rc, log


def test_run_serve_hot_swaps_every_version_while_training_and_loses_no_request(served_run):
    run_dir, seen, health, rc, log = served_run
    assert rc == 0, log.read_text()[-3000:]
    assert seen and all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:5]
    versions = [v for _, v in seen]
    assert versions == sorted(versions), versions  # never an older version after a newer one
    assert len(set(versions)) >= 2 and versions[-1] == ROUNDS, sorted(set(versions))
    assert health["knowledge_version"] == ROUNDS and health["served_version"] == ROUNDS
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["final_version"] == ROUNDS  # training finished and wrote its folder while serving
    assert "stopping" in log.read_text()


def test_serve_a_finished_run_folder_whose_newest_version_is_damaged(served_run, tmp_path):
    """`gaisnet serve` on a copy of the finished run whose newest global version is cut in half (as an
    interrupted copy leaves it): it serves the previous version, says which one it skipped, and the
    --set override reaches the deployments."""
    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    damage(run_dir / "knowledge" / f"v{ROUNDS:04d}" / "adapter_model.safetensors")
    port, log = _free_port(), tmp_path / "serve.log"
    proc = _cli("serve", str(run_dir), "--port", str(port), "--set", "serve.default_new_tokens=3", log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        # the skip line is printed right after the announcement: wait for both, not only the first
        _wait(lambda: _announced(log, url) and "skipped knowledge" in log.read_text(), 300,
              "the serving announcement", proc, log)
        text = log.read_text()
        assert f"(knowledge v{ROUNDS - 1:04d}) at" in text, text[-3000:]
        assert (f"skipped knowledge v{ROUNDS:04d}, which fails verification "
                f"(v{ROUNDS:04d}: adapter_model.safetensors") in text, text[-3000:]
        assert "Traceback" not in text
        health = httpx.get(f"{url}/health", timeout=60).json()
        assert health["served_version"] == ROUNDS - 1 and str(ROUNDS) in health["skipped_versions"]["global"], health
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]]
        assert {"gaisnet", "base", "global", "edge-0", "edge-1"} <= set(ids)
        bodies = []
        for prompt in ("7+", "The", "a b c", "1 2"):  # an answer may end at EOS before the budget
            r = httpx.post(f"{url}/v1/completions", json={"model": "global", "prompt": prompt}, timeout=60)
            assert r.status_code == 200, r.text
            bodies.append(r.json())
        # the --set override reached the deployments: no answer longer than 3 tokens, and the ones cut
        # by the budget (finish_reason "length") exactly 3
        tokens = [(b["usage"]["completion_tokens"], b["choices"][0]["finish_reason"]) for b in bodies]
        assert all(n <= 3 for n, _ in tokens) and any(f == "length" for _, f in tokens), tokens
        assert all(n == 3 for n, f in tokens if f == "length"), tokens
        assert all(b["gaisnet"]["version"] == ROUNDS - 1 for b in bodies)  # the intact one before the damaged
    finally:
        rc = _stop(proc, log) if proc.poll() is None else proc.returncode
    assert rc == 0, log.read_text()[-3000:]


def test_serve_rejects_a_taken_port_and_a_folder_that_is_not_a_run(served_run, tmp_path):
    run_dir = served_run[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "gaisnet_ray", "serve", str(run_dir), "--port", str(port)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and f"127.0.0.1:{port}" in p.stderr, p.stderr
    assert time.monotonic() - started < 60  # refused before Ray started
    p = subprocess.run([sys.executable, "-m", "gaisnet_ray", "serve", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "not a run folder" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "gaisnet_ray", "serve", str(run_dir), "--set", "serve.portt=1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "serve.portt" in p.stderr, p.stderr
