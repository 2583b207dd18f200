"""The serving gate and its pieces without Ray (issue 14, serving side): where API keys come from,
admission control, capped and timed body reads, split-payload checks, the generic 500 with a
request id on a real FastAPI app, and local dev mode's loopback-only Ray settings. The same
behaviour over real Ray Serve is in ``test_serve_hostile.py``."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gaisnet_ray.config import ServeSettings

from tinycfg import TINY_YAML

# ------------------------------------------------------------------------ no Ray needed
def test_api_keys_come_from_config_file_and_env(tmp_path):
    from gaisnet_ray.serve.auth import ApiKeyError, bearer_key, exposure_warning, key_digest, key_matches, resolve_api_keys

    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \n")
    s = ServeSettings(api_keys=["k-a"], api_key_file=str(f))
    assert resolve_api_keys(s, {"GAISNET_API_KEYS": "k-env, k-a,"}) == ["k-a", "k-file-1", "k-file-2", "k-env"]
    assert resolve_api_keys(ServeSettings(), {}) == []
    with pytest.raises(ApiKeyError, match="api_key_file: '.*nope' does not exist"):
        resolve_api_keys(ServeSettings(api_key_file=str(tmp_path / "nope")), {})
    with pytest.raises(ValueError, match=r"serve.api_keys\[1\]"):
        ServeSettings(api_keys=["ok", "has space"])
    digests = [key_digest("k-a"), key_digest("k-b")]
    assert key_matches("k-b", digests) and not key_matches("k-c", digests) and not key_matches(None, digests)
    assert bearer_key("Bearer k-a") == "k-a" and bearer_key("bearer  k-a ") == "k-a"
    assert bearer_key("Basic xyz") is None and bearer_key(None) is None and bearer_key("Bearer ") is None
    assert exposure_warning("127.0.0.1", 8000, False) is None and exposure_warning("::1", 8000, False) is None
    assert exposure_warning("0.0.0.0", 8000, True) is None
    assert "0.0.0.0:8000 without API keys" in exposure_warning("0.0.0.0", 8000, False)


def test_ingress_sheds_load_itself_so_serve_never_drops():
    from gaisnet_ray.serve.app import deployment_options

    s = ServeSettings(ingress_max_ongoing_requests=3, ingress_max_queued_requests=5)
    opts = deployment_options("ingress", s.ingress, s)
    assert opts["max_queued_requests"] == -1 and opts["max_ongoing_requests"] == 16  # 2 x (3 + 5)
    assert deployment_options("edge", s.edge, s)["max_queued_requests"] == s.max_queued_requests


def test_admission_runs_the_limit_queues_the_queue_and_refuses_the_rest():
    from gaisnet_ray.serve.errors import ServeError
    from gaisnet_ray.serve.gate import Admission

    async def main():
        adm, release, outcomes = Admission(2, 1, 3.0), asyncio.Event(), []

        async def request(i):
            try:
                async with adm.slot():
                    outcomes.append(("in", i))
                    await release.wait()
            except ServeError as e:
                outcomes.append((e.status, e.headers["Retry-After"]))

        tasks = [asyncio.create_task(request(i)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert adm.info() == {"running": 2, "waiting": 1, "limit": 2, "queue": 1, "shed": 2}
        release.set()
        await asyncio.gather(*tasks)
        return outcomes

    out = asyncio.run(main())
    assert out[:4] == [("in", 0), ("in", 1), (503, "3"), (503, "3")] and out[4] == ("in", 2)


def test_body_read_stops_at_the_cap_and_at_the_timeout():
    from gaisnet_ray.serve.errors import ServeError
    from gaisnet_ray.serve.gate import read_body

    def receiver(chunks, stall=False):
        it = iter(chunks)

        async def receive():
            try:
                body = next(it)
            except StopIteration:
                await asyncio.sleep(3600 if stall else 0)
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": True}
        return receive

    async def whole():
        async def receive():
            return {"type": "http.request", "body": b"abc", "more_body": False}
        return await read_body(receive, 3, 1.0)

    assert asyncio.run(whole()) == b"abc"
    with pytest.raises(ServeError) as over:
        asyncio.run(read_body(receiver([b"x" * 600] * 5), 2048, 5.0))
    assert over.value.status == 413 and "the limit is 2048" in over.value.message
    started = time.monotonic()
    with pytest.raises(ServeError) as slow:
        asyncio.run(read_body(receiver([b"x" * 10], stall=True), 2048, 0.3))
    assert slow.value.status == 408 and "10 bytes received" in slow.value.message
    assert time.monotonic() - started < 2


def test_gate_turns_a_bug_into_a_generic_500_with_a_request_id():
    """A real FastAPI app behind the real gate (no Ray): the traceback stays in the log."""
    from fastapi import FastAPI

    from gaisnet_ray.serve import gate
    from gaisnet_ray.serve.auth import key_digest

    app = FastAPI()
    app.add_middleware(gate.Gate)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail /srv/runs/x")

    @app.post("/echo")
    async def echo(body: dict):
        return body

    async def main():
        gate.configure(gate.HttpPolicy([key_digest("k")], max_body_bytes=1024))
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                auth = {"authorization": "Bearer k"}
                return (await c.get("/boom", headers=auth), await c.get("/boom"),
                        await c.post("/echo", json={"a": "x" * 2000}, headers=auth),
                        await c.post("/echo", json={"a": 1}, headers=auth))
        finally:
            gate.configure(gate.HttpPolicy())

    boom_r, noauth, big, ok = asyncio.run(main())
    assert boom_r.status_code == 500 and boom_r.headers["content-type"] == "application/json"
    rid = boom_r.headers["x-request-id"]
    err = boom_r.json()["error"]
    assert err["code"] == "internal_error" and rid in err["message"] and "secret" not in boom_r.text
    assert noauth.status_code == 401 and noauth.json()["error"]["code"] == "invalid_api_key"
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert ok.status_code == 200 and ok.json() == {"a": 1}


def test_split_payload_checks():
    import torch

    from gaisnet_ray.inference.split import HiddenStateError, check_hidden

    check_hidden(torch.randn(1, 2, 8), 8)
    check_hidden(torch.randn(1, 2, 8, dtype=torch.bfloat16), 8)
    cases = {"bad_shape": [torch.randn(1, 0, 8), torch.randn(1, 2, 9), torch.randn(2, 2, 8), torch.randn(2, 8)],
             "bad_dtype": [torch.randn(1, 2, 8, dtype=torch.float64), torch.ones(1, 2, 8, dtype=torch.int64)],
             "non_finite": [torch.full((1, 2, 8), float("nan")), torch.full((1, 2, 8), float("inf")),
                            torch.full((1, 2, 8), 1e30)]}
    for code, tensors in cases.items():
        for t in tensors:
            with pytest.raises(HiddenStateError) as e:
                check_hidden(t, 8)
            assert e.value.code == code, (code, t.shape, t.dtype)


def test_local_dev_mode_keeps_rays_http_ports_on_loopback():
    from gaisnet_ray.cluster.local import local_init_kwargs
    from gaisnet_ray.config import load_config

    kw = local_init_kwargs(load_config(TINY_YAML), training=True, serving=True)
    assert kw["include_dashboard"] is False and kw["dashboard_host"] == "127.0.0.1"
