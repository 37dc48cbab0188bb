"""CCA, SVCCA, PWCCA, PC-subspace CCA and PCA against independent float64 references.

The references here are written the textbook way, independent of the implementation (which works
with orthonormal bases from the SVD of the data): covariance blocks, ``Sxx^{-1/2}`` through
``scipy.linalg.eigh``, the SVD of ``Sxx^{-1/2} Sxy Syy^{-1/2}``; SVCCA and PWCCA follow the steps of
Google's ``svcca`` repository (``cca_core.get_cca_similarity``, the SVCCA notebook, ``compute_pwcca``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from layerscope.errors import LayerscopeError
from layerscope.metrics import (
    PCAResult,
    SampleSizeWarning,
    StreamingCovariance,
    cca,
    effective_rank,
    participation_ratio,
    pc_subspace_cca,
    pca,
    pwcca,
    pwcca_details,
    svcca,
)

# --------------------------------------------------------------------------------------------------
# independent references


def _inv_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = scipy.linalg.eigh(S)
    assert w.min() > 0, "reference needs full-rank covariance"
    return (V / np.sqrt(w)) @ V.T


def ref_cca(X: np.ndarray, Y: np.ndarray, epsilon: float = 0.0):
    """Canonical correlations, X-side canonical coefficient vectors, centred X (Google's ridge convention)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n = X.shape[0]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc / (n - 1), Yc.T @ Yc / (n - 1), Xc.T @ Yc / (n - 1)
    xmax, ymax = np.max(np.abs(Sxx)), np.max(np.abs(Syy))
    Sxx, Syy, Sxy = Sxx / xmax, Syy / ymax, Sxy / np.sqrt(xmax * ymax)
    Sxx = Sxx + epsilon * np.eye(len(Sxx))
    Syy = Syy + epsilon * np.eye(len(Syy))
    Kx, Ky = _inv_sqrt(Sxx), _inv_sqrt(Syy)
    u, rho, vt = np.linalg.svd(Kx @ Sxy @ Ky)
    k = min(X.shape[1], Y.shape[1])
    return rho[:k], Kx @ u[:, :k], Ky @ vt.T[:, :k], Xc, Yc


def ref_svcca(X: np.ndarray, Y: np.ndarray, keep) -> float:
    """Google's SVCCA notebook: centre, SVD, keep top directions as s[:k] * V[:k] scores, then CCA mean."""

    def reduce(A):
        Ac = A - A.mean(0)
        _, s, vt = np.linalg.svd(Ac, full_matrices=False)
        if isinstance(keep, int):
            k = keep
        else:
            frac = np.cumsum(s**2) / np.sum(s**2)
            k = int(np.argmax(frac >= keep - 1e-12)) + 1
        return Ac @ vt[:k].T

    return float(ref_cca(reduce(X), reduce(Y))[0].mean())


def ref_pwcca(X: np.ndarray, Y: np.ndarray, epsilon: float = 0.0):
    """Google's compute_pwcca steps on centred activations, weighting by X: returns (pwcca, weights)."""
    rho, coef_x, _, Xc, _ = ref_cca(X, Y, epsilon)
    dirns = Xc @ coef_x  # canonical variates of X over the samples
    P, _ = np.linalg.qr(dirns)
    weights = np.sum(np.abs(P.T @ Xc), axis=1)
    weights = weights / np.sum(weights)
    return float(np.sum(weights * rho)), weights


def known_cca_data(n: int, rhos, extra_x: int, extra_y: int, rng):
    """X, Y whose population canonical correlations are exactly ``rhos`` followed by zeros."""
    r = len(rhos)
    rhos = np.asarray(rhos)
    Z = rng.standard_normal((n, r))
    X0 = np.hstack([Z, rng.standard_normal((n, extra_x))])
    Y0 = np.hstack([rhos * Z + np.sqrt(1 - rhos**2) * rng.standard_normal((n, r)), rng.standard_normal((n, extra_y))])
    A = rng.standard_normal((r + extra_x, r + extra_x)) + 3 * np.eye(r + extra_x)
    B = rng.standard_normal((r + extra_y, r + extra_y)) + 3 * np.eye(r + extra_y)
    return X0 @ A + 5.0, Y0 @ B - 2.0


def random_pair(n=400, d1=7, d2=11, shared=3, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, shared))
    X = Z @ rng.standard_normal((shared, d1)) + 0.7 * rng.standard_normal((n, d1))
    Y = Z @ rng.standard_normal((shared, d2)) + 0.9 * rng.standard_normal((n, d2))
    # uneven column scales so the spectrum is not flat
    return X * rng.uniform(0.2, 3.0, d1), Y * rng.uniform(0.2, 3.0, d2)


# --------------------------------------------------------------------------------------------------
# CCA


