"""``gaisnet run``: the whole GaisNet fine-tuning cycle, from config to a finished run folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .cluster import connect, joins_cluster
from .cluster.preflight import check_cluster_memory
from .config import Config
from .driver import GaisNetDriver
from .cluster.worker_logs import worker_output_in_log
from .hfsl.memory import check_fits
from .logs import RunLog, events, report_round
from .schemes import scheme_of
from .layout import RunLayout
from .tiers import on_cluster
from .runfolder import (
    append_metrics,
    prepare_run_dir,
    read_metrics,
    usable_run_dir,
    write_summary,
)


def _postfix(m: dict) -> dict:
    """Training loss, mean held-out loss, and exact match per domain (base + the round's knowledge)."""
    out = {"loss": f"{m['train_loss']:.3f}"}
    if m.get("eval"):
        ev = m["eval"]
        out["eval_loss"] = f"{sum(e['loss'] for e in ev.values()) / len(ev):.3f}"
        out["em"] = " ".join(f"{d}={e['exact_match']:.2f}" for d, e in ev.items())
    return out


def check_model(cfg: Config, convert: bool = True) -> dict:
    """Before Ray starts: the model source resolves (``convert``: a GGUF is converted into the cache
    here, once, so the cloud actor loads the cached folder) and every device's cut leaves the edge at
    least one block of the model. Returns the model's config dict. Raises ``ModelSourceError``,
    ``UnknownModelFamilyError`` or ``ConfigError`` naming the key."""
    from .models.sources import model_config_dict, num_blocks, resolve_model_dir
    from .precheck import check_cuts

    if convert:
        resolve_model_dir(cfg.model)
    model_config = model_config_dict(cfg.model)
    check_cuts(cfg, num_blocks(model_config))
    return model_config


def _plan(cfg: Config, model_config: dict, resumed_dir: Path | None):
    """``planner.runtime.prepare_run``: (the config with the plan's cuts, the run plan or None)."""
    from .planner.command import sample_counts
    from .planner.runtime import prepare_run

    return prepare_run(cfg, model_config, sample_counts(cfg), run_dir=resumed_dir)


def run_job(cfg: Config, out: str | Path | None = None, progress: bool | None = None, serve: bool = False,
            resume_round: int | None = None, address: str | None = None, check_resources: bool = True) -> Path:
    """``_run_job`` with the run's logging (``logs.RunLog``): the console gets the progress bar, the
    event lines and warnings about the run; everything else goes to the run folder's log file."""
    with RunLog() as run_log:
        return _run_job(cfg, out, progress, serve, resume_round, address, check_resources, run_log)


def _run_job(cfg: Config, out: str | Path | None, progress: bool | None, serve: bool, resume_round: int | None,
             address: str | None, check_resources: bool, run_log: RunLog) -> Path:
    """Run ``cfg.training.rounds`` rounds on Ray and write the run folder; returns its path.

    Every finished round is on disk (metrics line, knowledge version) before the next starts.
    With ``serve``, the tiered inference app (``cfg.serve``) comes up as soon as the first knowledge
    version is published, picks up each new version while training goes on (hot swap), and keeps
    serving the final one after the last round until Ctrl-C or SIGTERM.
    ``resume_round``: ``out`` is a run folder whose rounds 1..resume_round are complete
    (``runfolder.resume_run_dir`` got it ready); the run continues with the next round.
    ``address`` (default ``RAY_ADDRESS``) joins an existing Ray cluster instead of starting a local
    one (``cluster.connect``; ``check_resources``: fail at once if its nodes lack the tier resources
    the run asks for). The run folder path is then made absolute: the cloud actor writes into it on
    its own node, so it must be the same path, on shared storage, there.
    """
    cluster_mode = joins_cluster(address)
    if cluster_mode:  # each device is a machine there: one actor each, whatever this host's CPUs
        cfg = on_cluster(cfg)
    if cluster_mode and cfg.planner.emulate:
        print("warning: planner.emulate is on while joining a cluster: real devices will be slowed to their "
              "profiles' speed too (emulation is meant for local dev mode)", file=sys.stderr)
    if serve and not cluster_mode:  # on a cluster the Serve proxies bind on the cluster's nodes
        from .serve.errors import check_port_free

        check_port_free(cfg.serve.host, cfg.serve.port)  # before any work, not after pre-training
    # a taken folder is refused before Ray starts; it is created once Ray (or the cluster) is usable
    run_dir = usable_run_dir(cfg, out) if resume_round is None else Path(out)
    if cluster_mode:
        run_dir = run_dir.absolute()
    show = cfg.run.progress if progress is None else progress
    started, t_job = time.perf_counter(), time.time()
    model_config = check_model(cfg, convert=not cluster_mode)
    if check_resources and not cluster_mode:  # a run this machine's memory cannot hold: refused before Ray starts
        check_fits(cfg, model_config=model_config)
    # the round plan (topology.planner); a plan other than `fixed` changes the cuts, so what devices hold
    planned = _plan(cfg, model_config, run_dir if resume_round is not None else None)
    user_cfg, cfg = cfg, planned[0]  # config.yaml keeps what the user asked for; plan.json the plan
    if check_resources and not cluster_mode and cfg is not user_cfg:
        check_fits(cfg, model_config=model_config)
    with connect(cfg, training=True, serving=serve, address=address, check_resources=check_resources) as cluster, \
            worker_output_in_log():  # the actors' output: into the log file, not onto the console
        ray_up_s = time.time() - t_job
        if check_resources and cluster.mode == "cluster":  # the same for the cluster's nodes
            check_cluster_memory(cfg, model_config=model_config)
        if resume_round is None:
            prepare_run_dir(user_cfg, run_dir)
        log_file = run_log.attach(run_dir)
        events.info(f"run folder: {run_dir} (library and actor output: {RunLayout(run_dir).rel(log_file)})")
        driver = GaisNetDriver(cfg, run_dir, planned=planned, serving=serve)
        serving = None
        try:
            try:
                driver.start(resume_round)
                startup = _startup_timeline(driver, t_job, ray_up_s)
                initial_eval = _initial_eval(run_dir, driver.initial_eval, resume_round)
                if serve:
                    serving = _start_serving(run_dir, cfg, shared=cluster.mode == "cluster")
                first = (resume_round or 0) + 1
                bar = tqdm(range(first, cfg.training.rounds + 1), initial=first - 1, total=cfg.training.rounds,
                           desc=scheme_of(cfg).label, unit="round", disable=not show)
                done = read_metrics(run_dir)
                last = done[-1] if done else {}
                for r in bar:
                    last = driver.run_round(r)
                    append_metrics(run_dir, last)
                    bar.set_postfix(_postfix(last))
                    report_round(last, cfg.training.rounds)
            finally:
                driver.close()
            from .report import write_report  # matplotlib: only once the rounds are done

            write_report(run_dir, initial_eval)
            write_summary(run_dir, {
                "rounds": cfg.training.rounds,
                "scheme": cfg.training.scheme,
                **({"privacy_note": note} if (note := scheme_of(cfg).privacy_note) else {}),
                "cluster": cluster.mode,
                "eval_initial": initial_eval,
                "resumed_after_round": resume_round,
                "eval_final": last.get("eval"),
                "final_version": last.get("version"),
                "wall_s": time.perf_counter() - started,
                "startup": startup,
            })
            if serving is not None:
                from .serve.app import wait_for_interrupt

                print(f"training finished (run folder: {run_dir}); serving version {last.get('version')} "
                      f"until Ctrl-C", flush=True)
                wait_for_interrupt()
        finally:
            if serving is not None:
                serving.shutdown()
    return run_dir


def _startup_timeline(driver: GaisNetDriver, t_job: float, ray_up_s: float) -> dict:
    """Where the time before round 1 went, in seconds after the job began (``job_began_at``, epoch
    s: the command's imports before it; config, model and memory checks after): Ray up, the driver
    placing the actors, each actor's worker process started and ready (its boot, imports and
    constructor between), everyone ready, the initial evaluation done (= round 1 may begin)."""
    shift = driver.startup.get("began_at", t_job) - t_job
    at = lambda x: None if x is None else round(x + shift, 3)  # noqa: E731
    actors = {name: {k: at(v) for k, v in a.items()} for name, a in driver.startup.get("actors", {}).items()}
    return {"job_began_at": t_job, "ray_up_s": round(ray_up_s, 3), "placing_s": round(shift, 3),
            "all_ready_s": at(driver.startup.get("all_ready_s")),
            "initial_eval_done_s": at(driver.startup.get("initial_eval_done_s")), "actors": actors}


def _initial_eval(run_dir: Path, measured: dict | None, resume_round: int | None) -> dict | None:
    """The eval before round 1: measured now on a fresh run (and kept), read back on a resumed one."""
    path = RunLayout(run_dir).initial_eval
    if resume_round is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(measured) + "\n")
        return measured
    return json.loads(path.read_text()) if path.is_file() else None


def _start_serving(run_dir: Path, cfg: Config, shared: bool = False):
    from .serve.app import announce, start_serving  # Serve loads only when asked for
    from .tiers import tier_labels

    handle = start_serving(run_dir, cfg.serve, shared_cluster=shared, node_labels=tier_labels(cfg.topology))
    announce(run_dir, handle)
    return handle
