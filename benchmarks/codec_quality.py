"""What a lossy link codec costs in quality: the same HFSL job trained under each ``links.codec``.

The tiny job (``examples/tiny.yaml``: 2 edges x 3 devices, 5 rounds, the cloud's public
pre-training on) run whole by ``InProcessGaisNet`` once per codec, same model, data, seeds and
steps; each run's final held-out loss and exact match per domain, and the bytes its links moved.
``none`` is fp32 with padding (as before the codec); ``fp32`` drops the padding only, so it must
end where ``none`` does; ``bf16`` and ``int8`` are lossy (README "Bytes per round").

    python benchmarks/codec_quality.py                  # 4 codecs, about 2 minutes on 2 cores
    python benchmarks/codec_quality.py --codecs none int8 --set training.rounds=3

Writes benchmarks/results/codec_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import envelope, fmt_bytes, footer, make_config, md_table, quiet, write_results

NAME = "codec_quality"
CODECS = ["none", "fp32", "bf16", "int8"]


def run_codec(codec: str, extra: list[str]) -> dict:
    """The whole job under ``codec`` in one process: final eval, train losses, bytes, wall."""
    import torch

    from gaisnet_ray.inprocess import InProcessGaisNet

    torch.set_num_threads(1)  # as each actor runs (run.torch_threads=1)
    cfg = make_config([*extra, f"links.codec={codec}", "run.progress=false"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"codec-{codec}-") as tmp:
        net = InProcessGaisNet(cfg, tmp)
        rows = [net.run_round(r) for r in range(1, cfg.training.rounds + 1)]
    evals = [r["eval"] for r in rows if r.get("eval")]
    final = evals[-1]
    return {"codec": codec, "rounds": cfg.training.rounds, "eval": final,
            "mean_loss": sum(v["loss"] for v in final.values()) / len(final),
            "mean_exact_match": sum(v["exact_match"] for v in final.values()) / len(final),
            "train_loss": [r["train_loss"] for r in rows],
            "bytes_per_round": {k: sum(r["bytes"].get(k, 0) for r in rows) / len(rows) for k in rows[0]["bytes"]},
            "wall_s": time.perf_counter() - t0}


def render(data: dict) -> str:
    runs = data["runs"]
    ref = next((r for r in runs if r["codec"] == "none"), runs[0])
    domains = list(ref["eval"])
    rows = []
    for r in runs:
        d = (r["mean_loss"] - ref["mean_loss"]) / ref["mean_loss"]
        rows.append([f"`{r['codec']}`", *(f"{r['eval'][x]['loss']:.4f}" for x in domains), f"{r['mean_loss']:.4f}",
                     f"{d:+.2%}", f"{r['mean_exact_match']:.2f}", fmt_bytes(r["bytes_per_round"].get("end_edge_up", 0)),
                     fmt_bytes(sum(r["bytes_per_round"].values()))])
    out = ["# Link codecs: what each costs in held-out loss", "",
           f"The tiny job ({ref['rounds']} round(s), examples/tiny.yaml{', ' + ' '.join(data['overrides']) if data['overrides'] else ''}) "
           "run whole in one process (`InProcessGaisNet`) under each `links.codec`; same model, data, seeds "
           f"and steps. Final held-out answer loss per domain; the change of the mean against `{ref['codec']}`; "
           "bytes per round (mean over the rounds).", "",
           md_table(["codec", *domains, "mean loss", "vs none", "mean exact match", "end-edge up / round",
                     "all links / round"], rows), "", footer(data)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", choices=CODECS, default=CODECS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, as `gaisnet run --set` (repeatable)")
    args = ap.parse_args()
    quiet()
    data = envelope(NAME, {k: str(v) for k, v in vars(args).items()})
    data["overrides"] = args.overrides
    started = time.perf_counter()
    data["runs"] = []
    for codec in args.codecs:
        print(f"{codec} ...", flush=True)
        r = run_codec(codec, args.overrides)
        print(f"    mean held-out loss {r['mean_loss']:.4f}, {r['wall_s']:.0f} s", flush=True)
        data["runs"].append(r)
    data["wall_s"] = time.perf_counter() - started
    write_results(NAME, data, render(data))


if __name__ == "__main__":
    main()
