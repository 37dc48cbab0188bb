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

import warnings

import numpy as np

from ..errors import LayerscopeError


def _segment_costs(y: np.ndarray) -> np.ndarray:
    """cost[i, j] = summed squared deviation of the rows y[i:j] from their per-column mean (j
    exclusive); NaN entries are missing and left out of both the mean and the sum."""
    n = len(y)
    valid = ~np.isnan(y)
    values = np.where(valid, y, 0.0)
    zeros = np.zeros((1, y.shape[1]))
    s1 = np.concatenate([zeros, np.cumsum(values, axis=0)])
    s2 = np.concatenate([zeros, np.cumsum(values * values, axis=0)])
    counts = np.concatenate([zeros, np.cumsum(valid, axis=0)])
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        j = np.arange(i + 1, n + 1)
        total, squares, count = s1[j] - s1[i], s2[j] - s2[i], counts[j] - counts[i]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_column = np.where(count > 0, squares - total * total / np.maximum(count, 1), 0.0)
        cost[i, j] = np.maximum(per_column.sum(axis=1), 0.0)
    return cost


def segmentation_cost(curve, points: list[int]) -> float:
    """Summed squared deviation of ``curve`` from the means of the segments cut at ``points``
    (NaN entries are missing: left out)."""
    y = np.asarray(curve, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    bounds = [0, *points, len(y)]
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = y[a:b]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column of a segment
            total += float(np.nansum((seg - np.nanmean(seg, axis=0)) ** 2))
    return total


def change_points(curve, n_points: int | None = None, *, min_size: int = 1, penalty: float | None = None) -> list[int]:
    """Indices where a new constant segment of ``curve`` starts (sorted), exact least squares.

    ``curve`` is 1-D (one value per layer) or 2-D (one vector per layer, e.g. the rows of a CKA
    matrix: then the segments are the diagonal blocks of similar layers). NaN marks a missing
    value (e.g. the diagonal of a similarity matrix, which says nothing about blocks); infinities
    are refused."""
    y = np.asarray(curve, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise LayerscopeError(f"change points need a 1-D curve or a 2-D (layers, features) array, got shape {y.shape}")
    n = len(y)
    if n < 2 or np.isinf(y).any() or np.isnan(y).all(axis=1).any():
        raise LayerscopeError(f"change points need a finite curve of at least 2 values (NaN only for missing entries, "
                              f"never a whole row), got {n} value(s)")
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
        sigma2 = 0.0
        if n > 2:
            diffs = np.abs(np.diff(y, axis=0))
            usable = ~np.isnan(diffs).all(axis=0)
            if usable.any():
                sigma2 = float(((np.nanmedian(diffs[:, usable], axis=0) / (0.6745 * np.sqrt(2.0))) ** 2).sum())
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
