"""Wiring: the Serve application over a run folder, and starting it from the CLI.

- ``build_app(run_dir, settings, node_labels=...)``: the application (edge, cloud, end, ingress), each
  deployment placed by its tier resource (and the tier's node labels, ``tiers.resource_shape``, as
  the tier's actors are) and sized by the settings.
- ``app_builder(args)``: the same for ``serve run deploy/serve_config.yaml`` (``args``: ``run_dir``,
  optional ``settings``; the node labels are the run's own ``topology.<tier>.node_labels``).
- ``serve_run_dir(run_dir, cfg, address=None)``: ``gaisnet serve``: Ray (local dev mode unless one is
  up, or the existing cluster at ``address`` / ``RAY_ADDRESS``) + Serve on ``cfg.serve.host:port``;
  blocks until Ctrl-C or SIGTERM.
- ``start_serving(run_dir, settings)``: the non-blocking start ``gaisnet run --serve`` uses while
  its own Ray is up; the training loop keeps publishing versions and the deployments pick them up.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig

from .cloud import CloudTier
from .edge import EdgeTier
from .end import EndTier
from ..config import ConfigError, ServeSettings, ServeTier, load_config
from ..knowledge.store import KnowledgeStore
from ..layout import KNOWLEDGE_DIR, MODEL_CONFIG_NAME, MODEL_DIR, RunLayout
from ..tiers import SERVE_REPLICA_SHARE, TIER_RESOURCES, resource_shape, tier_labels
from .auth import exposure_warning, key_digest, resolve_api_keys
from .errors import check_port_free
from .ingress import Router

APP_NAME = "gaisnet"


def ingress_serve_limits(s: ServeSettings) -> tuple[int, int]:
    """Serve's own (max_ongoing, max_queued) for the ingress replica.

    The ingress admits ``ingress_max_ongoing_requests`` and queues ``ingress_max_queued_requests``
    itself (``gate.Admission``) and answers any more with a JSON 503 + Retry-After. Serve must let
    those extra requests reach it, or its proxy would refuse them first with a plain-text 503
    ("Request dropped due to backpressure"): twice the admitted + queued requests may be in the
    replica at once (the surplus is only being refused, which takes microseconds), and Serve's queue
    in front of the replica is unbounded (-1), so a burst above even that waits a moment for a
    refusal instead of being dropped."""
    return 2 * (s.ingress_max_ongoing_requests + s.ingress_max_queued_requests), -1


def deployment_options(tier: str, res: ServeTier, s: ServeSettings, labels: dict[str, str] | None = None) -> dict:
    """Replicas, placement (``tiers.resource_shape``: a share of the tier resource, CPUs, GPUs, and the
    tier's node ``labels``; the ingress has no tier), and the request limits that turn overload into 503s."""
    is_tier = tier in TIER_RESOURCES
    actor: dict[str, Any] = resource_shape(tier if is_tier else None, res, SERVE_REPLICA_SHARE, labels or {}).ray_options()
    limits = (s.max_ongoing_requests, s.max_queued_requests) if is_tier else ingress_serve_limits(s)
    return {
        "num_replicas": res.num_replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": limits[0],
        "max_queued_requests": limits[1],
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
    }


def _check_run_dir(run_dir: str | Path) -> str:
    run = RunLayout(Path(run_dir).resolve())
    if not run.model_config.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run folder to serve: no {MODEL_DIR}/{MODEL_CONFIG_NAME} in it")
    if not run.knowledge.is_dir():
        raise FileNotFoundError(f"'{run_dir}' has no {KNOWLEDGE_DIR}/ folder: nothing to serve yet")
    return str(run.root)


def build_app(run_dir: str | Path, settings: ServeSettings | dict | None = None,
              api_keys: list[str] | None = None,
              node_labels: dict[str, dict[str, str]] | None = None) -> serve.Application:
    """The tiered application over ``run_dir`` (checked now, loaded by each replica). ``api_keys``:
    the keys the API asks for (default: ``auth.resolve_api_keys`` of the settings); only their
    digests go to the ingress. ``node_labels``: tier -> the labels its replicas' nodes must have
    (``tiers.tier_labels(cfg.topology)``; default: the tier resource alone decides)."""
    s = settings if isinstance(settings, ServeSettings) else ServeSettings.model_validate(settings or {})
    run_dir = _check_run_dir(run_dir)
    keys = resolve_api_keys(s) if api_keys is None else api_keys
    raw = s.model_dump(mode="json")
    raw["api_keys"] = []  # the keys stay here; the ingress gets their digests
    labels = node_labels or {}
    edge = EdgeTier.options(**deployment_options("edge", s.edge, s, labels.get("edge"))).bind(run_dir, raw)
    cloud = CloudTier.options(**deployment_options("cloud", s.cloud, s, labels.get("cloud"))).bind(run_dir, raw)
    end = EndTier.options(**deployment_options("end", s.end, s, labels.get("end"))).bind(edge, run_dir, raw)
    return Router.options(**deployment_options("ingress", s.ingress, s)).bind(
        edge, cloud, end, run_dir, raw, [key_digest(k) for k in keys])


class AppArgs(BaseModel):
    """``args`` of the ``serve run`` config: the run folder and optional serve settings."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str
    settings: dict = {}


def app_builder(args: dict) -> serve.Application:
    """Entry point for Serve config files: ``import_path: gaisnet_ray.serve.app:app_builder``."""
    try:
        parsed = AppArgs.model_validate(args)
        settings = ServeSettings.model_validate(parsed.settings)
    except ValidationError as e:
        raise ValueError(f"invalid gaisnet serve args: {e}") from None
    return build_app(parsed.run_dir, settings, node_labels=run_tier_labels(parsed.run_dir))


def run_tier_labels(run_dir: str | Path) -> dict[str, dict[str, str]]:
    """The run's own ``topology.<tier>.node_labels`` (its config.yaml): a tier's replicas go where its
    actors went. {} (the tier resource alone decides) when the folder has no readable config."""
    cfg_path = RunLayout(run_dir).config
    try:
        return tier_labels(load_config(cfg_path).topology) if cfg_path.is_file() else {}
    except ConfigError as e:
        logging.getLogger(__name__).warning("%s: %s; serving replicas are placed by tier resource alone", cfg_path, e)
        return {}


@dataclass
class ServingHandle:
    """A running app: where it listens, and how to stop it (Serve, then Ray if we started it).

    On a shared cluster (``shared_cluster``) only this app is deleted; Serve itself is shut down
    only when no other application is left on it."""

    url: str
    app_name: str = APP_NAME
    shared_cluster: bool = False
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def shutdown(self) -> None:
        serve.delete(self.app_name)
        if not self.shared_cluster or not serve.status().applications:
            serve.shutdown()
        self._stack.close()


def start_serving(run_dir: str | Path, settings: ServeSettings | dict | None = None,
                  shared_cluster: bool = False, node_labels: dict[str, dict[str, str]] | None = None) -> ServingHandle:
    """Start Serve on the Ray this process is connected to and deploy the app; returns once every
    replica is up. Ray must already be initialised (``cluster.connect``): the caller owns it.
    ``shared_cluster``: Ray is an existing cluster others may serve on too (see ``ServingHandle``).
    ``node_labels``: as for ``build_app``."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("start_serving needs a connected Ray (gaisnet_ray.cluster.connect); "
                           "use serve_run_dir to start one")
    s = settings if isinstance(settings, ServeSettings) else ServeSettings.model_validate(settings or {})
    keys = resolve_api_keys(s)
    app = build_app(run_dir, s, keys, node_labels)
    warning = exposure_warning(s.host, s.port, bool(keys))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    serve.start(http_options={"host": s.host, "port": s.port})
    _run_or_explain(app, s, node_labels or {})
    return ServingHandle(f"http://{s.host}:{s.port}", shared_cluster=shared_cluster)


