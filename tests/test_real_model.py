"""The real weights (SmolLM2-135M-Instruct) through every tier, kept fast with a slice of them.

The slice is the real model cut to its first 3 of 30 blocks (embeddings, blocks 0-2, final norm,
tied head and the tokenizer with its chat template, all as converted from the weights package):
enough for a device front (block 0), an edge middle (block 1) and a device back (block 2). Its text
is gibberish, so the tests check that the computations agree and that prompts are formatted by the
template, not what the slice says. One test loads the whole model, to see the template-formatted
evaluation answer a question the base model knows.

Without the weights package the ``smollm2_dir`` fixture fails with the install command (never a
skip). The ``ray`` tests share the session's local Ray (``ray_local``) and serve one run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gaisnet_ray.config import PeftConfig
from gaisnet_ray.data import IGNORE_INDEX, encode_examples, encode_prompt, sample_examples
from gaisnet_ray.models.cuts import ModelPart

from conftest import free_port
from loracheck import lora_grads, randomize_lora
from tinycfg import tiny_config

SLICE_BLOCKS = 3  # front 1 | middle 1 | back 1
SYSTEM = "You answer in as few words as you can."  # the run's data.system_prompt (not the default)
PEFT = PeftConfig(r=4, alpha=8.0)
FRANCE = "What is the capital of France?"
LOSSES = ("model_loss", "back_loss")  # the Hugging Face model's own loss; the one devices train on


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """The chat template's own tokens for ``messages`` (plain transformers, the reference)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _conversation(prompt: str, system: str | None = None, answer: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}] + (
        [{"role": "assistant", "content": answer}] if answer is not None else [])


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slice_dir(smollm2_dir, tmp_path_factory) -> Path:
    """The real model's first ``SLICE_BLOCKS`` blocks as a Hugging Face folder, checked to hold the
    very weights of the conversion (nothing re-initialised) with the head still tied."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gaisnet_ray.models.sources import quiet_transformers

    with quiet_transformers():  # the 27 dropped blocks are reported as unexpected keys
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=SLICE_BLOCKS,
                                                     dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == SLICE_BLOCKS
    assert len(model.model.layers) == SLICE_BLOCKS and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as full:
        stored = set(full.keys())
        held = {k for k in state if k != "lm_head.weight"}  # the head is the embedding (tied)
        expected = {k for k in stored if not k.startswith("model.layers.")} | {
            k for k in stored for i in range(SLICE_BLOCKS) if k.startswith(f"model.layers.{i}.")}
        assert held == expected
        for key in sorted(held):
            assert torch.equal(state[key], full.get_tensor(key)), f"{key} is not the real weight"
    out = tmp_path_factory.mktemp("smollm2-slice")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def slice_foundation(slice_dir):
    """The slice as the runtime loads it (float32, pad token set) and its FoundationPackage."""
    from gaisnet_ray.models.build import FoundationPackage, load_foundation

    model, tokenizer = load_foundation(slice_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    return SimpleNamespace(model=model, tokenizer=tokenizer, package=FoundationPackage.from_model(model, tokenizer))


# ------------------------------------------------------------------- 1. split equivalence


@pytest.fixture(scope="module")
def split_case(slice_foundation):
    """Chat-template rows of a real domain, a random adapter (the knowledge every tier loads), and
    the unsplit peft model's loss and LoRA gradients under each loss the runtime uses, computed once."""
    from gaisnet_ray.models.adapters import adapter_state
    from gaisnet_ray.models.split import build_tier_model

    pkg, tok = slice_foundation.package, slice_foundation.tokenizer
    batch = encode_examples(sample_examples("catalogue", "private", 3, 0), tok, 48, SYSTEM)
    ids, labels = batch["input_ids"], batch["labels"]  # (3, 48)
    assert (labels != IGNORE_INDEX).sum(1).min() >= 2  # answer tokens + <|im_end|> on every row
    whole = build_tier_model(pkg, PEFT, ModelPart.of(None, True, True))
    randomize_lora(whole.peft, std=0.02)
    knowledge = adapter_state(whole.peft)
    whole.peft.train()
    unsplit = {}
    for mode in LOSSES:
        whole.peft.zero_grad(set_to_none=True)
        if mode == "model_loss":  # the Hugging Face model's own loss over every position's logits
            loss = whole.peft(input_ids=ids, labels=labels).loss
        else:  # what DeviceTrainer optimizes: norm and head only where a label is supervised
            loss = whole.back_loss(whole.front(ids, 0), 0, labels)
        loss.backward()
        unsplit[mode] = (loss.detach(), lora_grads(whole.peft))
    with torch.no_grad():
        logits = whole.peft(input_ids=ids).logits  # (B, T, V)
    return SimpleNamespace(pkg=pkg, ids=ids, labels=labels, knowledge=knowledge, unsplit=unsplit, logits=logits)



