"""The GGUF conversion cache behind ``sources.resolve_model_dir`` and ``sources.model_config_dict``.

A GGUF is converted once into ``<cache>/models/<stem>-<sha256[:16]>/``: dequantized to float32,
re-saved as safetensors with its tokenizer and chat template, fsynced and published by an atomic
rename, with the source's path, sha256, size and mtime in ``gaisnet_source.json`` (written last).
A lookup takes a folder whose record has seen this path with this size and mtime without hashing;
otherwise the sha256 decides and a match is remembered. Converters on one host take a lock;
temp folders left by a killed converter are removed after an hour.
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
from pathlib import Path

from .sources import SOURCE_JSON, ModelSourceError, _check_family, _one_line, cache_root, quiet_transformers

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the converted folder's layout changes
_STALE_TEMP_S = 3600.0  # a temp conversion folder older than this was left by a killed process


def _converted(gguf: Path, cache_dir: str | Path | None) -> Path:
    """The cache folder holding ``gguf`` converted to a Hugging Face folder; converts it if needed."""
    from .cuts import UnknownModelFamilyError

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
                      "seen": [stamp], "config": _folder_config(tmp)}
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
    sha = sha256_file(gguf)
    folder = models / f"{gguf.stem}-{sha[:16]}"
    if not _complete(folder):
        return None, sha
    _remember(folder, stamp)
    return folder, sha


def _folder_config(folder: Path) -> dict:
    """The converted folder's whole config (``PretrainedConfig.to_dict()``, defaults included)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).to_dict()


def recorded_config(folder: Path) -> dict | None:
    """The config kept in a cache folder's record at conversion (None if the record has none): what
    ``sources.model_config_dict`` returns without importing transformers in the driver."""
    try:
        config = json.loads((folder / SOURCE_JSON).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return dict(config) if isinstance(config, dict) and config.get("model_type") else None


def record_config(folder: Path, config: dict) -> None:
    """Keep ``config`` in the folder's record (a cache converted before records held it)."""
    _update_record(folder, lambda record: record.setdefault("config", config))


def _cached_folder(gguf: Path, cache_dir: str | Path | None) -> Path | None:
    """The complete cache folder converted from ``gguf``, or None (never converts)."""
    models = cache_root(cache_dir) / "models"
    return _lookup(models, gguf)[0] if models.is_dir() else None


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remember(folder: Path, stamp: dict, keep: int = 8) -> None:
    """Add ``stamp`` to the folder's record (atomic replace) so the next lookup needs no hash."""

    def add(record: dict) -> None:
        seen = [s for s in record.get("seen", []) if s.get("path") != stamp["path"]]
        record["seen"] = [stamp, *seen][:keep]

    _update_record(folder, add)


def _update_record(folder: Path, change) -> None:
    """Apply ``change`` to the folder's record in place (atomic replace); a failure is logged only."""
    record_path = folder / SOURCE_JSON
    try:
        record = json.loads(record_path.read_text())
        change(record)
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

    if not torch.cuda.is_available():
        # loading pulls in DeepSpeed (through accelerate), whose accelerator guess prints a warning
        # straight to the console; on a host without CUDA it would pick the CPU anyway
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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


# -------------------------------------------------------------------------------------- helpers
def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (the GGUF cache key; base versions' file manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
