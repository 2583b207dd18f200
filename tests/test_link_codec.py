"""The end-edge link codec (``links.codec``, ``hfsl.linkcodec``): each codec's reconstruction error
bound and wire size worked out by hand; dropping padding is exact (fp32 trains bit for bit as none);
int8 trains to within 2% of fp32's held-out loss after the same steps; and the message audit
passes on encoded messages while it still refuses a token batch dressed as one. No Ray here:
tests/test_ray_run.py runs the Ray runtime with links.codec=int8 and holds it equal to this one."""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import load_config
from gaisnet_ray.hfsl.audit import MessageAudit, _plain, walk_payload
from gaisnet_ray.hfsl.linkcodec import LinkCodec, WireTensor, audit_wire_leaf
from gaisnet_ray.knowledge.accounting import content_hash, payload_nbytes

from conftest import HFSL_JOB
from tinycfg import TINY_YAML

torch.set_num_threads(1)

B, T, H = 4, 10, 16
LENGTHS = torch.tensor([10, 3, 7, 0])  # a full row, short rows, an empty row
N = int(LENGTHS.sum())  # 20 positions go on the wire instead of B * T = 40


def _activation(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * torch.logspace(-3, 2, H)  # (B, T, H), 5 decades per row
    x[0, 0, 3] = 1e4  # an outlier
    x[2, 1] = 0.0  # an all-zero token (scale 0 must not divide by zero)
    return x


def _kept() -> torch.Tensor:
    return torch.arange(T)[None, :] < LENGTHS[:, None]  # (B, T)


def test_none_is_the_tensor_itself():
    x, codec = _activation(), LinkCodec("none")
    assert codec.encode(x, LENGTHS) is x and codec.decode(x) is x
    sd = {"a.lora_A.weight": torch.randn(2, 3)}
    assert codec.encode_adapter(sd) is sd and LinkCodec.decode_adapter(sd) is sd


@pytest.mark.parametrize("name, value_bytes, scale_bytes", [("fp32", 4, 0), ("bf16", 2, 0), ("int8", 1, 4)])
def test_reconstruction_bound_and_wire_bytes(name, value_bytes, scale_bytes):
    x, codec = _activation(), LinkCodec(name)
    msg = codec.encode(x, LENGTHS)
    assert isinstance(msg, WireTensor) and msg.values.shape == (N, H) and msg.seq_len == T
    # bytes on the wire, by hand: N x H values, N scales (int8), B int32 lengths
    assert payload_nbytes(msg) == N * H * value_bytes + N * scale_bytes + B * 4
    y = codec.decode(msg)
    assert y.shape == (B, T, H) and y.dtype == torch.float32
    keep = _kept()
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))  # dropped positions come back as zeros
    err, ref = (y - x)[keep], x[keep]  # (N, H)
    if name == "fp32":
        assert torch.equal(y[keep], ref)  # lossless where it sends
    elif name == "bf16":  # round to nearest, 8 significant bits: |e| <= 2^-8 |x| (2^-9 plus slack)
        assert (err.abs() <= ref.abs() * 2.0 ** -8).all()
    else:  # per-token absmax scale s = max|x_row| / 127: |e| <= s / 2 on every element of the row
        s = ref.abs().amax(dim=1, keepdim=True) / 127
        assert (err.abs() <= s / 2 * (1 + 1e-6)).all()
        assert torch.equal(y[2, 1], torch.zeros(H))  # the zero token stays exactly zero
        assert (msg.values.abs() <= 127).all() and msg.values.dtype == torch.int8


def test_adapters_go_bf16_under_the_lossy_codecs_only():
    sd = {"x.lora_A.weight": torch.randn(8, 64), "x.lora_B.weight": torch.randn(64, 8) * 1e-3}
    assert LinkCodec("fp32").encode_adapter(sd) is sd  # the lossless codec leaves adapters exact
    for name in ("bf16", "int8"):
        wire = LinkCodec(name).encode_adapter(sd)
        assert all(v.dtype == torch.bfloat16 for v in wire.values())
        assert payload_nbytes(wire) == payload_nbytes(sd) // 2
        back = LinkCodec.decode_adapter(wire)
        for k in sd:
            assert back[k].dtype == torch.float32
            assert ((back[k] - sd[k]).abs() <= sd[k].abs() * 2.0 ** -8).all()


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="links.codec"):
        LinkCodec("fp8")


