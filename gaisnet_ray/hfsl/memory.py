"""How much memory each actor of a run needs at its peak, estimated before any actor starts.

Pure arithmetic over the model's sizes (``models.geometry.ModelGeometry``, read from its config
dict: no weights loaded), the cut, the topology and the scheme, so a run that cannot fit is refused in seconds, with the numbers, instead of Ray's memory
monitor killing a worker mid-round. Each actor's peak resident memory (what ``ru_maxrss`` reports,
and the round metrics' ``peak_rss_mb``) is the sum of

- ``runtime``: a working actor with Python, torch, transformers and peft imported (measured);
- ``weights``: the part of the foundation it holds (``models.parts``; fp32);
- ``transport``: the part as received through Ray's object store, mapped while the model is built
  and again at each relay down (the store hands it over without a copy; its pages count in the
  receiver's RSS, shared), and, for the cloud, every part it puts there;
- ``adapter``: the LoRA weights it trains, their gradients, AdamW moments and snapshots;
- ``activations``: what autograd keeps of one batch (``training.batch_size`` x
  ``model.max_seq_len``) per held block, for every batch in flight (an edge keeps one graph per
  cluster between a member's forward and backward), and, on the tier with the head, the logits of
  the supervised positions with their softmax and gradients;
- the cloud's ``phases`` (they follow one another; the largest counts): evaluation (held-out loss
  in batches of 16 rows), the relay (merge: the merged weights until they are loaded into the
  cloud's model; distillation: a student with its gradients and AdamW), pre-training (the whole
  model with AdamW) when ``training.pretrain_steps`` > 0 or the relay rehearses (``relay.rehearse_steps``).

The coefficients were calibrated against measured runs (benchmarks/memory_bench.py). The check
(``check_fits``) compares the machine memory the run takes -- every actor's private peak, the
shared libraries and the object store once, Ray's own processes and the driver -- with what Ray's
memory monitor lets it use: it kills workers above ``RAY_memory_usage_threshold`` (0.95 by default)
of the host's memory, counting every process, so memory other processes hold now is taken off.
Peaks of different actors rarely coincide, so the check errs on the safe side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Config
from ..models.geometry import ModelGeometry
from ..schemes import scheme_of

GB = 1e9
MB = 1e6

# A working tier actor without its model: Python + torch + transformers + peft + Ray's core worker
# (measured with Ray 2.60: 0.44 GB idle, about 0.5 GB once it trains); of that, the libraries'
# file-backed pages (about 0.18 GB) are shared by all actors of a machine.
RUNTIME_BYTES = int(0.50 * GB)
RUNTIME_SHARED_BYTES = int(0.18 * GB)
# Local dev mode besides the actors: raylet, GCS and other Ray processes, and the driver (which
# imports torch).
LOCAL_SYSTEM_BYTES = int(1.2 * GB)
# The head's logits (N, V) in fp32, N the supervised positions (``SplitModel.back_loss``): the logits'
# log-softmax kept for the backward and two gradients. SUPERVISED is the fraction of positions
# with a label assumed (answer-only loss; the built-in tasks have 10-25%).
LOGIT_COPIES = 3
SUPERVISED = 0.5
# per trainable LoRA parameter: fp32 weight + grad + 2 AdamW moments + the adapter's state copies
# (snapshot, knowledge held per cluster).
LORA_BYTES_PER_PARAM = 4 * 6
# the cloud's held-out loss (``hfsl.evaluate.domain_loss``): batches of ``evaluate.LOSS_BATCH`` rows
# (a test keeps the two equal), full (B, T, V) logits, their fp32 slice and the log-softmax
EVAL_BATCH = 16
EVAL_LOGIT_COPIES = 3
DEFAULT_MONITOR_THRESHOLD = 0.95  # Ray's memory monitor kills workers above this fraction


class InsufficientMemoryError(RuntimeError):
    """The run's estimated peak memory does not fit the machine or the cluster; nothing was started."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


# ------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class ActorEstimate:
    """The estimated peak of one actor of a kind, with its breakdown (bytes)."""

    kind: str  # "cloud" | "edge" | "end"
    count: int  # actors of this kind
    breakdown: dict[str, int]
    what: str = ""  # the part it holds, for the message

    @property
    def peak_bytes(self) -> int:
        """Peak RSS of one actor: what its ``ru_maxrss`` will say."""
        return sum(self.breakdown.values())

    @property
    def private_bytes(self) -> int:
        """Of the peak, what no other process shares (not the libraries, not object-store pages)."""
        return self.peak_bytes - RUNTIME_SHARED_BYTES - self.breakdown.get("transport", 0)

    @property
    def total_bytes(self) -> int:
        return self.count * self.peak_bytes


