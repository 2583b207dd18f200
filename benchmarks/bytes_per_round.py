"""Bytes per round side by side: HFSL under each link codec, FL-LoRA, and full-model FedAvg.

One round of each scheme on the same model, data, seeds and number of device steps, run by
``InProcessGaisNet`` (no Ray: the byte counts come from the same core code the Ray runtime
reports, ``hfsl.cloud.round_metrics``, and count the encoded messages as sent, ``links.codec``):

- HFSL with ``links.codec`` none (fp32, padding included: as before the codec), fp32 (padding
  dropped), bf16 and int8 (padding dropped; adapters between tiers in bf16);
- FL-LoRA (``training.scheme=fl``: each device trains the whole model, the LoRA adapter goes down
  and up once per turn), with adapters in fp32 (codec none) and in bf16 (codec bf16);
- full-model FedAvg, computed, not run: 2 x the model's bytes per device per round (the whole
  model down and up; fp32 as the runtime holds it, bf16 stated beside), the issue's definition.

    python benchmarks/bytes_per_round.py                   # tiny measured, SmolLM2-135M predicted (~6 min)
    python benchmarks/bytes_per_round.py --measure-real hfsl/int8   # + one real SmolLM2 round (the results file)
    python benchmarks/bytes_per_round.py --models tiny     # the tiny job only (about 2.5 min)

Writes benchmarks/results/bytes_per_round.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import envelope, fmt_bytes, fmt_count, footer, make_config, md_table, quiet, write_results

NAME = "bytes_per_round"
LINKS = ["end_edge_up", "end_edge_down", "edge_cloud_up", "edge_cloud_down"]
MODELS = {"tiny": "examples/tiny.yaml (GPT-2 tiny, 0.19M params)",
          "smollm2": "the embedded default job (SmolLM2-135M-Instruct)"}
RUNS = [("hfsl", "none"), ("hfsl", "fp32"), ("hfsl", "bf16"), ("hfsl", "int8"), ("fl", "none"), ("fl", "bf16")]
TARGET_FULL_RATIO = 400  # the target on the real model: HFSL + codec <= 1/400 of full FedAvg

# Evaluation and pre-training move no bytes between tiers; they are switched off so a round is
# only training (round_metrics evaluates when round % eval_every == 0 or round == rounds).
BASE_OVERRIDES = ["training.pretrain_steps=0", "run.progress=false", "training.eval_every=1000000",
                  "training.rounds=1000000"]


def _params(module) -> dict:
    """Parameters a tier holds (pruned blocks are parameter-free placeholders; tied weights once)."""
    params = list(module.parameters())
    return {"params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params)}


def _base_params(peft) -> int:
    """The foundation's own parameters (LoRA tensors excluded; tied weights once)."""
    return sum(p.numel() for n, p in peft.named_parameters() if "lora_" not in n)


def _wire_bytes(codec: str, n: int, b: int, t: int, h: int) -> int:
    """Bytes of one (B, T, H) activation or gradient message with ``n`` real positions (hfsl.linkcodec)."""
    per_value = {"none": 4, "fp32": 4, "bf16": 2, "int8": 1}[codec]
    if codec == "none":
        return b * t * h * 4
    return n * h * per_value + (n * 4 if codec == "int8" else 0) + b * 4  # values, int8 scales, int32 lengths


def predict(cfg, g, scheme: str, codec: str) -> dict:
    """The bytes the round will send, from shapes and the batches each device draws in round 1
    (its own seeded sampler, replayed and then reset): checked equal to the measured counts."""
    from gaisnet_ray.data.encode import lengths_of
    from gaisnet_ray.knowledge.accounting import payload_nbytes
    from gaisnet_ray.models.adapters import adapter_state

    narrow = 2 if codec in ("bf16", "int8") else 1  # adapters in bf16 under the lossy codecs
    adapter = payload_nbytes(g.cloud.knowledge) // narrow
    steps, t = cfg.training.local_steps, cfg.model.max_seq_len
    hidden = int(g.cloud.package.config.get("n_embd", g.cloud.package.config.get("hidden_size")))
    end = 0
    for d, dev in g.devices.items():
        if scheme == "fl":
            end += adapter
            continue
        end += payload_nbytes(adapter_state(dev.split.peft)) // narrow
        dev._start_round(1)
        for _ in range(steps):
            _, labels = dev._next_batch()
            n, b = int(lengths_of(labels.cpu()).sum()), int(labels.shape[0])
            end += 2 * _wire_bytes(codec, n, b, t, hidden)  # h_k + dL/dh_m up (h_m + dL/dh_k down)
        dev._round = None  # the round reseeds from (seed, round) and draws the same batches again
    cloud = len(g.edges) * adapter
    return {"end_edge_up": end, "end_edge_down": end, "edge_cloud_up": cloud, "edge_cloud_down": cloud}


