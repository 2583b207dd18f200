"""Split inference from a device outside the Ray cluster (httpx; no Ray needed on the device).

The device runs the front segment (embeddings + the first blocks) locally with its own KV cache
and posts only hidden states to ``POST /v1/split/forward`` as safetensors bytes; the edge runs the
rest with a KV cache per session and answers with the last position's logits (safetensors bytes).
The prompt, the token ids, the sampling and the text stay on the device::

    client = SplitClient.from_run_dir("http://127.0.0.1:8000", "runs/X")
    text = client.generate("23+58=", max_new_tokens=8)
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import httpx

from ..inference.codec import tensor_from_bytes, tensor_to_bytes
from ..inference.generate import Generation, prompt_ids
from ..inference.split import FrontRunner, split_stream


class SplitServerError(RuntimeError):
    """The edge refused a split step; ``status`` and ``code`` come from its JSON error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    def __reduce__(self):
        return (type(self), (self.status, self.code, self.message))


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        code, message = err.get("code") or "error", err.get("message") or r.text
    except (ValueError, KeyError, TypeError):
        code, message = "error", r.text[:500]
    raise SplitServerError(r.status_code, code, message)


class SplitClient:
    """Generate with the front segment here and the rest on the edge behind ``base_url``.

    ``front_runner`` runs the front of the knowledge version ``version`` of ``adapter``; the edge
    serves each session with that same version. ``tokenizer`` is the model's (the device's) tokenizer;
    when omitted, the client asks for ``front_runner.tokenizer``.
    """

    def __init__(self, base_url: str, front_runner: FrontRunner, tokenizer=None, *, adapter: str = "global",
                 version: int | None = None, timeout_s: float = 60.0, http: httpx.Client | None = None,
                 system: str | None = None):
        """``system``: the run's ``data.system_prompt`` (chat prompts are formatted as in training)."""
        self.base_url = base_url.rstrip("/")
        self.system = system
        self.front = front_runner
        self.tokenizer = tokenizer if tokenizer is not None else getattr(front_runner, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("SplitClient needs the model's tokenizer (pass tokenizer=...)")
        self.adapter, self.version = adapter, version
        self.http = http or httpx.Client(timeout=timeout_s)
        self.info = self.split_info()
        if self.info["front_layers"] != front_runner.front_end:
            raise ValueError(f"the edge expects a front of {self.info['front_layers']} blocks; this device's front "
                             f"runs {front_runner.front_end}")
        if self.version is None:
            self.version = self.info["version"]

    @classmethod
    def from_run_dir(cls, base_url: str, run_dir: str | Path, *, adapter: str = "global", version: int | None = None,
                     timeout_s: float = 60.0) -> "SplitClient":
        """A device that holds only the front: loads ``adapter`` at ``version`` (default: the version the
        edge serves now) from a run folder and drops the blocks, norm and head it does not run."""
        from ..inference.served import ServedRun
        from ..models.split import SplitModel

        http = httpx.Client(timeout=timeout_s)
        r = http.get(f"{base_url.rstrip('/')}/v1/split/info", params={"adapter": adapter})
        _raise_for(r)
        info = r.json()
        run = ServedRun(run_dir)
        model, version = run.load_model(adapter, version if version is not None else info["version"])
        split = SplitModel(model)
        k = info["front_layers"]
        split.prune(set(range(k)), keep_embeddings=True, keep_head=False)
        return cls(base_url, FrontRunner(split, k), run.tokenizer, adapter=adapter, version=version, http=http,
                   system=run.system_prompt)

    def split_info(self) -> dict:
        r = self.http.get(f"{self.base_url}/v1/split/info", params={"adapter": self.adapter})
        _raise_for(r)
        return r.json()

    def stream(self, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, chat: bool = True) -> Iterator[str | Generation]:
        """Text deltas, then the ``Generation`` (same contract as ``CausalGenerator.stream``);
        ``chat``: the prompt is a user turn, formatted by the run's chat template as in training."""
        session, past = uuid.uuid4().hex, 0

        def rest(hidden):  # (1, T, H) -> logits (V,)
            nonlocal past
            headers = {"x-gaisnet-session": session, "x-gaisnet-past-len": str(past),
                       "x-gaisnet-adapter": self.adapter, "content-type": "application/octet-stream"}
            if self.version is not None:
                headers["x-gaisnet-version"] = str(self.version)
            r = self.http.post(f"{self.base_url}/v1/split/forward", params={"out": "logits"},
                               content=tensor_to_bytes(hidden), headers=headers)
            _raise_for(r)
            past = int(r.headers["x-gaisnet-past-len"])
            return tensor_from_bytes(r.content)

        ids = prompt_ids(prompt, self.tokenizer, chat, self.system)
        max_new_tokens = max(0, min(max_new_tokens, self.info["max_context"] - len(ids)))
        try:
            yield from split_stream(self.front, rest, self.tokenizer, ids, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        finally:
            if past:
                self.http.delete(f"{self.base_url}/v1/split/sessions/{session}")

    def generate_full(self, prompt: str, **kwargs) -> Generation:
        *_, result = self.stream(prompt, **kwargs)
        return result

    def generate(self, prompt: str, max_new_tokens: int = 32, **kwargs) -> str:
        return self.generate_full(prompt, max_new_tokens=max_new_tokens, **kwargs).text

    def close(self) -> None:
        self.http.close()
