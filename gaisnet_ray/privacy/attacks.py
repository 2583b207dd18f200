"""Attacks a curious party can run on what it legitimately receives in GaisNet, with their rates.

- ``search_inversion``: an edge that knows (or approximates) the device's front segment inverts the
  hidden states it received, position by position: for position t it runs the front on the
  recovered prefix followed by each candidate token and keeps the candidate whose output at t is
  nearest the received row. Candidates are tried nearest-first (by a ranker: cosine to the token
  embeddings, or a learned decoder), in growing chunks, and the search stops at an exact match.
- ``train_decoder`` / ``decode``: learned inversion, for an edge that does not know the device's
  front adapter: a decoder from one hidden-state row to its token, fitted on public text run
  through the public front (optionally with the same clip and noise the devices apply). It is
  also the search's candidate order on a real model, where the cosine to the embeddings is not.
- ``sent_gradients`` / ``fit_label_decoder`` / ``label_recovery``: labels from gradients. The
  device sends its edge dL/dh at the middle's output every step; at position t that gradient is
  dominated by the loss of predicting token t+1, so it points along that token's (transformed)
  embedding. A decoder fitted on public examples' gradients (the attacker runs the public model as a
  device would, with the run's clip, noise and denoising) reads the label back from each row.
- ``membership_scores`` / ``auc``: what the relayed knowledge reveals: the likelihood gap (loss
  under the public base minus loss under base + knowledge) of a device's training examples vs
  held-out examples of the same domains.

Everything is plain torch over callables, so the attacks run on a tiny preset in a test and on
the real model in ``gaisnet privacy-audit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encode import lengths_of

Front = Callable[[torch.Tensor], torch.Tensor]  # (B, T) token ids -> (B, T, H) hidden states
Ranker = Callable[[torch.Tensor], torch.Tensor]  # (N, H) hidden rows -> (N, V) candidate scores
NextRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # prefix (a, t), cand (a, k) -> (a, k, H)


def cached_next_rows(split, front_end: int) -> NextRows:
    """``next_rows`` over a ``models.split.SplitModel``: the prefixes run once into a KV cache,
    which is repeated per candidate, and each candidate is one more token (as in generation)."""
    from transformers import DynamicCache

    @torch.no_grad()
    def rows(prefix: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        a, k = cand.shape
        if prefix.shape[1] == 0:
            return split.front(cand.reshape(-1, 1), front_end).view(a, k, -1)
        cache = DynamicCache(config=split.lm.config)
        split.front(prefix, front_end, cache=cache, past_len=0)
        cache.batch_repeat_interleave(k)  # (a, ...) -> (a*k, ...), each prefix k times in a row
        return split.front(cand.reshape(-1, 1), front_end, cache=cache, past_len=prefix.shape[1]).view(a, k, -1)

    return rows


@dataclass
class Recovery:
    """How much of the private sequences an attack got back (fractions in [0, 1])."""

    tokens: float  # real (non-padding) tokens recovered exactly
    content: float  # the same past the prefix every sequence shares (chat template, system turn)
    examples: float  # whole sequences recovered exactly
    answers: float  # examples whose every answer token was recovered
    num_tokens: int
    num_examples: int

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "content": self.content, "examples": self.examples, "answers": self.answers,
                "num_tokens": self.num_tokens, "num_examples": self.num_examples}


def recovery(recovered: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> Recovery:
    """Score ``recovered`` (N, T) against the true ``input_ids`` (N, T) over the real tokens; the
    answer (+ eos) is where ``labels`` are supervised (labels are aligned with the ids; the model
    shifts them inside its loss)."""
    n, t = input_ids.shape
    real = torch.arange(t).expand(n, t) < lengths_of(labels)[:, None]  # (N, T)
    hit = (recovered == input_ids) & real
    answer = (labels != -100) & real
    same = (input_ids == input_ids[:1]).all(dim=0).long()  # (T,) positions where every sequence agrees
    shared = int(same.cumprod(dim=0).sum())  # length of the common prefix (public: the template)
    content = real.clone()
    content[:, :shared] = False
    return Recovery(
        tokens=float(hit.sum()) / max(int(real.sum()), 1),
        content=float((hit & content).sum()) / max(int(content.sum()), 1),
        examples=float(((hit | ~real).all(dim=1)).float().mean()),
        answers=float(((hit | ~answer).all(dim=1)).float().mean()),
        num_tokens=int(real.sum()), num_examples=n,
    )


# ------------------------------------------------------------------------------- exact search
def cosine_ranker(embedding: torch.Tensor) -> Ranker:
    """Candidates nearest the received row first, by cosine to the (V, H) token embeddings: at a
    shallow cut the residual stream still carries the input token's embedding."""
    e = F.normalize(embedding.detach().float(), dim=-1)  # (V, H)
    return lambda rows: F.normalize(rows.float(), dim=-1) @ e.T  # (N, V)


