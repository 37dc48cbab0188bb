"""Principal component analysis, spectrum summaries and a streaming covariance.

Everything is computed in float64 and returned as numpy arrays or Python floats; inputs may be numpy
arrays, torch tensors (any device, any floating dtype) or nested lists.

- :func:`pca` of an ``(n, d)`` data matrix, by the SVD of the centred data (more accurate than the
  eigendecomposition of the covariance, which squares the condition number).
- :func:`effective_rank` (entropy-based, Roy & Vetterli 2007) and :func:`participation_ratio` of a
  spectrum.
- :class:`StreamingCovariance`: mean and covariance of rows seen batch by batch, in memory that does
  not grow with the number of rows (Chan et al. pairwise merge, stable when the mean is large).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from layerscope.errors import LayerscopeError

__all__ = ["PCAResult", "StreamingCovariance", "effective_rank", "participation_ratio", "pca"]


def as_float64_matrix(X: Any, name: str = "X") -> np.ndarray:
    """``X`` as a C-contiguous float64 numpy array of shape ``(n, d)``; refuses anything else.

    Refuses: not 2-D, zero rows or columns, non-real dtypes, NaN or infinite values.
    """
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise LayerscopeError(f"{name} has complex dtype {X.dtype}: allowed are real (n, d) arrays or tensors")
        arr = X.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # ragged lists and other odd objects
            raise LayerscopeError(f"{name} cannot be read as an (n, d) array: {exc}") from exc
        if arr.dtype.kind not in "biuf":
            raise LayerscopeError(f"{name} has dtype {arr.dtype}: allowed are real (n, d) arrays or tensors")
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise LayerscopeError(
            f"{name} has shape {tuple(arr.shape)}: allowed is a 2-D (n, d) array of n samples by d features"
            + (" (reshape a single feature with x[:, None])" if arr.ndim == 1 else "")
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LayerscopeError(f"{name} has shape {tuple(arr.shape)}: it needs at least one row and one column")
    if not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise LayerscopeError(f"{name} has {bad} non-finite values (NaN or inf): allowed are finite values only")
    return np.ascontiguousarray(arr)


def as_float64_vector(values: Any, name: str = "eigenvalues") -> np.ndarray:
    """A 1-D float64 spectrum; refuses other shapes, non-finite values and empty input."""
    if isinstance(values, torch.Tensor):
        arr = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            raise LayerscopeError(f"{name} has dtype {arr.dtype}: allowed is a 1-D array of real numbers")
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1 or arr.size == 0:
        raise LayerscopeError(f"{name} has shape {tuple(arr.shape)}: allowed is a non-empty 1-D array")
    if not np.isfinite(arr).all():
        raise LayerscopeError(f"{name} has non-finite values (NaN or inf): allowed are finite values only")
    return arr


def _sign_fix(components: np.ndarray) -> np.ndarray:
    """Make each row's largest-magnitude entry positive, so results do not depend on the solver's signs."""
    if components.size == 0:
        return components
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def _check_k(k: Any, limit: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= limit:
        raise LayerscopeError(f"k={k!r} is not a valid number of components for {what}: allowed are integers 1..{limit}")
    return int(k)


@dataclass(frozen=True)
class PCAResult:
    """Principal components of a data set.

    - ``mean``: ``(d,)`` the mean that was subtracted.
    - ``components``: ``(k, d)`` principal directions as orthonormal rows, by decreasing variance;
      each row's largest-magnitude entry is positive.
    - ``explained_variance``: ``(k,)`` the variance along each direction (covariance eigenvalues,
      ``ddof`` as given to :func:`pca`).
    - ``explained_variance_ratio``: ``(k,)`` that variance as a share of the total variance (trace of
      the covariance), so it sums to 1 only when all components are kept.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def transform(self, X: Any) -> np.ndarray:
        """Principal-component scores ``(X - mean) @ components.T`` of shape ``(n, k)``."""
        arr = as_float64_matrix(X, "X")
        if arr.shape[1] != self.mean.shape[0]:
            raise LayerscopeError(f"X has {arr.shape[1]} features, this PCA was fitted on {self.mean.shape[0]}")
        return (arr - self.mean) @ self.components.T


def pca(X: Any, k: int | None = None, *, ddof: int = 1) -> PCAResult:
    """Principal component analysis of ``X`` ``(n, d)`` through the thin SVD of the centred data.

    ``k`` is the number of components to keep, 1..min(n, d); ``None`` keeps all ``min(n, d)``.
    ``explained_variance`` equals the top eigenvalues of ``np.cov(X, rowvar=False, ddof=ddof)``.
    """
    arr = as_float64_matrix(X, "X")
    n, d = arr.shape
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or not 0 <= ddof < n:
        raise LayerscopeError(f"ddof={ddof!r} is not valid for {n} rows: allowed are integers 0..{n - 1}")
    limit = min(n, d)
    k = limit if k is None else _check_k(k, limit, f"data of shape ({n}, {d})")
    mean = arr.mean(axis=0)
    _, s, vt = np.linalg.svd(arr - mean, full_matrices=False)
    variance = s**2 / (n - ddof)
    total = float(variance.sum())
    ev = variance[:k]
    ratio = ev / total if total > 0 else np.zeros_like(ev)
    return PCAResult(mean=mean, components=_sign_fix(vt[:k]), explained_variance=ev, explained_variance_ratio=ratio)


def _spectrum(eigenvalues: Any, name: str = "eigenvalues") -> np.ndarray:
    lam = as_float64_vector(eigenvalues, name)
    top = float(np.max(np.abs(lam)))
    # eigh of a PSD matrix can return tiny negative eigenvalues; clip those, refuse real negatives.
    tol = 1e-10 * top
    if (lam < -tol).any():
        raise LayerscopeError(
            f"{name} has negative value {float(lam.min())!r}: allowed are non-negative values (a covariance spectrum)"
        )
    lam = np.clip(lam, 0.0, None)
    if lam.sum() <= 0:
        raise LayerscopeError(f"{name} are all zero: a spectrum needs a positive sum")
    return lam


