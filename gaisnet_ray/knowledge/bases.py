"""Versions of the foundation model itself, as the relay updates it (no Ray, no torch at import).

Layout, beside the adapter versions of ``KnowledgeStore``::

    knowledge/bases/
      lineage.jsonl            one record per base version, append-only
      b0000/                   the foundation the run started from (a Hugging Face folder)
        config.json, model.safetensors, tokenizer files
        lineage.json           version, parent_version, policy, knowledge_version, content_hash, effect,
                               files (name -> bytes, sha256: what verify checks)
      b0001/                   after round 1's relay: b0000 + what the edges relayed, absorbed data-free

Publishing, listing, lineage and truncation are ``VersionedStore``'s (knowledge/versioned.py).
Every adapter version's ``lineage.json`` names the base it applies to (``base.version``,
``base.path`` relative to the run folder). ``refresh_model_dir`` makes the run folder's
``model/`` the newest base by swapping two folders in one atomic rename, so a reader (serving
while training) never finds ``model/`` missing or half written.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..layout import MODEL_CONFIG_NAME, MODEL_SWAP_PREFIX, RunLayout
from ..models.gguf_cache import sha256_file
from ..models.sources import quiet_transformers
from .errors import KnowledgeError
from .versioned import HISTORY_NAME, LINEAGE_NAME, VersionedStore, exchange_paths, fsync_dir, fsync_tree

__all__ = ["HISTORY_NAME", "LINEAGE_NAME", "BaseStore", "refresh_model_dir"]


class BaseStore(VersionedStore):
    """Append-only, versioned Hugging Face folders of the foundation model under ``root``."""

    prefix = "b"
    noun = "base version"
    reserved_keys = ("version", "created_at", "files")

    def lineage(self, version: int) -> dict:
        try:
            return super().lineage(version)
        except KnowledgeError:
            raise KnowledgeError(f"base version {version} does not exist under {self.root}") from None

    def publish(self, version: int, model, tokenizer, lineage: dict) -> Path:
        """Write base ``version`` (``model.save_pretrained`` + tokenizer + lineage) atomically."""

        def write(tmp: Path) -> None:
            with quiet_transformers(errors_only=False):  # no "Writing model shards" bar per version
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)

        return self._publish(version, write, lineage, extra=lambda tmp: {"files": _manifest(tmp)})

    def _check_content(self, folder: Path, record: dict, deep: bool) -> str | None:
        """A Hugging Face folder whose files are all there at the sizes published (``deep``: and
        hash as published; that reads the whole model). Bases written before the manifest existed
        are checked for config.json only."""
        if not (folder / MODEL_CONFIG_NAME).is_file():
            return f"{MODEL_CONFIG_NAME} is missing"
        for name, want in sorted((record.get("files") or {}).items()):
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != want.get("bytes"):
                return f"{name} has {path.stat().st_size} bytes, not the {want.get('bytes')} published"
            if deep and sha256_file(path) != want.get("sha256"):
                return f"{name} does not match the sha256 its lineage recorded"
        return None



def _manifest(folder: Path) -> dict[str, dict]:
    """Every file of a base folder (POSIX relative name -> bytes, sha256), lineage.json aside."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LINEAGE_NAME}


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` without its lineage.json: hard links where the file
    system allows (a base version's files never change), copies where it does not."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(LINEAGE_NAME), copy_function=link_or_copy)


def refresh_model_dir(run_dir: str | Path, source: str | Path) -> Path:
    """Make ``run_dir/model`` the base folder ``source`` (its lineage file left out).

    The new folder is built beside ``model/`` (``.model-<hex>``, fsynced), then the two are
    exchanged in one atomic rename and the old one is removed: ``model/`` is always a whole model,
    never missing. Where the OS cannot exchange two folders (not Linux or macOS, or a file system
    without the call), it falls back to rename-aside + rename, which leaves a moment without
    ``model/`` but never a partial one. Never delete-then-copy."""
    run_dir, source = Path(run_dir), Path(source)
    final = RunLayout(run_dir).model
    tmp = run_dir / f"{MODEL_SWAP_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        _link_tree(source, tmp)
        fsync_tree(tmp)
        if not final.exists():
            os.rename(tmp, final)
        elif exchange_paths(tmp, final):  # tmp now holds the old model
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = run_dir / f"{MODEL_SWAP_PREFIX}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # the old model back rather than none
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(run_dir)
    return final
