"""``serve:``: the serving layer's settings (the deployments themselves are ``gaisnet_ray.serve``).

Every field has a description (it feeds the README's config table) and unknown keys are errors,
like every other section. Where replicas run is ``tiers.resource_shape``'s business: each tier's
replicas take a small share of the tier resource, on the nodes ``topology.<tier>.node_labels`` pins.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..tiers import serve_placements, total_demand
from .section import Section


class ServeTier(Section):
    num_replicas: int = Field(1, ge=1, description="Replicas of this deployment.")
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs each replica asks for.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; >0 serves on CUDA.")


class RoutingSettings(Section):
    max_mean_entropy: float = Field(
        2.5, ge=0, description="Escalate to the cloud when the edge answer's mean token entropy (nats) is above this."
    )
    min_token_prob: float = Field(
        0.05, ge=0, le=1, description="Escalate to the cloud when any token the edge emitted had a lower probability."
    )
    probe_tokens: int = Field(
        8, ge=1, description="Edge tokens the policy judges before the first chunk goes out (the whole answer when shorter): kept, they stream on; escalated, the cloud answers."
    )
    calibrate: bool = Field(
        True, description="When the cloud publishes an edge adapter, calibrate per domain on the held-out eval sets "
                          "the confidence threshold that keeps tiered exact match >= the cloud's while escalating the "
                          "fewest, and store it with the version (routing.json); the two limits above are the fallback "
                          "for versions and domains without one. `gaisnet run --serve` calibrates every round's versions; "
                          "without --serve only the last round's (the ones a later `gaisnet serve` serves; "
                          "calibrate others after the run with `python -m gaisnet_ray.inference.calibrate`)."
    )


class LearnSettings(Section):
    """Bounds of ``serve.learn_from_escalations`` (serve/escalations.py, inference/learn.py)."""

    store_dir: str | None = Field(
        None, description="Folder each edge keeps its escalations in (<dir>/<edge>/); None: the run folder's edges_private/<edge>/."
    )
    max_records: int = Field(256, ge=1, description="Escalated prompts (with the cloud's answers) an edge keeps; the oldest go first.")
    max_chars: int = Field(2000, ge=1, description="Longest prompt or answer (characters) stored; longer ones are not kept.")
    retention_s: float = Field(86400.0, gt=0, description="Stored escalations older than this are dropped.")
    min_records: int = Field(4, ge=1, description="Distil only once the edge holds at least this many escalations.")
    every_records: int = Field(
        0, ge=0, description="Also distil again after this many new escalations (0: only when a new knowledge version arrives)."
    )
    steps: int = Field(12, ge=1, description="Optimizer steps of one distillation into the edge's serving adapter.")
    batch_size: int = Field(8, ge=1, description="Escalations per distillation step.")
    lr: float = Field(
        0.0005, gt=0, description="Learning rate of the distillation (AdamW on LoRA B); higher overwrites neighbouring facts."
    )
    max_share: float = Field(
        0.25, ge=0, lt=1, description="Largest weight the escalations get in the edge's aggregation of a round (gaisnet run --serve)."
    )
    anchors: bool = Field(
        False, description="Also keep (same bounds) the answers the edge gave itself and distil them beside the escalations, so learning the cloud's answers moves the rest less."
    )


class ServeSettings(Section):
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens one request may generate.")
    default_new_tokens: int = Field(16, ge=1, description="Tokens generated when a request does not say.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (BOS included); None: the model's context minus one."
    )
    routing: RoutingSettings = RoutingSettings()
    max_ongoing_requests: int = Field(4, ge=1, description="Concurrent requests per tier replica.")
    max_queued_requests: int = Field(
        8, ge=1, description="Requests waiting for a busy tier before new ones get 503 + Retry-After."
    )
    batch_max_size: int = Field(
        8, ge=1, description="Requests an edge or cloud replica decodes together in one forward pass per step (at most "
                             "max_ongoing_requests); 1: each request generates on its own."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long a batch waits for more requests to join before it starts (seconds)."
    )
    ingress_max_ongoing_requests: int = Field(
        64, ge=1, description="HTTP requests one ingress replica admits at a time (the /health route is not counted)."
    )
    ingress_max_queued_requests: int = Field(
        64, ge=0, description="HTTP requests waiting for admission; beyond this the ingress answers a JSON 503 + Retry-After."
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds) sent with a 503 on overload.")
    poll_interval_s: float = Field(
        2.0, gt=0, description="How often deployments look for a new knowledge version (hot swap)."
    )
    split_front_layers: int | None = Field(
        None, ge=1, description="Blocks in the device front for split inference; None: the run's topology.cut.front_layers."
    )
    split_session_ttl_s: float = Field(300.0, gt=0, description="Drop an idle split-inference session (its KV cache) after this.")
    split_max_payload_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest activation payload POST /v1/split/forward accepts."
    )
    max_split_sessions: int = Field(
        64, ge=1, description="Open split-inference sessions per edge replica; opening one more evicts the longest idle."
    )
    max_body_bytes: int = Field(
        2**20, ge=1024, description="Largest request body (bytes) of every route but POST /v1/split/forward; larger: 413."
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="A request body not fully received within this many seconds gets 408 and is dropped."
    )
    api_keys: list[str] = Field(
        [], description="Bearer keys; with any key set (here, in api_key_file or $GAISNET_API_KEYS) every route but /health needs one."
    )
    api_key_file: str | None = Field(
        None, description="A file with one API key per line (blank lines and # comments skipped), added to serve.api_keys."
    )
    learn_from_escalations: bool = Field(
        False, description="Each edge keeps what it escalated with the cloud's answers (on its node only) and distils them into its adapter between rounds."
    )
    learn: LearnSettings = LearnSettings()
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica.")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="Give up starting the app after this, naming the deployments not running and why."
    )
    ingress: ServeTier = ServeTier(num_cpus=0.1)
    end: ServeTier = ServeTier(num_cpus=0.25)
    edge: ServeTier = ServeTier(num_cpus=0.5)
    cloud: ServeTier = ServeTier(num_cpus=0.5)

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"serve.default_new_tokens ({self.default_new_tokens}) must be <= serve.max_new_tokens "
                f"({self.max_new_tokens})"
            )
        bad = [i for i, k in enumerate(self.api_keys) if not k or k != k.strip() or any(c.isspace() for c in k)]
        if bad:
            raise ValueError(f"serve.api_keys[{bad[0]}]: a key must be non-empty and contain no whitespace")
        return self

    def required_resources(self) -> dict[str, float]:
        """What the serving deployments ask of Ray in all (tier resources, ``CPU``, ``GPU``), to add to
        a local dev-mode node's resources."""
        return total_demand(serve_placements(self))
