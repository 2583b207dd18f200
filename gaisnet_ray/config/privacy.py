"""``privacy:``: what protects a device's data on its way up: activation clipping and noise, the
NoPeek penalty, differentially private aggregation at the cloud, and secure aggregation at the edge."""

from __future__ import annotations

from pydantic import Field, model_validator

from .section import Section


class PrivacyConfig(Section):
    activation_clip: float | None = Field(
        None, gt=0, description="Clip the L2 norm of each token's hidden state a device sends its edge to this; "
        "None: not clipped. Needed by activation_noise (the noise is relative to it)."
    )
    activation_noise: float = Field(
        0.0, ge=0, description="Gaussian noise added to each clipped hidden-state row a device sends its edge, as a "
        "noise-to-signal ratio (noise L2 norm / activation_clip); 0: none. Defends the device's tokens against "
        "inversion by the edge (see README, Privacy)."
    )
    activation_denoise: bool = Field(
        False, description="The device removes what it added (clip and noise) from the residual stream the edge "
        "returns before its back runs: the back sees its own hidden state plus the middle's change computed on "
        "the noisy one. The edge receives the same noisy rows; with few middle blocks (a deep cut) training "
        "keeps part of its quality (README, Privacy). Needs activation_clip."
    )
    send_gradients: bool = Field(
        True, description="false: the device sends its edge no gradient. The edge's blocks run forward only, "
        "frozen (their adapter keeps the knowledge's values, as with training.edge_lr 0), and the device's front "
        "trains through the residual stream alone: the middle's own contribution counts as a constant input. "
        "The gradient at the middle's output carries the labels (README, Privacy); with this nothing but the "
        "hidden states leaves the device."
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
    secure_aggregation: bool = Field(
        False, description="Secure aggregation of device adapters at each edge (pairwise masks, Shamir-shared "
        "keys, dropouts recovered): the edge learns only their weighted sum. Needs training.scheme fl, "
        "aggregation fedavg, no clip_norm, and >= 2 devices per edge."
    )

    @model_validator(mode="after")
    def _check(self) -> "PrivacyConfig":
        if self.activation_noise > 0 and self.activation_clip is None:
            raise ValueError("privacy.activation_noise needs privacy.activation_clip (the noise is relative to it)")
        if self.activation_denoise and self.activation_clip is None:
            raise ValueError("privacy.activation_denoise needs privacy.activation_clip (it removes the clip and noise)")
        if self.dp_clip is not None and (self.dp_epsilon is None) == (self.dp_noise_multiplier is None):
            raise ValueError("privacy.dp_clip needs exactly one of privacy.dp_epsilon and privacy.dp_noise_multiplier")
        if self.dp_clip is None and (self.dp_epsilon is not None or self.dp_noise_multiplier is not None):
            raise ValueError("privacy.dp_epsilon / privacy.dp_noise_multiplier need privacy.dp_clip")
        return self