def test_cca_recovers_known_canonical_correlations():
    rng = np.random.default_rng(1)
    rhos = [0.9, 0.6, 0.3]
    X, Y = known_cca_data(20_000, rhos, extra_x=2, extra_y=4, rng=rng)
    rho = cca(X, Y)
    assert rho.shape == (5,)  # min(d1, d2) = min(5, 7)
    assert np.all(np.diff(rho) <= 1e-15)
    np.testing.assert_allclose(rho[:3], rhos, atol=0.02)
    assert np.all(rho[3:] < 0.05)  # population zeros, up to sampling bias ~ sqrt(d/n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cca_matches_covariance_reference(seed):
    X, Y = random_pair(seed=seed)
    np.testing.assert_allclose(cca(X, Y), ref_cca(X, Y)[0], atol=1e-9)


def test_cca_ridge_matches_reference():
    X, Y = random_pair(n=120, d1=9, d2=6, seed=3)
    for eps in (1e-3, 0.1):
        np.testing.assert_allclose(cca(X, Y, epsilon=eps), ref_cca(X, Y, eps)[0], atol=1e-9)
    assert np.all(cca(X, Y, epsilon=0.1) < cca(X, Y) + 1e-12)


def test_cca_invariant_to_invertible_maps_and_translation():
    X, Y = random_pair(seed=4)
    rng = np.random.default_rng(4)
    A = rng.standard_normal((X.shape[1], X.shape[1]))
    B = rng.standard_normal((Y.shape[1], Y.shape[1]))
    base = cca(X, Y)
    np.testing.assert_allclose(cca(X @ A + 10.0, Y @ B - 3.0), base, atol=1e-6)
    np.testing.assert_allclose(cca(Y, X), base, atol=1e-10)  # symmetric


def test_cca_of_itself_is_all_ones_and_widths_may_differ():
    X, Y = random_pair(n=300, d1=4, d2=13, seed=5)
    np.testing.assert_allclose(cca(X, X), np.ones(4), atol=1e-10)
    rho = cca(X, Y)
    assert rho.shape == (4,)
    # a side that contains the other exactly: all correlations are 1
    np.testing.assert_allclose(cca(X, np.hstack([Y, X @ (np.eye(4) + 0.5)])), np.ones(4), atol=1e-10)


def test_cca_rank_deficient_inputs():
    X, Y = random_pair(n=300, d1=5, d2=6, seed=6)
    rng = np.random.default_rng(6)
    Y_wide = np.hstack([Y, Y[:, :2] * 3.0, Y @ rng.standard_normal((6, 3))])  # width 11, rank 6
    X_wide = np.hstack([X, X[:, :1]])  # width 6, rank 5
    rho = cca(X_wide, Y_wide)
    assert rho.shape == (5,)
    np.testing.assert_allclose(rho, ref_cca(X, Y)[0], atol=1e-9)


def test_cca_with_torch_inputs_matches_numpy():
    X, Y = random_pair(seed=7)
    expected = cca(X, Y)
    out = cca(torch.from_numpy(X), torch.from_numpy(Y).requires_grad_())
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, atol=1e-12)
    out32 = cca(torch.from_numpy(X).float(), torch.from_numpy(Y).float())
    np.testing.assert_allclose(out32, expected, atol=1e-4)
    assert svcca(torch.from_numpy(X), torch.from_numpy(Y)) == pytest.approx(svcca(X, Y), abs=1e-12)
    assert pwcca(torch.from_numpy(X), torch.from_numpy(Y)) == pytest.approx(pwcca(X, Y), abs=1e-12)
    assert pc_subspace_cca(torch.from_numpy(X), Y, 3).mean == pytest.approx(pc_subspace_cca(X, Y, 3).mean, abs=1e-12)


def test_cca_warns_when_samples_are_few():
    rng = np.random.default_rng(8)
    X, Y = rng.standard_normal((30, 20)), rng.standard_normal((30, 25))
    with pytest.warns(SampleSizeWarning, match="n=30"):
        rho = cca(X, Y)
    assert rho.shape == (20,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(*random_pair(n=400))  # plenty of samples: silent
    for f in (lambda: svcca(X, Y, keep=1.0), lambda: pwcca(X, Y), lambda: pc_subspace_cca(X, Y, 20)):
        with pytest.warns(SampleSizeWarning):
            f()


# --------------------------------------------------------------------------------------------------
# SVCCA


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99, 2, 5])
def test_svcca_matches_reference(keep):
    X, Y = random_pair(n=500, d1=12, d2=9, seed=9)
    assert svcca(X, Y, keep=keep) == pytest.approx(ref_svcca(X, Y, keep), abs=1e-9)


