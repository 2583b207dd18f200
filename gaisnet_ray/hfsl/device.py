"""The end-device side of a round: private data, the front and back segments, local optimizer.

The device owns its examples; only hidden states, their gradients and adapter tensors leave it.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from ..config import PeftConfig, TrainingConfig
from ..data import Example, encode_examples
from ..data.encode import lengths_of
from ..knowledge.accounting import payload_nbytes
from ..models.adapters import adapter_state, load_adapter_state, load_base_state, trainable_parameters
from ..models.cuts import Cut, ModelPart
from ..models.split import build_tier_model
from ..privacy.noise import nopeek_penalty, privatize_hidden
from ..privacy.secround import DeviceSecAgg
from .linkcodec import LinkCodec
from .messages import LinkUsage, StateDict, TurnResult


class EdgeLink(Protocol):
    """The device's view of its edge for one turn (in-process call or Ray actor call)."""

    def forward(self, hidden):  # (B, T, H) -> (B, T, H), each as ``links.codec`` puts it on the wire
        ...

    def backward(self, grad):  # dL/dh_m (B, T, H) -> dL/dh_k, encoded likewise
        ...


class DeviceTrainer:
    """One end device. ``cut=None`` holds the whole model (plain FL); otherwise front + back only."""

    def __init__(self, device_id: str, package, peft_cfg: PeftConfig, training: TrainingConfig,
                 examples: list[Example], seq_len: int, cut: Cut | None, seed: int,
                 torch_device: str = "cpu", split=None, system: str | None = None, privacy=None,
                 keep_adapter: bool = False, codec: LinkCodec | None = None):
        """``package``: a ``FoundationPackage`` holding at least this device's part (``self.part``;
        only that part is built). ``split``: a tier model to share with other logical devices of the
        same cut (a pool worker runs one turn at a time, and every turn loads all of its adapter
        keys first). ``system``: the chat template's system turn (``data.system_prompt``), as
        evaluation and serving format prompts. ``privacy``: the ``PrivacyConfig`` (clip and noise on
        the hidden states sent to the edge, NoPeek penalty); None: none. ``keep_adapter`` (the
        ``local`` baseline): from its second turn on the device trains the adapter it trained last,
        not the one it is handed (nothing is averaged into it). ``codec``: how hidden states,
        gradients and adapters go on the link (``links.codec``; None: as computed)."""
        if not examples:
            raise ValueError(f"device {device_id} has no private examples")
        self.device_id = device_id
        self.training = training
        self.torch_device = torch_device
        self.cut = cut
        self.part = ModelPart.whole() if cut is None else cut.device_part(package.num_layers)
        self.split = split if split is not None else build_tier_model(package, peft_cfg, self.part,
                                                                      torch_device=torch_device)
        batch = encode_examples(examples, package.tokenizer, seq_len, system)
        self._input_ids = batch["input_ids"]  # (N, T) private, never leaves this object
        self._labels = batch["labels"]  # (N, T) private, never leaves this object
        self._seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._round: int | None = None
        self.privacy = privacy
        self._noise_gen = torch.Generator().manual_seed(seed * 7_919 + 17)  # link noise, never sent
        # privacy.secure_aggregation (fl): this device's side of the edge's masked aggregation
        self.secagg = DeviceSecAgg(device_id) if privacy is not None and privacy.secure_aggregation else None
        self.keep_adapter = keep_adapter
        self.codec = codec or LinkCodec()
        self._own: StateDict | None = None  # the adapter it trained last (kept when keep_adapter)

    @property
    def num_samples(self) -> int:
        return int(self._input_ids.shape[0])

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample without replacement within an epoch; reshuffle when exhausted."""
        b = min(self.training.batch_size, self.num_samples)
        if self._order.numel() < b:
            self._order = torch.randperm(self.num_samples, generator=self._gen)
        idx, self._order = self._order[:b], self._order[b:]
        return self._input_ids[idx].to(self.torch_device), self._labels[idx].to(self.torch_device)

    def update_base(self, base) -> int:
        """Relay down: the new foundation weights of the segments this device holds, as its part
        (a ``FoundationPackage`` holding exactly ``self.part``) or a whole state dict. Returns bytes."""
        return load_base_state(self.split.peft, base)

    def _start_round(self, round_idx: int | None) -> None:
        """Batch order as a function of (seed, round): a device restarted, or a run resumed, draws
        the same batches in round r as an uninterrupted one. Within a round, epochs reshuffle."""
        if round_idx is None or round_idx == self._round:
            return
        self._round = round_idx
        self._gen = torch.Generator().manual_seed(self._seed * 1_000_003 + round_idx)
        self._order = torch.empty(0, dtype=torch.long)

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable_parameters(self.split.peft), lr=self.training.lr,
                                 weight_decay=self.training.weight_decay)

    def _run_turn(self, adapter: StateDict, cluster_id: str, steps: int,
                  step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, LinkUsage]]) -> TurnResult:
        """Pull the adapter down, run ``steps`` optimizer steps of ``step``, push the adapter up."""
        started = time.perf_counter()
        if self.keep_adapter and self._own is not None:
            adapter = self._own
        load_adapter_state(self.split.peft, adapter)
        usage = LinkUsage(bytes_down=payload_nbytes(adapter), messages_down=1)
        opt = self._optimizer()
        self.split.peft.train()
        losses = []
        for _ in range(steps):
            loss, step_usage = step(*self._next_batch())  # gradients are in the adapter's .grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            usage = usage.add(step_usage)
        self.split.peft.eval()
        trained = adapter_state(self.split.peft)
        if self.keep_adapter:
            self._own = {k: v.clone() for k, v in trained.items()}
        trained = self.codec.encode_adapter(trained)  # bf16 on the wire when a codec is on
        usage = usage.add(LinkUsage(bytes_up=payload_nbytes(trained), messages_up=1))
        return TurnResult(self.device_id, cluster_id, trained, self.num_samples, losses, usage,
                          time.perf_counter() - started)

    def train_split_turn(self, adapter: StateDict, link: EdgeLink, cluster_id: str, steps: int) -> TurnResult:
        """``steps`` split steps: front here -> middle on the edge -> back and loss here -> back again."""
        if self.cut is None:
            raise ValueError(f"device {self.device_id} holds the whole model (FL) and has no cut")
        cut, codec = self.cut, self.codec
        send_gradients = self.privacy is None or self.privacy.send_gradients

        def split_step(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LinkUsage]:
            h_k = self.split.front(input_ids, cut.front_end)  # (B, T, H)
            h_link = self._privatize(h_k)  # clipped + noised when privacy.activation_noise is on
            lengths = lengths_of(labels.cpu())  # (B,) real positions; the codec sends only these
            sent = codec.encode(h_link.detach().cpu(), lengths)
            got = link.forward(sent)
            h_m = codec.decode(got).to(self.torch_device).requires_grad_()  # (B, T, H) from edge
            back_in = h_m
            denoise = self.privacy is not None and self.privacy.activation_denoise
            if denoise:
                # the residual stream carries the noise through the middle unchanged: take out what this
                # device added (it alone knows it), so the back sees h_k + the middle's change on h_link
                back_in = h_m - (h_link - h_k).detach()
            loss = self.split.back_loss(back_in, cut.back_start, labels)  # logits only where labels are supervised
            loss.backward()
            if not send_gradients:
                # privacy.send_gradients false: no gradient leaves; the front trains through the residual
                # stream alone (the middle's own contribution taken as a constant input): with denoise the
                # back's input is h_k + (h_m - h_link), so dL/dh_m reaches h_k directly; without, it is
                # passed straight through the middle to h_link
                if h_k.requires_grad:
                    roots, grads = ([h_k] if denoise else [h_link]), [h_m.grad.detach()]
                    self._nopeek(input_ids, labels, h_k, roots, grads)
                    torch.autograd.backward(roots, grads)
                return loss, LinkUsage(bytes_up=payload_nbytes(sent), bytes_down=payload_nbytes(got),
                                       messages_up=1, messages_down=1)
            grad_m = codec.encode(h_m.grad.detach().cpu(), lengths)
            grad_back = link.backward(grad_m)
            grad_k = codec.decode(grad_back).to(self.torch_device)  # dL/dh_k from edge
            if h_k.requires_grad:
                roots, grads = [h_link], [grad_k]
                if denoise:
                    # back_in = h_k + (h_m - h_link): its residual path reaches h_k directly, not through
                    # the clip (whose Jacobian would shrink and project a clipped row's gradient); only
                    # the middle's own part of dL/dh_link (grad_k - dL/dh_m) goes back through the clip
                    g_m = h_m.grad.detach()
                    roots, grads = [h_link, h_k], [grad_k - g_m, g_m]
                self._nopeek(input_ids, labels, h_k, roots, grads)
                torch.autograd.backward(roots, grads)
            return loss, LinkUsage(bytes_up=payload_nbytes(sent) + payload_nbytes(grad_m),
                                   bytes_down=payload_nbytes(got) + payload_nbytes(grad_back),
                                   messages_up=2, messages_down=2)

        return self._run_turn(adapter, cluster_id, steps, split_step)

    def _nopeek(self, input_ids: torch.Tensor, labels: torch.Tensor, h_k: torch.Tensor, roots: list,
                grads: list) -> None:
        """With ``privacy.nopeek_weight``: add the NoPeek penalty on h_k to the backward's roots."""
        if self.privacy is not None and self.privacy.nopeek_weight > 0:
            mask = torch.arange(input_ids.shape[1]) < lengths_of(labels.cpu())[:, None]
            with torch.no_grad():
                emb = self.split.front(input_ids, 0)  # (B, T, H) token embeddings
            penalty = nopeek_penalty(emb, h_k, mask.to(h_k.device), generator=self._noise_gen)
            roots.append(self.privacy.nopeek_weight * penalty)
            grads.append(None)

    def _privatize(self, h_k: torch.Tensor) -> torch.Tensor:
        """What crosses the link: rows clipped to ``privacy.activation_clip``, plus Gaussian noise at
        ``privacy.activation_noise`` (both inside the graph: the front trains through them)."""
        p = self.privacy
        if p is None or (p.activation_clip is None and p.activation_noise == 0):
            return h_k
        return privatize_hidden(h_k, p.activation_clip, p.activation_noise, self._noise_gen)

    def train_turn(self, adapter: StateDict, link: EdgeLink | None, cluster_id: str, steps: int,
                   round_idx: int | None = None, emulation=None) -> TurnResult:
        """One turn under this device's scheme: split with the edge, or local (whole model, FL).
        ``round_idx`` reseeds the batch order for that round (see ``_start_round``). ``emulation``
        (``planner.emulation.DeviceEmulation``, local dev mode): the turn takes its profile's time."""
        if emulation is not None:
            return emulation.run_turn(lambda lk: self.train_turn(adapter, lk, cluster_id, steps, round_idx), link)
        self._start_round(round_idx)
        if self.cut is None:
            result = self.train_local_turn(adapter, cluster_id, steps)
            return result if self.secagg is None else self.secagg.seal(result)  # the edge gets it masked
        if link is None:
            raise ValueError(f"device {self.device_id} trains split and needs a link to its edge")
        return self.train_split_turn(adapter, link, cluster_id, steps)

    def train_local_turn(self, adapter: StateDict, cluster_id: str, steps: int) -> TurnResult:
        """Plain FL: ``steps`` steps of the whole model on this device, no edge involved."""

        def local_step(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LinkUsage]:
            loss = self.split.back_loss(self.split.front(input_ids, 0), 0, labels)
            loss.backward()
            return loss, LinkUsage()

        return self._run_turn(adapter, cluster_id, steps, local_step)
