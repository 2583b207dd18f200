"""Data-free distillation of the edges' knowledge into the cloud's foundation model.

No device data is involved at any step:

1. Inputs: each teacher (the current base with one edge's relayed adapter) writes its own sequences
   (``generate_inputs``); the cloud produces its own training inputs. ``relay.distill_inputs``:
   ``chat`` starts from the chat template's prefix (the run's public ``data.system_prompt`` and an
   open user turn, optionally opened by the public ``relay.distill_seed_prompts``): the teacher
   writes a user question, the template's assistant header follows, and the teacher answers it,
   so an adapter that learned the devices' domains asks and answers about them; ``bos`` samples
   from the BOS token alone (on a chat model that rarely leaves the first turn, hence rarely
   reaches the domains). The sampling is seeded, so the inputs are a function of the base, the
   adapters, the seed and the config alone (``input_options``): data-free, whatever the devices hold;
   the targets below are the teachers' own outputs on those inputs.
2. Targets: the teachers' next-token distributions on those inputs, mixed with the edges' sample
   counts as weights (the cloud's FedAvg weights), ``relay.distill_targets``: ``token``, log p =
   logsumexp_e(log w_e + log p_e) at every position; ``sequence``, the same with each weight times
   the teacher's likelihood of the input so far (the mixture of the teachers as sequence models).
3. Student: the base model itself (every parameter), trained in the cloud engine (torch or a
   DeepSpeed engine with the configured ZeRO stage) on KL(p_teacher || q_student), averaged over
   the input's tokens (``bos``: up to and including its first EOS; ``chat``: the whole
   conversation, up to and including the answer's EOS).

The KL is measured on separately generated held-out inputs before and after, which is the effect
the run folder records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cloudengine import CloudEngineConfig, CloudTrainer
from ..cloudengine.world import WorldSpec
from ..models.adapters import load_adapter_state

StateDict = dict[str, torch.Tensor]


@dataclass
class DistillResult:
    state: StateDict  # the distilled base's full weights (foundation state-dict names)
    kl_before: float  # held-out KL(teachers || base) before distillation
    kl_after: float  # ... and after
    train_kl: list[float] = field(default_factory=list)  # per optimizer step
    num_inputs: int = 0
    num_heldout: int = 0
    seq_len: int = 0
    seed: int = 0
    sample_inputs: list[str] = field(default_factory=list)  # a few decoded inputs, for the run folder

    def summary(self) -> dict:
        return {"kl_before": self.kl_before, "kl_after": self.kl_after, "train_kl_first": self.train_kl[:1],
                "train_kl_last": self.train_kl[-1:], "num_inputs": self.num_inputs,
                "num_heldout": self.num_heldout, "seq_len": self.seq_len, "seed": self.seed,
                "sample_inputs": self.sample_inputs}


INPUT_MODES = ("bos", "chat")
_SLOT = "\x00GAISNET-USER-TURN\x00"  # placeholder the user turn's text is cut at


def input_options(cfg) -> dict:
    """What the distillation inputs depend on in a run's config (``RelayConfig`` and the public
    ``data.system_prompt``): keyword arguments of ``distill``/``prepare``/``generate_inputs``. Nothing
    else of the config (no device data, partition or domain list) reaches the inputs."""
    r = cfg.relay
    return {"inputs": r.distill_inputs, "system": cfg.data.system_prompt,
            "seed_prompts": tuple(r.distill_seed_prompts), "bos_fraction": float(r.distill_bos_fraction)}


def distill_options(cfg) -> dict:
    """``input_options(cfg)`` and the targets' mixture (``relay.distill_targets``): the keyword
    arguments the cloud passes to ``distill``."""
    return {**input_options(cfg), "mixture": cfg.relay.distill_targets}


def chat_frame(tokenizer, system: str | None) -> tuple[list[int], list[int]] | None:
    """The chat template cut open at the user turn: (tokens before the user's text: the system turn
    and the user turn's opening; tokens after it: the end of the user turn and the assistant
    header). None without a chat template."""
    from ..data.encode import chat_messages, has_chat_template

    if not has_chat_template(tokenizer):
        return None
    text = tokenizer.apply_chat_template(chat_messages(_SLOT, system), add_generation_prompt=True, tokenize=False)
    if text.count(_SLOT) != 1:
        raise ValueError("the chat template does not render the user turn's text once: use relay.distill_inputs=bos")
    head, tail = text.split(_SLOT)
    return (list(tokenizer.encode(head, add_special_tokens=False)),
            list(tokenizer.encode(tail, add_special_tokens=False)))


def _continue(teacher, tokenizer, prompts: list[list[int]], budgets: list[int], temperature: float,
              batch_size: int = 64, spread: int = 2) -> list[list[int]]:
    """Each prompt's sampled continuation (at most its budget of tokens, cut after the first EOS),
    in left-padded batches of prompts within ``spread`` tokens of each other's length (so a batch's
    longest row stays within its budget while the others lose at most ``spread`` of theirs: no
    position past the model's window); the order of ``prompts`` is kept."""
    device = next(teacher.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and len(prompts[i]) - len(prompts[batches[-1][0]]) <= spread:
            batches[-1].append(i)
        else:
            batches.append([i])
    for idx in batches:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - len(prompts[i]):] = 1
        gen = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                               temperature=temperature, top_k=0, top_p=1.0,
                               max_new_tokens=min(budgets[i] for i in idx), min_new_tokens=1, pad_token_id=pad,
                               eos_token_id=tokenizer.eos_token_id)[:, width:].cpu().tolist()
        for row, i in enumerate(idx):
            toks = gen[row][:budgets[i]]
            if tokenizer.eos_token_id in toks:
                toks = toks[:toks.index(tokenizer.eos_token_id) + 1]
            out[i] = toks
    return out


