"""What secure aggregation (``privacy.secure_aggregation``) costs per edge and round: seconds and
bytes of the protocol at the tiny job's adapter size and at the real model's (SmolLM2-135M, LoRA
r = 8 on every projection of its 30 blocks), for an edge of 3 and of 10 devices, with and without
a dropout; and one tiny ``fl`` round in one process, plain vs secure.

The protocol's time does not depend on training: a device's extra work is its key exchange and
masking (one AES-CTR keystream per peer over the adapter), the edge's is unmasking (one keystream
per survivor, plus one per survivor for each dropped member). Bytes: the masked vector is int64
(twice a float32 adapter) plus one coordinate, the key exchange is O(n^2) small messages.

    python benchmarks/secagg_bench.py          # about 20 s on 2 cores

Writes benchmarks/results/secagg_bench.{json,md}.
"""

from __future__ import annotations

import tempfile
import time

import torch
from _common import envelope, fmt_bytes, footer, md_table, quiet, write_results

NAME = "secagg_bench"
# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 KV heads of 64, 30 blocks (its config.json)
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


def protocol(n: int, size: int, drop: int) -> dict:
    """One edge's protocol with ``n`` members on an adapter of ``size`` floats, ``drop`` of them
    dropping after the key exchange. Times: the slowest device's steps, the edge's unmasking."""
    from gaisnet_ray.hfsl.messages import LinkUsage, TurnResult
    from gaisnet_ray.privacy.secround import DeviceSecAgg, EdgeSecAgg, exchange_keys, reveal_sets

    devices = {f"d{i}": DeviceSecAgg(f"d{i}") for i in range(n)}
    edge: dict = {}
    t0 = time.perf_counter()

    def begin(offers, t):
        edge["x"] = EdgeSecAgg("edge-0", offers, t)
        return offers

    roster = exchange_keys(
        "edge-0", 1, list(devices),
        advertise=lambda asks: {d: devices[d].advertise(*a) for d, a in asks.items()},
        begin=begin, share=lambda rs: {d: devices[d].share(r) for d, r in rs.items()},
        route=lambda sealed: edge["x"].route(sealed),
        deliver=lambda boxes: [devices[d].receive(b) for d, b in boxes.items()])
    exchange_s = (time.perf_counter() - t0) / n  # per device (they run in parallel on real devices)
    gen = torch.Generator().manual_seed(0)
    reference = {"w": torch.zeros(size)}
    plain, masked, mask_s = [], {}, []
    survivors = list(devices)[: n - drop]
    for d in survivors:
        x = torch.randn(size, generator=gen) * 0.01
        plain.append(x)
        t0 = time.perf_counter()
        sealed = devices[d].seal(TurnResult(d, d, {"w": x}, 10, [], LinkUsage(bytes_up=4 * size), 0.0))
        mask_s.append(time.perf_counter() - t0)
        masked[d] = sealed.masked
    alive, gone = reveal_sets(roster, survivors)
    t0 = time.perf_counter()
    replies = [devices[d].reveal(alive, gone) for d in survivors]
    mean, info = edge["x"].mean(masked, replies, reference)
    unmask_s = time.perf_counter() - t0
    err = float((mean["w"] - torch.stack(plain).mean(0)).abs().max())
    return {"members": n, "adapter_floats": size, "dropped": drop, "device_exchange_s": round(exchange_s, 4),
            "device_mask_s": round(max(mask_s), 3), "edge_unmask_s": round(unmask_s, 3),
            "plain_up_bytes": 4 * size, "masked_up_bytes": info["masked_bytes"] // len(survivors),
            "key_exchange_bytes": info["key_exchange_bytes"], "unmask_bytes": info["unmask_bytes"],
            "max_abs_error": err}


def tiny_round(secure: bool, rounds: int = 2) -> float:
    """Seconds per round of the tiny job under ``fl`` (2 edges x 3 devices), in one process."""
    from gaisnet_ray.config import load_config
    from gaisnet_ray.inprocess import InProcessGaisNet
    from _common import TINY_YAML

    sets = ["training.scheme=fl", "topology.cluster_size=1", "training.pretrain_steps=0", "relay.policy=none",
            "data.eval_samples_per_domain=1", "training.eval_every=100", "run.progress=false",
            f"privacy.secure_aggregation={str(secure).lower()}"]
    with tempfile.TemporaryDirectory() as tmp:
        net = InProcessGaisNet(load_config(TINY_YAML, sets), tmp)
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            net.run_round(r)
        return (time.perf_counter() - t0) / rounds


def main() -> None:
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    from gaisnet_ray.models.geometry import ModelGeometry

    real = ModelGeometry.from_config(SMOLLM2)
    real_size = real.lora_params_per_block(8, None) * real.num_layers
    tiny_size = 28_672  # the tiny job's adapter (gpt2 tiny, r = 8): what test_secagg_round masks
    rows = [protocol(n, size, drop) for size in (tiny_size, real_size) for n in (3, 10) for drop in (0, 1)]
    plain_s, secure_s = tiny_round(False), tiny_round(True)
    table = md_table(
        ["adapter floats", "members", "dropped", "device: key exchange s", "device: mask s", "edge: unmask s",
         "up per device (plain → masked)", "key exchange bytes (edge)", "reveal bytes", "max |error|"],
        [[r["adapter_floats"], r["members"], r["dropped"], r["device_exchange_s"], r["device_mask_s"],
          r["edge_unmask_s"], f"{fmt_bytes(r['plain_up_bytes'])} → {fmt_bytes(r['masked_up_bytes'])}",
          fmt_bytes(r["key_exchange_bytes"]), fmt_bytes(r["unmask_bytes"]), f"{r['max_abs_error']:.1e}"]
         for r in rows])
    table += (f"\n\nTiny job under `fl`, 2 edges x 3 devices, one process: {plain_s:.2f} s per round plain, "
              f"{secure_s:.2f} s with secure aggregation.\n")
    data = {**envelope(NAME, {"real_adapter_floats": real_size}), "protocol": rows,
            "tiny_round_s": {"plain": plain_s, "secure": secure_s}, "wall_s": time.perf_counter() - started}
    write_results(NAME, data, table + footer(data))
    print(table)


if __name__ == "__main__":
    main()