def run_point(model: str, scheme: str, codec: str, extra: list[str], measure: bool,
              predict_codecs: tuple[str, ...] = ()) -> dict[str, dict]:
    """Set up ``InProcessGaisNet`` for (scheme, codec); predict the round's bytes under ``codec``
    and each of ``predict_codecs`` (from the same set-up), and with ``measure`` run exactly one
    round under ``codec`` and count them. Returns codec -> row."""
    import torch

    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.knowledge.accounting import payload_nbytes

    overrides = BASE_OVERRIDES + extra + [f"training.scheme={scheme}", f"links.codec={codec}"]
    cfg = make_config(overrides, None) if model == "smollm2" else make_config(overrides)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="gaisnet-bench-") as run_dir:
        t0 = time.perf_counter()
        g = InProcessGaisNet(cfg, run_dir)
        setup_s = time.perf_counter() - t0
        hidden = int(g.cloud.package.config.get("n_embd", g.cloud.package.config.get("hidden_size")))
        layers = int(g.cloud.package.config.get("n_layer", g.cloud.package.config.get("num_hidden_layers")))
        common = {
            "scheme": scheme, "setup_s": setup_s, "num_devices": len(g.devices), "num_edges": len(g.edges),
            "local_steps": cfg.training.local_steps, "batch_size": cfg.training.batch_size,
            "seq_len": cfg.model.max_seq_len, "peft_r": cfg.peft.r,
            "model": {"layers": layers, "hidden": hidden, "base_params": _base_params(g.cloud.peft)},
            "adapter_bytes_fp32": payload_nbytes(g.cloud.knowledge),
            "device_memory": _params(next(iter(g.devices.values())).split.peft),
            "torch_threads": torch.get_num_threads(),
        }
        for c in dict.fromkeys((codec, *predict_codecs)):
            predicted = predict(cfg, g, scheme, c)
            rows[c] = {**common, "codec": c, "measured": False, "predicted_bytes": predicted, "bytes": predicted,
                       "total": sum(predicted.values())}
        if not measure:
            return rows
        t0 = time.perf_counter()
        m = g.run_round(1)
        round_s = time.perf_counter() - t0
    b = {k: int(m["bytes"][k]) for k in LINKS}
    rows[codec].update(measured=True, bytes=b, total=sum(b.values()), train_loss=m["train_loss"], round_s=round_s,
                       modeled_comm_s=m["modeled_comm_s"], prediction_exact=b == rows[codec]["predicted_bytes"])
    return rows