# ---------------------------------------------------------------------------------- training
def _train(codec: str, rounds: int, extra: tuple[str, ...] = ()):
    import tempfile

    from gaisnet_ray.inprocess import InProcessGaisNet

    cfg = load_config(TINY_YAML, HFSL_JOB + [f"links.codec={codec}", f"training.rounds={rounds}", *extra])
    with tempfile.TemporaryDirectory(prefix="codec-") as d:
        net = InProcessGaisNet(cfg, d)
        initial = net.cloud.evaluate()
        metrics = [net.run_round(r) for r in range(1, rounds + 1)]
        return net, initial, metrics


def _loss(ev: dict) -> float:
    return sum(v["loss"] for v in ev.values()) / len(ev)


TRAIN = ("training.local_steps=6", "data.samples_per_device=32")


@pytest.fixture(scope="module")
def runs():
    """The same 4 HFSL rounds (6 steps per turn) under none, fp32 and int8."""
    return {c: _train(c, 4, TRAIN) for c in ("none", "fp32", "int8")}


def test_dropping_padding_is_exact(runs):
    """fp32 sends only the real positions and trains bit for bit as none: causal blocks never let
    a padding position reach a real one, and the gradients at padding positions are exactly zero."""
    a, b = runs["none"][0], runs["fp32"][0]
    assert content_hash(a.cloud.knowledge) == content_hash(b.cloud.knowledge)
    (ma, mb) = runs["none"][2][-1], runs["fp32"][2][-1]
    assert ma["train_loss"] == mb["train_loss"]
    assert mb["bytes"]["end_edge_up"] < ma["bytes"]["end_edge_up"] / 2  # tiny's rows are mostly padding
    assert mb["bytes"]["edge_cloud_up"] == ma["bytes"]["edge_cloud_up"]  # adapters as they were


def test_int8_trains_within_two_percent_of_fp32(runs):
    (_, init, fp), (_, _, q) = runs["none"], runs["int8"]
    start, ref, got = _loss(init), _loss(fp[-1]["eval"]), _loss(q[-1]["eval"])
    assert ref < start - 0.2  # fp32 learned something, so the comparison means something
    assert abs(got - ref) <= 0.02 * ref, (start, ref, got)
    assert got < start - 0.9 * (start - ref)  # and int8 made at least 90% of fp32's progress
    # what it saved: int8 values + per-token scales + lengths, adapters in bf16
    assert q[-1]["bytes"]["end_edge_up"] < fp[-1]["bytes"]["end_edge_up"] / 6
    assert q[-1]["bytes"]["edge_cloud_up"] * 2 == fp[-1]["bytes"]["edge_cloud_up"]


# ----------------------------------------------------------------------------- message audit
def _private_rows(cfg) -> set[tuple]:
    from gaisnet_ray.data import device_examples, encode_examples
    from gaisnet_ray.models.tokenizer import build_byte_tokenizer
    from gaisnet_ray.schemes.topology import devices_by_edge

    ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    rows = set()
    for examples in device_examples(cfg.data, ids).values():
        enc = encode_examples(examples, build_byte_tokenizer(), cfg.model.max_seq_len)
        rows |= {tuple(r) for r in enc["input_ids"].tolist()} | {tuple(r) for r in enc["labels"].tolist()}
    return rows


def _audit(records, hidden: int, seq_len: int, private: set[tuple]) -> int:
    """tests/test_ray_run.py's rule for the end-edge link: every tensor is a float, or an encoded
    activation's int8 values / int32 lengths (``audit_wire_leaf``); no row is a private token row."""
    n = 0
    for r in records:
        for path, leaf, parent in walk_payload(r["payload"], f"{r['node']}.{r['method']}.{r['direction']}"):
            if not isinstance(leaf, torch.Tensor):
                continue
            n += 1
            if not leaf.is_floating_point():
                assert audit_wire_leaf(path, leaf, parent, hidden, seq_len), f"non-float tensor at {path}"
            if leaf.dim() == 2:
                assert not any(tuple(row) in private for row in leaf.long().tolist()), path
    return n


