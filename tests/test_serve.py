"""Tiered inference on real Ray Serve over real HTTP (loopback): every endpoint, the official openai
client, routing (escalate / keep at the edge), split inference through the HTTP client equal to the
unsplit model, errors as 4xx/5xx JSON, overload as 503 + Retry-After, and a hot swap of the
knowledge version under a stream of requests that loses none. What needs no Ray (settings, the
version poller, deploy/serve_config.yaml) is in test_serve_offline.py.

One Serve app for the whole module (Serve starts and stops in seconds, replicas load torch), over a
run folder made in-process (no Ray training): a tiny GPT-2 whose foundation is left as initialised
(pre-training costs minutes on 2 cores) and one HFSL round of LoRA knowledge, global and per edge.
Such a model's answers are gibberish, which is fine here: the tests check the serving mechanics
against the same model computed in this process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings

from conftest import free_port
from servecheck import NEW_TOKENS, PROMPT, json_error, make_run, publish_scaled, wait_for

pytestmark = pytest.mark.ray

SESSION_TTL_S = 8.0  # split sessions idle this long are dropped (the replicas check every poll, 0.5 s)


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder (config.yaml, model/, knowledge/ with global and per-edge versions), no Ray."""
    out = make_run(tmp_path_factory.mktemp("serve") / "run")
    assert (out / "knowledge" / "edges" / "edge-0").is_dir()
    return out


@pytest.fixture(scope="module")
def calibration(run_dir):
    """Edge confidence of candidate prompts, computed here with the adapter the router will pick;
    a min-token-probability threshold between the most and least confident one makes the router's
    choice for both deterministic."""
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.inference import CausalGenerator, infer_domain
    from gaisnet_ray.inference.served import ServedRun

    run = ServedRun(run_dir)
    domains = ["arithmetic", "strings", "units", "facts"]
    by_domain = run.domain_adapters()
    prompts = [e.prompt for d in domains for e in sample_examples(d, "eval", 3, 0)] + ["The", "hello", PROMPT]
    models = {}
    scored = []
    for p in prompts:
        adapter = by_domain.get(infer_domain(p, domains), "global")
        if adapter not in models:
            model, _ = run.load_model(adapter)
            models[adapter] = CausalGenerator(model, run.tokenizer, 32, 64)
        g = models[adapter].generate(p, max_new_tokens=NEW_TOKENS)
        scored.append((g.min_token_prob, p, adapter))
    scored.sort()
    (low, unsure, _), (high, sure, _) = scored[0], scored[-1]
    assert high > 1.1 * low, f"no usable confidence gap among the test prompts: {scored}"
    return SimpleNamespace(confident=sure, unsure=unsure, threshold=(low * high) ** 0.5, scored=scored)


@pytest.fixture(scope="module")
def served(ray_local, run_dir, calibration):
    from gaisnet_ray.serve.app import start_serving

    settings = ServeSettings(
        port=free_port(), max_new_tokens=24, default_new_tokens=NEW_TOKENS, max_prompt_tokens=32,
        routing={"max_mean_entropy": 100.0, "min_token_prob": calibration.threshold},
        max_ongoing_requests=2, max_queued_requests=2, retry_after_s=2, poll_interval_s=0.5,
        split_session_ttl_s=SESSION_TTL_S,
    )
    handle = start_serving(run_dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, http=client, settings=settings, run_dir=run_dir)
    client.close()
    handle.shutdown()


# ------------------------------------------------------------------------- on Ray Serve
def test_health_and_models(served):
    r = served.http.get("/health")
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["status"] == "ok" and h["knowledge_version"] == 1 and h["served_version"] == 1
    assert set(h["tiers"]) == {"edge", "cloud", "end"}
    assert h["adapters"] == {"base": 1, "global": 1, "edge-0": 1, "edge-1": 1} and h["base_version"] == 1

    ids = [m["id"] for m in served.http.get("/v1/models").json()["data"]]
    assert ids[0] == "gaisnet"
    assert {"base", "global", "edge-0", "edge-1", "gaisnet:arithmetic", "gaisnet:units"} <= set(ids)