class ServeStartupError(RuntimeError):
    """The app did not come up in time; the message names the deployments and what Serve says."""


def _run_or_explain(app: serve.Application, s: ServeSettings, labels: dict[str, dict[str, str]]) -> None:
    """``serve.run`` waits for every replica; a replica that can never be placed (a tier resource no
    node declares) would make that wait endless. Wait at most ``startup_timeout_s``, then say what
    is missing."""
    import ray

    timeout_s = s.startup_timeout_s
    done, box = threading.Event(), {}

    def run() -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="gaisnet-serve-run", daemon=True).start()
    if done.wait(timeout_s):
        if "error" in box:
            raise box["error"]
        return
    status = serve.status().applications.get(APP_NAME)
    deployments = status.deployments.items() if status else []
    waiting = {name: getattr(d.status, "value", str(d.status)) + (f" ({d.message})" if d.message else "")
               for name, d in deployments if getattr(d.status, "value", str(d.status)) != "HEALTHY"}
    asks = {}
    for tier in ("edge", "cloud", "end"):
        shape = resource_shape(tier, getattr(s, tier), SERVE_REPLICA_SHARE, labels.get(tier, {}))
        asks[tier] = {**shape.resources, "CPU": shape.num_cpus, **({"labels": shape.labels} if shape.labels else {})}
    free = ray.available_resources()
    serve.shutdown()
    raise ServeStartupError(
        f"the serving app did not start within {timeout_s:g} s; deployments not running: {waiting or 'unknown'}; "
        f"each replica asks for {asks}; free cluster resources: {free}. Declare the tier resources on the "
        f"nodes (local dev mode does) or lower serve.<tier>.num_cpus")


