"""The Vendi score: the effective number of distinct items in a set, from a similarity kernel.

Definitions follow the ``vendi-score`` package (Friedman & Dieng 2023, "The Vendi Score: A Diversity
Evaluation Metric for Machine Learning"; ``vendi_score.vendi.score_K``):

* ``K`` is an ``n x n`` positive semi-definite similarity matrix with ``k(x, x) = 1``; ``λ`` are the
  eigenvalues of ``K / n`` (divided by ``n``, not by the trace, as the package does).
* Order ``q`` (Hill numbers of the spectrum): only the positive eigenvalues count (``0 log 0 = 0``).
  The package keeps every ``λ > 0``; here eigenvalues ``<= n * eps * max λ`` (numpy's ``matrix_rank``
  tolerance) are rounding of a rank-deficient kernel and count as 0 too. On full-rank kernels the two
  agree exactly; on rank-deficient ones they agree to rounding for ``q >= 1``, while for ``q < 1`` the
  package's result moves with the rounding noise (its ``q = 0`` counts noise eigenvalues; ours gives
  the rank):

  - ``q = 1``: ``exp(-Σ λ log λ)`` (the exponential of the von Neumann entropy of ``K / n``);
  - ``q = inf``: ``1 / max λ``;
  - other ``q >= 0``: ``exp(log(Σ λ^q) / (1 - q))`` (``q = 0``: the number of positive eigenvalues).

  ``n`` identical items score 1; ``n`` items with ``K = I`` score ``n``.

Kernels of :func:`vendi_score` (rows of ``X`` are the items):

* ``"rbf"`` (default): ``k(x, y) = exp(-|x - y|^2 / (2 σ^2))``. ``bandwidth=σ`` is a positive number,
  by default 1 (``exp(-|x - y|^2 / 2)``, the LASER fork's fixed kernel), or ``"median"``: the median
  heuristic (Gretton et al. 2012), ``σ^2`` = the median of the non-zero squared distances
  ``|x_i - x_j|^2`` over the pairs ``i < j`` (``np.median`` semantics: the mean of the two middle
  values for an even count), so a median pair has similarity ``exp(-1/2)``. Coinciding pairs are left
  out of the median; when all rows coincide ``σ = 1`` (every similarity is 1 whatever ``σ``).
* ``"linear"``: the package's ``score_X`` kernel ``X X^T`` on rows scaled to unit length
  (``normalize=True``, the default; zero rows stay zero, as ``sklearn.preprocessing.normalize``
  leaves them). Unlike the package's ``score_X``, ``q`` is honoured (the package passes ``q=1``).
* a callable ``k(x, y, **kernel_args)`` on two rows (1-D float64 arrays) returning a number, filled in
  for ``i <= j`` and mirrored, as the package's ``score(samples, k)``.

Everything is computed in float64 on the CPU; inputs may be numpy arrays, torch tensors or lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

from layerscope.errors import LayerscopeError, allowed
from layerscope.metrics.pca import as_float64_matrix

__all__ = ["VENDI_KERNELS", "rbf_bandwidth", "vendi_kernel", "vendi_score", "vendi_score_from_kernel"]

VENDI_KERNELS = ("rbf", "linear")
_KERNEL_ARGS = {"rbf": ("bandwidth",), "linear": ("normalize",)}
# A kernel matrix further than this (relative to its largest entry) from its transpose is refused.
_SYMMETRY_RTOL = 1e-8


def check_order(q: Any) -> float:
    """``q`` as a float in ``[0, inf]``; accepts ``math.inf`` and the package's spelling ``"inf"``."""
    if isinstance(q, str):
        if q.strip().lower() in ("inf", "infinity"):
            return math.inf
        raise LayerscopeError(f"q={q!r} is not a valid Vendi order: allowed are numbers >= 0 or 'inf'")
    if isinstance(q, bool):
        raise LayerscopeError(f"q={q!r} is not a valid Vendi order: allowed are numbers >= 0 or 'inf'")
    try:
        value = float(q)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"q={q!r} is not a valid Vendi order: allowed are numbers >= 0 or 'inf'") from exc
    if math.isnan(value) or value < 0:
        raise LayerscopeError(f"q={q!r} is not a valid Vendi order: allowed are numbers >= 0 or 'inf'")
    return value


def entropy_of_order(p: np.ndarray, q: float) -> float:
    """Rényi entropy of order ``q`` of the weights ``p`` (only ``p > 0`` count), as the package's ``entropy_q``."""
    positive = p[p > 0]
    if q == 1:
        return float(-(positive * np.log(positive)).sum())
    if math.isinf(q):
        return float(-np.log(np.max(p)))
    return float(np.log((positive**q).sum()) / (1 - q))


def _as_kernel_matrix(K: Any) -> np.ndarray:
    arr = as_float64_matrix(K, "K")
    n, m = arr.shape
    if n != m:
        raise LayerscopeError(f"K has shape {(n, m)}: a kernel matrix must be square (n, n)")
    scale = max(1.0, float(np.max(np.abs(arr))))
    gap = float(np.max(np.abs(arr - arr.T)))
    if gap > _SYMMETRY_RTOL * scale:
        raise LayerscopeError(f"K is not symmetric (largest |K - K^T| is {gap:.3g}): a kernel matrix must be symmetric")
    return (arr + arr.T) / 2


