"""Streaming end to end through the tier router (issue 13 item 2).

Ray-free first: the router's cascade over scripted tier streams (fake handles), which pins the
decision rules: the edge's probe (first k tokens) decides before any text goes out; kept, the
probe's text and then the rest of the same edge stream go out as they come; escalated, the cloud
streams and the edge stream is cancelled; the cloud over its limit keeps the edge answer;
non-streamed requests decide on the same probe. Then on real Ray Serve over HTTP: a kept edge answer
and an escalated one both arrive token by token, the first SSE chunk's ``gaisnet`` names the
answering tier, and streamed text equals the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings
from gaisnet_ray.inference.generate import Confidence, Generation
from gaisnet_ray.serve.catalog import Catalog
from gaisnet_ray.serve.errors import ServeError, overloaded
from gaisnet_ray.serve.router import TierRouter
from gaisnet_ray.serve.slots import GenerationRequest, StreamStart, TierAnswer

from conftest import free_port
from servecheck import make_run

K = 3  # probe tokens in the Ray-free tests


# ------------------------------------------------------------------------ fakes (no Ray)
class FakeStream:
    """A scripted tier stream with ``DeploymentResponseGenerator``'s surface: async iteration, cancel()."""

    def __init__(self, items: list, fail: Exception | None = None):
        self.items, self.fail, self.cancelled, self.read = list(items), fail, False, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.fail is not None:
            raise self.fail
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        self.read += 1
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeTier:
    """A deployment handle: ``options(...)``, ``stream.remote(req)``, ``generate.remote(req)``,
    ``record_escalation.remote(record)``; remembers what it was asked."""

    def __init__(self, name: str, script=None, fail: Exception | None = None):
        self.name, self.script, self.fail = name, script, fail
        self.asked: list[GenerationRequest] = []
        self.streams: list[FakeStream] = []
        self.records: list = []
        self.adapter = None
        self.stream = SimpleNamespace(remote=self._stream)
        self.record_escalation = SimpleNamespace(remote=self.records.append)

    def options(self, multiplexed_model_id: str | None = None, stream: bool = False):
        if multiplexed_model_id is not None:
            self.adapter = multiplexed_model_id
        return self

    def _stream(self, req: GenerationRequest) -> FakeStream:
        self.asked.append(req)
        s = FakeStream(self.script(req) if self.script else [], self.fail)
        self.streams.append(s)
        return s


def gen(text: str, n: int, prob: float) -> Generation:
    return Generation(text, list(range(n)), "length", 3, n, 0.5, prob)


def edge_script(prob: float, pieces=("a", "b", "c", "d", "e")):
    """The edge: StreamStart, one delta per token, the Confidence after K tokens, the answer."""
    def script(req: GenerationRequest) -> list:
        items = [StreamStart("edge", "edge-0", 1)]
        for i, p in enumerate(pieces, 1):
            items.append(p)
            if i == req.probe_tokens:
                items.append(Confidence(i, 0.5, prob))
        items.append(TierAnswer("edge", "edge-0", 1, gen("".join(pieces), len(pieces), prob), 0.1))
        return items
    return script


def cloud_script(req: GenerationRequest) -> list:
    return [StreamStart("cloud", "global", 1), "X", "Y", TierAnswer("cloud", "global", 1, gen("XY", 2, 0.9), 0.2)]


class RecordingMetrics:
    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name == "running":
            from contextlib import nullcontext
            return lambda tier: nullcontext()
        return lambda *args: self.calls.append((name, *args))


def fake_router(edge: FakeTier, cloud: FakeTier, *, learn: bool = False) -> TierRouter:
    """A ``TierRouter`` over fake tiers and a fixed catalog (no run folder): the routing code as is."""
    r = TierRouter.__new__(TierRouter)
    r.edge, r.cloud, r.end = edge, cloud, FakeTier("end")
    r.settings = ServeSettings(routing={"min_token_prob": 0.5, "max_mean_entropy": 100.0, "probe_tokens": K},
                               learn_from_escalations=learn)
    from gaisnet_ray.inference.routing import RoutingPolicy
    r.policy = RoutingPolicy(max_mean_entropy=100.0, min_token_prob=0.5)
    r.run = SimpleNamespace(routing_table=lambda adapter, version: None)
    r._catalog = Catalog(["base", "global", "edge-0"], {"base": 1, "global": 1, "edge-0": 1}, {},
                         {"arithmetic": "edge-0"}, ["arithmetic"], read_at=float("inf"))
    r.metrics = RecordingMetrics()
    return r


REQ = GenerationRequest("12+3=", 5, chat=False)


def run(coro):
    return asyncio.run(coro)


async def drain(items) -> list:
    return [item async for item in items]


