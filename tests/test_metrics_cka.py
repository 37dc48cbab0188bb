"""CKA, unbiased HSIC, mini-batch CKA, the representation-shift term and rank correlation.

The references below are written independently, straight from the papers' formulas, in float64
numpy: explicit Gram matrices, an explicit centring matrix H = I - 11^T/n, HSIC = tr(K H L H), and
Song et al.'s (2012) unbiased estimator term by term.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from layerscope.errors import LayerscopeError
from layerscope.metrics.kernel_alignment import (
    MinibatchCKA,
    center_gram,
    cka,
    cka_matrix,
    gram_rbf,
    hsic,
    linear_cka,
    rbf_cka,
    representation_shift,
)
from layerscope.metrics.correlation import _kendall_rows, _spearman_rows, rank_correlation

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LAYERSCOPE_SHARED_DATA") or REPO.parent / "shared" / "data")
PAPER_FILE = SHARED / "critical-layers" / "corr_evaluation_outputs.json"


# ------------------------------------------------------------------------------------------------
# Independent references (Kornblith et al. 2019; Song et al. 2012)
# ------------------------------------------------------------------------------------------------


def ref_gram_linear(X):
    return X @ X.T


def ref_gram_rbf(X, sigma):
    sq = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)  # explicit pairwise squared distances
    return np.exp(-sq / (2 * sigma**2 * np.median(sq)))


def ref_hsic(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_hsic_unbiased(K, L):
    n = K.shape[0]
    Kt = K - np.diag(np.diag(K))
    Lt = L - np.diag(np.diag(L))
    one = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * (one @ Kt @ Lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def ref_cka(K, L, unbiased=False):
    h = ref_hsic_unbiased if unbiased else ref_hsic
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def related_pair(n, d1, d2, seed):
    """X and a noisy linear-plus-nonlinear function of it: CKA well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d1))
    Y = np.tanh(X @ rng.normal(size=(d1, d2))) + 0.5 * rng.normal(size=(n, d2))
    return X, Y


SHAPES = [(50, 20, 30), (20, 20, 30)]  # n > d and n < d


# ------------------------------------------------------------------------------------------------
# Agreement with the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d1,d2", SHAPES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("method", ["auto", "gram", "features"])
def test_linear_cka_matches_reference(n, d1, d2, unbiased, method):
    X, Y = related_pair(n, d1, d2, seed=n)
    expected = ref_cka(ref_gram_linear(X), ref_gram_linear(Y), unbiased)
    got = linear_cka(X, Y, unbiased=unbiased, method=method)
    assert isinstance(got, float)
    assert 0.05 < abs(expected) < 0.99  # a meaningful comparison, not 0 or 1
    assert got == pytest.approx(expected, abs=1e-6)
    assert cka(X, Y, unbiased=unbiased) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n,d1,d2", SHAPES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_rbf_cka_matches_reference(n, d1, d2, unbiased, sigma):
    X, Y = related_pair(n, d1, d2, seed=n + 1)
    expected = ref_cka(ref_gram_rbf(X, sigma), ref_gram_rbf(Y, sigma), unbiased)
    assert 0.05 < abs(expected) < 0.99
    assert rbf_cka(X, Y, sigma, unbiased=unbiased) == pytest.approx(expected, abs=1e-6)
    assert cka(X, Y, kernel="rbf", unbiased=unbiased, sigma=sigma) == pytest.approx(expected, abs=1e-6)


def test_rbf_bandwidth_is_a_fraction_of_the_median_distance():
    # Kornblith's rule: exp(-d^2 / (2 sigma^2 median(d^2))). A different bandwidth changes the value.
    X, Y = related_pair(40, 6, 5, seed=3)
    a = rbf_cka(X, Y, 0.8)
    assert a != pytest.approx(rbf_cka(X, Y, 3.0), abs=1e-3)
    # Scaling an input scales its median distance too: RBF CKA with this rule is scale invariant.
    assert rbf_cka(7.0 * X, Y, 0.8) == pytest.approx(a, abs=1e-10)


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_hsic_matches_reference(n, d1, d2):
    X, Y = related_pair(n, d1, d2, seed=7)
    K, L = ref_gram_linear(X), ref_gram_linear(Y)
    assert hsic(X, Y) == pytest.approx(ref_hsic(K, L), rel=1e-9)
    assert hsic(X, Y, unbiased=True) == pytest.approx(ref_hsic_unbiased(K, L), rel=1e-9)
    Kr, Lr = ref_gram_rbf(X, 0.8), ref_gram_rbf(Y, 0.8)
    assert hsic(X, Y, kernel="rbf") == pytest.approx(ref_hsic(Kr, Lr), rel=1e-9)
    assert hsic(X, Y, kernel="rbf", unbiased=True) == pytest.approx(ref_hsic_unbiased(Kr, Lr), rel=1e-9)