def vendi_score_from_kernel(K: Any, q: float | str = 1.0) -> float:
    """The Vendi score of order ``q`` of a symmetric ``(n, n)`` kernel matrix ``K`` (see the module doc).

    >>> round(vendi_score_from_kernel(np.eye(3)), 12)
    3.0
    """
    q = check_order(q)
    arr = _as_kernel_matrix(K)
    n = arr.shape[0]
    eigenvalues = np.linalg.eigvalsh(arr / n)
    top = float(eigenvalues.max())
    if not top > 0:
        raise LayerscopeError("K has no positive eigenvalue: the Vendi score needs a positive semi-definite kernel with k(x, x) > 0")
    eigenvalues = np.where(eigenvalues > n * np.finfo(np.float64).eps * top, eigenvalues, 0.0)
    return float(np.exp(entropy_of_order(eigenvalues, q)))


def check_bandwidth(bandwidth: Any) -> float | str:
    """A positive finite number or ``"median"``; refuses anything else."""
    if isinstance(bandwidth, str):
        if bandwidth == "median":
            return bandwidth
    elif not isinstance(bandwidth, bool):
        try:
            value = float(bandwidth)
        except (TypeError, ValueError):
            value = math.nan
        if math.isfinite(value) and value > 0:
            return value
    raise LayerscopeError(f"bandwidth={bandwidth!r} is not valid: allowed are a positive number (σ of the RBF kernel) or 'median'")


def _median_of_nonzero(sq_distances: np.ndarray) -> float:
    nonzero = sq_distances[sq_distances > 0]
    return float(np.median(nonzero)) if nonzero.size else 1.0


def rbf_bandwidth(X: Any, bandwidth: float | str = 1.0) -> float:
    """The RBF ``σ`` used for ``X``: ``bandwidth`` itself, or the median heuristic for ``"median"``.

    ``"median"``: ``σ^2`` = median of the non-zero ``|x_i - x_j|^2`` over ``i < j`` (1 if all rows coincide).
    """
    bandwidth = check_bandwidth(bandwidth)
    if bandwidth != "median":
        return float(bandwidth)
    arr = as_float64_matrix(X, "X")
    return math.sqrt(_median_of_nonzero(pdist(arr, "sqeuclidean")))


def vendi_kernel(X: Any, kernel: str | Callable[..., float] = "rbf", **kernel_args: Any) -> np.ndarray:
    """The ``(n, n)`` float64 kernel matrix :func:`vendi_score` uses for the rows of ``X``."""
    arr = as_float64_matrix(X, "X")
    if callable(kernel):
        n = arr.shape[0]
        K = np.empty((n, n))
        for i in range(n):
            for j in range(i, n):
                try:
                    value = float(kernel(arr[i], arr[j], **kernel_args))
                except (TypeError, ValueError) as exc:
                    raise LayerscopeError(f"kernel {kernel!r} failed on rows ({i}, {j}): {exc}") from exc
                K[i, j] = K[j, i] = value
        if not np.isfinite(K).all():
            raise LayerscopeError(f"kernel {kernel!r} returned non-finite similarities: allowed are finite numbers")
        return K
    if not isinstance(kernel, str) or kernel not in VENDI_KERNELS:
        raise LayerscopeError(f"unknown kernel {kernel!r}: allowed {allowed(VENDI_KERNELS)} or a callable k(x, y)")
    unknown = sorted(set(kernel_args) - set(_KERNEL_ARGS[kernel]))
    if unknown:
        raise LayerscopeError(f"unknown option(s) {', '.join(unknown)} for kernel {kernel!r}: allowed {allowed(_KERNEL_ARGS[kernel])}")
    if kernel == "linear":
        normalize = kernel_args.get("normalize", True)
        if not isinstance(normalize, bool):
            raise LayerscopeError(f"normalize={normalize!r} is not valid: allowed are True or False")
        if normalize:
            norms = np.linalg.norm(arr, axis=1)
            norms[norms == 0] = 1.0
            arr = arr / norms[:, None]
        return arr @ arr.T
    bandwidth = check_bandwidth(kernel_args.get("bandwidth", 1.0))
    sq = pdist(arr, "sqeuclidean")
    sigma2 = _median_of_nonzero(sq) if bandwidth == "median" else float(bandwidth) ** 2
    K = squareform(np.exp(-sq / (2.0 * sigma2)))
    np.fill_diagonal(K, 1.0)
    return K


def vendi_score(X: Any, kernel: str | Callable[..., float] = "rbf", q: float | str = 1.0, **kernel_args: Any) -> float:
    """The Vendi score of order ``q`` of the rows of ``X`` ``(n, d)`` under ``kernel`` (see the module doc).

    ``kernel_args``: ``bandwidth`` (``"rbf"``: a positive ``σ``, default 1, or ``"median"``),
    ``normalize`` (``"linear"``: scale rows to unit length first, default True), or keywords passed on
    to a callable kernel.

    >>> round(vendi_score(np.zeros((4, 2))), 12)  # four identical rows
    1.0
    """
    q = check_order(q)
    return vendi_score_from_kernel(vendi_kernel(X, kernel, **kernel_args), q)
