"""Reading a config: the embedded default (``default.yaml``, a package resource), a user's YAML
file merged over it, ``key.sub=value`` overrides, and validation whose errors name the dotted key."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .section import ConfigError
from .tree import Config


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"invalid value for '{key}': {e['msg']}{shown}")
    return "; ".join(lines)


def _one_line(error: Exception) -> str:
    """A YAML error's text (several lines, with a caret drawing) as one line."""
    return " ".join(str(error).split())


def _non_finite(value: Any, key: str = "") -> list[str]:
    """An error naming each dotted key under ``value`` that holds inf or NaN: no key of the config
    means anything there (a rate, a size, a timeout, a share), whichever module its section lives in."""
    if isinstance(value, float):
        ok = math.isfinite(value)
        return [] if ok else [f"invalid value for '{key}': Input should be a finite number (got {value})"]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [k for sub, v in items for k in _non_finite(v, f"{key}.{sub}" if key else str(sub))]


def _validate(data: dict[str, Any]) -> Config:
    bad = _non_finite(data)
    if bad:
        raise ConfigError("; ".join(bad))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def default_config_dict() -> dict[str, Any]:
    text = importlib.resources.files("gaisnet_ray").joinpath("default.yaml").read_text()
    return yaml.safe_load(text) or {}


def default_config() -> Config:
    """The embedded default: local dev mode, offline, a few minutes on 2 CPU cores."""
    return _validate(default_config_dict())


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a config dict."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid value for '{key}': not YAML ({_one_line(e)})") from None
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        out = _deep_merge(out, nested)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the embedded default), apply overrides and validate.

    A user file is merged over the embedded default, so it only needs the keys it changes. Both sit
    on every field's own default, so a key set alone (``links.end_edge.latency_ms=5``) keeps its
    section's other defaults instead of dropping them.
    """
    data = _deep_merge(Config().model_dump(), default_config_dict())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' " + ("is a folder, not a YAML file" if p.is_dir() else "does not exist"))
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {_one_line(e)}") from None
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
        data = _deep_merge(data, user)
    return _validate(apply_overrides(data, overrides or []))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
