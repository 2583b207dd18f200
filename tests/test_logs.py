"""What a run prints (gaisnet_ray.logs, cluster/worker_logs.py), without Ray: the console gets the
event lines and our own warnings about the run; library chatter, Python warnings and the actors'
forwarded output go to the run folder's log file only, including what came before the folder
existed; closing the run log puts the process's logging back as it was. The worker set-up silences
transformers' progress bars and advisory warnings at the source.

A real ``gaisnet run``'s console and log file: tests/test_interrupt.py.
"""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from gaisnet_ray.cluster.worker_logs import _to_log
from gaisnet_ray.layout import RunLayout
from gaisnet_ray.logs import RunLog, events, quiet_libraries, relay_line, report_round, round_line


@pytest.fixture()
def run_log():
    console = io.StringIO()
    root = logging.getLogger()
    before = (root.level, list(root.handlers), warnings.showwarning)
    log = RunLog(console_stream=console)
    log.console_text = console.getvalue  # what the user saw
    log.before = before
    try:
        yield log
    finally:
        log.close()


def test_console_shows_events_and_our_warnings_the_file_gets_everything(run_log, tmp_path):
    logging.getLogger("transformers.modeling_utils").warning("loss_type=None was set")  # before the folder
    logging.getLogger("ray._private.authentication").warning("Token authentication is enabled")
    events.info("run folder: somewhere")
    path = run_log.attach(tmp_path / "run")
    assert path == RunLayout(tmp_path / "run").log_file and path.is_file()
    logging.getLogger("gaisnet_ray.driver").warning("device end-0-1 sits out the round: timed out")
    logging.getLogger("gaisnet_ray.planner.runtime").info("planned 3 clusters")
    logging.getLogger("some.library").error("it broke")
    warnings.warn("a library's deprecation", FutureWarning)

    assert run_log.console_text().splitlines() == [
        "run folder: somewhere",
        "warning: device end-0-1 sits out the round: timed out",
        "error: it broke",
    ]
    run_log.close()
    text = path.read_text()
    for line in ("loss_type=None was set", "Token authentication is enabled", "run folder: somewhere",
                 "sits out the round", "planned 3 clusters", "it broke", "a library's deprecation"):
        assert line in text, line
    assert text.index("loss_type=None") < text.index("run folder: somewhere") < text.index("sits out")
    # closed: the root logger is as it was, and Python prints warnings itself again
    root = logging.getLogger()
    assert (root.level, list(root.handlers), warnings.showwarning) == run_log.before


def test_transformers_records_reach_the_file_and_its_own_handler_comes_back(run_log, tmp_path):
    from transformers.utils import logging as hf_logging

    hf_root = logging.getLogger("transformers")
    assert hf_root.propagate  # while the run log is open: to the root logger, not its own stderr handler
    run_log.attach(tmp_path)
    hf_logging.get_logger("transformers.generation").warning("We strongly recommend an attention_mask")
    run_log.close()
    assert run_log.console_text() == ""
    assert "attention_mask" in RunLayout(tmp_path).log_file.read_text()
    assert not hf_root.propagate  # transformers prints through its own handler again


def test_actor_output_is_filed_with_who_said_it(run_log, tmp_path):
    run_log.attach(tmp_path)
    _to_log({"pid": 4242, "actor_name": "CloudNode", "is_err": True,
             "lines": ["Writing model shards: 100%|##########| 1/1", "", "  warnings.warn("]})
    _to_log({"pid": 7, "task_name": None, "is_err": False, "lines": ["hello from a worker"]})
    run_log.close()
    text = RunLayout(tmp_path).log_file.read_text()
    assert "(CloudNode pid=4242 err) Writing model shards" in text
    assert "(worker pid=7) hello from a worker" in text
    assert len(text.splitlines()) == 3 and run_log.console_text() == ""


ROW = {
    "round": 2, "version": 2, "train_loss": 3.20412, "wall_s": 12.34,
    "eval": {"units": {"loss": 2.0, "exact_match": 0.25}, "facts": {"loss": 4.0, "exact_match": 0.0}},
    "faults": {"dropped": {"end-0-1": "timed out"}, "lost_edges": [], "reassigned": {}},
    "relay": {"policy": "merge", "base_version": 2, "wall_s": 1.25,
              "bytes_down": {"edge_cloud_down": 667648, "end_edge_down": 2503680, "per_node": {"edge-0": 1}},
              "cloud_before": {"units": {"loss": 5.0, "exact_match": 0.0}},
              "cloud_after": {"units": {"loss": 2.5, "exact_match": 0.0}}},
}


def test_event_lines_of_a_round():
    assert round_line(ROW, 5) == ("round 2/5: train loss 3.204, eval loss 3.000, exact match units=0.25 "
                                  "facts=0.00, knowledge v0002, 12.3 s, faults: 1 device(s) sat out")
    assert relay_line(ROW) == "round 2: relay merge -> base b0002 (1.2 s, 3.2 MB down), cloud eval loss 5.000 -> 2.500"
    bare = {"round": 1, "version": 1, "train_loss": 1.0, "eval": {}, "faults": {}}
    assert round_line(bare, 1) == "round 1/1: train loss 1.000, knowledge v0001" and relay_line(bare) is None


def test_report_round_prints_a_line_per_event(run_log):
    report_round(ROW, 5)
    lines = run_log.console_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 2/5", "round 2"]


def test_worker_setup_silences_transformers_at_the_source(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            quiet_libraries("cpu")
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        assert not hf_logging.is_progress_bar_enabled()  # no "Writing model shards" bar on save_pretrained
        assert hf_logging.get_verbosity() == logging.ERROR
        assert seen == []
        import os

        assert os.environ["DS_ACCELERATOR"] == "cpu"  # a CPU worker: DeepSpeed need not guess (and warn)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
