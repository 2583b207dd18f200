"""Local: each device trains alone, the whole model, and keeps its own adapter from round to round.

The lower bound of the study (issue 10): no knowledge is shared. Rounds keep their shape (each
device is its own cluster, as under ``fl``) so the same runtime, steps and seeds apply, but a
device starts each turn from the adapter it trained itself (``DeviceTrainer`` with
``keep_adapter``), never from an average. The cloud still gets every device's adapter, only to
evaluate each one on the device's own domains and on all of them (``metrics["eval_devices"]``;
``metrics["eval"]`` is the mean over devices), and stores their average as the version (used by
no device: a version must exist for the run folder, resume checks and serving).

Refused: a relay into the base (devices' adapters are deltas on the base they started from: a
new base under them would silently change what they learned), and ``--resume`` (a device's own
adapter lives on the device, not in the run folder).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .fl import FL

if TYPE_CHECKING:
    from ..config import Config


class Local(FL):
    name: ClassVar[str] = "local"
    keeps_adapters: ClassVar[bool] = True
    secure_aggregation: ClassVar[bool] = False  # each device's adapter goes up to be evaluated alone

    @property
    def label(self) -> str:
        return "local rounds (each device alone)"

    def check(self, cfg: Config) -> None:
        from ..config import ConfigError

        if cfg.relay.policy != "none":
            raise ConfigError(f"training.scheme 'local' keeps each device's own adapter on the base it started "
                              f"from: relay.policy '{cfg.relay.policy}' would change that base under it; "
                              f"set relay.policy=none")
