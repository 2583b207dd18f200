"""The cloud side: the foundation model, global aggregation, evaluation, the knowledge store."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..data import eval_examples, public_examples
from ..knowledge.aggregate import aggregator_of, check_finite, server_step
from ..knowledge.bases import BaseStore, refresh_model_dir
from ..knowledge.accounting import content_hash, payload_nbytes
from ..knowledge.store import KnowledgeStore
from ..inference.calibrate import answer_budget, calibrate_table, measure_domains
from ..inference.routing import ROUTING_NAME
from ..layout import MODEL_CONFIG_NAME, MODEL_DIR, RunLayout
from ..models.adapters import (adapter_state, attach_lora, base_state_view, load_adapter_state, load_base_state,
                               merged_base_state)
from ..models.build import FoundationPackage, build_foundation, family_of, load_foundation, save_foundation
from ..privacy import active_defenses
from ..privacy.dp import DPAggregator
from ..schemes import scheme_of
from .cloud_spmd import CloudPeers, peer_start, pretrain
from .evaluate import domain_loss, evaluate_domains
from .linkcodec import LinkCodec
from .linkmodel import transfer_s
from .messages import EdgeUpdate, StateDict


class CloudCore:
    """Builds the foundation model, writes it to ``run_dir/model``, and owns the global knowledge."""

    def __init__(self, cfg: Config, run_dir: str | Path, torch_device: str = "cpu", peers: CloudPeers | None = None,
                 resume_round: int | None = None, calibrate_every_round: bool = True):
        """``resume_round``: continue a run whose rounds 1..resume_round are on disk (see
        ``runfolder.resume_run_dir``): no pre-training, the base and knowledge as that round left them.
        ``calibrate_every_round`` (with ``serve.routing.calibrate``): calibrate the routing of every
        round's edge versions; False: only the last round's, the versions a later ``gaisnet serve``
        serves (``gaisnet run`` without ``--serve``: nothing serves the others while the run goes on)."""
        self.cfg = cfg
        self.calibrate_every_round = calibrate_every_round
        self.peers = peers  # ranks 1.. of the cloud world when cloud.workers > 1 (hfsl.cloud_spmd)
        self.peer_reports: list = []
        self.resume_round = resume_round
        if resume_round is not None and scheme_of(cfg).keeps_adapters:
            from ..config import ConfigError

            raise ConfigError(f"training.scheme '{cfg.training.scheme}' cannot resume: each device's own "
                              "adapter lives on the device, not in the run folder")
        run_dir = Path(run_dir)
        self.layout = RunLayout(run_dir)
        self.model_dir = self.layout.model
        if resume_round is not None:
            model, tokenizer = self._resumed_base(run_dir, resume_round)
            self.pretrain_losses = []
        else:
            model, tokenizer = build_foundation(cfg.model)
            self.pretrain_losses = self._pretrain(model, tokenizer, run_dir, torch_device)
            if self.pretrain_losses and cfg.cloud.engine == "deepspeed":
                # the engine exported a consolidated fp32 folder (ZeRO-3 leaves the module partitioned)
                model, tokenizer = load_foundation(self.model_dir, cfg.model.attn_implementation)
            else:
                save_foundation(model, tokenizer, self.model_dir)
        # the base as it travels down: a view of the cloud's own weights (no second copy of the model)
        self.package = FoundationPackage.from_model(model, tokenizer, copy=False)
        self.base_hash = content_hash(self.package.state_dict)
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.torch_device = torch_device
        # with a relay the base itself is versioned (knowledge/bases/bNNNN); without one it is model/
        self.bases = BaseStore(self.layout.bases) if cfg.relay.policy != "none" else None
        self.base_version = 0
        if self.bases is not None and resume_round is not None:
            self.base_version = self.bases.latest_version()
        elif self.bases is not None:  # before attach_lora, which injects LoRA layers into `model`
            self.bases.publish(0, model, tokenizer, {"parent_version": None, "policy": None, "round": 0,
                                                     "content_hash": self.base_hash})
        model.name_or_path = str(self.model_dir)  # what adapter_config.json names as the base
        self.peft = attach_lora(model, cfg.peft, family_of(model), base_name=str(self.model_dir))
        self.peft.to(torch_device)
        self.store = KnowledgeStore(self.layout.knowledge)
        self.edges_root = self.layout.edges  # each edge's own adapter, for serving
        self.eval_sets = eval_examples(cfg.data)
        self.dp = (DPAggregator(cfg.privacy, cfg.training.rounds, cfg.training.aggregation)
                   if cfg.privacy.dp_clip is not None else None)
        self.aggregator = aggregator_of(cfg.training)  # over the edges' updates, unless DP-FedAvg
        self.version = 0
        self._base_eval: dict | None = None  # the current base alone, once a relay has measured it
        self.knowledge: StateDict = {}
        self.fresh_adapter: StateDict = adapter_state(self.peft)  # LoRA B = 0: base + it == base
        if resume_round is not None:  # the very adapter v0 was, and the knowledge the last round left
            self.fresh_adapter = self.store.load(0)
            self.version = resume_round
            self.knowledge = dict(self.fresh_adapter) if self.bases is not None else self.store.load(resume_round)
            load_adapter_state(self.peft, self.knowledge, strict=True)

    def _pretrain(self, model, tokenizer, run_dir: Path, torch_device: str) -> list[float]:
        """Pre-train the whole foundation on the cloud's public data (with the peer ranks, if any)."""
        world, wait = None, None
        if self.cfg.training.pretrain_steps > 0:
            world, wait = peer_start(self.cfg, self.peers, "pretrain")
        losses = pretrain(self.cfg, model, tokenizer, run_dir, torch_device, world)
        if wait is not None:
            self.peer_reports.append(wait())
        return losses

    def _base_lineage(self) -> dict:
        """Which base an adapter version applies to (``base.path`` is relative to the run folder)."""
        if self.bases is None:
            return {"base": {"version": 0, "path": MODEL_DIR, "content_hash": self.base_hash}}
        path = self.bases.path(self.base_version).relative_to(self.run_dir)
        return {"base": {"version": self.base_version, "path": str(path), "content_hash": self.base_hash}}

    def _resumed_base(self, run_dir: Path, done: int):
        """The base round ``done`` left: its relayed base version, or model/ without a relay."""
        run = RunLayout(run_dir)
        folder = run.model
        if self.cfg.relay.policy != "none":
            folder = run.base_dir(done)
            if not (folder / MODEL_CONFIG_NAME).is_file():
                raise FileNotFoundError(f"cannot resume after round {done}: its base {folder} is missing")
        return load_foundation(folder, self.cfg.model.attn_implementation)

    def initial_knowledge(self) -> StateDict:
        """Version 0: the freshly initialised adapter (LoRA B = 0, so it equals the base model).
        A resumed run: the knowledge its last complete round left (nothing is published)."""
        wire = LinkCodec(self.cfg.links.codec).encode_adapter  # bf16 to the edges when a codec is on
        if self.resume_round is not None:
            return wire(self.knowledge)
        self.knowledge = dict(self.fresh_adapter)
        self.store.publish(0, self.knowledge, self.peft.peft_config["default"],
                           {"round": 0, "parent_version": None, **self._base_lineage()})
        return wire(self.knowledge)

    def evaluate(self) -> dict[str, dict[str, float]]:
        out = evaluate_domains(self.peft, self.tokenizer, self.eval_sets, self.cfg.model.max_seq_len,
                               self.cfg.data.system_prompt)
        if self._base_eval is None and self._adapter_adds_nothing():
            # LoRA with B = 0 adds exact zeros: these are the base's own numbers, which the first relay
            # would otherwise measure again (the evaluation before round 1 is such a one: 12-15 s on
            # the default job)
            self._base_eval = out
        return out

    def _adapter_adds_nothing(self) -> bool:
        """The adapter the cloud model holds now is LoRA with every B exactly zero."""
        return self.cfg.peft.method == "lora" and all(
            not p.any() for n, p in self.peft.named_parameters() if "lora_B" in n)

    def aggregate_round(self, round_idx: int, updates: list[EdgeUpdate]) -> tuple[StateDict, dict]:
        """Aggregate edge updates into the next version, publish it, evaluate it, and report.

        Raises a ``KnowledgeError`` (naming the edge) on a NaN/Inf or mismatched update, before
        anything is changed: the previous version stays current and on disk.
        """
        t = self.cfg.training
        sent, updates = updates, [replace(u, adapter=LinkCodec.decode_adapter(u.adapter),  # links.codec: bf16
                                          device_adapters={d: LinkCodec.decode_adapter(a)  # on the wire
                                                           for d, a in u.device_adapters.items()})
                                  for u in updates]
        dp_report = None
        if self.dp is not None:  # privacy.dp_*: clipped deltas, Gaussian noise, epsilon accounted
            knowledge, dp_report = self.dp.aggregate(round_idx, [u.adapter for u in updates],
                                                     [u.num_samples for u in updates], self.knowledge)
        else:
            knowledge = self.aggregator([u.adapter for u in updates], [u.num_samples for u in updates],
                                        reference=self.knowledge, sources=[u.edge_id for u in updates])
        # training.server_lr (FedOpt's global step); after DP noise it is post-processing: epsilon is unchanged
        knowledge = server_step(self.knowledge, knowledge, t.server_lr)
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
        metrics = round_metrics(self.cfg, round_idx, self.version, sent, knowledge)  # the bytes as sent
        metrics["privacy"] = {**active_defenses(self.cfg.privacy), **(dp_report or {})}
        if any(u.secure_aggregation for u in updates):  # per edge: members, survivors, bytes, unmask time
            metrics["privacy"]["secure_aggregation_edges"] = {u.edge_id: u.secure_aggregation for u in updates}
        if any(u.escalations for u in updates):  # serve.learn_from_escalations: what each edge folded in
            metrics["escalations_learned"] = {u.edge_id: u.escalations for u in updates if u.escalations}
        due = round_idx % t.eval_every == 0 or round_idx == t.rounds
        metrics["eval"] = self.evaluate() if due else {}
        if due and any(u.device_adapters for u in updates):  # ``local``: each device's own adapter
            metrics["eval_devices"] = self._evaluate_devices(updates)
            metrics["eval"] = _mean_eval([e["eval"] for e in metrics["eval_devices"].values()])
        if self.bases is not None:
            metrics["relay"] = self.relay(round_idx, updates)
        return LinkCodec(self.cfg.links.codec).encode_adapter(self.knowledge), metrics  # as the edges get it

    def _evaluate_devices(self, updates: list[EdgeUpdate]) -> dict:
        """Each device's own adapter (``local``) on every domain, and its mean over the domains of
        its own private data ("own") and over all ("all"). Which domains a device holds is derived
        from the config, as the device derives its data; no example leaves a device for this."""
        from ..data import device_examples
        from ..schemes.topology import devices_by_edge

        ids = [d for ds in devices_by_edge(self.cfg.topology).values() for d in ds]
        owned = {d: sorted({ex.domain for ex in exs}) for d, exs in device_examples(self.cfg.data, ids).items()}
        out = {}
        try:
            for u in updates:
                for d, adapter in u.device_adapters.items():
                    load_adapter_state(self.peft, adapter, strict=True)
                    ev = self.evaluate()
                    own = [k for k in owned[d] if k in ev]
                    out[d] = {"domains": own, "eval": ev,
                              "own": _mean_eval([{k: ev[k] for k in own}], over_domains=True),
                              "all": _mean_eval([ev], over_domains=True)}
        finally:
            load_adapter_state(self.peft, self.knowledge, strict=True)  # back to the stored version
        return out

    # ------------------------------------------------------------------------------- relay
    def evaluate_base(self) -> dict[str, dict[str, float]]:
        """The foundation model alone (no adapter), on every domain's held-out set."""
        with self.peft.disable_adapter():
            return self.evaluate()

    def relay(self, round_idx: int, updates: list[EdgeUpdate]) -> dict:
        """Relay up, data-free: absorb this round's knowledge into the base (``relay.policy``); then
        version the new base and make it current here (relay down starts from ``self.package``):
        the next round trains a fresh adapter on it. Returns what it did and the effect per domain.

        Nothing changes if the new weights are not finite: the error names the policy and round.
        """
        r = self.cfg.relay
        started = time.perf_counter()
        # the base has not changed since the last relay measured it alone: same weights, same numbers
        before = self._base_eval if self._base_eval is not None else self.evaluate_base()
        out: dict = {"policy": r.policy, "knowledge_version": self.version, "parent_base": self.base_version}
        if r.policy == "merge":
            state = merged_base_state(self.peft)
        else:
            from ..relay.distill import distill, distill_options

            def peers(data):
                world, wait = peer_start(self.cfg, self.peers, "distill", package=self.package, data=data)
                return world, (None if wait is None else lambda: self.peer_reports.append(wait()))

            result = distill(
                self.package.materialize().to(self.torch_device), self.peft, self.tokenizer,
                [u.adapter for u in updates], [float(u.num_samples) for u in updates], engine=self.cfg.cloud,
                num_inputs=r.distill_samples, num_heldout=r.distill_heldout,
                seq_len=r.distill_seq_len or self.cfg.model.max_seq_len, steps=r.distill_steps,
                batch_size=r.distill_batch_size, lr=r.distill_lr, temperature=r.distill_temperature,
                seed=self.cfg.training.seed * 1_000_003 + round_idx, restore=self.knowledge, peers=peers,
                **distill_options(self.cfg))  # relay.distill_inputs / distill_targets / ...
            state = result.state
            out["distill"] = result.summary()
        check_finite(state, source=f"the relayed base of round {round_idx} (relay.policy={r.policy})")
        if r.rehearse_steps > 0:
            state, out["rehearse"] = self._rehearse(state, round_idx)
            check_finite(state, source=f"the rehearsed base of round {round_idx} (relay.rehearse_steps)")
        load_base_state(self.peft, state)
        del state  # the cloud's own weights are the new base now: no second copy while it evaluates
        load_adapter_state(self.peft, self.fresh_adapter, strict=True)
        after = self._base_eval = self.evaluate_base()
        self.package = FoundationPackage(self.package.config, base_state_view(self.peft), self.tokenizer,
                                         self.package.attn_implementation)  # a view again, now of the new base
        self.base_hash = content_hash(self.package.state_dict)
        # the new base as a model to publish, over the cloud's own weights (no copy)
        new_base = self.package.materialize(share_weights=True)
        self.base_version += 1
        out.update(base_version=self.base_version, cloud_before=before, cloud_after=after)
        folder = self.bases.publish(self.base_version, new_base, self.tokenizer, {
            "parent_version": self.base_version - 1, "policy": r.policy, "round": round_idx,
            "knowledge_version": self.version, "content_hash": self.base_hash,
            "effect": {"cloud_before": before, "cloud_after": after, **({"distill": out["distill"]}
                                                                          if "distill" in out else {})}})
        refresh_model_dir(self.run_dir, folder)
        self.knowledge = dict(self.fresh_adapter)  # the next round starts from a fresh adapter on the new base
        out["wall_s"] = time.perf_counter() - started
        return out


    def _rehearse(self, state: StateDict, round_idx: int) -> tuple[StateDict, dict]:
        """``relay.rehearse_steps`` steps of the whole new base on the cloud's public data, in the
        cloud engine on this process alone: what the foundation knew is rehearsed before the base
        goes back down. Returns the rehearsed weights and the step losses."""
        r, public = self.cfg.relay, public_examples(self.cfg.data)
        if not public:
            return state, {"steps": 0, "losses": [], "why": "no public data (data.public_domains)"}
        from ..cloudengine.engine import CloudTrainer

        started = time.perf_counter()
        model = FoundationPackage(self.package.config, state, self.tokenizer,
                                  self.package.attn_implementation).materialize().to(self.torch_device)
        del state
        with CloudTrainer(model, self.cfg.cloud, lr=r.rehearse_lr, total_steps=r.rehearse_steps,
                          micro_batch_size=r.rehearse_batch_size) as trainer:
            losses = trainer.train(public, self.tokenizer, steps=r.rehearse_steps, batch_size=r.rehearse_batch_size,
                                   seq_len=self.cfg.model.max_seq_len, seed=self.cfg.training.seed * 1_000_003 + round_idx,
                                   system=self.cfg.data.system_prompt)
            rehearsed = trainer.state_dict_for(None)  # gathered under ZeRO-3
        return rehearsed, {"steps": len(losses), "losses": losses, "wall_s": time.perf_counter() - started}

    def _publish_edges(self, version: int, round_idx: int, updates: list[EdgeUpdate]) -> None:
        """Store each edge's adapter beside the global one, with its held-out loss per domain
        (measured here on the public eval sets), so serving can route a domain to its best edge;
        with ``serve.routing.calibrate``, also its calibrated routing (``inference.calibrate``:
        per domain, the confidence above which its answers are kept rather than escalated to the
        global version served by the cloud), published in the version as ``routing.json``."""
        calibrating = self.cfg.serve.routing.calibrate and self.eval_sets and (
            self.calibrate_every_round or round_idx >= self.cfg.training.rounds)
        if calibrating:
            budget, k = answer_budget(self.tokenizer, self.eval_sets), self.cfg.serve.routing.probe_tokens
            cloud = measure_domains(self.peft, self.tokenizer, self.eval_sets, self.cfg.data.system_prompt, budget, k)
        for u in updates:
            files = {}
            try:
                load_adapter_state(self.peft, u.adapter, strict=True)
                losses = {d: domain_loss(self.peft, self.tokenizer, ex, self.cfg.model.max_seq_len,
                                         system=self.cfg.data.system_prompt)
                          for d, ex in self.eval_sets.items()}
                if calibrating:
                    edge = measure_domains(self.peft, self.tokenizer, self.eval_sets, self.cfg.data.system_prompt,
                                           budget, k)
                    as_stored = {n: t.detach().to("cpu").contiguous() for n, t in u.adapter.items()}  # publish's hash
                    table = calibrate_table(u.edge_id, version, content_hash(as_stored), self.eval_sets, edge, cloud,
                                            {"adapter": "global", "version": version}, k)
                    files[ROUTING_NAME] = table.to_json().encode()
            finally:
                load_adapter_state(self.peft, self.knowledge, strict=True)  # back to the global knowledge
            KnowledgeStore(self.edges_root / u.edge_id).publish(
                version, u.adapter, self.peft.peft_config["default"],
                {"round": round_idx, "edge": u.edge_id, "global_version": version, **self._base_lineage(),
                 "clusters": u.clusters, "device_samples": u.device_samples, "num_samples": u.num_samples,
                 "eval_loss": losses},
                files=files,
            )


