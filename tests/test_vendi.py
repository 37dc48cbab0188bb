"""Vendi scores (metrics), greedy Vendi selection and projection onto selected rows (interventions).

The reference for the scores is the ``vendi-score`` package (vertaix/Vendi-Score,
``vendi_score/vendi.py``, version 0.0.3). It imports scikit-learn at module level, which this project
does not depend on, so its ``score_K``/``entropy_q`` are reproduced below line for line (dense branch);
``test_matches_installed_package`` compares with the real package where it is installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.special import logsumexp

from layerscope.errors import LayerscopeError
from layerscope.interventions.vendi_selection import TIE_ATOL, _median_sigma2, project_onto_rows, vendi_select
from layerscope.metrics.vendi import rbf_bandwidth, vendi_kernel, vendi_score, vendi_score_from_kernel

# --------------------------------------------------------------------------------------------------
# The package's definitions, reproduced (vendi_score/vendi.py: weight_K, entropy_q, score_K, score_X)
# --------------------------------------------------------------------------------------------------


def pkg_entropy_q(p, q=1):
    p_ = p[p > 0]
    if q == 1:
        return -(p_ * np.log(p_)).sum()
    if q == "inf":
        return -np.log(np.max(p))
    return np.log((p_**q).sum()) / (1 - q)


def pkg_score_K(K, q=1):
    K_ = K / K.shape[0]
    w = scipy.linalg.eigvalsh(K_)
    return np.exp(pkg_entropy_q(w, q=q))


def pkg_normalize_rows(X):  # sklearn.preprocessing.normalize(X, axis=1): zero rows stay zero
    norms = np.linalg.norm(X, axis=1)
    norms[norms == 0] = 1.0
    return X / norms[:, None]


def rbf_direct(V, sigma=1.0):
    """The RBF kernel from explicit differences (independent of the Gram-form code under test)."""
    sq = ((V[:, None, :] - V[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * sigma**2))


def median_sigma(X):
    i, j = np.triu_indices(len(X), 1)
    sq = ((X[i] - X[j]) ** 2).sum(-1)
    sq = sq[sq > 0]
    return math.sqrt(np.median(sq)) if sq.size else 1.0


QS = [1, 0.5, 2, "inf"]


def _our_q(q):
    return math.inf if q == "inf" else q


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rbf_scores_match_package(q, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(scale=0.4, size=(30, 6))
    for sigma in (1.0, 0.3, 2.5):
        expected = pkg_score_K(rbf_direct(X, sigma), q=q)
        assert vendi_score(X, "rbf", q=_our_q(q), bandwidth=sigma) == pytest.approx(expected, rel=1e-9, abs=1e-6)
    # the default kernel is the fork's exp(-|x - y|^2 / 2)
    assert vendi_score(X, q=_our_q(q)) == pytest.approx(pkg_score_K(rbf_direct(X), q=q), rel=1e-9)
    # the package's own spelling of q = inf is accepted too
    if q == "inf":
        assert vendi_score(X, q="inf") == pytest.approx(pkg_score_K(rbf_direct(X), q="inf"), rel=1e-12)


@pytest.mark.parametrize("q", QS)
def test_linear_and_kernel_scores_match_package(q):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(25, 40))
    X[3] = 0.0  # a zero row stays zero under the package's normalisation
    expected = pkg_score_K(pkg_normalize_rows(X) @ pkg_normalize_rows(X).T, q=q)
    assert vendi_score(X, "linear", q=_our_q(q)) == pytest.approx(expected, rel=1e-9)
    raw = pkg_score_K(X @ X.T, q=q)
    assert vendi_score(X, "linear", q=_our_q(q), normalize=False) == pytest.approx(raw, rel=1e-9)
    # an arbitrary full-rank PSD kernel matrix, numpy or torch
    F = rng.normal(size=(20, 30))
    K = F @ F.T
    assert vendi_score_from_kernel(K, q=_our_q(q)) == pytest.approx(pkg_score_K(K, q=q), rel=1e-9)
    assert vendi_score_from_kernel(torch.from_numpy(K), q=_our_q(q)) == pytest.approx(pkg_score_K(K, q=q), rel=1e-9)
    # rank-deficient (rank 5): rounding-level eigenvalues count as 0 here, the package keeps the positive
    # ones; q >= 1 agrees to rounding, q < 1 to what that noise moves (well inside 1e-6)
    F = rng.normal(size=(20, 5))
    K = F @ F.T
    rel = 1e-9 if q != 0.5 else 1e-6
    assert vendi_score_from_kernel(K, q=_our_q(q)) == pytest.approx(pkg_score_K(K, q=q), rel=rel)
    assert vendi_score_from_kernel(K, q=0) == pytest.approx(5.0, rel=1e-12)  # the rank


def test_callable_kernel_is_filled_pairwise():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 3))
    calls = []

    def k(x, y, gamma=0.5):
        calls.append(1)
        return math.exp(-gamma * float(((x - y) ** 2).sum()))

    assert vendi_score(X, k) == pytest.approx(vendi_score(X), rel=1e-12)
    assert len(calls) == 12 * 13 // 2  # i <= j, mirrored, as the package's score()
    assert vendi_score(X, k, gamma=2.0) == pytest.approx(vendi_score(X, bandwidth=0.5), rel=1e-12)


def test_matches_installed_package():
    vendi = pytest.importorskip("vendi_score.vendi")
    rng = np.random.default_rng(11)
    X = rng.normal(scale=0.5, size=(20, 4))
    K = rbf_direct(X)
    for q in QS:
        assert vendi_score(X, q=_our_q(q)) == pytest.approx(vendi.score_K(K, q=q), rel=1e-9)


@pytest.mark.parametrize("q", [1, 0.5, 2, math.inf, 0])
def test_known_values(q):
    n = 7
    same = np.tile(np.array([[0.3, -1.0, 2.0]]), (n, 1))
    assert vendi_score(same, q=q) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(same, "linear", q=q) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score_from_kernel(np.ones((n, n)), q=q) == pytest.approx(1.0, abs=1e-9)
    far = 100.0 * np.eye(n)  # orthogonal and far apart: K = I
    assert vendi_score(far, q=q) == pytest.approx(n, rel=1e-12)
    assert vendi_score(far, "linear", q=q) == pytest.approx(n, rel=1e-12)
    # the median bandwidth scales with the data: here every pair is at the median distance, k = exp(-1/2)
    K = np.full((n, n), math.exp(-0.5)) + (1 - math.exp(-0.5)) * np.eye(n)
    assert vendi_score(far, bandwidth="median", q=q) == pytest.approx(pkg_score_K(K, q=q if q != math.inf else "inf"), rel=1e-9)
    # two groups of identical rows count as two items
    two = np.vstack([np.zeros((4, 3)), 50 * np.ones((4, 3))])
    assert vendi_score(two, q=q) == pytest.approx(2.0, rel=1e-9)


def test_median_bandwidth_rule():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(21, 4))
    X[7] = X[2]  # a coinciding pair is left out of the median
    sigma = median_sigma(X)
    assert rbf_bandwidth(X, "median") == pytest.approx(sigma, rel=1e-12)
    assert rbf_bandwidth(X, 0.7) == 0.7
    assert vendi_score(X, bandwidth="median") == pytest.approx(pkg_score_K(rbf_direct(X, sigma)), rel=1e-9)
    np.testing.assert_allclose(vendi_kernel(X, bandwidth="median"), rbf_direct(X, sigma), rtol=1e-12, atol=1e-15)
    # an even number of pairs (20 rows: 190 pairs, none coinciding): the mean of the two middle values
    Y = rng.normal(size=(20, 4))
    i, j = np.triu_indices(20, 1)
    sq = np.sort(((Y[i] - Y[j]) ** 2).sum(-1))
    assert rbf_bandwidth(Y, "median") ** 2 == pytest.approx((sq[94] + sq[95]) / 2, rel=1e-12)
    # the selection uses the same rule (Gram form on the device)
    for Z in (X, Y):
        Zt = torch.from_numpy(Z)
        Zc = Zt - Zt.mean(0, keepdim=True)
        assert _median_sigma2(Zc, (Zc * Zc).sum(1)) == pytest.approx(rbf_bandwidth(Z, "median") ** 2, rel=1e-10)
    assert rbf_bandwidth(np.ones((5, 2)), "median") == 1.0  # all rows coincide


def test_score_bad_inputs():
    X = np.random.default_rng(0).normal(size=(5, 3))
    bad_q = [-1, "two", True, math.nan, None, -math.inf]
    for q in bad_q:
        with pytest.raises(LayerscopeError, match="q="):
            vendi_score(X, q=q)
        with pytest.raises(LayerscopeError, match="q="):
            vendi_score_from_kernel(np.eye(3), q=q)
    with pytest.raises(LayerscopeError, match="square"):
        vendi_score_from_kernel(np.ones((3, 4)))
    with pytest.raises(LayerscopeError, match="symmetric"):
        vendi_score_from_kernel(np.array([[1.0, 0.5], [0.1, 1.0]]))
    with pytest.raises(LayerscopeError, match="non-finite"):
        vendi_score_from_kernel(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(LayerscopeError, match="positive eigenvalue"):
        vendi_score_from_kernel(np.zeros((3, 3)))
    with pytest.raises(LayerscopeError, match="2-D"):
        vendi_score(np.ones(4))
    with pytest.raises(LayerscopeError, match="2-D"):
        vendi_score(np.ones((2, 2, 2)))
    with pytest.raises(LayerscopeError, match="at least one row"):
        vendi_score(np.ones((0, 3)))
    with pytest.raises(LayerscopeError, match="non-finite"):
        vendi_score(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(LayerscopeError, match="unknown kernel"):
        vendi_score(X, kernel="cosine")
    with pytest.raises(LayerscopeError, match="unknown option"):
        vendi_score(X, kernel="rbf", sigma=1.0)
    with pytest.raises(LayerscopeError, match="unknown option"):
        vendi_score(X, kernel="linear", bandwidth=1.0)
    with pytest.raises(LayerscopeError, match="normalize"):
        vendi_score(X, kernel="linear", normalize="yes")
    for bw in (0, -1.0, math.inf, math.nan, "mean", True, None):
        with pytest.raises(LayerscopeError, match="bandwidth"):
            vendi_score(X, bandwidth=bw)
        with pytest.raises(LayerscopeError, match="bandwidth"):
            vendi_select(X, 2, bandwidth=bw)
    with pytest.raises(LayerscopeError, match="non-finite"):
        vendi_score(X, kernel=lambda x, y: math.nan)


# --------------------------------------------------------------------------------------------------
# Greedy selection
# --------------------------------------------------------------------------------------------------


def brute_force_greedy(X, k, sigma=1.0, use_quality=False, minimize=False, log_domain=False):
    """The fork's algorithm written directly: for every step and every remaining candidate, build the
    kernel of the enlarged set from the vectors, take its full eigendecomposition, score it (times the
    mean quality exp(-|x|^2) of the set when use_quality). Ties (within TIE_ATOL on the log score) go to
    the lowest index. ``log_domain`` scores log(VS) + log(mean quality) (for qualities that underflow)."""
    n = len(X)
    selected = []
    for _ in range(k):
        cands, objs = [], []
        for c in range(n):
            if c in selected:
                continue
            V = X[selected + [c]]
            w = np.linalg.eigvalsh(rbf_direct(V, sigma) / len(V))
            H = pkg_entropy_q(w, 1)
            if log_domain:
                obj = H + (logsumexp(-(V**2).sum(1)) - math.log(len(V)) if use_quality else 0.0)
            else:
                score = np.exp(H) * (np.mean(np.exp(-(V**2).sum(1))) if use_quality else 1.0)
                obj = math.log(score)
            cands.append(c)
            objs.append(obj)
        objs = np.array(objs)
        tied = objs <= objs.min() + TIE_ATOL if minimize else objs >= objs.max() - TIE_ATOL
        selected.append(cands[int(np.flatnonzero(tied)[0])])
    return selected


@pytest.mark.parametrize("method", ["eigh", "secular"])
@pytest.mark.parametrize("use_quality,minimize", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_brute_force(method, use_quality, minimize, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(scale=0.5, size=(40, 6))
    expected = brute_force_greedy(X, 8, use_quality=use_quality, minimize=minimize)
    got = vendi_select(X, 8, use_quality=use_quality, minimize=minimize, method=method)
    assert got == expected
    assert len(set(got)) == 8


@pytest.mark.parametrize("method", ["eigh", "secular"])
def test_greedy_median_bandwidth_and_torch_input(method):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 10))
    expected = brute_force_greedy(X, 8, sigma=median_sigma(X))
    assert vendi_select(torch.from_numpy(X).float().double(), 8, bandwidth="median", method=method) == expected
    assert vendi_select(X, 8, bandwidth=0.8, method=method) == brute_force_greedy(X, 8, sigma=0.8)
    assert vendi_select(X, 8, method=method, device="cpu") == vendi_select(X, 8, method="auto")


@pytest.mark.parametrize("method", ["eigh", "secular"])
def test_greedy_hard_spectra(method):
    """Duplicates, near-duplicates and K = I make repeated and tiny eigenvalues (secular deflation)."""
    rng = np.random.default_rng(9)
    base = rng.normal(scale=0.6, size=(12, 5))
    X = np.vstack([base, base[:6], base[:6] + 1e-9 * rng.normal(size=(6, 5)), rng.normal(scale=0.1, size=(10, 5))])
    assert vendi_select(X, 10, method=method) == brute_force_greedy(X, 10)
    assert vendi_select(X, 10, method=method, minimize=True) == brute_force_greedy(X, 10, minimize=True)
    # every set of identical rows scores 1, every set of orthogonal far-apart rows scores |S|: all ties
    assert vendi_select(np.ones((9, 3)), 5, method=method) == [0, 1, 2, 3, 4]
    assert vendi_select(100 * np.eye(9), 5, method=method) == [0, 1, 2, 3, 4]
    assert vendi_select(100 * np.eye(9), 9, method=method, minimize=True) == list(range(9))
    # a clustered set (|x - y|^2 large, K close to I) as weight rows of a layer give
    W = rng.normal(scale=0.3, size=(50, 64))
    assert vendi_select(W, 12, method=method) == brute_force_greedy(W, 12)


def test_quality_does_not_underflow():
    rng = np.random.default_rng(2)
    X = 20.0 + rng.normal(scale=2.0, size=(30, 8))  # exp(-|x|^2) underflows to 0 for every row
    assert np.all(np.exp(-(X**2).sum(1)) == 0)
    got = vendi_select(X, 6, use_quality=True, bandwidth="median")
    assert got[0] == int(np.argmin((X**2).sum(1)))  # the first pick is the highest quality
    assert got == brute_force_greedy(X, 6, sigma=median_sigma(X), use_quality=True, log_domain=True)
    assert vendi_select(X, 6, use_quality=True, bandwidth="median", method="secular") == got
    assert vendi_select(X, 6, use_quality=True, bandwidth="median", minimize=True) == brute_force_greedy(
        X, 6, sigma=median_sigma(X), use_quality=True, minimize=True, log_domain=True
    )


def test_selection_score_agrees_with_metric():
    rng = np.random.default_rng(8)
    X = rng.normal(scale=0.5, size=(30, 4))
    sel = vendi_select(X, 6)
    best = vendi_score(X[sel])
    # the greedy set beats every set that swaps its last pick for another row
    for c in set(range(30)) - set(sel):
        assert vendi_score(X[sel[:-1] + [c]]) <= best + 1e-12


def test_select_bad_inputs():
    X = np.random.default_rng(0).normal(size=(6, 3))
    for k in (0, 7, -1, 2.0, True, "3", None):
        with pytest.raises(LayerscopeError, match="k="):
            vendi_select(X, k)
    assert sorted(vendi_select(X, 6)) == list(range(6))
    assert vendi_select(X, np.int64(1)) == [0]
    with pytest.raises(LayerscopeError, match="non-finite"):
        vendi_select(np.array([[0.0, np.nan], [1.0, 2.0]]), 1)
    with pytest.raises(LayerscopeError, match="2-D"):
        vendi_select(np.ones(5), 1)
    with pytest.raises(LayerscopeError, match="2-D"):
        vendi_select(np.ones((0, 5)), 1)
    with pytest.raises(LayerscopeError, match="dtype"):
        vendi_select(np.array([["a", "b"]]), 1)
    with pytest.raises(LayerscopeError, match="use_quality"):
        vendi_select(X, 2, use_quality="yes")
    with pytest.raises(LayerscopeError, match="minimize"):
        vendi_select(X, 2, minimize=1)
    with pytest.raises(LayerscopeError, match="method"):
        vendi_select(X, 2, method="fast")
    with pytest.raises(LayerscopeError, match="device"):
        vendi_select(X, 2, device="no-such-device")


# --------------------------------------------------------------------------------------------------
# Projection onto the selected rows
# --------------------------------------------------------------------------------------------------


def lstsq_projection(W, rows):
    """For each row w of W, the closest vector in span(W[rows]), through numpy.linalg.lstsq."""
    A = W[rows].T  # (d, r)
    coef, *_ = np.linalg.lstsq(A, W.T, rcond=None)
    return (A @ coef).T


def test_projection_is_least_squares_optimum():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(30, 12))
    rows = [4, 17, 0, 9, 22]
    got = project_onto_rows(W, rows)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, lstsq_projection(W, rows), atol=1e-12)
    np.testing.assert_allclose(got[rows], W[rows], atol=1e-12)
    np.testing.assert_allclose(project_onto_rows(got, rows), got, atol=1e-12)  # a projection
    # the residual is orthogonal to the selected rows (normal equations)
    np.testing.assert_allclose((W - got) @ W[rows].T, 0.0, atol=1e-10)
    # as many independent rows as columns: nothing changes
    np.testing.assert_allclose(project_onto_rows(W, list(range(12))), W, atol=1e-11)


def test_projection_rank_deficient_rows():
    rng = np.random.default_rng(6)
    W = rng.normal(size=(20, 10))
    W[5] = 2.0 * W[1] - W[2]  # a combination of other selected rows
    W[6] = W[1]  # a duplicate
    W[7] = 0.0  # a zero row
    rows = [1, 2, 5, 6, 7, 3, 3]
    got = project_onto_rows(W, rows)
    np.testing.assert_allclose(got, lstsq_projection(W, rows), atol=1e-11)
    np.testing.assert_allclose(got[rows], W[rows], atol=1e-11)
    np.testing.assert_allclose(got, lstsq_projection(W, [1, 2, 3]), atol=1e-11)
    assert np.all(project_onto_rows(W, [7]) == 0)  # only a zero row: the zero matrix


def test_projection_tensor_dtypes():
    rng = np.random.default_rng(3)
    W64 = rng.normal(size=(16, 8))
    rows = vendi_select(W64, 4)
    ref = lstsq_projection(W64, rows)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        W = torch.from_numpy(W64).to(dtype)
        got = project_onto_rows(W, torch.tensor(rows))
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == W.shape
        expected = lstsq_projection(W.double().numpy(), rows)
        np.testing.assert_allclose(got.double().numpy(), expected, atol=tol, rtol=tol)
    np.testing.assert_allclose(project_onto_rows(torch.from_numpy(W64), rows).numpy(), ref, atol=1e-12)


def test_projection_bad_inputs():
    W = np.random.default_rng(0).normal(size=(5, 3))
    for rows in ([], [5], [-1], [1.0], [True], 2, "1", None):
        with pytest.raises(LayerscopeError, match="row"):
            project_onto_rows(W, rows)
    with pytest.raises(LayerscopeError, match="2-D"):
        project_onto_rows(np.ones(4), [0])
    with pytest.raises(LayerscopeError, match="non-finite"):
        project_onto_rows(np.array([[np.inf, 0.0], [1.0, 1.0]]), [0])
    with pytest.raises(LayerscopeError, match="dtype"):
        project_onto_rows(torch.ones(2, 2, dtype=torch.complex64), [0])