# ------------------------------------------------------------------------------ Ray-free
def test_a_confident_probe_streams_the_same_edge_generation_on():
    edge, cloud = FakeTier("edge", edge_script(0.9)), FakeTier("cloud", cloud_script)
    router = fake_router(edge, cloud)

    async def go():
        route, items = await router.route_stream(REQ, tier=None, domain=None, adapter=None)
        # decided before any text reached the client: only the probe (K tokens) was read from the edge
        assert edge.streams[0].read == 1 + K + 1  # StreamStart, K deltas, the Confidence
        return route, await drain(items)

    route, items = run(go())
    assert edge.asked[0].probe_tokens == K and edge.adapter == "edge-0"
    assert route.kind == "kept" and route.head()["tier"] == "edge" and not route.head()["escalated"]
    assert route.decision.reason.startswith("edge confident") and "domain 'arithmetic'" in route.decision.reason
    assert items[0] == StreamStart("edge", "edge-0", 1)
    assert items[1:-1] == ["a", "b", "c", "d", "e"]  # every delta, one by one; the Confidence stays inside
    assert isinstance(items[-1], TierAnswer) and items[-1].generation.text == "abcde"
    assert cloud.asked == [] and not edge.streams[0].cancelled


def test_an_unsure_probe_escalates_the_cloud_streams_and_the_edge_stops():
    edge, cloud = FakeTier("edge", edge_script(0.1)), FakeTier("cloud", cloud_script)
    router = fake_router(edge, cloud)
    route, items = run(_stream(router))
    assert route.kind == "escalated" and route.decision.escalated and route.decision.tier == "cloud"
    head = route.head()
    assert (head["tier"], head["adapter"], head["version"]) == ("cloud", "global", 1)
    attempt = head["edge_attempt"]
    assert attempt["text"] == "abc" and attempt["adapter"] == "edge-0"  # the probe: K tokens of text
    assert attempt["confidence"]["min_token_prob"] == 0.1
    assert edge.streams[0].cancelled  # the edge generation stops after its probe
    assert cloud.asked[0].probe_tokens is None  # the cloud answers the request as asked
    assert items == cloud_script(REQ)
    assert ("escalated", "min_token_prob") in router.metrics.calls
    assert ("asked", "edge") in router.metrics.calls and ("asked", "cloud") in router.metrics.calls


async def _stream(router, req=REQ):
    route, items = await router.route_stream(req, tier=None, domain=None, adapter=None)
    return route, await drain(items)


def test_the_cloud_over_its_limit_keeps_the_edge_answer_and_its_stream():
    edge = FakeTier("edge", edge_script(0.1))
    cloud = FakeTier("cloud", cloud_script, fail=overloaded("cloud queue full", 1.0))
    router = fake_router(edge, cloud)
    route, items = run(_stream(router))
    assert route.kind == "fallback" and route.head()["tier"] == "edge" and not route.decision.escalated
    assert "cloud is unavailable" in route.decision.reason
    assert items[1:-1] == ["a", "b", "c", "d", "e"] and items[-1].generation.text == "abcde"
    assert not edge.streams[0].cancelled


def test_a_cloud_error_that_is_not_overload_fails_the_request_and_stops_the_edge():
    edge = FakeTier("edge", edge_script(0.1))
    cloud = FakeTier("cloud", cloud_script, fail=ServeError(413, "prompt_too_long", "too long"))
    router = fake_router(edge, cloud)
    with pytest.raises(ServeError, match="too long"):
        run(_stream(router))
    assert edge.streams[0].cancelled


def test_an_answer_shorter_than_the_probe_is_judged_whole():
    edge, cloud = FakeTier("edge", edge_script(0.9, pieces=("a", "b"))), FakeTier("cloud", cloud_script)
    route, items = run(_stream(fake_router(edge, cloud)))
    assert route.kind == "kept" and items[1:-1] == ["a", "b"] and items[-1].generation.text == "ab"


def test_non_streamed_requests_decide_on_the_same_probe_and_hand_back_escalations():
    for prob, tier in ((0.9, "edge"), (0.1, "cloud")):
        edge, cloud = FakeTier("edge", edge_script(prob)), FakeTier("cloud", cloud_script)
        router = fake_router(edge, cloud, learn=True)
        routed = run(router.route(REQ, tier=None, domain=None, adapter=None))
        streamed_route, _ = run(_stream(fake_router(FakeTier("edge", edge_script(prob)), FakeTier("c", cloud_script))))
        assert routed.answer.tier == tier == streamed_route.head()["tier"]
        answered = [c for c in router.metrics.calls if c[0] == "answered"]
        assert answered and answered[0][1:3] == (tier, "kept" if tier == "edge" else "escalated")
        if tier == "cloud":  # the cloud's answer goes back to the edge that escalated (E's store)
            (record,) = edge.records
            assert (record.edge, record.answer, record.prompt) == ("edge-0", "XY", REQ.prompt)
        else:
            assert edge.records == []


# ----------------------------------------------------------------------- on Ray Serve
PROBE = 4  # the served app's serve.routing.probe_tokens
STREAM_TOKENS = 12  # long enough that a kept answer goes on after its probe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("stream") / "run")


