"""The HTTP API under hostile but legitimate use (issue 14, serving side), on real Ray Serve over
loopback: API keys (and the official openai client's ``api_key=``), range checks on every numeric
field, no traceback ever reaching a client (a generic 500 with a request id), split payloads that
must not run, body caps and a stalled body, a 300-request burst in which every answer is a 200 or a
JSON 503 with Retry-After and none is lost, run-relative names, the split-session cap, damaged
knowledge versions skipped at start and never swapped in, and a bounded fuzz run (hypothesis).
A damaged run folder read and served without this app: ``test_serve_damaged.py``.

The same checks without Ray are in ``test_serve_gate.py``. One Serve app for the module (keys set, small caps), over a run folder made in-process like
``test_serve.py``'s, whose newest knowledge version is cut in half before the app starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from gaisnet_ray.config import ServeSettings

from conftest import free_port
from servecheck import burst, damage, json_error, make_damaged_run, publish_scaled, wait_for

KEY, ENV_KEY = "k-test-config", "k-test-env"
PROMPT = "12+"
TALLY = {"requests": 0, "5xx": 0}  # what the module's HTTP checks tried (printed at the end)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """test_serve's run folder recipe (round 1: v1), plus v2 published and then cut in half."""
    return make_damaged_run(tmp_path_factory.mktemp("hostile") / "run")


@pytest.fixture(scope="module")
def app(ray_local, hostile_run):
    from gaisnet_ray.serve.app import start_serving

    settings = ServeSettings(
        port=free_port(), max_new_tokens=24, default_new_tokens=4, max_prompt_tokens=32, api_keys=[KEY],
        max_ongoing_requests=2, max_queued_requests=2, retry_after_s=2, poll_interval_s=0.5,
        ingress_max_ongoing_requests=8, ingress_max_queued_requests=8, max_body_bytes=4096,
        body_read_timeout_s=2.0, max_split_sessions=2,
    )
    os.environ["GAISNET_API_KEYS"] = ENV_KEY
    try:
        handle = start_serving(hostile_run, settings)
    finally:
        os.environ.pop("GAISNET_API_KEYS", None)
    client = httpx.Client(base_url=handle.url, timeout=60, headers={"authorization": f"Bearer {KEY}"},
                          event_hooks={"response": [_tally]})
    yield SimpleNamespace(url=handle.url, http=client, settings=settings, run_dir=hostile_run)
    client.close()
    handle.shutdown()
    print(f"\nhostile HTTP checks: {TALLY['requests']} requests, {TALLY['5xx']} answered 5xx")


def _tally(r: httpx.Response) -> None:
    TALLY["requests"] += 1
    TALLY["5xx"] += r.status_code >= 500


# ------------------------------------------------------------------------ on Ray Serve
@pytest.mark.ray
def test_damaged_version_is_skipped_at_start_and_health_says_why(app):
    h = app.http.get("/health").json()
    assert h["status"] == "ok" and h["served_version"] == 1 and h["knowledge_version"] == 1, h
    why = h["skipped_versions"]["global"]["2"]
    assert why.startswith("v0002: adapter_model.safetensors cannot be read"), why
    assert h["tiers"]["edge"]["adapters_loaded"].get("global", 1) == 1
    r = app.http.post("/v1/generate", json={"prompt": PROMPT, "tier": "cloud"})
    assert r.status_code == 200 and r.json()["version"] == 1


@pytest.mark.ray
def test_keys_guard_every_route_but_health(app):
    bare = httpx.Client(base_url=app.url, timeout=30, event_hooks={"response": [_tally]})
    assert bare.get("/health").status_code == 200
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "gaisnet"}),
                               ("POST", "/v1/generate", {"prompt": "x"}), ("GET", "/v1/split/info", None),
                               ("POST", "/v1/split/forward", None), ("GET", "/docs", None)):
        err = json_error(bare.request(method, path, json=body), 401, "invalid_api_key")
        assert "Bearer" in err["message"]
    wrong = bare.get("/v1/models", headers={"authorization": "Bearer nope"})
    assert json_error(wrong, 401)["message"] == "the API key is not valid" and wrong.headers["www-authenticate"] == "Bearer"
    assert bare.get("/v1/models", headers={"authorization": f"Bearer {ENV_KEY}"}).status_code == 200
    bare.close()

    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=f"{app.url}/v1", api_key=KEY, max_retries=0)
    done = good.completions.create(model="gaisnet", prompt=PROMPT, max_tokens=3, temperature=0)
    assert done.choices[0].text is not None and done.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app.url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.ray
