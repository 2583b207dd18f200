"""What the serving tests share (``test_serve*.py``): the small run folder they serve (and one with
a damaged newest version), publishing a new knowledge version the way the cloud does, waiting for a
condition, reading a JSON error, and a burst of concurrent requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from conftest import small_job
from tinycfg import TINY_YAML

NEW_TOKENS = 8  # what the routing tests ask for (the calibration generates the same)
PROMPT = "12+"  # a prompt the test model answers with several tokens


def make_run(out: Path, calibrate: bool = False) -> Path:
    """The tiny run folder the serving tests share: config.yaml and one in-process round (v1) of the
    small job (``conftest.SMALL_JOB``), global and per-edge knowledge, no Ray. Without ``calibrate``
    the edge versions carry no routing.json: the fixed limits the serving tests set decide."""
    from gaisnet_ray.config import config_to_yaml, load_config
    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = load_config(TINY_YAML, small_job(f"serve.routing.calibrate={str(calibrate).lower()}"))
    out.mkdir()
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    InProcessGaisNet(cfg, out).run_round(1)
    return out


def damage(path: Path) -> None:
    """Cut a file to half its size, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_damaged_run(out: Path) -> Path:
    """``make_run`` (round 1: v1), plus v2 published and then cut in half."""
    make_run(out)
    publish_scaled(out, 1, 2)
    damage(out / "knowledge" / "v0002" / "adapter_model.safetensors")
    return out


def publish_scaled(run_dir: Path, parent: int, version: int) -> None:
    """Publish a new global version the way the cloud does (store.publish): parent's LoRA, B doubled."""
    from peft import PeftConfig

    from gaisnet_ray.knowledge.store import KnowledgeStore

    store = KnowledgeStore(Path(run_dir) / "knowledge")
    state = {k: (v * 2 if "lora_B" in k else v) for k, v in store.load(parent).items()}
    config = PeftConfig.from_pretrained(str(store.path(parent)))
    store.publish(version, state, config, {"round": version, "parent_version": parent,
                                           "base": store.lineage(parent)["base"]})


def wait_for(cond, timeout_s: float, what: str) -> None:
    """Poll ``cond`` every 50 ms; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def json_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """Assert a JSON error with ``status``; return its ``error`` object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in r.text  # errors never carry a traceback
    if code is not None:
        assert err["code"] == code, err
    return err


async def burst(url: str, n: int, headers: dict, timeout_s: float = 180) -> dict:
    """``n`` concurrent /v1/generate requests; each is ok (200), 503_json (a JSON 503 in OpenAI's shape
    with Retry-After), other (any other answer) or lost (no answer at all)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as c:
        body = {"prompt": PROMPT, "max_new_tokens": 8}
        results = await asyncio.gather(*(c.post("/v1/generate", json=body) for _ in range(n)), return_exceptions=True)
    tally = {"ok": 0, "503_json": 0, "other": 0, "lost": 0}
    for r in results:
        if isinstance(r, BaseException):
            tally["lost"] += 1
        elif r.status_code == 200:
            tally["ok"] += 1
        elif (r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json")
              and r.headers.get("retry-after") and r.json().get("error", {}).get("type") == "overloaded_error"):
            tally["503_json"] += 1
        else:
            tally["other"] += 1
    return tally