def test_public_gram_helpers_match_reference():
    X, Y = related_pair(30, 5, 4, seed=8)
    K, L = ref_gram_linear(X), ref_gram_linear(Y)
    H = np.eye(30) - np.ones((30, 30)) / 30
    np.testing.assert_allclose(center_gram(K).numpy(), H @ K @ H, atol=1e-10)
    Ku, Lu = center_gram(K, unbiased=True).numpy(), center_gram(L, unbiased=True).numpy()
    assert np.sum(Ku * Lu) / (30 * 27) == pytest.approx(ref_hsic_unbiased(K, L), rel=1e-10)
    np.testing.assert_allclose(gram_rbf(X, 0.8).numpy(), ref_gram_rbf(X, 0.8), atol=1e-12)
    with pytest.raises(LayerscopeError, match=r"not symmetric"):
        center_gram(np.triu(K))


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_space_form_equals_gram_form(unbiased):
    X, Y = related_pair(300, 12, 7, seed=11)
    X = X + 5.0  # an uncentred input: both forms centre (or are shift-invariant)
    g = linear_cka(X, Y, unbiased=unbiased, method="gram")
    f = linear_cka(X, Y, unbiased=unbiased, method="features")
    assert f == pytest.approx(g, abs=1e-10)
    assert linear_cka(X, Y, unbiased=unbiased) == pytest.approx(g, abs=1e-10)  # auto picks features here


# ------------------------------------------------------------------------------------------------
# Invariances and sanity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariances(unbiased):
    X, Y = related_pair(60, 10, 15, seed=5)
    rng = np.random.default_rng(99)
    Qx = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    Qy = np.linalg.qr(rng.normal(size=(15, 15)))[0]
    base = linear_cka(X, Y, unbiased=unbiased)
    assert linear_cka(X @ Qx, Y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X, Y @ Qy, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * X, Y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X, 0.01 * Y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    # ... but not to a non-isotropic scaling.
    assert linear_cka(X * np.linspace(0.1, 10, 10), Y, unbiased=unbiased) != pytest.approx(base, abs=1e-3)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_identical_inputs_is_one(kernel, unbiased):
    X, _ = related_pair(30, 8, 2, seed=2)
    assert cka(X, X, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)


def test_cka_of_independent_data_is_small():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(3000, 5)), rng.normal(size=(3000, 4))
    assert linear_cka(X, Y) < 0.01
    assert abs(linear_cka(X, Y, unbiased=True)) < 0.01
    small = rng.normal(size=(300, 5)), rng.normal(size=(300, 4))
    assert rbf_cka(*small) < 0.05


