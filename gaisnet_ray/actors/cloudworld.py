"""The cloud's peer workers: ranks 1.. of a multi-worker DeepSpeed world, as Ray actors.

With ``cloud.workers`` = N > 1 the ``CloudNode`` (rank 0) starts N-1 ``CloudWorker`` actors, placed
like it by the cloud tier resource and ``topology.cloud`` CPUs/GPUs. For each training job the
cloud picks a rendezvous (its own address and a free port; loopback when every worker shares its
node), starts the job on every worker, and runs it itself: one ``torch.distributed`` world per job,
opened and closed (barrier, destroy) by each rank. The workers are owned by the CloudNode, so they
end with it.
"""

from __future__ import annotations

import ray

from ..cloudengine.world import WorldSpec, free_port
from ..config import Config
from ..hfsl.cloud_spmd import run_peer_job
from ..worker_setup import setup_tier_worker
from .placement import tier_options


@ray.remote
class CloudWorker:
    def __init__(self, cfg: Config, run_dir: str, rank: int):
        self.cfg, self.run_dir, self.rank = cfg, run_dir, rank
        self.torch_device = setup_tier_worker(cfg, "cloud")

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run_job(self, job: str, world: WorldSpec, kwargs: dict) -> dict:
        return run_peer_job(self.cfg, self.run_dir, job, world, self.torch_device, **kwargs)


class RayCloudPeers:
    """``hfsl.cloud_spmd.CloudPeers`` over ``CloudWorker`` actors; lives inside the CloudNode."""

    def __init__(self, cfg: Config, run_dir: str):
        self.size = cfg.cloud.workers
        self.timeout_s = cfg.run.actor_timeout_s
        self.workers = [CloudWorker.options(**tier_options("cloud", cfg.topology.cloud)).remote(cfg, run_dir, r)
                        for r in range(1, self.size)]
        ready, pending = ray.wait([w.__ray_ready__.remote() for w in self.workers], num_returns=len(self.workers),
                                  timeout=self.timeout_s)
        ray.get(ready)
        if pending:
            raise RuntimeError(
                f"{len(pending)} of {self.size - 1} cloud workers not placed after {self.timeout_s:.0f}s: "
                f"cloud.workers={self.size} needs {self.size} units of the cloud tier resource and "
                f"topology.cloud CPUs/GPUs each; the cluster has {ray.available_resources()}")
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([w.node_id.remote() for w in self.workers], timeout=self.timeout_s)
        # one node: rendezvous on loopback; several: on this node's address
        self.host = "127.0.0.1" if all(n == here for n in nodes) else ray.util.get_node_ip_address()

    def start(self, job: str, **kwargs):
        port = free_port(self.host)
        refs = [w.run_job.remote(job, WorldSpec(r, self.size, self.host, port), kwargs)
                for r, w in enumerate(self.workers, start=1)]

        def wait() -> list:
            return ray.get(refs, timeout=self.timeout_s)

        return WorldSpec(0, self.size, self.host, port), wait
