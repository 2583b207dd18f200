"""One study cell: a whole GaisNet run with the in-process runtime (``InProcessGaisNet``, the same
core objects the Ray actors hold, called directly; the Ray runtime gives the same knowledge, which
its own tests check), in its own run folder with the usual run files.

``python -m gaisnet_ray.study.cell CELL_DIR`` runs the cell whose ``config.yaml`` the study runner
wrote into CELL_DIR (a fresh process per cell: every cell starts from the same memory, and what a
cell held is gone when it ends) and writes ``CELL_DIR/result.json`` last: a cell folder without it
was interrupted and is run again from the start.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .store import RESULT_NAME


def random_init_model(model_cfg, out: Path) -> Path:
    """A randomly initialised copy of the model ``model_cfg`` (a ``ModelConfig``) names: the same
    architecture, tokenizer and chat template, weights drawn with seed ``model.seed``; written once
    to ``out`` (published by one rename)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.sources import quiet_transformers, resolve_model_dir

    folder = resolve_model_dir(model_cfg)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    if folder is None:  # a preset built from config: randomly initialised already
        from ..models.build import build_foundation, save_foundation

        save_foundation(*build_foundation(model_cfg), tmp)
    else:
        torch.manual_seed(model_cfg.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        with quiet_transformers(errors_only=False):  # no "Writing model shards" bar
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def run_cell(cell_dir: str | Path, base_eval: dict | None = None, random_init: dict | None = None) -> dict:
    """Run the cell in ``cell_dir`` (its ``config.yaml``): round-0 evaluation (the base alone),
    every round, the cloud alone at the end; the run files (``metrics.jsonl``, ``run.json``,
    ``cloud/initial_eval.json``, ``knowledge/``, ``model/``, ``report.png``) as ``gaisnet run``
    writes them. ``base_eval``: the round-0 evaluation another cell with the same base already
    measured (``grid.base_key``), used instead of measuring it again. ``random_init``: ``{"from":
    a ModelConfig dict, "to": the folder config.yaml's model.path names}``: make that randomly
    initialised model first (once: a later cell finds it). Returns (and writes, last) ``result.json``."""
    import torch

    from ..config import load_config
    from ..inprocess import InProcessGaisNet
    from ..layout import RunLayout
    from ..runfolder import append_metrics, write_summary
    from ..schemes import scheme_of

    cell_dir = Path(cell_dir)
    run = RunLayout(cell_dir)
    if random_init:
        from ..config import ModelConfig

        random_init_model(ModelConfig(**random_init["from"]), Path(random_init["to"]))
    cfg = load_config(run.config)
    torch.set_num_threads(max(1, cfg.run.torch_threads, torch.get_num_threads()))
    started = time.perf_counter()
    net = InProcessGaisNet(cfg, cell_dir)
    setup_s = time.perf_counter() - started
    initial, base_eval_s = base_eval, None
    if initial is None:  # knowledge v0 has LoRA B = 0: base + v0 is the base alone
        t0 = time.perf_counter()
        initial = net.cloud.evaluate()
        base_eval_s = time.perf_counter() - t0
    run.initial_eval.parent.mkdir(parents=True, exist_ok=True)
    run.initial_eval.write_text(json.dumps(initial) + "\n")
    rows = []
    for r in range(1, cfg.training.rounds + 1):
        t0 = time.perf_counter()
        row = net.run_round(r)
        row["wall_s"] = time.perf_counter() - t0
        append_metrics(cell_dir, row)
        rows.append(row)
        print(f"round {r}: {row['wall_s']:.1f}s train_loss {row['train_loss']:.3f}", flush=True)
    last = rows[-1]
    # the cloud alone (the base without any adapter) after the run: what the last relay measured;
    # without a relay the base never changed, so it is the round-0 base
    if last.get("relay"):
        cloud_alone, cloud_src = last["relay"]["cloud_after"], "relay.cloud_after of the last round"
    else:
        cloud_alone, cloud_src = initial, "the base alone at round 0 (no relay: the base never changes)"
    wall_s = time.perf_counter() - started
    note = scheme_of(cfg).privacy_note
    write_summary(cell_dir, {
        "rounds": cfg.training.rounds, "scheme": cfg.training.scheme, **({"privacy_note": note} if note else {}),
        "cluster": "in-process", "eval_initial": initial, "eval_final": last.get("eval"),
        "final_version": last.get("version"), "wall_s": wall_s,
    })
    from ..report import write_report

    write_report(cell_dir, initial)
    result = {
        "eval": last.get("eval"), "eval_round0": initial, "cloud_alone": cloud_alone, "cloud_alone_source": cloud_src,
        "eval_devices": last.get("eval_devices"), "privacy_note": note,
        "train_loss": [r["train_loss"] for r in rows],
        "bytes": {k: sum(r["bytes"][k] for r in rows) for k in rows[0]["bytes"]},
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "relay_bytes_down": sum(v for r in rows for k, v in ((r.get("relay") or {}).get("bytes_down") or {}).items()
                                if k != "per_node"),  # edge_cloud_down + end_edge_down; per_node splits them
        "modeled_comm_s": sum(r["modeled_comm_s"] for r in rows),
        "modeled_round_s": (sum(r["plan"]["modeled_round_s"] for r in rows)
                            if all(r.get("plan") for r in rows) else None),
        "rounds_wall_s": [r["wall_s"] for r in rows], "setup_s": setup_s,
        "base_eval_s": base_eval_s, "base_eval_shared": base_eval is not None, "wall_s": wall_s,
        "pretrain_losses": list(net.cloud.pretrain_losses),
    }
    tmp = cell_dir / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.rename(cell_dir / RESULT_NAME)  # last: a folder without it is an interrupted cell
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gaisnet_ray.study.cell CELL_DIR", file=sys.stderr)
        return 2
    spec = json.loads((Path(args[0]) / "cell.json").read_text())
    run_cell(args[0], base_eval=spec.get("base_eval"), random_init=spec.get("random_init"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
