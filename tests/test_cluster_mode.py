"""Cluster mode (issue 5): the resource pre-check, and real multi-node Ray on this machine (the
deploy/ templates: ``test_cluster_templates.py``).

- The pre-check names what a cluster lacks (pure, no Ray); bad addresses fail in seconds (exit 2).
- A multi-node ``ray.cluster_utils.Cluster`` (head without tier resources + one node per tier, two
  edge nodes), in a subprocess of its own: ``GaisNetDriver.start()`` puts each actor on its tier's
  node, and with ``topology.<tier>.node_labels`` on the node those labels pick (the edge: one of two).
- A ``ray start --head`` cluster (token auth on): ``gaisnet submit`` runs a tiny job to the end and
  the run folder appears; ``gaisnet run --address`` with more edges than the cluster declares exits 2
  at once, naming ``gaisnet_edge``.

The pytest process never calls ``ray.init`` here (the session's local Ray lives in conftest.py):
every cluster is started, used and stopped by processes this module starts, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from gaisnet_ray.config import load_config
from gaisnet_ray.tiers import TIER_RESOURCES

from conftest import free_ports, small_job
from tinycfg import TINY_YAML

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TIER_LABEL = "gaisnet/tier"
TINY = small_job("topology.edges=1", "data.eval_samples_per_domain=8", "relay.policy=none",
                 "run.actor_timeout_s=120")


def _env(**extra: str) -> dict[str, str]:
    """A clean environment for a child: no inherited cluster address or auth settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    bin_dir = str(Path(sys.executable).parent)  # `gaisnet` and `ray` of this environment first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def _gaisnet(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gaisnet_ray", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """End a child started with start_new_session, then whatever is left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test created, nothing else
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


