"""The case-study grid (issue 10), in one place: every effect, every cell, its overrides.

A cell is one run of the in-process runtime: the study's config (the user's CONFIG, else the
embedded default), then ``STUDY_BASE`` (what makes the whole grid fit the 2-core machine and puts
every scheme on equal terms), then the user's ``--set``, then the cell's own overrides (the swept
value wins over everything else). Cells of different effects that resolve to the same config (the
reference cell is in most effects) run once and are shared.

The reference cell (``REFERENCE``) is the default job as the study runs it: HFSL, one cluster of
three per edge (balanced), Dirichlet alpha 0.5, no public pre-training, relay none. Every effect
changes one thing of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------- the grid
# Applied to every cell, before the user's --set: sized so the whole default grid (20 runs on
# SmolLM2-135M) fits the 60 minutes asked on 2 CPU cores (README "Case study" has the measured time). Evaluation only
# after the last round; round 0 (the base alone) is evaluated by the cell runner, once per base.
STUDY_BASE: tuple[str, ...] = (
    "training.rounds=2",           # two aggregations: what one device learned reaches the others
    "training.local_steps=4",      # 24 device steps per round (the default job: 4 rounds x 48)
    "training.eval_every=2",       # evaluate after the last round only
    "relay.policy=none",           # every scheme on equal terms (`local` requires it)
    "serve.routing.calibrate=false",  # serving's routing tables: ~35 s a round, not part of the study
    "run.progress=false",
)
# the public pre-training the "pre-training: on" cell runs (whole model, AdamW, on data.public_domains)
PRETRAIN_ON: tuple[str, ...] = ("training.pretrain_steps=16", "training.pretrain_lr=0.0001",
                                "training.pretrain_batch_size=16")
# the distillation the relay effect's distill cell runs: half the default inputs and steps (each relay
# generates its inputs with every teacher and trains the whole base; at the defaults, ~4 min a relay)
DISTILL_SMALL: tuple[str, ...] = ("relay.distill_samples=48", "relay.distill_steps=15")
RANDOM_INIT = "study:random-init"  # model.path value the runner replaces by a randomly initialised copy of the model


@dataclass(frozen=True)
class Cell:
    """One point of one effect: ``key`` swept to ``value`` by ``overrides`` (on the reference)."""

    effect: str
    label: str                      # what the plot's axis shows
    key: str                        # the swept config key (or a name for a compound change)
    value: object
    overrides: tuple[str, ...] = ()
    note: str | None = None         # said in the row (e.g. why a cell is not private)
    optional: bool = False          # leave it out (with a message) when the config refuses it
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.effect}/{self.label}"


def _scheme(s: str, note: str | None = None) -> Cell:
    return Cell("schemes", s, "training.scheme", s, (f"training.scheme={s}",), note)


_NOT_PRIVATE = "NOT private: centralized pools every device's private data in one trainer (the upper bound)"


def default_grid() -> list[Cell]:
    """The default grid: 7 effects, 26 cells, 20 distinct runs (the reference is shared by 7 cells)."""
    cells = [
        # ---- schemes: the baselines and HFSL, same model, data, steps, seeds, relay none
        _scheme("centralized", _NOT_PRIVATE), _scheme("hfsl"), _scheme("fl"), _scheme("sl"), _scheme("local"),
        Cell("schemes", "hfsl server_lr 2", "training.server_lr", 2, ("training.scheme=hfsl", "training.server_lr=2"),
             "HFSL with FedOpt's global step 2: the cloud moves twice along the edges' average update"),
        Cell("schemes", "centralized, hfsl's sequential steps", "training.local_steps", "half",
             ("training.scheme=centralized",),
             _NOT_PRIVATE + "; half the steps: as many as one HFSL cluster takes in turn in a round (its two "
             "clusters train in parallel and are averaged), to tell the averaging from the step count",
             extra={"local_steps_scale": 0.5}),
        # ---- pre-training: the cloud's public pre-training off / on; the foundation's own pre-training off
        Cell("pretraining", "public off", "training.pretrain_steps", 0, ("training.pretrain_steps=0",)),
        Cell("pretraining", "public on", "training.pretrain_steps", 16, PRETRAIN_ON),
        Cell("pretraining", "random init", "model.path", "random init",
             (f"model.path={RANDOM_INIT}", "training.pretrain_steps=0"),
             "the same architecture and tokenizer, randomly initialised: no foundation pre-training at all"),
        # ---- fine-tuning: the base alone (round 0) vs after the rounds, both from the reference cell
        Cell("finetuning", "base vs rounds", "training.rounds", "0 vs rounds", ()),
        # ---- non-IID
        *[Cell("noniid", f"alpha {a}", "data.dirichlet_alpha", a,
               ("data.partition=dirichlet", f"data.dirichlet_alpha={a}")) for a in (0.1, 0.5, 10)],
        Cell("noniid", "iid", "data.partition", "iid", ("data.partition=iid",)),
        # ---- clustering: size 1 makes the method irrelevant (one cell)
        Cell("clustering", "size 1", "topology.cluster_size", 1,
             ("topology.cluster_size=1", "topology.clustering=balanced")),
        *[Cell("clustering", f"size {n} {m}", "topology.cluster_size", n,
               (f"topology.cluster_size={n}", f"topology.clustering={m}"), extra={"clustering": m})
          for n in (2, 3) for m in ("balanced", "sequential")],
        # ---- relay: the cloud alone (base without the adapter) on the device domains after the run
        Cell("relay", "none", "relay.policy", "none", ("relay.policy=none",)),
        Cell("relay", "merge", "relay.policy", "merge", ("relay.policy=merge",)),
        Cell("relay", "distill", "relay.policy", "distill", ("relay.policy=distill", *DISTILL_SMALL),
             "a halved distillation (48 inputs, 15 steps per relay) to fit the study's budget; "
             "benchmarks/relay_bench.py measures the configured one"),
        # ---- deep prompts vs LoRA (prefix only once the config knows it)
        Cell("knowledge", "lora", "peft.method", "lora", ("peft.method=lora",)),
        Cell("knowledge", "prefix", "peft.method", "prefix", ("peft.method=prefix",), optional=True),
        Cell("knowledge", "prefix lr 0.05", "training.lr", 0.05, ("peft.method=prefix", "training.lr=0.05"),
             "prefix tuning at 10x LoRA's learning rate (prefixes are known to need a larger one)", optional=True),
    ]
    return cells


EFFECTS: tuple[str, ...] = ("schemes", "pretraining", "finetuning", "noniid", "clustering", "relay", "knowledge")


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells of the effects named in ``only`` (all when empty); an unknown name is a ValueError
    that lists the known ones."""
    if not only:
        return list(cells)
    known = list(dict.fromkeys(c.effect for c in cells))
    bad = [o for o in only if o not in known]
    if bad:
        raise ValueError(f"unknown study effect(s) {bad}: use {known}")
    return [c for c in cells if c.effect in only]


