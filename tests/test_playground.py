"""The playground page (``GET /``, ``serve/playground.py``) in a real headless Chromium (Debian's
``chromium``, driven by Playwright's Python client; Playwright's own browser download is never used).

On Ray Serve, with an API key configured: the page loads without a key and shows ``/health``; a
prompt sent before the key is refused with the 401's message and the key field; with the key, a
prompt streams its answer, and the page shows what the API itself says of the same request (tier,
adapter, knowledge version, domain, confidence, reason). Without Ray: the page is self-contained
(nothing but this origin), and an escalated answer, built with the server's own response classes
(``serve/api.py``), shows its escalation reason and the edge's attempt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings

from conftest import free_port
from servecheck import NEW_TOKENS, make_run

CHROMIUM = "/usr/bin/chromium"
APT_LINE = "apt-get update && apt-get install -y chromium"
# What Chromium needs here (/work/.library/env/machines/python.md): no sandbox as root, and no
# background connections, which this machine's closed network refuses. Playwright adds --headless
# and a fresh --user-data-dir itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "k-playground"
PROMPT = "12+"
WAIT_MS = 60_000


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM}: {APT_LINE} (CI's .ci/run does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()
    assert not pg.errors, f"the page's script failed: {pg.errors}"


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from gaisnet_ray.serve.app import start_serving

    run_dir = make_run(tmp_path_factory.mktemp("playground") / "run")
    settings = ServeSettings(port=free_port(), max_new_tokens=24, default_new_tokens=NEW_TOKENS, max_prompt_tokens=32,
                             api_keys=[KEY], poll_interval_s=0.5)
    handle = start_serving(run_dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=60, headers={"authorization": f"Bearer {KEY}"})
    yield SimpleNamespace(url=handle.url, http=client)
    client.close()
    handle.shutdown()


def ask(page, prompt: str):
    """Type ``prompt``, press Enter, wait for the answer to finish; return its element."""
    n = page.locator(".msg.assistant").count()
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").nth(n)
    answer.and_(page.locator("[data-state=done], [data-state=error]")).wait_for()
    return answer


def streamed(http: httpx.Client, body: dict) -> tuple[str, dict, dict]:
    """What an API client gets from the same request streamed: (text, the last ``gaisnet`` object, usage)."""
    text, g, usage = "", {}, {}
    with http.stream("POST", "/v1/chat/completions",
                     json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            g = chunk.get("gaisnet") or g
            usage = chunk.get("usage") or usage
            text += "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
    return text, g, usage


def field(answer, name: str) -> str:
    return answer.locator(f"[data-field={name}]").inner_text()


# ------------------------------------------------------------------------ on Ray Serve
@pytest.mark.ray
def test_page_streams_answers_and_shows_where_they_came_from(served, page, tmp_path):
    home = httpx.get(served.url + "/")  # no key: the page is open, like /health
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in home.headers["content-security-policy"]
    assert httpx.get(served.url + "/v1/models").status_code == 401  # what the page calls still needs the key

    page.goto(served.url + "/")
    health = served.http.get("/health").json()
    page.locator("#health[data-status=ok]").wait_for()
    assert page.locator("[data-field=knowledge]").inner_text() == (f"v{health['knowledge_version']} "
                                                                   f"(served v{health['served_version']})")
    assert page.locator("[data-field=run]").inner_text() == health["run"]
    page.locator("[data-health=edge]").wait_for()
    assert page.locator("[data-health=edge]").inner_text().startswith("ok")
    assert page.locator("[data-health=adapters]").inner_text() == "base v1, global v1, edge-0 v1, edge-1 v1"

    # keys are configured: the key field appears; a prompt without a key gets the 401's message
    page.locator("#keybox").wait_for(state="visible")
    refused = ask(page, PROMPT)
    assert refused.get_attribute("data-state") == "error"
    assert field(refused, "error").startswith("401 ") and "API key" in field(refused, "error")

    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.locator("#model option[value='gaisnet:arithmetic']").wait_for(state="attached")
    assert page.locator("#keynote").inner_text() == "(accepted)"

    # the routed answer: the page shows exactly what the API streams for the same (greedy) request
    answer = ask(page, PROMPT)
    text, g, usage = streamed(served.http, {"model": "gaisnet", "messages": [{"role": "user", "content": PROMPT}],
                                            "temperature": 0})
    assert answer.get_attribute("data-state") == "done", answer.inner_text()
    assert answer.locator(".text").first.inner_text() == text
    assert field(answer, "tier") == g["tier"] and answer.locator(".tier").get_attribute("data-tier") == g["tier"]
    assert field(answer, "adapter") == g["adapter"] and field(answer, "version") == f"v{g['version']}"
    assert field(answer, "domain") == (g["domain"] or "none") and field(answer, "reason") == g["reason"]
    c = g["confidence"]
    assert field(answer, "confidence") == f"min p {c['min_token_prob']:.3f} · entropy {c['mean_entropy']:.3f}"
    assert ("escalated to the cloud: " in answer.inner_text()) == g["escalated"]
    assert f"{usage['completion_tokens']} tokens" in answer.locator(".foot").inner_text()

    page.select_option("#tier", "edge")
    edge = ask(page, PROMPT)
    assert field(edge, "tier") == "edge" and field(edge, "reason").startswith("tier hint 'edge'")
    assert "escalated" not in edge.inner_text() and field(edge, "version") == "v1"

    # a tier hint: the cloud streams token by token
    page.select_option("#tier", "cloud")
    cloud = ask(page, PROMPT)
    assert field(cloud, "tier") == "cloud" and field(cloud, "reason") == "tier hint 'cloud'"
    assert field(cloud, "adapter") == "global" and field(cloud, "version") == "v1"
    tokens = int(cloud.locator(".foot").inner_text().split(" tokens")[0].rsplit(" ", 1)[-1])
    assert tokens >= 2 and int(cloud.get_attribute("data-chunks")) >= 2  # more than one piece arrived
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)  # kept in pytest's basetemp, to look at


# ------------------------------------------------------------------------ no Ray needed
def test_page_is_self_contained():
    from gaisnet_ray.serve.auth import OPEN_ROUTES
    from gaisnet_ray.serve.playground import CSP, page_html

    html = page_html()
    assert "/" in OPEN_ROUTES and "default-src 'none'" in CSP and "connect-src 'self'" in CSP
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # nothing from elsewhere
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    for call in ('fetch("/health"', 'fetch("/v1/models"', 'fetch("/v1/chat/completions"'):
        assert call in html


def escalated_stream() -> tuple[bytes, dict]:
    """An escalated chat stream built by the server's own classes, as ``ingress._sse`` sends it."""
    from gaisnet_ray.inference.generate import Generation
    from gaisnet_ray.inference.routing import RouteDecision
    from gaisnet_ray.serve.api import SSE_DONE, OpenAIShape, RoutedAnswer, sse, tier_headers
    from gaisnet_ray.serve.slots import TierAnswer

    def gen(text, p):
        return Generation(text=text, token_ids=[1, 2], finish_reason="length", prompt_tokens=3, completion_tokens=2,
                          mean_entropy=1.25, min_token_prob=p)

    decision = RouteDecision("cloud", "edge unsure: min_token_prob 0.012 < 0.05; domain 'facts' -> adapter 'edge-1'",
                             escalated=True)
    routed = RoutedAnswer(TierAnswer("cloud", "global", 4, gen("Paris", 0.91), 0.2), decision, "facts",
                          TierAnswer("edge", "edge-1", 4, gen("Lyon", 0.012), 0.1))
    shape = OpenAIShape("chat", "gaisnet")
    body = b"".join([sse(shape.chunk(None, first=True)), sse(shape.chunk("Par")), sse(shape.chunk("is")),
                     sse(shape.chunk(None, finish_reason="length", gaisnet=routed.gaisnet())),
                     sse(shape.usage_chunk(routed.answer.generation)), SSE_DONE])
    return body, tier_headers("cloud", "global", 4, decision)


