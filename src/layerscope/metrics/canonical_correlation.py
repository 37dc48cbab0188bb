"""Canonical correlation analysis and its relatives: CCA, PC-subspace CCA, SVCCA, PWCCA.

All functions take two data matrices ``X`` ``(n, d1)`` and ``Y`` ``(n, d2)`` whose rows are the same
``n`` samples (numpy arrays, torch tensors on any device, or lists), compute in float64 and return
numpy arrays or Python floats. Widths may differ.

The computation is direct, not iterative: centre each side, take an orthonormal basis of its column
space from the thin SVD (directions whose singular value is below ``rtol`` times the largest are
dropped, so rank-deficient inputs work), and the canonical correlations are the singular values of
``Ux^T Uy``. This is the textbook ``Sxx^{-1/2} Sxy Syy^{-1/2}`` without ever forming or inverting a
covariance matrix, so it stays accurate for ill-conditioned activations.

CCA finds the best linear alignment of two spaces, so with few samples it finds spurious
correlations: with ``n`` samples and ranks ``r1``, ``r2`` the correlations are biased towards 1 as
``max(r1, r2)`` approaches ``n``. Every function here warns (:class:`SampleSizeWarning`) when ``n``
is less than twice the number of dimensions being correlated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from layerscope.errors import LayerscopeError
from layerscope.metrics.pca import as_float64_matrix

__all__ = [
    "PWCCAResult",
    "SampleSizeWarning",
    "SubspaceCCA",
    "cca",
    "pc_subspace_cca",
    "pwcca",
    "pwcca_details",
    "svcca",
]


class SampleSizeWarning(UserWarning):
    """Too few samples for the number of dimensions being correlated: CCA will overfit."""


@dataclass(frozen=True)
class _Basis:
    U: np.ndarray  # (n, r) orthonormal basis of the centred column space, by decreasing singular value
    s: np.ndarray  # (r,) the kept singular values
    s_all: np.ndarray  # all singular values (for variance fractions)
    centred: np.ndarray  # (n, d) the centred data
    scale: float  # max column sum of squares of the centred data (for the ridge ``epsilon``)

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])


def _check_pair(X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = as_float64_matrix(X, "X")
    y = as_float64_matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise LayerscopeError(
            f"X has {x.shape[0]} rows and Y has {y.shape[0]}: both must hold the same samples (rows) in the same order"
        )
    if x.shape[0] < 2:
        raise LayerscopeError(f"n={x.shape[0]} samples: CCA needs at least 2 (and in practice many more than the width)")
    return x, y


def _check_rtol(rtol: float | None, n: int, d: int) -> float:
    if rtol is None:
        return max(n, d) * np.finfo(np.float64).eps
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.floating)) or not 0.0 <= float(rtol) < 1.0:
        raise LayerscopeError(f"rtol={rtol!r} is not a valid relative tolerance: allowed are numbers in [0, 1)")
    return float(rtol)


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)) or not (
        np.isfinite(epsilon) and epsilon >= 0
    ):
        raise LayerscopeError(f"epsilon={epsilon!r} is not a valid ridge: allowed are finite numbers >= 0")
    return float(epsilon)


def _basis(arr: np.ndarray, name: str, rtol: float | None) -> _Basis:
    n, d = arr.shape
    tol = _check_rtol(rtol, n, d)
    centred = arr - arr.mean(axis=0)
    U, s, _ = np.linalg.svd(centred, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        raise LayerscopeError(f"{name} is constant (every row is the same): there is no variance to correlate")
    r = int(np.count_nonzero(s > s[0] * tol))
    scale = float(np.max(np.sum(centred**2, axis=0)))
    return _Basis(U=U[:, :r], s=s[:r], s_all=s, centred=centred, scale=scale)


def _truncate(b: _Basis, k: int) -> _Basis:
    k = min(k, b.rank)
    return _Basis(U=b.U[:, :k], s=b.s[:k], s_all=b.s_all, centred=b.centred, scale=b.scale)


def _weights(b: _Basis, epsilon: float) -> np.ndarray:
    """Per-direction factor ``s / sqrt(s^2 + epsilon * scale)``: 1 without a ridge.

    With ``Xc = U S V^T`` and ``Sxx = Xc^T Xc / (n - 1)``, the ridge ``Sxx + epsilon * max(diag Sxx) I``
    (Google's ``cca_core`` convention: epsilon is relative to the largest variance) turns
    ``(Sxx + ridge)^{-1/2} Xc^T`` into ``V diag(s / sqrt(s^2 + epsilon * max_j |xc_j|^2)) U^T``.
    """
    if epsilon == 0.0:
        return np.ones_like(b.s)
    return b.s / np.sqrt(b.s**2 + epsilon * b.scale)


def _warn_sample_size(n: int, r1: int, r2: int, what: str) -> None:
    width = max(r1, r2)
    if n < 2 * width:
        warnings.warn(
            SampleSizeWarning(
                f"{what}: n={n} samples for {r1} and {r2} dimensions; CCA overfits unless n is well above the "
                f"number of dimensions (at least {2 * width}, better 10x): the correlations will be biased towards 1"
            ),
            stacklevel=3,
        )


def _cca(bx: _Basis, by: _Basis, epsilon: float):
    """Canonical correlations (descending, clipped to [0, 1]) and the singular vectors in basis coordinates."""
    wx, wy = _weights(bx, epsilon), _weights(by, epsilon)
    M = (bx.U * wx).T @ (by.U * wy)
    P, rho, Qt = np.linalg.svd(M, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), P, Qt.T, wx, wy


def cca(X: Any, Y: Any, *, epsilon: float = 0.0, rtol: float | None = None) -> np.ndarray:
    """Canonical correlations between ``X`` ``(n, d1)`` and ``Y`` ``(n, d2)``, in descending order.

    Returns ``min(rank X, rank Y)`` values in [0, 1] (ranks of the centred data). Invariant under
    translation and under any invertible linear map of either side.

    - ``epsilon``: ridge added to each covariance matrix, relative to its largest variance
      (``Sxx + epsilon * max(diag Sxx) * I``, as Google's ``svcca`` ``cca_core``); 0 is exact CCA.
    - ``rtol``: directions of the centred data with singular value below ``rtol`` times the largest
      are treated as absent; default ``max(n, d) * float64 eps`` (numpy's ``matrix_rank``). Raise it
      (e.g. ``1e-6``) for data that came from float32/bfloat16 arithmetic and is rank-deficient only
      up to that precision.

    Warns with :class:`SampleSizeWarning` when ``n < 2 * max(rank X, rank Y)``.
    """
    x, y = _check_pair(X, Y)
    eps = _check_epsilon(epsilon)
    bx, by = _basis(x, "X", rtol), _basis(y, "Y", rtol)
    _warn_sample_size(x.shape[0], bx.rank, by.rank, "cca")
    return _cca(bx, by, eps)[0]


class SubspaceCCA(NamedTuple):
    """Result of :func:`pc_subspace_cca`: the mean canonical correlation and all of them (descending)."""

    mean: float
    correlations: np.ndarray


def _check_count(k: Any, limit: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= limit:
        raise LayerscopeError(f"{what}={k!r} is not a valid number of directions: allowed are integers 1..{limit}")
    return int(k)


def pc_subspace_cca(X: Any, Y: Any, k: int, *, rtol: float | None = None) -> SubspaceCCA:
    """Canonical correlations between the top-``k`` principal-component scores of ``X`` and of ``Y``.

    The comparison of the paper's Figure 3 ("Spectral Insights into Data-Oblivious Critical
    Layers"): centre each side, keep its top-``k`` principal-component scores, and correlate. The
    scores are ``U[:, :k] S[:k]`` of the thin SVD ``Xc = U S V^T``, whose column space has the
    orthonormal basis ``U[:, :k]``, so the canonical correlations are the singular values of
    ``Ux[:, :k]^T Uy[:, :k]``: exact, no iterative solver.

    ``k`` must be in 1..min(n, d1, d2); a side whose rank is below ``k`` keeps all its directions.
    Returns ``SubspaceCCA(mean, correlations)``.
    """
    x, y = _check_pair(X, Y)
    n = x.shape[0]
    k = _check_count(k, min(n, x.shape[1], y.shape[1]), "k")
    bx, by = _truncate(_basis(x, "X", rtol), k), _truncate(_basis(y, "Y", rtol), k)
    _warn_sample_size(n, bx.rank, by.rank, "pc_subspace_cca")
    rho = _cca(bx, by, 0.0)[0]
    return SubspaceCCA(mean=float(rho.mean()), correlations=rho)


def _directions_for(b: _Basis, keep: Any, name: str) -> int:
    """How many top singular directions of one side SVCCA keeps."""
    if isinstance(keep, bool):
        raise LayerscopeError(f"keep={keep!r}: allowed are a variance fraction in (0, 1] or a number of directions >= 1")
    if isinstance(keep, (int, np.integer)):
        if keep < 1:
            raise LayerscopeError(f"keep={keep!r} directions: allowed are integers >= 1, or a variance fraction in (0, 1]")
        return min(int(keep), b.rank)
    if isinstance(keep, (float, np.floating)) and 0.0 < float(keep) <= 1.0:
        var = b.s_all**2
        cumulative = np.cumsum(var) / var.sum()
        # fewest directions whose cumulative share reaches `keep` (with slack for rounding at keep=1)
        needed = int(np.count_nonzero(cumulative < float(keep) - 1e-12)) + 1
        return min(needed, b.rank)
    raise LayerscopeError(
        f"keep={keep!r}: allowed are a variance fraction (float in (0, 1]) or a number of directions (int >= 1)"
    )


def svcca(X: Any, Y: Any, keep: float | int = 0.99, *, epsilon: float = 0.0, rtol: float | None = None) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation after an SVD reduction of each side.

    Each side is centred and reduced to its fewest top singular directions that explain the fraction
    ``keep`` of its variance (a float in (0, 1]; the paper uses 0.99), or to exactly ``keep``
    directions when ``keep`` is an int (note ``keep=1`` is one direction, ``keep=1.0`` all of them).
    The mean of the canonical correlations between the two reduced sides is returned. With
    ``keep=1.0`` this is the mean of :func:`cca`.
    """
    x, y = _check_pair(X, Y)
    eps = _check_epsilon(epsilon)
    bx, by = _basis(x, "X", rtol), _basis(y, "Y", rtol)
    bx = _truncate(bx, _directions_for(bx, keep, "X"))
    by = _truncate(by, _directions_for(by, keep, "Y"))
    _warn_sample_size(x.shape[0], bx.rank, by.rank, "svcca")
    return float(_cca(bx, by, eps)[0].mean())


class PWCCAResult(NamedTuple):
    """Result of :func:`pwcca_details`: the similarity, canonical correlations (descending), their weights."""

    similarity: float
    correlations: np.ndarray
    weights: np.ndarray


def pwcca_details(
    X: Any, Y: Any, *, weight_by: str = "x", epsilon: float = 0.0, rtol: float | None = None
) -> PWCCAResult:
    """Projection-weighted CCA (Morcos et al. 2018) with its correlations and weights; see :func:`pwcca`."""
    if weight_by not in ("x", "y"):
        raise LayerscopeError(f"weight_by={weight_by!r}: allowed are 'x' (the paper's choice) and 'y'")
    x, y = _check_pair(X, Y)
    eps = _check_epsilon(epsilon)
    bx, by = _basis(x, "X", rtol), _basis(y, "Y", rtol)
    _warn_sample_size(x.shape[0], bx.rank, by.rank, "pwcca")
    rho, P, Q, wx, wy = _cca(bx, by, eps)
    if weight_by == "x":
        b, coef = bx, wx[:, None] * P
    else:
        b, coef = by, wy[:, None] * Q
    # canonical variates h_i in sample space, orthonormalised (Google's compute_pwcca takes a QR here;
    # without a ridge they are orthonormal already and the QR only fixes signs)
    H, _ = np.linalg.qr(b.U @ coef)
    alpha = np.abs(H.T @ b.centred).sum(axis=1)
    weights = alpha / alpha.sum()
    return PWCCAResult(similarity=float(np.sum(weights * rho)), correlations=rho, weights=weights)


def pwcca(X: Any, Y: Any, *, weight_by: str = "x", epsilon: float = 0.0, rtol: float | None = None) -> float:
    """PWCCA similarity (Morcos et al. 2018): canonical correlations averaged with projection weights.

    With canonical variates ``h_i`` of one side (unit-norm vectors over the ``n`` samples) and that
    side's centred neuron activation vectors ``x_j``, the weight of correlation ``rho_i`` is
    ``alpha_i = sum_j |<h_i, x_j>|``, normalised to sum to 1: how much of the side's activity the
    canonical direction accounts for. ``weight_by="x"`` (default, the paper's definition) weights by
    the first argument's neurons, ``"y"`` by the second's; so ``pwcca(X, Y, weight_by="y")`` equals
    ``pwcca(Y, X)``. Not symmetric in general.

    Differences from Google's ``compute_pwcca``: that code weights by whichever side has fewer
    neurons, and projects the raw (uncentred) activations on variates with the mean added back; here
    both are centred, as in the paper's formula, so the result is translation-invariant.
    """
    return pwcca_details(X, Y, weight_by=weight_by, epsilon=epsilon, rtol=rtol).similarity
