"""Secure aggregation inside one edge's round (``privacy.secure_aggregation``): the round protocol
over ``secagg.py``, so that under ``fl`` an edge learns the weighted sum of its devices' adapters,
never one device's.

Why here and not in the edge or the device: both runtimes (the Ray driver and the in-process loop)
carry out the same four steps with different calls, and the device and the edge each hold one
side's state. The steps, per edge and round (Bonawitz et al. 2017, every pair of members
neighbours):

1. *advertise* (at the edge's ``BeginEdge``): each planned member draws two X25519 key pairs and
   sends the public halves; the edge keeps the roster and relays it;
2. *share*: each member Shamir-shares its masking key and self-mask seed (threshold: a strict
   majority of the planned members) and seals each peer's share pair to that peer (AES-GCM under a
   channel secret the edge does not have); the edge routes the sealed pairs. A member that
   advertised but did not share is left out of everyone's roster;
3. *mask* (end of the device's turn): the trained adapter, flattened in key order and scaled by the
   device's sample count, plus the count itself, masked in Z(2^48) — the edge receives only this;
4. *unmask* (at ``FinishEdge``): each survivor (its masked update arrived) reveals its shares of the
   survivors' seeds and of the dropped members' masking keys (never both for one member); the edge
   removes the masks and divides: weighted FedAvg of the survivors.

Where it cannot work the run is refused before it starts (``check_secure_aggregation``). The link
is modeled as the library's: in a deployment the relayed messages would also be signed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..knowledge.accounting import payload_nbytes
from .secagg import SecAggError, SecAggMember, UnmaskReply, unmask_sum
from .secagg_check import check_secure_aggregation  # noqa: F401 - the runtimes import it from here too

__all__ = ["DeviceSecAgg", "EdgeSecAgg", "KeyOffer", "check_secure_aggregation", "direct_exchange", "exchange_keys",
           "flatten", "members_of", "reveal_sets", "threshold_for", "unflatten"]

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------- vector layout
def flatten(state: StateDict) -> torch.Tensor:
    """An adapter as one float64 vector, keys in sorted order (both sides use this order)."""
    return torch.cat([state[k].detach().double().flatten() for k in sorted(state)])


def unflatten(vec: torch.Tensor, reference: StateDict) -> StateDict:
    """The inverse of ``flatten`` on ``reference``'s keys, shapes and dtypes."""
    sizes = [reference[k].numel() for k in sorted(reference)]
    if sum(sizes) != vec.numel():
        raise SecAggError(f"the unmasked sum has {vec.numel()} values; the adapter has {sum(sizes)}")
    out, at = {}, 0
    for k, n in zip(sorted(reference), sizes):
        out[k] = vec[at:at + n].reshape(reference[k].shape).to(reference[k].dtype)
        at += n
    return out


def threshold_for(n: int) -> int:
    """Survivors needed to unmask: a strict majority of the planned members."""
    return n // 2 + 1


def _context(edge: str, round_idx: int) -> bytes:
    return f"gaisnet-secagg/{edge}/{round_idx}/".encode()


@dataclass(frozen=True)
class KeyOffer:
    """Step 1: what a member advertises (public keys only)."""

    device_id: str
    index: int
    mask_key: bytes
    channel_key: bytes


# --------------------------------------------------------------------------------- device
class DeviceSecAgg:
    """One device's side; a fresh ``SecAggMember`` every round (keys are never reused)."""

    def __init__(self, device_id: str):
        self.device_id = device_id
        self._member: SecAggMember | None = None
        self._context = b""
        self._channels: dict[int, bytes] = {}
        self._received = False

    def advertise(self, edge: str, round_idx: int, index: int, n: int, threshold: int) -> KeyOffer:
        self._member = SecAggMember(index, n, threshold)
        self._received = False  # masks only after the key exchange completed (its inbox arrived)
        self._context = _context(edge, round_idx)
        return KeyOffer(self.device_id, index, self._member.public_key, self._member.channel_key)

    def share(self, offers: list[KeyOffer]) -> dict[int, bytes]:
        """Step 2: the share pairs sealed to each peer (peer index -> ciphertext)."""
        m = self._need()
        self._channels = {o.index: o.channel_key for o in offers}
        return m.sealed_shares({o.index: o.mask_key for o in offers}, self._channels, self._context)

    def receive(self, sealed: dict[int, bytes]) -> None:
        self._need().open_shares(sealed, self._channels, self._context)
        self._received = True

    def seal(self, result):
        """Step 3: the turn's result with its adapter replaced by the masked vector (the edge gets
        no plain adapter). The link count: the masked int64 vector instead of the float adapter."""
        m = self._need()
        if not self._received:  # left out of the roster (it did not share in time): it sits this round out
            raise SecAggError(f"{self.device_id} did not complete this round's key exchange; its update cannot be "
                              "unmasked with the others")
        masked = m.masked_input(flatten(result.adapter), float(result.num_samples))
        link = replace(result.link, bytes_up=result.link.bytes_up - payload_nbytes(result.adapter)
                       + masked.numel() * masked.element_size())
        return replace(result, adapter={}, masked=masked, link=link)

    def reveal(self, survivors: list[int], dropped: list[int]) -> UnmaskReply:
        """Step 4 (only after this member's masked update was delivered)."""
        reply = self._need().unmask(set(survivors), set(dropped))
        self._member = None  # one round, one reveal
        return reply

    def _need(self) -> SecAggMember:
        if self._member is None:
            raise SecAggError(f"{self.device_id} has no secure-aggregation keys for this round "
                              "(it missed the key exchange, or already revealed)")
        return self._member