def test_svcca_keep_all_is_mean_cca_and_int_keep_is_pc_subspace():
    X, Y = random_pair(seed=10)
    assert svcca(X, Y, keep=1.0) == pytest.approx(float(cca(X, Y).mean()), abs=1e-12)
    assert svcca(X, Y, keep=3) == pytest.approx(pc_subspace_cca(X, Y, 3).mean, abs=1e-12)
    assert 0.0 <= svcca(X, Y) <= 1.0


# --------------------------------------------------------------------------------------------------
# PWCCA


def test_pwcca_matches_reference_and_weights_sum_to_one():
    X, Y = random_pair(n=500, d1=8, d2=10, seed=11)
    expected, expected_w = ref_pwcca(X, Y)
    res = pwcca_details(X, Y)
    assert res.similarity == pytest.approx(expected, abs=1e-9)
    assert pwcca(X, Y) == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(res.weights, expected_w, atol=1e-9)
    assert res.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(res.weights >= 0)
    np.testing.assert_allclose(res.correlations, cca(X, Y), atol=1e-12)


def test_pwcca_ridge_matches_reference():
    X, Y = random_pair(n=200, d1=6, d2=9, seed=12)
    assert pwcca(X, Y, epsilon=0.05) == pytest.approx(ref_pwcca(X, Y, 0.05)[0], abs=1e-9)


def test_pwcca_weight_by_y_is_pwcca_with_arguments_swapped():
    X, Y = random_pair(n=400, d1=6, d2=9, seed=13)
    assert pwcca(X, Y, weight_by="y") == pytest.approx(pwcca(Y, X), abs=1e-10)
    assert pwcca(X, Y, weight_by="y") == pytest.approx(ref_pwcca(Y, X)[0], abs=1e-9)
    assert pwcca(X, X) == pytest.approx(1.0, abs=1e-10)


def test_pwcca_weights_follow_variance():
    """A highly correlated direction carrying most of X's activity dominates the weights."""
    rng = np.random.default_rng(14)
    n = 5000
    z = rng.standard_normal((n, 1))
    X = np.hstack([10 * z, rng.standard_normal((n, 3))])
    Y = np.hstack([z + 0.1 * rng.standard_normal((n, 1)), rng.standard_normal((n, 3))])
    res = pwcca_details(X, Y)
    assert res.weights[0] > 0.5
    assert res.similarity > float(res.correlations.mean())


# --------------------------------------------------------------------------------------------------
# PC-subspace CCA (the paper's Figure 3)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_pc_subspace_cca_matches_brute_force(k):
    X, Y = random_pair(n=500, d1=10, d2=8, seed=15)

    def scores(A):
        Ac = A - A.mean(0)
        w, V = np.linalg.eigh(np.cov(A, rowvar=False))
        return Ac @ V[:, np.argsort(w)[::-1][:k]]

    expected = ref_cca(scores(X), scores(Y))[0]
    res = pc_subspace_cca(X, Y, k)
    np.testing.assert_allclose(res.correlations, expected, atol=1e-9)
    assert res.mean == pytest.approx(float(expected.mean()), abs=1e-9)
    mean, corr = res  # unpacks as (mean, correlations)
    assert corr.shape == (k,)


