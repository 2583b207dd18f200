"""The serving app's Prometheus metrics (issue 13 item 5), read back from Ray's own metrics endpoint:
the local node's Prometheus export (``ray.nodes()[0]["MetricsExportPort"]``), as a Prometheus
server would scrape it. Requests and answers per tier, escalations by reason, a hot swap, the
queue gauge, tokens and generation seconds (tokens/s) and time to first token all show up with
the values the requests made. Ray's agent exports every ``metrics_report_interval_ms`` (10 s by
default), so the test polls for up to a minute.
"""

from __future__ import annotations

import re
import time
import urllib.request
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings
from gaisnet_ray.inference.routing import RouteDecision
from gaisnet_ray.serve.metrics import ServeMetrics, escalation_reason

from conftest import free_port
from servecheck import make_run, publish_scaled

SCRAPE_TIMEOUT_S = 60.0
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def test_escalation_reasons_are_fixed_signal_names():
    assert escalation_reason(RouteDecision("cloud", "edge lowest token probability 0.010 < 0.05", True)) == \
        "min_token_prob"
    assert escalation_reason(RouteDecision("cloud", "edge mean token entropy 3.1 > 2.5", True)) == "mean_entropy"
    assert escalation_reason(RouteDecision("cloud", "edge unsure: min_token_prob 0.1 not >= calibrated 0.3 "
                                                    "(edge-0 v0001, domain 'units')", True)) == "min_token_prob"
    assert escalation_reason(RouteDecision("cloud", "calibrated (edge-0 v0001, domain 'units'): the edge never "
                                                    "matches the cloud here", True)) == "calibrated_never"


def test_metrics_record_without_a_serve_replica():
    m = ServeMetrics()  # outside a replica Serve adds no labels; recording must not fail
    m.asked("edge")
    m.answered("edge", "kept", 5, 0.1, 0.2)
    with m.running("cloud"):
        assert m._depth["cloud"] == 1
    assert m._depth["cloud"] == 0


# ----------------------------------------------------------------------- on Ray Serve
@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """An app whose policy escalates every routed request (no edge token reaches probability 1)."""
    from gaisnet_ray.serve.app import start_serving

    run_dir = make_run(tmp_path_factory.mktemp("metrics") / "run")
    settings = ServeSettings(port=free_port(), max_new_tokens=16, default_new_tokens=6, max_prompt_tokens=32,
                             routing={"max_mean_entropy": 100.0, "min_token_prob": 1.0, "probe_tokens": 2},
                             poll_interval_s=0.5)
    handle = start_serving(run_dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, http=client, run_dir=run_dir)
    client.close()
    handle.shutdown()


def metrics_url(ray) -> str:
    """Where the local node's metrics agent serves Prometheus text (a scrape target)."""
    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """name -> [(labels, value)] of every sample."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        out.setdefault(m["name"], []).append((labels, float(m["value"])))
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


@pytest.mark.ray
def test_serving_metrics_reach_rays_prometheus_endpoint(served, ray_local):
    http = served.http
    routed = http.post("/v1/generate", json={"prompt": "12+3=", "max_new_tokens": 6}).json()
    assert routed["tier"] == "cloud" and routed["escalated"], routed
    edge = http.post("/v1/generate", json={"prompt": "12+3=", "tier": "edge", "max_new_tokens": 6}).json()
    body = {"model": "gaisnet", "prompt": "7+8=", "max_tokens": 6, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-gaisnet-tier"] == "cloud"
        r.read()
    publish_scaled(served.run_dir, 1, 2)  # a new global version: the cloud swaps to it

    url, want = metrics_url(ray_local), {
        ("ray_gaisnet_tier_requests_total", (("tier", "edge"),)): 3,  # 2 probes + the hinted request
        ("ray_gaisnet_tier_requests_total", (("tier", "cloud"),)): 2,  # the 2 escalations
        ("ray_gaisnet_answers_total", (("tier", "cloud"), ("route", "escalated"))): 2,
        ("ray_gaisnet_answers_total", (("tier", "edge"), ("route", "hint"))): 1,
        ("ray_gaisnet_escalations_total", (("reason", "min_token_prob"),)): 2,
        ("ray_gaisnet_swaps_total", (("tier", "cloud"), ("adapter", "global"))): 1,
        ("ray_gaisnet_time_to_first_token_seconds_count", (("tier", "cloud"),)): 1,
        ("ray_gaisnet_request_seconds_count", (("tier", "cloud"),)): 2,
    }
    deadline, missing = time.monotonic() + SCRAPE_TIMEOUT_S, want
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        samples = scrape(url)
        missing = {k: v for k, v in want.items() if total(samples, k[0], **dict(k[1])) < v}
        gauges = {lab["tier"] for lab, _ in samples.get("ray_gaisnet_queue_depth", [])}
        if not gauges >= {"ingress", "cloud"}:  # a gauge is exported on Ray's next report, after the counters
            missing = {**missing, ("ray_gaisnet_queue_depth", (("tier", "ingress+cloud"),)): 1}
    assert not missing, f"not exported within {SCRAPE_TIMEOUT_S:g} s: {missing}"

    tokens = total(samples, "ray_gaisnet_generated_tokens_total", tier="edge")
    assert tokens >= edge["usage"]["completion_tokens"]  # the hinted edge answer's tokens
    assert total(samples, "ray_gaisnet_generation_seconds_total", tier="cloud") > 0  # tokens/s = ratio of rates
    depth = samples["ray_gaisnet_queue_depth"]
    assert {lab["tier"] for lab, _ in depth} >= {"ingress", "cloud"} and all(v >= 0 for _, v in depth)
    labels = samples["ray_gaisnet_answers_total"][0][0]
    assert labels["deployment"] == "ingress" and labels["application"]  # Serve's own labels come along
