"""``gaisnet privacy-audit RUN_DIR``: attack a finished run as a curious edge and cloud would, and
write the recovery rates next to the run's exact match (``RUN_DIR/privacy_audit.json``).

What it does, on ``--examples`` private training examples of the run's devices:

1. the hidden states a device sends its edge at the cut: the run's final front segment on those
   examples, then the run's own ``privacy.activation_clip`` / ``activation_noise``;
2. search inversion by an edge that knows the front weights that produced them (an upper bound:
   today an edge holds the public base and relays the device-side adapter keys of its clusters);
3. search inversion by an edge that has only the PUBLIC base (``knowledge/bases/b0000``): what is
   left when the edge never sees the device's front weights;
4. learned inversion: a decoder fitted on public text through the public front (with the run's
   clip and noise applied, as the attacker knows the configuration);
5. labels from gradients: the gradient each device sends up at the middle's output (dL/dh_m, not
   noised), decoded into the tokens its positions predict by a decoder fitted on the gradients of
   public examples through the public model (with the run's clip, noise and denoising);
6. membership from the knowledge: the likelihood gap (public base vs the run's final model) of the
   training examples against held-out examples of the same private domains (AUC; 0.5 = nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..layout import CONFIG_NAME, MODEL_DIR, PRIVACY_AUDIT_NAME, RunLayout
from . import active_defenses

# torch, transformers and the attacks are imported inside the functions that need them, so bad
# input exits 2 before they load (as every `gaisnet` command does)

AUDIT_FILE = PRIVACY_AUDIT_NAME
PUBLIC_DOMAINS = ("capitals", "arithmetic", "strings", "units", "facts")  # built-in public text


class AuditInputError(ValueError):
    """RUN_DIR is not a run folder the audit can read; the message says what is missing."""


def audit_path(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Where an audit is written: ``privacy_audit.json``, or, audited under other privacy settings,
    ``privacy_audit-<settings>.json`` (the run's own audit is never overwritten by a what-if)."""
    tag = "_".join(o.removeprefix("privacy.").replace("=", "-") for o in overrides or [])
    return RunLayout(run_dir).privacy_audit(tag or None)


def check_audit_input(run_dir: Path, overrides: list[str] | None = None):
    """The run's config (with ``overrides``), or ``AuditInputError`` saying what is missing."""
    from ..config import ConfigError, load_config

    run = RunLayout(run_dir)
    if not run.config.is_file():
        raise AuditInputError(f"'{run_dir}' is not a run folder (no {CONFIG_NAME})")
    if not run.model.is_dir():
        raise AuditInputError(f"'{run_dir}' has no {MODEL_DIR}/ folder (the run did not get far enough)")
    try:
        return load_config(run.config, overrides or [])
    except ConfigError as e:
        raise AuditInputError(f"config error: {e}") from None


def _latest_knowledge(run_dir: Path) -> Path | None:
    from ..knowledge.store import KnowledgeStore

    store = KnowledgeStore(RunLayout(run_dir).knowledge)
    latest = store.latest_version()
    return None if latest is None else store.path(latest)


def _load_models(run_dir: Path, cfg):
    """(public base, final model, tokenizer). The public base is base version 0 when the run
    relayed (model/ then holds every round's knowledge merged); otherwise model/, and the final
    model is model/ with the latest knowledge version merged into it."""
    from ..models.build import load_foundation

    run = RunLayout(run_dir)
    bases0 = run.base_dir(0)
    if cfg.relay.policy != "none" and bases0.is_dir():
        public, tok = load_foundation(bases0, cfg.model.attn_implementation)
        final, _ = load_foundation(run.model, cfg.model.attn_implementation)
        return public, final, tok
    public, tok = load_foundation(run.model, cfg.model.attn_implementation)
    final, _ = load_foundation(run.model, cfg.model.attn_implementation)
    latest = _latest_knowledge(run_dir)
    if latest is not None:
        from peft import PeftModel

        final = PeftModel.from_pretrained(final, str(latest)).merge_and_unload()
    return public, final, tok


def _front(model, tok, cfg, front_layers: int | None):
    """The device front (embeddings + blocks[0:front_layers]) of ``model`` as a SplitModel; None:
    every block, the final norm and the head (the whole split step: front, middle, back)."""
    from ..models.build import FoundationPackage
    from ..models.split import build_tier_model

    pkg = FoundationPackage.from_model(model, tok, copy=False)
    if front_layers is not None:
        pkg = pkg.part(set(range(front_layers)), True, False)
    return build_tier_model(pkg, cfg.peft)


