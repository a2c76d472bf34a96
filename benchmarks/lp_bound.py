"""Lower bound on the number of packs: the LP relaxation of the Gilmore-Gomory configuration model
(cutting stock), solved by column generation, on item lengths rounded DOWN to a multiple of `g`.

    min sum_p x_p  s.t.  sum_p a_ip x_p >= d_i (every class i),  x >= 0,

over all patterns a (a_i <= d_i copies of class i whose rounded lengths fit in the capacity). Rounding
down only shrinks items, so the rounded instance needs no more packs than the real one, and its LP
value is at most its integer optimum: ceil(LP) of the rounded instance is a lower bound for the real one.

The bound reported is not the master's objective but the Farley bound of its final duals y >= 0:
sum_i d_i y_i / max_a y.a, with the max over all patterns solved exactly by the pricing knapsack. It is
valid for any y (y / max_a y.a is dual feasible), so it does not lean on the LP solver's tolerances;
at convergence (no column of reduced cost < -1e-9) it equals the LP value to within ~1e-9 relative.
Column generation also stops once ceil(Farley) = ceil(master objective) (ceil(LP) is then settled), or
at `time_limit` (then `converged` is False and `packs` is the Farley bound so far: valid, maybe weaker).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog


@dataclass(frozen=True)
class LPBound:
    packs: int  # ceil(LP) of the rounded instance: no packing of the real items uses fewer packs
    lp: float  # the Farley bound (= the LP value at convergence)
    master: float  # the restricted master's final objective (>= the LP value)
    classes: int
    columns: int
    iterations: int
    converged: bool  # ceil(LP) reached; else `packs` is the (valid, weaker) Farley bound at the limit


def _price(
    w: np.ndarray, ub: np.ndarray, y: np.ndarray, cells: int, n_cols: int = 1, tol: float = 1e-9
) -> tuple[float, list[np.ndarray]]:
    """Bounded knapsack max sum y_i a_i s.t. sum w_i a_i <= cells, 0 <= a_i <= ub_i, a integer: exact
    DP over the capacity cells, each class split into 0/1 pieces of 1, 2, 4, ... copies. Returns the
    max and up to `n_cols` distinct patterns of value > 1 + tol (the best ones at different fills)."""
    pieces_cls, pieces_k = [], []
    for i in np.flatnonzero(y > 0).tolist():
        left, k = int(ub[i]), 1
        while left > 0:
            take = min(k, left)
            pieces_cls.append(i)
            pieces_k.append(take)
            left -= take
            k *= 2
    best = np.zeros(cells + 1)
    taken = np.zeros((len(pieces_cls), cells + 1), dtype=bool)
    for j, (i, k) in enumerate(zip(pieces_cls, pieces_k, strict=True)):
        wt = k * int(w[i])
        cand = best[:-wt] + k * y[i]
        better = cand > best[wt:]
        taken[j, wt:] = better
        best[wt:] = np.where(better, cand, best[wt:])
    patterns: list[np.ndarray] = []
    seen: set[bytes] = set()
    for c0 in np.argsort(-best, kind="stable")[: 8 * n_cols].tolist():
        if best[c0] <= 1 + tol or len(patterns) >= n_cols:
            break
        a = np.zeros(len(w), dtype=np.int64)
        c = c0
        for j in range(len(pieces_cls) - 1, -1, -1):
            if taken[j, c]:
                i = pieces_cls[j]
                a[i] += pieces_k[j]
                c -= pieces_k[j] * int(w[i])
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            patterns.append(a)
    return float(best.max()), patterns


def configuration_lp_bound(
    lengths: np.ndarray,
    capacity: int,
    g: int = 16,
    tol: float = 1e-9,
    n_cols: int = 10,
    early_stop: bool = True,
    time_limit: float = math.inf,
) -> LPBound:
    """ceil of the configuration LP's value on lengths rounded down to multiples of g (see module doc)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError("every item must fit in a pack")
    cls, d = np.unique(lengths // g, return_counts=True)
    keep = cls > 0  # items shorter than g round to 0 tokens: they fit anywhere for free
    w, d = cls[keep], d[keep].astype(float)
    n, cells = len(w), capacity // g
    if n == 0:
        return LPBound(0, 0.0, 0.0, 0, 0, 0, True)
    ub = np.minimum(d.astype(np.int64), cells // w)  # copies of a class that one pattern may hold
    cols = [np.where(np.arange(n) == i, ub[i], 0) for i in range(n)]  # one class per pack
    # Dual cuts (Valerio de Carvalho): a zero-cost column covering class i with a slot of the next longer
    # class i + 1, i.e. y_i <= y_{i+1}. They only add columns, so the master still relaxes the integer
    # problem; they spare the column generation most of its degenerate iterations.
    exch = np.zeros((n, max(0, n - 1)))
    exch[np.arange(n - 1), np.arange(n - 1)] = 1.0
    exch[np.arange(1, n), np.arange(n - 1)] = -1.0
    farley, it, obj = float(d @ w) / cells, 0, math.inf  # y = w / cells is dual feasible: the L1 bound
    t0, converged = time.perf_counter(), False
    for it in range(1, 1_000_000):  # noqa: B007 (reported)
        a_mat = np.hstack([np.array(cols, dtype=float).T, exch])
        cost = np.concatenate([np.ones(len(cols)), np.zeros(n - 1)])
        res = linprog(cost, A_ub=-a_mat, b_ub=-d, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"master LP failed: {res.message}")
        obj = float(res.fun)
        y = np.maximum(0.0, -np.asarray(res.ineqlin.marginals))
        value, new = _price(w, ub, y, cells, n_cols, tol)
        if value > 0:
            farley = max(farley, float(d @ y) / max(1.0, value))
        if not new:
            converged = True  # no column of reduced cost < -tol: the master is the LP optimum
            break
        if early_stop and math.ceil(farley - 1e-7) >= math.ceil(obj - 1e-7):
            converged = True  # farley <= LP <= obj: ceil(LP) is settled though the LP is not
            break
        if time.perf_counter() - t0 > time_limit:
            break  # the Farley bound so far is still valid, if weaker
        cols.extend(new)
    packs = math.ceil(farley - 1e-7)  # the tolerance only ever lowers the bound
    return LPBound(packs, farley, obj, n, len(cols), it, converged)