# ------------------------------------------------------------------------ pre-check (no Ray needed)
def _node(resources: dict, labels: dict | None = None, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": 4.0, **resources}, "Labels": labels or {}}


def _problems(overrides: list[str], nodes: list[dict], training: bool = True, serving: bool = False):
    from gaisnet_ray.cluster import required_resources
    from gaisnet_ray.cluster.preflight import demands, placement_problems, resource_error_message

    cfg = load_config(TINY_YAML, overrides)
    need = required_resources(cfg, training, serving)
    problems = placement_problems(need, demands(cfg, training, serving), nodes)
    return problems, resource_error_message("10.0.0.1:6379", need, problems, nodes)


TIER_NODES = [_node({"gaisnet_cloud": 1}, {TIER_LABEL: "cloud"}), _node({"gaisnet_edge": 2}, {TIER_LABEL: "edge"}),
              _node({"gaisnet_end": 6}, {TIER_LABEL: "end"})]


def test_precheck_passes_a_cluster_that_declares_every_tier():
    assert _problems([], TIER_NODES)[0] == []
    pinned = [f"topology.{t}.node_labels={{{TIER_LABEL}: {t}}}" for t in TIER_RESOURCES]
    assert _problems(pinned, TIER_NODES)[0] == []


def test_precheck_names_a_missing_tier_resource_and_how_to_declare_it():
    nodes = [_node({}), TIER_NODES[0], TIER_NODES[2], _node({"gaisnet_edge": 2}, alive=False)]  # edge node dead
    problems, message = _problems([], nodes)
    assert problems == ["gaisnet_edge: the run needs 2, the cluster declares 0"]
    assert "ray start --address=10.0.0.1:6379 --resources='{\"gaisnet_edge\": 2}'" in message
    assert "--labels='gaisnet/tier=edge'" in message and "docs/cluster.md" in message
    problems, _ = _problems(["topology.edges=3", "topology.devices_per_edge=2"], TIER_NODES)
    assert problems == ["gaisnet_edge: the run needs 3, the cluster declares 2 (on 1 node)"]


def test_precheck_checks_each_actor_shape_and_its_labels():
    # a GPU on the wrong node: the cloud's tier resource and the GPU must be on one node
    nodes = [_node({"GPU": 1.0}), *TIER_NODES]
    problems, _ = _problems(["topology.cloud.num_gpus=1"], nodes)
    assert len(problems) == 1 and "cloud actor" in problems[0] and "also has what one asks for" in problems[0]
    # labels no node declaring the tier resource has
    problems, _ = _problems(["topology.edge.node_labels={zone: b}"], TIER_NODES)
    assert len(problems) == 1 and "topology.edge.node_labels" in problems[0] and "zone=b" in problems[0]
    # serving alone needs a little of each tier resource, on any node
    problems, _ = _problems([], [_node({"gaisnet_cloud": 1, "gaisnet_edge": 1})], training=False, serving=True)
    assert problems == ["gaisnet_end: the run needs 1, the cluster declares 0"]


def test_label_selector_operators():
    from gaisnet_ray.cluster.preflight import label_matches

    node = {TIER_LABEL: "edge", "zone": "b"}
    assert label_matches(node, {TIER_LABEL: "edge"}) and not label_matches(node, {TIER_LABEL: "end"})
    assert label_matches(node, {"zone": "in(a, b)"}) and not label_matches(node, {"zone": "!in(a,b)"})
    assert label_matches(node, {"zone": "!c"}) and not label_matches(node, {"zone": "!b"})
    assert not label_matches(node, {"rack": "r1"}) and label_matches(node, {"rack": "!r1"})


def test_address_comes_from_the_flag_then_ray_address(monkeypatch):
    from gaisnet_ray.cluster import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None and resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(None) == "10.0.0.2:6379"
    assert resolve_address("local") is None  # the flag wins, and 'local' forces local dev mode


def test_unusable_addresses_exit_2_in_seconds(tmp_path):
    (closed,) = free_ports(1)
    env = _env()
    started = time.monotonic()
    r = _gaisnet("run", str(TINY_YAML), "--address", f"127.0.0.1:{closed}", "--out", str(tmp_path / "x"), env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"no Ray cluster answers at 127.0.0.1:{closed}" in r.stderr
    assert not (tmp_path / "x" / "knowledge").exists()
    r = _gaisnet("run", str(TINY_YAML), "--address", "http://127.0.0.1:8265", env=env, timeout=120)
    assert r.returncode == 2 and "gaisnet submit --address http://127.0.0.1:8265" in r.stderr, r.stderr[-2000:]
    # submit: the config is validated here first (nothing submitted), then the Jobs API is asked for
    r = _gaisnet("submit", "--set", "training.roundz=1", "--address", f"http://127.0.0.1:{closed}", env=env,
                 timeout=120)
    assert r.returncode == 2 and "unknown config key 'training.roundz'" in r.stderr, r.stderr[-2000:]
    r = _gaisnet("submit", "--address", f"http://127.0.0.1:{closed}", "--out", str(tmp_path / "y"), env=env,
                 timeout=120)
    assert r.returncode == 2 and f"no Ray Jobs API at http://127.0.0.1:{closed}" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - started < 90


# ------------------------------------------------------------------- multi-node ray.cluster_utils
PLACEMENT_SCRIPT = textwrap.dedent('''
    """Start a multi-node Ray (head + a node per tier), place GaisNet's actors, print where they landed."""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    tiny, out = json.loads(sys.argv[1]), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {"head": cluster.head_node}
    for name, res, labels in [
        ("cloud", {"gaisnet_cloud": 2}, {"gaisnet/tier": "cloud"}),
        ("edge-a", {"gaisnet_edge": 2}, {"gaisnet/tier": "edge", "zone": "a"}),
        ("edge-b", {"gaisnet_edge": 2}, {"gaisnet/tier": "edge", "zone": "b"}),
        ("end", {"gaisnet_end": 2}, {"gaisnet/tier": "end"}),
    ]:
        nodes[name] = cluster.add_node(num_cpus=1, resources=res, labels=labels, wait=False)
    from gaisnet_ray.config import load_config  # torch loads while the nodes come up
    from gaisnet_ray.driver import GaisNetDriver

    cluster.wait_for_nodes()
    where = {n.node_id: name for name, n in nodes.items()}

    def node_of(actor):
        return where.get(ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())))

    result, errors = {}, []
    try:
        ray.init(address=cluster.address, namespace="gaisnet", configure_logging=False, log_to_driver=False)
        # one driver: the cloud placed by its tier resource alone (the head has none), the end by its
        # node labels too, the edge pinned by labels to zone a of the two edge nodes (by its resource
        # alone it could land on either)
        overrides = ["topology.edge.node_labels={zone: a}", "topology.end.node_labels={gaisnet/tier: end}"]
        try:
            driver = GaisNetDriver(load_config(sys.argv[3], tiny + overrides), f"{out}/run")
            try:
                driver.start()
                result = {"cloud": [node_of(driver.cloud)], "edge": [node_of(a) for a in driver.edges.values()],
                          "end": [node_of(a) for a in driver.devices.values()]}
            finally:
                driver.close()
        except BaseException as e:
            errors.append(repr(e))
        print("RESULT " + json.dumps({"placed": result, "errors": errors}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


def test_actors_land_on_their_tier_nodes_of_a_multi_node_cluster(tmp_path):
    script = tmp_path / "place.py"
    script.write_text(PLACEMENT_SCRIPT)
    ray_tmp = tempfile.mkdtemp(prefix="gn", dir="/tmp")  # short: Ray's socket paths live under it
    env = _env(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(TINY), str(tmp_path / "runs"), str(TINY_YAML)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        _kill_group(proc, grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert not result["errors"], result["errors"]
    # each actor on the node of its tier, the edge on the one its labels pick; the head (no tier
    # resource) holds none
    placed = result["placed"]
    assert placed == {"cloud": ["cloud"], "edge": ["edge-a"], "end": ["end"]}, placed


# --------------------------------------------------------------------------- `ray start` + Jobs API
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node cluster from `ray start --head --block` (token auth on) declaring one edge unit;
    stopped by its pid (and its process group), never by `ray stop`."""
    gcs, dash, client, agent, metrics = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="gh", dir="/tmp")
    log = tmp_path_factory.mktemp("head") / "head.log"
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    resources = {"gaisnet_cloud": 1, "gaisnet_edge": 1, "gaisnet_end": 1}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}",
           f"--port={gcs}", "--num-cpus=2", f"--resources={json.dumps(resources)}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", "--disable-usage-stats"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"jobs": url, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        _kill_group(proc, grace_s=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_runs_a_job_on_the_cluster_and_writes_the_run_folder(ray_head, tmp_path):
    run_dir = tmp_path / "submitted"
    r = _gaisnet("submit", str(TINY_YAML), "--address", ray_head["jobs"], "--out", str(run_dir), *_sets(TINY),
                 env=ray_head["env"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "submitted job raysubmit_" in r.stdout and "SUCCEEDED" in r.stdout
    assert f"run folder: {run_dir}" in r.stdout  # the job's own `gaisnet run` output, followed here
    assert (run_dir / "knowledge" / "v0001").is_dir() and (run_dir / "metrics.jsonl").is_file()
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["cluster"] == "cluster" and summary["final_version"] == 1


def test_run_against_a_cluster_short_of_edges_fails_at_once(ray_head, tmp_path):
    started = time.monotonic()
    r = _gaisnet("run", str(TINY_YAML), "--address", ray_head["gcs"], "--out", str(tmp_path / "short"),
                 *_sets(TINY + ["topology.edges=2"]), env=ray_head["env"], timeout=120)
    elapsed = time.monotonic() - started
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert "gaisnet_edge: the run needs 2, the cluster declares 1" in r.stderr
    assert "ray start --address=" in r.stderr and "gaisnet_edge" in r.stderr
    assert elapsed < 60  # not the placement timeout (run.actor_timeout_s=120)
    assert not (tmp_path / "short" / "knowledge").exists()