@dataclass(frozen=True)
class JobEstimate:
    actors: list[ActorEstimate]
    system_bytes: int = 0  # local dev mode: Ray's own processes and the driver
    model: str = ""
    object_store_bytes: int = 0  # the parts of the base in flight (once, however many actors map them)

    @property
    def actors_bytes(self) -> int:
        """All actors' peak RSS together (shared pages counted in every actor that maps them)."""
        return sum(a.total_bytes for a in self.actors)

    @property
    def total_bytes(self) -> int:
        """The machine's memory the run takes at most: each actor's private peak, the shared
        libraries and the object store once, and Ray itself with the driver."""
        return (sum(a.count * a.private_bytes for a in self.actors) + RUNTIME_SHARED_BYTES
                + self.object_store_bytes + self.system_bytes)

    def by_kind(self) -> dict[str, ActorEstimate]:
        return {a.kind: a for a in self.actors}

    def table(self) -> str:
        lines = []
        for a in self.actors:
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in a.breakdown.items() if v)
            lines.append(f"  {a.kind:5s} x{a.count:<4d} {a.peak_bytes / GB:6.2f} GB each, {a.total_bytes / GB:6.2f} GB "
                         f"in all ({parts}){'; holds ' + a.what if a.what else ''}")
        lines.append(f"  actors' peak RSS together {self.actors_bytes / GB:.2f} GB; as memory of the machine (libraries "
                     f"and object-store pages once{', Ray itself and the driver' if self.system_bytes else ''}): "
                     f"{self.total_bytes / GB:.2f} GB")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "system_bytes": self.system_bytes, "object_store_bytes": self.object_store_bytes,
                "actors_bytes": self.actors_bytes, "total_bytes": self.total_bytes,
                "actors": {a.kind: {"count": a.count, "peak_bytes": a.peak_bytes, "breakdown": dict(a.breakdown),
                                    "holds": a.what} for a in self.actors}}


def estimate_job(cfg: Config, model_config: dict, local: bool = True) -> JobEstimate:
    """Each actor kind's estimated peak memory for ``cfg`` on the model ``model_config`` (its
    ``PretrainedConfig.to_dict()``); ``local`` adds Ray's own processes and the driver."""
    from ..models.cuts import Cut, ModelPart, edge_part

    g = ModelGeometry.from_config(model_config)
    topo, t = cfg.topology, cfg.training
    n = g.num_layers
    eager = cfg.model.attn_implementation == "eager"
    seq = cfg.model.max_seq_len
    tokens = t.batch_size * seq
    act_block = g.activation_bytes_per_token_block(eager, seq)
    logits = int(LOGIT_COPIES * SUPERVISED * tokens * g.vocab * 4)
    lora_block = g.lora_params_per_block(cfg.peft.r, cfg.peft.target_modules) * LORA_BYTES_PER_PARAM
    whole = g.part_bytes(ModelPart.whole())
    scheme = scheme_of(cfg)
    fl = not scheme.splits  # devices hold the whole model, the edge none of it

    # end devices: the largest part any device holds (its cut); one batch in flight
    def cut_of(device: str) -> Cut:
        c = topo.cut_for(device)
        return Cut.from_layers(n, c.front_layers, c.back_layers)

    devices = [f"end-{e}-{d}" for e in range(topo.edges) for d in range(topo.devices_per_edge)]
    dev_parts = {ModelPart.whole()} if fl else {cut_of(d).device_part(n) for d in devices}
    dev_part = max(dev_parts, key=g.part_bytes)
    dev_blocks = len(dev_part.held_layers(n))
    end_actors = topo.end_pool or topo.num_devices
    hosted_parts = len(dev_parts) if topo.end_pool else 1  # a pool worker holds one model per part
    end = ActorEstimate("end", end_actors, {
        "runtime": RUNTIME_BYTES,
        "weights": hosted_parts * g.part_bytes(dev_part),
        "transport": hosted_parts * g.part_bytes(dev_part),
        "adapter": dev_blocks * lora_block,
        "activations": dev_blocks * tokens * act_block + logits,
    }, str(dev_part))

    # edges: the union of their devices' middle blocks; one graph per cluster in flight
    edge_parts = [ModelPart.of((), False, False) if fl else
                  edge_part(cut_of(f"end-{e}-{d}") for d in range(topo.devices_per_edge)) for e in range(topo.edges)]
    e_part = max(edge_parts, key=g.part_bytes)
    e_blocks = len(e_part.held_layers(n))
    clusters = scheme.clusters_in_flight(cfg, topo.devices_per_edge)  # each holds a forward graph at once
    edge = ActorEstimate("edge", topo.edges, {
        "runtime": RUNTIME_BYTES,
        "weights": g.part_bytes(e_part),
        "transport": g.part_bytes(e_part),
        "adapter": max(clusters, 1) * e_blocks * lora_block if e_blocks else 0,
        "activations": clusters * e_blocks * tokens * act_block,
    }, str(e_part))

    # the cloud: the whole model (+ LoRA), the parts it puts in the object store, and its largest phase
    put = sum(g.part_bytes(p) for p in dev_parts | set(edge_parts))
    eval_logits = EVAL_LOGIT_COPIES * EVAL_BATCH * seq * g.vocab * 4
    relay = 0
    if cfg.relay.policy == "merge":  # the merged weights, loaded into the model before it is evaluated
        relay = whole
    elif cfg.relay.policy == "distill":
        d_tokens = cfg.relay.distill_batch_size * (cfg.relay.distill_seq_len or seq)
        relay = 4 * whole + n * d_tokens * act_block + (LOGIT_COPIES + 3) * d_tokens * g.vocab * 4  # + teachers'
    pretrain = 0
    for steps, batch in ((t.pretrain_steps, t.pretrain_batch_size),
                         (cfg.relay.rehearse_steps if cfg.relay.policy != "none" else 0, cfg.relay.rehearse_batch_size)):
        if steps > 0:  # whole-model training (pre-training, or the relay's rehearsal): AdamW over all weights
            p_tokens = batch * seq
            pretrain = max(pretrain, 3 * whole + n * p_tokens * act_block + (LOGIT_COPIES + 1) * p_tokens * g.vocab * 4)
    cloud = ActorEstimate("cloud", cfg.cloud.workers, {
        "runtime": RUNTIME_BYTES,
        "weights": whole,
        "transport": put,
        "adapter": n * lora_block,
        "phases": max(eval_logits, relay, pretrain),
    }, "the whole model")
    name = cfg.model.path or cfg.model.preset
    return JobEstimate([cloud, edge, end], LOCAL_SYSTEM_BYTES if local else 0,
                       f"{name} ({g.family}, {n} blocks, {whole / GB:.2f} GB fp32)", put)


