"""Versioned knowledge store on disk: the adapter versions of a run (global, and each edge's).

Layout (each version folder loads with plain ``PeftModel.from_pretrained``)::

    root/
      lineage.jsonl              one JSON record per published version, append-only
      v0000/
        adapter_config.json      peft_config.save_pretrained(...)
        adapter_model.safetensors
        lineage.json             caller's lineage + version, content_hash, num_tensors, nbytes, created_at

Publishing, listing, lineage and truncation are ``VersionedStore``'s (knowledge/versioned.py):
a version folder is complete or absent. This class adds the adapter content: what is written,
and the integrity check that the weights still hash to the ``content_hash`` of their lineage.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch

from gaisnet_ray.knowledge.aggregate import StateDict, check_finite
from gaisnet_ray.knowledge.accounting import content_hash, tensor_nbytes
from gaisnet_ray.knowledge.errors import KnowledgeError
from gaisnet_ray.knowledge.versioned import HISTORY_NAME, LINEAGE_NAME, VersionedStore
from gaisnet_ray.models.prefix import PEFT_PREFIX_KEY, from_peft_layout, to_peft_layout

if TYPE_CHECKING:  # peft costs seconds to import; only publish() needs it at run time
    from peft import PeftConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
RESERVED_LINEAGE_KEYS = ("version", "content_hash", "num_tensors", "nbytes", "created_at", "files_sha256")

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "HISTORY_NAME", "LINEAGE_NAME", "RESERVED_LINEAGE_KEYS",
           "KnowledgeStore"]


def _is_prefix(peft_config) -> bool:
    """Whether ``peft_config`` is prefix tuning (``peft.method: prefix``: stored in peft's layout)."""
    return str(getattr(peft_config.peft_type, "value", peft_config.peft_type)) == "PREFIX_TUNING"


class KnowledgeStore(VersionedStore):
    """Append-only, versioned store of adapter state dicts under ``root``."""

    prefix = "v"
    noun = "version"
    reserved_keys = RESERVED_LINEAGE_KEYS

    def publish(self, version: int, state_dict: StateDict, peft_config: PeftConfig, lineage: dict,
                files: dict[str, bytes] | None = None) -> Path:
        """Write version ``version`` atomically and return its folder. ``files``: small extra files
        published with the weights (e.g. the calibrated ``routing.json``); their sha256 go into the
        lineage (``files_sha256``) and ``verify`` checks them like the weights."""
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
        if self.folder(version).exists():
            raise KnowledgeError(f"version {version} already exists at {self.folder(version)}; versions are immutable")
        check_finite(state_dict, source=self.name(version))
        if _is_prefix(peft_config):  # per-block prefix knowledge -> peft's one prompt_embeddings tensor
            state_dict = to_peft_layout(state_dict)

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        filled = {"content_hash": content_hash(tensors), "num_tensors": len(tensors),
                  "nbytes": sum(tensor_nbytes(t) for t in tensors.values())}
        files = dict(files or {})
        if files:
            taken = sorted(set(files) & {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LINEAGE_NAME})
            if taken or any("/" in name or name.startswith(".") for name in files):
                raise KnowledgeError(f"extra files {sorted(files)} must be plain names other than the store's own")
            filled["files_sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}

        def write(tmp: Path) -> None:
            config = copy.deepcopy(peft_config)  # never mutate the caller's config
            config.inference_mode = True  # as PeftModel.save_pretrained writes it
            config.save_pretrained(str(tmp))  # base_model_name_or_path kept as the config carries it
            safetensors.torch.save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            for name, data in files.items():
                (tmp / name).write_bytes(data)

        return self._publish(version, write, lineage, extra=lambda _: filled)

    def load(self, version: int) -> StateDict:
        """The published state dict (cpu tensors, keys as published; prefix knowledge, stored in
        peft's layout, comes back per block as it was published)."""
        state = safetensors.torch.load_file(str(self.path(version) / ADAPTER_WEIGHTS_NAME), device="cpu")
        if PEFT_PREFIX_KEY in state:
            config = json.loads((self.path(version) / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
            state = from_peft_layout(state, int(config["num_layers"]))
        return state

    def _check_content(self, folder: Path, record: dict, deep: bool) -> str | None:
        """Intact means: the adapter config is there, the weights file loads, and the tensors hash to
        the ``content_hash`` the lineage recorded when the version was published (so a truncated or
        edited file is caught before anything loads it into a model). Adapters are small: always deep."""
        if not (folder / ADAPTER_CONFIG_NAME).is_file():
            return f"{ADAPTER_CONFIG_NAME} is missing"
        try:
            tensors = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS_NAME), device="cpu")
        except FileNotFoundError:
            return f"{ADAPTER_WEIGHTS_NAME} is missing"
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            return f"{ADAPTER_WEIGHTS_NAME} cannot be read ({type(e).__name__}: {str(e)[:80]})"
        expected = record.get("content_hash")
        if not expected:
            return "its lineage records no content_hash"
        if content_hash(tensors) != expected:
            return f"{ADAPTER_WEIGHTS_NAME} does not match its lineage's content_hash"
        for name, digest in (record.get("files_sha256") or {}).items():
            try:
                data = (folder / name).read_bytes()
            except OSError:
                return f"{name} is missing"
            if hashlib.sha256(data).hexdigest() != digest:
                return f"{name} does not match its lineage's files_sha256"
        return None
