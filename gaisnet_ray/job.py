"""``gaisnet run``: the whole GaisNet fine-tuning cycle, from config to a finished run folder."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from .cluster import connect
from .config import Config
from .driver import GaisNetDriver
from .report import write_report
from .runfolder import append_metrics, prepare_run_dir, write_summary


def _postfix(m: dict) -> dict:
    out = {"loss": f"{m['train_loss']:.3f}"}
    if m.get("eval"):
        ev = m["eval"].values()
        out["eval_loss"] = f"{sum(e['loss'] for e in ev) / len(ev):.3f}"
        out["em"] = f"{sum(e['exact_match'] for e in ev) / len(ev):.2f}"
    return out


def run_job(cfg: Config, out: str | Path | None = None, progress: bool | None = None, serve: bool = False) -> Path:
    """Run ``cfg.training.rounds`` rounds on Ray and write the run folder; returns its path.

    Every finished round is on disk (metrics line, knowledge version) before the next starts.
    With ``serve``, the tiered inference app (``cfg.serve``) comes up as soon as the first knowledge
    version is published, picks up each new version while training goes on (hot swap), and keeps
    serving the final one after the last round until Ctrl-C or SIGTERM.
    """
    if serve:
        from .serve.errors import check_port_free

        check_port_free(cfg.serve.host, cfg.serve.port)  # before any work, not after pre-training
    run_dir = prepare_run_dir(cfg, out)
    show = cfg.run.progress if progress is None else progress
    started = time.perf_counter()
    with connect(cfg, training=True, serving=serve) as cluster:
        driver = GaisNetDriver(cfg, run_dir)
        serving = None
        try:
            try:
                driver.start()
                if serve:
                    serving = _start_serving(run_dir, cfg)
                bar = tqdm(range(1, cfg.training.rounds + 1), desc="HFSL rounds" if cfg.training.scheme == "hfsl"
                           else f"{cfg.training.scheme.upper()} rounds", unit="round", disable=not show)
                last = {}
                for r in bar:
                    last = driver.run_round(r)
                    append_metrics(run_dir, last)
                    bar.set_postfix(_postfix(last))
            finally:
                driver.close()
            write_report(run_dir, driver.initial_eval)
            write_summary(run_dir, {
                "rounds": cfg.training.rounds,
                "scheme": cfg.training.scheme,
                "cluster": cluster.mode,
                "eval_initial": driver.initial_eval,
                "eval_final": last.get("eval"),
                "final_version": last.get("version"),
                "wall_s": time.perf_counter() - started,
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


def _start_serving(run_dir: Path, cfg: Config):
    from .serve.app import announce, start_serving  # Serve loads only when asked for

    handle = start_serving(run_dir, cfg.serve)
    announce(run_dir, handle)
    return handle