def test_numeric_fields_are_range_checked_at_the_boundary(app):
    post = app.http.post
    chat = {"model": "gaisnet", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    comp = {"model": "gaisnet", "prompt": PROMPT, "max_tokens": 2}
    for path, body in (("/v1/completions", comp), ("/v1/chat/completions", chat),
                       ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 2})):
        for stream in ((False, True) if path != "/v1/generate" else (None,)):
            extra = {} if stream is None else {"stream": stream}
            for seed in (2**64, 2**63, -(2**63) - 1, 10**40):
                assert json_error(post(path, json={**body, **extra, "seed": seed}), 422, "invalid_field")["param"] == "seed"
        for field, value in (("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5)):
            assert json_error(post(path, json={**body, field: value}), 422)["param"] == field
        stops = ["a", "b", "c", "d", "e"]
        assert json_error(post(path, json={**body, "stop": stops}), 422)["param"] == "stop"
    assert json_error(post("/v1/completions", json={**comp, "max_tokens": 10**30}), 422)["param"] == "max_tokens"
    assert json_error(post("/v1/completions", json={**comp, "max_tokens": 0}), 422)["param"] == "max_tokens"
    assert json_error(post("/v1/completions", json={**comp, "n": 10**30}), 400)["param"] == "n"
    # the edges of every range are served, not crashed on: the extreme seeds, a temperature and a
    # top_p far below float32's smallest value (greedy in the limit)
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"temperature": 5e-324, "seed": 1},
                  {"temperature": 1.0, "top_p": 5e-324, "seed": 1}, {"temperature": 2.0, "top_p": 1.0, "seed": 0}):
        r = post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3, "tier": "cloud", **extra})
        assert r.status_code == 200, (extra, r.text)
    greedy = post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3, "tier": "cloud"}).json()["text"]
    tiny_t = post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3, "tier": "cloud",
                                        "temperature": 1e-300, "seed": 5}).json()["text"]
    assert tiny_t == greedy


@pytest.mark.ray
def test_split_payloads_that_must_not_run_get_422(app):
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    def step(session, tensor, past=0):
        h = {"x-gaisnet-session": session, "x-gaisnet-past-len": str(past)}
        return app.http.post("/v1/split/forward", params={"out": "token"}, content=tensor_to_bytes(tensor), headers=h)

    bad = {"bad_shape": [torch.randn(1, 0, 64), torch.randn(1, 2, 63), torch.randn(2, 2, 64)],
           "bad_dtype": [torch.randn(1, 2, 64, dtype=torch.float64), torch.ones(1, 2, 64, dtype=torch.int32)],
           "non_finite": [torch.full((1, 2, 64), float("nan")), torch.full((1, 2, 64), -float("inf")),
                          torch.full((1, 2, 64), 3e38)]}
    for code, tensors in bad.items():
        for i, t in enumerate(tensors):
            err = json_error(step(f"bad-{code}-{i}", t), 422, code)
            assert err["param"] == "body"
    assert step("fine", torch.randn(1, 2, 64)).status_code == 200
    assert step("fine-half", torch.randn(1, 2, 64, dtype=torch.float16)).status_code == 200


@pytest.mark.ray
def test_split_sessions_are_capped_evicting_the_longest_idle(app):
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    def step(session, past):
        h = {"x-gaisnet-session": session, "x-gaisnet-past-len": str(past)}
        return app.http.post("/v1/split/forward", params={"out": "token"}, content=tensor_to_bytes(torch.randn(1, 1, 64)),
                             headers=h)

    for sid in ("cap-a", "cap-b"):
        assert step(sid, 0).status_code == 200
    assert step("cap-a", 1).status_code == 200  # cap-a used last: cap-b is now the longest idle
    assert step("cap-c", 0).status_code == 200  # a third session at the cap of 2 evicts cap-b
    err = json_error(step("cap-b", 1), 409, "unknown_session")
    assert "evicted" in err["message"]
    assert step("cap-a", 2).status_code == 200 and step("cap-c", 1).status_code == 200
    split = app.http.get("/health").json()["tiers"]["edge"]["split"]
    assert split["open_sessions"] <= 2 and split["max_sessions"] == 2 and split["evicted_sessions"] >= 1


