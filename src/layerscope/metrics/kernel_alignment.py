"""Centred kernel alignment (CKA) between representations, and the representation-shift term.

Definitions (Kornblith, Norouzi, Lee, Hinton 2019, "Similarity of Neural Network Representations
Revisited"; their reference code ``cka(gram_x, gram_y, debiased)``):

* ``X`` is ``(n, d1)``, ``Y`` is ``(n, d2)``: ``n`` examples (rows) in two representation spaces.
* Gram matrices ``K = k(X)``, ``L = k(Y)`` (``n x n``):

  - linear kernel: ``K = X X^T``;
  - RBF kernel: ``K_ij = exp(-||x_i - x_j||^2 / (2 * sigma^2 * m))`` where ``m`` is the **median of
    the squared pairwise distances over all n*n entries** (the zero diagonal included, ``np.median``
    semantics: the mean of the two middle values when n*n is even). This is exactly
    ``gram_rbf(x, threshold=sigma)`` of the reference code: the bandwidth is ``sigma`` times the
    (root of the median squared) Euclidean distance, computed separately for each input.

* Biased HSIC (HSIC_0): ``tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``.
* Unbiased HSIC (HSIC_1, Song, Smola, Gretton, Bedo, Borgwardt 2012), with ``K~``, ``L~`` the Gram
  matrices with their diagonal set to zero::

      HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

  computed through the U-centring of the reference code's ``center_gram(unbiased=True)`` (Szekely
  and Rizzo 2014): ``<U(K), U(L)> = n (n - 3) HSIC_1``. It needs ``n >= 4`` and may be negative.
* ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; "unbiased CKA" uses HSIC_1 throughout
  (Nguyen, Raghu, Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?").

Linear CKA with ``n > d1 + d2`` is computed in feature space (``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F
||Yc^T Yc||_F)`` on column-centred features, and the matching closed form of HSIC_1), which costs
``O(n d^2)`` instead of ``O(n^2 d)`` and needs no ``n x n`` matrix.

Inputs may be numpy arrays or torch tensors; the arithmetic is float64 on the device of the first
torch input (CPU for numpy). Scalars come back as Python floats, matrices as numpy arrays.
A representation with no variance across examples has no defined CKA: the result is ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from layerscope.errors import LayerscopeError, allowed

ArrayLike = Union[np.ndarray, torch.Tensor]

KERNELS = ("linear", "rbf")
LINEAR_METHODS = ("auto", "gram", "features")

# A centred Gram (or cross-covariance) norm this small relative to the uncentred one means the
# input is constant across examples up to rounding: CKA is undefined there.
_DEGENERATE_RTOL = 1e-12

__all__ = [
    "KERNELS",
    "MinibatchCKA",
    "center_gram",
    "cka",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka",
    "rbf_cka",
    "representation_shift",
]


# --------------------------------------------------------------------------------------------------
# Input checks and conversion
# --------------------------------------------------------------------------------------------------


def _as_float64(x: object, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A 2-D float64 tensor from a numpy array, tensor or nested list; refused when not (n, d)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if device is not None and t.device != device:
            t = t.to(device)
        t = t.to(torch.float64)
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise LayerscopeError(f"{name} must be a numeric array or tensor of shape (n, d), got {type(x).__name__}") from exc
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if device is not None:
            t = t.to(device)
    if t.ndim != 2:
        raise LayerscopeError(f"{name} must have shape (n, d) (examples x features), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise LayerscopeError(f"{name} has shape {tuple(t.shape)}: it needs at least one feature")
    if not bool(torch.isfinite(t).all()):
        raise LayerscopeError(f"{name} contains non-finite values (nan or inf): CKA needs finite activations")
    return t


def _device_of(*xs: object) -> torch.device | None:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def _check_n(n: int, unbiased: bool, what: str = "the number of examples n") -> None:
    need = 4 if unbiased else 2
    if n < need:
        kind = "the unbiased HSIC estimator" if unbiased else "CKA"
        raise LayerscopeError(f"{what} is {n}: {kind} needs n >= {need}")


def _check_pair(X: torch.Tensor, Y: torch.Tensor, names: tuple[str, str] = ("X", "Y")) -> int:
    if X.shape[0] != Y.shape[0]:
        raise LayerscopeError(
            f"{names[0]} and {names[1]} must hold the same examples (rows): {names[0]} has n={X.shape[0]}, "
            f"{names[1]} has n={Y.shape[0]}"
        )
    return X.shape[0]


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise LayerscopeError(f"unknown kernel {kernel!r}: allowed {allowed(KERNELS)}")
    return kernel


def _check_sigma(sigma: float) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"sigma {sigma!r} must be a positive number (a fraction of the median distance)") from exc
    if not math.isfinite(s) or s <= 0:
        raise LayerscopeError(f"sigma {sigma!r} must be a positive finite number (a fraction of the median distance), e.g. 0.8")
    return s


# --------------------------------------------------------------------------------------------------
# Gram matrices and centring
# --------------------------------------------------------------------------------------------------


def gram_linear(X: ArrayLike) -> torch.Tensor:
    """The linear Gram matrix ``X X^T`` (float64 tensor, ``n x n``)."""
    X = _as_float64(X, "X", _device_of(X))
    return X @ X.T


def _median_all(values: torch.Tensor) -> torch.Tensor:
    """``np.median`` of all entries (mean of the two middle values for an even count).

    ``torch.median`` returns the lower middle value and ``torch.quantile`` refuses more than 2^24
    entries, so this uses ``kthvalue``.
    """
    flat = values.reshape(-1)
    m = flat.numel()
    upper = torch.kthvalue(flat, m // 2 + 1).values
    if m % 2:
        return upper
    lower = torch.kthvalue(flat, m // 2).values
    return (lower + upper) / 2


def _sq_distances(X: torch.Tensor) -> torch.Tensor:
    dots = X @ X.T
    norms = torch.diagonal(dots)
    sq = (norms[:, None] + norms[None, :] - 2 * dots).clamp_min_(0)
    sq.fill_diagonal_(0)
    return sq


def _gram_rbf(X: torch.Tensor, sigma: float, name: str = "X") -> torch.Tensor:
    # Centre first: distances are unchanged and the cancellation in |a|^2 + |b|^2 - 2ab is smaller.
    sq = _sq_distances(X - X.mean(0, keepdim=True))
    median = _median_all(sq)
    if not float(median) > 0:
        raise LayerscopeError(
            f"the median squared pairwise distance of {name} is {float(median)!r}: more than half of its "
            f"example pairs coincide, so the RBF bandwidth (sigma x median distance) is undefined; use kernel='linear'"
        )
    return torch.exp(-sq / (2 * sigma**2 * median))


def gram_rbf(X: ArrayLike, sigma: float = 0.8) -> torch.Tensor:
    """RBF Gram matrix with bandwidth ``sigma`` x the median distance (Kornblith et al.'s ``gram_rbf``)."""
    sigma = _check_sigma(sigma)
    return _gram_rbf(_as_float64(X, "X", _device_of(X)), sigma)


def _center(K: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Centre a symmetric Gram matrix (a new tensor; ``K`` is left alone).

    biased: ``H K H``; unbiased: the U-centring of Szekely and Rizzo (zero diagonal), for which
    ``<U(K), U(L)> / (n (n - 3))`` is Song et al.'s unbiased HSIC.
    """
    n = K.shape[0]
    K = K.clone()
    if unbiased:
        K.fill_diagonal_(0)
        means = K.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        K.fill_diagonal_(0)
    else:
        means = K.mean(0)
        means = means - means.mean() / 2
        K -= means[:, None]
        K -= means[None, :]
    return K


def center_gram(K: ArrayLike, unbiased: bool = False) -> torch.Tensor:
    """Centre a symmetric ``n x n`` Gram matrix: ``H K H`` or, with ``unbiased``, its U-centring."""
    K = _as_float64(K, "K", _device_of(K))
    n = K.shape[0]
    if K.shape[1] != n:
        raise LayerscopeError(f"a Gram matrix must be square, got shape {tuple(K.shape)}")
    _check_n(n, unbiased)
    if not torch.allclose(K, K.T, rtol=1e-8, atol=1e-10 * float(K.abs().max().clamp_min(1e-300))):
        raise LayerscopeError("the Gram matrix is not symmetric: pass k(X) for one input X")
    return _center(K, unbiased)


def _gram(X: torch.Tensor, kernel: str, sigma: float, name: str) -> torch.Tensor:
    if kernel == "linear":
        Xc = X - X.mean(0, keepdim=True)  # centring is a no-op for CKA, and keeps the Gram well scaled
        return Xc @ Xc.T
    return _gram_rbf(X, sigma, name)


def _centred_grams(acts: Sequence[torch.Tensor], kernel: str, unbiased: bool, sigma: float, prefix: str) -> torch.Tensor:
    """``(L, n*n)``: each layer's centred Gram, flattened. Degenerate layers are rows of nan.

    Written row by row into one preallocated tensor (stacking L separate ``n x n`` Grams would
    copy them all once more: a third of the time of a 30-layer matrix at n = 4096)."""
    out: torch.Tensor | None = None
    for i, X in enumerate(acts):
        K = _gram(X, kernel, sigma, f"{prefix}[{i}]")
        raw = torch.linalg.matrix_norm(K)
        Kc = _center(K, unbiased).reshape(-1)
        del K
        if out is None:
            out = torch.empty((len(acts), Kc.numel()), dtype=Kc.dtype, device=Kc.device)
        out[i] = Kc if float(torch.linalg.vector_norm(Kc)) > _DEGENERATE_RTOL * float(raw) else float("nan")
    return out


def _cka_from_centred(Kc: torch.Tensor, Lc: torch.Tensor) -> float:
    nk = torch.linalg.vector_norm(Kc)
    nl = torch.linalg.vector_norm(Lc)
    return float((Kc.reshape(-1) @ Lc.reshape(-1)) / (nk * nl))


# --------------------------------------------------------------------------------------------------
# Linear CKA in feature space
# --------------------------------------------------------------------------------------------------


def _hsic_linear_features(X: torch.Tensor, Y: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """``n (n-3) HSIC_1`` (unbiased) or ``tr(KHLH)`` (biased) for ``K = X X^T``, ``L = Y Y^T``.

    Both are computed without an ``n x n`` matrix. ``X`` and ``Y`` are expected column-centred
    (then the biased form is ``||Y^T X||_F^2``; the unbiased form is exact for any shift).
    """
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2  # tr(K L) = sum_ij K_ij L_ij
    if not unbiased:
        return cross
    n = X.shape[0]
    kd = (X * X).sum(1)  # diagonal of K
    ld = (Y * Y).sum(1)
    k1 = X @ X.sum(0) - kd  # K~ 1 (K with zero diagonal)
    l1 = Y @ Y.sum(0) - ld
    trace = cross - kd @ ld  # tr(K~ L~)
    return trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2 * (k1 @ l1) / (n - 2)


def _linear_cka_features(X: torch.Tensor, Y: torch.Tensor, unbiased: bool) -> float:
    Xc = X - X.mean(0, keepdim=True)
    Yc = Y - Y.mean(0, keepdim=True)
    xy = _hsic_linear_features(Xc, Yc, unbiased)
    xx = _hsic_linear_features(Xc, Xc, unbiased)
    yy = _hsic_linear_features(Yc, Yc, unbiased)
    # Degenerate (constant) input: its centred self-similarity vanishes against the raw one.
    for self_term, raw in ((xx, X), (yy, Y)):
        if not float(self_term) > _DEGENERATE_RTOL * float(torch.linalg.matrix_norm(raw.T @ raw)) ** 2:
            return float("nan")
    return float(xy / torch.sqrt(xx * yy))


# --------------------------------------------------------------------------------------------------
# Public scalar API
# --------------------------------------------------------------------------------------------------


def _prepare(X: ArrayLike, Y: ArrayLike, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    device = _device_of(X, Y)
    Xt = _as_float64(X, "X", device)
    Yt = _as_float64(Y, "Y", device)
    n = _check_pair(Xt, Yt)
    _check_n(n, unbiased)
    return Xt, Yt, n


def linear_cka(X: ArrayLike, Y: ArrayLike, *, unbiased: bool = False, method: str = "auto") -> float:
    """Linear CKA of ``X (n, d1)`` and ``Y (n, d2)``.

    ``method``: ``"features"`` (``O(n d^2)``, no ``n x n`` matrix), ``"gram"`` (explicit centred Gram
    matrices) or ``"auto"`` (features when ``n > d1 + d2``). Both give the same number.
    """
    if method not in LINEAR_METHODS:
        raise LayerscopeError(f"unknown method {method!r} for linear CKA: allowed {allowed(LINEAR_METHODS)}")
    Xt, Yt, n = _prepare(X, Y, unbiased)
    if method == "features" or (method == "auto" and n > Xt.shape[1] + Yt.shape[1]):
        return _linear_cka_features(Xt, Yt, unbiased)
    grams = _centred_grams([Xt, Yt], "linear", unbiased, 0.8, "X")
    return _cka_from_centred(grams[0], grams[1])


def rbf_cka(X: ArrayLike, Y: ArrayLike, sigma: float = 0.8, *, unbiased: bool = False) -> float:
    """RBF-kernel CKA; each input's bandwidth is ``sigma`` x its median pairwise distance (see module doc)."""
    sigma = _check_sigma(sigma)
    Xt, Yt, _ = _prepare(X, Y, unbiased)
    Kc = _center(_gram_rbf(Xt, sigma, "X"), unbiased)
    Lc = _center(_gram_rbf(Yt, sigma, "Y"), unbiased)
    return _cka_from_centred(Kc, Lc)


def cka(X: ArrayLike, Y: ArrayLike, kernel: str = "linear", unbiased: bool = False, sigma: float = 0.8) -> float:
    """CKA between ``X (n, d1)`` and ``Y (n, d2)`` (rows are the same examples).

    ``kernel``: ``"linear"`` or ``"rbf"`` (bandwidth ``sigma`` x the median pairwise distance, per
    input, as Kornblith et al.'s code; ``sigma`` is ignored for the linear kernel). ``unbiased``:
    use Song et al.'s unbiased HSIC estimator (needs ``n >= 4``).

    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 8))
    >>> round(cka(X, 3 * X @ np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]), 6)
    1.0
    """
    _check_kernel(kernel)
    if kernel == "linear":
        return linear_cka(X, Y, unbiased=unbiased)
    return rbf_cka(X, Y, sigma, unbiased=unbiased)


def hsic(X: ArrayLike, Y: ArrayLike, kernel: str = "linear", unbiased: bool = False, sigma: float = 0.8) -> float:
    """HSIC of ``X`` and ``Y``: biased ``tr(K H L H) / (n-1)^2`` or Song et al.'s unbiased HSIC_1.

    For the linear kernel the population value is ``||Cov(X, Y)||_F^2``, which HSIC_1 estimates
    without bias.
    """
    _check_kernel(kernel)
    if kernel == "rbf":
        sigma = _check_sigma(sigma)
    Xt, Yt, n = _prepare(X, Y, unbiased)
    if kernel == "linear" and n > Xt.shape[1] + Yt.shape[1]:
        value = _hsic_linear_features(Xt - Xt.mean(0), Yt - Yt.mean(0), unbiased)
    else:
        Kc = _center(_gram(Xt, kernel, sigma, "X"), unbiased)
        Lc = _center(_gram(Yt, kernel, sigma, "Y"), unbiased)
        value = Kc.reshape(-1) @ Lc.reshape(-1)
    return float(value / (n * (n - 3)) if unbiased else value / (n - 1) ** 2)


# --------------------------------------------------------------------------------------------------
# All pairs of layers
# --------------------------------------------------------------------------------------------------


def _layer_list(acts: object, name: str, device: torch.device | None) -> list[torch.Tensor]:
    if isinstance(acts, (np.ndarray, torch.Tensor)) and getattr(acts, "ndim", 0) == 3:
        acts = list(acts)
    if not isinstance(acts, Sequence) or isinstance(acts, (str, bytes)) or len(acts) == 0:
        raise LayerscopeError(f"{name} must be a non-empty list of (n, d) activations, one per layer, got {type(acts).__name__}")
    layers = [_as_float64(a, f"{name}[{i}]", device) for i, a in enumerate(acts)]
    n = layers[0].shape[0]
    for i, a in enumerate(layers):
        if a.shape[0] != n:
            raise LayerscopeError(
                f"every layer must hold the same examples: {name}[0] has n={n}, {name}[{i}] has n={a.shape[0]}"
            )
    return layers


def cka_matrix(
    acts: Sequence[ArrayLike],
    acts_other: Sequence[ArrayLike] | None = None,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float = 0.8,
) -> np.ndarray:
    """Layer-by-layer CKA matrix: ``(L, L)`` within ``acts``, or ``(L, L_other)`` against ``acts_other``.

    ``acts[l]`` is layer ``l``'s ``(n, d_l)`` activations (a list, or one ``(L, n, d)`` array). Each
    layer's centred Gram matrix is computed once, normalised to unit Frobenius norm, and one matrix
    product of the flattened Grams gives every pair. Memory is ``(L + L_other) n^2`` float64 values;
    for many examples accumulate :class:`MinibatchCKA` instead.
    """
    _check_kernel(kernel)
    if kernel == "rbf":
        sigma = _check_sigma(sigma)
    device = _device_of(*(list(acts) if isinstance(acts, Sequence) else [acts]))
    layers = _layer_list(acts, "acts", device)
    n = layers[0].shape[0]
    _check_n(n, unbiased)
    G = _centred_grams(layers, kernel, unbiased, sigma, "acts")
    G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
    if acts_other is None:
        M = G @ G.T
        M = (M + M.T) / 2
        finite = torch.isfinite(torch.diagonal(M))
        M.diagonal()[finite] = 1.0  # exactly, rather than 1 +- rounding
        return M.cpu().numpy()
    other = _layer_list(acts_other, "acts_other", device)
    if other[0].shape[0] != n:
        raise LayerscopeError(
            f"acts and acts_other must hold the same examples: acts has n={n}, acts_other has n={other[0].shape[0]}"
        )
    H = _centred_grams(other, kernel, unbiased, sigma, "acts_other")
    H /= torch.linalg.vector_norm(H, dim=1, keepdim=True)
    return (G @ H.T).cpu().numpy()


class MinibatchCKA:
    """CKA between every pair of layers, accumulated over mini-batches (Nguyen, Raghu, Kornblith 2021).

    For each batch ``b`` of examples the unbiased HSIC_1 of every pair of layers is added up, and::

        CKA(l, m) = mean_b HSIC_1(K_b^l, L_b^m) / sqrt(mean_b HSIC_1(K_b^l, K_b^l) mean_b HSIC_1(L_b^m, L_b^m))

    Memory does not grow with the number of examples: one ``b x b`` Gram per layer and batch is
    built, U-centred once, and all pairs come from one matrix product. Batches need ``b >= 4``
    examples and may differ in size. Without ``num_layers_y`` the layers of one model are compared
    with themselves (``update(acts_x)``); with it, ``update(acts_x, acts_y)`` compares two models on
    the same examples.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> m = MinibatchCKA(2)
    >>> for _ in range(3):
    ...     x = rng.normal(size=(16, 4))
    ...     m.update([x, 2 * x])
    >>> np.round(m.compute(), 6).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """

    def __init__(self, num_layers_x: int, num_layers_y: int | None = None, *, kernel: str = "linear", sigma: float = 0.8):
        for name, value in (("num_layers_x", num_layers_x), ("num_layers_y", num_layers_y)):
            if value is None and name == "num_layers_y":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayerscopeError(f"{name} {value!r} must be a positive integer (the number of layers)")
        self.num_layers_x = num_layers_x
        self.num_layers_y = num_layers_y
        self.kernel = _check_kernel(kernel)
        self.sigma = _check_sigma(sigma) if kernel == "rbf" else float(sigma)
        self.reset()

    @property
    def paired(self) -> bool:
        """Whether two sets of layers are compared (``num_layers_y`` given)."""
        return self.num_layers_y is not None

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.num_batches = 0
        self.num_examples = 0
        self._xy: torch.Tensor | None = None  # sum over batches of HSIC_1 for each (x layer, y layer)
        self._xx: torch.Tensor | None = None  # ... of each x layer with itself
        self._yy: torch.Tensor | None = None

    def _batch(self, acts: object, name: str, expected: int, device: torch.device | None) -> torch.Tensor:
        layers = _layer_list(acts, name, device)
        if len(layers) != expected:
            raise LayerscopeError(f"{name} has {len(layers)} layers, but this MinibatchCKA was made for {expected}")
        b = layers[0].shape[0]
        _check_n(b, True, f"the batch size of {name}")
        G = _centred_grams(layers, self.kernel, True, self.sigma, name)
        return torch.nan_to_num(G, nan=0.0)  # a constant layer contributes no dependence in this batch

    def update(self, acts_x: Sequence[ArrayLike], acts_y: Sequence[ArrayLike] | None = None) -> None:
        """Add one batch: ``acts_x[l]`` is layer ``l``'s ``(b, d_l)`` activations for the batch's examples."""
        if self.paired and acts_y is None:
            raise LayerscopeError("acts_y is missing: this MinibatchCKA compares two sets of layers (num_layers_y was given)")
        if not self.paired and acts_y is not None:
            raise LayerscopeError("acts_y was given, but this MinibatchCKA was made without num_layers_y (one set of layers)")
        device = self._xx.device if self._xx is not None else _device_of(
            *(list(acts_x) if isinstance(acts_x, Sequence) else [acts_x])
        )
        Gx = self._batch(acts_x, "acts_x", self.num_layers_x, device)
        b = int(round(math.sqrt(Gx.shape[1])))
        scale = 1.0 / (b * (b - 3))
        if acts_y is None:
            xy = (Gx @ Gx.T) * scale
            xx = torch.diagonal(xy).clone()
            yy = xx
        else:
            Gy = self._batch(acts_y, "acts_y", self.num_layers_y, device)
            if Gy.shape[1] != Gx.shape[1]:
                by = int(round(math.sqrt(Gy.shape[1])))
                raise LayerscopeError(f"acts_x and acts_y must hold the same examples: batch sizes {b} and {by}")
            xy = (Gx @ Gy.T) * scale
            xx = (Gx * Gx).sum(1) * scale
            yy = (Gy * Gy).sum(1) * scale
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx, yy
        else:
            self._xy += xy
            self._xx += xx
            self._yy = self._xx if not self.paired else self._yy + yy
        self.num_batches += 1
        self.num_examples += b

    def compute(self) -> np.ndarray:
        """The ``(L_x, L_y)`` CKA matrix from the batches so far (``nan`` where a layer never varied)."""
        if self._xy is None:
            raise LayerscopeError("MinibatchCKA.compute() before any update(): add at least one batch")
        denom = torch.sqrt(torch.outer(self._xx, self._yy))
        with torch.no_grad():
            M = torch.where(denom > 0, self._xy / denom, torch.full_like(denom, float("nan")))
        return M.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# The critical-layers representation term
# --------------------------------------------------------------------------------------------------


def representation_shift(cka_matrix: ArrayLike, w: int = 3) -> np.ndarray:
    """Per-layer representation term of the critical-layers paper (Liu et al. 2025).

    ``delta(l) = mean(C[r, l] for r in [l - w//2, l + w//2] clipped to 0..L-1)``, the diagonal
    ``C[l, l]`` included: the mean CKA of layer ``l`` with its neighbours. A small ``delta`` is a
    large representation shift. ``w`` is a positive odd window (3 in the paper's correlation, 5 in
    its spectral figure).
    """
    if not isinstance(w, int) or isinstance(w, bool) or w < 1 or w % 2 == 0:
        raise LayerscopeError(f"window w {w!r} must be a positive odd integer (e.g. 3 or 5)")
    C = cka_matrix.detach().cpu().numpy() if isinstance(cka_matrix, torch.Tensor) else np.asarray(cka_matrix)
    C = C.astype(np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise LayerscopeError(f"representation_shift needs a square (L, L) CKA matrix, got shape {C.shape}")
    L = C.shape[0]
    h = w // 2
    return np.array([C[max(0, l - h) : min(L, l + h + 1), l].mean() for l in range(L)])
