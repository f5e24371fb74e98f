"""One step of the reachable grid when a memory limit binds (see :mod:`.solver`).

Per reachable source row ``u`` the memory bound turns into a lower bound on the teacher's
boundary, ``v >= vmin(u2, v2)`` (memory prefix sums are monotone), and the best predecessor
potential becomes a range maximum over ``v``, answered by a sparse table: O(Cs^2 * Ct log Ct).
"""

from __future__ import annotations

import numpy as np

__all__ = ["reach_with_memory", "window_max"]


def reach_with_memory(
    reach: np.ndarray, a: np.ndarray, b: np.ndarray, need: np.ndarray, ms: np.ndarray, mt: np.ndarray,
    limit: float, pair: bool, tol: float, u2_end: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The reachable grid with the memory bound: per source row, a range maximum over ``v``.
    ``u2_end[u]``: one past the last student boundary a stage starting at ``u`` may end at."""
    ls1, lt1 = need.shape
    out = np.zeros_like(reach)
    for u in np.flatnonzero(reach.any(axis=1)):
        row = np.where(reach[u], b, -np.inf)  # potential b(v) of reachable (u, v)
        table = _sparse_table(row)
        u2 = np.arange(u + 1, ls1 if u2_end is None else min(ls1, int(u2_end[u])))
        if not len(u2):
            continue
        if not pair:
            ok_mem = ms[u2] - ms[u] <= limit * (1 + 1e-12)
            ok = (a[u] + row[0] >= need[u2, 0] - tol) & ok_mem
            out[u2, 0] |= ok
            continue
        # memory: mt[v] >= mt[v2] + ms[u2] - ms[u] - limit  ->  v >= vmin (mt is non-decreasing)
        slack = limit * (1 + 1e-12) - (ms[u2] - ms[u])  # memory left for the teacher segment
        fits = slack >= 0
        u2, slack = u2[fits], slack[fits]
        if not len(u2):
            continue
        # Rows where even the whole teacher prefix fits need no lower bound: a prefix maximum.
        free = slack >= mt[-1] - mt[0]
        prefix = np.concatenate(([-np.inf], np.maximum.accumulate(row)[:-1]))  # max over v < v2
        if free.any():
            out[u2[free], :] |= a[u] + prefix[None, :] >= need[u2[free], :] - tol
        bound = u2[~free]
        if len(bound):
            thr = mt[None, :] - slack[~free][:, None]
            vmin = np.searchsorted(mt, thr, side="left")
            v2 = np.arange(lt1)[None, :].repeat(len(bound), axis=0)
            best = _range_max(table, vmin, v2)  # max over v in [vmin, v2)
            out[bound, :] |= a[u] + best >= need[bound, :] - tol
    return out


def window_max(grid: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Row ``u2`` of the answer: the elementwise maximum of ``grid``'s rows ``[lo[u2], u2)``
    (-inf where empty); ``lo`` is non-decreasing, a sparse table over rows answers each."""
    table = _sparse_table(grid)
    hi = np.arange(grid.shape[0])
    out = np.full(grid.shape, -np.inf)
    length = hi - lo
    for level in np.unique(np.floor(np.log2(length[length > 0])).astype(int)):
        sel = np.flatnonzero((length > 0) & (np.floor(np.log2(np.maximum(length, 1))).astype(int) == level))
        t = table[level]
        out[sel] = np.maximum(t[lo[sel]], t[hi[sel] - (1 << level)])
    return out


def _sparse_table(row: np.ndarray) -> list[np.ndarray]:
    table = [row]
    k = 1
    while 2 * k <= len(row):
        prev = table[-1]
        table.append(np.maximum(prev[:-k], prev[k:]))
        k *= 2
    return table


def _range_max(table: list[np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(row[lo:hi]) elementwise; -inf for empty ranges."""
    length = hi - lo
    out = np.full(lo.shape, -np.inf)
    valid = length > 0
    if not valid.any():
        return out
    lv, hv = lo[valid], hi[valid]
    k = np.floor(np.log2(hv - lv)).astype(int)
    res = np.empty(len(lv))
    for level in np.unique(k):
        sel = k == level
        t = table[level]
        res[sel] = np.maximum(t[lv[sel]], t[hv[sel] - (1 << level)])
    out[valid] = res
    return out