@pytest.mark.ray
def test_bodies_over_the_cap_are_refused_before_they_are_read(app):
    host, port = app.url.removeprefix("http://").split(":")
    # declared too large: 413 at once, long before 20 MB could arrive
    started = time.monotonic()
    status, head, body = _raw(host, int(port), "POST /v1/completions", {"content-length": "20000000"}, b'{"model"')
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large", (status, body)
    assert time.monotonic() - started < 5
    # chunked (no length): the read stops at the cap
    def chunks():
        yield b'{"model": "gaisnet", "prompt": "'
        for _ in range(100):
            yield b"9" * 1000
        yield b'"}'
    err = json_error(app.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413,
                 "payload_too_large")
    assert "the limit is 4096" in err["message"]
    # a split payload has its own, larger cap
    big = app.http.post("/v1/split/forward", content=b"x" * 5000,
                        headers={"x-gaisnet-session": "big", "x-gaisnet-past-len": "0"})
    json_error(big, 400, "bad_payload")
    # a partial body is dropped after serve.body_read_timeout_s (2 s here)
    started = time.monotonic()
    status, head, body = _raw(host, int(port), "POST /v1/generate", {"content-length": "300"}, b'{"prompt": "1')
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout", (status, body)
    assert 1.5 < time.monotonic() - started < 10
    assert "connection: close" in head.lower()


def _raw(host: str, port: int, request_line: str, headers: dict, body: bytes) -> tuple[int, str, bytes]:
    """Send a request whose body may be incomplete; return (status, head, body) of the answer."""
    with socket.create_connection((host, port), timeout=30) as s:
        lines = [f"{request_line} HTTP/1.1", f"host: {host}", "content-type: application/json",
                 f"authorization: Bearer {KEY}", *(f"{k}: {v}" for k, v in headers.items())]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += s.recv(65536)
        TALLY["requests"] += 1
        return int(head.split()[1]), head.decode("latin-1"), rest[:length]


@pytest.mark.ray
def test_no_absolute_server_path_reaches_a_client(app):
    root = str(app.run_dir.resolve())
    health = app.http.get("/health")
    assert health.json()["model"] == "model" and health.json()["run"] == "run"
    models = app.http.get("/v1/models")
    assert {m["gaisnet"].get("path") for m in models.json()["data"]} >= {"knowledge/bases/b0001"}
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    h = {"x-gaisnet-session": "paths", "x-gaisnet-past-len": "0"}
    for version in ("99", "2"):  # never published; published but damaged
        r = app.http.post("/v1/split/forward", content=tensor_to_bytes(torch.randn(1, 1, 64)),
                          headers={**h, "x-gaisnet-version": version})
        err = json_error(r, 404, "unknown_version")
        assert ("damaged" in err["message"]) == (version == "2"), err
        assert root not in r.text and "/tmp" not in r.text
    for r in (health, models):
        assert root not in r.text and "/tmp" not in r.text, r.text


@pytest.mark.ray
def test_a_burst_gets_200_or_json_503_and_loses_nothing(app):
    tally = asyncio.run(burst(app.url, 300, {"authorization": f"Bearer {KEY}"}))
    TALLY["requests"] += 300
    assert tally["lost"] == 0 and tally["other"] == 0, tally
    assert tally["ok"] >= 1 and tally["503_json"] >= 1, tally
    assert tally["ok"] + tally["503_json"] == 300


@pytest.mark.ray
def test_a_failure_mid_stream_ends_it_with_a_json_error_event(app):
    """Three split generations inside the cluster (tier end) while split sessions are opened over
    HTTP: the edge holds 2 sessions, so generations lose theirs mid-stream. Every stream must end
    with [DONE], after either its final chunk or one JSON error event: never a traceback."""
    import torch

    from gaisnet_ray.inference import tensor_to_bytes

    async def stream(c):
        body = {"model": "gaisnet", "prompt": PROMPT, "max_tokens": 24, "stream": True, "temperature": 0}
        async with c.stream("POST", "/v1/completions", json={**body, "tier": "end"}) as r:
            if r.status_code != 200:  # refused before the stream began (its first step lost the race)
                await r.aread()
                json_error(r, r.status_code)
                return None
            return [line async for line in r.aiter_lines() if line]

    async def churn(c, stop):
        i = 0
        while not stop.is_set():
            i += 1
            await c.post("/v1/split/forward", params={"out": "token"}, content=tensor_to_bytes(torch.randn(1, 1, 64)),
                         headers={"x-gaisnet-session": f"churn-{i}", "x-gaisnet-past-len": "0"})

    async def main():
        async with httpx.AsyncClient(base_url=app.url, timeout=120, headers={"authorization": f"Bearer {KEY}"}) as c:
            stop = asyncio.Event()
            churner = asyncio.create_task(churn(c, stop))
            streams = await asyncio.gather(*(stream(c) for _ in range(3)))
            stop.set()
            await churner
            return streams

    cut, tries = 0, 0
    while cut == 0 and tries < 4:  # the cut is a race; a round where every stream won it proves nothing
        tries += 1
        streams = asyncio.run(main())
        for events in filter(None, streams):
            assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
            last = json.loads(events[-2][len("data: "):])
            if "error" in last:
                cut += 1
                assert last["error"]["code"] in ("unknown_session", "past_len_mismatch", "overloaded"), last
                assert "Traceback" not in json.dumps(last)
            else:
                assert last["choices"][0]["finish_reason"] in ("stop", "length")
    print(f"mid-stream: {cut} of {len(streams)} streams cut (round {tries})")
    assert cut >= 1