def side_by_side(model: str, extra: list[str], measured: set[str], log) -> dict:
    rows = {}
    for scheme in dict.fromkeys(s for s, _ in RUNS):
        codecs = [c for s, c in RUNS if s == scheme]
        real = [c for c in codecs if "all" in measured or f"{scheme}/{c}" in measured]
        for i, c in enumerate(real or [codecs[0]]):  # one set-up per measured run; it predicts the rest
            rest = tuple(x for x in codecs if x not in real) if i == 0 else ()
            for cc, p in run_point(model, scheme, c, extra, bool(real), rest).items():
                rows[f"{scheme}/{cc}"] = p
                how = (f"measured, round {p['round_s']:.0f}s, prediction "
                       f"{'exact' if p['prediction_exact'] else 'OFF'}" if p["measured"] else "predicted")
                log(f"{model:8s} {scheme:4s} codec={cc:4s} total {fmt_bytes(p['total']):>10s}  "
                    f"(setup {p['setup_s']:.0f}s, {how})")
    rows = {f"{s}/{c}": rows[f"{s}/{c}"] for s, c in RUNS}
    first = rows["hfsl/none"]
    model_bytes = first["model"]["base_params"] * 4
    n = first["num_devices"]
    full = {"model_params": first["model"]["base_params"], "model_bytes_fp32": model_bytes,
            "per_device_fp32": 2 * model_bytes, "per_round_fp32": n * 2 * model_bytes,
            "per_round_bf16": n * 2 * model_bytes // 2,
            "how": f"{n} devices x 2 (down + up) x {first['model']['base_params']} params x 4 bytes (fp32)"}
    fl = rows["fl/none"]["total"]
    for p in rows.values():
        p["vs_fl_lora"] = p["total"] / fl
        p["vs_full_fedavg"] = p["total"] / full["per_round_fp32"]
    hf = {c: rows[f"hfsl/{c}"] for c in ("none", "fp32", "bf16", "int8")}
    best = min(("bf16", "int8"), key=lambda c: hf[c]["total"])
    end = lambda p: p["bytes"]["end_edge_up"] + p["bytes"]["end_edge_down"]  # noqa: E731
    targets = {
        "codec": best,
        "hfsl_codec_le_fl_lora": hf[best]["total"] <= fl,
        "hfsl_codec_le_fl_lora_bf16": hf[best]["total"] <= rows["fl/bf16"]["total"],
        "full_over_hfsl_codec": full["per_round_fp32"] / hf[best]["total"],
        f"hfsl_codec_le_full_over_{TARGET_FULL_RATIO}": hf[best]["total"] * TARGET_FULL_RATIO <= full["per_round_fp32"],
        "end_edge_full_over_hfsl_codec": full["per_round_fp32"] / end(hf[best]),
        "real_position_share": end(hf["fp32"]) / end(hf["none"]),  # ~ real tokens / seq_len
    }
    return {"model": model, "describes": MODELS[model], "runs": rows, "full_fedavg": full, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (bytes do not depend on them; 1 is robust on shared cores)")
    ap.add_argument("--measure-real", nargs="+", default=["none"], metavar="SCHEME/CODEC",
                    help="SmolLM2 points to run a real round for, e.g. hfsl/int8 (each about 5-10 min on 2 shared "
                    "cores); the others are predicted from shapes and drawn batches, the formula every tiny point "
                    "checks to the byte. 'all': every point (about 1 h). Default none: predict only (keeps the "
                    "default run near 6 min)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run, as `gaisnet run --set` (repeatable)")
    ap.add_argument("--tag", default=None, help="write results/%s-TAG.{json,md} instead" % NAME)
    args = ap.parse_args()
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    data = envelope(NAME, vars(args))
    started = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - started:6.1f}s] {s}", flush=True)  # noqa: E731
    data["models"] = [side_by_side(m, args.overrides, {"all"} if m == "tiny" else set(args.measure_real), log)
                      for m in args.models]
    data["wall_s"] = time.perf_counter() - started
    data["all_predictions_exact"] = all(p["prediction_exact"] for m in data["models"] for p in m["runs"].values()
                                        if p["measured"])
    write_results(NAME + (f"-{args.tag}" if args.tag else ""), data, render(data))


LABEL = {"none": "fp32, padding included (as computed)", "fp32": "fp32, padding dropped",
         "bf16": "bf16, padding dropped; adapters bf16",
         "int8": "int8 + per-token scale, padding dropped; adapters bf16"}


def _vs_full(x: float) -> str:
    return f"1/{1 / x:,.0f}" if x < 0.5 else f"{x:.2f}x"


