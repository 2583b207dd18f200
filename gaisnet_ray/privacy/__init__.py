"""Privacy of a GaisNet run, measured and defended (README, "Privacy").

- ``attacks``: what a curious edge or cloud can recover (search and learned inversion of hidden
  states, membership from the relayed knowledge), with recovery rates;
- ``noise``: clip + Gaussian noise on the hidden states a device sends, the NoPeek penalty;
- ``dp``: differentially private aggregation at the cloud with Opacus's RDP accountant;
- ``secagg``: secure aggregation (pairwise masks that cancel in the sum, dropouts recovered);
- ``secround``: that protocol inside an edge's round (key exchange, masked turns, unmasking);
- ``command``: ``gaisnet privacy-audit RUN_DIR``.
No Ray here: the actors call these through the hfsl core.
"""

from __future__ import annotations


def active_defenses(privacy) -> dict:
    """The privacy configuration a run trained under, as recorded in every round's metrics."""
    return {
        "activation_clip": privacy.activation_clip,
        "activation_noise": privacy.activation_noise,
        "activation_denoise": privacy.activation_denoise,
        "send_gradients": privacy.send_gradients,
        "nopeek_weight": privacy.nopeek_weight,
        "dp": privacy.dp_clip is not None,
        "secure_aggregation": privacy.secure_aggregation,
    }
