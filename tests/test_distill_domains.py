"""Relay by distillation reaches every domain the teachers learned (issue 10, item 3), in one
process (no Ray), on the tiny GPT-2 given a ChatML-like chat template (the byte tokenizer has
none; the real model's SmolLM2 template behaves the same way: its BOS opens a turn and its EOS
closes one).

The base is pre-trained on a public domain; two teachers (the base with one adapter each) learn
one private domain each; the cloud distills them with ``relay.distill_inputs=chat``. After it, the
base alone is better on every private domain a teacher got better on. The inputs are data-free:
a function of the base, the adapters, the seed and the config, the same whatever the devices hold.
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import load_config
from tinycfg import TINY_YAML

SYSTEM = "Answer."
SEQ = 64
# ChatML with the byte tokenizer's specials: <bos> opens a turn, <eos> closes it (as SmolLM2's
# <|im_start|>/<|im_end|>, which are its bos/eos)
TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
PUBLIC, PRIVATE = "arithmetic", ("units", "facts")


def _batch(examples, tok):
    from gaisnet_ray.data import encode_examples

    enc = encode_examples(examples, tok, SEQ, SYSTEM)
    return enc["input_ids"], enc["labels"]


def _train(model, params, examples, tok, steps: int, lr: float, seed: int) -> None:
    """Steps of LM loss on the whole conversation (system turn, question, answer): a model that
    learned a domain this way also writes its questions, which is what chat inputs draw on."""
    ids, _ = _batch(examples, tok)
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (32,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _loss(model, examples, tok) -> float:
    ids, labels = _batch(examples, tok)
    return float(model(input_ids=ids, labels=labels).loss)


@pytest.fixture(scope="module")
def setup():
    """(cfg, tokenizer, the pre-trained base package, the teacher peft model, two adapters, eval sets)."""
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.models.adapters import adapter_state, attach_lora, load_adapter_state
    from gaisnet_ray.models.build import FoundationPackage, build_foundation

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(TINY_YAML, ["model.max_seq_len=64", f"data.system_prompt={SYSTEM}",
                                  "relay.distill_inputs=chat"])
    model, tok = build_foundation(cfg.model)
    tok.chat_template = TEMPLATE
    _train(model, list(model.parameters()), sample_examples(PUBLIC, "public", 256, 0), tok, 80, 3e-3, 0)
    package = FoundationPackage.from_model(model, tok)
    peft = attach_lora(package.materialize(), cfg.peft, "gpt2")
    fresh = adapter_state(peft)
    adapters = []
    for i, domain in enumerate(PRIVATE):
        load_adapter_state(peft, fresh, strict=True)
        lora = [p for n, p in peft.named_parameters() if "lora_" in n]
        _train(peft, lora, sample_examples(domain, "private", 256, 1), tok, 100, 1e-2, 1 + i)
        adapters.append({k: v.clone() for k, v in adapter_state(peft).items()})
    evals = {d: sample_examples(d, "eval", 48, 0) for d in (PUBLIC, *PRIVATE)}
    return cfg, tok, package, peft, adapters, evals


def _distill(setup, inputs: str, mixture: str = "sequence", seed: int = 5):
    from gaisnet_ray.cloudengine import CloudEngineConfig
    from gaisnet_ray.relay.distill import distill, distill_options

    cfg, tok, package, peft, adapters, _ = setup
    opts = {**distill_options(cfg), "inputs": inputs, "mixture": mixture}
    return distill(package.materialize(), peft, tok, adapters, [1.0, 1.0], engine=CloudEngineConfig(),
                   num_inputs=96, num_heldout=16, seq_len=SEQ, steps=40, batch_size=16, lr=2e-3,
                   temperature=1.0, seed=seed, restore=adapters[0], **opts)


def _domain_losses(setup, state) -> dict[str, float]:
    from gaisnet_ray.models.build import FoundationPackage

    _, tok, package, _, _, evals = setup
    base = FoundationPackage(package.config, state, tok, package.attn_implementation).materialize().eval()
    return {d: _loss(base, exs, tok) for d, exs in evals.items()}


def test_chat_inputs_improve_the_base_on_every_domain_the_teachers_improved_on(setup):
    from gaisnet_ray.models.adapters import load_adapter_state

    cfg, tok, package, peft, adapters, evals = setup
    before = _domain_losses(setup, package.state_dict)
    teachers = {}
    for a in adapters:
        load_adapter_state(peft, a, strict=True)
        for d, exs in evals.items():
            teachers[d] = min(teachers.get(d, float("inf")), _loss(peft, exs, tok))
    learned = [d for d in PRIVATE if teachers[d] < before[d]]
    assert learned == list(PRIVATE), (teachers, before)  # each teacher learned its private domain
    assert all(teachers[d] < before[d] - 0.3 for d in PRIVATE), (teachers, before)

    result = _distill(setup, "chat")
    after = _domain_losses(setup, result.state)
    assert result.kl_after < result.kl_before
    for d in learned:  # the cloud alone improves on every domain a teacher improved on
        assert after[d] < before[d] - 0.1, (d, before, after, teachers)
    # and it closes a real share of the gap to the teachers on each
    assert all((before[d] - after[d]) > 0.25 * (before[d] - teachers[d]) for d in learned), (before, after, teachers)
    # the inputs are conversations: system turn, the teacher's question, the assistant's answer
    assert all(s.startswith(f"<bos>system\n{SYSTEM}<eos>\n<bos>user\n") and "<bos>assistant\n" in s
               for s in result.sample_inputs), result.sample_inputs


def test_bos_inputs_stop_at_the_first_turn_and_reach_the_domains_less(setup):
    """The old inputs: sampled from BOS, cut at the first EOS, they end with the first turn."""
    _, tok, package, _, _, _ = setup
    before = _domain_losses(setup, package.state_dict)
    bos, chat = _distill(setup, "bos"), _distill(setup, "chat")
    after_bos, after_chat = _domain_losses(setup, bos.state), _domain_losses(setup, chat.state)
    assert not any("assistant" in s for s in bos.sample_inputs), bos.sample_inputs
    gain = {k: sum(before[d] - a[d] for d in PRIVATE) for k, a in (("bos", after_bos), ("chat", after_chat))}
    assert gain["chat"] > gain["bos"] + 0.1, (gain, before, after_bos, after_chat)


def test_inputs_are_data_free_and_deterministic(setup):
    """Same base, adapters, seed and relay/system settings -> the same inputs, whatever the devices
    hold (other domains, samples, partition): nothing of the device data reaches them."""
    from gaisnet_ray.relay.distill import generate_inputs, input_options

    cfg, tok, _, peft, adapters, _ = setup
    other = load_config(TINY_YAML, ["model.max_seq_len=64", f"data.system_prompt={SYSTEM}",
                                    "relay.distill_inputs=chat", "data.domains=[strings]",
                                    "data.samples_per_device=7", "data.partition=iid", "data.seed=9"])
    assert input_options(other) == input_options(cfg)
    a = generate_inputs(peft, tok, adapters, 12, SEQ, 1.0, seed=11, **input_options(cfg))
    b = generate_inputs(peft, tok, adapters, 12, SEQ, 1.0, seed=11, **input_options(other))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = generate_inputs(peft, tok, adapters, 12, SEQ, 1.0, seed=12, **input_options(cfg))
    assert not torch.equal(a[0], c[0])  # the seed does change them
    assert a[0].shape == (12, SEQ) and (a[1].sum(1) > 0).all()
    # a different adapter writes different inputs
    d = generate_inputs(peft, tok, adapters[::-1], 12, SEQ, 1.0, seed=11, **input_options(cfg))
    assert not torch.equal(a[0], d[0])


def test_seed_prompts_and_bos_fraction_shape_the_mix(setup):
    from gaisnet_ray.relay.distill import generate_inputs, input_options

    cfg, tok, _, peft, adapters, _ = setup
    opts = {**input_options(cfg), "seed_prompts": ("What", "cap "), "bos_fraction": 0.25}
    ids, mask = generate_inputs(peft, tok, adapters, 8, SEQ, 1.0, seed=3, **opts)
    texts = [tok.decode(r[m.bool()]) for r, m in zip(ids, mask)]
    head = f"<bos>system\n{SYSTEM}<eos>\n<bos>user\n"
    # per teacher: 1 of 4 from BOS, then the seeds in turn
    for t in (texts[:4], texts[4:]):
        assert not t[0].startswith(head)
        assert t[1].startswith(head + "What") and t[2].startswith(head + "cap ") and t[3].startswith(head + "What")
    with pytest.raises(ValueError, match="distill_seq_len"):
        generate_inputs(peft, tok, adapters, 2, 30, 1.0, seed=3, **input_options(cfg))
    with pytest.raises(ValueError, match="distill_inputs"):
        generate_inputs(peft, tok, adapters, 2, SEQ, 1.0, seed=3, inputs="prompt")