def _mean_eval(evals: list[dict[str, dict[str, float]]], over_domains: bool = False) -> dict:
    """The mean of several evaluations per domain and metric; ``over_domains``: of one
    evaluation over its domains, per metric ({} for no domain)."""
    if over_domains:
        rows = [m for ev in evals for m in ev.values()]
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
    domains = evals[0].keys() if evals else []
    return {dom: {k: sum(ev[dom][k] for ev in evals) / len(evals) for k in evals[0][dom]} for dom in domains}


def round_metrics(cfg: Config, round_idx: int, version: int, updates: list[EdgeUpdate], knowledge: StateDict) -> dict:
    """Losses, bytes per link and direction, and the modeled link delay of one round."""
    down_each = payload_nbytes(LinkCodec(cfg.links.codec).encode_adapter(knowledge))  # each edge pulled it
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
        **({"privacy_note": note} if (note := scheme_of(cfg).privacy_note) else {}),
        "train_loss": sum(losses) / len(losses),
        "bytes": bytes_,
        "bytes_up": bytes_["end_edge_up"] + bytes_["edge_cloud_up"],
        "bytes_down": bytes_["end_edge_down"] + bytes_["edge_cloud_down"],
        "modeled_comm_s": modeled,
        "edge_wall_s": {u.edge_id: u.wall_s for u in updates},
        "clusters": {u.edge_id: u.clusters for u in updates},
    }