@torch.no_grad()
def search_inversion(front: Front, hidden: torch.Tensor, ranker: Ranker, *, first_chunk: int = 8,
                     max_candidates: int = 256, tol: float = 1e-3, margin: float = 0.0, max_rows: int = 2048,
                     lengths: torch.Tensor | None = None, next_rows: NextRows | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert received hidden states ``hidden`` (N, T, H) into token ids (N, T).

    For each position, candidates are tried in ``ranker`` order in chunks (``first_chunk``,
    doubling) until one reproduces the row within relative L2 error ``tol``, or is nearer than
    ``margin`` times every other candidate tried (an attacker with approximate weights: the right
    token is near, the rest far), or ``max_candidates`` were tried; the nearest candidate wins. ``lengths`` (N,): positions past an example's length
    are not searched (padding). ``next_rows``: the front's rows for prefixes followed by candidates
    (``cached_next_rows``: the prefix runs once, each candidate costs one token); by default each
    candidate runs with its whole prefix through ``front``. Returns (token ids, relative error of
    the chosen candidate) (N, T).
    """
    n, t_len, _ = hidden.shape
    out = torch.zeros(n, t_len, dtype=torch.long)
    err = torch.full((n, t_len), float("inf"))
    hidden = hidden.float()
    for t in range(t_len):
        rows = hidden[:, t]  # (N, H)
        todo = torch.arange(n) if lengths is None else torch.nonzero(lengths > t).flatten()
        if todo.numel() == 0:
            break
        scores = ranker(rows[todo])  # (n, V)
        order = scores.topk(min(max_candidates, scores.shape[1]), dim=1).indices  # (n, K) nearest first
        ref = rows[todo].norm(dim=-1).clamp(min=1e-12)  # (n,)
        best = torch.full((todo.numel(),), float("inf"))
        runner_up = torch.full((todo.numel(),), float("inf"))  # nearest candidate other than the best
        best_tok = order[:, 0].clone()
        start, size = 0, first_chunk
        active = torch.ones(todo.numel(), dtype=torch.bool)
        while start < order.shape[1] and active.any():
            ai = torch.nonzero(active).flatten()
            cand = order[ai, start:start + size]  # (a, k)
            a, k = cand.shape
            if next_rows is not None:
                step = max(1, max_rows // k)
                got = torch.cat([next_rows(out[todo[ai[i:i + step]], :t], cand[i:i + step]).reshape(-1, rows.shape[1])
                                 for i in range(0, a, step)]).float()
            else:
                prefix = out[todo[ai], :t].repeat_interleave(k, dim=0)  # (a*k, t)
                ids = torch.cat([prefix, cand.reshape(-1, 1)], dim=1)  # (a*k, t+1)
                chunk_rows = max(1, max_rows // (t + 1))
                got = torch.cat([front(ids[i:i + chunk_rows])[:, t].float()
                                 for i in range(0, ids.shape[0], chunk_rows)])
            d = (got.view(a, k, -1) - rows[todo[ai]][:, None]).norm(dim=-1) / ref[ai][:, None]  # (a, k)
            two = d.topk(min(2, k), dim=1, largest=False).values  # (a, <=2)
            dmin, arg = d.min(dim=1)
            better = dmin < best[ai]
            second = two[:, 1] if k > 1 else torch.full_like(dmin, float("inf"))
            runner_up[ai] = torch.minimum(torch.where(better, best[ai], runner_up[ai]),
                                          torch.where(better, second, dmin))
            best[ai] = torch.where(better, dmin, best[ai])
            best_tok[ai] = torch.where(better, cand[torch.arange(a), arg], best_tok[ai])
            active[ai] = (best[ai] > tol) & (best[ai] > margin * runner_up[ai])
            start, size = start + size, size * 2
        out[todo, t] = best_tok
        err[todo, t] = best
    return out, err


# ---------------------------------------------------------------------------- learned decoder
class HiddenDecoder(nn.Module):
    """One hidden-state row -> scores over the vocabulary: the row, layer-normed, mapped linearly
    into the (frozen) token-embedding space and compared by cosine with every token's embedding."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        v, h = embedding.shape
        self.register_buffer("embedding", F.normalize(embedding.detach().float(), dim=-1).clone())  # (V, H)
        self.proj = nn.Linear(h, h, bias=False)
        self.bias = nn.Parameter(torch.zeros(v))
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, V)
        z = F.normalize(self.proj(F.layer_norm(rows.float(), rows.shape[-1:])), dim=-1)
        return self.scale * (z @ self.embedding.T) + self.bias


