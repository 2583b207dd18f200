"""Batching on real Ray Serve (``serve.batch_max_size``): concurrent requests to a tier share forward
passes (the tier's ``batching`` counters in /health), and each still gets exactly the answer it would
get alone: greedy tokens equal the in-process one-at-a-time generation, a seeded sampled request its
own sampled tokens, each edge adapter its own answer, a stream the same text as the whole answer.

One Serve app for the module over the small run folder the serving tests share (``servecheck``).
The batch wait is long (0.3 s) so that a burst of concurrent requests surely lands in one batch.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings

from conftest import free_port
from servecheck import PROMPT, make_run

pytestmark = pytest.mark.ray

PROMPTS = [PROMPT, "The", "3 km in m=", "hello", "7*8=", "abc"]
NEW = 8


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    from gaisnet_ray.serve.app import start_serving

    run_dir = make_run(tmp_path_factory.mktemp("serve-batch") / "run")
    settings = ServeSettings(port=free_port(), max_new_tokens=16, max_prompt_tokens=32, max_ongoing_requests=8,
                             max_queued_requests=8, batch_max_size=8, batch_wait_timeout_s=0.3, poll_interval_s=5)
    handle = start_serving(run_dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, http=client, run_dir=run_dir)
    client.close()
    handle.shutdown()


@pytest.fixture(scope="module")
def alone(app):
    """One-at-a-time generation in this process, per adapter (what each request must get)."""
    from gaisnet_ray.inference import CausalGenerator
    from gaisnet_ray.inference.served import ServedRun

    run = ServedRun(app.run_dir)
    gens = {}

    def generate(adapter: str, prompt: str, **kwargs):
        if adapter not in gens:
            gens[adapter] = CausalGenerator(run.load_model(adapter)[0], run.tokenizer, 32, 64)
        return gens[adapter].generate(prompt, **kwargs)

    return generate


def batching(app, tier: str) -> dict:
    return app.http.get("/health").json()["tiers"][tier]["batching"]


async def concurrent(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        rs = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


def test_concurrent_cloud_requests_share_forward_passes_and_keep_their_answers(app, alone):
    before = batching(app, "cloud")
    assert before["max_size"] == 8 and before["wait_timeout_s"] == 0.3
    bodies = [{"prompt": p, "tier": "cloud", "max_new_tokens": NEW} for p in PROMPTS]
    bodies.append({"prompt": PROMPT, "tier": "cloud", "max_new_tokens": NEW, "temperature": 1.0, "seed": 3})
    bodies.append({"prompt": "The", "tier": "cloud", "max_new_tokens": 3})
    answers = asyncio.run(concurrent(app.url, bodies))
    after = batching(app, "cloud")
    for body, got in zip(bodies, answers):
        kwargs = {k: body[k] for k in ("temperature", "seed") if k in body}
        want = alone("global", body["prompt"], max_new_tokens=body["max_new_tokens"], **kwargs)
        assert got["text"] == want.text and got["usage"]["completion_tokens"] == want.completion_tokens, (body, got)
    assert answers[-1]["usage"]["completion_tokens"] == 3
    rows = after["rows"] - before["rows"]
    forwards = after["forwards"] - before["forwards"]
    row_steps = after["row_steps"] - before["row_steps"]
    print(f"cloud batching: {after['batches'] - before['batches']} batches for {rows} requests, {forwards} forwards "
          f"for {row_steps} row-steps, largest {after['largest']}")
    assert rows == len(bodies) and after["largest"] >= 4  # the burst was batched ...
    assert row_steps >= sum(a["usage"]["completion_tokens"] for a in answers)  # a row-step per token (+ an eos)
    assert forwards < row_steps / 2  # ... and its rows shared forward passes


def test_edge_batches_per_adapter_and_streams_batched(app, alone):
    before = batching(app, "edge")
    bodies = [{"prompt": p, "adapter": a, "max_new_tokens": NEW} for a in ("edge-0", "edge-1") for p in PROMPTS[:4]]
    answers = asyncio.run(concurrent(app.url, bodies))
    after = batching(app, "edge")
    for body, got in zip(bodies, answers):
        assert got["adapter"] == body["adapter"]
        assert got["text"] == alone(body["adapter"], body["prompt"], max_new_tokens=NEW).text, (body, got)
    assert alone("edge-0", PROMPT, max_new_tokens=NEW).token_ids != alone("edge-1", PROMPT, max_new_tokens=NEW).token_ids
    assert after["rows"] - before["rows"] == len(bodies) and after["largest"] >= 2
    assert after["forwards"] - before["forwards"] < (after["row_steps"] - before["row_steps"]) / 2

    async def streams() -> list[str]:
        async def one(c, prompt):
            body = {"model": "edge-0", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
            return "".join(c["text"] for ln in lines for c in json.loads(ln[6:]).get("choices", []))

        async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS[:4]))

    texts = asyncio.run(streams())
    assert texts == [alone("edge-0", p, max_new_tokens=NEW, chat=False).text for p in PROMPTS[:4]]
    assert batching(app, "edge")["largest"] >= 2
