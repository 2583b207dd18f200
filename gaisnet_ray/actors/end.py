"""End devices as Ray actors, thin shells over ``hfsl.device.DeviceTrainer``.

- ``EndNode``: one device, one actor (the default).
- ``EndWorker``: a pool worker hosting many logical devices (``topology.end_workers``): each
  device's data and batch order stay its own, one tier model per cut is shared, and the worker runs
  one turn at a time. Private data never leaves the worker, as it never leaves an EndNode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from ..config import Config
from ..worker_setup import setup_tier_worker
from .audited import AuditedNode, BaseHolderNode, crosses_boundary, fetch_deferred

if TYPE_CHECKING:  # torch-free at import: the driver imports this module, only the actor needs torch
    from ..hfsl.messages import StateDict, TurnResult


SECAGG_STEPS = ("advertise", "share", "receive", "reveal")  # privacy.secround.DeviceSecAgg's device steps


def _secagg_step(core, step: str, args: tuple):
    """Run one secure-aggregation step of a device (``privacy.secure_aggregation``)."""
    if step not in SECAGG_STEPS or core.secagg is None:
        raise ValueError(f"{core.device_id}: no secure-aggregation step {step!r} (is privacy.secure_aggregation on?)")
    return getattr(core.secagg, step)(*args)


class RayEdgeLink:
    """The device's link to its edge: each call is an actor call on the edge (object store transport)."""

    def __init__(self, edge, cluster_id: str, device_id: str, timeout_s: float):
        self.edge, self.cluster_id, self.device_id, self.timeout_s = edge, cluster_id, device_id, timeout_s

    def forward(self, hidden):
        return ray.get(self.edge.forward.remote(self.cluster_id, self.device_id, hidden), timeout=self.timeout_s)

    def backward(self, grad):
        return ray.get(self.edge.backward.remote(self.cluster_id, self.device_id, grad), timeout=self.timeout_s)


@ray.remote
class EndNode(BaseHolderNode):
    def __init__(self, device_id: str, cfg: Config, package):
        """``package``: this device's part of the foundation (``hfsl.factory.device_part``), or
        ``audited.deferred(ref)`` to it."""
        from ..hfsl.audit import MessageAudit
        from ..hfsl.factory import device_trainer

        torch_device = setup_tier_worker(cfg, "end")
        package = fetch_deferred(package)
        self._audit = MessageAudit(device_id, cfg.run.audit_messages)
        self._audit.record("__init__", "in", {"package": package})
        self.device_id = device_id
        self.timeout_s = cfg.run.actor_timeout_s
        # The device derives its private examples itself; they are never sent to it or from it.
        self.core = device_trainer(cfg, device_id, package, torch_device)

    @crosses_boundary
    def profile(self) -> dict:
        """What the edge needs for clustering: the dataset size, not the data."""
        return {"device_id": self.device_id, "num_samples": self.core.num_samples}

    @crosses_boundary
    def train_turn(self, adapter: StateDict, edge, cluster_id: str, steps: int,
                   round_idx: int | None = None, device_id: str | None = None,
                   emulation=None) -> tuple[TurnResult, dict]:
        """Call with ``.options(num_returns=2)``: the turn's result (for the edge), and a small
        status the driver waits on."""
        if device_id not in (None, self.device_id):
            raise ValueError(f"{self.device_id} was asked to train as {device_id}")
        link = RayEdgeLink(edge, cluster_id, self.device_id, self.timeout_s)
        result = self.core.train_turn(adapter, link, cluster_id, steps, round_idx, emulation)
        return result, {"device": self.device_id, "steps": len(result.losses)}

    @crosses_boundary
    def secagg(self, step: str, device_id: str, *args):
        """A step of the edge's secure aggregation for this device: public keys, sealed shares,
        shares received, the unmasking reveal (``privacy.secround``)."""
        if device_id != self.device_id:
            raise ValueError(f"{self.device_id} was asked to run secure aggregation as {device_id}")
        return _secagg_step(self.core, step, args)


@ray.remote
class EndWorker(AuditedNode):
    def __init__(self, worker_id: str, cfg: Config, device_ids: list[str], *packages):
        """``packages``: one part of the foundation per distinct part its devices hold (per cut),
        each given or ``audited.deferred(ref)``."""
        from ..hfsl.audit import MessageAudit
        from ..hfsl.factory import device_trainers

        torch_device = setup_tier_worker(cfg, "end")
        packages = tuple(fetch_deferred(p) for p in packages)
        self._audit = MessageAudit(worker_id, cfg.run.audit_messages)
        self._audit.record("__init__", "in", {"devices": device_ids, "packages": list(packages)})
        self.worker_id = worker_id
        self.timeout_s = cfg.run.actor_timeout_s
        # every logical device derives its own private examples here; none are sent in or out
        self.cores = device_trainers(cfg, device_ids, packages, torch_device, share_model=True)

    @crosses_boundary
    def profiles(self) -> list[dict]:
        return [{"device_id": d, "num_samples": c.num_samples} for d, c in self.cores.items()]

    @crosses_boundary
    def train_turn(self, adapter: StateDict, edge, cluster_id: str, steps: int, round_idx: int | None,
                   device_id: str, emulation=None) -> tuple[TurnResult, dict]:
        core = self.cores.get(device_id)
        if core is None:
            raise ValueError(f"{self.worker_id} does not host {device_id}")
        link = RayEdgeLink(edge, cluster_id, device_id, self.timeout_s)
        result = core.train_turn(adapter, link, cluster_id, steps, round_idx, emulation)
        return result, {"device": device_id, "steps": len(result.losses)}

    @crosses_boundary
    def secagg(self, step: str, device_id: str, *args):
        """A secure-aggregation step for the hosted device ``device_id`` (see ``EndNode.secagg``)."""
        core = self.cores.get(device_id)
        if core is None:
            raise ValueError(f"{self.worker_id} does not host {device_id}")
        return _secagg_step(core, step, args)

    @crosses_boundary
    def update_base(self, *packages) -> int:
        """Relay down into each shared tier model once, from the part it holds; returns the bytes taken."""
        splits = {id(c.split): c for c in self.cores.values()}
        by_part = {p.part_spec: p for p in packages}
        return sum(c.update_base(by_part[c.part]) for c in splits.values())
