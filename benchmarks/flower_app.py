"""Flower's side of ``benchmarks/vs_flower.py``: the FL-LoRA job of ``gaisnet run`` with
``training.scheme=fl relay.policy=none``, as a Flower simulation (``flwr.simulation.run_simulation``).

It runs in Flower's own virtualenv (Flower pins another Ray than gaisnet-ray), which vs_flower.py
creates; gaisnet_ray's Ray-free core is on that venv's path through a ``.pth`` file, so the job is
the same code, not a re-implementation of it:

- the server builds and pre-trains the foundation with ``hfsl.cloud.CloudCore`` (what gaisnet-ray's
  cloud actor runs), writes it to ``<out>/model`` as the cloud does, and evaluates every round with
  ``CloudCore.evaluate`` (held-out loss and greedy exact match per domain), also before round 1;
- Flower's ``FedAvg`` (Message API) averages the LoRA tensors weighted by each client's examples,
  which equals gaisnet-ray's two-level average (devices in an edge, then edges) up to float rounding;
- each of the 6 clients is one logical device (partition-id i = the i-th device of the topology),
  a ``hfsl.device.DeviceTrainer`` over the saved foundation, with its own private examples, batch
  order and seed; it trains ``training.local_steps`` steps from the global adapter per round, with
  one torch thread (``run.torch_threads``), and is kept per Flower actor process between rounds.

Flower's Ray backend sizes its actor pool by ``client_resources.num_cpus``: one CPU per client
(what one torch thread uses), so a 2-core host runs 2 client processes.

    <flower-venv>/bin/python benchmarks/flower_app.py --config examples/tiny.yaml --out DIR --events FILE

Writes ``FILE``: JSON lines with wall-clock stamps (``start``, ``round_start``, ``eval``), read by
vs_flower.py. Not meant to be run from the project's own environment.
"""

from __future__ import annotations

import time

_T0 = time.time()  # before any import: the process's own start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ENV = "GAISNET_VS_FLOWER"  # the job's arguments, as JSON, for Flower's actor processes


def _mark(kind: str, **fields) -> None:
    path = json.loads(os.environ[ENV])["events"]
    with open(path, "a") as f:
        f.write(json.dumps({"kind": kind, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def _config():
    from gaisnet_ray.config import load_config

    args = json.loads(os.environ[ENV])
    return load_config(args["config"], args["overrides"])


def _devices(cfg) -> list[str]:
    from gaisnet_ray.schemes.topology import devices_by_edge

    return [d for ds in devices_by_edge(cfg.topology).values() for d in ds]


# ------------------------------------------------------------------------------------ client side
_CLIENT: dict = {}  # per Flower actor process: the config, the foundation, one trainer per device


def _trainer(device: str):
    """This process's ``DeviceTrainer`` for ``device``: the saved foundation, loaded once per
    process, and the device's own examples (derived from the data config, as on gaisnet-ray)."""
    if device not in _CLIENT:
        import torch

        from gaisnet_ray.hfsl.factory import device_trainer
        from gaisnet_ray.models.build import FoundationPackage, load_foundation

        if "package" not in _CLIENT:
            cfg = _config()
            torch.set_num_threads(cfg.run.torch_threads)
            model_dir = os.path.join(json.loads(os.environ[ENV])["out"], "model")
            model, tokenizer = load_foundation(model_dir, cfg.model.attn_implementation)
            _CLIENT.update(cfg=cfg, package=FoundationPackage.from_model(model, tokenizer, copy=False))
        _CLIENT[device] = device_trainer(_CLIENT["cfg"], device, _CLIENT["package"])
    return _CLIENT[device]


def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = _CLIENT.get("cfg") or _config()
        device = _devices(cfg)[int(context.node_config["partition-id"])]
        trainer = _trainer(device)
        from gaisnet_ray.schemes import scheme_of

        adapter = msg.content["arrays"].to_torch_state_dict()
        rnd = int(msg.content["config"]["server-round"])
        result = trainer.train_turn(adapter, None, device, scheme_of(cfg).turn_steps(cfg), rnd)
        metrics = MetricRecord({"num-examples": result.num_samples,
                                "train_loss": sum(result.losses) / len(result.losses)})
        return Message(RecordDict({"arrays": ArrayRecord(result.adapter), "metrics": metrics}), reply_to=msg)

    return app


# ------------------------------------------------------------------------------------ server side
def make_server_app():
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch

        from gaisnet_ray.hfsl.cloud import CloudCore
        from gaisnet_ray.models.adapters import load_adapter_state

        cfg = _config()
        torch.set_num_threads(cfg.run.torch_threads)  # as gaisnet-ray's cloud actor (topology.cloud)
        out = json.loads(os.environ[ENV])["out"]
        cloud = CloudCore(cfg, out)  # foundation + pre-training on public data, saved to out/model
        initial = cloud.initial_knowledge()
        n = len(_devices(cfg))

        def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            load_adapter_state(cloud.peft, arrays.to_torch_state_dict(), strict=True)
            ev = cloud.evaluate()
            _mark("eval", round=rnd, eval=ev)
            if rnd < cfg.training.rounds:
                _mark("round_start", round=rnd + 1)
            return MetricRecord({f"{d}_loss": v["loss"] for d, v in ev.items()})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.training.rounds,
                       evaluate_fn=evaluate_fn)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True, help="run folder (the foundation is saved to OUT/model)")
    ap.add_argument("--events", required=True, help="JSON-lines file of timestamps")
    ap.add_argument("--client-cpus", type=float, default=1.0, help="Flower client_resources.num_cpus")
    args = ap.parse_args()
    os.environ[ENV] = json.dumps({"config": os.path.abspath(args.config), "overrides": args.overrides,
                                  "out": os.path.abspath(args.out), "events": os.path.abspath(args.events)})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # Flower's actors get this process's sys.path as PYTHONPATH
        sys.path.insert(0, here)
    _mark("start", t0=_T0)
    import flower_app  # the actors unpickle the apps' functions from this module, by name
    from flwr.simulation import run_simulation

    cfg = _config()
    run_simulation(server_app=flower_app.make_server_app(), client_app=flower_app.make_client_app(),
                   num_supernodes=len(_devices(cfg)),
                   backend_config={"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "address": "local"}})
    _mark("end")


if __name__ == "__main__":
    main()