@pytest.mark.ray
def test_a_damaged_new_version_is_never_swapped_in(app):
    store_dir = app.run_dir / "knowledge"
    shutil.copytree(store_dir / "v0001", store_dir / ".tmp-v0003")  # as publish would, then damaged
    damage(store_dir / ".tmp-v0003" / "adapter_model.safetensors")
    (store_dir / ".tmp-v0003").rename(store_dir / "v0003")
    time.sleep(4 * app.settings.poll_interval_s)
    h = app.http.get("/health").json()
    assert h["served_version"] == 1 and set(h["skipped_versions"]["global"]) == {"2", "3"}, h
    assert h["tiers"]["cloud"]["poll"]["error"] is None
    publish_scaled(app.run_dir, 1, 4)  # an intact newer version is served as usual
    wait_for(lambda: app.http.get("/health").json()["served_version"] == 4, 60, "the swap to v4")
    assert app.http.post("/v1/generate", json={"prompt": PROMPT, "tier": "cloud"}).json()["version"] == 4
    # the ingress's catalog is re-read every poll interval: the skipped list empties within one
    wait_for(lambda: app.http.get("/health").json()["skipped_versions"] == {}, 10, "no version newer than v4 skipped")


@pytest.mark.ray
def test_fuzz_the_http_api(app):
    """hypothesis over the three generation routes' bodies and the split headers: no 5xx, and every
    error is JSON in OpenAI's error shape. Bounded: 400 examples, about 10-30 s here."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, 2, 0.5, 1e-300]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
    fields = {"model": st.sampled_from(["gaisnet", "global", "edge-0", "base", "gaisnet:units", "nope", ""]),
              "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=5), max_size=2)),
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": st.one_of(st.text(max_size=20), values)}),
                                   max_size=2),
              "max_tokens": st.integers(-5, 30), "max_new_tokens": st.integers(-5, 30),
              "max_completion_tokens": st.integers(-5, 30), "temperature": st.floats(-1, 3),
              "top_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 3), "seed": st.integers(-(2**65), 2**65),
              "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=6)),
              "stream": st.booleans(), "tier": st.sampled_from(["edge", "cloud", "end", "moon"]),
              "domain": st.sampled_from(["units", "poetry"]), "adapter": st.sampled_from(["global", "edge-1", "x"]),
              "logprobs": values, "echo": values, "best_of": values, "suffix": values, "stream_options": values}
    bodies = st.fixed_dictionaries({}, optional={**fields, "extra": values})
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/generate"])
    raw = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))
    headers = st.fixed_dictionaries({}, optional={
        "x-gaisnet-session": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=10), "x-gaisnet-past-len": st.sampled_from(["0", "-1", "x", "99999999999"]),
        "x-gaisnet-version": st.sampled_from(["1", "-3", "2", "x"]), "x-gaisnet-adapter": st.sampled_from(["global", "x"])})
    seen = {"requests": 0, "5xx": 0}

    def check(r: httpx.Response) -> None:
        seen["requests"] += 1
        seen["5xx"] += r.status_code >= 500 and r.status_code != 503
        assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)
        if r.status_code >= 400:
            json_error(r, r.status_code)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and "Traceback" not in r.text

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=paths, body=bodies)
    def fuzz_json(path, body):
        body = json.loads(json.dumps(body))  # what reaches the wire
        if isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(body["max_tokens"], 6)
        check(app.http.post(path, json=body))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=st.sampled_from(["/v1/completions", "/v1/generate", "/v1/split/forward"]), payload=raw, hdrs=headers)
    def fuzz_raw(path, payload, hdrs):
        check(app.http.post(path, content=payload, headers={"content-type": "application/json", **hdrs}))

    started = time.monotonic()
    fuzz_json()
    fuzz_raw()
    TALLY["requests"] += seen["requests"]
    print(f"fuzz: {seen['requests']} requests in {time.monotonic() - started:.1f} s, {seen['5xx']} answered 5xx")
    assert seen["5xx"] == 0 and seen["requests"] >= 400