# ------------------------------------------------------------------------- the machine's memory
@dataclass(frozen=True)
class MemoryCapacity:
    """What Ray's memory monitor lets a run use on this machine."""

    total_bytes: int
    in_use_bytes: int  # held by other processes now
    threshold: float = DEFAULT_MONITOR_THRESHOLD

    @property
    def budget_bytes(self) -> int:
        return int(self.total_bytes * self.threshold) - self.in_use_bytes


def monitor_threshold() -> float:
    try:
        return float(os.environ.get("RAY_memory_usage_threshold", DEFAULT_MONITOR_THRESHOLD))
    except ValueError:
        return DEFAULT_MONITOR_THRESHOLD


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cgroup_limit() -> int | None:
    """The container's memory limit (cgroup v2 or v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


def local_capacity() -> MemoryCapacity:
    """This machine's memory (the container's limit if lower) and what is in use now."""
    info = _meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", total)
    limit = _cgroup_limit()
    in_use = total - available
    if limit is not None and limit < total:
        total = limit
        try:
            in_use = int(open("/sys/fs/cgroup/memory.current").read())
        except (OSError, ValueError):
            in_use = min(in_use, total)
    return MemoryCapacity(int(total), int(in_use), monitor_threshold())


def fit_problems(estimate: JobEstimate, capacity: MemoryCapacity) -> list[str]:
    """[] when the run fits this machine; else one line saying by how much it does not."""
    if estimate.total_bytes <= capacity.budget_bytes:
        return []
    return [f"the run needs about {estimate.total_bytes / GB:.1f} GB at its peak, this machine lets it use "
            f"{capacity.budget_bytes / GB:.1f} GB (total {capacity.total_bytes / GB:.1f} GB x Ray's memory monitor "
            f"threshold {capacity.threshold:g}, minus {capacity.in_use_bytes / GB:.1f} GB in use by other processes)"]


def refusal_message(estimate: JobEstimate, problems: list[str], where: str = "this machine") -> str:
    return "\n".join([
        f"this run does not fit {where}'s memory: " + "; ".join(problems),
        f"estimated peak memory per actor, model {estimate.model}:",
        estimate.table(),
        "Make it smaller: fewer devices (topology.devices_per_edge, or topology.end_workers to run devices as "
        "logical devices on a few actors), a smaller training.batch_size or model.max_seq_len, "
        "training.pretrain_steps=0, or a smaller model; or run on a cluster (--address). "
        "--no-resource-check skips this check.",
    ])


def model_config_of(cfg: Config) -> dict:
    """The model's config dict without loading weights (``models.sources.model_config_dict``)."""
    from ..models.sources import model_config_dict

    return model_config_dict(cfg.model)


def check_fits(cfg: Config, capacity: MemoryCapacity | None = None,
               model_config: dict | None = None) -> JobEstimate:
    """Estimate ``cfg``'s peak memory (local dev mode) and raise ``InsufficientMemoryError`` with the
    numbers if it does not fit ``capacity`` (default: this machine now). Returns the estimate."""
    estimate = estimate_job(cfg, model_config if model_config is not None else model_config_of(cfg), local=True)
    capacity = capacity if capacity is not None else local_capacity()
    problems = fit_problems(estimate, capacity)
    if problems:
        raise InsufficientMemoryError(refusal_message(estimate, problems))
    return estimate

