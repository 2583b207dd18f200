"""Connecting the driver to Ray: a private local dev-mode instance, an existing Ray cluster, or a Ray
this process already initialised.

This is the only module that calls ``ray.init``. Local dev mode declares the tier resources on the
single node, so actors are placed by exactly the same resource requests as on a real cluster.
Cluster mode (``address``, or ``RAY_ADDRESS``) joins a running cluster, declares nothing, and first
checks that the cluster's nodes declare what the run asks for (``preflight``).

GPUs in local dev mode: the node declares exactly the CUDA GPUs torch can use here
(``host_gpus``: 0 with a CPU build of torch, whatever Ray's own detection would find), so an actor
given ``num_gpus`` really gets CUDA; a run asking for more GPUs than that fails before Ray starts.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray
from ray.exceptions import AuthenticationError

from ..config import Config
from ..tiers import TIER_RESOURCES, placements, total_demand
from .preflight import demands, placement_problems, resource_error_message


@dataclass(frozen=True)
class ClusterInfo:
    # "local" (a private node started here), "cluster" (joined an existing cluster at `address`) or
    # "existing" (Ray already initialised by the caller)
    mode: str
    resources: dict[str, float]
    address: str | None = None


class ClusterError(RuntimeError):
    """The Ray cluster asked for cannot be used: unreachable, or it lacks what the run asks for."""


class ClusterConnectError(ClusterError):
    """No Ray cluster could be joined at the address."""


class ClusterResourceError(ClusterError):
    """The cluster's nodes do not declare the tier resources (CPUs, GPUs, labels) the run asks for."""