def _private_batch(cfg, tok, n: int):
    """n training examples spread over the devices (round robin), and n held-out ones of the same domains."""
    from ..data import device_examples, encode_examples, eval_examples
    from ..schemes.topology import devices_by_edge

    ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    per_device = device_examples(cfg.data, ids)
    members, i = [], 0
    while len(members) < n and any(len(v) > i for v in per_device.values()):
        members += [v[i] for v in per_device.values() if len(v) > i]
        i += 1
    heldout_sets = eval_examples(cfg.data)
    heldout = [ex for d in cfg.data.domains for ex in heldout_sets.get(d, [])]
    seq = cfg.model.max_seq_len
    enc = lambda exs: encode_examples(exs[:n], tok, seq, cfg.data.system_prompt)  # noqa: E731
    return enc(members), enc(heldout)


def _public_batch(cfg, tok, per_domain: int):
    from ..data import encode_examples, sample_examples

    exs = [ex for d in PUBLIC_DOMAINS for ex in sample_examples(d, "public", per_domain, cfg.data.seed)]
    return encode_examples(exs, tok, max(64, cfg.model.max_seq_len), cfg.data.system_prompt)


def audit_run(run_dir: str | Path, *, examples: int = 48, candidates: int = 1024, noisy_candidates: int = 128,
              public_per_domain: int = 200, gradient_public_per_domain: int = 40, decoder_steps: int = 100,
              seed: int = 0, overrides: list[str] | None = None, search: bool = True) -> dict:
    """Run every attack on a run folder; returns (and writes) the audit. ``overrides``: privacy.*
    keys to audit with instead of the run's own (e.g. a noise level it did not train with).
    ``search`` False: leave out the two search inversions (the slow attacks; minutes to hours at a
    deep cut), keeping the learned inversions and membership."""
    import torch

    from ..schemes.topology import device_cut
    from ..schemes import scheme_of
    from . import attacks as A
    from .noise import clip_rows, privatize_hidden

    run_dir = Path(run_dir)
    cfg = check_audit_input(run_dir, overrides)
    started = time.perf_counter()
    torch.manual_seed(seed)
    public, final, tok = _load_models(run_dir, cfg)
    members, heldout = _private_batch(cfg, tok, examples)
    out: dict = {"run_dir": str(run_dir), "scheme": cfg.training.scheme, "privacy": active_defenses(cfg.privacy),
                 "examples": int(members["input_ids"].shape[0])}

    # ---- inversion of what crosses the end-edge link (split schemes only)
    if scheme_of(cfg).splits:
        num_layers = int(final.config.num_hidden_layers)
        cut = device_cut(cfg.topology, "end-0-0", num_layers)
        k = cut.front_end
        out["front_layers"] = k
        p = cfg.privacy
        gen = torch.Generator().manual_seed(seed + 1)
        link = lambda h: privatize_hidden(h, p.activation_clip, p.activation_noise, gen)  # noqa: E731
        dev_front, pub_front = _front(final, tok, cfg, k), _front(public, tok, cfg, k)
        with torch.no_grad():
            hidden = link(dev_front.front(members["input_ids"], k))  # (N, T, H): what the edge receives
        lengths = A.lengths_of(members["labels"])
        emb = public.get_input_embeddings().weight.detach()
        pub = _public_batch(cfg, tok, public_per_domain)
        pub_len = A.lengths_of(pub["labels"])
        noisy = p.activation_noise > 0 or p.activation_clip is not None
        attacks = {}
        for name, front in (("exact_weights", dev_front), ("public_base", pub_front)) if search else ():
            t0 = time.perf_counter()
            fwd = lambda ids, s=front: link(s.front(ids, k))  # noqa: E731  (the attacker replays the link's clip)
            ranker = A.train_decoder(fwd, pub["input_ids"], pub_len, emb, steps=decoder_steps, seed=seed)
            rows = A.cached_next_rows(front, k)
            if p.activation_clip is not None:  # the received rows were clipped: so are the candidates'
                rows = lambda pre, cand, r=rows: clip_rows(r(pre, cand), p.activation_clip)  # noqa: E731
            rec, err = A.search_inversion(lambda ids, s=front: s.front(ids, k), hidden, A.decoder_ranker(ranker),
                                          lengths=lengths, max_candidates=noisy_candidates if noisy else candidates,
                                          margin=0.0 if noisy else 0.5, next_rows=rows)
            attacks[f"search_{name}"] = {**A.recovery(rec, members["input_ids"], members["labels"]).as_dict(),
                                         "seconds": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        fwd = lambda ids: link(pub_front.front(ids, k))  # noqa: E731
        dec = A.train_decoder(fwd, pub["input_ids"], pub_len, emb, steps=0, seed=seed)  # ridge: the best top-1
        attacks["learned_public_base"] = {**A.recovery(A.decode(dec, hidden), members["input_ids"],
                                                       members["labels"]).as_dict(),
                                          "seconds": round(time.perf_counter() - t0, 1)}
        out["inversion"] = attacks
        out["labels_from_gradients"] = (_labels_from_gradients(cfg, public, final, tok, members, link, cut, emb,
                                                               gradient_public_per_domain)
                                        if p.send_gradients else
                                        "none: privacy.send_gradients is false, no gradient leaves a device")
    else:
        out["inversion"] = "none: under fl no hidden state leaves a device"

    # ---- membership from the knowledge
    t0 = time.perf_counter()
    logits = lambda m: (lambda ids: m(input_ids=ids).logits)  # noqa: E731
    scores = {}
    for name, batch in (("members", members), ("heldout", heldout)):
        base_l = A.example_losses(logits(public), batch["input_ids"], batch["labels"])
        tuned_l = A.example_losses(logits(final), batch["input_ids"], batch["labels"])
        scores[name] = A.membership_scores(base_l, tuned_l)
    out["membership"] = {"auc": A.auc(scores["members"], scores["heldout"]),
                         "gap_members": float(scores["members"].mean()), "gap_heldout": float(scores["heldout"].mean()),
                         "seconds": round(time.perf_counter() - t0, 1)}
    out["exact_match"] = _final_exact_match(run_dir)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["overrides"] = list(overrides or [])
    audit_path(run_dir, overrides).write_text(json.dumps(out, indent=2) + "\n")
    from .plot import write_leakage_plot

    write_leakage_plot(run_dir)  # every audit of the run so far, leakage next to exact match
    return out


def _labels_from_gradients(cfg, public, final, tok, members, link, cut, emb, public_per_domain: int) -> dict:
    """Labels from the gradients sent up at the middle's output (not noised): a decoder fitted on the
    public model's gradients for public examples, replaying the run's link (clip, noise, denoise),
    applied to the gradients the run's final model gives the private examples. ``cut``: the
    audited device's (``schemes.topology.device_cut``)."""
    from . import attacks as A

    t0 = time.perf_counter()
    gpub = _public_batch(cfg, tok, public_per_domain)
    sent = lambda model, batch: A.sent_gradients(  # noqa: E731
        _front(model, tok, cfg, None), batch["input_ids"], batch["labels"], cut.front_end, cut.back_start, link,
        cfg.privacy.activation_denoise)
    decoder = A.fit_label_decoder(sent(public, gpub), gpub["labels"], emb)
    return {**A.label_recovery(decoder, sent(final, members), members["labels"]),
            "public_examples": int(gpub["input_ids"].shape[0]), "seconds": round(time.perf_counter() - t0, 1)}


def _final_exact_match(run_dir: Path) -> dict:
    """The last evaluated round's exact match per domain (metrics.jsonl), next to the leakage."""
    from ..runfolder import read_metrics  # the complete rounds: a half-written last line is skipped

    evals = [m["eval"] for m in read_metrics(run_dir) if m.get("eval")]
    return {d: v["exact_match"] for d, v in evals[-1].items()} if evals else {}


def run_command(args: argparse.Namespace) -> int:
    """``gaisnet privacy-audit`` (the parser is in ``cli.py``): exit 2 with one line on bad input."""
    if args.examples < 2:
        print(f"error: --examples must be >= 2 (got {args.examples})", file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if not o.startswith("privacy.")]
    if bad:
        print(f"error: privacy-audit --set takes only privacy.* keys; got {bad[0]!r}", file=sys.stderr)
        return 2
    try:
        check_audit_input(Path(args.run_dir), args.overrides)  # before torch loads
        out = audit_run(args.run_dir, examples=args.examples, overrides=args.overrides,
                        search=args.search)
    except AuditInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in (out["inversion"].items() if isinstance(out["inversion"], dict) else []):
        print(f"{name:22s} tokens {r['tokens']:.3f}  examples {r['examples']:.3f}  answers {r['answers']:.3f}  "
              f"({r['num_tokens']} tokens, {r['seconds']} s)")
    if isinstance(out.get("labels_from_gradients"), dict):
        r = out["labels_from_gradients"]
        print(f"{'labels_from_gradients':22s} labels {r['labels']:.3f}  answers {r['answers']:.3f}  "
              f"({r['num_labels']} labels, {r['seconds']} s)")
    m = out["membership"]
    print(f"membership AUC {m['auc']:.3f} (likelihood gap members {m['gap_members']:.3f}, held-out {m['gap_heldout']:.3f})")
    print(f"exact match {json.dumps({d: round(v, 3) for d, v in out['exact_match'].items()})}")
    print(f"written {audit_path(args.run_dir, args.overrides)} and {RunLayout(args.run_dir).privacy_plot}")
    return 0
