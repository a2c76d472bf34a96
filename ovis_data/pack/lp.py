"""Prices for `packing.pack_lengths`: the duals of the Gilmore-Gomory configuration LP of a length
histogram, solved by column generation with a small dense simplex and a knapsack DP for pricing, in numpy
(step 1 of the algorithm described in `packing`'s module doc)."""

from __future__ import annotations

import numpy as np

PRICE_SCALE = 1 << 20  # duals are rounded to multiples of 2^-20 and used as integers
_LP_GAP = 1e-3  # column generation stops once the Farley bound is this close to the master


def _knapsack(w: np.ndarray, ub: np.ndarray, y: np.ndarray, cells: int, n_cols: int) -> tuple[float, list]:
    """max y.a s.t. w.a <= cells, 0 <= a <= ub, a integer (exact DP over the cells, each class split in
    0/1 pieces of 1, 2, 4, ... copies). Returns the max and up to n_cols patterns of value > 1 + 1e-9,
    the best ones ending at different cells."""
    pieces = []
    for i in np.flatnonzero(y > 0).tolist():
        left, k = int(ub[i]), 1
        while left > 0:
            take = min(k, left)
            if take * int(w[i]) <= cells:
                pieces.append((i, take))
            left -= take
            k *= 2
    best = np.zeros(cells + 1)
    taken = np.zeros((len(pieces), cells + 1), dtype=bool)
    for j, (i, k) in enumerate(pieces):
        wt = k * int(w[i])
        cand = best[: cells + 1 - wt] + k * y[i]
        better = cand > best[wt:] + 1e-12
        taken[j, wt:] = better
        best[wt:] = np.where(better, cand, best[wt:])
    patterns: list[np.ndarray] = []
    seen: set[bytes] = set()
    for c0 in np.argsort(-best, kind="stable")[: 8 * n_cols].tolist():
        if best[c0] <= 1 + 1e-9 or len(patterns) >= n_cols:
            break
        a = np.zeros(len(w))
        c = c0
        for j in range(len(pieces) - 1, -1, -1):
            if taken[j, c]:
                i, k = pieces[j]
                a[i] += k
                c -= k * int(w[i])
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            patterns.append(a)
    return float(best.max()), patterns


def lp_duals(
    w: np.ndarray, d: np.ndarray, cells: int, max_pivots: int = 20000, max_rounds: int = 400
) -> np.ndarray | None:
    """Optimal duals y of  min sum x_p  s.t.  sum_p a_p x_p >= d, x >= 0  over all patterns a (w.a <= cells),
    by column generation: a dense revised simplex (explicit basis inverse, refactored every 100 pivots) on
    the patterns found so far, priced by `_knapsack`. Zero-cost exchange columns e_i - e_{i+1} (an item
    of class i may take the slot of a longer one) keep y monotone and spare degenerate pivots. Stops when
    no pattern prices out or the Farley bound d.y / max_a y.a is within _LP_GAP of the master, returning
    y / max_a y.a (dual feasible). Returns None when the LP has no waste (a fractional packing comes
    within 0.1 % of the volume w.d / cells: any full packing is optimal, and value = length is the right
    price) or when the pivot or round limits are hit first (deterministic limits, not time)."""
    m = len(w)
    volume = float(d @ w) / cells
    ub = np.minimum(np.maximum(1, np.ceil(d - 1e-9)), cells // w).astype(np.int64)
    cols = np.zeros((m, 4 * m))
    cols[np.arange(m), np.arange(m)] = ub
    n_cols = m
    # basis entries: j >= 0 a pattern column, -1 - i the surplus of row i, -1 - m - i exchange i -> i + 1
    basis = np.arange(m)
    b_inv = np.diag(1.0 / ub)
    x_b = d / ub
    c_b = np.ones(m)

    def column(q: int) -> np.ndarray:
        if q >= 0:
            return cols[:, q]
        v = np.zeros(m)
        if q >= -m:
            v[-1 - q] = -1.0
        else:
            v[-1 - m - q] = 1.0
            v[-m - q] = -1.0
        return v

    basic = np.zeros(cols.shape[1], dtype=bool)
    basic[:m] = True
    basic_s = np.zeros(m, dtype=bool)
    basic_e = np.zeros(max(0, m - 1), dtype=bool)

    def mark(q: int, on: bool) -> None:
        if q >= 0:
            basic[q] = on
        elif q >= -m:
            basic_s[-1 - q] = on
        else:
            basic_e[-1 - m - q] = on

    pivots = rounds = 0
    while pivots < max_pivots:
        y = c_b @ b_inv
        rc = np.where(basic[:n_cols], np.inf, 1.0 - y @ cols[:, :n_cols])
        rc_s = np.where(basic_s, np.inf, y)  # surplus column -e_i: reduced cost y_i
        rc_e = np.where(basic_e, np.inf, y[1:] - y[:-1])  # exchange e_i - e_{i+1}: y_{i+1} - y_i
        best = min(rc.min(), rc_s.min(), rc_e.min() if m > 1 else np.inf)
        if best > -1e-9:  # optimal on the columns so far: price all patterns
            rounds += 1
            obj = float(c_b @ x_b)
            if obj <= volume * 1.001 or rounds > max_rounds:
                return None
            y = np.maximum(y, 0.0)
            value, new = _knapsack(w, ub, y, cells, 10)
            if not new or float(d @ y) / value >= obj * (1 - _LP_GAP):
                return y / max(value, 1.0)  # dual feasible, and within _LP_GAP of the LP optimum
            if n_cols + len(new) > cols.shape[1]:
                cols = np.hstack([cols, np.zeros((m, cols.shape[1]))])
                basic = np.concatenate([basic, np.zeros(len(basic), dtype=bool)])
            for a in new:
                cols[:, n_cols] = a
                n_cols += 1
            continue
        # entering column: the first (lowest index) within 1e-12 of the most negative reduced cost
        limit = best + 1e-12
        if rc.min() <= limit:
            q = int(np.flatnonzero(rc <= limit)[0])
        elif rc_s.min() <= limit:
            q = -1 - int(np.flatnonzero(rc_s <= limit)[0])
        else:
            q = -1 - m - int(np.flatnonzero(rc_e <= limit)[0])
        u = b_inv @ column(q)
        pos = np.flatnonzero(u > 1e-9)
        if not len(pos):
            return None  # cannot happen (the objective is bounded below by 0): give up on prices
        ratios = x_b[pos] / u[pos]
        tie = pos[ratios <= ratios.min() + 1e-12]
        r = int(tie[np.argmax(u[tie])])  # among tied rows, the largest pivot
        theta = x_b[r] / u[r]
        x_b = np.maximum(x_b - theta * u, 0.0)
        x_b[r] = theta
        row = b_inv[r] / u[r]
        b_inv -= np.outer(u, row)
        b_inv[r] = row
        mark(int(basis[r]), False)
        mark(q, True)
        basis[r] = q
        c_b[r] = 1.0 if q >= 0 else 0.0
        pivots += 1
        if float(c_b @ x_b) <= volume * 1.001:
            return None  # a fractional packing within 0.1 % of the volume: the LP has no waste
        if pivots % 100 == 0:
            try:
                b_inv = np.linalg.inv(np.column_stack([column(int(j)) for j in basis]))
            except np.linalg.LinAlgError:
                return None
            x_b = np.maximum(b_inv @ d, 0.0)
    return None
