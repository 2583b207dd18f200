"""What each tier holds of the foundation, in plain Python: ``ModelPart`` (which blocks, the
embeddings, the head) and ``Cut`` (a device's cut points), and the families a model can be split in.

No torch, transformers or peft here: the driver plans, checks memory and hands each actor its part
before any model library is loaded in its process. The code that builds and runs the parts is in
``models.parts`` and ``models.split``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SUPPORTED_FAMILIES = ("gpt2", "llama")


class UnknownModelFamilyError(ValueError):
    """The model's architecture family has no splitter (see gaisnet_ray.models.split)."""

    def __init__(self, family: str):
        super().__init__(
            f"unknown model family '{family}': supported families are {list(SUPPORTED_FAMILIES)}"
        )
        self.family = family

    def __reduce__(self):
        return (type(self), (self.family,))


_LAYER_KEY = re.compile(r"\.(?:h|layers)\.(\d+)\.")

# Foundation state-dict prefixes outside the blocks, per family: which part each belongs to.
_NON_BLOCK_KEYS: dict[str, dict[str, str]] = {
    "gpt2": {"transformer.wte.": "embeddings", "transformer.wpe.": "embeddings",
             "transformer.ln_f.": "head", "lm_head.": "head"},
    "llama": {"model.embed_tokens.": "embeddings", "model.norm.": "head", "lm_head.": "head"},
}


def layer_of_key(key: str) -> int | None:
    """Block index an adapter/state key belongs to, or None for embeddings/norm/head keys."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ModelPart:
    """The modules of the foundation a package or tier model holds (hashable: one object per part)."""

    layers: frozenset[int] | None = None  # blocks held; None: every block
    embeddings: bool = True  # token (GPT-2: and position) embeddings
    head: bool = True  # final norm + LM head

    @classmethod
    def whole(cls) -> "ModelPart":
        return cls()

    @classmethod
    def of(cls, layers: Iterable[int] | None, embeddings: bool, head: bool) -> "ModelPart":
        return cls(None if layers is None else frozenset(int(i) for i in layers), bool(embeddings), bool(head))

    @property
    def is_whole(self) -> bool:
        return self.layers is None and self.embeddings and self.head

    @property
    def is_empty(self) -> bool:
        """No block, embedding or head (an edge under FL, whose devices hold the whole model)."""
        return self.layers == frozenset() and not self.embeddings and not self.head

    def held_layers(self, num_layers: int) -> set[int]:
        return set(range(num_layers)) if self.layers is None else set(self.layers)

    def covers(self, other: "ModelPart", num_layers: int) -> bool:
        """Whether everything ``other`` holds is held here too."""
        return (other.held_layers(num_layers) <= self.held_layers(num_layers)
                and (self.embeddings or not other.embeddings) and (self.head or not other.head))

    def holds_key(self, family: str, key: str) -> bool:
        """Whether a foundation state-dict key belongs to this part."""
        layer = layer_of_key(key)
        if layer is not None:
            return self.layers is None or layer in self.layers
        kind = non_block_kind(family, key)
        return self.embeddings if kind == "embeddings" else self.head

    def __str__(self) -> str:
        if self.is_whole:
            return "the whole model"
        blocks = "all blocks" if self.layers is None else (
            f"blocks {_ranges(self.layers)}" if self.layers else "no blocks")
        return " + ".join([blocks] + (["embeddings"] if self.embeddings else [])
                          + (["final norm and head"] if self.head else []))


def _ranges(layers: Iterable[int]) -> str:
    """{0, 1, 2, 29} -> '0-2, 29'."""
    out, run = [], []
    for i in sorted(layers):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def non_block_kind(family: str, key: str) -> str:
    """'embeddings' or 'head' for a foundation key outside the blocks; a key of no known part raises."""
    prefixes = _NON_BLOCK_KEYS.get(family)
    if prefixes is None:
        raise UnknownModelFamilyError(family)
    for prefix, kind in prefixes.items():
        if key.startswith(prefix):
            return kind
    raise ValueError(f"foundation key '{key}' of a {family} model belongs to no block, embedding or head: "
                     f"gaisnet_ray.models.cuts._NON_BLOCK_KEYS must name its prefix before it can be split")


@dataclass(frozen=True)
class Cut:
    """Cut points of one device: front = blocks[0:front_end], back = blocks[back_start:L]."""

    front_end: int  # k
    back_start: int  # m

    @classmethod
    def from_layers(cls, num_layers: int, front_layers: int, back_layers: int) -> "Cut":
        if front_layers + back_layers >= num_layers:
            raise ValueError(
                f"cut front_layers={front_layers} + back_layers={back_layers} leaves no block for the "
                f"edge: the model has {num_layers} blocks"
            )
        return cls(front_layers, num_layers - back_layers)

    def device_layers(self, num_layers: int) -> set[int]:
        return set(range(self.front_end)) | set(range(self.back_start, num_layers))

    def edge_layers(self) -> set[int]:
        return set(range(self.front_end, self.back_start))

    def device_part(self, num_layers: int) -> ModelPart:
        """What a device with this cut holds: embeddings, front and back blocks, final norm, head."""
        return ModelPart.of(self.device_layers(num_layers), embeddings=True, head=True)


def edge_part(cuts) -> ModelPart:
    """What an edge serving devices with these cuts holds: the union of their middle blocks."""
    return ModelPart.of(set().union(*(c.edge_layers() for c in cuts)), embeddings=False, head=False)


@dataclass(frozen=True)
class NoWeights:
    """What a node whose part is empty (``ModelPart.is_empty``) is handed in place of a foundation
    package: the block count only. No tensors and no tokenizer travel, so receiving it loads no model
    library in the node's process (an edge under FL only averages its devices' adapters)."""

    num_layers: int

    @property
    def part_spec(self) -> ModelPart:
        return ModelPart.of((), embeddings=False, head=False)