def serve_run_dir(run_dir: str | Path, cfg=None, blocking: bool = True, address: str | None = None,
                  check_resources: bool = True) -> ServingHandle | None:
    """``gaisnet serve RUN_DIR``: connect to Ray (a private local dev-mode node declaring the tier
    resources the deployments ask for, unless this process is already connected, or the existing
    cluster at ``address`` / ``RAY_ADDRESS``) and serve with ``cfg.serve`` (``cfg``: the run's own
    config.yaml by default) until Ctrl-C.

    On a cluster the run folder must be readable at the same absolute path on every node that hosts a
    replica (shared storage); the proxies bind ``serve.host:port`` on the cluster's nodes, so the
    port is not checked here, and only this app is removed on exit.

    With ``blocking=False`` it returns the ``ServingHandle``; its ``shutdown()`` also stops the Ray
    started here (or disconnects from the cluster).
    """
    from ..cluster import connect, joins_cluster
    from ..config import default_config

    if cfg is None:
        cfg_path = RunLayout(run_dir).config
        cfg = load_config(cfg_path) if cfg_path.is_file() else default_config()
    _check_run_dir(run_dir)  # before starting Ray: a wrong path, a key file or a taken port fail in milliseconds
    resolve_api_keys(cfg.serve)
    version, skipped = KnowledgeStore(RunLayout(run_dir).knowledge).latest_intact()
    if version is None and skipped:
        raise FileNotFoundError(f"'{run_dir}' has no intact knowledge version to serve: {'; '.join(skipped.values())}")
    shared = joins_cluster(address)
    if not shared:
        check_port_free(cfg.serve.host, cfg.serve.port)
    stack = contextlib.ExitStack()
    stack.enter_context(connect(cfg, training=False, serving=True, address=address,
                                check_resources=check_resources))
    try:
        handle = start_serving(run_dir, cfg.serve, shared_cluster=shared, node_labels=tier_labels(cfg.topology))
    except BaseException:
        stack.close()
        raise
    handle._stack = stack
    announce(run_dir, handle)
    if not blocking:
        return handle
    try:
        wait_for_interrupt()
    finally:
        handle.shutdown()
    return None


def announce(run_dir: str | Path, handle: ServingHandle) -> None:
    """What is served, where; and, plainly, each newer knowledge version skipped as damaged."""
    version, skipped = KnowledgeStore(RunLayout(run_dir).knowledge).latest_intact()
    served = "no knowledge version yet" if version is None else f"knowledge v{version:04d}"
    print(f"serving {Path(run_dir).resolve()} ({served}) at {handle.url} (OpenAI-compatible API under "
          f"{handle.url}/v1; playground page: {handle.url}/)", flush=True)
    for v, why in sorted(skipped.items()):
        print(f"skipped knowledge v{v:04d}, which fails verification ({why}); serving {served} instead", flush=True)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (the CLI turns SIGTERM into the same, so cleanup runs on ``kill`` too)."""
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping", flush=True)
