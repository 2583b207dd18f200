"""What a run prints, and where everything else goes.

The console of ``gaisnet run`` is for the user: the progress bar, one line per notable event
(``events``: a round done, a relay, a fault), and warnings our own code raises about their run
(``gaisnet_ray.*`` loggers at WARNING and above). Everything else — transformers, DeepSpeed and Ray
chatter, Python warnings, our INFO records, what the actors print — goes to the run folder's log
file (``RunLayout.log_file``: ``logs/gaisnet.log``), kept for when something goes wrong.

Records that come before the run folder exists (it is made only once Ray is usable, so that a
refused run leaves nothing behind) are held in memory and written when the file opens.

``quiet_libraries`` is the set-up every worker process (tier actors, Serve replicas) runs: it
silences the library noise at its source (progress bars while saving, deprecation warnings that
are not the user's concern) instead of filtering it downstream.

No Ray here: the Ray side (the actors' forwarded output) is ``cluster.worker_logs``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from pathlib import Path

from .layout import RunLayout

EVENTS = "gaisnet_ray.events"
events = logging.getLogger(EVENTS)  # one line per notable event of a run: always on the console

# our loggers: their warnings are about the user's run; every other logger is library chatter
OWN_PREFIX = "gaisnet_ray"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# peft calls a transformers API that transformers 5 deprecates, once per model: not the user's concern
GRADIENT_CHECKPOINTING_WARNING = "`is_gradient_checkpointing` is deprecated"


class ConsoleHandler(logging.Handler):
    """Writes a record as one line on stderr above the progress bar (``tqdm.write``), so the bar is
    redrawn below it instead of being torn. Events print as they are; warnings start with
    ``warning:``, errors with ``error:`` (as the CLI's own messages do)."""

    def __init__(self, stream=None):
        super().__init__(logging.INFO)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.name != EVENTS and record.levelno >= logging.WARNING:
                msg = f"{record.levelname.lower()}: {msg}"
            from tqdm import tqdm

            tqdm.write(msg, file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: a broken handler reports, never raises
            self.handleError(record)


class HeldRecords(logging.Handler):
    """The records of a run before its folder exists (the newest ``capacity`` of them), replayed into
    the file once it opens."""

    def __init__(self, capacity: int):
        super().__init__(logging.NOTSET)
        self.records: deque[logging.LogRecord] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self, target: logging.Handler) -> None:
        while self.records:
            target.handle(self.records.popleft())


def on_console(record: logging.LogRecord) -> bool:
    """The console filter: events, our own warnings, and errors from anyone."""
    if record.name == EVENTS:
        return True
    if record.levelno >= logging.ERROR:
        return True
    own = record.name == OWN_PREFIX or record.name.startswith(OWN_PREFIX + ".")
    return own and record.levelno >= logging.WARNING


class RunLog:
    """The logging of one ``gaisnet run`` in this (the driver) process; ``attach`` the run folder once
    it exists, ``close`` at the end (restores what was there before: tests run jobs in-process).

    Transformers', DeepSpeed's and Ray's loggers print through their own handlers and do not propagate;
    while a run log is open they propagate to the root logger instead, so their records reach the
    file and not the console. Python warnings are routed into logging the same way.
    """

    def __init__(self, console_stream=None, capacity: int = 10000):
        self.console = ConsoleHandler(console_stream)
        self.console.addFilter(on_console)
        self.buffer = HeldRecords(capacity)  # until the file opens
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self.console)
        root.addHandler(self.buffer)
        logging.captureWarnings(True)
        self._restore_libraries = _route_library_loggers()
        self._closed = False

    def attach(self, run_dir: str | Path) -> Path:
        """Open ``logs/gaisnet.log`` in ``run_dir`` (appending: a resumed run continues it) and write
        what was held so far into it. Returns the file's path."""
        path = RunLayout(run_dir).log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(FILE_FORMAT))
        self.buffer.replay(self.file)
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(self.file)
        self.path = path
        return path

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        root = logging.getLogger()
        for h in (self.console, self.buffer, self.file):
            if h is not None:
                root.removeHandler(h)
                h.close()
        root.setLevel(self._root_level)
        logging.captureWarnings(False)
        self._restore_libraries()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# libraries whose loggers print through handlers of their own and do not propagate
SELF_PRINTING_LOGGERS = ("DeepSpeed", "ray")


