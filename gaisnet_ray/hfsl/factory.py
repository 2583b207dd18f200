"""Building the tiers from the config: which part of the foundation each node holds, and the
edge and device trainers over those parts.

Both runtimes build through here (the Ray actors in ``actors/`` and ``inprocess.InProcessGaisNet``),
so a node holds and trains the same thing in either; what a node holds is its scheme's answer
(``gaisnet_ray.schemes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Config
from ..schemes import scheme_of
from ..schemes.topology import devices_by_edge

# Importing this module is torch-free (the Ray driver does, before Ray starts); the parts import
# torch when computed (models.split), the trainers their data, devices and codecs where built.
if TYPE_CHECKING:
    from ..models.cuts import Cut, ModelPart
    from .device import DeviceTrainer
    from .edge import EdgeTrainer


def device_seed(cfg: Config, device: str) -> int:
    """Per-device batch-order seed, stable across processes (no Python hash())."""
    e, d = (int(x) for x in device.split("-")[1:])
    return cfg.training.seed * 1_000_003 + e * 10_007 + d


# ------------------------------------------------------------------------ what each tier holds
def device_part(cfg: Config, device: str, num_layers: int) -> ModelPart:
    """The part of the foundation ``device`` holds (its front and back blocks, embeddings, final
    norm and head; the whole model under a scheme without a split, e.g. FL)."""
    return scheme_of(cfg).device_part(cfg.topology, device, num_layers)


def edge_part_of(cfg: Config, devices: list[str], num_layers: int) -> ModelPart:
    """The part an edge serving ``devices`` holds: their middle blocks (nothing under FL)."""
    return scheme_of(cfg).edge_part(cfg.topology, devices, num_layers)


def edge_cuts(cfg: Config, devices: list[str], num_layers: int) -> dict[str, Cut | None]:
    """Device -> the cut it trains with (None: the whole model, no split step with the edge)."""
    scheme = scheme_of(cfg)
    return {d: scheme.device_cut(cfg.topology, d, num_layers) for d in devices}


def tier_parts(cfg: Config, num_layers: int) -> dict[str, ModelPart]:
    """Node id -> the part it holds, for every edge and end device of the topology."""
    by_edge = devices_by_edge(cfg.topology)
    out = {e: edge_part_of(cfg, ds, num_layers) for e, ds in by_edge.items()}
    out.update({d: device_part(cfg, d, num_layers) for ds in by_edge.values() for d in ds})
    return out


def package_for(packages: list, part: ModelPart):
    """The first of ``packages`` (``FoundationPackage``s) that holds ``part``."""
    for p in packages:
        if p.part_spec.covers(part, p.num_layers):
            return p
    raise ValueError(f"no package holds {part}; given: {[str(p.part_spec) for p in packages]}")


# ---------------------------------------------------------------------------------- trainers
def edge_trainer(cfg: Config, edge: str, devices: list[str], package, torch_device: str = "cpu",
                 run_dir: str | None = None) -> EdgeTrainer:
    """``package``: the edge's part (``edge_part_of``) or any package holding it, e.g. the whole.
    ``run_dir``: with ``serve.learn_from_escalations``, where the edge's private area is (what its
    serving replica learned from escalations joins the edge's aggregation)."""
    from .edge import EdgeTrainer
    from .linkcodec import LinkCodec

    n = package.num_layers
    learn = cfg.serve.learn_from_escalations and run_dir is not None
    if learn:
        from ..inference.learn import edge_area
    return EdgeTrainer(edge, package, edge_part_of(cfg, devices, n), cfg.peft, cfg.training,
                       edge_cuts(cfg, devices, n), cfg.links.end_edge, torch_device,
                       report_devices=scheme_of(cfg).keeps_adapters, codec=LinkCodec(cfg.links.codec),
                       learned_dir=edge_area(run_dir, cfg.serve.learn.store_dir, edge) if learn else None,
                       learned_share=cfg.serve.learn.max_share if learn else 0.0,
                       forward_only=not cfg.privacy.send_gradients)


def device_trainer(cfg: Config, device: str, package, torch_device: str = "cpu") -> DeviceTrainer:
    """A device with its own private examples (it derives them itself; they are never sent)."""
    return device_trainers(cfg, [device], package, torch_device)[device]


def device_trainers(cfg: Config, devices: list[str], packages, torch_device: str = "cpu",
                    share_model: bool = False) -> dict[str, DeviceTrainer]:
    """Logical devices, each with its own private examples (derived here from the data config,
    never sent). ``packages``: one ``FoundationPackage`` or several (a pool worker gets one part per
    cut of its devices); each device builds only its part. ``share_model``: one tier model per part
    for all of them (a pool worker)."""
    from ..data import device_examples
    from .device import DeviceTrainer
    from .linkcodec import LinkCodec

    all_ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    scheme = scheme_of(cfg)
    examples = scheme.device_data(cfg, device_examples(cfg.data, all_ids))  # centralized: pooled in one
    packages = [packages] if hasattr(packages, "state_dict") else list(packages)
    n = packages[0].num_layers
    shared: dict = {}
    out = {}
    for d in devices:
        part = scheme.device_part(cfg.topology, d, n)
        split = shared.get(part) if share_model else None
        out[d] = DeviceTrainer(d, package_for(packages, part), cfg.peft, cfg.training, examples[d],
                               cfg.model.max_seq_len, scheme.device_cut(cfg.topology, d, n), device_seed(cfg, d),
                               torch_device, split=split, system=cfg.data.system_prompt, privacy=cfg.privacy,
                               keep_adapter=scheme.keeps_adapters, codec=LinkCodec(cfg.links.codec))
        if share_model:
            shared.setdefault(part, out[d].split)
    return out


def relay_down_bytes(written: dict[str, int]) -> dict:
    """Bytes of the new base each edge and device took (each keeps only the segments it runs)."""
    edges = sum(v for k, v in written.items() if k.startswith("edge-"))
    ends = sum(v for k, v in written.items() if k.startswith("end-"))
    return {"edge_cloud_down": edges, "end_edge_down": ends, "per_node": written}
