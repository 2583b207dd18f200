"""Privacy: the attacks on a tiny preset, the defenses, secure aggregation, the DP accountant.

Ray-free and fast: a tiny GPT-2 (random weights are enough for an inversion: the front is a
deterministic function of the tokens) and hand-sized vectors.
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import ConfigError
from gaisnet_ray.data import device_examples, encode_examples, public_examples
from gaisnet_ray.models.build import FoundationPackage, build_foundation
from gaisnet_ray.models.parts import Pruned
from gaisnet_ray.models.split import build_tier_model
from gaisnet_ray.privacy import attacks as A
from gaisnet_ray.privacy.dp import DPAggregator, dp_fedavg, epsilon_after, noise_multiplier_for
from gaisnet_ray.privacy.noise import clip_rows, distance_correlation, noise_std, privatize_hidden
from gaisnet_ray.privacy.secagg import SecAggError, reconstruct, secure_fedavg, share
from tinycfg import tiny_config


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    model, tok = build_foundation(cfg.model)
    split = build_tier_model(FoundationPackage.from_model(model, tok), cfg.peft)
    batch = encode_examples(device_examples(cfg.data, ["end-0-0"])["end-0-0"][:24], tok, cfg.model.max_seq_len)
    with torch.no_grad():
        hidden = split.front(batch["input_ids"], 1)  # (N, T, H): what the edge receives at cut 1
    return cfg, tok, split, batch, hidden


def test_search_inversion_recovers_undefended_tokens_at_cut_1(tiny):
    cfg, tok, split, batch, hidden = tiny
    emb = split.lm.transformer.wte.weight
    lengths = A.lengths_of(batch["labels"])
    rec, err = A.search_inversion(lambda ids: split.front(ids, 1), hidden, A.cosine_ranker(emb), lengths=lengths)
    r = A.recovery(rec, batch["input_ids"], batch["labels"])
    assert r.tokens > 0.9 and r.answers > 0.9
    # the KV-cached candidate step gives the same tokens as running every prefix again
    cached, _ = A.search_inversion(None, hidden, A.cosine_ranker(emb), lengths=lengths,
                                   next_rows=A.cached_next_rows(split, 1))
    assert torch.equal(cached, rec)


def test_labels_are_read_back_from_the_gradients_a_device_sends_up(tiny):
    """The gradient at the middle's output (dL/dh_m, never noised) points along the embedding of the
    token each position predicts: a decoder fitted on public examples' gradients reads most answer
    tokens of private examples back from it, through a deep cut and its noise + denoising too. With
    the labels of the public examples shuffled the same decoder learns only their prior (the end
    token is a third of the labels here): it is the gradient that carries them."""
    cfg, tok, split, batch, _ = tiny
    emb = split.lm.transformer.wte.weight
    pub = encode_examples(public_examples(cfg.data)[:192], tok, cfg.model.max_seq_len)
    n = len(split.lm.transformer.h)
    noisy = lambda h: privatize_hidden(h, 0.5, 4.0, torch.Generator().manual_seed(0))  # noqa: E731
    for front_end, link in ((1, None), (n - 2, noisy)):  # cut 1 + 1, undefended; a deep cut, noised, denoised
        grads = lambda b: A.sent_gradients(split, b["input_ids"], b["labels"], front_end, n - 1,  # noqa: E731
                                           link, denoise=link is not None)
        g_pub, g_priv = grads(pub), grads(batch)
        assert g_priv.shape == (*batch["input_ids"].shape, emb.shape[1])
        r = A.label_recovery(A.fit_label_decoder(g_pub, pub["labels"], emb), g_priv, batch["labels"])
        assert r["num_labels"] == int((batch["labels"][:, 1:] != -100).sum())
        assert r["labels"] > 0.9 and r["answers"] > 0.8, (front_end, r)
        rows, toks = A.supervised_rows(g_pub, pub["labels"])
        shuffled = A.fit_decoder(rows, toks[torch.randperm(len(toks), generator=torch.Generator().manual_seed(1))], emb)
        assert A.label_recovery(shuffled, g_priv, batch["labels"])["labels"] < 0.5  # the prior: ~1/3 are eos


def test_activation_noise_brings_search_and_learned_inversion_down(tiny):
    cfg, tok, split, batch, hidden = tiny
    emb = split.lm.transformer.wte.weight
    lengths = A.lengths_of(batch["labels"])
    clip = float(hidden.norm(dim=-1).median())
    gen = torch.Generator().manual_seed(0)
    noisy = privatize_hidden(hidden, clip, 4.0, gen)
    rows = A.cached_next_rows(split, 1)
    rec, _ = A.search_inversion(None, noisy, A.cosine_ranker(emb), lengths=lengths, max_candidates=64,
                                next_rows=lambda pre, cand: clip_rows(rows(pre, cand), clip))
    assert A.recovery(rec, batch["input_ids"], batch["labels"]).tokens < 0.5
    pub = encode_examples(public_examples(cfg.data)[:256], tok, cfg.model.max_seq_len)
    front = lambda ids: split.front(ids, 1)  # noqa: E731
    clean = A.train_decoder(front, pub["input_ids"], A.lengths_of(pub["labels"]), emb)
    assert A.recovery(A.decode(clean, hidden), batch["input_ids"], batch["labels"]).tokens > 0.9
    adaptive = A.train_decoder(lambda ids: privatize_hidden(front(ids), clip, 4.0, gen), pub["input_ids"],
                               A.lengths_of(pub["labels"]), emb)
    assert A.recovery(A.decode(adaptive, noisy), batch["input_ids"], batch["labels"]).tokens < 0.5


def test_recovery_counts_tokens_examples_and_answers():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, 9, -100, -100]])  # lengths 4 and 3
    rec = torch.tensor([[5, 6, 7, 1, 3], [5, 6, 9, 2, 2]])  # first misses its answer's last token
    r = A.recovery(rec, ids, labels)
    assert r.num_tokens == 7 and r.tokens == pytest.approx(6 / 7)
    assert r.content == pytest.approx(2 / 3)  # past the shared prefix [5, 6]: 7, 8 and 9; 8 missed
    assert r.examples == 0.5 and r.answers == 0.5


def test_membership_attack_singles_out_what_the_model_was_fitted_on():
    """The likelihood-gap attack: a model fitted hard on 8 examples lowers their loss far more than
    that of 8 others from the same devices, and the AUC says so; the AUC itself on hand-worked
    scores (ties count one half)."""
    assert A.auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="at least one member"):
        A.auc(torch.tensor([]), torch.tensor([1.0]))
    cfg = tiny_config()
    torch.manual_seed(0)
    model, tok = build_foundation(cfg.model)
    exs = device_examples(cfg.data, ["end-0-0", "end-0-1"])
    members = encode_examples(exs["end-0-0"][:8], tok, cfg.model.max_seq_len)
    others = encode_examples(exs["end-0-1"][:8], tok, cfg.model.max_seq_len)
    logits = lambda ids: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        base = [A.example_losses(logits, b["input_ids"], b["labels"]) for b in (members, others)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        out = model(input_ids=members["input_ids"], labels=members["labels"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        tuned = [A.example_losses(logits, b["input_ids"], b["labels"]) for b in (members, others)]
    scores = [A.membership_scores(b, t) for b, t in zip(base, tuned)]
    assert A.auc(*scores) > 0.9
    # without the fitting there is nothing to single out: the gap is zero for everyone
    assert A.auc(A.membership_scores(base[0], base[0]), A.membership_scores(base[1], base[1])) == 0.5


def test_privatize_hidden_clips_rows_and_scales_noise():
    h = torch.tensor([[[3.0, 4.0], [0.3, 0.4]]])  # row norms 5 and 0.5
    assert torch.allclose(clip_rows(h, 1.0), torch.tensor([[[0.6, 0.8], [0.3, 0.4]]]))
    assert noise_std(2.0, 0.5, 4) == pytest.approx(0.5)  # 0.5 * 2 / sqrt(4)
    big = privatize_hidden(torch.zeros(1, 4000, 16), 1.0, 2.0, torch.Generator().manual_seed(0))
    assert big.norm(dim=-1).mean() == pytest.approx(2.0, rel=0.05)  # noise norm = ratio * clip
    with pytest.raises(ValueError, match="activation_clip"):
        privatize_hidden(h, None, 1.0)


def test_distance_correlation_is_one_for_similar_rows_and_small_for_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-6)
    assert float(distance_correlation(x, torch.randn(200, 8, generator=g))) < 0.5  # (biased upward at n=200)


def test_privacy_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="activation_clip"):
        tiny_config("privacy.activation_noise=1.0")
    with pytest.raises(ConfigError, match="activation_denoise needs privacy.activation_clip"):
        tiny_config("privacy.activation_denoise=true")
    with pytest.raises(ConfigError, match="dp_epsilon"):
        tiny_config("privacy.dp_clip=1.0")
    with pytest.raises(ConfigError, match="privacy.nopeek_weight"):
        tiny_config("privacy.nopeek_weight=-1")


# --------------------------------------------------------------------------- secure aggregation
def test_shamir_any_threshold_shares_rebuild_the_secret():
    import secrets

    sh = share(123456789, 5, 3, secrets.SystemRandom())
    assert reconstruct(sh[:3]) == 123456789 == reconstruct([sh[4], sh[1], sh[2]])


def test_secure_aggregation_equals_plain_fedavg_and_recovers_a_dropout():
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(300, generator=g) * 0.05 for _ in range(4)]
    w = [3.0, 1.0, 2.0, 4.0]
    plain = sum(wi * v for wi, v in zip(w, vecs)) / sum(w)
    assert torch.allclose(secure_fedavg(vecs, w), plain, atol=1e-6)
    # member 1 shared its keys, then dropped before sending: the rest still aggregate exactly
    without = (3 * vecs[0] + 2 * vecs[2] + 4 * vecs[3]) / 9
    assert torch.allclose(secure_fedavg(vecs, w, drop_after_sharing={1}), without, atol=1e-6)
    with pytest.raises(SecAggError, match="threshold"):
        secure_fedavg(vecs, w, threshold=3, drop_after_sharing={0, 1})


def test_a_masked_input_alone_reveals_nothing_recognisable():
    from gaisnet_ray.privacy.secagg import SecAggMember, decode

    members = [SecAggMember(i, 3, 2) for i in range(3)]
    roster = {m.index: m.public_key for m in members}
    for m in members:
        for j, sh in m.shares_for_peers(roster).items():
            members[j].receive(m.index, sh)
    x = torch.full((100,), 0.5)
    y = decode(members[0].masked_input(x, 1.0))[:-1]
    assert (y - 0.5).abs().mean() > 1e5  # uniform over the ring, not near x


# -------------------------------------------------------------------------------------- DP
def test_dp_epsilon_matches_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(4):
        acc.step(noise_multiplier=1.1, sample_rate=1.0)
    assert epsilon_after(4, 1.1, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert epsilon_after(4, 1.1, 1e-5) == pytest.approx(9.5527, abs=1e-3)  # the value opacus 1.6.0 gives
    z = noise_multiplier_for(8.0, 1e-5, 4)
    assert epsilon_after(4, z, 1e-5) <= 8.0 + 1e-6 and epsilon_after(4, z * 0.9, 1e-5) > 8.0


def test_dp_fedavg_clips_each_delta_then_averages():
    ref = {"b": torch.zeros(2)}
    ups = [{"b": torch.tensor([3.0, 4.0])}, {"b": torch.tensor([0.3, 0.4])}]  # delta norms 5 and 0.5
    out, info = dp_fedavg(ups, [1.0, 3.0], ref, clip=1.0, noise_multiplier=0.0)
    # (1 * [0.6, 0.8] + 3 * [0.3, 0.4]) / 4 = [0.375, 0.5]
    assert torch.allclose(out["b"], torch.tensor([0.375, 0.5]))
    assert info["clipped"] == 1 and info["noise_std"] == 0.0
    _, info = dp_fedavg(ups, [1.0, 3.0], ref, clip=1.0, noise_multiplier=2.0)
    assert info["noise_std"] == pytest.approx(2.0 * 1.0 * 3.0 / 4.0)  # z * clip * max w / sum w


def test_dp_aggregator_needs_fedavg():
    cfg = tiny_config("privacy.dp_clip=1.0", "privacy.dp_epsilon=8", "training.aggregation=median")
    with pytest.raises(ValueError, match="fedavg"):
        DPAggregator(cfg.privacy, cfg.training.rounds, cfg.training.aggregation)


# ------------------------------------------------------------------------ what the edge holds
def test_edge_holds_no_front_or_back_weights(tiny):
    from gaisnet_ray.hfsl.factory import edge_part_of, edge_trainer

    cfg = tiny_config()
    model, tok = build_foundation(cfg.model)
    package = FoundationPackage.from_model(model, tok)
    devices = ["end-0-0", "end-0-1"]
    part = edge_part_of(cfg, devices, package.num_layers)
    edge = edge_trainer(cfg, "edge-0", devices, package.cut(part))
    lm = edge.split.lm
    n = package.num_layers
    assert isinstance(lm.transformer.wte, Pruned) and isinstance(lm.transformer.wpe, Pruned)
    assert isinstance(lm.lm_head, Pruned) and isinstance(lm.transformer.ln_f, Pruned)
    assert isinstance(lm.transformer.h[0], Pruned) and isinstance(lm.transformer.h[n - 1], Pruned)
    keys = list(edge.split.peft.state_dict())
    assert not [k for k in keys if ".h.0." in k or f".h.{n - 1}." in k or "wte" in k or "lm_head" in k]
    assert edge.split.held_layers() == set(range(1, n - 1))
    held = edge.split.holdings()  # what the edge actor reports when asked (tests/test_planner_run.py, on Ray)
    assert held["blocks"] == held["adapter_blocks"] == list(range(1, n - 1))
    assert not held["embeddings"] and not held["head"] and not held["adapter_other_keys"]


# ------------------------------------------------------------------ a round, then the audit
def test_a_round_under_every_defense_records_them_and_the_audit_reads_the_run(tmp_path):
    import json

    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.privacy.command import AUDIT_FILE, AuditInputError, audit_run

    cfg = tiny_config("training.pretrain_steps=0", "training.rounds=1", "training.local_steps=2",
                      "topology.edges=1", "topology.devices_per_edge=2", "data.samples_per_device=16",
                      "data.eval_samples_per_domain=4", "privacy.activation_clip=0.1", "privacy.activation_noise=0.5",
                      "privacy.activation_denoise=true", "privacy.nopeek_weight=0.1", "privacy.dp_clip=1.0",
                      "privacy.dp_noise_multiplier=0.05")
    net = InProcessGaisNet(cfg, tmp_path)
    seen = []
    forward = net.edges["edge-0"].forward
    net.edges["edge-0"].forward = lambda cid, d, h: (seen.append(h.clone()), forward(cid, d, h))[1]
    metrics = net.run_round(1)
    p = metrics["privacy"]
    assert p["activation_noise"] == 0.5 and p["activation_denoise"] is True and p["nopeek_weight"] == 0.1
    assert p["dp_epsilon"] == pytest.approx(epsilon_after(1, 0.05, 1e-5)) and p["dp_noise_std"] == 0.05
    # what reached the edge is clipped (tiny rows are ~0.24 long) + noised: norms near sqrt(1 + 0.5^2) * clip
    assert 0.09 < float(torch.cat(seen).norm(dim=-1).median()) < 0.14
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    small = {"examples": 8, "public_per_domain": 40, "decoder_steps": 5, "candidates": 64, "noisy_candidates": 16}
    out = audit_run(tmp_path, **small)
    assert json.loads((tmp_path / AUDIT_FILE).read_text())["privacy"]["activation_noise"] == 0.5
    assert set(out["inversion"]) == {"search_exact_weights", "search_public_base", "learned_public_base"}
    assert out["labels_from_gradients"]["num_labels"] > 0 and 0.0 <= out["labels_from_gradients"]["labels"] <= 1.0
    assert 0.0 <= out["membership"]["auc"] <= 1.0
    undefended = audit_run(tmp_path, **small, overrides=["privacy.activation_noise=0", "privacy.activation_clip=null",
                                                        "privacy.activation_denoise=false"])
    assert undefended["inversion"]["search_exact_weights"]["tokens"] > 0.9
    # privacy_audit.png: both audits, leakage next to exact match (the undefended row leaks the most)
    from gaisnet_ray.layout import RunLayout
    from gaisnet_ray.privacy.plot import leakage_rows

    run = RunLayout(tmp_path)
    assert run.privacy_plot.stat().st_size > 10_000 and len(run.privacy_audits()) == 2
    own, what_if = leakage_rows([json.loads(p.read_text()) for p in run.privacy_audits()])
    assert own["label"] == "run's own settings" and what_if["label"] == ("activation_noise=0, activation_clip=null, "
                                                                     "activation_denoise=false")
    assert what_if["recovery"]["search_exact_weights"]["tokens"] == undefended["inversion"]["search_exact_weights"]["tokens"]
    no_grads = audit_run(tmp_path, **small, search=False, overrides=["privacy.send_gradients=false"])
    assert no_grads["labels_from_gradients"].startswith("none") and "search_exact_weights" not in no_grads["inversion"]
    with pytest.raises(AuditInputError, match="no config.yaml"):
        audit_run(tmp_path / "nowhere")


def test_leakage_rows_put_each_attack_next_to_mean_exact_match():
    from gaisnet_ray.privacy.plot import leakage_rows

    audit = {"overrides": ["privacy.activation_noise=8"], "exact_match": {"a": 0.5, "b": 0.25},
             "inversion": {"search_exact_weights": {"tokens": 0.03, "content": 0.02, "answers": 0.0}},
             "membership": {"auc": 0.45}}
    fl = {"overrides": [], "exact_match": {}, "inversion": "none: under fl no hidden state leaves a device"}
    row, fl_row = leakage_rows([audit, fl])
    assert row == {"label": "activation_noise=8", "exact_match": 0.375, "membership_auc": 0.45,
                   "recovery": {"search_exact_weights": {"tokens": 0.03, "content": 0.02, "answers": 0.0}}}
    assert fl_row["recovery"] == {} and fl_row["exact_match"] is None and fl_row["label"] == "run's own settings"


def test_privacy_audit_command_exits_2_with_one_line_on_bad_input(tmp_path, capsys):
    from gaisnet_ray.cli import main

    assert main(["privacy-audit", str(tmp_path / "nowhere")]) == 2
    assert main(["privacy-audit", str(tmp_path), "--examples", "1"]) == 2
    (tmp_path / "config.yaml").write_text("training: {rounds: 1}\n")
    assert main(["privacy-audit", str(tmp_path)]) == 2  # no model/ yet
    assert main(["privacy-audit", str(tmp_path), "--set", "training.rounds=2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "no config.yaml" in lines[0] and "--examples" in lines[1] and "model/" in lines[2]
    assert "privacy." in lines[3]
