"""Calibrating the cascade: per edge adapter and domain, the confidence threshold above which the
edge's answer is kept, measured on held-out examples against the cloud's answers to the same ones.

What calibration optimises. For one (adapter version, domain) slice of n held-out prompts, each
with the edge's confidence, whether the edge answered exactly right (e) and whether the cloud did
(c): keeping the answers with confidence >= t and escalating the rest gives the tiered exact match

    tiered(t) = (sum_{kept} e + sum_{escalated} c) / n = cloud EM + sum_{kept} (e - c) / n

so "the edge's answers it keeps are at least as right as the cloud's on those prompts" and
"tiered EM >= cloud-only EM on the slice" are the same condition: sum_{kept} (e - c) >= 0. The
threshold is the LOWEST confidence t (most answers kept, fewest escalations) that meets it; none
meets it only when even the single most confident answer loses to the cloud: then the slice always
escalates (``threshold`` None). Both signals the edge reports are tried (``min_token_prob``,
higher is surer; ``mean_entropy``, lower is surer) and the one that keeps more wins (ties: more
exact, then ``min_token_prob``).

Where it runs: the cloud calibrates each edge adapter when it publishes it (``hfsl.cloud``), on the
run's held-out eval sets, and the ``RoutingTable`` goes into the version folder as ``routing.json``
(its sha256 in the lineage, so ``KnowledgeStore.verify`` covers it). A run made before this existed
is calibrated afterwards with ``python -m gaisnet_ray.inference.calibrate RUN_DIR``: the table then
lies in ``RUN_DIR/routing/<adapter>/vNNNN.json`` and names the content hash of the weights it was
measured on (the router ignores it for any other weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..data import Example, encode_prompt, left_padded_batches
from ..layout import RunLayout
from .routing import SIGNALS, DomainCalibration, RoutingTable

OBJECTIVE = ("per domain, the lowest confidence threshold at which the edge answers it keeps are "
             "exactly right at least as often as the cloud's answers to the same prompts "
             "(tiered EM >= cloud EM on the held-out slice), escalating the fewest")
MEASURE_BATCH = 32
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    """One greedy answer with the confidence signals the served edge reports for it."""

    text: str
    min_token_prob: float
    mean_entropy: float


@dataclass(frozen=True)
class Observation:
    confidence: float  # higher is surer
    edge_correct: bool
    cloud_correct: bool


# ---------------------------------------------------------------------------------- the math
def lowest_threshold(observations: list[Observation]) -> tuple[float | None, int]:
    """(t, kept): the lowest confidence t with sum over confidence >= t of (edge - cloud) >= 0, and
    how many that keeps; (None, 0) when no t qualifies. Equal confidences are kept or escalated together."""
    ordered = sorted(observations, key=lambda o: -o.confidence)
    best: tuple[float | None, int] = (None, 0)
    gain, i = 0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j].confidence == ordered[i].confidence:
            gain += int(ordered[j].edge_correct) - int(ordered[j].cloud_correct)
            j += 1
        if gain >= 0:
            best = (ordered[i].confidence, j)
        i = j
    return best


def confidence_of(m: Measured, signal: str) -> float:
    return m.min_token_prob if signal == "min_token_prob" else -m.mean_entropy


def calibrate_domain(edge: list[Measured], edge_correct: list[bool], cloud_correct: list[bool]) -> DomainCalibration:
    """The slice's rule: each signal's lowest qualifying threshold; the signal that keeps more wins."""
    n = len(edge)
    if not (n == len(edge_correct) == len(cloud_correct)) or n == 0:
        raise ValueError(f"calibration needs as many edge answers as verdicts, at least one; got {n}, "
                         f"{len(edge_correct)}, {len(cloud_correct)}")
    cloud_em = sum(cloud_correct) / n
    best = None
    for signal in SIGNALS:
        obs = [Observation(confidence_of(m, signal), e, c) for m, e, c in zip(edge, edge_correct, cloud_correct)]
        t, kept = lowest_threshold(obs)
        keep = [o.confidence >= t if t is not None else False for o in obs]
        tiered = sum(o.edge_correct if k else o.cloud_correct for o, k in zip(obs, keep)) / n
        threshold = None if t is None else (t if signal == "min_token_prob" else -t)
        cand = DomainCalibration(signal, threshold, n, kept, sum(edge_correct) / n, cloud_em, tiered)
        if best is None or (cand.kept, cand.tiered_em) > (best.kept, best.tiered_em):
            best = cand
    return best


def calibrate_table(adapter: str, version: int, content_hash: str, examples: dict[str, list[Example]],
                    edge: dict[str, list[Measured]], cloud: dict[str, list[Measured]], cloud_source: dict,
                    probe_tokens: int | None = None) -> RoutingTable:
    """One adapter version's table over every domain of ``examples`` (answers compared exactly)."""
    domains = {}
    for domain, exs in examples.items():
        if not exs:
            continue
        e_ok = [m.text.strip() == ex.answer for m, ex in zip(edge[domain], exs)]
        c_ok = [m.text.strip() == ex.answer for m, ex in zip(cloud[domain], exs)]
        domains[domain] = calibrate_domain(edge[domain], e_ok, c_ok)
    return RoutingTable(adapter, version, content_hash, OBJECTIVE, domains, cloud_source, probe_tokens)