def test_pc_subspace_cca_full_k_is_cca():
    X, Y = random_pair(n=300, d1=5, d2=5, seed=16)
    np.testing.assert_allclose(pc_subspace_cca(X, Y, 5).correlations, cca(X, Y), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# PCA and spectra


def test_pca_matches_eigh_of_covariance():
    rng = np.random.default_rng(17)
    X = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 4.0
    w, V = np.linalg.eigh(np.cov(X, rowvar=False))
    order = np.argsort(w)[::-1]
    w, V = w[order], V[:, order]
    res = pca(torch.from_numpy(X), k=4)
    assert isinstance(res, PCAResult) and res.components.shape == (4, 6)
    np.testing.assert_allclose(res.explained_variance, w[:4], rtol=1e-10)
    np.testing.assert_allclose(res.explained_variance_ratio, w[:4] / w.sum(), rtol=1e-10)
    np.testing.assert_allclose(res.components @ res.components.T, np.eye(4), atol=1e-12)
    for i in range(4):
        sign = np.sign(res.components[i] @ V[:, i])
        np.testing.assert_allclose(res.components[i], sign * V[:, i], atol=1e-9)
    np.testing.assert_allclose(res.mean, X.mean(0), atol=1e-12)
    full = pca(X)
    assert full.k == 6 and full.explained_variance_ratio.sum() == pytest.approx(1.0)
    scores = res.transform(X)
    np.testing.assert_allclose(scores.var(axis=0, ddof=1), w[:4], rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_covariance_equals_np_cov(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((1000, 8)) @ rng.standard_normal((8, 8)) + 100.0  # large mean: needs a stable merge
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=7, replace=False))
    sc = StreamingCovariance(8)
    for i, part in enumerate(np.split(X, cuts)):
        sc.update(torch.from_numpy(part) if i % 2 else part)
    sc.update(np.empty((0, 8)))
    assert sc.count == 1000
    np.testing.assert_allclose(sc.mean, X.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sc.covariance(), np.cov(X, rowvar=False), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sc.covariance(ddof=0), np.cov(X, rowvar=False, ddof=0), rtol=0, atol=1e-10)
    # merged shards give the same
    a, b = StreamingCovariance(8).update(X[:300]), StreamingCovariance(8).update(X[300:])
    np.testing.assert_allclose(a.merge(b).covariance(), np.cov(X, rowvar=False), rtol=0, atol=1e-10)
    # and its PCA matches the PCA of the data
    ps, pd = sc.pca(3), pca(X, 3)
    np.testing.assert_allclose(ps.explained_variance, pd.explained_variance, rtol=1e-9)
    np.testing.assert_allclose(np.abs(ps.components @ pd.components.T), np.eye(3), atol=1e-7)
    np.testing.assert_allclose(ps.explained_variance_ratio, pd.explained_variance_ratio, rtol=1e-9)


def test_effective_rank_and_participation_ratio():
    assert effective_rank(np.full(7, 2.5)) == pytest.approx(7.0)
    assert participation_ratio(np.full(7, 2.5)) == pytest.approx(7.0)
    assert effective_rank([3.0, 3.0, 3.0, 0.0, 0.0]) == pytest.approx(3.0)
    assert participation_ratio(torch.tensor([3.0, 3.0, 3.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank([5.0, 0.0]) == pytest.approx(1.0)
    lam = np.array([4.0, 2.0, 1.0, 1.0])
    p = lam / lam.sum()
    assert effective_rank(lam) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert participation_ratio(lam) == pytest.approx(64.0 / 22.0)
    assert effective_rank([1.0, -1e-15]) == pytest.approx(1.0)  # eigh round-off tolerated


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda X, Y: cca(X, Y[:-1]), "X has 50 rows and Y has 49"),
        (lambda X, Y: cca(X[:1], Y[:1]), "n=1"),
        (lambda X, Y: cca(X[:, 0], Y), r"shape \(50,\)"),
        (lambda X, Y: cca(np.where(np.eye(50, 3) > 0, np.nan, X), Y), "3 non-finite"),
        (lambda X, Y: cca(X, np.ones((50, 2))), "Y is constant"),
        (lambda X, Y: cca(X, Y, epsilon=-1.0), "epsilon=-1.0"),
        (lambda X, Y: cca(X, Y, rtol=2.0), "rtol=2.0"),
        (lambda X, Y: svcca(X, Y, keep=0.0), "keep=0.0"),
        (lambda X, Y: svcca(X, Y, keep=1.5), "keep=1.5"),
        (lambda X, Y: svcca(X, Y, keep=0), "keep=0"),
        (lambda X, Y: svcca(X, Y, keep=True), "keep=True"),
        (lambda X, Y: svcca(X, Y, keep="all"), "keep='all'"),
        (lambda X, Y: pwcca(X, Y, weight_by="z"), "weight_by='z'"),
        (lambda X, Y: pc_subspace_cca(X, Y, 0), "k=0"),
        (lambda X, Y: pc_subspace_cca(X, Y, 4), r"k=4.*1\.\.3"),
        (lambda X, Y: cca(X.astype(complex), Y), "complex"),
        (lambda X, Y: pca(X, k=9), r"k=9.*1\.\.3"),
        (lambda X, Y: pca(np.zeros((0, 3))), r"shape \(0, 3\)"),
        (lambda X, Y: effective_rank([1.0, -0.5]), "-0.5"),
        (lambda X, Y: participation_ratio([0.0, 0.0]), "all zero"),
        (lambda X, Y: effective_rank(np.ones((2, 2))), r"shape \(2, 2\)"),
        (lambda X, Y: StreamingCovariance(3).update(np.ones((4, 5))), r"shape \(4, 5\)"),
        (lambda X, Y: StreamingCovariance(3).update(np.ones((1, 3))).covariance(), "seen 1 rows"),
        (lambda X, Y: StreamingCovariance(0), "d=0"),
        (lambda X, Y: StreamingCovariance(3).pca(4), "k=4"),
    ],
)
def test_bad_input_is_refused_with_a_message(call, match):
    rng = np.random.default_rng(18)
    X, Y = rng.standard_normal((50, 3)), rng.standard_normal((50, 4))
    with pytest.raises(LayerscopeError, match=match):
        call(X, Y)
