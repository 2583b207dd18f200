"""Inference core without Ray: cached generation, split inference, routing, payloads, run folders."""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import ModelConfig, PeftConfig, load_config
from gaisnet_ray.inference import (
    CausalGenerator,
    FrontRunner,
    Generation,
    PromptTooLongError,
    RestRunner,
    RoutingPolicy,
    infer_domain,
    route_after_edge,
    route_hint,
    split_stream,
    tensor_from_bytes,
    tensor_to_bytes,
)
from gaisnet_ray.models.adapters import attach_lora, trainable_parameters
from gaisnet_ray.models.build import build_foundation
from gaisnet_ray.models.split import SplitModel

from tinycfg import TINY_YAML


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lora_model(request):
    torch.manual_seed(0)
    model, tok = build_foundation(ModelConfig(family=request.param))
    peft_model = attach_lora(model, PeftConfig(), request.param)
    for p in trainable_parameters(peft_model):
        torch.nn.init.normal_(p, std=0.3)
    return peft_model.eval(), tok


def _greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()


def test_cached_generation_equals_full_recompute_and_stream_adds_up(lora_model):
    model, tok = lora_model
    gen = CausalGenerator(model, tok, max_prompt_tokens=32, max_context=64)
    ids = gen.encode_prompt("12+7=")
    expected = _greedy_no_cache(model, ids, 12)
    if tok.eos_token_id in expected:
        expected = expected[: expected.index(tok.eos_token_id)]
    parts = list(gen.stream("12+7=", max_new_tokens=12))
    result = parts[-1]
    assert isinstance(result, Generation)
    assert result.token_ids == expected
    assert "".join(parts[:-1]) == result.text == tok.decode(expected, skip_special_tokens=True)
    assert result.prompt_tokens == len(ids) and result.completion_tokens == len(expected)
    assert 0 < result.min_token_prob <= 1 and result.mean_entropy > 0