# ---------------------------------------------------------------------------- measuring models
@torch.no_grad()
def measure(model, tokenizer, prompts: list[str], max_new_tokens: int, system: str | None = None,
            probe_tokens: int | None = None, batch_size: int = MEASURE_BATCH) -> list[Measured]:
    """Greedy answers with the signals the served edge reports (``inference.generate.TokenStats``:
    per step up to and including eos, its entropy and the chosen token's probability), over the
    first ``probe_tokens`` steps when given (the router decides on that probe: its signals are
    what a threshold is compared with), batched and left-padded like ``hfsl.evaluate.greedy_answers``."""
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                           bos_token_id=tokenizer.bos_token_id, output_logits=True, return_dict_in_generate=True)
    encoded = [encode_prompt(p, tokenizer, system) for p in prompts]
    out: list[Measured | None] = [None] * len(prompts)
    for idx, ids, mask in left_padded_batches(encoded, batch_size, pad):
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
        logits = torch.stack(gen.logits, dim=1).float()  # (B, steps, V)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, steps)
        for row, i in enumerate(idx):
            new = gen.sequences[row, width:].tolist()
            ended = new.index(eos) + 1 if eos in new else len(new)
            text = tokenizer.decode(new[:ended - 1] if eos in new else new, skip_special_tokens=True)
            steps = min(ended, probe_tokens) if probe_tokens is not None else ended
            chosen = logp[row, torch.arange(steps), torch.tensor(new[:steps])].exp()
            out[i] = Measured(text, float(chosen.min()) if steps else 1.0,
                              float(entropy[row, :steps].mean()) if steps else 0.0)
    return out  # type: ignore[return-value]


def answer_budget(tokenizer, examples: dict[str, list[Example]]) -> int:
    """New tokens a calibration answer may take: the longest reference answer + 4."""
    lengths = [len(tokenizer.encode(e.answer, add_special_tokens=False)) for exs in examples.values() for e in exs]
    return max(lengths, default=4) + 4


def measure_domains(model, tokenizer, examples: dict[str, list[Example]], system: str | None,
                    max_new_tokens: int, probe_tokens: int | None = None) -> dict[str, list[Measured]]:
    return {d: measure(model, tokenizer, [e.prompt for e in exs], max_new_tokens, system, probe_tokens)
            for d, exs in examples.items() if exs}


def in_fold(prompt: str, fold: tuple[int, int] | None) -> bool:
    """``fold`` (k, n): the prompts whose stable hash is k mod n (None: all). The benchmark
    calibrates on one fold and measures on another, so thresholds never see the test prompts."""
    if fold is None:
        return True
    k, n = fold
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % n == k


# --------------------------------------------------------------------- an existing run folder
def sidecar_path(run_dir: str | Path, adapter: str, version: int) -> Path:
    return RunLayout(run_dir).routing_table(adapter, version)


