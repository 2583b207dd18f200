"""Split a causal LM into a device front, an edge middle and a device back segment (U-shape).

    device front : embeddings + blocks[0:k]                      input_ids (B, T) -> h_k (B, T, H)
    edge middle  : blocks[k:m]                                   h_k (B, T, H)    -> h_m (B, T, H)
    device back  : blocks[m:L] + final norm + LM head (+ loss)   h_m (B, T, H)    -> logits (B, T, V)

Token ids and labels never leave the device: the edge only sees hidden states and their
gradients. Each segment re-derives positions and the causal mask from the tensor shape (positions
0..T-1 are public), exactly as the unsplit Hugging Face model does, so the split computes the same
function as the whole model. Tied input/output embeddings both sit on the device.

Per family, only three things differ: how embeddings are computed, what each block needs besides
hidden states (mask, rotary position embeddings), and the final norm. Those live in ``_FAMILIES``.

With prefix knowledge (``peft.method: prefix``, ``models.prefix.PrefixModel``) each segment puts
the prefixes of its own blocks into a fresh KV cache first and the real tokens take positions
``n..n+T-1`` after the ``n`` virtual tokens, as peft's prefix tuning runs the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from peft import PeftModel
from transformers.masking_utils import create_causal_mask

from .cuts import ModelPart, UnknownModelFamilyError, layer_of_key
from .parts import Pruned, prune_modules
from .prefix import PrefixModel, PrefixServingError, attach_prefix


def select_keys(state: dict[str, torch.Tensor], layers: set[int], *, include_unlayered: bool) -> dict[str, torch.Tensor]:
    """The part of ``state`` that belongs to ``layers`` (plus non-block keys if asked)."""
    out = {}
    for k, v in state.items():
        layer = layer_of_key(k)
        if (layer is None and include_unlayered) or (layer is not None and layer in layers):
            out[k] = v
    return out


def _causal_mask(lm, hidden, position_ids, cache, first_layer: int):
    """The model's own causal mask; with a KV cache, sized by this segment's first cached layer."""
    return create_causal_mask(lm.config, hidden, None, cache, position_ids=position_ids,
                              layer_idx=first_layer if cache is not None else None)


class _GPT2:
    @staticmethod
    def blocks(lm):
        return lm.transformer.h

    @staticmethod
    def embed(lm, input_ids, position_ids):
        t = lm.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids))

    @staticmethod
    def block_kwargs(lm, hidden, position_ids, cache, first_layer):
        mask = _causal_mask(lm, hidden, position_ids, cache, first_layer)
        return {"attention_mask": mask, "position_ids": position_ids, "cache": cache, "use_cache": cache is not None}

    @staticmethod
    def final_norm(lm):
        return lm.transformer.ln_f


class _Llama:
    @staticmethod
    def blocks(lm):
        return lm.model.layers

    @staticmethod
    def embed(lm, input_ids, position_ids):
        return lm.model.embed_tokens(input_ids)

    @staticmethod
    def block_kwargs(lm, hidden, position_ids, cache, first_layer):
        mask = _causal_mask(lm, hidden, position_ids, cache, first_layer)
        rotary = lm.model.rotary_emb(hidden, position_ids=position_ids)
        return {
            "attention_mask": mask, "position_ids": position_ids, "position_embeddings": rotary,
            "cache": cache, "use_cache": cache is not None,
        }

    @staticmethod
    def final_norm(lm):
        return lm.model.norm


_FAMILIES = {"gpt2": _GPT2, "llama": _Llama}


class SplitModel:
    """Segment-wise forward over a peft-wrapped causal LM (which may be pruned to one tier's part)."""

    def __init__(self, peft_model: PeftModel):
        self.peft = peft_model
        self.lm = peft_model.get_base_model()
        family = getattr(self.lm.config, "model_type", None)
        if family not in _FAMILIES:
            raise UnknownModelFamilyError(str(family))
        self.family = family
        self._f = _FAMILIES[family]
        self.num_layers = len(self._f.blocks(self.lm))
        self.prefix = peft_model if isinstance(peft_model, PrefixModel) else None  # deep prompts per block

    # ------------------------------------------------------------------------------- segments
    def _positions(self, hidden_or_ids: torch.Tensor, past_len: int = 0) -> torch.Tensor:
        t = hidden_or_ids.shape[1]
        return (torch.arange(t, device=hidden_or_ids.device) + past_len).unsqueeze(0)  # (1, T)

    def front(self, input_ids: torch.Tensor, front_end: int, cache=None, past_len: int = 0) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) hidden state after blocks[0:front_end]."""
        offset = past_len
        if self.prefix is not None and cache is None:  # the real tokens sit after the virtual ones
            offset = self.prefix.num_virtual_tokens
        pos = self._positions(input_ids, offset)
        hidden = self._f.embed(self.lm, input_ids, pos)
        return self.blocks(hidden, 0, front_end, cache=cache, past_len=past_len)

    def blocks(self, hidden: torch.Tensor, start: int, end: int, cache=None, past_len: int = 0,
               checkpoint: bool = False) -> torch.Tensor:
        """(B, T, H) -> (B, T, H) through blocks[start:end].

        ``checkpoint``: keep only each block's input for the backward and recompute the block then
        (``torch.utils.checkpoint``): the same gradients, bit for bit, for one more forward of the
        blocks, with the memory of one block's activations instead of all of them.
        """
        if start >= end:
            return hidden
        if self.prefix is not None:
            if cache is not None:
                raise PrefixServingError("KV-cached split inference with prefix knowledge (peft.method prefix) "
                                         "is not supported")
            cache = self.prefix.segment_cache(start, end, hidden.shape[0], hidden.dtype)
            past_len = self.prefix.num_virtual_tokens
        pos = self._positions(hidden, past_len)
        kwargs = self._f.block_kwargs(self.lm, hidden, pos, cache, start)
        recompute = checkpoint and cache is None and torch.is_grad_enabled()  # a prefix cache: no recompute
        for block in self._f.blocks(self.lm)[start:end]:
            if recompute:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False, **kwargs)
            else:
                hidden = block(hidden, **kwargs)
        return hidden

    def back(self, hidden: torch.Tensor, back_start: int, cache=None, past_len: int = 0) -> torch.Tensor:
        """(B, T, H) -> (B, T, V) logits through blocks[back_start:L], final norm and LM head."""
        hidden = self.blocks(hidden, back_start, self.num_layers, cache=cache, past_len=past_len)
        return self.lm.lm_head(self._f.final_norm(self.lm)(hidden))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own causal-LM loss (labels shifted inside, -100 ignored)."""
        return self.lm.loss_function(logits=logits, labels=labels, vocab_size=self.lm.config.vocab_size)

    def back_loss(self, hidden: torch.Tensor, back_start: int, labels: torch.Tensor) -> torch.Tensor:
        """``loss(back(hidden, back_start), labels)`` with the final norm and LM head run only at the
        positions whose next token is supervised: the same loss and gradients (up to float rounding)
        without the (B, T, V) logits of every position the loss ignores (with answer-only labels,
        most of them; at a 49k vocabulary those logits are most of a device's training memory)."""
        hidden = self.blocks(hidden, back_start, self.num_layers)  # (B, T, H)
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T): the token each position predicts
        keep = targets != -100
        logits = self.lm.lm_head(self._f.final_norm(self.lm)(hidden[keep]))  # (N, V), N supervised positions
        return self.lm.loss_function(logits=logits, labels=None, shift_labels=targets[keep],
                                     vocab_size=self.lm.config.vocab_size)

    # ------------------------------------------------------------------------------ pruning
    def prune(self, keep_layers: set[int], *, keep_embeddings: bool, keep_head: bool) -> None:
        """Drop the blocks (and embeddings/head) this tier does not run, freeing their memory.
        (A tier model built from a part never held them: ``build_tier_model``.)"""
        prune_modules(self.lm, ModelPart.of(keep_layers, keep_embeddings, keep_head))

    def held_layers(self) -> set[int]:
        blocks = self._f.blocks(self.lm)
        return {i for i in range(self.num_layers) if not isinstance(blocks[i], Pruned)}

    def holdings(self) -> dict:
        """What this tier's model holds, read off its modules (not its config): the blocks, whether
        any embedding and the head / final norm, the blocks its adapter has keys for, and the number
        of foundation (non-adapter) values. Asked of a live actor to check what a tier can see."""
        from .adapters import adapter_state
        from .parts import _family_modules

        _, _, embeddings, (norm_owner, norm_name) = _family_modules(self.lm)
        held = lambda m: not isinstance(m, Pruned)  # noqa: E731
        layers = {layer_of_key(k) for k in adapter_state(self.peft)}
        return {"blocks": sorted(self.held_layers()),
                "embeddings": any(held(getattr(o, n)) for o, n in embeddings),
                "head": held(self.lm.lm_head) or held(getattr(norm_owner, norm_name)),
                "adapter_blocks": sorted(x for x in layers if x is not None),
                "adapter_other_keys": None in layers,
                "foundation_values": sum(p.numel() for n, p in self.lm.named_parameters()
                                         if "lora_" not in n and "prefix" not in n)}


def build_tier_model(package, peft_cfg, part: ModelPart | None = None, *, torch_device: str = "cpu") -> SplitModel:
    """A tier's part of the foundation model with a LoRA adapter (``peft_cfg.method`` prefix: with
    key/value prefixes for the blocks it holds); only that part is ever built.

    ``package`` is a ``FoundationPackage`` (whole, or a part: ``FoundationPackage.cut``); ``part``
    (default: what the package holds) is cut out of it first, so no module outside it is allocated.
    Adapter weights start as peft initialises them and are overwritten by the knowledge pulled down.
    """
    from .adapters import attach_lora

    if part is not None and part != package.part_spec:
        package = package.cut(part)
    family = package.family
    if family not in _FAMILIES:
        raise UnknownModelFamilyError(family)
    if peft_cfg.method == "prefix":
        part_spec = package.part_spec
        split = SplitModel(attach_prefix(package.materialize(), peft_cfg, part_spec.held_layers(package.num_layers)))
    else:
        split = SplitModel(attach_lora(package.materialize(), peft_cfg, family))
    split.peft.to(torch_device)
    return split