def effective_rank(eigenvalues: Any) -> float:
    """Entropy-based effective rank ``exp(H(p))`` with ``p = eigenvalues / sum(eigenvalues)``.

    Roy & Vetterli (2007) define it on the singular values of a matrix; here it is applied to whatever
    spectrum is given (layerscope uses covariance eigenvalues). ``n`` equal values give ``n``; one
    non-zero value gives 1. Zeros contribute nothing (``0 log 0 = 0``).
    """
    lam = _spectrum(eigenvalues)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def participation_ratio(eigenvalues: Any) -> float:
    """``(sum λ)^2 / sum λ^2``: ``n`` for ``n`` equal values, 1 for a single non-zero value."""
    lam = _spectrum(eigenvalues)
    return float(lam.sum() ** 2 / np.sum(lam**2))


class StreamingCovariance:
    """Mean and covariance of ``d``-dimensional rows fed in batches, in ``O(d^2)`` memory.

    Each batch is reduced to its count, mean and centred scatter matrix and merged with the running
    totals by Chan et al.'s pairwise formula, all in float64; this stays accurate when the mean is
    large compared with the spread (the naive ``sum x x^T - n mu mu^T`` does not). Batches may be
    numpy arrays or torch tensors; the running state is a float64 torch tensor on ``device`` (by
    default the device of the first batch, or the CPU for devices without float64 such as MPS), so
    capturing on a GPU does not copy every batch to the host.

    >>> sc = StreamingCovariance(3).update(np.ones((4, 3))).update(np.zeros((2, 3)))
    >>> sc.count
    6
    """

    def __init__(self, d: int, *, device: str | torch.device | None = None) -> None:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise LayerscopeError(f"d={d!r} is not a valid width: allowed are integers >= 1")
        self.d = int(d)
        self._device = None if device is None else self._usable(torch.device(device))
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    @staticmethod
    def _usable(device: torch.device) -> torch.device:
        return torch.device("cpu") if device.type == "mps" else device

    def _as_batch(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            t = batch.detach()
            if t.is_complex():
                raise LayerscopeError(f"batch has complex dtype {t.dtype}: allowed are real (b, {self.d}) batches")
        else:
            arr = np.asarray(batch)
            if arr.dtype.kind not in "biuf":
                raise LayerscopeError(f"batch has dtype {arr.dtype}: allowed are real (b, {self.d}) batches")
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
        if t.ndim == 1 and t.shape[0] == self.d:
            t = t[None, :]
        if t.ndim != 2 or t.shape[1] != self.d:
            raise LayerscopeError(f"batch has shape {tuple(t.shape)}: allowed is (b, {self.d}) for this StreamingCovariance(d={self.d})")
        if self._device is None:
            self._device = self._usable(t.device)
        t = t.to(device=self._device, dtype=torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise LayerscopeError("batch has non-finite values (NaN or inf): allowed are finite values only")
        return t

    def _merge(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if nb == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = nb, mean_b.clone(), m2_b.clone()
            return
        n = self.count
        total = n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / total)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n * nb / total)
        self.count = total

    def update(self, batch: Any) -> "StreamingCovariance":
        """Add the rows of ``batch`` ``(b, d)`` (a single ``(d,)`` row is accepted too); returns self."""
        t = self._as_batch(batch)
        nb = int(t.shape[0])
        if nb == 0:
            return self
        mean_b = t.mean(dim=0)
        c = t - mean_b
        self._merge(nb, mean_b, c.T @ c)
        return self

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        """Fold another accumulator of the same width into this one (e.g. from another shard); returns self."""
        if not isinstance(other, StreamingCovariance) or other.d != self.d:
            raise LayerscopeError(f"can only merge a StreamingCovariance with d={self.d}, got {other!r}")
        if other.count:
            if self._device is None:
                self._device = other._device
            self._merge(other.count, other._mean.to(self._device), other._m2.to(self._device))
        return self

    def _need(self, rows: int) -> None:
        if self.count < rows:
            raise LayerscopeError(f"StreamingCovariance has seen {self.count} rows: this needs at least {rows}")

    @property
    def mean(self) -> np.ndarray:
        """The ``(d,)`` mean of all rows seen."""
        self._need(1)
        return self._mean.cpu().numpy().copy()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """The ``(d, d)`` covariance, dividing the scatter by ``count - ddof`` (``np.cov`` semantics)."""
        if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
            raise LayerscopeError(f"ddof={ddof!r} is not valid: allowed are integers >= 0")
        self._need(ddof + 1)
        cov = (self._m2 / (self.count - ddof)).cpu().numpy()
        return (cov + cov.T) / 2.0

    def pca(self, k: int | None = None, *, ddof: int = 1) -> PCAResult:
        """PCA from the accumulated covariance (``eigh``); ``k`` in 1..d, ``None`` keeps all ``d``."""
        k = self.d if k is None else _check_k(k, self.d, f"a StreamingCovariance of width {self.d}")
        cov = self.covariance(ddof)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals = np.clip(evals[order], 0.0, None)
        evecs = evecs[:, order]
        total = float(np.trace(cov))
        ev = evals[:k]
        ratio = ev / total if total > 0 else np.zeros_like(ev)
        return PCAResult(mean=self.mean, components=_sign_fix(evecs[:, :k].T.copy()), explained_variance=ev, explained_variance_ratio=ratio)

    def __repr__(self) -> str:
        return f"StreamingCovariance(d={self.d}, count={self.count})"
