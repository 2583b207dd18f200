"""The same federated LoRA job on gaisnet-ray and on Flower's simulation engine, side by side.

gaisnet-ray: ``gaisnet run CONFIG --set training.scheme=fl --set relay.policy=none`` (6 devices,
FedAvg of the LoRA tensors per edge and then over the edges). Flower: ``benchmarks/flower_app.py``
in Flower's own virtualenv (Flower pins another Ray), whose server pre-trains the same foundation
with gaisnet_ray's ``CloudCore`` and whose 6 clients are gaisnet_ray ``DeviceTrainer``s: the same
model, partitions, batches, steps, seeds and one torch thread per client, averaged by Flower's
``FedAvg``. Beside them, HFSL on gaisnet-ray (``training.scheme=hfsl``, same job otherwise).

Runs alternate (gaisnet-ray FL, Flower, gaisnet-ray HFSL, then again), each a fresh process whose
whole process tree (Ray's GCS, raylet and every worker included) is sampled from /proc for peak
RSS (sum over the tree) and peak PSS (shared pages split among the processes that map them).
Reported per side: wall time from command to exit, time until round 1 begins and until it ends,
the steady round (median of rounds 2..N), peak RSS/PSS, and the final held-out loss per domain,
which must match between gaisnet-ray FL and Flower (``--tolerance``, default 1e-4; exit 1 if not).

    python benchmarks/vs_flower.py                  # 2 alternations, tiny preset, ~6 min on an idle 2-core host
    python benchmarks/vs_flower.py --repeats 1 --append   # one more alternation, merged into the results

The Flower virtualenv is created on first use (``--venv``, default ~/.cache/gaisnet-ray/flower-venv):
``pip install torch==<ours>`` first (a CPU wheel where ours is one), then ``flwr[simulation]==1.42.0``
with transformers and peft at our versions, torch held by a constraint; a ``.pth`` file puts this
checkout on its path. Writes benchmarks/results/vs_flower.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

from _common import REPO, RESULTS, TINY_YAML, descendants, envelope, footer, md_table, write_results

NAME = "vs_flower"
FLWR = "1.42.0"
DEFAULT_VENV = Path.home() / ".cache" / "gaisnet-ray" / "flower-venv"
JOB = ["training.scheme=fl", "relay.policy=none", "run.progress=false"]


# ------------------------------------------------------------------------------ Flower's venv
def ensure_flower_venv(venv: Path) -> Path:
    """Flower's virtualenv (created once); returns its python. torch is installed first and pinned,
    so no other (CUDA) build is pulled in by flwr, transformers or peft."""
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating Flower's virtualenv in {venv} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch_v = version("torch").split("+")[0]
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={torch_v}"], check=True)
        constraint = venv / "constraints.txt"
        constraint.write_text(f"torch=={torch_v}\n")
        subprocess.run(pip + ["-c", str(constraint), f"flwr[simulation]=={FLWR}", f"transformers=={version('transformers')}",
                              f"peft=={version('peft')}", f"pydantic>={version('pydantic')}", "pyyaml", "safetensors",
                              "tokenizers", "tqdm", "cryptography"], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "gaisnet_ray_core.pth").write_text(str(REPO) + "\n")  # this checkout's Ray-free core
    return py


# ------------------------------------------------------------------------- process-tree memory
def _name(pid: int) -> str:
    """A short name for a process: Ray's title for its workers (ray::EndNode), else the command."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::") or len(args) < 2:
        return first[:40]
    return " ".join(os.path.basename(a.decode(errors="replace")) for a in args[:3])[:60]


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB, from smaps_rollup (0, 0 if it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the whole process tree below ``pid`` every ``interval`` s: peak summed RSS and PSS."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_pss_kb = self.max_processes = 0
        self.at_peak: list = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = [self.pid, *descendants(self.pid)]
            mem = [_mem_kb(p) for p in pids]
            if sum(m[0] for m in mem) > self.peak_rss_kb:  # what the tree held at its peak, process by process
                self.peak_rss_kb = sum(m[0] for m in mem)
                self.at_peak = sorted(((_name(p), m[0] // 1024) for p, m in zip(pids, mem) if m[0]), key=lambda x: -x[1])
            self.peak_pss_kb = max(self.peak_pss_kb, sum(m[1] for m in mem))
            self.max_processes = max(self.max_processes, sum(1 for m in mem if m[0]))
            self.stop.wait(self.interval)


def run_measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``cmd`` as a new process (own process group), sampling its tree; wall from spawn to exit."""
    t_spawn = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        finally:
            sampler.stop.set()
            sampler.join()
    return {"rc": rc, "t_spawn": t_spawn, "wall_s": time.time() - t_spawn, "peak_rss_mb": sampler.peak_rss_kb / 1024,
            "peak_pss_mb": sampler.peak_pss_kb / 1024, "max_processes": sampler.max_processes,
            "rss_mb_at_peak": sampler.at_peak, "log": str(log)}


# --------------------------------------------------------------------------------- the sides
def _losses(ev: dict) -> dict[str, float]:
    return {d: v["loss"] for d, v in ev.items()}


def run_gaisnet(config: str, scheme: str, overrides: list[str], work: Path, tag: str) -> dict:
    from gaisnet_ray.layout import RunLayout

    out = work / tag
    sets = [x for kv in [f"training.scheme={scheme}", *JOB[1:], *overrides] for x in ("--set", kv)]
    cmd = [str(Path(sys.executable).parent / "gaisnet"), "run", config, *sets, "--out", str(out)]
    res = run_measured(cmd, work / f"{tag}.log")
    if res["rc"] != 0:
        raise RuntimeError(f"gaisnet run failed (rc {res['rc']}): see {res['log']}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    r1_start = RunLayout(out).initial_eval.stat().st_mtime - res["t_spawn"]  # written just before round 1
    res.update(side=f"gaisnet-ray {scheme}", round1_start_s=r1_start, round1_end_s=r1_start + rows[0]["wall_s"],
               round_s=[r["wall_s"] for r in rows], final_loss=_losses(rows[-1]["eval"]),
               bytes_per_round=rows[-1]["bytes"], bytes_up_down=rows[-1]["bytes_up"] + rows[-1]["bytes_down"],
               peak_rss_mb_by_actor=rows[-1].get("peak_rss_mb"), startup=startup_phases(out, res["t_spawn"]))
    return res


def startup_phases(run_dir: Path, t_spawn: float) -> dict | None:
    """run.json's start-up timeline as seconds after the command was spawned: the command's own
    imports, Ray up, the cloud ready (foundation built and pre-trained), the last other actor ready,
    the initial evaluation done (round 1 begins)."""
    st = json.loads((run_dir / "run.json").read_text()).get("startup")
    if not st:
        return None
    job = st["job_began_at"] - t_spawn
    actors = st["actors"]
    others = [a for n, a in actors.items() if n != "cloud"]
    return {"command_imports_s": job, "ray_up_s": job + st["ray_up_s"],
            "cloud_ready_s": job + actors["cloud"]["ready_s"],
            "first_other_process_s": job + min(a["process_start_s"] for a in others),
            "last_other_ready_s": job + max(a["ready_s"] for a in others),
            "initial_eval_done_s": job + st["initial_eval_done_s"], "actors": len(actors)}


def run_flower(py: Path, config: str, overrides: list[str], work: Path, tag: str, client_cpus: float) -> dict:
    events = work / f"{tag}.events.jsonl"
    sets = [x for kv in [*JOB, *overrides] for x in ("--set", kv)]
    cmd = [str(py), str(REPO / "benchmarks" / "flower_app.py"), "--config", config, *sets, "--out",
           str(work / tag), "--events", str(events), "--client-cpus", str(client_cpus)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    res = run_measured(cmd, work / f"{tag}.log", env=env)
    if res["rc"] != 0:
        raise RuntimeError(f"Flower run failed (rc {res['rc']}): see {res['log']}")
    ev = [json.loads(x) for x in events.read_text().splitlines() if x.strip()]
    evals = {e["round"]: e for e in ev if e["kind"] == "eval"}
    n = max(evals)
    res.update(side="Flower", round1_start_s=evals[0]["t"] - res["t_spawn"],
               round1_end_s=evals[1]["t"] - res["t_spawn"],
               round_s=[evals[r]["t"] - evals[r - 1]["t"] for r in range(1, n + 1)],
               final_loss=_losses(evals[n]["eval"]))
    return res


# ---------------------------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict:
    out = {}
    for side in dict.fromkeys(r["side"] for r in runs):
        rs = [r for r in runs if r["side"] == side]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        out[side] = {"runs": len(rs), "wall_min_s": min(r["wall_s"] for r in rs), "wall_median_s": med("wall_s"),
                     "round1_start_s": med("round1_start_s"), "round1_end_s": med("round1_end_s"),
                     "steady_round_s": statistics.median(x for r in rs for x in r["round_s"][1:]),
                     "peak_rss_mb": med("peak_rss_mb"), "peak_pss_mb": med("peak_pss_mb"),
                     "max_processes": max(r["max_processes"] for r in rs), "final_loss": rs[-1]["final_loss"]}
    return out


def loss_match(runs: list[dict], tolerance: float) -> dict:
    fl = [r["final_loss"] for r in runs if r["side"] == "gaisnet-ray fl"]
    fw = [r["final_loss"] for r in runs if r["side"] == "Flower"]
    diffs = {d: max(abs(a[d] - b[d]) for a in fl for b in fw) for d in fl[0]} if fl and fw else {}
    return {"max_abs_diff": diffs, "tolerance": tolerance, "match": bool(diffs) and max(diffs.values()) <= tolerance}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the sides (default 2)")
    ap.add_argument("--config", default=str(TINY_YAML), help="job config (default: the tiny job, examples/tiny.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every side, as `gaisnet run --set` (repeatable)")
    ap.add_argument("--gaisnet-set", dest="gaisnet_overrides", action="append", default=None, metavar="KEY=VALUE",
                    help="override for the gaisnet-ray sides only (repeatable; default: topology.end_workers=auto, the "
                         "pool the README's headline numbers use; pass topology.end_workers=null for one actor per device)")
    ap.add_argument("--sides", nargs="+", default=["fl", "flower", "hfsl"], choices=["fl", "flower", "hfsl"])
    ap.add_argument("--hfsl-every", type=int, default=2, help="run HFSL in every k-th alternation (default 2: the first only of 2)")
    ap.add_argument("--client-cpus", type=float, default=1.0, help="Flower's client_resources.num_cpus (default 1)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"Flower's virtualenv (default {DEFAULT_VENV})")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="final held-out loss: max |FL - Flower| per domain")
    ap.add_argument("--append", action="store_true", help="merge with the runs in results/vs_flower.json")
    ap.add_argument("--tag", default=None, help="write results/vs_flower-TAG.{json,md} instead")
    args = ap.parse_args()

    if args.gaisnet_overrides is None:  # not argparse's default=[...]: `append` would add to it instead of replacing it
        args.gaisnet_overrides = ["topology.end_workers=auto"]
    name = NAME + (f"-{args.tag}" if args.tag else "")
    py = ensure_flower_venv(args.venv) if "flower" in args.sides else None
    data = envelope(NAME, {k: str(v) for k, v in vars(args).items()})
    data["gaisnet_overrides"] = args.gaisnet_overrides
    data["flower_versions"] = json.loads(subprocess.run(
        [str(py), "-c", "import json; from importlib.metadata import version as v; print(json.dumps({p: v(p) for p in "
         "('flwr', 'ray', 'torch', 'transformers', 'peft')}))"], check=True, capture_output=True, text=True).stdout) if py else {}
    runs = json.loads((RESULTS / f"{name}.json").read_text())["runs"] if args.append else []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            for side in args.sides:
                tag = f"{side}-{len(runs)}"
                if side == "hfsl" and i % args.hfsl_every:
                    continue
                print(f"[{i + 1}/{args.repeats}] {side} ...", flush=True)
                r = (run_flower(py, args.config, args.overrides, work, tag, args.client_cpus) if side == "flower"
                     else run_gaisnet(args.config, side, args.overrides + args.gaisnet_overrides, work, tag))
                r.update(alternation=i, loadavg=list(os.getloadavg()))
                runs.append(r)
                print(f"    wall {r['wall_s']:.1f} s, round 1 begins {r['round1_start_s']:.1f} s, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB, final loss {r['final_loss']}", flush=True)
    data.update(runs=runs, summary=summarize(runs), loss_match=loss_match(runs, args.tolerance),
                wall_s=time.perf_counter() - started)
    write_results(name, data, render(data))
    if "fl" in args.sides and "flower" in args.sides and not data["loss_match"]["match"]:
        print(f"\n!!! final held-out losses differ beyond {args.tolerance}: {data['loss_match']} !!!", file=sys.stderr)
        sys.exit(1)


def render(data: dict) -> str:
    s = data["summary"]
    g, f, h = s.get("gaisnet-ray fl"), s.get("Flower"), s.get("gaisnet-ray hfsl")
    out = ["# The same FL-LoRA job on gaisnet-ray and on Flower", ""]
    fv = data.get("flower_versions") or {}
    flower = (f"Flower {fv.get('flwr')} simulation (Ray {fv.get('ray')}) of the same job with gaisnet_ray's model, "
              "data and trainer (benchmarks/flower_app.py)" if f else "Flower not run in this invocation (`--sides`)")
    runs = ", ".join(f"{k} {v['runs']}" for k, v in s.items())
    out.append(f"`gaisnet run examples/tiny.yaml --set training.scheme=fl --set relay.policy=none` (6 devices, 2 "
               f"edges, 5 rounds) vs {flower}; gaisnet-ray overrides: "
               f"{', '.join(data.get('gaisnet_overrides') or []) or 'none (default topology: one actor per device)'}; "
               f"runs alternating, medians over the runs of each side ({runs}). "
               + ("HFSL on gaisnet-ray beside them (same job, training.scheme=hfsl)." if h else ""))
    out.append("")

    def row(label, key, fmt, ratio=True):
        cells = [label] + [fmt(x[key]) if x else "-" for x in (g, f)]
        cells.append(f"{g[key] / f[key]:.2f}" if ratio and g and f and f[key] else "-")
        cells.append(fmt(h[key]) if h else "-")
        return cells

    sec = lambda x: f"{x:.1f} s"  # noqa: E731
    rows = [
        [*row("wall time, command to exit (min / median)", "wall_median_s", sec)[:1],
         f"{g['wall_min_s']:.1f} / {g['wall_median_s']:.1f} s" if g else "-",
         f"{f['wall_min_s']:.1f} / {f['wall_median_s']:.1f} s" if f else "-",
         f"{g['wall_min_s'] / f['wall_min_s']:.2f} / {g['wall_median_s'] / f['wall_median_s']:.2f}" if g and f else "-",
         f"{h['wall_min_s']:.1f} / {h['wall_median_s']:.1f} s" if h else "-"],
        row("start until round 1 begins", "round1_start_s", sec),
        row("start until round 1 ends", "round1_end_s", sec),
        row("steady round (rounds 2..N, median)", "steady_round_s", lambda x: f"{x:.2f} s"),
        row("peak RSS of the process tree", "peak_rss_mb", lambda x: f"{x / 1024:.2f} GB"),
        row("peak PSS of the process tree", "peak_pss_mb", lambda x: f"{x / 1024:.2f} GB"),
        row("processes in the tree (max)", "max_processes", str, ratio=False),
    ]
    out.append(md_table(["", "gaisnet-ray FL", "Flower", "ratio", "gaisnet-ray HFSL"], rows, "lrrrr"))
    out.append("")
    lm = data["loss_match"]
    if g and f:
        out.append("Final held-out loss per domain (last round):")
        out.append("")
        out.append(md_table(["domain", "gaisnet-ray FL", "Flower", "max abs diff", "gaisnet-ray HFSL"],
                            [[d, f"{g['final_loss'][d]:.4f}", f"{f['final_loss'][d]:.4f}", f"{lm['max_abs_diff'][d]:.1e}",
                              f"{h['final_loss'][d]:.4f}" if h else "-"] for d in g["final_loss"]], "lrrrr"))
        out.append("")
        out.append(f"Same job: {'yes' if lm['match'] else '**NO**'} (every domain within {lm['tolerance']:g}, over all runs).")
        out.append("")
    hf = [r for r in data["runs"] if r["side"] == "gaisnet-ray hfsl"]
    fl = [r for r in data["runs"] if r["side"] == "gaisnet-ray fl"]
    timed = [r for r in fl if r.get("startup")]
    if timed:
        med = lambda k: statistics.median(r["startup"][k] for r in timed)  # noqa: E731
        out.append(f"Where gaisnet-ray FL's time before round 1 goes (seconds after the command was spawned, median of "
                   f"{len(timed)} run(s), {timed[-1]['startup']['actors']} actors):")
        out.append("")
        out.append(md_table(["the command's imports and checks done", "Ray up", "first other actor's process",
                             "cloud ready (built, pre-trained)", "last other actor ready", "initial evaluation done"],
                            [[f"{med(k):.1f} s" for k in ("command_imports_s", "ray_up_s", "first_other_process_s",
                                                          "cloud_ready_s", "last_other_ready_s",
                                                          "initial_eval_done_s")]], "rrrrrr"))
        out.append("")
    if hf and fl:
        def kinds(r: dict) -> str:
            return ", ".join(f"{k} {v['max']:.0f}" for k, v in r["peak_rss_mb_by_actor"].items() if k != "all_actors")

        out.append(f"HFSL vs FL on gaisnet-ray, per round: bytes over all links (up + down) "
                   f"{hf[-1]['bytes_up_down'] / 1e6:.2f} MB vs {fl[-1]['bytes_up_down'] / 1e6:.2f} MB; peak RSS of one "
                   f"actor per kind (MB): HFSL {kinds(hf[-1])}; FL {kinds(fl[-1])}. An HFSL device holds only its "
                   f"front and back blocks. Flower moves what FL moves (the adapter down and up per client).")
        out.append("")
    out.append("Notes: wall time is from spawning the command to its exit; round 1 begins after the foundation is "
               "built and pre-trained and the initial evaluation is done (gaisnet-ray: when cloud/initial_eval.json is "
               "written; Flower: when the initial centralized evaluation returns). Flower starts its client processes "
               "lazily inside round 1, gaisnet-ray before it, so also compare 'round 1 ends'. Peak RSS sums every "
               "process of the tree (Ray's GCS, raylet, workers), sampled every 0.5 s; PSS splits shared pages. "
               f"The host was shared with other work: 1-min load average {data['host']['loadavg_at_start'][0]:.1f} at "
               "start (each run's in the JSON), so absolute times are inflated; runs alternate so load hits both sides.")
    out.append("")
    out.append(footer(data))
    return "\n".join(out)


if __name__ == "__main__":
    main()