def render(data: dict) -> str:
    out = ["# Bytes per round: HFSL with each link codec, FL-LoRA, full-model FedAvg", ""]
    for m in data["models"]:
        first, full, tg = m["runs"]["hfsl/none"], m["full_fedavg"], m["targets"]
        out.append(f"## {m['model']}: {m['describes']}")
        out.append("")
        out.append(f"{first['num_edges']} edges x {first['num_devices'] // first['num_edges']} devices, "
                   f"{first['local_steps']} local steps of batch {first['batch_size']} x {first['seq_len']} tokens, "
                   f"{first['model']['layers']} blocks x {first['model']['hidden']} hidden, LoRA r={first['peft_r']} "
                   f"(adapter {fmt_bytes(first['adapter_bytes_fp32'])} fp32). One round, all links, both directions.")
        out.append("")
        rows = []
        for key, p in m["runs"].items():
            b = p["bytes"]
            name = "HFSL" if p["scheme"] == "hfsl" else "FL-LoRA"
            codec = LABEL[p["codec"]] if p["scheme"] == "hfsl" else ("adapters fp32" if p["codec"] == "none"
                                                                      else "adapters bf16")
            rows.append([name, f"`{p['codec']}`: {codec}", fmt_bytes(b["end_edge_up"] + b["end_edge_down"]),
                         fmt_bytes(b["edge_cloud_up"] + b["edge_cloud_down"]), f"**{fmt_bytes(p['total'])}**",
                         f"{p['vs_fl_lora']:.2f}", _vs_full(p["vs_full_fedavg"]),
                         f"{p['train_loss']:.4f}" if p["measured"] else "predicted"])
        rows.append(["full-model FedAvg", "computed: 2 x model bytes per device", fmt_bytes(full["per_round_fp32"]),
                     "-", f"**{fmt_bytes(full['per_round_fp32'])}**",
                     f"{full['per_round_fp32'] / m['runs']['fl/none']['total']:.0f}", "1", "-"])
        out.append(md_table(["scheme", "links.codec", "end-edge", "edge-cloud", "total", "vs FL-LoRA",
                             "vs full FedAvg", "round-1 train loss"], rows, "llrrrrrr"))
        out.append("")
        out.append(f"Full-model FedAvg: {full['how']} = {fmt_bytes(full['per_round_fp32'])} per round "
                   f"({fmt_bytes(full['per_device_fp32'])} per device; in bf16 it would be half: "
                   f"{fmt_bytes(full['per_round_bf16'])}). Real positions on the wire: "
                   f"{tg['real_position_share']:.0%} of the padded rows (fp32 vs none).")
        c = tg["codec"]
        out.append(f"Targets with `{c}`: <= FL-LoRA: **{'met' if tg['hfsl_codec_le_fl_lora'] else 'NOT met'}** "
                   f"({m['runs'][f'hfsl/{c}']['vs_fl_lora']:.2f}x; vs FL-LoRA with bf16 adapters: "
                   f"{'met' if tg['hfsl_codec_le_fl_lora_bf16'] else 'not met'}); <= 1/{TARGET_FULL_RATIO} of full "
                   f"FedAvg: **{'met' if tg[f'hfsl_codec_le_full_over_{TARGET_FULL_RATIO}'] else 'NOT met'}** "
                   f"(1/{tg['full_over_hfsl_codec']:.0f} over all links; end-edge alone: "
                   f"1/{tg['end_edge_full_over_hfsl_codec']:.0f}).")
        out.append("")
        out.append(f"Device memory under HFSL: {fmt_count(first['device_memory']['params'])} parameters "
                   f"({fmt_bytes(first['device_memory']['param_bytes'])}) per device; under FL-LoRA "
                   f"{fmt_count(m['runs']['fl/none']['device_memory']['params'])}.")
        out.append("")
    out.append("Measured byte counts are `payload_nbytes` of the messages as sent (`metrics.jsonl` `bytes`): "
               "encoded activations count their int8/bf16 values, int8's per-token float32 scales and the int32 "
               "row lengths. Rows marked `predicted` (SmolLM2, to keep the run short) come from the shapes and the "
               "batches each device draws in round 1 (`predict`); every measured point equals its prediction to "
               f"the byte: {'yes' if data['all_predictions_exact'] else 'NO (see JSON)'}. Round times are of a "
               "shared 2-core machine and only say what a run costs.")
    out.append("")
    out.append(footer(data))
    return "\n".join(out)


if __name__ == "__main__":
    main()
