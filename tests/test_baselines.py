"""The study's baselines (issue 10 item 1) as schemes of the same runtime: ``centralized`` (every
device's data pooled in one trainer: the privacy-violating upper bound) and ``local`` (each device
trains alone and keeps its own adapter). Each trains and its loss goes down in one process;
``centralized`` and ``hfsl`` with one edge, one cluster, one device give the same knowledge (same
data, same steps, same seed: the split step computes the whole model's gradient); both run on
Ray actors too (marked ``ray``: run under the flock).
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import ConfigError, load_config
from gaisnet_ray.data import device_examples
from gaisnet_ray.hfsl.factory import tier_parts
from gaisnet_ray.models.cuts import ModelPart
from gaisnet_ray.schemes import SCHEMES, Centralized, Local, scheme_of
from gaisnet_ray.schemes.plan import participants, plan_clusters

from conftest import HFSL_JOB, small_job
from tinycfg import TINY_YAML

torch.set_num_threads(1)

# 2 edges x 2 devices (HFSL_JOB), relay none; 2 rounds are enough to see the loss go down
JOB = [*HFSL_JOB, "training.rounds=2", "data.eval_samples_per_domain=2"]
DEVICES = ["end-0-0", "end-0-1", "end-1-0", "end-1-1"]


def _cfg(*changes: str):
    return load_config(TINY_YAML, [*JOB, *changes])


# ------------------------------------------------------------------- the schemes, without a model
def test_baselines_are_registered_and_labelled():
    assert {"centralized", "local"} <= set(SCHEMES)
    c, loc = scheme_of(_cfg("training.scheme=centralized")), scheme_of(_cfg("training.scheme=local"))
    assert isinstance(c, Centralized) and isinstance(loc, Local)
    assert "NOT private" in c.label and "privacy-violating" in c.privacy_note
    assert loc.privacy_note is None and loc.keeps_adapters and not c.keeps_adapters
    for s in ("hfsl", "fl", "sl"):  # the hooks' defaults leave the paper's schemes as they were
        sch, cfg = scheme_of(_cfg(f"training.scheme={s}")), _cfg(f"training.scheme={s}")
        assert sch.turn_steps(cfg) == cfg.training.local_steps and not sch.keeps_adapters
        assert sch.round_devices(cfg, "edge-0", ["end-0-0"]) is None and sch.privacy_note is None


def test_centralized_pools_every_device_in_one_trainer_for_as_many_steps():
    cfg = _cfg("training.scheme=centralized")
    sch = scheme_of(cfg)
    # one trainer, the topology's first device; the other edge trains nobody
    assert participants(cfg, "edge-0", ["end-0-0", "end-0-1"], 1) == ["end-0-0"]
    assert participants(cfg, "edge-1", ["end-1-0", "end-1-1"], 1) == []
    assert list(plan_clusters(cfg, "edge-0", {"end-0-0": 16}).values()) == [["end-0-0"]]
    own = device_examples(cfg.data, DEVICES)
    data = sch.device_data(cfg, own)
    assert data["end-0-0"] == [ex for d in DEVICES for ex in own[d]]  # every device's, in topology order
    assert sch.turn_steps(cfg) == 4 * cfg.training.local_steps  # all 4 device turns of a round
    sampled = _cfg("training.scheme=centralized", "training.participants_per_edge=1")
    assert scheme_of(sampled).turn_steps(sampled) == 2 * cfg.training.local_steps
    assert tier_parts(cfg, 4)["end-0-0"] == ModelPart.whole()  # the whole model, no split


def test_local_refuses_a_relay_and_a_resume(tmp_path):
    with pytest.raises(ConfigError, match="relay.policy=none"):
        scheme_of(_cfg("training.scheme=local", "relay.policy=merge"))
    from gaisnet_ray.hfsl.cloud import CloudCore

    with pytest.raises(ConfigError, match="cannot resume"):
        CloudCore(_cfg("training.scheme=local"), tmp_path, resume_round=1)
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.layout import RunLayout
    from gaisnet_ray.runfolder import check_resumable

    run = RunLayout(tmp_path / "run")
    run.config.parent.mkdir()
    run.config.write_text(config_to_yaml(_cfg("training.scheme=local")))
    with pytest.raises(ConfigError, match="'local' cannot resume"):  # before anything in the folder moves
        check_resumable(tmp_path / "run", ["training.rounds=3"])
    run.config.write_text(config_to_yaml(_cfg("training.scheme=centralized")))
    check_resumable(tmp_path / "run", ["training.rounds=3"])  # centralized resumes like any scheme


def test_baselines_refuse_secure_aggregation():
    """Nothing to mask: centralized has one trainer, local sends each device's adapter up alone."""
    from gaisnet_ray.privacy.secagg_check import check_secure_aggregation

    for scheme in ("centralized", "local"):
        with pytest.raises(ConfigError, match=f"privacy.secure_aggregation: training.scheme '{scheme}'"):
            check_secure_aggregation(_cfg(f"training.scheme={scheme}", "privacy.secure_aggregation=true"))


