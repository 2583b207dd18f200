"""The base every config section shares, and the one error a bad config raises.

Its own module so that each section module (``model``, ``serve``, ``planner`` ...) can import it
without importing the others.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid. The message names the key."""


class Section(BaseModel):
    """A frozen config section that rejects unknown keys.

    ``allow_inf_nan=False``: no float key of the run means anything at inf or NaN (a rate, a size, a
    timeout, a share); ``load_config`` refuses them by key before validation (``_non_finite``), this
    refuses them in code too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
