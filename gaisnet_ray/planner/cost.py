"""A cost model of one HFSL round, from the model's real shapes.

Per training step of a device with ``d`` blocks on it (front + back, ``Cut`` rule: the edge keeps
at least one block), batch ``B`` and sequence ``T``:

- FLOPs. A block's forward costs ``2 x params`` per token for its projections, ``4 x T x q_dim``
  per token for attention scores and their weighted sum, and ``2 x lora params`` per token for the
  adapters; training a LoRA block costs ``1 + BACKWARD_RATIO`` forwards (the backward computes
  input gradients through frozen weights: one more forward's worth; the LoRA weight gradients are
  negligible). The head costs ``2 x hidden x vocab`` per supervised position (``SUPERVISED`` of
  them, as ``SplitModel.back_loss`` computes logits only there), twice for training. The device
  runs the front, the back and the head; the edge the middle ``L - d`` blocks.
- Bytes. Each step moves 4 hidden-state tensors of ``B x T x hidden`` fp32 (``h_k`` and ``dL/dh_m``
  up, ``h_m`` and ``dL/dh_k`` down, one message each); each turn the device pulls and pushes the
  LoRA tensors of its ``d`` blocks. Each edge pulls the global adapter and pushes its update.
  Under ``privacy.send_gradients: false`` a step moves only ``h_k`` up and ``h_m`` down, and the
  edge runs its blocks forward only.
- Time. A member's turn = steps x (its compute at its speed + the middle at the edge's speed shared
  by the edge's concurrent clusters + 4 latencies, 2 without gradients) + its transfers at
  ``min(its own link, its cluster's share of the edge's link)``. Members of a cluster run in turn (their turns add up);
  clusters run in parallel; an edge's round = knowledge down + its slowest cluster + aggregation +
  update up; the round = the slowest edge + the cloud's aggregation.
- Energy per device: J/FLOP x its FLOPs + J/byte x bytes sent and received.
- Memory per device: ``hfsl.memory``'s estimate of an end actor holding ``d`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..hfsl.memory import LOGIT_COPIES, LORA_BYTES_PER_PARAM, RUNTIME_BYTES, SUPERVISED
from ..models.geometry import ModelGeometry

BACKWARD_RATIO = 1.0  # LoRA training: the backward is about one more forward (input gradients only)
FP32 = 4


@dataclass(frozen=True)
class RoundShape:
    """The sizes one round's cost follows from: the model's geometry and the training batch."""

    geometry: ModelGeometry
    batch: int
    seq: int
    steps: int  # optimizer steps per device turn
    lora_block_params: int
    eager: bool = False
    link_codec: str = "none"  # links.codec: how a hidden state and an adapter go on the end-edge link
    send_gradients: bool = True  # privacy.send_gradients: false: no gradient messages, the middle forward only

    @classmethod
    def from_config(cls, cfg: Config, model_config: dict) -> "RoundShape":
        g = ModelGeometry.from_config(model_config)
        return cls(g, cfg.training.batch_size, cfg.model.max_seq_len, cfg.training.local_steps,
                   g.lora_params_per_block(cfg.peft.r, cfg.peft.target_modules),
                   cfg.model.attn_implementation == "eager", cfg.links.codec, cfg.privacy.send_gradients)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    # FLOPs per training step ------------------------------------------------------------------
    def block_forward_flops(self) -> float:
        g = self.geometry
        per_token = 2 * g.block_params() + 4 * self.seq * g.heads * g.head_dim + 2 * self.lora_block_params
        return float(per_token * self.tokens)

    def block_train_flops(self) -> float:
        return (1 + BACKWARD_RATIO) * self.block_forward_flops()

    def head_train_flops(self, supervised: float = SUPERVISED) -> float:
        g = self.geometry
        return (1 + BACKWARD_RATIO) * 2.0 * g.hidden * g.vocab * supervised * self.tokens

    def device_flops(self, d: int) -> float:
        """One step on a device holding ``d`` blocks (front + back) and the head."""
        return d * self.block_train_flops() + self.head_train_flops()

    def edge_flops(self, d: int) -> float:
        """One step of the middle on the edge for a device holding ``d`` blocks (forward only when
        no gradient comes back)."""
        per_block = self.block_train_flops() if self.send_gradients else self.block_forward_flops()
        return (self.num_layers - d) * per_block

    # bytes ------------------------------------------------------------------------------------
    def hidden_bytes(self) -> int:
        """One hidden-state (or gradient) message: (B, T, hidden) as ``links.codec`` encodes it
        (``hfsl.linkcodec``), every position counted real: an upper bound when a codec drops padding."""
        h = self.geometry.hidden
        if self.link_codec == "none":
            return self.tokens * h * FP32
        per_token = {"fp32": h * FP32, "bf16": h * 2, "int8": h + FP32}[self.link_codec]  # int8: + its scale
        return self.tokens * per_token + self.batch * 4  # + the int32 row lengths

    def adapter_bytes(self, blocks: int) -> int:
        """The LoRA tensors of ``blocks`` blocks: fp32, bf16 under the bf16/int8 link codecs."""
        return blocks * self.lora_block_params * (2 if self.link_codec in ("bf16", "int8") else FP32)

    @property
    def messages_per_step(self) -> int:
        """Hidden-state messages each way per step: the activation, and its gradient unless
        ``privacy.send_gradients`` is false."""
        return 2 if self.send_gradients else 1

    def turn_bytes(self, d: int) -> tuple[int, int]:
        """(up, down) bytes of one device turn: per step ``messages_per_step`` each way, plus its adapter."""
        each = self.steps * self.messages_per_step * self.hidden_bytes() + self.adapter_bytes(d)
        return each, each

    # memory -----------------------------------------------------------------------------------
    def device_memory(self, d: int) -> int:
        """Peak resident memory of an end actor holding ``d`` blocks (``hfsl.memory.estimate_job``)."""
        g = self.geometry
        part = (d * g.block_params() + g.embedding_params() + g.head_params()) * FP32
        act = g.activation_bytes_per_token_block(self.eager, self.seq)
        logits = int(LOGIT_COPIES * SUPERVISED * self.tokens * g.vocab * 4)
        return (RUNTIME_BYTES + 2 * part + d * self.lora_block_params * LORA_BYTES_PER_PARAM
                + d * self.tokens * act + logits)

    # cut range --------------------------------------------------------------------------------
    @property
    def min_device_blocks(self) -> int:
        return 2  # one front, one back block

    @property
    def max_device_blocks(self) -> int:
        return self.num_layers - 1  # the edge keeps at least one block

    def max_blocks_within(self, memory_bytes: float | None) -> int | None:
        """The most blocks a device with this memory can hold (None: not even the smallest cut)."""
        lo, hi = self.min_device_blocks, self.max_device_blocks
        if hi < lo:
            return None
        if memory_bytes is None:
            return hi
        best = None
        for d in range(lo, hi + 1):  # memory grows with d
            if self.device_memory(d) <= memory_bytes:
                best = d
        return best


def split_blocks(d: int) -> tuple[int, int]:
    """(front, back) blocks of a device holding ``d``: half each, the back taking the odd one."""
    front = max(1, d // 2)
    return front, d - front


@dataclass(frozen=True)
class TurnTerms:
    """A device's turn as ``compute_s + up_bits / up_rate + down_bits / down_rate``, with the up and
    down rate ``min(its link, its cluster's share x the edge's link)``."""

    compute_s: float
    up_bits: float
    down_bits: float
    energy_j: float


_TABLES: dict[int, tuple] = {}


def _per_blocks(shape: RoundShape) -> tuple:
    """(device FLOPs, edge FLOPs, turn bytes) per step for every block count, computed once per shape."""
    key = id(shape)
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not shape:
        n = shape.num_layers
        hit = (shape, [shape.device_flops(d) for d in range(n + 1)], [shape.edge_flops(d) for d in range(n + 1)],
               [shape.turn_bytes(d)[0] for d in range(n + 1)])
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit[1:]


def turn_terms(shape: RoundShape, device, edge, d: int, clusters: int) -> TurnTerms:
    """The turn of ``device`` (``DeviceProfile``) holding ``d`` blocks at ``edge`` (``EdgeProfile``)
    that runs ``clusters`` clusters at once (they share its compute)."""
    dev_flops, edge_flops, turn_bytes = _per_blocks(shape)
    steps = shape.steps
    compute = steps * (dev_flops[d] / device.flops + edge_flops[d] * clusters / edge.flops
                       + 2 * shape.messages_per_step * device.latency_s) + 2 * device.latency_s
    each = turn_bytes[d]  # up and down alike
    energy = (device.j_per_flop * steps * dev_flops[d] + (device.j_per_byte_up + device.j_per_byte_down) * each)
    return TurnTerms(compute, 8.0 * each, 8.0 * each, energy)


def turn_seconds(t: TurnTerms, device, edge, share: float) -> float:
    x = share * edge.bandwidth_bps
    return t.compute_s + t.up_bits / min(device.up_bps, x) + t.down_bits / min(device.down_bps, x)


def edge_overhead_s(shape: RoundShape, edge, clusters: int) -> float:
    """Knowledge down + aggregation over the edge's clusters + its update up (edge-cloud link)."""
    adapter = shape.adapter_bytes(shape.num_layers)
    transfer = 2 * (edge.cloud_latency_s + 8.0 * adapter / edge.cloud_bps)
    aggregate = 2.0 * clusters * shape.lora_block_params * shape.num_layers / edge.flops
    return transfer + aggregate


def cloud_overhead_s(shape: RoundShape, fleet, edges: int) -> float:
    return 2.0 * edges * shape.lora_block_params * shape.num_layers / fleet.cloud_flops
