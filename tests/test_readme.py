"""The README stays true: its config reference lists exactly the config's keys."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from gaisnet_ray.config import Config, default_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _keys(model: BaseModel, prefix: str = "") -> set[str]:
    out = set()
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out |= _keys(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_readme_config_reference_matches_config():
    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.M))
    assert documented == _keys(default_config())
    assert isinstance(default_config(), Config)


def test_readme_config_reference_shows_the_embedded_defaults():
    """The default column is what `gaisnet run` with no config uses (default.yaml over the schema)."""
    import json

    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    shown = dict(re.findall(r"^\| `([a-z_.]+)` \| `(.*?)` \|", section, flags=re.M))
    cfg = default_config().model_dump(mode="json")
    for key, value in shown.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert json.loads(value) == node, f"README shows {key} = {value}, the default is {node!r}"
