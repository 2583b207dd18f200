"""Training schemes: one class per scheme behind one interface (``base.Scheme``), chosen from the
config in one place (``scheme_of``).

Adding a scheme: a new file with its ``Scheme`` subclass, one line in ``SCHEMES`` below, and its
name in the config's ``training.scheme`` choices (a test holds the two lists equal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Scheme
from .centralized import Centralized
from .fl import FL
from .hfsl import HFSL
from .local import Local
from .sl import SL

if TYPE_CHECKING:
    from ..config import Config

SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (HFSL, FL, SL, Centralized, Local)}


def scheme_named(name: str) -> Scheme:
    try:
        return SCHEMES[name]()
    except KeyError:
        raise ValueError(f"unknown training.scheme '{name}': use one of {sorted(SCHEMES)}") from None


def scheme_of(cfg: Config) -> Scheme:
    """The scheme ``training.scheme`` names: the one place the config's string becomes behaviour.
    A config the scheme cannot run is refused here (``ConfigError``)."""
    scheme = scheme_named(cfg.training.scheme)
    scheme.check(cfg)
    return scheme


__all__ = ["FL", "HFSL", "SCHEMES", "SL", "Centralized", "Local", "Scheme", "scheme_named", "scheme_of"]