def test_generate_reports_tier_reason_and_version(served):
    def gen(**body):
        r = served.http.post("/v1/generate", json={"prompt": PROMPT, **body})
        assert r.status_code == 200, r.text
        return r

    cloud = gen(tier="cloud").json()
    assert (cloud["tier"], cloud["adapter"], cloud["version"], cloud["escalated"]) == ("cloud", "global", 1, False)
    assert cloud["reason"] == "tier hint 'cloud'" and cloud["usage"]["completion_tokens"] >= 1

    r = gen(adapter="edge-1")
    pinned = r.json()
    assert (pinned["tier"], pinned["adapter"], pinned["version"]) == ("edge", "edge-1", 1)
    assert r.headers["x-gaisnet-tier"] == "edge" and r.headers["x-gaisnet-adapter"] == "edge-1"

    base = gen(adapter="base").json()
    assert base["adapter"] == "base" and base["version"] == 1  # the base after round 1's relay (merge)

    routed = gen(prompt="3 km in m=", tier="edge").json()
    assert routed["domain"] == "units" and routed["adapter"] == served_domain_adapter(served, "units")
    assert "domain 'units'" in routed["reason"]


def served_domain_adapter(served, domain: str) -> str:
    from gaisnet_ray.inference.served import ServedRun

    return ServedRun(served.run_dir).domain_adapters().get(domain, "global")


def test_router_escalates_the_unsure_prompt_and_keeps_the_confident_one(served, calibration):
    sure = served.http.post("/v1/generate", json={"prompt": calibration.confident}).json()
    assert sure["tier"] == "edge" and not sure["escalated"], sure
    assert sure["reason"].startswith("edge confident")
    assert sure["confidence"]["min_token_prob"] >= calibration.threshold

    unsure = served.http.post("/v1/generate", json={"prompt": calibration.unsure}).json()
    assert unsure["tier"] == "cloud" and unsure["escalated"], unsure
    assert unsure["reason"].startswith("edge lowest token probability")
    attempt = unsure["edge_attempt"]
    assert attempt["confidence"]["min_token_prob"] < calibration.threshold

    hinted = served.http.post("/v1/generate", json={"prompt": calibration.unsure, "tier": "edge"}).json()
    assert hinted["tier"] == "edge" and not hinted["escalated"]  # the hint overrides the policy