def _chat_rows(teacher, tokenizer, k: int, seq_len: int, temperature: float, system: str | None,
               seed_prompts: tuple[str, ...]) -> list[list[int]]:
    """``k`` conversations the loaded teacher writes itself: [system turn] user: <its question>
    assistant: <its answer> (with a chat template, in two sampling passes), or [bos] <its text>
    without one. Each at most ``seq_len`` tokens, ending at the answer's EOS when it got there."""
    frame = chat_frame(tokenizer, system)
    head, tail = frame if frame is not None else ([tokenizer.bos_token_id], None)
    openings = [list(tokenizer.encode(p, add_special_tokens=False)) for p in seed_prompts] or [[]]
    prompts = [head + openings[j % len(openings)] for j in range(k)]
    if tail is None:  # no template: prompt and answer are one text after BOS, as the devices train on
        budgets = [seq_len - len(p) for p in prompts]
        if min(budgets) < 1:
            raise ValueError(f"relay.distill_seq_len={seq_len} leaves no room after the seed prompt")
        return [p + c for p, c in zip(prompts, _continue(teacher, tokenizer, prompts, budgets, temperature))]
    room = [seq_len - len(p) - len(tail) for p in prompts]
    if min(room) < 3:
        raise ValueError(f"relay.distill_seq_len={seq_len} is too short for the chat prefix "
                         f"({len(head)} + {len(tail)} template tokens): raise it or use relay.distill_inputs=bos")
    questions = _continue(teacher, tokenizer, prompts, [r - max(2, r // 3) for r in room], temperature)
    asks = [p + [t for t in q if t != tokenizer.eos_token_id] + tail for p, q in zip(prompts, questions)]
    answers = _continue(teacher, tokenizer, asks, [seq_len - len(a) for a in asks], temperature)
    return [a + b for a, b in zip(asks, answers)]


@torch.no_grad()
def generate_inputs(teacher, tokenizer, adapters: list[StateDict], n: int, seq_len: int, temperature: float,
                    seed: int, *, inputs: str = "bos", system: str | None = None, seed_prompts: tuple[str, ...] = (),
                    bos_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``seq_len`` tokens the teachers write, split evenly over them
    (``teacher``: the peft model; each adapter is loaded into it in turn). ``inputs``: ``bos``
    (sampled from BOS; the mask ends at each sequence's first EOS) or ``chat`` (see ``_chat_rows``;
    ``bos_fraction`` of each teacher's share from BOS instead; the mask covers the whole
    conversation). Returns (input_ids (n, T), attention_mask (n, T)), right-padded.

    Data-free: the arguments are the whole input (no examples), so the result is a function of the
    base, the adapters, the seed and the config (``input_options``) alone."""
    if inputs not in INPUT_MODES:
        raise ValueError(f"relay.distill_inputs must be one of {INPUT_MODES}, got {inputs!r}")
    teacher.eval()
    device = next(teacher.parameters()).device
    pad = tokenizer.pad_token_id
    per = [n // len(adapters) + (1 if i < n % len(adapters) else 0) for i in range(len(adapters))]
    rows, masks = [], []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for adapter, k in zip(adapters, per):
            if k == 0:
                continue
            load_adapter_state(teacher, adapter, strict=True)
            n_bos = k if inputs == "bos" else int(round(k * bos_fraction))
            if n_bos:
                start = torch.full((n_bos, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
                out = teacher.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True,
                                       temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                       min_new_tokens=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                ids = F.pad(out, (0, seq_len - out.shape[1]), value=pad).cpu()
                is_eos = ids == tokenizer.eos_token_id
                after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # strictly after the first EOS
                rows.append(ids)
                masks.append((~after_eos).long())
            if k - n_bos:
                chats = _chat_rows(teacher, tokenizer, k - n_bos, seq_len, temperature, system, tuple(seed_prompts))
                ids = torch.full((len(chats), seq_len), pad, dtype=torch.long)
                mask = torch.zeros((len(chats), seq_len), dtype=torch.long)
                for i, r in enumerate(chats):
                    ids[i, :len(r)] = torch.tensor(r[:seq_len], dtype=torch.long)
                    mask[i, :len(r)] = 1
                rows.append(ids)
                masks.append(mask)
    return torch.cat(rows), torch.cat(masks)


MIXTURES = ("token", "sequence")


@torch.no_grad()
def teacher_log_probs(teacher, adapters: list[StateDict], weights: list[float], ids: torch.Tensor,
                      mask: torch.Tensor, batch_size: int = 32, mixture: str = "token") -> torch.Tensor:
    """log of the weighted mixture of the teachers' next-token distributions: (n, T, V), float32.

    ``mixture``: ``token`` mixes them with the fixed weights at every position (log p =
    logsumexp_e(log w_e + log p_e)); ``sequence`` is the next-token distribution of the mixture of
    the teachers as models of whole sequences: each teacher's weight at position t is its posterior
    given the sequence so far, w_e p_e(x_1..x_t) (normalized), so on a conversation about one
    edge's domain the target becomes that edge's teacher instead of an average with teachers that
    never learned it. Both in one pass over the teachers."""
    if mixture not in MIXTURES:
        raise ValueError(f"relay.distill_targets must be one of {MIXTURES}, got {mixture!r}")
    teacher.eval()
    device = next(teacher.parameters()).device
    total = float(sum(weights))
    log_w = [math.log(w / total) for w in weights]
    mixed, norm = None, None
    valid = (mask[:, 1:] * mask[:, :-1]).float()  # (n, T-1): position t predicts a real token t+1
    for adapter, lw in zip(adapters, log_w):
        load_adapter_state(teacher, adapter, strict=True)
        parts = [F.log_softmax(teacher(input_ids=ids[i:i + batch_size].to(device),
                                       attention_mask=mask[i:i + batch_size].to(device)).logits.float(), -1).cpu()
                 for i in range(0, ids.shape[0], batch_size)]
        lp = torch.cat(parts)
        if mixture == "sequence":  # log w_e + log p_e(x_1..x_t): the teacher's unnormalized posterior at t
            tok = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * valid
            post = F.pad(torch.cumsum(tok, dim=1), (1, 0)) + lw  # (n, T)
            norm = post if norm is None else torch.logaddexp(norm, post)
            lp = lp + post[..., None]
        else:
            lp = lp + lw
        mixed = lp if mixed is None else torch.logaddexp(mixed, lp)
        del lp
    return mixed if norm is None else mixed - norm[..., None]


def kl_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || q_student) (nats), from the student's logits."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = batch["teacher_logp"].float()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    mask = batch["attention_mask"].float()
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def heldout_kl(model, ids: torch.Tensor, mask: torch.Tensor, teacher_logp: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for i in range(0, ids.shape[0], batch_size):
        b = {"input_ids": ids[i:i + batch_size].to(device), "attention_mask": mask[i:i + batch_size].to(device),
             "teacher_logp": teacher_logp[i:i + batch_size].to(device)}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        n = float(b["attention_mask"].sum())
        total += float(kl_loss(logits, b)) * n
        count += n
    return total / max(count, 1.0)


@dataclass
class DistillData:
    """What every rank of the cloud world trains and measures on: self-generated inputs and the
    teachers' mixed log-probabilities on them (training and held-out). No device data."""

    ids: torch.Tensor  # (n, T) long
    mask: torch.Tensor  # (n, T) long
    logp: torch.Tensor  # (n, T, V) float32
    h_ids: torch.Tensor
    h_mask: torch.Tensor
    h_logp: torch.Tensor
    seq_len: int
    seed: int


def prepare(teacher, tokenizer, adapters: list[StateDict], weights: list[float], *, num_inputs: int,
            num_heldout: int, seq_len: int, temperature: float, seed: int,
            restore: StateDict | None = None, mixture: str = "token", **inputs) -> DistillData:
    """Generate the inputs (train and held-out, different seeds) and the teachers' targets.

    ``restore``: the adapter to leave loaded in ``teacher`` afterwards (the cloud's global knowledge).
    ``inputs``: how the inputs are written (``input_options``: inputs, system, seed_prompts, bos_fraction);
    ``mixture``: how the teachers' targets mix (``teacher_log_probs``).
    """
    try:
        ids, mask = generate_inputs(teacher, tokenizer, adapters, num_inputs, seq_len, temperature, seed, **inputs)
        h_ids, h_mask = generate_inputs(teacher, tokenizer, adapters, num_heldout, seq_len, temperature, seed + 1,
                                        **inputs)
        logp = teacher_log_probs(teacher, adapters, weights, ids, mask, mixture=mixture)
        h_logp = teacher_log_probs(teacher, adapters, weights, h_ids, h_mask, mixture=mixture)
    finally:
        if restore is not None:
            load_adapter_state(teacher, restore, strict=True)
    return DistillData(ids, mask, logp, h_ids, h_mask, h_logp, seq_len, seed)


def train_student(student, data: DistillData, *, engine: CloudEngineConfig, steps: int, batch_size: int, lr: float,
                  world: WorldSpec | None = None) -> tuple[StateDict, list[float], float]:
    """KL training of ``student`` in the cloud engine; every rank of a multi-worker world calls it
    with the same data (each draws its own batches; DeepSpeed averages the gradients). Returns the
    gathered weights, the per-step train KL and the held-out KL after (both collectives under
    ZeRO-3, hence on every rank)."""
    rank = world.rank if world is not None else 0
    gen = torch.Generator().manual_seed(data.seed + 2 + 1_000_003 * rank)
    b = min(batch_size, data.ids.shape[0])
    train_kl = []
    with CloudTrainer(student, engine, lr=lr, total_steps=steps, micro_batch_size=b, world=world) as trainer:
        for _ in range(steps):
            micro = []
            for _ in range(engine.grad_accum_steps):
                idx = torch.randint(0, data.ids.shape[0], (b,), generator=gen)
                micro.append(trainer.step({"input_ids": data.ids[idx], "attention_mask": data.mask[idx],
                                           "teacher_logp": data.logp[idx]}, loss_fn=kl_loss))
            train_kl.append(sum(micro) / len(micro))
        state = trainer.state_dict_for(None)  # gathered under ZeRO-3
        kl_after = heldout_kl(trainer.model, data.h_ids, data.h_mask, data.h_logp)
    return state, train_kl, kl_after


def distill(student, teacher, tokenizer, adapters: list[StateDict], weights: list[float], *, engine: CloudEngineConfig,
            num_inputs: int, num_heldout: int, seq_len: int, steps: int, batch_size: int, lr: float,
            temperature: float, seed: int, restore: StateDict | None = None,
            peers: Callable[[DistillData], tuple[WorldSpec | None, Callable[[], object]]] | None = None,
            **inputs) -> DistillResult:
    """Distill the teachers (``teacher`` with each of ``adapters``) into ``student`` (a plain
    causal LM with the base's weights) in the cloud engine; returns the new weights and the effect.

    ``peers(data)``: in a multi-worker cloud world, starts ``train_student`` on the other ranks and
    returns this rank's ``WorldSpec`` and a function that waits for them.
    ``inputs``: how the teachers write the inputs and how their targets mix (``distill_options(cfg)``;
    none given: ``bos`` inputs, ``token`` mixture, as before these options).
    """
    data = prepare(teacher, tokenizer, adapters, weights, num_inputs=num_inputs, num_heldout=num_heldout,
                   seq_len=seq_len, temperature=temperature, seed=seed, restore=restore, **inputs)
    kl_before = heldout_kl(student, data.h_ids, data.h_mask, data.h_logp)
    world, wait = peers(data) if peers is not None else (None, None)
    # if this rank fails, the others fail too once their collectives time out: no wait then
    state, train_kl, kl_after = train_student(student, data, engine=engine, steps=steps, batch_size=batch_size,
                                              lr=lr, world=world)
    if wait is not None:
        wait()
    step = max(1, data.ids.shape[0] // 4)  # a few from each teacher's share
    samples = [tokenizer.decode(data.ids[i][data.mask[i].bool()], skip_special_tokens=False)
               for i in range(0, data.ids.shape[0], step)][:4]
    return DistillResult(state, kl_before, kl_after, train_kl, int(data.ids.shape[0]), int(data.h_ids.shape[0]),
                         seq_len, seed, samples)
