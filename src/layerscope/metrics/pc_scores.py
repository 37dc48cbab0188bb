"""Canonical correlations between top principal-component subspaces, streamed over rows.

The paper's Figure 3 comparison (:func:`~layerscope.metrics.pc_subspace_cca`) needs, for every pair
of views (layers of one model, or the same layer of two models), the canonical correlations between
the top-``k`` principal-component scores of each side. Holding every view's ``(n, d)`` activations
for an SVD is what limits the number of rows. Here each view is first reduced to its principal
directions (from a streaming covariance), then the rows are streamed once more and only the cross
products of the scores ``Z_v = (X_v - mu_v) V_v^T`` are kept: one ``(sum k_v)^2`` float64 matrix
for all pairs, whatever the number of rows.

For a pair ``(a, b)`` and ``k`` the canonical correlations are the singular values of
``Gaa^{-1/2} Gab Gbb^{-1/2}`` with ``G = Z^T Z`` restricted to the first ``k`` scores of each side,
exactly those of :func:`~layerscope.metrics.pc_subspace_cca` on the full data (the scores span the
same column space as ``U[:, :k]`` of the centred data's SVD). No iterative solver.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from layerscope.errors import LayerscopeError

__all__ = ["PCScoreGram"]


class PCScoreGram:
    """Cross products of the principal-component scores of several views of the same rows.

    ``bases[v] = (mean (d_v,), components (k_v, d_v))``: the mean and orthonormal principal
    directions (rows, by decreasing variance) of view ``v``, e.g. ``PCAResult.mean`` and
    ``PCAResult.components``. Feed the same rows of every view with :meth:`update`; then
    :meth:`canonical_correlations` gives any pair at any ``k <= min(k_a, k_b)``.
    """

    def __init__(self, bases: Sequence[tuple[Any, Any]], *, device: str | torch.device = "cpu") -> None:
        if not bases:
            raise LayerscopeError("no views given: PCScoreGram needs at least one (mean, components) pair")
        self.device = torch.device(device)
        self._means, self._dirs, self.ks = [], [], []
        for v, (mean, comps) in enumerate(bases):
            mu = torch.as_tensor(np.asarray(mean, dtype=np.float64), device=self.device)
            V = torch.as_tensor(np.asarray(comps, dtype=np.float64), device=self.device)
            if V.ndim != 2 or mu.ndim != 1 or V.shape[1] != mu.shape[0] or V.shape[0] < 1:
                raise LayerscopeError(f"view {v}: components of shape {tuple(V.shape)} and mean of shape "
                                      f"{tuple(mu.shape)}: allowed are (k, d) with k >= 1 and (d,)")
            self._means.append(mu)
            self._dirs.append(V)
            self.ks.append(int(V.shape[0]))
        self._offsets = np.concatenate([[0], np.cumsum(self.ks)]).astype(int)
        total = int(self._offsets[-1])
        self._gram = torch.zeros(total, total, dtype=torch.float64, device=self.device)
        self.count = 0

    @property
    def num_views(self) -> int:
        return len(self.ks)

    def update(self, views: Iterable[Any]) -> "PCScoreGram":
        """Add the same ``b`` rows of every view (``views[v]`` is ``(b, d_v)``); returns self.

        ``views`` may be a generator: each view is reduced to its ``k_v`` scores before the next one
        is read, so only one view's rows are in memory at a time."""
        scores, rows = [], None
        for v, block in enumerate(views):
            if v >= self.num_views:
                raise LayerscopeError(f"got more than {self.num_views} views: this PCScoreGram was built for {self.num_views}")
            if isinstance(block, np.ndarray) and not block.flags.writeable:
                block = np.array(block)  # a read-only memmap slice: torch wants memory it may write
            X = torch.as_tensor(block).to(device=self.device, dtype=torch.float64)
            if X.ndim != 2 or X.shape[1] != self._means[v].shape[0]:
                raise LayerscopeError(f"view {v} has shape {tuple(X.shape)}: allowed is (b, {self._means[v].shape[0]})")
            if rows is None:
                rows = X.shape[0]
            elif X.shape[0] != rows:
                raise LayerscopeError(f"view {v} has {X.shape[0]} rows and view 0 has {rows}: views must hold the same rows")
            scores.append((X - self._means[v]) @ self._dirs[v].T)
            del X
        if len(scores) != self.num_views:
            raise LayerscopeError(f"got {len(scores)} views: this PCScoreGram was built for {self.num_views}")
        Z = torch.cat(scores, dim=1)
        self._gram += Z.T @ Z
        self.count += int(rows)
        return self

    def _block(self, a: int, b: int, k: int) -> torch.Tensor:
        ia, ib = int(self._offsets[a]), int(self._offsets[b])
        return self._gram[ia : ia + k, ib : ib + k]

    @staticmethod
    def _inverse_sqrt(G: torch.Tensor, rtol: float) -> torch.Tensor:
        """``G^{-1/2}`` on the range of a PSD ``G`` (directions below ``rtol`` times the largest dropped)."""
        evals, evecs = torch.linalg.eigh(G)
        keep = evals > evals.max().clamp(min=0) * rtol
        if not bool(keep.any()):
            raise LayerscopeError("a view has no variance in its top principal directions: nothing to correlate")
        return evecs[:, keep] / evals[keep].sqrt()

    def canonical_correlations(self, a: int, b: int, k: int, *, rtol: float = 1e-10) -> np.ndarray:
        """The canonical correlations (descending, in [0, 1]) between the top-``k`` scores of views ``a`` and ``b``."""
        for v in (a, b):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < self.num_views:
                raise LayerscopeError(f"view {v!r} is out of range: allowed are 0..{self.num_views - 1}")
        limit = min(self.ks[a], self.ks[b])
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
            raise LayerscopeError(f"k={k!r} is out of range for views {a} and {b}: allowed are 1..{limit} "
                                  "(the number of principal directions kept for them)")
        if self.count < 2:
            raise LayerscopeError(f"PCScoreGram has seen {self.count} rows: canonical correlations need at least 2")
        Wa = self._inverse_sqrt(self._block(a, a, k), rtol)
        Wb = self._inverse_sqrt(self._block(b, b, k), rtol)
        rho = torch.linalg.svdvals(Wa.T @ self._block(a, b, k) @ Wb)
        return np.clip(rho.cpu().numpy(), 0.0, 1.0)

    def mean_correlation(self, a: int, b: int, k: int) -> float:
        """The mean canonical correlation of :meth:`canonical_correlations`."""
        return float(self.canonical_correlations(a, b, k).mean())
