"""What ``gaisnet run`` checks before it imports torch, transformers or Ray, so bad input exits 2
in well under a second with one line naming the key or path:

- the run folder (``--out``): not a folder that holds a run, and one that can be created here;
- the model source: a ``model.path`` that exists (a folder, a .gguf file or a Hub repo id), a real
  preset's weights package that is installed;
- every device's cut against the model's block count, when that count is known without loading
  anything: the presets built from config and a Hugging Face folder's ``config.json``.

A GGUF file, a Hub repo id and the real presets are checked later by ``job.check_model`` (it reads
their metadata with transformers), still before Ray starts. No torch, transformers or Ray here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError, ModelConfig
from .models.sources import REAL_PRESETS, ModelSourceError, _classify_path, num_blocks, preset_gguf
from .privacy.secagg_check import check_secure_aggregation
from .runfolder import usable_run_dir
from .schemes import scheme_of

__all__ = ["check_run_input", "check_cuts", "quick_num_blocks"]


def check_run_input(cfg: Config, out: str | Path | None) -> Path:
    """The run folder a new run will write (refused if taken or impossible to create), after the
    model source and the cuts are checked. Raises ``RunFolderError``, ``ModelSourceError`` or
    ``ConfigError``; creates nothing."""
    scheme_of(cfg)  # a scheme refuses a config it cannot run (``local`` with a relay)
    check_secure_aggregation(cfg)  # privacy.secure_aggregation where the edge could not unmask
    run_dir = usable_run_dir(cfg, out)
    n = quick_num_blocks(cfg.model)
    if n is not None:
        check_cuts(cfg, n)
    return run_dir


def quick_num_blocks(model: ModelConfig) -> int | None:
    """The model's block count when it is known from config alone (a preset built from config, a
    Hugging Face folder's config.json); ``None`` for a GGUF, a Hub id or a real preset. A
    ``model.path`` that does not exist, or a real preset whose weights package is not installed,
    raises ``ModelSourceError``."""
    from .models.presets import PRESETS

    if model.path is None:
        if model.preset in REAL_PRESETS:
            preset_gguf(model.preset)  # its weights package is installed (else: the install command)
            return None
        return PRESETS[model.preset][0]
    kind, where = _classify_path(model.path)
    if kind != "folder":
        return None
    config = where / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"model.path '{model.path}': {config.name} is not readable JSON "
                               f"({type(e).__name__})", model.path) from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"model.path '{model.path}': {config.name} does not hold a JSON object", model.path)
    try:
        return num_blocks(data)
    except (ValueError, TypeError) as e:
        raise ModelSourceError(f"model.path '{model.path}': {e}", model.path) from None


def check_cuts(cfg: Config, num_layers: int) -> None:
    """Every device's cut (``topology.cut`` and each ``topology.device_cuts`` entry) leaves the edge
    at least one of the model's ``num_layers`` blocks (the rule ``models.split.Cut.from_layers``
    applies in every tier). A scheme without a split (FL) trains the whole model on the device: no cut."""
    t = cfg.topology
    if not scheme_of(cfg).splits:
        return
    for key, cut in [("topology.cut", t.cut), *((f"topology.device_cuts.{d}", c) for d, c in t.device_cuts.items())]:
        if cut.front_layers + cut.back_layers >= num_layers:
            raise ConfigError(
                f"invalid value for '{key}': cut front_layers={cut.front_layers} + back_layers={cut.back_layers} "
                f"leaves no block for the edge: the model has {num_layers} blocks"
            )
