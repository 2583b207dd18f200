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