@pytest.mark.parametrize("mode", LOSSES)
def test_split_step_on_the_real_weights_matches_the_unsplit_model(split_case, mode):
    """Device front (block 0) -> edge middle (block 1) -> device back (block 2, norm, tied head) on
    chat-template rows: the loss, the logits and every LoRA gradient equal the unsplit model's
    under the same loss (rtol 1e-5), each gradient computed on the tier that holds it."""
    from gaisnet_ray.models.adapters import adapter_state, load_adapter_state
    from gaisnet_ray.models.split import build_tier_model
    from gaisnet_ray.models.cuts import Cut, layer_of_key

    c = split_case
    cut = Cut.from_layers(SLICE_BLOCKS, 1, 1)
    assert (cut.device_layers(SLICE_BLOCKS), cut.edge_layers()) == ({0, 2}, {1})
    device = build_tier_model(c.pkg, PEFT, cut.device_part(SLICE_BLOCKS))
    edge = build_tier_model(c.pkg, PEFT, ModelPart.of(cut.edge_layers(), False, False))
    assert device.held_layers() == {0, 2} and edge.held_layers() == {1}
    assert device.lm.lm_head.weight.data_ptr() == device.lm.model.embed_tokens.weight.data_ptr()  # still tied
    assert load_adapter_state(device.peft, c.knowledge) == len(adapter_state(device.peft))
    assert load_adapter_state(edge.peft, c.knowledge) == len(adapter_state(edge.peft))
    device.peft.train()
    edge.peft.train()

    h_k = device.front(c.ids, cut.front_end)  # (B, T, 576) on the device
    x = h_k.detach().requires_grad_()  # arrives at the edge
    y = edge.blocks(x, cut.front_end, cut.back_start)  # (B, T, 576) on the edge
    h_m = y.detach().requires_grad_()  # arrives back at the device
    if mode == "model_loss":
        loss = device.loss(device.back(h_m, cut.back_start), c.labels)
    else:
        loss = device.back_loss(h_m, cut.back_start, c.labels)
    loss.backward()
    y.backward(h_m.grad)  # edge: dL/dh_m -> dL/dh_k
    h_k.backward(x.grad)  # device: dL/dh_k -> front adapter gradients

    ref_loss, ref_grads = c.unsplit[mode]
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    dev_grads, edge_grads = lora_grads(device.peft), lora_grads(edge.peft)
    assert {layer_of_key(k) for k in dev_grads} == {0, 2} and {layer_of_key(k) for k in edge_grads} == {1}
    grads = {**dev_grads, **edge_grads}
    assert set(grads) == set(ref_grads) and len(grads) == SLICE_BLOCKS * 7 * 2  # q k v o gate up down x (A, B)
    for key, g in ref_grads.items():
        assert g.abs().max() > 0, f"{key}: gradient is zero, the test would prove nothing"
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-7, msg=lambda s, key=key: f"{key}: {s}")
    if mode == "model_loss":
        with torch.no_grad():
            logits = device.back(edge.blocks(device.front(c.ids, 1), 1, 2), 2)  # (B, T, V)
        torch.testing.assert_close(logits, c.logits, rtol=1e-5, atol=1e-5)


def test_the_loss_devices_train_on_is_the_models_own_loss(split_case):
    """``back_loss`` (head only at supervised positions) is the model's loss, and its gradients are
    the model's up to float32 rounding. That rounding is larger than the split's (which is exact):
    the few-row head matmul sums over the 49,152-token vocabulary with a less accurate kernel
    (measured against float64: 1.5e-5 of a tensor's largest gradient, 2.6e-6 for the full loss)."""
    (model_loss, model_grads), (back_loss, back_grads) = (split_case.unsplit[m] for m in LOSSES)
    torch.testing.assert_close(back_loss, model_loss, rtol=1e-5, atol=1e-6)
    assert set(back_grads) == set(model_grads)
    for key, g in model_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(back_grads[key], g, rtol=0, atol=1e-4 * scale,
                                   msg=lambda s, key=key: f"{key}: {s}")


