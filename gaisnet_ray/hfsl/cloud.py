"""The cloud side: the foundation model, global aggregation, evaluation, the knowledge store."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data import eval_examples, public_examples
from ..knowledge.aggregate import aggregate
from ..knowledge.codec import content_hash, payload_nbytes
from ..knowledge.store import KnowledgeStore
from ..models.adapters import adapter_state, attach_lora, load_adapter_state
from ..cloudengine import CloudTrainer
from ..models.build import FoundationPackage, build_foundation, family_of, load_foundation, save_foundation
from .evaluate import domain_loss, evaluate_domains
from .linkmodel import transfer_s
from .messages import EdgeUpdate, StateDict


class CloudCore:
    """Builds the foundation model, writes it to ``run_dir/model``, and owns the global knowledge."""

    def __init__(self, cfg: Config, run_dir: str | Path, torch_device: str = "cpu"):
        self.cfg = cfg
        run_dir = Path(run_dir)
        model, tokenizer = build_foundation(cfg.model)
        self.pretrain_losses = self._pretrain(model, tokenizer, run_dir, torch_device)
        if self.pretrain_losses and cfg.cloud.engine == "deepspeed":
            # the engine exported a consolidated fp32 folder (ZeRO-3 leaves the module partitioned)
            self.model_dir = run_dir / "model"
            model, tokenizer = load_foundation(self.model_dir, cfg.model.attn_implementation)
        else:
            self.model_dir = save_foundation(model, tokenizer, run_dir / "model")
        self.package = FoundationPackage.from_model(model, tokenizer)
        self.base_hash = content_hash(self.package.state_dict)
        self.tokenizer = tokenizer
        model.name_or_path = str(self.model_dir)  # what adapter_config.json names as the base
        self.peft = attach_lora(model, cfg.peft, family_of(model), base_name=str(self.model_dir))
        self.peft.to(torch_device)
        self.store = KnowledgeStore(run_dir / "knowledge")
        self.edges_root = run_dir / "knowledge" / "edges"  # each edge's own adapter, for serving
        self.eval_sets = eval_examples(cfg.data)
        self.version = 0
        self.knowledge: StateDict = {}

    def _pretrain(self, model, tokenizer, run_dir: Path, torch_device: str) -> list[float]:
        """Pre-train the whole foundation on the cloud's public data (torch or DeepSpeed engine)."""
        t, public = self.cfg.training, public_examples(self.cfg.data)
        if t.pretrain_steps <= 0 or not public:
            return []
        model.to(torch_device)
        with CloudTrainer(model, self.cfg.cloud, lr=t.pretrain_lr, total_steps=t.pretrain_steps,
                          micro_batch_size=t.pretrain_batch_size) as trainer:
            losses = trainer.train(public, tokenizer, steps=t.pretrain_steps, batch_size=t.pretrain_batch_size,
                                   seq_len=self.cfg.model.max_seq_len, seed=t.seed,
                                   checkpoint_dir=run_dir / "cloud" / "checkpoints")
            if self.cfg.cloud.engine == "deepspeed":
                trainer.export_hf(run_dir / "model", tokenizer)
        model.to("cpu")
        return losses

    def _base_lineage(self) -> dict:
        return {"base": {"path": "model", "content_hash": self.base_hash}}

    def initial_knowledge(self) -> StateDict:
        """Version 0: the freshly initialised adapter (LoRA B = 0, so it equals the base model)."""
        self.knowledge = adapter_state(self.peft)
        self.store.publish(0, self.knowledge, self.peft.peft_config["default"],
                           {"round": 0, "parent_version": None, **self._base_lineage()})
        return self.knowledge

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate_domains(self.peft, self.tokenizer, self.eval_sets, self.cfg.model.max_seq_len)

    def aggregate_round(self, round_idx: int, updates: list[EdgeUpdate]) -> tuple[StateDict, dict]:
        """Aggregate edge updates into the next version, publish it, evaluate it, and report.

        Raises a ``KnowledgeError`` (naming the edge) on a NaN/Inf or mismatched update, before
        anything is changed: the previous version stays current and on disk.
        """
        t = self.cfg.training
        knowledge = aggregate(t.aggregation, [u.adapter for u in updates], [u.num_samples for u in updates],
                              reference=self.knowledge, trim_ratio=t.trim_ratio, clip_norm=t.clip_norm,
                              sources=[u.edge_id for u in updates])
        parent = self.version
        lineage = {
            "round": round_idx,
            "parent_version": parent,
            **self._base_lineage(),
            "scheme": t.scheme,
            "aggregation": t.aggregation,
            "edges": {u.edge_id: {"clusters": u.clusters, "device_samples": u.device_samples,
                                  "num_samples": u.num_samples} for u in updates},
            "num_samples": sum(u.num_samples for u in updates),
        }
        # publish first: if writing fails, the cloud stays at the last version that is on disk
        self.store.publish(parent + 1, knowledge, self.peft.peft_config["default"], lineage)
        load_adapter_state(self.peft, knowledge, strict=True)
        self.knowledge, self.version = knowledge, parent + 1
        self._publish_edges(parent + 1, round_idx, updates)
        metrics = round_metrics(self.cfg, round_idx, self.version, updates, knowledge)
        due = round_idx % t.eval_every == 0 or round_idx == t.rounds
        metrics["eval"] = self.evaluate() if due else {}
        return knowledge, metrics


    def _publish_edges(self, version: int, round_idx: int, updates: list[EdgeUpdate]) -> None:
        """Store each edge's adapter beside the global one, with its held-out loss per domain
        (measured here on the public eval sets), so serving can route a domain to its best edge."""
        for u in updates:
            try:
                load_adapter_state(self.peft, u.adapter, strict=True)
                losses = {d: domain_loss(self.peft, self.tokenizer, ex, self.cfg.model.max_seq_len)
                          for d, ex in self.eval_sets.items()}
            finally:
                load_adapter_state(self.peft, self.knowledge, strict=True)  # back to the global knowledge
            KnowledgeStore(self.edges_root / u.edge_id).publish(
                version, u.adapter, self.peft.peft_config["default"],
                {"round": round_idx, "edge": u.edge_id, "global_version": version, **self._base_lineage(),
                 "clusters": u.clusters, "device_samples": u.device_samples, "num_samples": u.num_samples,
                 "eval_loss": losses},
            )


