"""What every tier actor shares: the message audit of what crosses its boundary, and its memory.

``crosses_boundary`` wraps the actor methods that carry data (arguments in, return value out) so
a run with ``run.audit_messages`` can show that no raw sample, label or token id ever leaves a
device; ``AuditedNode`` dumps that audit and reports the actor's peak RSS; ``BaseHolderNode`` adds
the relay down of a new foundation model to a node that holds part of it.
"""

from __future__ import annotations

import functools
import importlib

import ray

from ..worker_setup import peak_rss_mb


def deferred(ref) -> list:
    """Hand an actor an object ref to fetch itself (``fetch_deferred``): a ref nested in a list is
    not resolved by Ray before the actor starts, so the actor's process spawns and imports torch
    while the cloud is still building the foundation the ref will hold. A value that is not a ref
    (``models.cuts.NoWeights``) is handed as it is."""
    return [ref] if isinstance(ref, ray.ObjectRef) else ref


def fetch_deferred(value):
    """The value behind ``deferred(ref)`` (waits for it); anything else as given.

    A deferred value is a part of the foundation: unpickling it imports the model code (transformers
    through ``models.build``, 2.5 s on 2 cores) and building it peft. Those imports run here, before
    the wait, so they overlap the cloud's pre-training instead of following it on the way to round 1.
    A value given as it is (``NoWeights``: an edge under FL) loads neither."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], ray.ObjectRef):
        for module in ("..models.build", "..models.split"):  # for their import time, see above
            importlib.import_module(module, __package__)
        return ray.get(value[0])
    return value


def crosses_boundary(method):
    """Record the method's arguments (in) and return value (out) in the actor's message audit."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._audit.record(method.__name__, "in", {"args": list(args), "kwargs": kwargs})
        out = method(self, *args, **kwargs)
        self._audit.record(method.__name__, "out", out)
        return out

    return wrapper


class AuditedNode:
    """What every tier actor shares: a message audit (``self._audit``), dumped on request, and its
    own peak memory."""

    def dump_audit(self, directory: str) -> str | None:
        path = self._audit.dump(directory)
        return str(path) if path else None

    def peak_rss_mb(self) -> float:
        """The actor's peak RSS so far (MB); the driver records it per actor kind every round."""
        return peak_rss_mb()


class BaseHolderNode(AuditedNode):
    """A tier actor over one trainer (``self.core``) that holds part of the foundation model."""

    def holdings(self) -> dict | None:
        """What this actor's model holds (``SplitModel.holdings``; None: it holds no model, as an
        FL edge): asked by tests to check what a tier can see, from the live actor."""
        split = getattr(self.core, "split", None)
        return split.holdings() if split is not None else None

    @crosses_boundary
    def update_base(self, package) -> int:
        """Relay down: load this node's part of the new base (it holds exactly what the node holds);
        returns the bytes taken."""
        return self.core.update_base(package)
