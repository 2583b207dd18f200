"""What a tier holds of the foundation model, and how a part of it is built without the rest.

A ``ModelPart`` names the modules a package or a tier model holds: some blocks, the embeddings,
and the final norm with the LM head. A device holds embeddings + its front and back blocks + the
head; an edge only its middle blocks; the cloud (and a device under plain FL) the whole model::

    device part : embeddings + blocks[0:k] + blocks[m:L] + final norm + LM head
    edge part   : blocks[k:m]

``select_state`` cuts a foundation state dict down to a part (the tensors are shared, not copied);
``materialize_part`` builds a causal LM that allocates only the part's modules: the skeleton is
built on the meta device, every module the part does not hold becomes a ``Pruned`` placeholder,
the rest is allocated on the CPU and loaded, and non-persistent buffers (Llama's rotary
``inv_freq``) are rebuilt from the config. Tied input/output embeddings stay one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from .cuts import ModelPart, UnknownModelFamilyError

def select_state(family: str, state: dict[str, torch.Tensor], part: ModelPart) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``part`` holds (the same tensor objects: nothing is copied)."""
    return {k: v for k, v in state.items() if part.holds_key(family, k)}


def storage_key(t: torch.Tensor) -> tuple:
    """Two tensors with the same key are one tensor (tied weights seen through two names)."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def unique_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors in ``state`` (tied weights counted once)."""
    distinct = {storage_key(t): t for t in state.values()}
    return sum(t.numel() * t.element_size() for t in distinct.values())


# ---------------------------------------------------------------------------- transport (pickle)
def tensors_to_buffers(state: dict[str, torch.Tensor]) -> dict:
    """``state`` as raw byte arrays for pickling: each distinct tensor once, as a contiguous uint8
    numpy array, which pickle protocol 5 (Ray) hands over out of band, without a copy."""
    arrays, aliases, first = {}, {}, {}
    for key, t in state.items():
        ident = storage_key(t)
        if ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        t = t.detach().to("cpu").contiguous()
        arrays[key] = (t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return {"arrays": arrays, "aliases": aliases, "order": list(state)}


def tensors_from_buffers(packed: dict) -> dict[str, torch.Tensor]:
    """The inverse of ``tensors_to_buffers``. Tensors over read-only buffers (Ray's object store)
    are read-only too: copy before writing (``materialize`` and ``load_base_state`` do)."""
    import warnings

    tensors = {}
    with warnings.catch_warnings():
        # torch warns that it cannot protect a read-only buffer from writes; nothing here writes
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, (array, dtype, shape) in packed["arrays"].items():
            tensors[key] = torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)
    return {k: tensors[packed["aliases"].get(k, k)] for k in packed["order"]}


# ------------------------------------------------------------------------------- building a part
class Pruned(nn.Module):
    """Placeholder for a block or embedding this tier does not hold; calling it is a bug."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is not held by this tier (pruned by the split)")


def _family_modules(lm) -> tuple[str, nn.ModuleList, list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
    """(family, blocks, embedding (owner, name) pairs, final norm (owner, name)) of a causal LM."""
    family = getattr(lm.config, "model_type", None)
    if family == "gpt2":
        t = lm.transformer
        return family, t.h, [(t, "wte"), (t, "wpe")], (t, "ln_f")
    if family == "llama":
        m = lm.model
        return family, m.layers, [(m, "embed_tokens")], (m, "norm")
    raise UnknownModelFamilyError(str(family))


def prune_modules(lm, part: ModelPart) -> None:
    """Replace every block, embedding, final norm and head ``part`` does not hold by a ``Pruned``."""
    _, blocks, embeddings, (norm_owner, norm_name) = _family_modules(lm)
    for i in range(len(blocks)):
        if part.layers is not None and i not in part.layers:
            blocks[i] = Pruned(f"block {i}")
    if not part.embeddings:
        for owner, name in embeddings:
            setattr(owner, name, Pruned(name))
    if not part.head:
        lm.lm_head = Pruned("lm_head")
        setattr(norm_owner, norm_name, Pruned("final norm"))


def _allocate(model: nn.Module, device: str) -> None:
    """Give every meta parameter and persistent buffer uninitialised memory on ``device``; a tensor
    shared by two modules (tied embeddings) stays one tensor. Non-persistent buffers stay on meta."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta and name not in module._non_persistent_buffers_set:
                module._buffers[name] = torch.empty_like(b, device=device)


def _rebuild_computed_buffers(model: nn.Module) -> None:
    """Recompute non-persistent buffers (they are not in any state dict): a rotary embedding is
    rebuilt from the config exactly as the model's constructor builds it."""
    for name, module in list(model.named_modules()):
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise RuntimeError(f"cannot rebuild buffers {meta} of {name} ({type(module).__name__}) for a part of "
                               "the model: only rotary embeddings are recomputed from the config")
        model.set_submodule(name, type(module)(config=model.config))


def _tied(model) -> set[str]:
    """State-dict keys the model ties to another (a package need not carry them)."""
    if not model.config.tie_word_embeddings:
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or {})


def materialize_part(package, share_weights: bool = False):
    """The causal LM of ``package`` holding only ``package.part_spec`` (see the module docstring).

    ``share_weights``: the model's parameters become the package's tensors (no copy; for a package
    this process owns and will not use otherwise, e.g. one about to be saved). By default every
    held weight is copied into the model's own memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .build import _ready

    part = package.part_spec
    config = AutoConfig.for_model(**package.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=package.attn_implementation)
    _family_modules(model)  # an unknown family fails here, by name
    prune_modules(model, part)
    if not share_weights:
        _allocate(model, "cpu")
    missing, unexpected = model.load_state_dict(package.state_dict, strict=False, assign=share_weights)
    tied = _tied(model) if part.embeddings and part.head else set()  # a tied head alone needs its weight
    if unexpected or set(missing) - tied:
        raise ValueError(f"foundation weights do not fit the config: missing={missing} unexpected={unexpected}"
                         + ("" if part.is_whole else f" (a package holding {part})"))
    if part.embeddings and part.head and tied:
        model.tie_weights()
    _rebuild_computed_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"foundation weights do not fit the config: {left} have no value")
    return _ready(model)
