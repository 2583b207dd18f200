"""Load ``{"prompt", "answer", "domain"?}`` examples from a JSON Lines file."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

from gaisnet_ray.data.domains import Example

__all__ = ["DEFAULT_DOMAIN", "DatasetError", "load_jsonl"]

DEFAULT_DOMAIN = "custom"


class DatasetError(ValueError):
    """A dataset file or example is unusable. The message names the file/line or the example."""


def _parse_line(text: str, where: str) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "answer"):
        if key not in obj:
            raise DatasetError(f"{where}: missing field {key!r}")
    fields = {"domain": DEFAULT_DOMAIN}
    fields.update({k: obj[k] for k in ("prompt", "answer", "domain") if k in obj})
    for key, value in fields.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise DatasetError(f"{where}: field {key!r} must be a string, got {kind}")
    return Example(prompt=fields["prompt"], answer=fields["answer"], domain=fields["domain"])


def load_jsonl(path: str | PathLike[str]) -> list[Example]:
    """Examples of a JSONL file in file order; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file '{p}' does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset file '{p}' is not UTF-8: {e}") from None
    return [
        _parse_line(line, f"{p}:{lineno}")
        for lineno, line in enumerate(lines, start=1)
        if line.strip()
    ]
