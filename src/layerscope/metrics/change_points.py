"""Change points along the depth axis: the exact least-squares piecewise-constant segmentation.

A curve over layers (for example the CKA of each layer with the next), or a sequence of vectors
(the rows of a CKA matrix), is split into ``k + 1`` segments of constant level so that the summed squared deviation from each segment's mean is
minimal; the change points are the first indices of segments 2..k+1. Solved exactly by dynamic
programming in O(k n^2) (n is the number of layers, so this is instant), the same optimum that
``ruptures.Dynp(model="l2")`` finds. With ``n_points=None`` the number is chosen by a BIC-style
penalty: minimise cost + penalty * k with penalty = 4 * variance * log(n), the variance estimated
robustly from the median absolute first difference (on 30 points of pure Gaussian noise this
reports a change point in about 5% of draws; tests/test_change_points.py checks the rate).
"""

from __future__ import annotations

import numpy as np

from ..errors import LayerscopeError


def _segment_costs(y: np.ndarray) -> np.ndarray:
    """cost[i, j] = summed squared deviation of the rows y[i:j] from their mean (j exclusive)."""
    n = len(y)
    s1 = np.concatenate([np.zeros((1, y.shape[1])), np.cumsum(y, axis=0)])
    s2 = np.concatenate([[0.0], np.cumsum((y * y).sum(axis=1))])
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        j = np.arange(i + 1, n + 1)
        total, squares, count = s1[j] - s1[i], s2[j] - s2[i], j - i
        cost[i, j] = np.maximum(squares - (total * total).sum(axis=1) / count, 0.0)
    return cost


def segmentation_cost(curve, points: list[int]) -> float:
    """Summed squared deviation of ``curve`` from the means of the segments cut at ``points``."""
    y = np.asarray(curve, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    bounds = [0, *points, len(y)]
    return float(sum(((y[a:b] - y[a:b].mean(axis=0)) ** 2).sum() for a, b in zip(bounds[:-1], bounds[1:])))


def change_points(curve, n_points: int | None = None, *, min_size: int = 1, penalty: float | None = None) -> list[int]:
    """Indices where a new constant segment of ``curve`` starts (sorted), exact least squares.

    ``curve`` is 1-D (one value per layer) or 2-D (one vector per layer, e.g. the rows of a CKA
    matrix: then the segments are the diagonal blocks of similar layers)."""
    y = np.asarray(curve, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise LayerscopeError(f"change points need a 1-D curve or a 2-D (layers, features) array, got shape {y.shape}")
    n = len(y)
    if n < 2 or not np.all(np.isfinite(y)):
        raise LayerscopeError(f"change points need a finite curve of at least 2 values, got {n} value(s)")
    if min_size < 1:
        raise LayerscopeError(f"min_size {min_size} must be at least 1")
    max_points = n // min_size - 1
    if n_points is not None and not 0 <= n_points <= max_points:
        raise LayerscopeError(f"n_points {n_points} is out of range: allowed 0..{max_points} for {n} values with min_size {min_size}")
    cost = _segment_costs(y)
    for i in range(n + 1):  # segments shorter than min_size are not allowed
        cost[i, i + 1 : min(i + min_size, n + 1)] = np.inf
    k_max = max_points if n_points is None else n_points
    # best[k, j]: minimal cost of y[:j] in k+1 segments; back[k, j]: start of the last segment
    best = np.full((k_max + 1, n + 1), np.inf)
    back = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[0] = cost[0]
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            options = best[k - 1, :j] + cost[:j, j]
            back[k, j] = int(np.argmin(options))
            best[k, j] = options[back[k, j]]
    if n_points is None:
        # noise variance from the median absolute first difference (robust to the steps themselves):
        # for Gaussian noise of sd s, |diff| has median 0.6745 * sqrt(2) * s
        sigma2 = float(((np.median(np.abs(np.diff(y, axis=0)), axis=0) / (0.6745 * np.sqrt(2.0))) ** 2).sum()) if n > 2 else 0.0
        pen = penalty if penalty is not None else 4.0 * max(sigma2, 1e-12) * np.log(n)
        totals = best[:, n] + pen * np.arange(k_max + 1)
        k = int(np.argmin(totals))
    else:
        k = n_points
    points, j = [], n
    for level in range(k, 0, -1):
        j = int(back[level, j])
        points.append(j)
    return sorted(points)
