"""The end-edge link codec (``links.codec``): what hidden states, their gradients and adapters look
like on the wire between tiers.

Every split step moves four (B, T, H) tensors between a device and its edge: h_k up, h_m down,
dL/dh_m up, dL/dh_k down. Rows are right-padded to T (``data.encode``), and with causal attention
and answer-only labels the padding positions change nothing the loss sees: the blocks' outputs at
real positions do not depend on later positions, and the gradients at padding positions are exactly
zero. So a codec other than ``none`` sends only the first ``lengths[b]`` positions of each row, as
an (N, H) tensor (N = sum of the lengths), in

- ``fp32``: the values as they are (lossless at the kept positions; padding dropped only);
- ``bf16``: rounded to bfloat16 (relative error <= 2^-8 per element);
- ``int8``: per-token absmax scale, ``q = round(x / s)``, ``s = max|x_row| / 127``
  (absolute error <= s / 2 per element), plus the N float32 scales.

The receiver rebuilds the (B, T, H) float32 tensor with zeros at the dropped positions; shapes are
the same as without a codec, so the blocks run the same kernels. Gradients are quantized the same
way, without error feedback: each step's activation gradients belong to a new batch of samples, so
there is no coordinate that a residual could be added back to next step (error feedback compensates
the same weights' gradient step after step; tests/test_link_codec.py measures int8's convergence).

With ``bf16`` or ``int8``, adapters between tiers (edge <-> device, edge <-> cloud) travel as
bfloat16 and are widened to float32 by the receiver (``fp32`` keeps them exact: it is the lossless
codec, padding dropped and nothing else). ``none`` sends everything exactly as before: fp32
tensors, padding included, and the same objects (no copy), so results and byte counts stay as they
were.

The encoded objects are what crosses an actor boundary (Ray pickles them through the object store),
and ``knowledge.accounting.payload_nbytes`` of them is what the link accounting counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODECS = ("none", "fp32", "bf16", "int8")
INT8_MAX = 127
ADAPTER_WIRE_DTYPE = torch.bfloat16


@dataclass
class WireTensor:
    """A (B, T, H) activation or gradient as sent: the real positions of each row, encoded."""

    codec: str  # "fp32" | "bf16" | "int8"
    values: torch.Tensor  # (N, H) float32 | bfloat16 | int8; N = lengths.sum(), rows in (b, t) order
    scale: torch.Tensor | None  # (N,) float32 per-token absmax / 127 (int8 only), else None
    lengths: torch.Tensor  # (B,) int32: positions kept per row (the first lengths[b])
    seq_len: int  # T of the dense tensor


def _keep_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len)[None, :] < lengths.to(torch.long)[:, None]  # (B, T) bool


class LinkCodec:
    """Encode on the sender, decode on the receiver; one instance per tier, chosen by ``links.codec``."""

    def __init__(self, name: str = "none"):
        if name not in CODECS:
            raise ValueError(f"links.codec must be one of {CODECS}, got {name!r}")
        self.name = name

    @property
    def active(self) -> bool:
        return self.name != "none"

    @property
    def narrows_adapters(self) -> bool:
        """Adapters go between tiers as bfloat16 (the lossy codecs); else as they are."""
        return self.name in ("bf16", "int8")

    # ---------------------------------------------------------------- activations and gradients
    def encode(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | WireTensor:
        """(B, T, H) float tensor and (B,) real lengths -> what goes on the wire (``x`` itself under none)."""
        if not self.active:
            return x
        b, t, _ = x.shape
        lengths = lengths.to(torch.int32).clamp(0, t).cpu()
        rows = x.detach().cpu()[_keep_mask(lengths, t)]  # (N, H)
        if self.name == "fp32":
            return WireTensor("fp32", rows.float().contiguous(), None, lengths, t)
        if self.name == "bf16":
            return WireTensor("bf16", rows.to(torch.bfloat16).contiguous(), None, lengths, t)
        rows = rows.float()
        scale = rows.abs().amax(dim=1) / INT8_MAX  # (N,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return WireTensor("int8", q.contiguous(), scale.contiguous(), lengths, t)

    def decode(self, msg: torch.Tensor | WireTensor) -> torch.Tensor:
        """What came off the wire -> (B, T, H) float32, zeros at the positions not sent."""
        if isinstance(msg, torch.Tensor):
            return msg
        if not isinstance(msg, WireTensor):
            raise TypeError(f"link payload must be a tensor or a WireTensor, got {type(msg).__qualname__}")
        rows = msg.values.float()
        if msg.codec == "int8":
            rows = rows * msg.scale[:, None]
        b, h = int(msg.lengths.shape[0]), int(msg.values.shape[1])
        out = torch.zeros(b, msg.seq_len, h, dtype=torch.float32)
        out[_keep_mask(msg.lengths, msg.seq_len)] = rows
        return out

    @staticmethod
    def lengths_of(msg: torch.Tensor | WireTensor) -> torch.Tensor | None:
        """The lengths a received message kept (the edge echoes them in its replies); None: dense."""
        return msg.lengths if isinstance(msg, WireTensor) else None

    # ------------------------------------------------------------------------------- adapters
    def encode_adapter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter state dict as it goes to another tier: bfloat16 under bf16/int8, else as is."""
        if not self.narrows_adapters:
            return state
        return {k: v.detach().to(ADAPTER_WIRE_DTYPE) if v.is_floating_point() else v for k, v in state.items()}

    @staticmethod
    def decode_adapter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A received adapter widened back to float32 (the same dict when nothing was narrowed)."""
        if not any(v.dtype == ADAPTER_WIRE_DTYPE for v in state.values()):
            return state
        return {k: v.float() if v.dtype == ADAPTER_WIRE_DTYPE else v for k, v in state.items()}


def audit_wire_leaf(path: str, leaf: torch.Tensor, parent: dict, hidden_size: int, seq_len: int) -> bool:
    """The one way a non-float tensor may cross the end-edge link: inside an encoded activation
    (``WireTensor``). ``values``: int8 (N, hidden_size) with a float32 (N,) ``scale`` beside it -
    quantized hidden states, never a token batch (token ids are int64 (B, T)); ``lengths``: int32
    (B,) in [0, seq_len], one count per row (what the padding of a dense tensor shows anyway).
    ``parent``: the audited payload dict the leaf sits in (``{"__type__": "WireTensor", ...}``)."""
    if parent.get("__type__") != "WireTensor":
        return False
    field = path.rsplit("/", 1)[-1]
    if field == "values":
        scale, lengths = parent.get("scale"), parent.get("lengths")
        return (leaf.dtype == torch.int8 and leaf.dim() == 2 and leaf.shape[1] == hidden_size
                and parent.get("codec") == "int8" and isinstance(scale, torch.Tensor)
                and scale.dtype == torch.float32 and tuple(scale.shape) == (leaf.shape[0],)
                and isinstance(lengths, torch.Tensor) and int(lengths.sum()) == leaf.shape[0])
    if field == "lengths":
        return (leaf.dtype == torch.int32 and leaf.dim() == 1 and parent.get("seq_len") == seq_len
                and bool(((leaf >= 0) & (leaf <= seq_len)).all()))
    return False
