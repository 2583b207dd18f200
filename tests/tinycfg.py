"""The tiny job the tests build on: ``examples/tiny.yaml`` (a 0.19M-parameter GPT-2 built from
config), so the suite stays fast while the embedded default fine-tunes the real model."""

from __future__ import annotations

from pathlib import Path

from gaisnet_ray.config import Config, load_config

TINY_YAML = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


def tiny_config(*overrides: str) -> Config:
    """The tiny job's config with ``key=value`` overrides (as ``--set`` takes them)."""
    return load_config(TINY_YAML, list(overrides))


def write_tiny_yaml(path: Path, extra: dict | None = None) -> Path:
    """A config file for ``gaisnet run`` that is the tiny job with ``extra`` merged in (a file
    only names the keys it changes, and is merged over the embedded default; the tiny job sets
    every key the default sets, so the result is the tiny job whatever the default is)."""
    import yaml

    from gaisnet_ray.config import _deep_merge

    data = yaml.safe_load(TINY_YAML.read_text())
    path.write_text(yaml.safe_dump(_deep_merge(data, extra or {}), sort_keys=False))
    return path


def tiny_package(family: str, **config):
    """The tiny preset of ``family`` as a ``FoundationPackage``; ``config``: model config fields to
    change first (e.g. ``tie_word_embeddings=True`` on the Llama preset), weights drawn with seed 0."""
    import torch

    from gaisnet_ray.config import ModelConfig
    from gaisnet_ray.models.build import FoundationPackage, build_foundation

    model, tok = build_foundation(ModelConfig(family=family))
    if config:
        cfg = model.config
        for k, v in config.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        model = type(model)(cfg)
        model.tie_weights()
    return FoundationPackage.from_model(model, tok)
