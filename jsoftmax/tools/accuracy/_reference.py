r"""The arbitrary-precision reference (mpmath).

It handles the cases that defeat a naive high-precision evaluation: the log-sum-exp is
$\log c + \operatorname{log1p}(r / c)$ with `c` the number of maximal entries
and `r` the sum over the others, and $1 - p_k$ for a maximal entry is formed
from the other terms, so a dominant logit whose probability is $1 - 10^{-100}$ is
still resolved.
"""

from __future__ import annotations

import math

import numpy as np


def split(values) -> tuple[np.ndarray, np.ndarray]:
    """mpf values to a float64 (hi, lo) pair: `hi` the nearest float64, `lo` the
    rest (0 where `hi` is infinite)."""
    hi = np.array([float(v) for v in values], np.float64)
    with np.errstate(invalid="ignore"):
        lo = np.array(
            [float(v - h) if math.isfinite(h) else 0.0 for v, h in zip(values, hi, strict=True)],
            np.float64,
        )
    return hi, lo


class ExactRow:
    """Exact softmax quantities of one row, from its distinct values and multiplicities.

    `x` holds float64 logits, `valid` the entries that take part (masked entries and
    `-inf` get probability 0). Uses mpmath at its current working precision.
    """

    def __init__(self, x: np.ndarray, valid: np.ndarray):
        import mpmath

        self.mp = mpmath.mp
        self.n = x.size
        self.fin = valid & np.isfinite(x)
        self.any = bool(self.fin.any())
        mpf = mpmath.mpf
        if not self.any:
            return
        uniq, inv, cnt = np.unique(x[self.fin], return_inverse=True, return_counts=True)
        self.inv = np.full(self.n, -1, np.int64)
        self.inv[self.fin] = inv
        m = mpf(float(uniq[-1]))
        d = [mpf(float(u)) - m for u in uniq]
        e = [mpmath.exp(v) for v in d]
        c_max = int(cnt[-1])
        rest = mpmath.fsum(int(c) * v for c, v in zip(cnt[:-1], e[:-1], strict=True))
        total = c_max + rest
        log_total = mpmath.log(c_max) + mpmath.log1p(rest / c_max)
        self.p_u = [v / total for v in e]
        self.logp_u = [v - log_total for v in d]
        # 1 - p for each distinct value, without cancellation for the maximum.
        self.q_u = [(total - v) / total for v in e[:-1]] + [((c_max - 1) + rest) / total]
        self.k = int(np.flatnonzero(self.fin & (x == uniq[-1]))[0])  # one maximal entry

    def values(self, log: bool) -> tuple[np.ndarray, np.ndarray]:
        """Exact softmax (or log_softmax) of every entry as a (hi, lo) float64 pair."""
        fill = -np.inf if log else 0.0
        hi = np.full(self.n, fill)
        lo = np.zeros(self.n)
        if self.any:
            u_hi, u_lo = split(self.logp_u if log else self.p_u)
            hi[self.fin] = u_hi[self.inv[self.fin]]
            lo[self.fin] = u_lo[self.inv[self.fin]]
        return hi, lo

    def _p(self, i: int | np.integer):
        return self.p_u[self.inv[i]]

    def jac_product(self, g: np.ndarray):
        r"""Exact $p_i (g_i - \langle p, g\rangle)$, shifted by `g` at a maximum."""
        out = [self.mp.mpf(0)] * self.n
        if not self.any:
            return out
        idx = np.flatnonzero(self.fin)
        gk = self.mp.mpf(float(g[self.k]))
        w = self.mp.fsum(self._p(j) * (float(g[j]) - gk) for j in idx)
        for i in idx:
            out[i] = self._p(i) * ((float(g[i]) - gk) - w)
        return out

    def log_vjp(self, g: np.ndarray):
        """Exact `g - p * sum(g)` (`g` is zero at non-finite outputs)."""
        out = [self.mp.mpf(0)] * self.n
        if not self.any:
            return out
        idx = np.flatnonzero(self.fin)
        total = self.mp.fsum(self.mp.mpf(float(g[j])) for j in idx)
        for i in idx:
            out[i] = float(g[i]) - self._p(i) * total
        return out

    def jacobian(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact `diag(p) - p p^T` as a (hi, lo) pair of `(n, n)` arrays."""
        if not self.any:
            z = np.zeros((self.n, self.n))
            return z, z.copy()
        p = [self._p(i) if self.fin[i] else self.mp.mpf(0) for i in range(self.n)]
        p_hi, p_lo = split(p)
        pl = p_hi.astype(np.longdouble) + p_lo.astype(np.longdouble)
        full = -pl[:, None] * pl[None, :]
        hi = full.astype(np.float64)
        lo = (full - hi.astype(np.longdouble)).astype(np.float64)
        idx = np.flatnonzero(self.fin)
        d_hi, d_lo = split([self._p(i) * self.q_u[self.inv[i]] for i in idx])
        hi[idx, idx] = d_hi
        lo[idx, idx] = d_lo
        return hi, lo

    def cross_entropy(self, label: int):
        """Exact `-log p_label` and gradient `p - onehot(label)` (mpf)."""
        loss = -self.logp_u[self.inv[label]]
        grad = [self._p(i) if self.fin[i] else self.mp.mpf(0) for i in range(self.n)]
        grad[label] = -self.q_u[self.inv[label]]
        return loss, grad