def test_unbiased_hsic_is_unbiased_and_biased_is_not():
    """Mean over 2000 small draws vs the population linear HSIC ||Cov(X, Y)||_F^2."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(5, 5))
    cov = A @ A.T / 5
    population = np.sum(cov[:3, 3:] ** 2)
    n, draws = 8, 2000
    unbiased, biased = [], []
    for _ in range(draws):
        Z = rng.multivariate_normal(np.zeros(5), cov, size=n)
        unbiased.append(hsic(Z[:, :3], Z[:, 3:], unbiased=True))
        biased.append(hsic(Z[:, :3], Z[:, 3:]))
    unbiased, biased = np.array(unbiased), np.array(biased)
    se_u = unbiased.std(ddof=1) / np.sqrt(draws)
    se_b = biased.std(ddof=1) / np.sqrt(draws)
    assert abs(unbiased.mean() - population) < 4 * se_u
    assert abs(biased.mean() - population) > 8 * se_b


# ------------------------------------------------------------------------------------------------
# Mini-batch CKA and the all-pairs matrix
# ------------------------------------------------------------------------------------------------


def layered(n, seed, dims=(6, 9, 4, 7)):
    """Activations of a toy 'network': each layer a noisy nonlinear map of the previous one."""
    rng = np.random.default_rng(seed)
    acts = [rng.normal(size=(n, dims[0]))]
    for d in dims[1:]:
        prev = acts[-1]
        acts.append(np.tanh(prev @ rng.normal(size=(prev.shape[1], d))) + 0.3 * rng.normal(size=(n, d)))
    return acts


def ref_minibatch(batches_x, batches_y):
    Lx, Ly = len(batches_x[0]), len(batches_y[0])
    M = np.empty((Lx, Ly))
    for i in range(Lx):
        for j in range(Ly):
            xy = np.mean(
                [ref_hsic_unbiased(ref_gram_linear(bx[i]), ref_gram_linear(by[j])) for bx, by in zip(batches_x, batches_y)]
            )
            xx = np.mean([ref_hsic_unbiased(ref_gram_linear(bx[i]), ref_gram_linear(bx[i])) for bx in batches_x])
            yy = np.mean([ref_hsic_unbiased(ref_gram_linear(by[j]), ref_gram_linear(by[j])) for by in batches_y])
            M[i, j] = xy / np.sqrt(xx * yy)
    return M


def split(acts, sizes):
    out, start = [], 0
    for s in sizes:
        out.append([a[start : start + s] for a in acts])
        start += s
    return out


def test_minibatch_cka_equals_mean_of_hsic_formula():
    acts = layered(100, seed=0)
    batches = split(acts, [30, 30, 25, 15])  # unequal batch sizes are allowed
    m = MinibatchCKA(len(acts))
    for b in batches:
        m.update(b)
    got = m.compute()
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, ref_minibatch(batches, batches), atol=1e-10)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-12)
    np.testing.assert_allclose(got, got.T, atol=1e-12)
    assert m.num_batches == 4 and m.num_examples == 100


def test_minibatch_cka_between_two_sets_of_layers():
    acts = layered(80, seed=1)
    other = layered(80, seed=2, dims=(5, 3))
    other = [other[0] + acts[0][:, :5], other[1]]  # related to the first model
    bx, by = split(acts, [40, 40]), split(other, [40, 40])
    m = MinibatchCKA(4, 2)
    for x, y in zip(bx, by):
        m.update(x, y)
    np.testing.assert_allclose(m.compute(), ref_minibatch(bx, by), atol=1e-10)


def test_minibatch_cka_approaches_full_data_unbiased_cka():
    n = 600
    acts = layered(n, seed=3)
    full = np.array([[cka(a, b, unbiased=True) for b in acts] for a in acts])

    def minibatch(b):
        m = MinibatchCKA(len(acts))
        for batch in split(acts, [b] * (n // b)):
            m.update(batch)
        return m.compute()

    one_batch = minibatch(n)
    np.testing.assert_allclose(one_batch, full, atol=1e-10)  # one batch of everything: exactly the full estimate
    err_small = np.abs(minibatch(20) - full).max()
    err_large = np.abs(minibatch(150) - full).max()
    assert err_large < 0.02
    assert err_large < err_small


@pytest.mark.parametrize("kernel,unbiased", [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)])
def test_cka_matrix_equals_pairwise_loop(kernel, unbiased):
    acts = layered(40, seed=4)
    M = cka_matrix(acts, kernel=kernel, unbiased=unbiased)
    loop = np.array([[cka(a, b, kernel=kernel, unbiased=unbiased) for b in acts] for a in acts])
    np.testing.assert_allclose(M, loop, atol=1e-10)
    np.testing.assert_array_equal(M, M.T)
    np.testing.assert_array_equal(np.diag(M), 1.0)
    other = layered(40, seed=5, dims=(3, 8))
    C = cka_matrix(acts, other, kernel=kernel, unbiased=unbiased)
    loop = np.array([[cka(a, b, kernel=kernel, unbiased=unbiased) for b in other] for a in acts])
    assert C.shape == (4, 2)
    np.testing.assert_allclose(C, loop, atol=1e-10)


def test_cka_matrix_accepts_a_stacked_array():
    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(3, 25, 6))
    np.testing.assert_allclose(cka_matrix(stacked), cka_matrix(list(stacked)), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Torch inputs
# ------------------------------------------------------------------------------------------------


def test_torch_inputs_give_the_same_as_numpy():
    torch.manual_seed(0)
    Xt, Yt = torch.randn(50, 20), torch.randn(50, 30)  # float32 tensors
    Yt = Yt + Xt @ torch.randn(20, 30)
    X, Y = Xt.numpy().astype(np.float64), Yt.numpy().astype(np.float64)
    for kernel in ("linear", "rbf"):
        for unbiased in (False, True):
            assert cka(Xt, Yt, kernel=kernel, unbiased=unbiased) == pytest.approx(
                cka(X, Y, kernel=kernel, unbiased=unbiased), abs=1e-12
            )
    assert cka(Xt, Y) == pytest.approx(cka(X, Y), abs=1e-12)  # mixed inputs
    acts_t = [Xt, Yt, Xt[:, :5]]
    acts = [a.numpy().astype(np.float64) for a in acts_t]
    np.testing.assert_allclose(cka_matrix(acts_t), cka_matrix(acts), atol=1e-12)
    mt, mn = MinibatchCKA(3), MinibatchCKA(3)
    for s in (0, 25):
        mt.update([a[s : s + 25] for a in acts_t])
        mn.update([a[s : s + 25] for a in acts])
    assert isinstance(mt.compute(), np.ndarray)
    np.testing.assert_allclose(mt.compute(), mn.compute(), atol=1e-12)
    assert isinstance(representation_shift(torch.from_numpy(cka_matrix(acts))), np.ndarray)


# ------------------------------------------------------------------------------------------------
# Representation shift
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 3, 5])
def test_representation_shift_matches_direct_loop(w):
    rng = np.random.default_rng(w)
    A = rng.uniform(0.5, 1.0, size=(9, 9))
    C = (A + A.T) / 2
    np.fill_diagonal(C, 1.0)
    got = representation_shift(C, w=w)
    expected = []
    for l in range(9):
        rows = [r for r in range(l - w // 2, l + w // 2 + 1) if 0 <= r < 9]
        expected.append(sum(C[r, l] for r in rows) / len(rows))
    np.testing.assert_allclose(got, expected, atol=1e-15)
    if w == 1:
        np.testing.assert_array_equal(got, 1.0)  # only the diagonal
    # the first layer's window is clipped: rows 0..w//2
    assert got[0] == pytest.approx(C[: w // 2 + 1, 0].mean())


# ------------------------------------------------------------------------------------------------
# Rank correlation
# ------------------------------------------------------------------------------------------------


def test_rank_correlation_on_the_papers_stored_arrays():
    if not PAPER_FILE.is_file():
        pytest.skip(f"the paper's stored arrays {PAPER_FILE} are absent (set LAYERSCOPE_SHARED_DATA)")
    data = json.loads(PAPER_FILE.read_text())
    centres = data["window_centres"]
    losses = data["avg_test_loss_with_window_substituted"]
    layers = data["delta_window3_layers"]
    deltas = data["delta_window3"]
    assert len(centres) == len(losses) and len(layers) == len(deltas)
    # Pair by layer index: the window centres that have a delta (the notebook's loss[1:-1]).
    loss_by_centre = dict(zip(centres, losses))
    paired_losses = [loss_by_centre[l] for l in layers]
    assert paired_losses == losses[1:-1]
    r = rank_correlation(paired_losses, deltas)
    assert r["n"] == 26
    assert round(r["spearman"], 4) == round(data["reported_spearman"], 4) == -0.8523
    assert r["spearman_p"] == pytest.approx(data["reported_p"], rel=1e-6)
    assert r["spearman_ci"][0] < r["spearman"] < r["spearman_ci"][1] < 0
    assert r["kendall"] < 0 and r["kendall_ci"][0] < r["kendall"] < r["kendall_ci"][1]


def test_rank_correlation_matches_scipy_and_is_seeded():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    r = rank_correlation(a, b, n_boot=500, seed=3)
    rho, rho_p = stats.spearmanr(a, b)
    tau, tau_p = stats.kendalltau(a, b)
    assert (r["spearman"], r["spearman_p"], r["kendall"], r["kendall_p"]) == pytest.approx((rho, rho_p, tau, tau_p))
    assert set(r) == {"spearman", "spearman_p", "kendall", "kendall_p", "spearman_ci", "kendall_ci", "n"}
    assert r == rank_correlation(a, b, n_boot=500, seed=3)
    assert r["spearman_ci"] != rank_correlation(a, b, n_boot=500, seed=4)["spearman_ci"]
    narrow = rank_correlation(a, b, n_boot=500, seed=3, ci=0.5)
    assert r["spearman_ci"][0] < narrow["spearman_ci"][0] < narrow["spearman_ci"][1] < r["spearman_ci"][1]
    skipped = rank_correlation(a, b, n_boot=0)
    assert np.isnan(skipped["spearman_ci"]).all() and skipped["spearman"] == r["spearman"]


def test_bootstrap_statistics_match_scipy_on_resamples_with_ties():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=15), rng.normal(size=15)
    idx = rng.integers(0, 15, size=(20, 15))  # resamples repeat pairs: ties on both sides
    xs, ys = a[idx], b[idx]
    np.testing.assert_allclose(_spearman_rows(xs, ys), [stats.spearmanr(x, y)[0] for x, y in zip(xs, ys)], atol=1e-12)
    np.testing.assert_allclose(_kendall_rows(xs, ys), [stats.kendalltau(x, y)[0] for x, y in zip(xs, ys)], atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors_name_the_bad_value():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(50, 4)), rng.normal(size=(40, 4))
    with pytest.raises(LayerscopeError, match=r"n=50.*n=40"):
        cka(X, Y)
    with pytest.raises(LayerscopeError, match=r"is 1: CKA needs n >= 2"):
        cka(X[:1], X[:1])
    with pytest.raises(LayerscopeError, match=r"is 3: the unbiased HSIC estimator needs n >= 4"):
        cka(X[:3], X[:3], unbiased=True)
    with pytest.raises(LayerscopeError, match=r"unknown kernel 'poly'.*linear, rbf"):
        cka(X, X, kernel="poly")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(LayerscopeError, match=r"sigma .* must be a positive"):
            cka(X, X, kernel="rbf", sigma=bad)
    with pytest.raises(LayerscopeError, match=r"shape \(n, d\).*\(50,\)"):
        cka(X[:, 0], X)
    with pytest.raises(LayerscopeError, match=r"non-finite"):
        cka(np.full((5, 2), np.nan), X[:5])
    with pytest.raises(LayerscopeError, match=r"median squared pairwise distance"):
        rbf_cka(np.zeros((6, 2)), X[:6])
    with pytest.raises(LayerscopeError, match=r"unknown method 'svd'"):
        linear_cka(X, X, method="svd")
    with pytest.raises(LayerscopeError, match=r"acts\[1\] has n=40"):
        cka_matrix([X, Y])
    with pytest.raises(LayerscopeError, match=r"acts_other has n=40"):
        cka_matrix([X], [Y])


def test_minibatch_errors():
    rng = np.random.default_rng(0)
    m = MinibatchCKA(2)
    with pytest.raises(LayerscopeError, match=r"before any update"):
        m.compute()
    with pytest.raises(LayerscopeError, match=r"acts_x has 3 layers.*made for 2"):
        m.update([rng.normal(size=(8, 3))] * 3)
    with pytest.raises(LayerscopeError, match=r"batch size of acts_x is 3: .*n >= 4"):
        m.update([rng.normal(size=(3, 3))] * 2)
    with pytest.raises(LayerscopeError, match=r"acts_y was given"):
        m.update([rng.normal(size=(8, 3))] * 2, [rng.normal(size=(8, 3))])
    with pytest.raises(LayerscopeError, match=r"acts_y is missing"):
        MinibatchCKA(2, 1).update([rng.normal(size=(8, 3))] * 2)
    with pytest.raises(LayerscopeError, match=r"batch sizes 8 and 9"):
        MinibatchCKA(1, 1).update([rng.normal(size=(8, 3))], [rng.normal(size=(9, 3))])
    with pytest.raises(LayerscopeError, match=r"num_layers_x 0"):
        MinibatchCKA(0)


def test_rank_correlation_and_shift_errors():
    with pytest.raises(LayerscopeError, match=r"a has 4 values, b has 3"):
        rank_correlation([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(LayerscopeError, match=r"at least 3 pairs, got 2"):
        rank_correlation([1, 2], [2, 1])
    with pytest.raises(LayerscopeError, match=r"ci 1.5"):
        rank_correlation([1, 2, 3], [1, 2, 3], ci=1.5)
    with pytest.raises(LayerscopeError, match=r"n_boot -1"):
        rank_correlation([1, 2, 3], [1, 2, 3], n_boot=-1)
    with pytest.raises(LayerscopeError, match=r"non-finite.*\[1\]"):
        rank_correlation([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(LayerscopeError, match=r"window w 2 must be a positive odd"):
        representation_shift(np.eye(4), w=2)
    with pytest.raises(LayerscopeError, match=r"square.*\(3, 4\)"):
        representation_shift(np.ones((3, 4)))