def _route_library_loggers():
    """Let transformers', DeepSpeed's and Ray's records propagate to the root logger instead of
    printing through their own handlers; returns a function that undoes it."""
    undo = []
    try:
        from transformers.utils import logging as hf_logging  # light: transformers loads lazily
    except ImportError:
        hf_logging = None
    if hf_logging is not None:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        undo.append(lambda: (hf_logging.disable_propagation(), hf_logging.enable_default_handler()))
    for name in SELF_PRINTING_LOGGERS:
        lib = logging.getLogger(name)
        if not lib.handlers:
            continue
        handlers, propagate = list(lib.handlers), lib.propagate
        for h in handlers:
            lib.removeHandler(h)
        lib.propagate = True

        def _restore(lib=lib, handlers=handlers, propagate=propagate):
            lib.propagate = propagate
            for h in handlers:
                lib.addHandler(h)

        undo.append(_restore)

    def restore():
        for f in reversed(undo):
            f()

    return restore


def quiet_libraries(torch_device: str = "cpu") -> None:
    """Silence library output at its source in a worker process (a tier actor, a Serve replica):
    transformers' progress bars ("Writing model shards" on every ``save_pretrained``) and its advisory
    warnings, the deprecation warning peft triggers, and DeepSpeed's accelerator guess (on a CPU
    worker it would pick the CPU anyway; saying so up front skips the warning). Errors still print."""
    import warnings

    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning)
    if torch_device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "transformers" not in sys.modules:
        # not loaded yet (an edge under FL never loads it): transformers reads these when it first
        # configures its logger, so importing it here just to silence it (0.7 s, 17 MB) is not needed
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ------------------------------------------------------------------------------ the event lines
def round_line(m: dict, total: int) -> str:
    """``round 2/5: train loss 3.204, eval loss 2.997, exact match arithmetic=0.02 ..., 12.3 s`` from a
    metrics row (plus what sat out, when something did)."""
    parts = [f"round {m['round']}/{total}: train loss {m['train_loss']:.3f}"]
    ev = m.get("eval") or {}
    if ev:
        parts.append(f"eval loss {sum(e['loss'] for e in ev.values()) / len(ev):.3f}")
        parts.append("exact match " + " ".join(f"{d}={e['exact_match']:.2f}" for d, e in ev.items()))
    if m.get("version") is not None:
        parts.append(f"knowledge v{m['version']:04d}")
    if m.get("wall_s") is not None:
        parts.append(f"{m['wall_s']:.1f} s")
    faults = _fault_summary(m.get("faults") or {})
    if faults:
        parts.append(faults)
    return ", ".join(parts)


def _fault_summary(faults: dict) -> str:
    """``faults: 1 device dropped, 1 edge lost, 1 reassigned`` (empty when the round had none)."""
    counts = []
    for key, what in (("dropped", "device(s) sat out"), ("lost_edges", "edge(s) lost"),
                      ("reassigned", "device(s) moved")):
        n = len(faults.get(key) or ())
        if n:
            counts.append(f"{n} {what}")
    return "faults: " + ", ".join(counts) if counts else ""


def relay_line(m: dict) -> str | None:
    """``round 2: relay merge -> base b0002 (1.3 s, 3.2 MB down), cloud eval loss 3.51 -> 2.99`` when
    the round relayed (the foundation alone, before and after); else None."""
    rel = m.get("relay")
    if not rel:
        return None
    line = f"round {m['round']}: relay {rel.get('policy')}"
    if rel.get("base_version") is not None:
        line += f" -> base b{rel['base_version']:04d}"
    extra = []
    if rel.get("wall_s") is not None:
        extra.append(f"{rel['wall_s']:.1f} s")
    down = rel.get("bytes_down")
    if isinstance(down, dict):
        down = sum(v for v in down.values() if isinstance(v, (int, float)))
    if isinstance(down, (int, float)) and down:
        extra.append(f"{down / 1e6:.1f} MB down")
    line += f" ({', '.join(extra)})" if extra else ""
    before, after = rel.get("cloud_before") or {}, rel.get("cloud_after") or {}
    if before and after:
        mean = lambda ev: sum(e["loss"] for e in ev.values()) / len(ev)  # noqa: E731
        line += f", cloud eval loss {mean(before):.3f} -> {mean(after):.3f}"
    return line


def report_round(m: dict, total: int) -> None:
    """The round's event lines: the round itself, then its relay."""
    events.info(round_line(m, total))
    relay = relay_line(m)
    if relay:
        events.info(relay)