def round_metrics(cfg: Config, round_idx: int, version: int, updates: list[EdgeUpdate], knowledge: StateDict) -> dict:
    """Losses, bytes per link and direction, and the modeled link delay of one round."""
    down_each = payload_nbytes(knowledge)  # the global adapter each edge pulled at round start
    bytes_ = {
        "end_edge_up": sum(u.end_edge.bytes_up for u in updates),
        "end_edge_down": sum(u.end_edge.bytes_down for u in updates),
        "edge_cloud_up": sum(payload_nbytes(u.adapter) for u in updates),
        "edge_cloud_down": down_each * len(updates),
    }
    link = cfg.links.edge_cloud
    # Edges run in parallel: pull global (1 msg) -> devices' turns -> push update (1 msg).
    modeled = max(transfer_s(down_each, 1, link) + u.modeled_comm_s + transfer_s(payload_nbytes(u.adapter), 1, link)
                  for u in updates)
    losses = [x for u in updates for x in u.losses]
    return {
        "round": round_idx,
        "version": version,
        "scheme": cfg.training.scheme,
        "train_loss": sum(losses) / len(losses),
        "bytes": bytes_,
        "bytes_up": bytes_["end_edge_up"] + bytes_["edge_cloud_up"],
        "bytes_down": bytes_["end_edge_down"] + bytes_["edge_cloud_down"],
        "modeled_comm_s": modeled,
        "edge_wall_s": {u.edge_id: u.wall_s for u in updates},
        "clusters": {u.edge_id: u.clusters for u in updates},
    }