def test_an_escalated_answer_shows_why_and_the_edge_attempt(page):
    """The page against a stand-in server (Playwright answers its requests): no key configured."""
    from gaisnet_ray.serve.playground import PAGE_HEADERS, page_html

    stream, headers = escalated_stream()
    health = {"status": "degraded", "run": "r1", "model": "model", "knowledge_version": 4, "served_version": 4,
              "base_version": 4, "adapters": {"global": 4}, "skipped_versions": {"global": {"5": "hash mismatch"}},
              "domain_adapters": {"facts": "edge-1"}, "tiers": {"edge": {"error": "timed out"}},
              "ingress": {"running": 1, "waiting": 0, "limit": 64, "queue": 64, "shed": 0},
              "error": {"message": "a tier is not answering"}}
    models = {"object": "list", "data": [{"id": "gaisnet", "gaisnet": {"kind": "router"}}]}
    requests = []

    def handle(route):
        req = route.request
        requests.append((req.method, req.url))
        path = "/" + req.url.split("/", 3)[3]
        if path == "/":
            route.fulfill(status=200, body=page_html(), headers={**PAGE_HEADERS, "content-type": "text/html"})
        elif path == "/health":
            route.fulfill(status=503, json=health)
        elif path == "/v1/models":
            route.fulfill(status=200, json=models)
        elif path == "/v1/chat/completions":
            sent = json.loads(req.post_data)
            assert sent["stream"] is True and sent["messages"] == [{"role": "user", "content": "capital of France?"}]
            route.fulfill(status=200, body=stream, headers={**headers, "content-type": "text/event-stream"})
        else:
            route.fulfill(status=404, json={"error": {"message": "no", "type": "not_found"}})

    page.route("**/*", handle)
    page.goto("http://127.0.0.1:9/")  # nothing listens there: every request is answered by `handle`
    page.locator("#health[data-status=degraded]").wait_for()
    assert page.locator("[data-health=skipped]").inner_text() == "global v5: hash mismatch"
    assert page.locator("[data-health=edge]").inner_text() == "not answering: timed out"
    assert page.locator("#keybox").is_hidden()  # no key configured: no key field
    answer = ask(page, "capital of France?")
    assert answer.get_attribute("data-state") == "done" and answer.locator(".text").first.inner_text() == "Paris"
    assert field(answer, "tier") == "cloud" and field(answer, "version") == "v4" and field(answer, "domain") == "facts"
    assert field(answer, "confidence") == "min p 0.910 · entropy 1.250"
    assert "escalated to the cloud: edge unsure: min_token_prob 0.012 < 0.05" in answer.locator(".reason").inner_text()
    assert "edge attempt (edge-1 v4, min p 0.012 · entropy 1.250)" in answer.locator("details").inner_text()
    assert answer.get_attribute("data-chunks") == "2"
    assert all(url.startswith("http://127.0.0.1:9/") for _, url in requests), requests  # nothing from elsewhere
    assert [p for m, p in requests if m == "POST"] == ["http://127.0.0.1:9/v1/chat/completions"]