def train_decoder(front: Front, public_ids: torch.Tensor, public_lengths: torch.Tensor, embedding: torch.Tensor,
                  *, ridge: float = 1.0, steps: int = 0, lr: float = 1e-3, batch_rows: int = 128, seed: int = 0,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> HiddenDecoder:
    """Learned inversion: fit a ``HiddenDecoder`` on public sequences ``public_ids`` (N, T) run
    through the attacker's ``front``. The map is the ridge regression (penalty ``ridge``) from the
    layer-normed rows to the unit embeddings of their tokens, in closed form; ``steps`` > 0 then
    refines it by cross-entropy over the whole vocabulary. ``transform`` (e.g. the devices' clip +
    noise) is applied to the hidden states first, so the decoder learns to read what the link carries."""
    with torch.no_grad():
        hidden = torch.cat([front(public_ids[i:i + 64]) for i in range(0, public_ids.shape[0], 64)]).float()
        real = torch.arange(public_ids.shape[1]).expand_as(public_ids) < public_lengths[:, None]
        rows, toks = hidden[real], public_ids[real]  # (M, H), (M,)
        if transform is not None:
            rows = transform(rows)
    return fit_decoder(rows, toks, embedding, ridge=ridge, steps=steps, lr=lr, batch_rows=batch_rows, seed=seed)


def fit_decoder(rows: torch.Tensor, toks: torch.Tensor, embedding: torch.Tensor, *, ridge: float = 1.0,
                steps: int = 0, lr: float = 1e-3, batch_rows: int = 128, seed: int = 0) -> HiddenDecoder:
    """A ``HiddenDecoder`` from rows (M, H) to their tokens (M,): the closed-form ridge regression
    to the tokens' unit embeddings, then ``steps`` of cross-entropy refinement."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = rows.float()
        dec = HiddenDecoder(embedding)
        x = F.layer_norm(rows, rows.shape[-1:])
        y = dec.embedding[toks]
        w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ y)  # (H, H)
        dec.proj.weight.copy_(w.T)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, rows.shape[0], (min(batch_rows, rows.shape[0]),), generator=gen)
        loss = F.cross_entropy(dec(rows[idx]), toks[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval()


@torch.no_grad()
def decode(decoder: HiddenDecoder, hidden: torch.Tensor) -> torch.Tensor:
    """(N, T, H) received hidden states -> (N, T) the decoder's token for each row."""
    n, t, h = hidden.shape
    return decoder(hidden.reshape(-1, h)).argmax(dim=-1).view(n, t)


def decoder_ranker(decoder: HiddenDecoder) -> Ranker:
    """Search candidates in the learned decoder's order (a sharper prior than cosine)."""
    return lambda rows: decoder(rows)


# ------------------------------------------------------------------------- labels from gradients
def sent_gradients(split, input_ids: torch.Tensor, labels: torch.Tensor, front_end: int, back_start: int,
                   link: Callable[[torch.Tensor], torch.Tensor] | None = None, denoise: bool = False,
                   batch: int = 8) -> torch.Tensor:
    """(N, T, H): dL/dh_m, the gradient a device sends its edge at the middle's output in one split
    step, as ``hfsl.device`` computes it: front -> ``link`` (the run's clip + noise) -> middle ->
    (denoised: minus what the link added) -> back and loss, over batches of ``batch`` examples.
    ``split``: a ``models.split.SplitModel`` holding every block (the model the device and edge run)."""
    out = []
    for i in range(0, input_ids.shape[0], batch):
        ids, lab = input_ids[i:i + batch], labels[i:i + batch]
        with torch.no_grad():
            h_k = split.front(ids, front_end)
            h_link = h_k if link is None else link(h_k)
            h_m = split.blocks(h_link, front_end, back_start)
        h_m = h_m.detach().requires_grad_()
        back_in = h_m - (h_link - h_k) if denoise else h_m
        (g,) = torch.autograd.grad(split.back_loss(back_in, back_start, lab), h_m)
        out.append(g.detach())
    return torch.cat(out)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N, T) labels -> (N, T) the token each position's logits predict (labels[t + 1], -100 where
    nothing is supervised): the shift ``SplitModel.back_loss`` makes (models may not import this
    layer's helpers, so the one line lives in both)."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def supervised_rows(grads: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient rows at the positions whose next token is supervised, and that token:
    (M, H), (M,). Position t's loss predicts labels[t + 1] (the model shifts labels inside)."""
    targets = next_token_targets(labels)
    keep = targets != -100
    return grads[keep].float(), targets[keep]


def fit_label_decoder(grads: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor,
                      ridge: float = 1.0) -> HiddenDecoder:
    """Learned label inversion: a decoder from a gradient row to the token its position predicts,
    fitted on gradients the attacker computed itself (public examples, public model)."""
    rows, toks = supervised_rows(grads, labels)
    return fit_decoder(rows, toks, embedding, ridge=ridge)


@torch.no_grad()
def label_recovery(decoder: HiddenDecoder, grads: torch.Tensor, labels: torch.Tensor) -> dict:
    """Decode every supervised position's label from the received gradients: the share of label
    tokens (the answers and their end-of-sequence token) recovered, and of examples whose every
    label was."""
    targets = next_token_targets(labels)
    keep = targets != -100
    guess = torch.full_like(targets, -1)
    guess[keep] = decoder(grads[keep].float()).argmax(dim=-1)
    hit = (guess == targets) & keep
    return {"labels": float(hit.sum()) / max(int(keep.sum()), 1),
            "answers": float((hit | ~keep).all(dim=1).float().mean()),
            "num_labels": int(keep.sum()), "num_examples": int(labels.shape[0])}


# --------------------------------------------------------------------------------- membership
@torch.no_grad()
def example_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                   labels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(N,) mean answer loss of each example under ``logits_fn`` ((B, T) ids -> (B, T, V) logits)."""
    out = []
    for i in range(0, input_ids.shape[0], batch):
        ids, lab = input_ids[i:i + batch], labels[i:i + batch]
        logits = logits_fn(ids)[:, :-1].float()  # predicts t+1
        tgt = lab[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                              reduction="none").view(tgt.shape)
        out.append(nll.sum(dim=1) / (tgt != -100).sum(dim=1).clamp(min=1))
    return torch.cat(out)


def auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """Probability that a random member scores higher than a random non-member (ties count 1/2)."""
    if members.numel() == 0 or nonmembers.numel() == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    diff = members.double()[:, None] - nonmembers.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def membership_scores(base_losses: torch.Tensor, tuned_losses: torch.Tensor) -> torch.Tensor:
    """The likelihood gap: how much the knowledge lowered each example's loss (higher: more
    likely a training example)."""
    return base_losses - tuned_losses