def test_audit_passes_on_int8_messages(monkeypatch):
    """One int8 round with every split call recorded as the Ray actors record it."""
    import gaisnet_ray.inprocess as inprocess

    audit = MessageAudit("edge-link", True)

    class AuditedLink(inprocess.DirectEdgeLink):
        def forward(self, hidden):
            audit.record("forward", "in", {"args": [self.cluster_id, self.device_id, hidden]})
            out = super().forward(hidden)
            audit.record("forward", "out", out)
            return out

        def backward(self, grad):
            audit.record("backward", "in", {"args": [self.cluster_id, self.device_id, grad]})
            out = super().backward(grad)
            audit.record("backward", "out", out)
            return out

    monkeypatch.setattr(inprocess, "DirectEdgeLink", AuditedLink)
    net, _, _ = _train("int8", 1)
    cfg = net.cfg
    hidden = int(net.cloud.package.config["n_embd"])
    assert len(audit.records) == 4 * cfg.topology.num_devices * cfg.training.local_steps
    assert all(r["payload"]["__type__"] == "WireTensor" for r in audit.records if r["direction"] == "out")
    n = _audit(audit.records, hidden, cfg.model.max_seq_len, _private_rows(cfg))
    assert n == len(audit.records) * 3  # values, scale, lengths in every message: all inspected


def test_audit_rule_refuses_token_batches():
    """What ``audit_wire_leaf`` lets through is exactly an encoded activation's int8 values and
    int32 lengths: a token batch is refused whether bare, int8, or inside a WireTensor."""
    seq, hid = 48, 64
    ids = torch.randint(0, 120, (8, seq))  # (B, T) token ids
    ok = _plain(WireTensor("int8", torch.zeros(5, hid, dtype=torch.int8), torch.ones(5), torch.tensor(
        [3, 2, 0, 0, 0, 0, 0, 0], dtype=torch.int32), seq))
    assert audit_wire_leaf("x/values", ok["values"], ok, hid, seq)
    assert audit_wire_leaf("x/lengths", ok["lengths"], ok, hid, seq)
    assert not audit_wire_leaf("x/values", ids, {}, hid, seq)  # a bare batch
    assert not audit_wire_leaf("x/values", ids, ok, hid, seq)  # int64 (B, T) in a wire message
    forged = {**ok, "values": ids.to(torch.int8), "lengths": torch.full((8,), seq, dtype=torch.int32),
              "scale": torch.ones(8)}
    assert not audit_wire_leaf("x/values", forged["values"], forged, hid, seq)  # (B, T) is not (N, H)
    no_scale = {**ok, "scale": None}
    assert not audit_wire_leaf("x/values", ok["values"], no_scale, hid, seq)
    wrong_rows = {**ok, "lengths": torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32)}
    assert not audit_wire_leaf("x/values", ok["values"], wrong_rows, hid, seq)  # N != sum(lengths)
    too_long = {**ok, "lengths": torch.tensor([seq + 1], dtype=torch.int32)}
    assert not audit_wire_leaf("x/lengths", too_long["lengths"], too_long, hid, seq)
    assert not audit_wire_leaf("x/lengths", ids[0], ok, hid, seq)  # int64: not the codec's lengths
    assert not audit_wire_leaf("x/other", ok["values"], ok, hid, seq)


def test_planner_prices_a_message_as_the_codec_sends_it():
    """The planner's cost model (``planner.cost.RoundShape``) counts a full-length message and an
    adapter at the codec's size: equal to the wire bytes of a batch without padding."""
    from gaisnet_ray.planner.cost import RoundShape

    tiny_gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_inner": 192, "vocab_size": 260,
                 "n_positions": 64, "tie_word_embeddings": True}
    cfg = load_config(TINY_YAML, HFSL_JOB)
    b, t = cfg.training.batch_size, cfg.model.max_seq_len
    x = torch.randn(b, t, int(tiny_gpt2["n_embd"]))
    full = torch.full((b,), t)
    for name in ("none", "fp32", "bf16", "int8"):
        shape = RoundShape.from_config(load_config(TINY_YAML, HFSL_JOB + [f"links.codec={name}"]), tiny_gpt2)
        assert shape.hidden_bytes() == payload_nbytes(LinkCodec(name).encode(x, full)), name
        ratio = 2 if name in ("bf16", "int8") else 1
        assert shape.adapter_bytes(2) * ratio == RoundShape.from_config(cfg, tiny_gpt2).adapter_bytes(2)
