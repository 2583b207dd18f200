"""A burst of concurrent requests against a served tiny run: is every request answered, and is every
refusal a JSON 503 in OpenAI's error shape with Retry-After (issue 14, item 3)?

1. A run folder: ``--run-dir`` when given, else the tiny job (``examples/tiny.yaml``, one HFSL round
   without pre-training, 2 edges) made in this process in a temporary folder.
2. The app on a private local Ray as ``gaisnet serve`` starts it (``serve_run_dir(..., blocking=False)``),
   with the run's ``serve.*`` settings (defaults: the ingress admits 64 and queues 64, each tier runs
   4 and queues 8) on a free loopback port; ``--set`` overrides them.
3. ``--waves`` bursts of ``--requests`` requests sent at once (one connection each), spread evenly
   over ``POST /v1/generate``, ``/v1/completions`` and ``/v1/chat/completions`` (greedy, 8 new tokens).
   Each answer is: ok (200), 503 JSON (``application/json``, ``error.type == overloaded_error``,
   a ``Retry-After`` header; split by who refused: the ingress's admission or a tier's queue),
   other (any other answer, e.g. Serve's plain-text 503) or lost (no answer: connection error or
   client timeout).

    python benchmarks/burst.py                     # ~2 min on 2 cores

Writes benchmarks/results/burst.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

from _common import envelope, footer, make_config, md_table, quiet, write_results

NAME = "burst"
TINY = ["topology.edges=2", "topology.devices_per_edge=1", "topology.cluster_size=1", "data.samples_per_device=32",
        "data.eval_samples_per_domain=4", "data.public_samples=64", "training.pretrain_steps=0",
        "training.local_steps=2", "training.batch_size=8", "training.rounds=1", "run.progress=false"]
PROMPT = "12+"


def build_run(run_dir: Path) -> None:
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = make_config(TINY)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    InProcessGaisNet(cfg, run_dir).run_round(1)


def request_of(i: int) -> tuple[str, dict]:
    kind = i % 3
    if kind == 0:
        return "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 8}
    if kind == 1:
        return "/v1/completions", {"model": "gaisnet", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return "/v1/chat/completions", {"model": "gaisnet", "messages": [{"role": "user", "content": PROMPT}],
                                    "max_tokens": 8, "temperature": 0}


def classify(r) -> str:
    if isinstance(r, BaseException):
        return "lost"
    if r.status_code == 200:
        return "ok"
    if r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json") \
            and r.headers.get("retry-after"):
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return "other"
        if err.get("type") == "overloaded_error":
            return "503_ingress" if "the server is at its limit" in err.get("message", "") else "503_tier"
    return "other"


async def wave(url: str, n: int, timeout_s: float) -> tuple[dict, float, list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as c:
        results = await asyncio.gather(*(c.post(path, json=body) for path, body in map(request_of, range(n))),
                                       return_exceptions=True)
    elapsed = time.perf_counter() - started
    tally = {"ok": 0, "503_ingress": 0, "503_tier": 0, "other": 0, "lost": 0}
    samples = []
    for r in results:
        kind = classify(r)
        tally[kind] += 1
        if kind in ("other", "lost") and len(samples) < 3:
            samples.append(repr(r) if isinstance(r, BaseException) else f"{r.status_code} "
                           f"{r.headers.get('content-type')}: {r.text[:120]}")
    return tally, elapsed, samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="serve this run folder (else a tiny run is made in a temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="serve.* override (repeatable)")
    ap.add_argument("--requests", type=int, default=300, help="requests per burst, all sent at once")
    ap.add_argument("--waves", type=int, default=3, help="bursts, one after the other")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    quiet()
    from gaisnet_ray.config import load_config
    from gaisnet_ray.serve.app import serve_run_dir

    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gaisnet-burst-")
        run_dir = Path(tmp.name) / "run"
        t0 = time.perf_counter()
        build_run(run_dir)
        print(f"tiny run made in {time.perf_counter() - t0:.1f} s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(run_dir / "config.yaml", [f"serve.port={port}", *args.overrides])
    data = envelope(NAME, vars(args))
    sv = cfg.serve
    data["serve"] = {k: getattr(sv, k) for k in ("ingress_max_ongoing_requests", "ingress_max_queued_requests",
                                                 "max_ongoing_requests", "max_queued_requests", "retry_after_s")}
    handle = serve_run_dir(run_dir, cfg, blocking=False)
    waves = []
    try:
        for w in range(args.waves):
            tally, elapsed, samples = asyncio.run(wave(handle.url, args.requests, args.timeout_s))
            waves.append({"wave": w + 1, **tally, "elapsed_s": round(elapsed, 2), "samples": samples})
            print(f"wave {w + 1}: {tally} in {elapsed:.1f} s", flush=True)
    finally:
        handle.shutdown()
        if tmp is not None:
            tmp.cleanup()
    data["waves"] = waves
    data["wall_s"] = time.perf_counter() - started
    total = {k: sum(w[k] for w in waves) for k in ("ok", "503_ingress", "503_tier", "other", "lost")}
    data["total"] = total
    rows = [[w["wave"], args.requests, w["ok"], w["503_ingress"], w["503_tier"], w["other"], w["lost"],
             f"{w['elapsed_s']:.1f}"] for w in waves]
    rows.append(["all", args.requests * args.waves, total["ok"], total["503_ingress"], total["503_tier"],
                 total["other"], total["lost"], ""])
    s = data["serve"]
    md = "\n".join([
        f"# Burst: {args.waves} x {args.requests} concurrent requests against a served tiny run", "",
        f"Ingress admits {s['ingress_max_ongoing_requests']} and queues {s['ingress_max_queued_requests']}; each "
        f"tier replica runs {s['max_ongoing_requests']} and queues {s['max_queued_requests']}. Requests spread over "
        f"/v1/generate, /v1/completions, /v1/chat/completions (8 new tokens, greedy).", "",
        md_table(["wave", "sent", "200", "503 JSON (ingress)", "503 JSON (tier)", "other", "lost", "wall s"], rows),
        "", "Every 503 counted here is `application/json` in OpenAI's error shape (`overloaded_error`) with "
            "`Retry-After`; `other` would be any other answer (e.g. Serve's plain-text 503), `lost` no answer.",
        footer(data)])
    write_results(NAME, data, md)
    return 0 if total["lost"] == 0 and total["other"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