def test_sampling_is_seeded_and_limits_hold(lora_model):
    model, tok = lora_model
    gen = CausalGenerator(model, tok, max_prompt_tokens=8, max_context=12)
    a = gen.generate("ab", max_new_tokens=6, temperature=1.0, seed=3)
    b = gen.generate("ab", max_new_tokens=6, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    # max_context=12 bounds prompt (3 tokens) + completion
    assert gen.generate("ab", max_new_tokens=50).completion_tokens <= 12 - 3
    with pytest.raises(PromptTooLongError, match="prompt has 11 tokens; the limit is 8"):
        gen.generate("0123456789")


def test_stop_string_cuts_the_text(lora_model):
    model, tok = lora_model
    gen = CausalGenerator(model, tok, max_prompt_tokens=32, max_context=64)
    full = gen.generate("12+7=", max_new_tokens=12)
    if len(full.text) < 3:
        pytest.skip("this seed's continuation is too short to cut")
    stop = full.text[2]
    cut = gen.generate("12+7=", max_new_tokens=12, stop=[stop])
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_split_inference_over_runners_gives_the_unsplit_greedy_tokens(lora_model):
    model, tok = lora_model
    split = SplitModel(model)
    front, rest = FrontRunner(split, 1), RestRunner(split, 1)
    parts = list(split_stream(front, lambda h: rest.forward("s1", h), tok, "12+7=", max_new_tokens=12))
    whole = CausalGenerator(model, tok, 32, 64).generate("12+7=", max_new_tokens=12)
    assert parts[-1].token_ids == whole.token_ids and parts[-1].text == whole.text
    assert len(rest) == 1
    with pytest.raises(ValueError, match="client says 0 tokens are cached"):
        rest.forward("s1", front.start([1, 20]), past_len=0)
    with pytest.raises(ValueError, match="hidden state must be"):
        rest.forward("s2", torch.zeros(1, 3, 7))
    rest.close("s1")
    assert len(rest) == 0


def test_rest_runner_keeps_at_most_max_sessions(lora_model):
    model, tok = lora_model
    split = SplitModel(model)
    front, rest = FrontRunner(split, 1), RestRunner(split, 1, max_sessions=2)
    for s in ("a", "b", "c"):
        rest.forward(s, front.start([1, 20, 21]))
    assert len(rest) == 2


def _gen(entropy: float, min_prob: float) -> Generation:
    return Generation("x", [1], "stop", 3, 1, entropy, min_prob)


def test_routing_policy_decisions_and_reasons():
    policy = RoutingPolicy(max_mean_entropy=2.0, min_token_prob=0.1)
    keep = route_after_edge(_gen(1.5, 0.5), policy)
    assert (keep.tier, keep.escalated) == ("edge", False)
    hot = route_after_edge(_gen(2.5, 0.5), policy)
    assert (hot.tier, hot.escalated) == ("cloud", True) and "entropy 2.500 > 2.0" in hot.reason
    unsure = route_after_edge(_gen(1.0, 0.05), policy)
    assert unsure.tier == "cloud" and "lowest token probability 0.050 < 0.1" in unsure.reason
    assert route_hint(None) is None
    assert route_hint("cloud").tier == "cloud" and "hint" in route_hint("cloud").reason
    with pytest.raises(ValueError, match="unknown tier hint 'moon'"):
        route_hint("moon")


def test_infer_domain_from_prompt_shape():
    domains = ["arithmetic", "strings", "units", "facts"]
    assert infer_domain("23+58=", domains) == "arithmetic"
    assert infer_domain("rev abc=", domains) == "strings"
    assert infer_domain("3 km in m=", domains) == "units"
    assert infer_domain("cap France=", domains) == "facts"
    assert infer_domain("hello there", domains) is None
    assert infer_domain("23+58=", ["facts"]) is None


def test_tensor_payload_round_trip_and_malformed():
    t = torch.randn(1, 5, 8)
    assert torch.equal(tensor_from_bytes(tensor_to_bytes(t)), t)
    with pytest.raises(ValueError, match="not a safetensors buffer"):
        tensor_from_bytes(b"{not a tensor}")


def test_served_run_exposes_versions_edges_and_loads_the_knowledge(tmp_path):
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.inference.served import ServedRun, UnknownAdapterError

    torch.set_num_threads(1)
    cfg = load_config(TINY_YAML, [
        "topology.edges=2", "topology.devices_per_edge=1", "data.samples_per_device=16",
        "data.eval_samples_per_domain=4", "data.public_samples=16", "training.pretrain_steps=2",
        "training.local_steps=1", "training.batch_size=4",
    ])
    runtime = InProcessGaisNet(cfg, tmp_path)
    runtime.run_round(1)
    served = ServedRun(tmp_path)
    assert served.latest_version() == 1
    assert served.adapter_names() == ["global", "edge-0", "edge-1"]
    routes = served.domain_adapters()
    assert set(routes) == set(cfg.data.domains) and set(routes.values()) <= {"edge-0", "edge-1"}
    model, version = served.load_model()
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, runtime.cloud.peft(input_ids=ids).logits)
    edge_model, _ = served.load_model("edge-1")
    with torch.no_grad():
        assert not torch.equal(edge_model(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'edge-9'"):
        served.load_model("edge-9")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        ServedRun(tmp_path / "nothing")


def test_infer_domain_recognises_every_built_in_domain_in_all_its_phrasings():
    from gaisnet_ray.data.domains import BUILTIN_DOMAINS, RECORD_DOMAINS, sample_examples
    from gaisnet_ray.data.records import record_facts

    domains = list(BUILTIN_DOMAINS)
    for d in domains:
        if d in RECORD_DOMAINS:
            prompts = [p for f in record_facts(d) for p in f.prompts]
        else:
            prompts = [e.prompt for split in ("private", "eval") for e in sample_examples(d, split, 40, 0)]
        wrong = [(p, infer_domain(p, domains)) for p in prompts if infer_domain(p, domains) != d]
        assert not wrong, f"{d}: {wrong[:3]}"
    assert infer_domain("Tell me a joke", domains) is None