# ---------------------------------------------------------------------------- resolution
def cell_overrides(cell: Cell, user_sets: list[str] | None, config: str | Path | None = None) -> list[str]:
    """What a cell applies on top of the study's config: STUDY_BASE, the user's --set, its own.
    A cell with ``extra["local_steps_scale"]`` takes that fraction of the local steps the rest
    resolves to (so ``--set training.local_steps=8`` halves to 4, not to a fixed 2)."""
    sets = [*STUDY_BASE, *(user_sets or []), *cell.overrides]
    scale = cell.extra.get("local_steps_scale")
    if scale is not None:
        from ..config import load_config

        steps = load_config(config, sets).training.local_steps
        sets.append(f"training.local_steps={max(1, round(steps * scale))}")
    return sets


def config_key(cfg_dict: dict) -> str:
    """The cell's identity: a hash of its resolved config (model.path of a random-init cell as
    its marker, so the key does not depend on where the study folder lies)."""
    text = json.dumps(cfg_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_key(cfg) -> str:
    """What the round-0 evaluation (the base alone, before any round) depends on: the model, the
    knowledge format (its version 0), the cloud's pre-training and the evaluation data. Cells with
    the same base key share one round-0 evaluation (measured by the first of them that runs)."""
    t, d = cfg.training, cfg.data
    return config_key({
        "model": cfg.model.model_dump(mode="json"), "peft": cfg.peft.model_dump(mode="json"),
        "cloud": cfg.cloud.model_dump(mode="json"),
        "pretrain": [t.pretrain_steps, t.pretrain_lr, t.pretrain_batch_size, t.seed],
        "data": {k: v for k, v in d.model_dump(mode="json").items()
                 if k not in ("partition", "dirichlet_alpha", "samples_per_device", "train_path")},
    })


def resolve(cell: Cell, config: str | Path | None, user_sets: list[str] | None):
    """(Config, its key) of a cell; ``ConfigError`` when the config refuses it."""
    from ..config import load_config

    cfg = load_config(config, cell_overrides(cell, user_sets, config))
    resolved = cfg.model_dump(mode="json")
    # a cell runs in one process (no actors), so how devices would map to actors cannot change it:
    # keyed as one actor per device whatever the pool says, as before `auto` existed
    resolved["topology"]["end_workers"] = None
    return cfg, config_key(resolved)
