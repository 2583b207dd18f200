"""Secure aggregation of device adapters: the aggregator learns the weighted sum, not the parts.

The protocol of Bonawitz et al. (CCS 2017), one round, semi-honest aggregator, as Flower's SecAgg+
runs it (with every pair of members as neighbours):

1. every member draws an X25519 key pair and advertises its public key;
2. every member Shamir-shares (threshold ``t``) its private key and a fresh self-mask seed ``b_i``
   with every other member (``sealed_shares``: AES-GCM under a second, channel key pair, so the
   aggregator relaying them cannot open them; ``secure_fedavg`` below hands them over in the clear);
3. a member sends ``y_i = enc(w_i * x_i) + PRG(b_i) + sum_j +-PRG(s_ij) (mod 2^48)``, where
   ``s_ij`` is the pairwise secret of i and j (X25519 + SHA-256) and the sign is + for i < j;
   the pairwise masks cancel in the sum over members;
4. for every member that dropped before sending ``y``, at least ``t`` survivors reveal their shares
   of its private key, so the aggregator rebuilds the masks the survivors added toward it; for every
   survivor they reveal the shares of ``b_i``, so its self-mask is removed. Never both for one
   member, so no single ``x_i`` is ever unmasked.

Encoding is fixed point (``SCALE`` = 2^24) in Z_(2^48); the weight ``w_i`` rides as one more
coordinate, so the aggregator gets ``sum w_i x_i`` and ``sum w_i`` and divides: weighted FedAvg. With
FFA-LoRA (``peft.freeze_a``) A is the same everywhere, so the average of B is the average of the
weight updates exactly, masked or not; a robust rule (median, trimmed mean) or server-side clipping
cannot run on masked inputs (members must clip themselves). The PRG is AES-256-CTR.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MOD_BITS = 48
MOD = 1 << MOD_BITS
SCALE = float(1 << 24)
PRIME = (1 << 521) - 1  # Shamir field: holds 256-bit secrets


class SecAggError(ValueError):
    """The protocol cannot finish (too few survivors, a value out of range). Names the cause."""


# --------------------------------------------------------------------------------- primitives
def prg(seed: bytes, n: int) -> torch.Tensor:
    """n pseudo-random int64 values in [0, 2^48) from a 32-byte seed (AES-256-CTR keystream)."""
    enc = Cipher(algorithms.AES(hashlib.sha256(seed).digest()), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(enc.update(b"\0" * (8 * n)), dtype=np.uint64) & np.uint64(MOD - 1)
    return torch.from_numpy(words.astype(np.int64))


def share(secret: int, n: int, t: int, rng: secrets.SystemRandom) -> list[tuple[int, int]]:
    """Shamir: ``n`` shares (x, y) of ``secret`` over GF(2^521 - 1); any ``t`` rebuild it."""
    coeffs = [secret] + [rng.randrange(PRIME) for _ in range(t - 1)]
    return [(x, sum(c * pow(x, k, PRIME) for k, c in enumerate(coeffs)) % PRIME) for x in range(1, n + 1)]


def reconstruct(shares: list[tuple[int, int]]) -> int:
    """The secret from ``t`` or more shares (Lagrange interpolation at 0)."""
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num, den = num * -xj % PRIME, den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def encode(vec: torch.Tensor) -> torch.Tensor:
    """float (n,) -> fixed point in Z_(2^48) as int64."""
    q = torch.round(vec.double() * SCALE)
    if q.abs().max() >= MOD // 4:
        raise SecAggError(f"a value of magnitude {float(vec.abs().max()):.3g} is out of the fixed-point range")
    return q.to(torch.int64) % MOD


def decode(q: torch.Tensor) -> torch.Tensor:
    """Z_(2^48) -> signed float (values >= 2^47 are negative)."""
    q = q % MOD
    return torch.where(q >= MOD // 2, q - MOD, q).double() / SCALE


def _pk_bytes(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pair_seed(sk: X25519PrivateKey, peer_pk: bytes) -> bytes:
    return hashlib.sha256(b"gaisnet-secagg-pair" + sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))).digest()


def _channel_key(ck: X25519PrivateKey, peer_ck: bytes) -> AESGCM:
    shared = ck.exchange(X25519PublicKey.from_public_bytes(peer_ck))
    return AESGCM(hashlib.sha256(b"gaisnet-secagg-channel" + shared).digest())


_SHARE_BYTES = 4 + 66  # x (member number) and y < 2^521


def _pack_shares(shares: tuple[tuple[int, int], tuple[int, int]]) -> bytes:
    return b"".join(x.to_bytes(4, "little") + y.to_bytes(66, "little") for x, y in shares)


def _unpack_shares(raw: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    if len(raw) != 2 * _SHARE_BYTES:
        raise SecAggError(f"a sealed share pair holds {len(raw)} bytes, not {2 * _SHARE_BYTES}")
    parts = [raw[k:k + _SHARE_BYTES] for k in (0, _SHARE_BYTES)]
    a, b = ((int.from_bytes(p[:4], "little"), int.from_bytes(p[4:], "little")) for p in parts)
    return a, b


def _nonce(sender: int, recipient: int) -> bytes:
    """Each direction of a pair has its own nonce (the pair's key is symmetric and fresh per round)."""
    return sender.to_bytes(6, "little") + recipient.to_bytes(6, "little")


# ------------------------------------------------------------------------------------ members
@dataclass
class UnmaskReply:
    """What one survivor reveals in step 4: shares of survivors' self-mask seeds and of dropped
    members' private keys (member index -> share)."""

    seed_shares: dict[int, tuple[int, int]]
    key_shares: dict[int, tuple[int, int]]


class SecAggMember:
    """One device in the protocol (index ``i`` of ``n``; indices fix the sign of each pair mask).

    Two key pairs, as in Bonawitz et al.: ``public_key`` (masking: pair seeds, Shamir-shared so a
    dropout's masks can be rebuilt) and ``channel_key`` (sealing the shares to each peer with
    AES-GCM, so the member relaying them, the edge, cannot read them; never shared, so rebuilding a
    dropped member's masking key opens none of the shares it was sent)."""

    def __init__(self, index: int, n: int, threshold: int):
        self.index, self.n, self.t = index, n, threshold
        self._rng = secrets.SystemRandom()
        self._sk = X25519PrivateKey.generate()
        self._ck = X25519PrivateKey.generate()
        self.channel_key = _pk_bytes(self._ck.public_key())
        self._seed = secrets.token_bytes(32)  # b_i
        self.public_key = _pk_bytes(self._sk.public_key())  # step 1: advertised
        self._held: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # owner -> (seed share, key share)
        self._roster: dict[int, bytes] = {}

    def shares_for_peers(self, roster: dict[int, bytes]) -> dict[int, tuple[tuple[int, int], tuple[int, int]]]:
        """Step 2: this member's (seed share, key share) for each member index (itself included)."""
        self._roster = dict(roster)
        sk_int = int.from_bytes(self._sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption()), "little")
        seeds = share(int.from_bytes(self._seed, "little"), self.n, self.t, self._rng)
        keys = share(sk_int, self.n, self.t, self._rng)
        return {j: (seeds[j], keys[j]) for j in range(self.n)}

    def receive(self, owner: int, shares: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self._held[owner] = shares

    def sealed_shares(self, roster: dict[int, bytes], channels: dict[int, bytes], context: bytes) -> dict[int, bytes]:
        """Step 2 over an untrusted relay: this member's share pair for each peer in ``roster``,
        AES-GCM-sealed under the pair's channel secret (``channels``: index -> channel key) and bound
        to ``context`` (the round) and both indices. Its own pair it keeps."""
        out = {}
        for j, sh in self.shares_for_peers(roster).items():
            if j == self.index:
                self.receive(j, sh)
            elif j in roster:
                out[j] = _channel_key(self._ck, channels[j]).encrypt(_nonce(self.index, j), _pack_shares(sh),
                                                                     context + _nonce(self.index, j))
        return out

    def open_shares(self, sealed: dict[int, bytes], channels: dict[int, bytes], context: bytes) -> None:
        """Take the share pairs peers sealed to this member (owner index -> ciphertext). The pair
        masks of this round run over exactly these owners (and this member): a peer that shared
        nothing is left out of the roster, as the aggregator leaves it out."""
        for owner, blob in sealed.items():
            ad = _nonce(owner, self.index)
            try:
                raw = _channel_key(self._ck, channels[owner]).decrypt(ad, blob, context + ad)
            except Exception as err:  # InvalidTag: tampered, replayed from another round, or misrouted
                raise SecAggError(f"member {self.index}: the share from member {owner} does not open "
                                  f"({type(err).__name__})") from None
            self.receive(owner, _unpack_shares(raw))
        self._roster = {j: pk for j, pk in self._roster.items() if j == self.index or j in sealed}

    def masked_input(self, vec: torch.Tensor, weight: float) -> torch.Tensor:
        """Step 3: (n,) float -> (n + 1,) masked int64 of [w * vec, w]."""
        y = encode(torch.cat([vec.double().flatten() * weight, torch.tensor([float(weight)], dtype=torch.float64)]))
        y = (y + prg(self._seed, y.numel())) % MOD
        for j, pk in self._roster.items():
            if j == self.index:
                continue
            m = prg(_pair_seed(self._sk, pk), y.numel())
            y = (y + m) % MOD if self.index < j else (y - m) % MOD
        return y

    def unmask(self, survivors: set[int], dropped: set[int]) -> UnmaskReply:
        """Step 4: reveal seed shares of survivors, key shares of dropped members; never both."""
        if survivors & dropped:
            raise SecAggError(f"members {sorted(survivors & dropped)} cannot be both survivors and dropped")
        return UnmaskReply({i: self._held[i][0] for i in survivors if i in self._held},
                           {j: self._held[j][1] for j in dropped if j in self._held})


# --------------------------------------------------------------------------------- aggregator
def unmask_sum(masked: dict[int, torch.Tensor], roster: dict[int, bytes], replies: list[UnmaskReply],
               threshold: int) -> tuple[torch.Tensor, float]:
    """The aggregator's step 4: from the survivors' masked inputs and their replies, the sum of
    ``w_i * x_i`` (float64) and of ``w_i``. Raises ``SecAggError`` with fewer than ``threshold`` replies."""
    survivors, dropped = set(masked), set(roster) - set(masked)
    if len(replies) < threshold or len(survivors) < threshold:
        raise SecAggError(f"{len(replies)} replies from {len(survivors)} survivors; the threshold is {threshold}")
    total = torch.zeros_like(next(iter(masked.values())))
    for y in masked.values():
        total = (total + y) % MOD
    for i in survivors:  # remove each survivor's self-mask
        seed = reconstruct([r.seed_shares[i] for r in replies][:threshold]).to_bytes(32, "little")
        total = (total - prg(seed, total.numel())) % MOD
    for j in dropped:  # remove the pair masks survivors added toward each dropped member
        sk = X25519PrivateKey.from_private_bytes(
            reconstruct([r.key_shares[j] for r in replies][:threshold]).to_bytes(32, "little"))
        for k in survivors:
            m = prg(_pair_seed(sk, roster[k]), total.numel())
            total = (total - m) % MOD if k < j else (total + m) % MOD
    out = decode(total)
    return out[:-1], float(out[-1])


def secure_fedavg(vectors: list[torch.Tensor], weights: list[float], *, threshold: int | None = None,
                  drop_after_sharing: set[int] = frozenset()) -> torch.Tensor:
    """Run the whole protocol in one process: weighted mean of ``vectors`` over the members that
    did not drop (``drop_after_sharing``: indices that shared their keys but never sent an input).
    ``threshold`` defaults to a strict majority of the members."""
    n = len(vectors)
    if n < 2:
        raise SecAggError("secure aggregation needs at least 2 members")
    t = threshold if threshold is not None else n // 2 + 1
    members = [SecAggMember(i, n, t) for i in range(n)]
    roster = {m.index: m.public_key for m in members}
    for m in members:
        for j, sh in m.shares_for_peers(roster).items():
            members[j].receive(m.index, sh)
    alive = [m for m in members if m.index not in drop_after_sharing]
    masked = {m.index: m.masked_input(vectors[m.index], weights[m.index]) for m in alive}
    replies = [m.unmask(set(masked), set(roster) - set(masked)) for m in alive]
    total, weight = unmask_sum(masked, roster, replies, t)
    if weight <= 0:
        raise SecAggError(f"the surviving weights sum to {weight}")
    return (total / weight).to(vectors[0].dtype)
