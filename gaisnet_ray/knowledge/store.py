"""Versioned knowledge store on disk.

Layout (each version folder loads with plain ``PeftModel.from_pretrained``)::

    root/
      lineage.jsonl              one JSON record per published version, append-only
      v0000/
        adapter_config.json      peft_config.save_pretrained(...)
        adapter_model.safetensors
        lineage.json             caller's lineage + version, content_hash, num_tensors, nbytes, created_at

A version folder is complete or absent: it is written to a temporary folder and
renamed into place. ``lineage.json`` inside the folder is the source of truth;
``lineage.jsonl`` is a convenience log appended after the rename.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch

from gaisnet_ray.knowledge.aggregate import StateDict, check_finite
from gaisnet_ray.knowledge.codec import content_hash, tensor_nbytes
from gaisnet_ray.knowledge.errors import KnowledgeError

if TYPE_CHECKING:  # peft costs seconds to import; only publish() needs it at run time
    from peft import PeftConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LINEAGE_NAME = "lineage.json"
HISTORY_NAME = "lineage.jsonl"
RESERVED_LINEAGE_KEYS = ("version", "content_hash", "num_tensors", "nbytes", "created_at")

_VERSION_DIR = re.compile(r"^v(\d{4,})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KnowledgeStore:
    """Append-only, versioned store of adapter state dicts under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- writing ---------------------------------------------------------------------------------

    def publish(self, version: int, state_dict: StateDict, peft_config: PeftConfig, lineage: dict) -> Path:
        """Write version ``version`` atomically and return its folder."""
        from peft import PeftConfig

        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise KnowledgeError(f"version must be an int >= 0; got {version!r}")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peft.PeftConfig; got {type(peft_config).__qualname__}")
        if not state_dict:
            raise KnowledgeError(f"refusing to publish an empty state dict as version {version}")
        clash = sorted(set(lineage) & set(RESERVED_LINEAGE_KEYS))
        if clash:
            raise KnowledgeError(f"lineage keys {clash} are reserved; the store fills them in")
        final = self._dir(version)
        if final.exists():
            raise KnowledgeError(f"version {version} already exists at {final}; versions are immutable")
        check_finite(state_dict, source=f"v{version:04d}")

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        record: dict[str, Any] = {
            **lineage,
            "version": version,
            "content_hash": content_hash(tensors),
            "num_tensors": len(tensors),
            "nbytes": sum(tensor_nbytes(t) for t in tensors.values()),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        record_json = json.dumps(record, sort_keys=True)  # fails early if lineage is not JSON-serializable

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-v{version:04d}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            config = copy.deepcopy(peft_config)  # never mutate the caller's config
            config.inference_mode = True  # as PeftModel.save_pretrained writes it
            config.save_pretrained(str(tmp))  # base_model_name_or_path kept as the config carries it
            safetensors.torch.save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / LINEAGE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        with open(self.root / HISTORY_NAME, "a", encoding="utf-8") as fh:
            fh.write(record_json + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return final

    # --- reading ---------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Published versions, ascending (temporary folders are ignored)."""
        return [v for v in self._folder_versions() if (self._dir(v) / LINEAGE_NAME).is_file()]

    def _folder_versions(self) -> list[int]:
        """Every ``vNNNN`` folder, ascending, with or without its lineage.json."""
        if not self.root.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        """Folder of a published version; pass it to ``PeftModel.from_pretrained``."""
        folder = self._dir(version)
        if not (folder / LINEAGE_NAME).is_file():
            raise KnowledgeError(f"version {version} not found in {self.root}; have {self.versions()}")
        return folder

    def load(self, version: int) -> StateDict:
        """The published state dict (cpu tensors, keys as published)."""
        return safetensors.torch.load_file(str(self.path(version) / ADAPTER_WEIGHTS_NAME), device="cpu")

    def verify(self, version: int) -> str | None:
        """None if version ``version`` is intact, else one line saying what is wrong with it.

        Intact means: its lineage record parses, its weights file loads, and the tensors hash to the
        ``content_hash`` the lineage recorded when the version was published (so a truncated or
        edited file is caught before anything loads it into a model)."""
        folder = self._dir(version)
        name = folder.name
        try:
            record = json.loads((folder / LINEAGE_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{name}: {LINEAGE_NAME} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{name}: {LINEAGE_NAME} is unreadable ({type(e).__name__})"
        if not (folder / ADAPTER_CONFIG_NAME).is_file():
            return f"{name}: {ADAPTER_CONFIG_NAME} is missing"
        try:
            tensors = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS_NAME), device="cpu")
        except FileNotFoundError:
            return f"{name}: {ADAPTER_WEIGHTS_NAME} is missing"
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            return f"{name}: {ADAPTER_WEIGHTS_NAME} cannot be read ({type(e).__name__}: {str(e)[:80]})"
        expected = record.get("content_hash") if isinstance(record, dict) else None
        if not expected:
            return f"{name}: its lineage records no content_hash"
        actual = content_hash(tensors)
        if actual != expected:
            return f"{name}: {ADAPTER_WEIGHTS_NAME} does not match its lineage's content_hash"
        return None

    def damaged(self) -> dict[int, str]:
        """Version -> reason, for every version folder that fails :meth:`verify`, including a
        ``vNNNN`` folder whose lineage.json is gone (:meth:`versions` does not list it: publish
        renames a complete folder into place, so such a folder was damaged afterwards)."""
        return {v: why for v in self._folder_versions() if (why := self.verify(v)) is not None}

    def latest_intact(self, up_to: int | None = None) -> tuple[int | None, dict[int, str]]:
        """The newest version (at most ``up_to``) that passes :meth:`verify`, and the newer ones skipped
        on the way, each with its reason. Older versions are not checked (they are not needed)."""
        skipped: dict[int, str] = {}
        for v in reversed(self.versions()):
            if up_to is not None and v > up_to:
                continue
            why = self.verify(v)
            if why is None:
                return v, skipped
            skipped[v] = why
        return None, skipped

    def lineage(self, version: int) -> dict:
        return json.loads((self.path(version) / LINEAGE_NAME).read_text())

    def history(self) -> list[dict]:
        """All records of lineage.jsonl, in publish order."""
        log = self.root / HISTORY_NAME
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:04d}"
