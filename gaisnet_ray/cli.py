"""The ``gaisnet`` command (also ``python -m gaisnet_ray``).

Exit codes: 0 success; 2 bad config or arguments, a Ray cluster that cannot be joined or lacks
the tier resources, or a run whose estimated peak memory does not fit (nothing was started); 1 the run (or a submitted job) failed; 130 interrupted
(Ctrl-C or SIGTERM; what was finished stays on disk).

Bad input found from names and small files alone (config keys and values, --out, model.path, cuts,
run folders) exits 2 before torch, transformers or Ray are imported: keep those imports inside the
functions that need them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import ConfigError, config_to_yaml, load_config


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join the existing Ray cluster at this GCS address (HOST:6379, or 'auto' on a "
                                     "cluster node) instead of starting a private local Ray; default: RAY_ADDRESS if "
                                     "set ('local' forces local dev mode)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="skip the up-front checks: that a cluster's nodes declare the tier resources the run asks "
                        "for (for clusters that start such nodes on demand), and that the run's estimated peak "
                        "memory fits the machine or the cluster's nodes")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gaisnet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the GaisNet fine-tuning cycle (default: local dev mode)")
    run.add_argument("config", nargs="?", help="YAML config; omitted: the embedded default")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.rounds=3 (repeatable)")
    run.add_argument("--out", help="run folder (default: run.out_dir or runs/<timestamp>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a run folder from its last completed round (after a crash or kill); "
                          "--set may change only training.rounds, run.*, serve.*, faults.*")
    run.add_argument("--serve", action="store_true",
                     help="also serve tiered inference (serve.* settings) while training, hot-swapping each new "
                          "knowledge version; keeps serving after the last round until Ctrl-C")
    _cluster_flags(run)

    srv = sub.add_parser("serve", help="serve a run folder's model and knowledge over HTTP (Ray Serve)")
    srv.add_argument("run_dir")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the run's config, e.g. --set serve.port=8080 (repeatable)")
    srv.add_argument("--host", help="bind address (same as --set serve.host=...)")
    srv.add_argument("--port", type=int, help="HTTP port (same as --set serve.port=...)")
    _cluster_flags(srv)

    sub_ = sub.add_parser("submit", help="submit a run as a Ray Job to a cluster's Jobs API and follow its logs")
    sub_.add_argument("config", nargs="?", help="YAML config; omitted: the embedded default")
    sub_.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable); validated here before anything is submitted")
    sub_.add_argument("--address", help="the cluster's dashboard (Jobs API) address, e.g. http://HOST:8265 "
                                        "(default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    sub_.add_argument("--out", help="run folder on the cluster's shared storage (a relative path is made absolute "
                                    "against the current directory; default: run.out_dir or runs/<timestamp>)")
    sub_.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    sub_.add_argument("--no-resource-check", action="store_true",
                      help="passed to the job's `gaisnet run` (see gaisnet run --help)")

    cfg = sub.add_parser("config", help="print the resolved config as YAML (validates it)")
    cfg.add_argument("config", nargs="?")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ins = sub.add_parser("inspect", help="summarize a run folder: rounds, eval, bytes, versions")
    ins.add_argument("run_dir")

    pl = sub.add_parser("plan", help="plan the round (cuts, clusters, bandwidth shares) and show its modeled "
                                     "delay, energy and device memory next to the alternatives; writes JSON")
    pl.add_argument("config", nargs="?", help="YAML config; omitted: the embedded default")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--out", default="plan.json", help="JSON file of the plans (default: plan.json)")

    st = sub.add_parser("study", help="run the case-study grid (schemes, pre-training, fine-tuning, non-IID, "
                                      "clustering, relay, knowledge format) with the in-process runtime; resumable")
    st.add_argument("config", nargs="?", help="YAML config every cell starts from; omitted: the embedded default")
    st.add_argument("--out", required=True, help="study folder: study.jsonl, study.png, cells/<key>/ (run "
                                                 "folders); run again to resume")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every cell (a cell's swept key still wins; repeatable)")
    st.add_argument("--only", nargs="+", action="extend", metavar="EFFECT",
                    help="run only these effects (schemes, pretraining, finetuning, noniid, clustering, relay, "
                         "knowledge)")
    st.add_argument("--list", action="store_true", help="print the cells, their keys and whether they are done; "
                                                       "run nothing")

    pa = sub.add_parser("privacy-audit", help="attack a run folder as a curious edge/cloud would and report what "
                                              "leaks next to exact match (writes RUN_DIR/privacy_audit.json)")
    pa.add_argument("run_dir")
    pa.add_argument("--examples", type=int, default=48, help="private training examples attacked (default 48)")
    pa.add_argument("--set", dest="overrides", action="append", default=[], metavar="privacy.KEY=VALUE",
                    help="audit as if the run had sent its hidden states under these privacy settings")
    pa.add_argument("--no-search", dest="search", action="store_false",
                    help="leave out the two search inversions (the slow attacks: hours at a deep cut without "
                         "noise); the learned inversions and membership still run")
    return p


def _inspect(run_dir: Path) -> int:
    """One JSON line per complete round; then what is damaged: a metrics tail that is not complete
    JSON (skipped, as ``--resume`` does) and knowledge versions that fail their content hash."""
    from .layout import ORPHANED_DIR, RunLayout
    from .runfolder import METRICS_NAME, RunFolderError, check_run_folder, split_metrics

    try:
        check_run_folder(run_dir)
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = RunLayout(run_dir)
    rows, tail = split_metrics(run_dir)
    for m in rows:
        try:
            print(json.dumps(_inspect_row(m)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            print(json.dumps({"round": m.get("round"), "unreadable": f"{type(e).__name__}: {e}"}))
    if tail:
        total = len(run.metrics.read_text(encoding="utf-8", errors="replace").splitlines())
        print(f"{METRICS_NAME}: skipped {len(tail)} line(s) from line {total - len(tail) + 1} on: not a complete "
              f"JSON record (a half-written line a killed driver left); `gaisnet run --resume` moves them to "
              f"{ORPHANED_DIR}/")
    _inspect_stores(run)
    return 0


def _inspect_row(m: dict) -> dict:
    ev = m.get("eval") or {}
    em = {d: round(v["exact_match"], 3) for d, v in ev.items()}
    loss = {d: round(v["loss"], 3) for d, v in ev.items()}
    row = {"round": m["round"], "version": m["version"], "train_loss": round(m["train_loss"], 4),
           "eval_loss": loss, "exact_match": em, "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"],
           "modeled_comm_s": round(m["modeled_comm_s"], 3), "wall_s": round(m["wall_s"], 2)}
    if m.get("relay"):
        rel = m["relay"]
        row["relay"] = {"policy": rel["policy"], "base_version": rel["base_version"],
                        **{f"cloud_loss_{k}": {d: round(v["loss"], 3) for d, v in rel[f"cloud_{k}"].items()}
                           for k in ("before", "after")}}
    return row


def _inspect_stores(run) -> None:
    """The knowledge versions, then a line per version (global, then each edge's, then each base)
    that fails its store's ``verify`` (weights that do not match the content hash their lineage
    recorded, a file missing or cut), the newest intact global version (the one serving falls back
    to), and the base versions."""
    from .knowledge import KnowledgeStore
    from .knowledge.bases import BaseStore

    knowledge = KnowledgeStore(run.knowledge)
    print(f"knowledge versions: {', '.join(knowledge.name(v) for v in knowledge.folder_versions()) or 'none'}")
    stores = [("", knowledge)]
    if run.edges.is_dir():
        stores += [(f"{p.relative_to(run.knowledge).as_posix()}/", KnowledgeStore(p))
                   for p in sorted(run.edges.iterdir()) if p.is_dir()]
    for prefix, store in stores:
        damaged = store.damaged()
        for v in sorted(damaged):
            print(f"damaged: {prefix}{damaged[v]}")
        if damaged and not prefix:
            newest = store.latest_intact()[0]
            print(f"newest intact version: {'none' if newest is None else store.name(newest)}")
    bases = BaseStore(run.bases)
    names = [bases.name(v) for v in bases.folder_versions()]
    if names:
        print(f"base versions: {', '.join(names)} ({run.model.name}/ = {names[-1]})")
    for _, why in sorted(bases.damaged().items()):
        print(f"damaged: {run.bases.relative_to(run.knowledge).as_posix()}/{why}")


def _serve(args) -> int:
    from .layout import RunLayout
    from .runfolder import RunFolderError, check_run_folder

    run_dir = Path(args.run_dir)
    try:
        check_run_folder(run_dir, serving=True)  # before Ray, Serve or torch are imported
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    try:
        cfg = load_config(RunLayout(run_dir).config, overrides)
        _check_api_keys(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .cluster import ClusterError, check_address

    try:
        check_address(args.address)  # a wrong or dead address fails before Serve and torch load
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .serve.app import serve_run_dir
    from .serve.errors import PortInUseError

    try:
        serve_run_dir(run_dir, cfg, address=args.address, check_resources=not args.no_resource_check)
    except (FileNotFoundError, PortInUseError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _submit(args, cfg) -> int:
    from .cluster.submit import SubmitError, submit_run
    from .runfolder import RunFolderError

    try:
        return submit_run(cfg, args.out, address=args.address, wait=not args.no_wait,
                          check_resources=not args.no_resource_check)
    except (RunFolderError, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _resume(args) -> int:
    from .runfolder import RunFolderError, check_resumable, resume_run_dir

    if args.config or args.out:
        print("error: --resume continues RUN_DIR with its own config.yaml; give no CONFIG or --out",
              file=sys.stderr)
        return 2
    try:
        check_resumable(Path(args.resume), args.overrides)  # names only, before Ray is imported
    except (ConfigError, RunFolderError) as e:
        return _refuse(e)
    from .cluster import ClusterError, check_address

    try:
        check_address(args.address)  # before the folder is touched
    except ClusterError as e:
        return _refuse(e)
    try:
        cfg, done = resume_run_dir(args.resume, args.overrides)
        if args.serve:
            _check_api_keys(cfg)
    except (ConfigError, RunFolderError) as e:
        return _refuse(e)
    print(f"resuming {args.resume} after round {done} of {cfg.training.rounds}", flush=True)
    return _run(args, cfg, args.resume, resume_round=done)


def _refuse(e: Exception) -> int:
    """Exit 2 with one line: ``config error: ...`` for a ConfigError, ``error: ...`` otherwise."""
    print(f"config error: {e}" if isinstance(e, ConfigError) else f"error: {e}", file=sys.stderr)
    return 2


def _run(args, cfg, out, resume_round: int | None = None) -> int:
    """``run_job``; what it finds wrong before any actor starts exits 2 with one line: a used folder
    or port, a cluster unreachable or short of tier resources or memory, a model that cannot be
    found or split, a cut that does not fit the model."""
    from .cluster import ClusterError
    from .hfsl.memory import InsufficientMemoryError
    from .run_command import run_job  # imported here: Ray and torch load only when a run starts
    from .models.cuts import UnknownModelFamilyError
    from .models.sources import ModelSourceError
    from .runfolder import RunFolderError
    from .serve.errors import PortInUseError

    try:
        run_dir = run_job(cfg, out, progress=False if args.no_progress else None, serve=args.serve,
                          resume_round=resume_round, address=args.address,
                          check_resources=not args.no_resource_check)
    except (RunFolderError, PortInUseError, ClusterError, InsufficientMemoryError, ModelSourceError,
            UnknownModelFamilyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


def _check_api_keys(cfg) -> None:
    """Read the API keys now (``serve.api_keys``, the key file, ``$GAISNET_API_KEYS``), so a missing
    key file or a malformed key is a one-line ConfigError before Ray starts, not after round 1."""
    from .serve.auth import resolve_api_keys

    resolve_api_keys(cfg.serve)


def _precheck(cfg, out, serve: bool = False) -> bool:
    """``precheck.check_run_input``: the --out folder, the model source and the cuts, before
    torch, transformers or Ray are imported. True (after one line on stderr) when they are wrong."""
    from .models.sources import ModelSourceError
    from .precheck import check_run_input
    from .runfolder import RunFolderError

    try:
        check_run_input(cfg, out)
        if serve:
            _check_api_keys(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return True
    except (RunFolderError, ModelSourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(Path(args.run_dir))
    if args.command == "privacy-audit":
        from .privacy.command import run_command

        return run_command(args)
    # `kill` and container runtimes send SIGTERM: unwind like Ctrl-C, so actors, Serve and a local
    # Ray started here are shut down and every finished round stays on disk
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _study(args) -> int:
    """``gaisnet study``: exit 2 (one line) for a bad --only or a cell config the config refuses,
    before any cell runs; 1 when a cell's run fails (every finished cell stays in study.jsonl)."""
    from .study import StudyError, list_study, run_study

    try:
        if args.list:
            return list_study(args.config, args.out, args.overrides, args.only)
        run_study(args.config, args.out, args.overrides, args.only)
    except ValueError as e:  # a ConfigError too: "config error: ..."
        return _refuse(e)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, NotADirectoryError, PermissionError) as e:  # --out a file, or not writable
        print(f"error: study folder '{args.out}' cannot be used: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def _main(args) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "study":
        return _study(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config_to_yaml(cfg), end="")
        return 0
    if args.command == "plan":
        from .planner.command import plan_command

        return plan_command(cfg, args.out)
    if args.command == "submit":
        return _submit(args, cfg)
    if args.command == "run" and args.resume:
        return _resume(args)
    if _precheck(cfg, args.out, serve=args.serve):
        return 2
    from .cluster import ClusterError, check_address

    try:
        check_address(args.address)  # a wrong or dead cluster address fails before torch loads
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(args, cfg, args.out)


if __name__ == "__main__":
    sys.exit(main())