def test_openai_client_completions_chat_and_streaming(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)

    assert "gaisnet" in [m.id for m in client.models.list()]
    done = client.completions.create(model="gaisnet", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"tier": "cloud"})
    reference = served.http.post("/v1/generate", json={"prompt": PROMPT, "tier": "cloud", "max_new_tokens": 6})
    assert done.choices[0].text == reference.json()["text"]
    assert done.usage.completion_tokens == reference.json()["usage"]["completion_tokens"]
    assert done.model_extra["gaisnet"]["tier"] == "cloud"

    raw = client.completions.with_raw_response.create(model="edge-0", prompt=PROMPT, max_tokens=4, temperature=0)
    assert raw.headers["x-gaisnet-tier"] == "edge" and raw.headers["x-gaisnet-adapter"] == "edge-0"

    chat = client.chat.completions.create(model="gaisnet", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=6, temperature=0, extra_body={"tier": "cloud"})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == done.choices[0].text

    pieces, finish, info = [], None, None
    for chunk in client.chat.completions.create(model="gaisnet", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=6, temperature=0, stream=True,
                                                extra_body={"tier": "cloud"}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        info = (chunk.model_extra or {}).get("gaisnet") or info
    assert "".join(pieces) == done.choices[0].text and finish in ("stop", "length")
    assert info["tier"] == "cloud" and info["version"] == 1

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gaisnet", prompt=PROMPT, max_tokens=6, temperature=0, stream=True, extra_body={"tier": "end"}))
    assert streamed == done.choices[0].text  # split inside the cluster: same global model, same tokens

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


def test_stream_over_raw_http_is_sse_ending_with_done(served):
    body = {"model": "gaisnet", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-gaisnet-tier"] in ("edge", "cloud")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []
    assert chunks[-2]["gaisnet"]["tier"] == r.headers["x-gaisnet-tier"]


def test_errors_are_json_with_4xx(served):
    post = served.http.post
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        json_error(post(path, content=b'{"prompt": "1+', headers={"content-type": "application/json"}), 400,
               "malformed_json")
    assert json_error(post("/v1/generate", json={"max_new_tokens": 3}), 422, "missing_field")["param"] == "prompt"
    assert json_error(post("/v1/chat/completions", json={"model": "gaisnet"}), 422)["param"] == "messages"
    assert "promt" in json_error(post("/v1/generate", json={"prompt": "1+", "promt": 1}), 422)["message"]
    assert json_error(post("/v1/generate", json={"prompt": "1+", "tier": "moon"}), 422)["param"] == "tier"
    assert json_error(post("/v1/completions", json={"model": "gaisnet", "prompt": "1+", "max_tokens": 999}),
                  422)["param"] == "max_tokens"
    assert json_error(post("/v1/completions", json={"model": "gaisnet", "prompt": "1+", "n": 2}), 400)["param"] == "n"
    json_error(post("/v1/completions", json={"model": "edge-7", "prompt": "1+"}), 404, "unknown_model")
    json_error(post("/v1/generate", json={"prompt": "1+", "adapter": "edge-7"}), 404, "unknown_model")
    json_error(post("/v1/generate", json={"prompt": "1+", "domain": "poetry"}), 404, "unknown_domain")
    json_error(post("/v1/generate", json={"prompt": "1+", "adapter": "edge-0", "tier": "cloud"}), 422,
           "conflicting_fields")
    long = "9" * 40
    for body, path in (({"prompt": long}, "/v1/generate"), ({"prompt": long, "tier": "end"}, "/v1/generate"),
                       ({"model": "gaisnet", "prompt": long, "stream": True}, "/v1/completions")):
        err = json_error(post(path, json=body), 413, "prompt_too_long")
        assert "41 tokens" in err["message"] and "limit is 32" in err["message"]
    json_error(served.http.get("/v1/nothing-here"), 404, "not_found")


def test_split_inference_over_http_gives_the_unsplit_greedy_tokens(served):
    from gaisnet_ray.inference import CausalGenerator
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.client import SplitClient

    run = ServedRun(served.run_dir)
    model, version = run.load_model("global")
    whole = CausalGenerator(model, run.tokenizer, 32, 64)
    client = SplitClient.from_run_dir(served.url, served.run_dir)
    assert client.version == version and client.info["front_layers"] == 1
    held = {n for n, _ in client.front.split.peft.named_parameters()}
    assert not any(".h.1." in n or ".h.3." in n for n in held)  # the device holds only its front
    for prompt in (PROMPT, "The", "3 km in m="):
        expected = whole.generate(prompt, max_new_tokens=20)
        got = client.generate_full(prompt, max_new_tokens=20)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert len(expected.token_ids) >= 2  # a real test: the model says something
    assert client.generate(PROMPT, max_new_tokens=5) == whole.generate(PROMPT, max_new_tokens=5).text
    client.close()


def test_split_endpoint_token_mode_and_errors(served):
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    def step(session, past, tensor=None, payload=None, out="token", **headers):
        h = {"x-gaisnet-session": session, "x-gaisnet-past-len": str(past), **headers}
        content = payload if payload is not None else tensor_to_bytes(tensor)
        return served.http.post("/v1/split/forward", params={"out": out}, content=content, headers=h)

    hidden = torch.randn(1, 3, 64)
    r = step("s-1", 0, hidden)
    assert r.status_code == 200, r.text
    assert r.json()["past_len"] == 3 and isinstance(r.json()["token"], int) and r.json()["version"] == 1
    assert step("s-1", 3, torch.randn(1, 1, 64)).json()["past_len"] == 4
    json_error(step("s-1", 9, torch.randn(1, 1, 64)), 409, "past_len_mismatch")
    json_error(step("s-2", 5, torch.randn(1, 1, 64)), 409, "unknown_session")
    json_error(step("s-3", 0, torch.randn(1, 3, 65)), 422, "bad_shape")
    json_error(step("s-4", 0, payload=b"not safetensors"), 400, "bad_payload")
    json_error(step("s-5", 0, torch.randn(1, 3, 64), **{"x-gaisnet-version": "99"}), 404, "unknown_version")
    json_error(step("s-6", 0, torch.randn(1, 80, 64)), 413, "context_exceeded")
    missing = served.http.post("/v1/split/forward", content=tensor_to_bytes(hidden))
    assert "x-gaisnet-session" in json_error(missing, 422)["message"]
    assert served.http.delete("/v1/split/sessions/s-1").status_code == 200
    json_error(served.http.delete("/v1/split/sessions/s-1"), 404, "unknown_session")


def test_an_idle_split_session_expires_after_its_ttl(served):
    """README "Serving": an idle split session (its KV cache) is dropped after serve.split_session_ttl_s;
    the device is told to start again. A session in use stays open past the TTL."""
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    def step(session, past, length=1):
        h = {"x-gaisnet-session": session, "x-gaisnet-past-len": str(past)}
        return served.http.post("/v1/split/forward", params={"out": "token"},
                                content=tensor_to_bytes(torch.randn(1, length, 64)), headers=h)

    assert step("idle", 0, 3).json()["past_len"] == 3
    assert step("busy", 0, 3).json()["past_len"] == 3
    started, past = time.monotonic(), 3
    while time.monotonic() - started < SESSION_TTL_S + 2:  # "busy" keeps stepping, "idle" does not
        r = step("busy", past)
        assert r.status_code == 200, r.text
        past = r.json()["past_len"]
        time.sleep(1.0)
    err = json_error(step("idle", 3), 409, "unknown_session")
    assert f"idle past {SESSION_TTL_S:g} s" in err["message"] and "start again with past_len 0" in err["message"]
    assert step("idle", 0, 3).json()["past_len"] == 3  # starting again works
    assert served.http.delete("/v1/split/sessions/busy").status_code == 200


def test_overload_gets_503_with_retry_after(served):
    """Cloud tier: 2 running + 2 queued per the settings; a burst of 24 concurrent requests."""

    async def burst():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as c:
            body = {"prompt": PROMPT, "tier": "cloud", "max_new_tokens": 24}
            return await asyncio.gather(*(c.post("/v1/generate", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert json_error(r, 503, "overloaded")["type"] == "overloaded_error"
            assert r.headers["retry-after"] == "2"
    assert served.http.post("/v1/generate", json={"prompt": PROMPT, "tier": "cloud"}).status_code == 200


def test_hot_swap_under_a_stream_of_requests_loses_none(served):
    seen: dict[str, list[tuple[int, int | None]]] = {"cloud": [], "edge": []}
    stop = threading.Event()

    def client(kind: str, body: dict):
        with httpx.Client(base_url=served.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 4, **body})
                seen[kind].append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=client, args=("cloud", {"tier": "cloud"})),
               threading.Thread(target=client, args=("edge", {"adapter": "global"}))]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen["cloud"]) >= 5 and len(seen["edge"]) >= 5, 60, "requests before the publish")
        publish_scaled(served.run_dir, 1, 2)
        published = (len(seen["cloud"]), len(seen["edge"]))
        wait_for(lambda: all(any(v == 2 for _, v in seen[k]) for k in seen), 60, "answers at version 2")
        wait_for(lambda: len(seen["cloud"]) >= published[0] + 10 and len(seen["edge"]) >= published[1] + 10, 60,
              "requests after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    for kind, rows in seen.items():
        assert all(code == 200 for code, _ in rows), (kind, [r for r in rows if r[0] != 200])
        versions = [v for _, v in rows]
        assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), (kind, versions)
    health = served.http.get("/health").json()
    assert health["knowledge_version"] == 2 and health["served_version"] == 2
    assert health["tiers"]["edge"]["adapters_loaded"]["global"] == 2
    assert health["tiers"]["cloud"]["poll"]["swaps"] >= 1