# ----------------------------------------------------------------------------------- edge
class EdgeSecAgg:
    """The edge's side for one round: the roster it relays, the routing, and the unmasking."""

    def __init__(self, edge: str, offers: list[KeyOffer], threshold: int):
        self.edge, self.threshold = edge, threshold
        self.offers = {o.device_id: o for o in offers}
        self.bytes = sum(len(o.mask_key) + len(o.channel_key) for o in offers) * (1 + len(offers))  # in + relayed

    def route(self, sealed: dict[str, dict[int, bytes]]) -> dict[str, dict[int, bytes]]:
        """Step 2's relay: each sharing member's inbox (owner index -> ciphertext). A member that
        did not share leaves the roster."""
        self.offers = {d: o for d, o in self.offers.items() if d in sealed}
        inbox: dict[str, dict[int, bytes]] = {d: {} for d in self.offers}
        by_index = {o.index: d for d, o in self.offers.items()}
        for owner, blobs in sealed.items():
            for j, blob in blobs.items():
                if j in by_index:
                    inbox[by_index[j]][self.offers[owner].index] = blob
                    self.bytes += 2 * len(blob)
        return inbox

    def mean(self, masked: dict[str, torch.Tensor], replies: list[UnmaskReply],
             reference: StateDict) -> tuple[StateDict, dict]:
        """Step 4: the survivors' weighted mean adapter (on ``reference``'s layout) and what it cost."""
        t0 = time.perf_counter()
        unknown = sorted(set(masked) - set(self.offers))
        if unknown:
            raise SecAggError(f"{self.edge}: masked updates from devices outside the round's roster: {unknown}")
        roster = {o.index: o.mask_key for o in self.offers.values()}
        total, weight = unmask_sum({self.offers[d].index: y for d, y in masked.items()}, roster, replies,
                                   self.threshold)
        if weight <= 0:
            raise SecAggError(f"{self.edge}: the surviving weights sum to {weight}")
        reply_bytes = sum(66 * (len(r.seed_shares) + len(r.key_shares)) for r in replies)
        info = {"members": len(self.offers), "survivors": len(masked), "threshold": self.threshold,
                "key_exchange_bytes": self.bytes, "masked_bytes": sum(y.numel() * y.element_size()
                                                                     for y in masked.values()),
                "unmask_bytes": reply_bytes, "unmask_s": round(time.perf_counter() - t0, 4)}
        return unflatten(total / weight, reference), info


# ------------------------------------------------------------------------- orchestration
def reveal_sets(roster: dict[str, int], finished: list[str]) -> tuple[list[int], list[int]]:
    """(survivors, dropped) as member indices of ``roster`` (device -> index, from
    ``exchange_keys``), given the devices whose masked update reached the edge."""
    alive = {roster[d] for d in finished if d in roster}
    return sorted(alive), sorted(i for i in roster.values() if i not in alive)


def exchange_keys(edge: str, round_idx: int, members: list[str], *,
                  advertise: Callable[[dict[str, tuple]], dict[str, KeyOffer]],
                  begin: Callable[[list[KeyOffer], int], list[KeyOffer]],
                  share: Callable[[dict[str, list[KeyOffer]]], dict[str, dict[int, bytes]]],
                  route: Callable[[dict[str, dict[int, bytes]]], dict[str, dict[int, bytes]]],
                  deliver: Callable[[dict[str, dict[int, bytes]]], None]) -> dict[str, int]:
    """Steps 1-2 for one edge's round, the same in both runtimes; each callable carries one step
    out for many devices at once and leaves out those that did not answer:

    ``advertise({device: (edge, round, index, n, threshold)}) -> {device: KeyOffer}``;
    ``begin(offers, threshold) -> offers`` (the edge keeps the roster and relays it);
    ``share({device: roster}) -> {device: sealed}``; ``route(sealed) -> {device: inbox}`` (the edge);
    ``deliver({device: inbox})``. Returns the final roster (device -> member index): the members
    whose masked update the edge can unmask.
    """
    n = len(members)
    t = threshold_for(n)
    offers = advertise({d: (edge, round_idx, i, n, t) for i, d in enumerate(members)})
    roster = begin([offers[d] for d in members if d in offers], t)
    sealed = share({o.device_id: roster for o in roster})
    inboxes = route(sealed)
    deliver(inboxes)
    return {d: offers[d].index for d in inboxes}


def members_of(clusters: dict[str, list[str]]) -> list[str]:
    """An edge's round members in plan order (under fl each cluster is one device)."""
    return [d for ms in clusters.values() for d in ms]


def direct_exchange(edge, devices: dict, round_idx: int, clusters: dict[str, list[str]]) -> dict[str, int]:
    """``exchange_keys`` as direct calls (the in-process runtime): ``edge`` an ``EdgeTrainer``,
    ``devices`` device -> ``DeviceTrainer`` (each with its ``secagg`` side)."""
    return exchange_keys(
        edge.edge_id, round_idx, members_of(clusters),
        advertise=lambda asks: {d: devices[d].secagg.advertise(*a) for d, a in asks.items()},
        begin=edge.secagg_begin,
        share=lambda rosters: {d: devices[d].secagg.share(r) for d, r in rosters.items()},
        route=edge.secagg_route,
        deliver=lambda inboxes: [devices[d].secagg.receive(box) for d, box in inboxes.items()])