def resolve_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``; None (or ``"local"``) means local dev mode.

    Inside a Ray Job, Ray sets ``RAY_ADDRESS`` to the cluster's GCS address, so a run submitted as a
    job joins the cluster it was submitted to.
    """
    addr = (address if address is not None else os.environ.get("RAY_ADDRESS", "")).strip()
    return None if addr in ("", "local") else addr


def joins_cluster(address: str | None = None) -> bool:
    """Whether ``connect(address=...)`` would join an existing cluster (not local, not already up)."""
    return not ray.is_initialized() and resolve_address(address) is not None


def required_resources(cfg: Config, training: bool = True, serving: bool = False) -> dict[str, float]:
    """What a run asks of Ray in all (``tiers.placements``): one tier resource per actor
    (``cloud.workers`` for the cloud) plus the tiers' CPUs and GPUs when ``training``, and the Serve
    deployments' share of them when ``serving``.

    Tier resources are rounded up to whole units: a node declares ``gaisnet_edge: 2``, not 2.03.
    """
    need = total_demand(placements(cfg, training, serving))
    for k in TIER_RESOURCES.values():
        need[k] = math.ceil(need[k])
    return need


def host_gpus() -> int:
    """CUDA GPUs torch can use in this process (honours ``CUDA_VISIBLE_DEVICES``); 0 without CUDA.

    torch's count, not Ray's own detection: a GPU that a CPU build of torch cannot use must not be
    declared, or actors asking for it would be placed and then silently run on the CPU.
    """
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver or runtime: no usable GPU
        return 0


def _gpu_keys(cfg: Config, training: bool, serving: bool) -> list[str]:
    """The config keys that ask for GPUs, with their values (for error messages)."""
    keys = []
    if training:
        keys += [f"topology.{t}.num_gpus={getattr(cfg.topology, t).num_gpus:g}" for t in ("cloud", "edge", "end")
                 if getattr(cfg.topology, t).num_gpus > 0]
    if serving:
        keys += [f"serve.{t}.num_gpus={getattr(cfg.serve, t).num_gpus:g}" for t in ("ingress", "end", "edge", "cloud")
                 if getattr(cfg.serve, t).num_gpus > 0]
    return keys


def check_local_gpus(cfg: Config, training: bool = True, serving: bool = False, gpus: int | None = None) -> None:
    """Raise ``ClusterResourceError`` if the tiers ask for more GPUs than this host has for torch
    (``gpus``, default ``host_gpus()``), instead of actors pending until the placement timeout."""
    need = required_resources(cfg, training, serving)["GPU"]
    if need <= 0:
        return
    have = host_gpus() if gpus is None else gpus
    if need <= have + 1e-9:
        return
    try:
        import torch

        build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"
    except ImportError:
        build = "torch not installed"
    raise ClusterResourceError(
        f"the run asks for {need:g} GPU(s) in all ({', '.join(_gpu_keys(cfg, training, serving))}, per actor or "
        f"replica) but this host has {have} CUDA GPU(s) that torch can use ({build}); set those keys to 0 to run "
        f"on the CPU, lower them so the total fits (fractions share one GPU), or install a CUDA build of torch")


def local_init_kwargs(cfg: Config, training: bool = True, serving: bool = False) -> dict:
    """``ray.init`` arguments for a private single-node instance that fits ``cfg``.

    Logical CPUs are declared as max(host CPUs, what the tiers ask for): in dev mode several tier
    actors share the host's cores (each bounds its torch threads), which is the point of the mode.
    GPUs are declared as the host has them for torch (``host_gpus``), never more; none when nothing
    asks for one (this private instance runs only ``cfg``'s actors and replicas, and the driver then
    does not import torch just to count GPUs).
    """
    need = required_resources(cfg, training, serving)
    num_cpus = cfg.run.local_num_cpus or max(os.cpu_count() or 1, math.ceil(need["CPU"]))
    return {
        "address": "local",  # never join a leftover cluster (see ../shared/environment.md)
        "num_cpus": num_cpus,
        "num_gpus": host_gpus() if need["GPU"] > 0 else 0,
        "resources": {k: v for k, v in need.items() if k not in ("CPU", "GPU") and v > 0},
        # Ray's own HTTP ports on loopback: no dashboard, and its host pinned to loopback should one be
        # turned on. Ray 2.60 binds its gRPC ports (GCS, raylet, workers) on all interfaces with no
        # option to change that; token authentication (on by default) guards them.
        "include_dashboard": False,
        "dashboard_host": "127.0.0.1",
        "namespace": "gaisnet",
        "log_to_driver": True,
        "configure_logging": False,
    }


@contextmanager
def connect(cfg: Config, training: bool = True, serving: bool = False, address: str | None = None,
            check_resources: bool = True) -> Iterator[ClusterInfo]:
    """Use the Ray instance this process already initialised; else join the cluster at ``address``
    (default ``RAY_ADDRESS``); else start a private local one sized for what will run on it (the
    training actors, the Serve deployments, or both).

    Cluster mode declares no resources: the nodes do (``ray start --resources=...``). Unless
    ``check_resources`` is False, it first checks that they declare enough of every tier resource
    (and CPUs, GPUs, node labels) for ``cfg`` and raises ``ClusterResourceError`` naming what is
    missing, instead of leaving actors pending until the placement timeout.

    On exit a local instance is shut down and a cluster is disconnected from (``ray.shutdown``, which
    stops this driver's actors, not the cluster), also after an error or a SIGTERM.
    """
    if ray.is_initialized():
        yield ClusterInfo("existing", dict(ray.cluster_resources()))
        return
    addr = resolve_address(address)
    if addr is None:
        kwargs = local_init_kwargs(cfg, training, serving)
        check_local_gpus(cfg, training, serving, kwargs["num_gpus"])
        ray.init(**kwargs)
        mode = "local"
    else:
        _join(addr)
        mode = "cluster"
        if check_resources:
            try:
                check_cluster_resources(cfg, training, serving, addr)
            except BaseException:
                ray.shutdown()
                raise
    previous = _sigterm_as_interrupt()
    try:
        yield ClusterInfo(mode, dict(ray.cluster_resources()), addr)
    finally:
        ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_cluster_resources(cfg: Config, training: bool, serving: bool, address: str = "the cluster") -> None:
    """Raise ``ClusterResourceError`` unless the connected cluster's live nodes can hold the run."""
    need = required_resources(cfg, training, serving)
    nodes = ray.nodes()
    problems = placement_problems(need, demands(cfg, training, serving), nodes)
    if problems:
        raise ClusterResourceError(resource_error_message(address, need, problems, nodes))


def _gcs_host_port(addr: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS address; None for ``auto`` or a ``ray://`` client address."""
    if addr == "auto" or "://" in addr:
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterConnectError(f"'{addr}' is not a Ray cluster address: give the head node's GCS "
                                  f"address HOST:PORT (port 6379 unless `ray start --port` said otherwise), "
                                  f"or 'auto' on a cluster node")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str | None = None) -> str | None:
    """Resolve the address (``resolve_address``) and, for a cluster, check it looks like one and that
    something listens there: raises ``ClusterConnectError`` in seconds, without starting Ray (the
    CLI calls this before loading torch). Returns the resolved address (None: local dev mode)."""
    addr = resolve_address(address)
    if addr is None or ray.is_initialized():
        return addr
    if addr.startswith(("http://", "https://")):
        raise ClusterConnectError(
            f"'{addr}' is a dashboard (Jobs API) address; to run from here give the cluster's GCS address "
            f"(HOST:6379, what `ray start --head` prints), or submit the run as a job: "
            f"gaisnet submit --address {addr}")
    hp = _gcs_host_port(addr)
    if hp is not None:  # fail in seconds, not after Ray's own connection retries
        try:
            socket.create_connection(hp, timeout=5).close()
        except OSError as e:
            raise ClusterConnectError(f"no Ray cluster answers at {addr} ({e}); start one with "
                                      f"`ray start --head` (docs/cluster.md) or check the address") from None
    return addr


def _join(addr: str) -> None:
    check_address(addr)
    try:
        ray.init(address=addr, namespace="gaisnet", configure_logging=False, log_to_driver=True)
    except (ConnectionError, AuthenticationError) as e:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication (Ray's default for `ray start`), set "
                    "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token; "
                    "`ray get-auth-token` on the head prints it)")
        raise ClusterConnectError(f"could not join the Ray cluster at {addr}: {e}{hint}") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """``ray.init`` makes SIGTERM a bare ``sys.exit`` in the driver; turn it into a KeyboardInterrupt
    instead, so a ``kill`` unwinds like Ctrl-C (actors, Serve, then Ray stopped in order). Returns the
    handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)