# ---------------------------------------------------------- 2. chat-template formatting
def test_training_rows_are_the_template_rendering_with_loss_on_the_answer_only(slice_foundation):
    tok = slice_foundation.tokenizer
    examples = sample_examples("town", "private", 4, 0) + sample_examples("addition", "eval", 2, 0)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    for system in (None, SYSTEM):
        batch = encode_examples(examples, tok, 48, system)
        for row, ex in enumerate(examples):
            ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
            prompt = encode_prompt(ex.prompt, tok, system)
            assert prompt == _template_ids(tok, _conversation(ex.prompt, system), generation_prompt=True)
            answer = tok.encode(ex.answer, add_special_tokens=False) + [im_end]
            n = len(prompt) + len(answer)
            # the row is the template's rendering of the whole conversation, up to the end of the answer turn
            assert ids[:n] == _template_ids(tok, _conversation(ex.prompt, system, ex.answer), False)[:n]
            assert ids[:n] == prompt + answer
            assert tok.decode(ids[len(prompt):n]) == ex.answer + "<|im_end|>"
            # labels: exactly the answer tokens and <|im_end|>, at their own positions
            assert [i for i, t in enumerate(labels) if t != IGNORE_INDEX] == list(range(len(prompt), n))
            assert labels[len(prompt):n] == answer
            text = tok.decode(ids[:len(prompt)])
            assert text.endswith(f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n")
            if system is None:  # the template's own default system turn
                assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
            else:  # the configured one replaces it
                assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
                assert "SmolLM" not in text


def test_evaluation_answers_through_the_template_with_the_full_model(smollm2_dir):
    """The whole real model, batched left-padded greedy decoding as evaluation runs it: the base
    answers a question it knows, and a prompt batched beside a longer one decodes as it does alone."""
    from gaisnet_ray.hfsl.evaluate import greedy_answers
    from gaisnet_ray.models.build import load_foundation

    model, tok = load_foundation(smollm2_dir)
    assert model.config.num_hidden_layers == 30
    longer = "Please tell me, in a single word, which city is the capital of the country of Japan?"
    batched = greedy_answers(model, tok, [FRANCE, longer], max_new_tokens=12)
    assert "Paris" in batched[0], batched
    assert "Tokyo" in batched[1], batched
    assert greedy_answers(model, tok, [FRANCE], max_new_tokens=12) == batched[:1]


# --------------------------------------------------- 3. a run on the slice, plain-peft load
RUN = [  # the smallest real job: one edge, one device, a private and a public domain, no relay
    "data.domains=[catalogue]", "data.public_domains=[capitals]", f"data.system_prompt={SYSTEM}",
    "data.samples_per_device=8", "data.eval_samples_per_domain=2", "data.public_samples=8", "data.partition=iid",
    "model.max_seq_len=48", "topology.edges=1", "topology.devices_per_edge=1", "topology.cluster_size=1",
    "training.pretrain_steps=0", "training.rounds=1", "training.local_steps=2", "training.batch_size=4",
    "relay.policy=none", "run.progress=false",
]


@pytest.fixture(scope="module")
def slice_run(slice_dir, tmp_path_factory):
    """One HFSL round of the in-process runtime on the slice: a run folder (config.yaml, model/,
    knowledge v0 and v1, each edge's adapter) and the runtime that wrote it."""
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = tiny_config(f"model.path={slice_dir}", *RUN)
    assert cfg.data.system_prompt == SYSTEM
    out = tmp_path_factory.mktemp("slice-run") / "run"
    out.mkdir()
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    runtime = InProcessGaisNet(cfg, out)
    metrics = runtime.run_round(1)
    assert set(metrics["eval"]) == {"catalogue", "capitals"}
    assert (out / "knowledge" / "v0001" / "adapter_model.safetensors").is_file()
    assert (out / "knowledge" / "edges" / "edge-0" / "v0001" / "adapter_model.safetensors").is_file()
    return SimpleNamespace(dir=out, cfg=cfg, runtime=runtime, metrics=metrics)


def test_devices_train_on_rows_formatted_with_the_runs_system_prompt(slice_run):
    """Every tier formats prompts alike: a device's private rows carry ``data.system_prompt``, as
    evaluation and serving do (not the template's default system turn)."""
    tok = slice_run.runtime.cloud.tokenizer
    for device in slice_run.runtime.devices.values():
        ids, labels = device._next_batch()
        for row in range(ids.shape[0]):
            text = tok.decode(ids[row])
            assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"), text
            assert (labels[row] != IGNORE_INDEX).any()


PLAIN_PEFT_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    run, version, system, prompt, out = sys.argv[1:6]
    # the base this version applies to, as its lineage names it
    base_dir = run + "/" + json.load(open(run + "/knowledge/" + version + "/lineage.json"))["base"]["path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, run + "/knowledge/" + version).eval()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids["input_ids"]).logits
    torch.save({"ids": ids["input_ids"], "logits": logits, "base_logits": base_logits}, out)
    assert not any(m.startswith("gaisnet_ray") for m in sys.modules), "runtime was imported"
""")


def test_knowledge_of_a_slice_run_loads_with_plain_peft_and_gives_the_runtimes_logits(slice_run, tmp_path):
    lineage = json.loads((slice_run.dir / "knowledge" / "v0001" / "lineage.json").read_text())
    assert lineage["base"]["path"] == "model"  # relay none: one fixed base
    script = tmp_path / "load.py"
    script.write_text(PLAIN_PEFT_SCRIPT)
    out = tmp_path / "plain.pt"
    prompt = sample_examples("catalogue", "eval", 1, 0)[0].prompt
    proc = subprocess.run([sys.executable, str(script), str(slice_run.dir), "v0001", SYSTEM, prompt, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out)

    runtime = slice_run.runtime
    assert runtime.cloud.version == 1  # the cloud's model carries the knowledge v1 (no relay)
    ids = encode_prompt(prompt, runtime.cloud.tokenizer, SYSTEM)
    assert plain["ids"][0].tolist() == ids  # the runtime's prompt is the template's
    with torch.no_grad():
        runtime_logits = runtime.cloud.peft(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(plain["logits"], runtime_logits, rtol=0, atol=1e-5)
    # the knowledge changes the function: the equality above is not the base's alone
    assert (plain["logits"] - plain["base_logits"]).abs().max() > 1e-3


# --------------------------------------------------------- 4. the OpenAI API on the slice
@pytest.fixture(scope="module")
def served(ray_local, slice_run):
    import httpx

    from gaisnet_ray.serve.app import start_serving
    from gaisnet_ray.config import ServeSettings

    settings = ServeSettings(port=free_port(), max_new_tokens=16, default_new_tokens=6, max_prompt_tokens=96,
                             max_ongoing_requests=2, max_queued_requests=4, poll_interval_s=5.0)
    handle = start_serving(slice_run.dir, settings)
    client = httpx.Client(base_url=handle.url, timeout=120)
    yield SimpleNamespace(url=handle.url, http=client, run=slice_run)
    client.close()
    handle.shutdown()


@pytest.mark.ray
def test_openai_api_answers_with_the_real_weights_through_the_template(served):
    import openai  # a test dependency (pyproject [test]): missing, this fails rather than skips

    tok = served.run.runtime.cloud.tokenizer
    prompt = sample_examples("catalogue", "eval", 1, 0)[0].prompt
    expected = encode_prompt(prompt, tok, SYSTEM)  # the run's system turn, as in training

    # native: the prompt is a user turn, formatted by the template with the run's system prompt
    r = served.http.post("/v1/generate", json={"prompt": prompt, "tier": "cloud", "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    native = r.json()
    assert (native["tier"], native["adapter"], native["version"]) == ("cloud", "global", 1)
    assert native["text"] and native["usage"]["completion_tokens"] >= 1
    assert native["usage"]["prompt_tokens"] == len(expected)
    routed = served.http.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 4})
    assert routed.status_code == 200, routed.text
    assert routed.json()["tier"] in ("edge", "cloud") and routed.json()["usage"]["prompt_tokens"] == len(expected)

    # OpenAI chat: the messages rendered by the template; with no system message, the run's system turn
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(model="gaisnet", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=6, temperature=0, extra_body={"tier": "cloud"})
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.model_extra["gaisnet"]["tier"] == "cloud" and chat.model_extra["gaisnet"]["version"] == 1
    assert chat.usage.prompt_tokens == len(expected)
    assert chat.choices[0].message.content == native["text"]  # the same model saw the same tokens

    # a system message of the client's own replaces it
    own = [{"role": "system", "content": "Reply in French."}, {"role": "user", "content": prompt}]
    mine = client.chat.completions.create(model="gaisnet", messages=own, max_tokens=4, temperature=0,
                                          extra_body={"tier": "cloud"})
    assert mine.usage.prompt_tokens == len(_template_ids(tok, own, generation_prompt=True))
    assert mine.model_extra["gaisnet"]["tier"] == "cloud"

    # a completion prompt is raw text: the rendered conversation reads exactly as the chat did
    rendered = tok.decode(expected)
    done = client.completions.create(model="gaisnet", prompt=rendered, max_tokens=6, temperature=0,
                                     extra_body={"tier": "cloud"})
    assert done.usage.prompt_tokens == len(expected) and done.choices[0].text == native["text"]
    assert done.model_extra["gaisnet"]["tier"] == "cloud"
