"""Serving, checked without Ray: the settings are strict and name the key, the version poller
swaps the whole model (a running request keeps the old one), deploy/serve_config.yaml builds the
app, the edge drops split sessions idle past their TTL, and chat messages reach the model through
its chat template. The same run folder as test_serve.py (``servecheck.make_run``), made in-process;
the chat template over HTTP with the real weights: test_real_model.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from gaisnet_ray.config import ServeSettings

from servecheck import PROMPT, make_run, publish_scaled

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder (config.yaml, model/, knowledge/ with global and per-edge versions), no Ray."""
    return make_run(tmp_path_factory.mktemp("serve") / "run")


def test_settings_are_strict_and_name_the_key():
    with pytest.raises(ValueError, match="portt"):
        ServeSettings.model_validate({"portt": 1})
    with pytest.raises(ValueError, match="default_new_tokens"):
        ServeSettings(max_new_tokens=4, default_new_tokens=8)
    need = ServeSettings().required_resources()
    assert need["gaisnet_edge"] == pytest.approx(0.01) and need["CPU"] == pytest.approx(1.35)


def test_poller_swaps_the_whole_model_and_leaves_the_old_one_to_running_requests(run_dir, tmp_path):
    import shutil

    import torch

    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.slots import GenerationRequest, ModelSlot, latest_of, load_served, poll_versions

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run = ServedRun(copy)
    slot = ModelSlot("global", lambda a, v: load_served(run, a, v, max_prompt_tokens=None),
                     lambda a: latest_of(run, a))
    held = slot.current  # what a running request holds
    assert held.version == 1 and slot.refresh() is False

    async def publish_and_poll() -> dict:
        state = {"error": None, "last_poll": None}
        poller = asyncio.create_task(poll_versions(lambda: [slot], 0.05, state))
        await asyncio.sleep(0.2)
        publish_scaled(copy, 1, 2)
        for _ in range(200):
            if slot.current.version == 2:
                break
            await asyncio.sleep(0.05)
        poller.cancel()
        return state

    state = asyncio.run(publish_and_poll())
    assert slot.current.version == 2 and slot.swaps == 1 and state["error"] is None
    assert slot.current is not held and slot.current.model is not held.model
    req = GenerationRequest(PROMPT, 4)
    assert held.generate("cloud", req).version == 1  # the old model still answers, unchanged
    ids = torch.tensor([held.generator.encode_prompt(PROMPT)])
    with torch.no_grad():  # two different models: the swap replaced the model, it did not edit it
        assert not torch.equal(held.model(input_ids=ids).logits, slot.current.model(input_ids=ids).logits)


def test_serve_config_yaml_is_accepted_and_builds_the_app(run_dir):
    from ray.serve.schema import ServeDeploySchema

    from gaisnet_ray.serve.app import app_builder

    raw = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "gaisnet_ray.serve.app:app_builder"
    args = {**app.args, "run_dir": str(run_dir)}
    built = app_builder(args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="run_dirr"):
        app_builder({"run_dirr": str(run_dir)})
    with pytest.raises(ValueError, match="max_new_tokenz"):
        app_builder({"run_dir": str(run_dir), "settings": {"max_new_tokenz": 3}})
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        app_builder({"run_dir": str(run_dir / "nope")})


def test_the_edge_drops_split_sessions_idle_past_the_ttl(monkeypatch):
    """``EdgeTier.on_tick`` (run at every poll): sessions idle longer than serve.split_session_ttl_s
    are dropped with their KV caches; a later step of one is refused, naming the TTL."""
    import threading
    from collections import OrderedDict

    import torch

    from gaisnet_ray.inference import tensor_to_bytes
    from gaisnet_ray.serve import edge as edge_module
    from gaisnet_ray.serve.edge import EdgeTier, SplitSession
    from gaisnet_ray.serve.errors import ServeError

    closed = []

    class Runner:  # what holds a session's KV cache
        def close(self, session_id):
            closed.append(session_id)

    now = [1000.0]
    monkeypatch.setattr(edge_module.time, "monotonic", lambda: now[0])
    tier = object.__new__(EdgeTier.func_or_class)  # the replica's state, without Serve or a model
    tier.settings = ServeSettings(split_session_ttl_s=30, max_split_sessions=4)
    tier._lock, tier._sessions = threading.Lock(), OrderedDict()
    tier.learner = None  # serve.learn_from_escalations off
    for sid, idle_s in (("old", 31.0), ("recent", 29.0)):
        tier._sessions[sid] = SplitSession(served=None, runner=Runner(), past_len=3, last_used=now[0] - idle_s)

    tier.on_tick()
    assert list(tier._sessions) == ["recent"] and closed == ["old"]
    with pytest.raises(ServeError) as e:
        tier._split_step(None, "old", 3, None, tensor_to_bytes(torch.zeros(1, 1, 64)), "token")
    assert (e.value.status, e.value.code) == (409, "unknown_session")
    assert "idle past 30 s" in str(e.value)
    now[0] += 2.0
    tier.on_tick()
    assert list(tier._sessions) == [] and closed == ["old", "recent"]


def test_chat_messages_go_through_the_models_chat_template():
    """POST /v1/chat/completions' prompt (``ChatBody.prompt_text``): a tokenizer with a chat template
    renders the messages with it, the run's system prompt added unless the client sent its own; one
    without a template (the tiny models) gets the texts joined; nothing to say is a 422."""
    from gaisnet_ray.config import ModelConfig
    from gaisnet_ray.models.build import build_foundation
    from gaisnet_ray.serve.api import ChatBody
    from gaisnet_ray.serve.errors import ServeError

    _, tok = build_foundation(ModelConfig(family="gpt2"))

    def body(*messages):
        return ChatBody.model_validate({"model": "gaisnet",
                                        "messages": [{"role": r, "content": c} for r, c in messages]})

    chat = body(("user", "12+3="))
    assert chat.prompt_text(tok, system="Answer briefly.") == "12+3="  # no template: the bare prompt
    assert body(("user", "a"), ("assistant", ""), ("user", "b")).prompt_text(tok) == "a\nb"
    with pytest.raises(ServeError) as e:
        body(("user", "")).prompt_text(tok)
    assert (e.value.status, e.value.code) == (422, "invalid_field")

    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat.prompt_text(tok, system="Answer briefly.") == "<system>Answer briefly.\n<user>12+3=\n<assistant>"
    assert chat.prompt_text(tok) == "<user>12+3=\n<assistant>"
    own = body(("developer", "Be terse."), ("user", "12+3="))
    assert own.prompt_text(tok, system="Answer briefly.") == "<developer>Be terse.\n<user>12+3=\n<assistant>"