# ------------------------------------------------------------------------------ in one process
@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory):
    from gaisnet_ray.inprocess import InProcessGaisNet

    out = {}
    for scheme in ("centralized", "local"):
        net = InProcessGaisNet(_cfg(f"training.scheme={scheme}"), tmp_path_factory.mktemp(scheme))
        out[scheme] = (net, [net.run_round(r) for r in (1, 2)])
    return out


def test_centralized_trains_one_pooled_turn_and_its_loss_goes_down(baseline_runs):
    net, rows = baseline_runs["centralized"]
    steps = 4 * net.cfg.training.local_steps
    for r in rows:
        assert r["scheme"] == "centralized" and "privacy-violating" in r["privacy_note"]
        assert r["clusters"] == {"edge-0": [["end-0-0"]]}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # and it improves on held-out examples, not only on what it trained on (relay none: the base is unchanged)
    base, after = net.cloud.evaluate_base(), rows[-1]["eval"]
    assert sum(after[d]["loss"] for d in base) < sum(base[d]["loss"] for d in base) - 0.1
    lineage = net.cloud.store.lineage(2)
    assert lineage["scheme"] == "centralized"
    pooled = sum(len(exs) for exs in device_examples(net.cfg.data, DEVICES).values())
    assert lineage["num_samples"] == net.devices["end-0-0"].num_samples == pooled  # everyone's data
    assert net.steps == steps


def test_local_devices_keep_their_own_adapters_and_are_evaluated_each(baseline_runs):
    net, rows = baseline_runs["local"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for r in rows:
        assert r["scheme"] == "local" and "privacy_note" not in r
        assert set(r["eval_devices"]) == set(DEVICES)
        for d, ev in r["eval_devices"].items():
            assert set(ev["domains"]) <= set(ev["eval"]) == {"arithmetic", "strings"}
            assert set(ev["own"]) == set(ev["all"]) == {"loss", "exact_match"}
        # the run's eval is the mean over devices' own adapters
        mean = sum(ev["eval"]["strings"]["loss"] for ev in r["eval_devices"].values()) / len(DEVICES)
        assert r["eval"]["strings"]["loss"] == pytest.approx(mean)
    own = {d: t._own for d, t in net.devices.items()}
    # nothing averaged into a device: each one's adapter is its own (and none is the stored average)
    key = next(iter(own["end-0-0"]))
    assert not torch.equal(own["end-0-0"][key], own["end-0-1"][key])
    assert not torch.equal(own["end-0-0"][key], net.knowledge[key].cpu())
    first = [r["eval_devices"]["end-0-0"]["all"]["loss"] for r in rows]
    assert first[1] < first[0]  # a device's own adapter improves round over round


def test_centralized_with_one_device_is_hfsl(tmp_path):
    """One edge, one cluster, one device: the pooled data is that device's, the steps its turn's,
    the seed its seed; the split step computes the whole model's gradient, so the knowledge is
    the same (to float tolerance: the split detaches and re-attaches the hidden states)."""
    from gaisnet_ray.inprocess import InProcessGaisNet

    one = ["topology.edges=1", "topology.devices_per_edge=1", "topology.cluster_size=1"]
    knowledge = {}
    for scheme in ("hfsl", "centralized"):
        net = InProcessGaisNet(_cfg(*one, f"training.scheme={scheme}"), tmp_path / scheme)
        for r in (1, 2):
            net.run_round(r)
        knowledge[scheme] = net.knowledge
    h, c = knowledge["hfsl"], knowledge["centralized"]
    assert h.keys() == c.keys()
    moved = [k for k in h if not torch.equal(h[k], torch.zeros_like(h[k]))]
    assert moved  # it trained
    for k in h:
        torch.testing.assert_close(c[k], h[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- on Ray actors
@pytest.mark.ray
@pytest.mark.parametrize("scheme", ["centralized", "local"])
def test_baselines_run_on_actors(ray_local, tmp_path, scheme):
    import json

    from gaisnet_ray.layout import RunLayout
    from gaisnet_ray.run_command import run_job
    from gaisnet_ray.runfolder import read_metrics

    cfg = load_config(TINY_YAML, small_job(f"training.scheme={scheme}", "training.rounds=2",
                                           "relay.policy=none"))
    run_dir = run_job(cfg, tmp_path / scheme)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and all(r["scheme"] == scheme for r in rows)
    summary = json.loads(RunLayout(run_dir).summary.read_text())
    if scheme == "centralized":
        assert all(r["clusters"] == {"edge-0": [["end-0-0"]]} for r in rows)
        assert "privacy-violating" in summary["privacy_note"]
    else:
        assert all(set(r["eval_devices"]) == {"end-0-0", "end-1-0"} for r in rows)
        assert "privacy_note" not in summary
