"""The actors' output, into the run's log file instead of the console.

Ray forwards every worker's stdout and stderr to the driver (``log_to_driver``) and prints it there,
prefixed ``(CloudNode pid=...)``. The actors already silence their libraries at the source
(``logs.quiet_libraries``); what they still print is for the log file, not for the user's console:
while a run is on, each forwarded line becomes an INFO record of the ``gaisnet_ray.workers`` logger
(``(CloudNode pid=123) ...``, ``err`` marking stderr), which ``logs.RunLog`` writes to
``logs/gaisnet.log``.

Ray offers no public hook for this: ``ray._private.ray_logging.global_worker_stdstream_dispatcher``
is where ``ray.init`` registers its printer (``ray_print_logs``). If that name moves in a later Ray,
``route_worker_output`` finds nothing to replace and Ray keeps printing as it does by default.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("gaisnet_ray.workers")
RAY_PRINTER = "ray_print_logs"  # the handler name ray.init registers (ray/_private/worker.py)
OUR_HANDLER = "gaisnet_worker_logs"


def _to_log(batch: dict) -> None:
    """One Ray log batch: ``{"pid", "ip", "actor_name", "task_name", "is_err", "lines", ...}``."""
    who = batch.get("actor_name") or batch.get("task_name") or "worker"
    stream = " err" if batch.get("is_err") else ""
    lines = batch.get("lines") or ()
    if batch.get("pid") == "autoscaler":  # its status table every few seconds: only its events, as Ray prints
        lines = _autoscaler_events(lines)
    for line in lines:
        if line.strip():
            log.info("(%s pid=%s%s) %s", who, batch.get("pid"), stream, line.rstrip())


def _autoscaler_events(lines) -> list[str]:
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return []
    return list(filter_autoscaler_events(list(lines)))


def _dispatcher():
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def route_worker_output():
    """Replace Ray's console printer of forwarded worker output by ``_to_log``. Returns Ray's printer
    (to put back with ``restore_worker_output``), or None when there was none to replace."""
    d = _dispatcher()
    printer = next((h for name, h in getattr(d, "handlers", ()) if name == RAY_PRINTER), None)
    if printer is None:
        return None
    d.remove_handler(RAY_PRINTER)
    d.remove_handler(OUR_HANDLER)
    d.add_handler(OUR_HANDLER, _to_log)
    return printer


def restore_worker_output(printer) -> None:
    """Undo ``route_worker_output``: Ray's own printer again (``ray.shutdown`` drops both anyway)."""
    d = _dispatcher()
    if d is None or not any(name == OUR_HANDLER for name, _ in getattr(d, "handlers", ())):
        return
    d.remove_handler(OUR_HANDLER)
    d.add_handler(RAY_PRINTER, printer)


@contextmanager
def worker_output_in_log() -> Iterator[bool]:
    """While inside: forwarded worker output goes to the log (yields whether that worked)."""
    printer = route_worker_output()
    try:
        yield printer is not None
    finally:
        if printer is not None:
            restore_worker_output(printer)
