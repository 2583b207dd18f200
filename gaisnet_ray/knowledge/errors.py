"""Typed errors for knowledge (LoRA adapter state dict) exchange.

Every error carries its payload as attributes (key, source, shapes) and pickles
with that payload and message intact, because these errors cross Ray actor
boundaries. ``source`` is an optional caller label such as ``"edge-1"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_MAX_KEYS_SHOWN = 5


def _label(source: str | None) -> str:
    return repr(source) if source is not None else "<unlabelled>"


def _keys_preview(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


class KnowledgeError(ValueError):
    """Base class: a knowledge update or store operation is invalid."""


class KeyMismatchError(KnowledgeError):
    """Updates do not share the reference update's key set.

    ``mismatches`` maps each offending source label to ``(missing, extra)`` key
    tuples, relative to the reference (first) update labelled ``reference``.
    """

    def __init__(self, reference: str, mismatches: Mapping[str, tuple[Sequence[str], Sequence[str]]]):
        self.reference = reference
        self.mismatches: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
            src: (tuple(sorted(missing)), tuple(sorted(extra))) for src, (missing, extra) in mismatches.items()
        }
        parts = []
        for src, (missing, extra) in self.mismatches.items():
            detail = []
            if missing:
                detail.append(f"missing {_keys_preview(missing)}")
            if extra:
                detail.append(f"extra {_keys_preview(extra)}")
            parts.append(f"{src!r}: {', '.join(detail)}")
        super().__init__(f"key sets differ from reference {reference!r}: " + "; ".join(parts))

    def __reduce__(self):
        return (type(self), (self.reference, self.mismatches))


class ShapeMismatchError(KnowledgeError):
    """A tensor's shape differs from the reference update's shape for that key."""

    def __init__(
        self,
        key: str,
        source: str | None,
        shape: Sequence[int],
        reference: str | None,
        reference_shape: Sequence[int],
    ):
        self.key = key
        self.source = source
        self.shape = tuple(shape)
        self.reference = reference
        self.reference_shape = tuple(reference_shape)
        super().__init__(
            f"shape mismatch for key {key!r}: source {_label(source)} has {self.shape}, "
            f"reference {_label(reference)} has {self.reference_shape}"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.source, self.shape, self.reference, self.reference_shape))


class NonFiniteUpdateError(KnowledgeError):
    """A tensor contains NaN or Inf values."""

    def __init__(self, key: str, source: str | None, shape: Sequence[int], num_nonfinite: int):
        self.key = key
        self.source = source
        self.shape = tuple(shape)
        self.num_nonfinite = num_nonfinite
        super().__init__(
            f"non-finite values (NaN/Inf) in key {key!r} from source {_label(source)}: "
            f"{num_nonfinite} of the tensor of shape {self.shape}"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.source, self.shape, self.num_nonfinite))