@pytest.fixture(scope="module")
def probes(run_dir):
    """The probe confidence (first PROBE tokens, raw completion prompts as /v1/completions sends them)
    of candidate prompts with the adapter the router picks; a min-token-probability threshold between the
    most and the least confident makes the router keep one and escalate the other."""
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.inference import CausalGenerator, infer_domain
    from gaisnet_ray.inference.served import ServedRun

    run = ServedRun(run_dir)
    domains = ["arithmetic", "strings", "units", "facts"]
    by_domain, models, scored = run.domain_adapters(), {}, []
    for p in [e.prompt for d in domains for e in sample_examples(d, "eval", 3, 0)] + ["The", "hello", "12+"]:
        adapter = by_domain.get(infer_domain(p, domains), "global")
        if adapter not in models:
            models[adapter] = CausalGenerator(run.load_model(adapter)[0], run.tokenizer, 32, 64)
        items = list(models[adapter].stream(p, max_new_tokens=STREAM_TOKENS, chat=False, probe_tokens=PROBE))
        probe, whole = next((i for i in items if isinstance(i, Confidence)), None), items[-1]
        if probe is not None and whole.completion_tokens > PROBE + 1:  # a kept answer goes on after its probe
            scored.append((probe.min_token_prob, p))
    scored.sort()
    (low, unsure), (high, sure) = scored[0], scored[-1]
    assert high > 1.1 * low, f"no usable confidence gap among the test prompts: {scored}"
    return SimpleNamespace(confident=sure, unsure=unsure, threshold=(low * high) ** 0.5)


@pytest.fixture(scope="module")
def served(ray_local, run_dir, probes):
    from gaisnet_ray.serve.app import start_serving

    settings = ServeSettings(port=free_port(), max_new_tokens=24, default_new_tokens=8, max_prompt_tokens=32,
                             routing={"max_mean_entropy": 100.0, "min_token_prob": probes.threshold,
                                      "probe_tokens": PROBE}, poll_interval_s=0.5)
    handle = start_serving(run_dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, http=client)
    client.close()
    handle.shutdown()


def sse_stream(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Headers, list[dict], list[float]]:
    """The chunks of one SSE answer and when each arrived (seconds from the request)."""
    started, chunks, arrived = time.perf_counter(), [], []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
                arrived.append(time.perf_counter() - started)
    return r.headers, chunks, arrived


@pytest.mark.ray
def test_a_kept_edge_answer_streams_token_by_token_naming_its_tier_first(served, probes):
    body = {"model": "gaisnet", "prompt": probes.confident, "max_tokens": STREAM_TOKENS, "temperature": 0}
    headers, chunks, arrived = sse_stream(served.http, "/v1/completions", body)
    head = chunks[0]["gaisnet"]
    assert head["tier"] == "edge" and not head["escalated"] and head["edge_attempt"] is None, head
    assert head["reason"].startswith("edge confident") and headers["x-gaisnet-tier"] == "edge"
    texts = [c["choices"][0]["text"] for c in chunks[1:] if c["choices"] and c["choices"][0]["text"]]
    assert len(texts) > PROBE, texts  # token by token, not the whole answer as one piece
    whole = served.http.post("/v1/completions", json=body).json()
    assert whole["gaisnet"]["tier"] == "edge"  # the same probe decides a non-streamed request
    assert "".join(texts) == whole["choices"][0]["text"]
    assert chunks[-1]["gaisnet"]["tier"] == "edge" and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.ray
def test_an_escalated_answer_streams_from_the_cloud_naming_it_first(served, probes):
    body = {"model": "gaisnet", "prompt": probes.unsure, "max_tokens": STREAM_TOKENS, "temperature": 0}
    headers, chunks, _ = sse_stream(served.http, "/v1/completions", body)
    head = chunks[0]["gaisnet"]
    assert head["tier"] == "cloud" and head["escalated"] and headers["x-gaisnet-escalated"] == "true", head
    assert head["edge_attempt"]["confidence"]["min_token_prob"] < probes.threshold
    texts = [c["choices"][0]["text"] for c in chunks[1:] if c["choices"] and c["choices"][0]["text"]]
    cloud = served.http.post("/v1/completions", json={**body, "tier": "cloud"}).json()
    assert "".join(texts) == cloud["choices"][0]["text"] and len(texts) == len([t for t in texts if t])
    assert len(texts) > 1 or cloud["usage"]["completion_tokens"] <= 1
    assert chunks[-1]["gaisnet"]["tier"] == "cloud" and chunks[-1]["gaisnet"]["edge_attempt"]["text"] == \
        head["edge_attempt"]["text"]


@pytest.mark.ray
def test_the_openai_client_sees_the_tier_in_the_first_chat_chunk(served, probes):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gaisnet", messages=[{"role": "user", "content": probes.unsure}], max_tokens=8, temperature=0,
        stream=True))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and first.model_extra["gaisnet"]["tier"] in ("edge", "cloud")
    assert chunks[-1].model_extra["gaisnet"]["tier"] == first.model_extra["gaisnet"]["tier"]
