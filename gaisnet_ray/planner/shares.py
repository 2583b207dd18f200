"""Each cluster's share of its edge's link: minimize the slowest cluster (clusters run in parallel).

A cluster's time ``T_c(s) = sum over members of min over their options of
compute + up_bits / min(up_link, s W) + down_bits / min(down_link, s W)`` falls as its share ``s``
of the edge's bandwidth ``W`` grows. The shares minimizing ``max_c T_c(s_c)`` with ``sum s_c = 1``
make every cluster that can use more bandwidth finish together: bisection on the round time T, and
for each T the smallest share each cluster needs (exactly: see ``_Curve``).
Shares left over (members capped by their own links) are handed out in proportion.
"""

from __future__ import annotations

import math

import numpy as np

ITERATIONS = 32  # each bisection halves its bracket: 2^-32 of the range


class MemberTerms:
    """Per member (rows) and option (columns): compute seconds and bits up/down; per member its
    own link rates; ``cluster``: the member's cluster index."""

    def __init__(self, compute, up_bits, down_bits, up_bps, down_bps, cluster, clusters: int, bandwidth_bps: float):
        self.compute = np.atleast_2d(np.asarray(compute, dtype=float))
        self.up = np.atleast_2d(np.asarray(up_bits, dtype=float))
        self.down = np.atleast_2d(np.asarray(down_bits, dtype=float))
        self.up_bps = np.asarray(up_bps, dtype=float)
        self.down_bps = np.asarray(down_bps, dtype=float)
        self.cluster = np.asarray(cluster, dtype=int)
        self.k = clusters
        self.w = bandwidth_bps

    def member_times(self, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(time of each member's best option, which option) at the clusters' ``shares``."""
        x = shares[self.cluster] * self.w
        up = self.up / np.minimum(self.up_bps, x)[:, None]
        down = self.down / np.minimum(self.down_bps, x)[:, None]
        t = self.compute + up + down
        best = np.argmin(t, axis=1)
        return t[np.arange(len(best)), best], best

    def cluster_times(self, shares: np.ndarray) -> np.ndarray:
        return np.bincount(self.cluster, self.member_times(shares)[0], minlength=self.k)


def equal_shares(terms: MemberTerms) -> tuple[float, np.ndarray]:
    s = np.full(terms.k, 1.0 / terms.k)
    return float(terms.cluster_times(s).max()), s


class _Curve:
    """One cluster's time as a function of its rate x = s W. Between consecutive breakpoints (the
    members' link caps, and the rate where a member's best cut option changes: the difference of
    two options is monotone in x, so it changes at most once) it is ``A + B / x``, so the least x
    meeting a time T is found exactly, segment by segment."""

    def __init__(self, compute: np.ndarray, up: np.ndarray, down: np.ndarray, up_bps: np.ndarray, down_bps: np.ndarray):
        self.c, self.u, self.d = compute, up, down  # (members, options)
        self.cu, self.cd = up_bps, down_bps
        top = float(max(up_bps.max(), down_bps.max()))
        points = set(up_bps.tolist()) | set(down_bps.tolist())
        if compute.shape[1] > 1:
            for i in range(compute.shape[0]):
                x = self._crossing(i, top)
                if x is not None:
                    points.add(x)
        self.bp = sorted(points)
        self.segments = []  # (x_lo, x_hi, A, B, time at x_hi)
        lo = 0.0
        for hi in self.bp + [math.inf]:
            probe = hi / 2 if lo == 0 else (math.sqrt(lo * hi) if math.isfinite(hi) else 2 * lo)
            a, b = self._form(probe)
            self.segments.append((lo, hi, a, b, a + b / hi if math.isfinite(hi) else a))
            lo = hi

    def _form(self, x: float) -> tuple[float, float]:
        """(A, B) of ``A + B / x`` on the segment holding ``x``: each member's best option there, the
        transfers whose own link caps below x at bits / cap, the others at bits / x."""
        a = b = 0.0
        for i in range(self.c.shape[0]):
            o = int(np.argmin(self._member(i, x)))
            a += self.c[i, o]
            for bits, cap in ((self.u[i, o], self.cu[i]), (self.d[i, o], self.cd[i])):
                if cap <= x:
                    a += bits / cap
                else:
                    b += bits
        return float(a), float(b)

    def _member(self, i: int, x: float) -> np.ndarray:
        return self.c[i] + self.u[i] / min(self.cu[i], x) + self.d[i] / min(self.cd[i], x)

    def time(self, x: float) -> float:
        return float(sum(self._member(i, x).min() for i in range(self.c.shape[0])))

    def _crossing(self, i: int, top: float) -> float | None:
        def g(x: float) -> float:
            t = self._member(i, x)
            return t[0] - t[1]

        lo, hi = top * 1e-9, top
        if (g(lo) > 0) == (g(hi) > 0):
            return None
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if (g(mid) > 0) == (g(lo) > 0):
                lo = mid
            else:
                hi = mid
        return hi

    def rate_for(self, t: float) -> float:
        """The least rate x with time(x) <= t (inf when no rate can)."""
        for lo, hi, a, b, at_hi in self.segments:
            if at_hi <= t * (1 + 1e-12):
                if b <= 0:
                    return lo
                room = t - a
                return max(lo, min(hi, b / room)) if room > 0 else hi
        return math.inf


class _CapCurve:
    """``_Curve`` for members with one option each (the heuristic's case), with prefix sums: between
    consecutive caps the time is ``base + P_j + Q_j / x`` (the j lowest caps bind)."""

    def __init__(self, compute: np.ndarray, up: np.ndarray, down: np.ndarray, up_bps: np.ndarray, down_bps: np.ndarray):
        bits = np.concatenate([up[:, 0], down[:, 0]])
        caps = np.concatenate([up_bps, down_bps])
        order = np.argsort(caps)
        self.caps, bits = caps[order].tolist(), bits[order]
        self.base = float(compute[:, 0].sum())
        self.fixed = np.concatenate([[0.0], np.cumsum(bits / caps[order])]).tolist()
        self.free = np.concatenate([[bits.sum()], bits.sum() - np.cumsum(bits)]).tolist()

    def rate_for(self, t: float) -> float:
        n = len(self.caps)
        for j in range(n + 1):
            at_hi = self.base + self.fixed[j] + (self.free[j] / self.caps[j] if j < n else 0.0)
            if at_hi <= t * (1 + 1e-12):
                lo = self.caps[j - 1] if j > 0 else 0.0
                room = t - self.base - self.fixed[j]
                if self.free[j] <= 0:
                    return lo
                return max(lo, self.free[j] / room) if room > 0 else (self.caps[j] if j < n else math.inf)
        return math.inf


def _fast_needed(terms: MemberTerms):
    curves = []
    for c in range(terms.k):
        m = terms.cluster == c
        kind = _CapCurve if terms.compute.shape[1] == 1 else _Curve
        curves.append(kind(terms.compute[m], terms.up[m], terms.down[m], terms.up_bps[m], terms.down_bps[m]))
    return lambda t: np.array([cv.rate_for(t) for cv in curves]) / terms.w


def optimal_shares(terms: MemberTerms) -> tuple[float, np.ndarray]:
    """(the slowest cluster's time, each cluster's share) minimizing the slowest cluster."""
    k = terms.k
    if k == 1:
        s = np.ones(1)
        return float(terms.cluster_times(s)[0]), s
    t_hi, s_hi = equal_shares(terms)  # feasible
    t_lo = float(terms.cluster_times(np.ones(k)).max())  # no cluster can beat its time with the whole link
    if t_hi - t_lo <= 1e-12 * max(t_hi, 1e-12):
        return t_hi, s_hi

    needed = _fast_needed(terms)
    best = s_hi
    for _ in range(ITERATIONS + 8):
        t = (t_lo + t_hi) / 2
        s = np.clip(needed(t), 1e-15, None)
        if s.sum() <= 1.0:
            t_hi, best = t, s
        else:
            t_lo = t
    best = best / best.sum()  # leftover bandwidth, in proportion: no cluster gets slower
    return float(terms.cluster_times(best).max()), best
