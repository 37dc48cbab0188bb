"""Rank correlation between two per-layer quantities, with p-values and bootstrap intervals.

Used by the critical-layers study to relate the per-window substitution loss to the per-layer
representation term (Liu et al. 2025 report Spearman -0.8523 on Llama-2-7b-chat / Dolly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from layerscope.errors import LayerscopeError

__all__ = ["rank_correlation"]

# Bootstrap Kendall works on (chunk, n, n) sign arrays; this bounds one chunk's size in elements.
_KENDALL_CHUNK_ELEMENTS = 4_000_000


def _as_vector(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        v = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"{name} must be a sequence of numbers, got {type(x).__name__}") from exc
    if v.ndim != 1:
        v = v.squeeze()
        if v.ndim != 1:
            raise LayerscopeError(f"{name} must be one-dimensional (one value per layer), got shape {np.shape(x)}")
    if not np.isfinite(v).all():
        bad = [i for i in range(v.size) if not np.isfinite(v[i])]
        raise LayerscopeError(f"{name} has non-finite values (nan or inf) at positions {bad[:10]}")
    return v


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two ``(m, n)`` arrays; ``nan`` for a constant row."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rho (average ranks for ties, as ``scipy.stats.spearmanr``)."""
    return _pearson_rows(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1))


def _kendall_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Kendall tau-b (ties handled as ``scipy.stats.kendalltau``'s default)."""
    m, n = a.shape
    out = np.empty(m)
    iu = np.triu_indices(n, k=1)
    chunk = max(1, _KENDALL_CHUNK_ELEMENTS // max(1, n * n))
    for s in range(0, m, chunk):
        sa = np.sign(a[s : s + chunk, :, None] - a[s : s + chunk, None, :])[:, iu[0], iu[1]]
        sb = np.sign(b[s : s + chunk, :, None] - b[s : s + chunk, None, :])[:, iu[0], iu[1]]
        num = (sa * sb).sum(1)
        den = np.sqrt(np.abs(sa).sum(1) * np.abs(sb).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + chunk] = np.where(den > 0, num / den, np.nan)
    return out


def _percentile_ci(values: np.ndarray, ci: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def rank_correlation(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, object]:
    """Spearman and Kendall (tau-b) rank correlation of paired values ``a[i]``, ``b[i]``.

    Returns ``{"spearman", "spearman_p", "kendall", "kendall_p", "spearman_ci", "kendall_ci", "n"}``:
    the coefficients and two-sided p-values of :func:`scipy.stats.spearmanr` and
    :func:`scipy.stats.kendalltau`, and percentile bootstrap intervals at level ``ci`` from
    ``n_boot`` resamples of the pairs (with replacement, ``numpy.random.default_rng(seed)``;
    resamples with a constant side are dropped). ``n_boot=0`` skips the bootstrap (intervals
    ``(nan, nan)``). A constant input gives ``nan`` coefficients, as scipy does.

    >>> r = rank_correlation([1, 2, 3, 4, 5], [5, 6, 7, 8, 7], n_boot=0)
    >>> round(r["spearman"], 4), round(r["kendall"], 4)
    (0.8208, 0.7379)
    """
    x = _as_vector(a, "a")
    y = _as_vector(b, "b")
    if x.size != y.size:
        raise LayerscopeError(f"a and b must pair up one to one: a has {x.size} values, b has {y.size}")
    n = int(x.size)
    if n < 3:
        raise LayerscopeError(f"rank correlation needs at least 3 pairs, got {n}")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise LayerscopeError(f"n_boot {n_boot!r} must be a non-negative integer (0 skips the bootstrap)")
    if not isinstance(ci, (int, float)) or not 0 < ci < 1:
        raise LayerscopeError(f"ci {ci!r} must be a confidence level strictly between 0 and 1, e.g. 0.95")

    constant = np.ptp(x) == 0 or np.ptp(y) == 0
    if constant:
        rho = rho_p = tau = tau_p = math.nan
    else:
        rho, rho_p = stats.spearmanr(x, y)
        tau, tau_p = stats.kendalltau(x, y)

    spearman_ci = kendall_ci = (math.nan, math.nan)
    if n_boot > 0 and not constant:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        xs, ys = x[idx], y[idx]
        spearman_ci = _percentile_ci(_spearman_rows(xs, ys), ci)
        kendall_ci = _percentile_ci(_kendall_rows(xs, ys), ci)

    return {
        "spearman": float(rho),
        "spearman_p": float(rho_p),
        "kendall": float(tau),
        "kendall_p": float(tau_p),
        "spearman_ci": spearman_ci,
        "kendall_ci": kendall_ci,
        "n": n,
    }