@dataclass
class RunMeasurement:
    """A finished run's held-out answers, measured once: per domain the examples, the cloud's
    answers (newest global version) and each edge adapter's (its newest intact version)."""

    examples: dict[str, list[Example]]
    cloud: dict[str, list[Measured]]
    cloud_version: int
    edges: dict[str, tuple[int, str, dict[str, list[Measured]]]]  # edge -> (version, content hash, answers)
    probe_tokens: int | None


    def to_json(self) -> str:
        """Everything but the examples, which ``eval_examples`` rebuilds from the run's config."""
        from dataclasses import asdict

        return json.dumps({"cloud": {d: [asdict(x) for x in xs] for d, xs in self.cloud.items()},
                           "cloud_version": self.cloud_version, "probe_tokens": self.probe_tokens,
                           "edges": {e: [v, h, {d: [asdict(x) for x in xs] for d, xs in a.items()}]
                                     for e, (v, h, a) in self.edges.items()}})

    @classmethod
    def from_json(cls, text: str, examples: dict[str, list[Example]]) -> RunMeasurement:
        data = json.loads(text)
        answers = lambda by_domain: {d: [Measured(**x) for x in xs] for d, xs in by_domain.items()}  # noqa: E731
        return cls(examples, answers(data["cloud"]), data["cloud_version"],
                   {e: (v, h, answers(a)) for e, (v, h, a) in data["edges"].items()}, data["probe_tokens"])


def measure_run(run_dir: str | Path) -> RunMeasurement:
    """Measure the cloud and every edge adapter of a run folder on the run's held-out eval sets
    (one model in memory at a time)."""
    import gc

    from ..config import load_config
    from ..data import eval_examples
    from .served import GLOBAL, ServedRun

    run = ServedRun(run_dir)
    cfg = load_config(run.layout.config)
    examples = eval_examples(cfg.data)
    budget, k = answer_budget(run.tokenizer, examples), cfg.serve.routing.probe_tokens
    model, cloud_version = run.load_model(GLOBAL)
    cloud = measure_domains(model, run.tokenizer, examples, run.system_prompt, budget, k)
    del model
    gc.collect()
    edges = {}
    for edge in run.edge_ids():
        model, version = run.load_model(edge)
        edges[edge] = (version, run.adapter_store(edge).lineage(version)["content_hash"],
                       measure_domains(model, run.tokenizer, examples, run.system_prompt, budget, k))
        del model
        gc.collect()
    return RunMeasurement(examples, cloud, cloud_version, edges, k)


def write_sidecars(run_dir: str | Path, m: RunMeasurement, fold: tuple[int, int] | None = None) -> list[Path]:
    """Each edge's table, calibrated on the held-out examples of ``fold`` (None: all), written as
    ``routing/<edge>/vNNNN.json``. Returns the files written."""
    def part(items: dict[str, list]) -> dict[str, list]:
        return {d: [x for x, e in zip(xs, m.examples[d]) if in_fold(e.prompt, fold)] for d, xs in items.items()}

    examples, cloud = part(m.examples), part(m.cloud)
    written = []
    for edge, (version, content_hash, answers) in m.edges.items():
        table = calibrate_table(edge, version, content_hash, examples, part(answers), cloud,
                                {"adapter": "global", "version": m.cloud_version,
                                 "fold": list(fold) if fold else None}, m.probe_tokens)
        path = sidecar_path(run_dir, edge, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(table.to_json(), encoding="utf-8")
        tmp.replace(path)  # a router reading it sees the old table or the new one, never half
        written.append(path)
        log.info("calibrated %s v%04d: %s", edge, version,
                 {d: (c.signal, c.threshold, f"{c.kept}/{c.samples}") for d, c in table.domains.items()})
    return written


def calibrate_run(run_dir: str | Path, fold: tuple[int, int] | None = None) -> list[Path]:
    """Calibrate the newest intact version of every edge adapter of a finished run folder against
    its newest global version (what ``CloudTier`` serves), on the run's held-out eval sets (``fold``:
    a part of them), and write each table as a sidecar. Returns the files written."""
    return write_sidecars(run_dir, measure_run(run_dir), fold)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Calibrate the cascade thresholds of a finished run folder.")
    parser.add_argument("run_dir")
    parser.add_argument("--fold", default=None, help="K/N: calibrate on the held-out prompts hashing to K mod N")
    args = parser.parse_args(argv)
    fold = tuple(int(x) for x in args.fold.split("/")) if args.fold else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in calibrate_run(args.run_dir, fold):
        print(path)


if __name__ == "__main__":
    main()
