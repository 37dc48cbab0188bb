"""Diversity-based selection of weight rows with Vendi scores, and projection onto the selected rows.

The LASER fork's Vendi intervention, done efficiently:

1. The rows of a weight matrix ``W`` ``(out, in)`` (the output neurons) are the vectors.
   :func:`vendi_select` picks ``k`` of them greedily: each step adds the row that maximises the Vendi
   score (order 1, ``exp`` of the entropy of the eigenvalues of ``K / m`` for the ``m x m`` kernel of the
   enlarged set) under the RBF kernel ``exp(-|x - y|^2 / (2 σ^2))``, ``σ = 1`` by default (the fork's
   fixed ``exp(-|x - y|^2 / 2)``) or ``σ`` from the median heuristic (``bandwidth="median"``, the same
   rule as :func:`layerscope.metrics.vendi.rbf_bandwidth`: ``σ^2`` = median of the non-zero squared
   pairwise distances, computed once on all ``n`` rows).
2. :func:`project_onto_rows` replaces ``W`` by its projection onto the row space of the selected rows,
   the least-squares optimum ``W Q Q^T`` (``Q`` an orthonormal basis of that row space from a QR
   factorisation; no inverse is formed).

Selection rules, shared by the brute-force reference in the tests:

* ``use_quality=True`` multiplies the score by the mean quality ``exp(-|x|^2)`` of the set (the fork's
  definition, the quality-weighted Vendi score of Nguyen & Dieng 2024). Scores are compared through
  their logarithm (``H + logsumexp(-|x|^2) - log m``), so large norms do not underflow into ties.
* ``minimize=True`` picks the row that minimises the score instead (the fork's ``--min-diversity``).
* Ties: every singleton scores 1, so the first pick is the row with the lowest index (with quality:
  the highest quality, i.e. the smallest norm). In general, candidates whose log-score is within
  ``1e-9`` of the best count as tied and the one with the lowest index wins.

Efficiency: the kernel rows of the selected items against all ``n`` rows are computed once each
(``O(k n d)``), and each step scores all remaining candidates at once, in float64 on the device, by
one of two exact methods (``method=``):

* ``"eigh"``: batched ``torch.linalg.eigvalsh`` of the candidates' bordered ``m x m`` kernels
  (chunked to bound memory). Fast on the CPU (LAPACK per matrix).
* ``"secular"`` (incremental): one ``eigh`` of the selected set's ``s x s`` kernel ``U Λ U^T`` per step;
  for a candidate with kernel column ``b`` the enlarged kernel is similar to the arrowhead matrix
  ``[[Λ, z], [z^T, 1]]`` with ``z = U^T b``, whose eigenvalues are the roots of the secular equation
  ``1 - μ - Σ z_i^2 / (λ_i - μ) = 0``, one in each interval between consecutive ``λ_i`` (Cauchy
  interlacing). They are found by bisection on all candidates and intervals at once, to full float64
  precision; a collapsed interval (repeated ``λ``) or a zero ``z_i`` (deflation) needs no special case
  because the root then lies on the interval's end. Only tensor operations of size
  ``candidates x m x m``: the method of choice on a GPU, where ``eigvalsh`` of batches of matrices
  larger than 32 x 32 runs one matrix at a time.

``"auto"`` (default) uses ``"secular"`` on CUDA and ``"eigh"`` elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import LayerscopeError, allowed

__all__ = ["SELECTION_METHODS", "project_onto_rows", "vendi_select"]

SELECTION_METHODS = ("auto", "eigh", "secular")
# Candidates whose log-score is within this of the best are tied; the lowest index wins.
TIE_ATOL = 1e-9
# Elements of the largest temporary tensor per chunk of candidates (float64: 8 bytes each).
_CHUNK_ELEMENTS = 1 << 23
# A squared distance this small relative to |x|^2 + |y|^2 is rounding: the rows coincide.
_COINCIDE_RTOL = 64 * np.finfo(np.float64).eps


def _device(X: Any, device: Any) -> torch.device:
    if device is not None:
        try:
            dev = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise LayerscopeError(f"device={device!r} is not a valid torch device") from exc
    else:
        dev = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
    return torch.device("cpu") if dev.type == "mps" else dev  # MPS has no float64


def _as_matrix(X: Any, device: torch.device, name: str = "X") -> torch.Tensor:
    """``X`` as a finite 2-D float64 tensor on ``device``; refuses anything else."""
    if isinstance(X, torch.Tensor):
        if X.is_complex() or X.dtype == torch.bool:
            raise LayerscopeError(f"{name} has dtype {X.dtype}: allowed are real (n, d) arrays or tensors")
        t = X.detach()
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # ragged lists and other odd objects
            raise LayerscopeError(f"{name} cannot be read as an (n, d) array: {exc}") from exc
        if arr.dtype.kind not in "iuf":
            raise LayerscopeError(f"{name} has dtype {arr.dtype}: allowed are real (n, d) arrays or tensors")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise LayerscopeError(f"{name} has shape {tuple(t.shape)}: allowed is a 2-D (n, d) array with n, d >= 1 (rows are the vectors)")
    t = t.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise LayerscopeError(f"{name} has non-finite values (NaN or inf): allowed are finite values only")
    return t


def _check_bandwidth(bandwidth: Any) -> float | str:
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


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise LayerscopeError(f"{name}={value!r} is not valid: allowed are True or False")
    return bool(value)


def _row_sq_distances(Xc: torch.Tensor, norms: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """Squared distances of ``Xc[rows]`` to every row (Gram form on centred rows), rounding set to 0."""
    sq = norms[rows, None] + norms[None, :] - 2.0 * (Xc[rows] @ Xc.T)
    return torch.where(sq <= _COINCIDE_RTOL * (norms[rows, None] + norms[None, :]), torch.zeros_like(sq), sq)


def _median_sigma2(Xc: torch.Tensor, norms: torch.Tensor) -> float:
    """Median of the non-zero squared distances over pairs ``i < j`` (1 when all rows coincide)."""
    n = Xc.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    parts = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        sq = _row_sq_distances(Xc, norms, slice(start, stop))
        upper = torch.arange(n, device=Xc.device)[None, :] > torch.arange(start, stop, device=Xc.device)[:, None]
        values = sq[upper]
        parts.append(values[values > 0])
    values = torch.cat(parts)
    count = values.numel()
    if count == 0:
        return 1.0
    upper_mid = torch.kthvalue(values, count // 2 + 1).values
    if count % 2:
        return float(upper_mid)
    return float((torch.kthvalue(values, count // 2).values + upper_mid) / 2)


def _entropy(mu: torch.Tensor, m: int) -> torch.Tensor:
    """``-Σ p log p`` over ``p = μ / m > 0`` along the last axis (non-positive ``p`` dropped)."""
    p = (mu / m).clamp_min(0.0)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def _entropies_eigh(K_S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Entropies of the bordered kernels ``[[K_S, b], [b^T, 1]]`` for each column ``b`` of ``B``."""
    s, C = B.shape
    m = s + 1
    out = torch.empty(C, dtype=torch.float64, device=B.device)
    step = max(1, _CHUNK_ELEMENTS // (m * m))
    for start in range(0, C, step):
        b = B[:, start : start + step].T  # (c, s)
        A = torch.empty((b.shape[0], m, m), dtype=torch.float64, device=B.device)
        A[:, :s, :s] = K_S
        A[:, :s, s] = b
        A[:, s, :s] = b
        A[:, s, s] = 1.0
        out[start : start + step] = _entropy(torch.linalg.eigvalsh(A), m)
    return out


def _entropies_secular(K_S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """As :func:`_entropies_eigh`, through the secular equation of the arrowhead form (module doc)."""
    s, C = B.shape
    m = s + 1
    # The s x s eigendecomposition is tiny: LAPACK on the CPU beats a GPU solver's latency.
    lam_cpu, U_cpu = torch.linalg.eigh(K_S.cpu())
    lam, U = lam_cpu.to(B.device), U_cpu.to(B.device)
    Z = U.T @ B  # (s, C)
    W = (Z * Z).T.contiguous()  # (C, s): squared border weights
    znorm = W.sum(dim=1).sqrt()
    # Interlacing brackets: root j lies in [λ_j, λ_{j+1}], with outer ends from Weyl's bound
    # (the arrowhead is diag(Λ, 1) plus a perturbation of 2-norm |z|).
    low_end = torch.minimum(lam[0], torch.ones((), dtype=lam.dtype, device=lam.device)) - znorm
    high_end = torch.maximum(lam[-1], torch.ones((), dtype=lam.dtype, device=lam.device)) + znorm
    out = torch.empty(C, dtype=torch.float64, device=B.device)
    step = max(1, _CHUNK_ELEMENTS // (m * s))
    eps = float(np.finfo(np.float64).eps)
    for start in range(0, C, step):
        stop = min(C, start + step)
        c = stop - start
        lo = torch.cat([low_end[start:stop, None], lam[None, :].expand(c, s)], dim=1)  # (c, m)
        hi = torch.cat([lam[None, :].expand(c, s), high_end[start:stop, None]], dim=1)
        width = float((hi - lo).max())
        scale = max(float(hi.abs().max()), float(lo.abs().max()), 1.0)
        iterations = max(1, min(200, math.ceil(math.log2(max(width, eps * scale) / (eps * scale))) + 2))
        w = W[start:stop, :, None]  # (c, s, 1)
        buf = torch.empty((c, m, s), dtype=torch.float64, device=B.device)
        total = torch.empty((c, m, 1), dtype=torch.float64, device=B.device)
        for _ in range(iterations):
            mid = (lo + hi) * 0.5
            torch.sub(lam[None, None, :], mid[:, :, None], out=buf)
            buf.reciprocal_()
            torch.bmm(buf, w, out=total)
            f = 1.0 - mid - total[:, :, 0]  # decreasing in μ between poles
            right = f > 0
            lo = torch.where(right, mid, lo)
            hi = torch.where(right, hi, mid)
        out[start:stop] = _entropy((lo + hi) * 0.5, m)
    return out


def _pick(objective: torch.Tensor, candidates: torch.Tensor, minimize: bool) -> int:
    """The lowest-index candidate within ``TIE_ATOL`` of the best objective."""
    if minimize:
        tied = objective <= objective.min() + TIE_ATOL
    else:
        tied = objective >= objective.max() - TIE_ATOL
    return int(candidates[torch.nonzero(tied)[0, 0]])


def vendi_select(
    X: Any,
    k: int,
    *,
    bandwidth: float | str = 1.0,
    use_quality: bool = False,
    minimize: bool = False,
    device: str | torch.device | None = None,
    method: str = "auto",
) -> list[int]:
    """Greedy Vendi selection of ``k`` rows of ``X`` ``(n, d)``; the row indices in selection order.

    Each step adds the row that maximises (``minimize=True``: minimises) the order-1 Vendi score of the
    enlarged set under the RBF kernel with ``bandwidth`` (``σ``, default 1, or ``"median"``), times the
    mean quality ``exp(-|x|^2)`` of the set when ``use_quality``. Ties go to the lowest index (see the
    module doc). Computed in float64 on ``device`` (default: ``X``'s device; the CPU for numpy input
    and for MPS); ``method`` is ``"auto"``, ``"eigh"`` or ``"secular"`` (same result, see module doc).

    >>> vendi_select(np.array([[0.0], [0.1], [5.0]]), 2)
    [0, 2]
    """
    dev = _device(X, device)
    Xt = _as_matrix(X, dev)
    n = Xt.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
        raise LayerscopeError(f"k={k!r} is not a valid number of rows to select from {n}: allowed are integers 1..{n}")
    k = int(k)
    bandwidth = _check_bandwidth(bandwidth)
    use_quality = _check_flag(use_quality, "use_quality")
    minimize = _check_flag(minimize, "minimize")
    if method not in SELECTION_METHODS:
        raise LayerscopeError(f"method={method!r} is not valid: allowed {allowed(SELECTION_METHODS)}")
    if method == "auto":
        method = "secular" if dev.type == "cuda" else "eigh"
    entropies = _entropies_secular if method == "secular" else _entropies_eigh

    Xc = Xt - Xt.mean(dim=0, keepdim=True)  # distances are unchanged; less cancellation in the Gram form
    norms = (Xc * Xc).sum(dim=1)
    sigma2 = _median_sigma2(Xc, norms) if bandwidth == "median" else float(bandwidth) ** 2
    log_quality = -(Xt * Xt).sum(dim=1) if use_quality else None

    selected: list[int] = []
    kernel_rows = torch.empty((k, n), dtype=torch.float64, device=dev)  # selected items x all rows
    remaining = torch.ones(n, dtype=torch.bool, device=dev)
    log_quality_sum = None  # logsumexp of the selected rows' log-qualities
    for step in range(k):
        candidates = torch.nonzero(remaining)[:, 0]
        if step == 0:
            objective = torch.zeros(n, dtype=torch.float64, device=dev)  # every singleton scores 1
        else:
            sel = torch.tensor(selected, device=dev)
            K_S = kernel_rows[:step][:, sel]
            K_S = (K_S + K_S.T) * 0.5
            K_S.fill_diagonal_(1.0)
            objective = entropies(K_S, kernel_rows[:step][:, candidates])
        if use_quality:
            cand_lq = log_quality[candidates]
            lse = cand_lq if log_quality_sum is None else torch.logaddexp(log_quality_sum, cand_lq)
            objective = objective + lse - math.log(step + 1)
        choice = _pick(objective, candidates, minimize)
        selected.append(choice)
        remaining[choice] = False
        if use_quality:
            q = log_quality[choice]
            log_quality_sum = q if log_quality_sum is None else torch.logaddexp(log_quality_sum, q)
        if step + 1 < k:
            row = _row_sq_distances(Xc, norms, torch.tensor([choice], device=dev))[0]
            kernel_rows[step] = torch.exp(row / (-2.0 * sigma2))
            kernel_rows[step, choice] = 1.0
    return selected


def _as_rows(rows: Any, n: int) -> list[int]:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().tolist()
    elif isinstance(rows, np.ndarray):
        rows = rows.tolist()
    if isinstance(rows, (int, np.integer)) or not isinstance(rows, Sequence) or isinstance(rows, str):
        raise LayerscopeError(f"rows={rows!r} is not valid: allowed is a non-empty sequence of row indices 0..{n - 1}")
    out = []
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= int(r) < n:
            raise LayerscopeError(f"row index {r!r} is out of range: allowed are integers 0..{n - 1}")
        out.append(int(r))
    if not out:
        raise LayerscopeError("rows is empty: select at least one row to project onto")
    return out


def project_onto_rows(W: Any, rows: Any) -> Any:
    """``W`` ``(n, d)`` projected onto the row space of ``W[rows]``: the least-squares optimum.

    Each row ``w`` becomes the closest vector to it in ``span(W[rows])``; the selected rows are kept
    (up to rounding). Computed as ``(W B) B^T`` with ``B`` an orthonormal basis of that span: the
    reduced QR ``W[rows]^T = Q R`` gives ``range = Q range(R)``, and the SVD of the small ``R``
    (``r x r``) gives ``range(R)`` robustly, so linearly dependent selected rows (duplicates, zero rows)
    are handled: directions with singular value ``<= max(d, r) * eps * σ_max`` are dropped (numpy's
    ``matrix_rank`` rule); all-zero selected rows give a zero matrix. No inverse is formed.

    Arithmetic is float64 for float64 input and float32 otherwise; the result has ``W``'s dtype and
    device (a numpy array for numpy input).
    """
    is_numpy = not isinstance(W, torch.Tensor)
    if is_numpy:
        arr = np.asarray(W)
        if arr.dtype.kind not in "iuf":
            raise LayerscopeError(f"W has dtype {arr.dtype}: allowed are real (n, d) arrays or tensors")
        Wt = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        Wt = W.detach()
        if Wt.is_complex() or Wt.dtype == torch.bool:
            raise LayerscopeError(f"W has dtype {Wt.dtype}: allowed are real (n, d) arrays or tensors")
    if Wt.ndim != 2 or Wt.shape[0] == 0 or Wt.shape[1] == 0:
        raise LayerscopeError(f"W has shape {tuple(Wt.shape)}: allowed is a 2-D (n, d) matrix")
    n, d = Wt.shape
    idx = _as_rows(rows, n)
    compute = torch.float64 if Wt.dtype == torch.float64 else torch.float32
    Wc = Wt.to(compute)
    if not bool(torch.isfinite(Wc).all()):
        raise LayerscopeError("W has non-finite values (NaN or inf): allowed are finite values only")
    A = Wc[torch.tensor(idx, device=Wc.device)]  # (r, d)
    Q, R = torch.linalg.qr(A.T, mode="reduced")  # A^T = Q R, Q (d, min(d, r))
    U, S, _ = torch.linalg.svd(R, full_matrices=False)
    tol = float(S.max()) * max(d, len(idx)) * torch.finfo(compute).eps
    rank = int((S > tol).sum())
    if rank == 0:
        out = torch.zeros_like(Wc)
    else:
        basis = Q @ U[:, :rank]  # (d, rank), orthonormal
        out = (Wc @ basis) @ basis.T
    out = out.to(Wt.dtype)
    return out.numpy() if is_numpy else out
