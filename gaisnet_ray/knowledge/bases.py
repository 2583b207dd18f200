"""Versions of the foundation model itself, as the relay updates it (no Ray, no torch at import).

Layout, beside the adapter versions of ``KnowledgeStore``::

    knowledge/bases/
      lineage.jsonl            one record per base version, append-only
      b0000/                   the foundation the run started from (a Hugging Face folder)
        config.json, model.safetensors, tokenizer files
        lineage.json           version, parent_version, policy, knowledge_version, content_hash, effect
      b0001/                   after round 1's relay: b0000 + what the edges relayed, absorbed data-free

Every adapter version's ``lineage.json`` names the base it applies to (``base.version``,
``base.path`` relative to the run folder). A base folder is complete or absent (written to a
temporary folder, then renamed). ``refresh_model_dir`` makes the run folder's ``model/`` the newest
base, also by rename, so ``model/`` is always a whole model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from ..models.sources import quiet_transformers
from .errors import KnowledgeError

LINEAGE_NAME = "lineage.json"
HISTORY_NAME = "lineage.jsonl"
_BASE_DIR = re.compile(r"^b(\d{4,})$")


class BaseStore:
    """Append-only, versioned Hugging Face folders of the foundation model under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, version: int) -> Path:
        return self.root / f"b{version:04d}"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (_BASE_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m and (self.root / m.group(0) / LINEAGE_NAME).is_file())

    def latest_version(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def lineage(self, version: int) -> dict:
        path = self.path(version) / LINEAGE_NAME
        if not path.is_file():
            raise KnowledgeError(f"base version {version} does not exist under {self.root}")
        return json.loads(path.read_text())

    def publish(self, version: int, model, tokenizer, lineage: dict) -> Path:
        """Write base ``version`` (``model.save_pretrained`` + tokenizer + lineage) atomically."""
        final = self.path(version)
        if final.exists():
            raise KnowledgeError(f"base version {version} already exists at {final}; versions are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-b{version:04d}-{uuid.uuid4().hex[:8]}"
        try:
            with quiet_transformers(errors_only=False):  # no "Writing model shards" bar per version
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            record = {**lineage, "version": version,
                      "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            (tmp / LINEAGE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with open(self.root / HISTORY_NAME, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        return final


def refresh_model_dir(run_dir: str | Path, source: str | Path) -> Path:
    """Make ``run_dir/model`` a copy of the base folder ``source`` (the lineage file left out),
    swapped in by renames so a reader never sees half a model."""
    run_dir, source = Path(run_dir), Path(source)
    final = run_dir / "model"
    tmp = run_dir / f".model-{uuid.uuid4().hex[:8]}"
    old = run_dir / f".model-old-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(LINEAGE_NAME))
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
