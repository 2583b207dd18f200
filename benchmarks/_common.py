"""Shared helpers of the benchmarks: quiet imports, config building, result files.

Every benchmark writes ``benchmarks/results/NAME.json`` (machine-readable: config, library
versions, date, host) and ``benchmarks/results/NAME.md`` (a short table), and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Importable when run as `python benchmarks/NAME.py` from a checkout without an install.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def quiet() -> None:
    """Drop the known, harmless noise (GPT-2 Conv1D LoRA note, shard-writing progress bars)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", message=".*Conv1D.*")
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


TINY_YAML = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


def make_config(overrides: list[str], config: str | Path | None = TINY_YAML):
    """``config`` (default: the tiny job, ``examples/tiny.yaml``; None: the embedded real-model
    default) with ``key=value`` overrides (same rules as ``gaisnet run --set``)."""
    from gaisnet_ray.config import load_config

    return load_config(config, overrides)


def host_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def envelope(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The common header of a result file."""
    from gaisnet_ray.runfolder import library_versions

    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]]),
        "args": args,
        "host": host_info(),
        "versions": library_versions(),
    }


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "host" in data:
        data["host"]["loadavg_at_end"] = list(os.getloadavg())
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {jpath.relative_to(REPO)} and {mpath.relative_to(REPO)}")
    return jpath, mpath


def md_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column: l or r (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), with the exact byte count kept in the JSON."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f} M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(int(n))


def versions_line(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def footer(data: dict[str, Any]) -> str:
    """The closing line of a result table: command, wall time, host, date, versions."""
    return (f"Command: `{data['command']}` - wall {data['wall_s']:.0f} s on {data['host']['cpu_count']} CPUs, "
            f"{data['date']}. Versions: {versions_line(data['versions'])}.")


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (raylet, GCS, Ray workers and actors), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def closed_loop_clients(url: str, items: list, concurrency: int, ask, timeout: float = 600) -> tuple[list[dict], float]:
    """Closed-loop load: ``concurrency`` threads, each with its own keep-alive ``httpx.Client`` on
    ``url``, take the next of ``items`` (in order) until none is left and record ``ask(client, item)``
    (a dict per request). Returns the records and the wall time."""
    import threading

    import httpx

    queue, records, lock = list(items), [], threading.Lock()

    def worker():
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    item = queue.pop(0)
                rec = ask(client, item)
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0
