"""Hub access behind ``sources``: a Hub repo id given as ``model.path``.

One metadata request with a short timeout finds the repo's current commit; when the Hub is
unreachable (or offline mode is on) only a copy already in the local Hugging Face cache serves.
Every failure becomes one ``ModelSourceError`` line saying how to provide the model locally.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .sources import ModelSourceError, _one_line

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5.0  # one metadata request to the Hub; offline must fail in seconds, not minutes
# What a Hub snapshot downloads: config, tokenizer files, chat template and safetensors weights.
HUB_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json",
    "merges.txt", "*.model", "chat_template*", "*.safetensors", "model.safetensors.index.json",
)


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or reuse from the local Hugging Face cache) a Hub repo's config, tokenizer, weights."""
    from huggingface_hub import snapshot_download

    revision = _hub_revision(repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS),
                                        local_files_only=revision is None))
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
        raise _hub_error(repo_id, e, reachable=revision is not None) from e
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ModelSourceError(
            f"model.path '{repo_id}': the Hub repo has no config.json or no safetensors weights; "
            "convert it to a local Hugging Face folder and set model.path to that folder",
            repo_id,
        )
    return folder


def _hub_config(repo_id: str) -> dict:
    from huggingface_hub import hf_hub_download

    revision = _hub_revision(repo_id)
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=revision is None)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(repo_id, e, reachable=revision is not None) from e
    return json.loads(Path(path).read_text())


def _hub_revision(repo_id: str) -> str | None:
    """The repo's current commit, asked with a short timeout; None when the Hub is unreachable
    (then only a copy already in the local Hugging Face cache can serve)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    try:
        return HfApi().repo_info(repo_id, timeout=HUB_TIMEOUT_S).sha
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise _hub_error(repo_id, e) from e
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy, 5xx
        log.debug("Hub unreachable for %s: %r", repo_id, e)
        return None


def _hub_error(repo_id: str, error: Exception, reachable: bool = True) -> ModelSourceError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        what = "is gated: accept its licence on the Hub and log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(error, RepositoryNotFoundError):
        what = "is not on the Hub (or is private: log in with `hf auth login` or HF_TOKEN)"
    elif not reachable:
        what = "is not in the local Hugging Face cache and the Hub is unreachable (offline)"
    else:
        what = f"could not be downloaded from the Hub ({type(error).__name__}: {_one_line(error)})"
    return ModelSourceError(
        f"model.path '{repo_id}' {what}; provide the model locally instead: a Hugging Face model folder "
        "(model.path: /path/to/folder), a .gguf file (model.path: /path/to/model.gguf), or the "
        "built-in model.preset: smollm2-135m",
        repo_id,
    )
