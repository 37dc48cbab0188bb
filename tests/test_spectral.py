"""Streaming PC-subspace CCA and the spectral study, against direct float64 references."""

from __future__ import annotations

import numpy as np
import pytest

from layerscope.analyses.spectral import load_directions, run_spectral, save_directions, store_cka_matrix, store_spectra
from layerscope.errors import LayerscopeError
from layerscope.metrics import (PCScoreGram, StreamingCovariance, cka, cka_matrix, effective_rank, participation_ratio,
                                pc_subspace_cca, pwcca, representation_shift, svcca)


class ArrayStore:
    """The reading interface of an ActivationStore over in-memory arrays (one per layer)."""

    def __init__(self, layers: list[np.ndarray]):
        self._layers = [np.asarray(x, dtype=np.float32) for x in layers]
        self.labels = [str(i) for i in range(len(layers))]
        self.num_layers = len(layers)
        self.num_rows, self.hidden = self._layers[0].shape

    def layer(self, i: int) -> np.ndarray:
        return self._layers[i]

    def chunks(self, i: int, rows: int = 4096):
        for lo in range(0, self.num_rows, rows):
            yield self._layers[i][lo : lo + rows].copy()


def _layers(n=600, d=24, depth=6, seed=0) -> list[np.ndarray]:
    """A residual-stream-like sequence: each layer adds a random update to the previous one, with a
    decaying spectrum so the principal directions are well separated."""
    rng = np.random.default_rng(seed)
    scales = 2.0 ** -np.arange(d / 2, step=0.5)
    h = rng.standard_normal((n, d)) * scales + 3.0
    out = []
    for _ in range(depth):
        h = h @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)) + 0.2 * rng.standard_normal((n, d)) * scales
        out.append(h.astype(np.float32).astype(np.float64))
    return out


def _reference_pc_cca(X: np.ndarray, Y: np.ndarray, k: int) -> np.ndarray:
    """Canonical correlations of the top-k PC scores, by eigh of np.cov and a QR/SVD CCA (float64)."""
    def scores(A):
        Ac = A - A.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov(A, rowvar=False))
        return Ac @ evecs[:, np.argsort(evals)[::-1][:k]]
    qx, _ = np.linalg.qr(scores(X))
    qy, _ = np.linalg.qr(scores(Y))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def _gram(arrays, k_max, chunk):
    bases = []
    for A in arrays:
        p = StreamingCovariance(A.shape[1]).update(A).pca(k_max)
        bases.append((p.mean, p.components))
    gram = PCScoreGram(bases)
    for lo in range(0, arrays[0].shape[0], chunk):
        gram.update([A[lo : lo + chunk] for A in arrays])
    return gram


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("chunk", [37, 1000])
def test_streamed_pc_cca_matches_float64_reference(k, chunk):
    X, Y, Z = _layers(depth=3)
    gram = _gram([X, Y, Z], 10, chunk)
    for a, b, (A, B) in ((0, 1, (X, Y)), (0, 2, (X, Z)), (2, 1, (Z, Y))):
        got = gram.canonical_correlations(a, b, k)
        np.testing.assert_allclose(got, _reference_pc_cca(A, B, k), atol=1e-8)
        np.testing.assert_allclose(got, pc_subspace_cca(A, B, k).correlations, atol=1e-8)
    assert gram.count == X.shape[0]


def test_streamed_pc_cca_of_a_view_with_itself_is_one_and_views_may_differ_in_width():
    X, Y = _layers(depth=2)
    W = Y[:, :10] @ np.random.default_rng(1).standard_normal((10, 7))
    gram = _gram([X, W], 5, 128)
    np.testing.assert_allclose(gram.canonical_correlations(0, 0, 5), np.ones(5), atol=1e-10)
    np.testing.assert_allclose(gram.canonical_correlations(0, 1, 5), _reference_pc_cca(X, W, 5), atol=1e-8)


def test_pc_score_gram_refuses_bad_input():
    X, Y = _layers(n=50, d=6, depth=2)
    gram = _gram([X, Y], 3, 50)
    with pytest.raises(LayerscopeError, match="k=4 is out of range"):
        gram.canonical_correlations(0, 1, 4)
    with pytest.raises(LayerscopeError, match="view 2 is out of range"):
        gram.canonical_correlations(0, 2, 1)
    with pytest.raises(LayerscopeError, match="same rows"):
        gram.update([X[:5], Y[:4]])
    with pytest.raises(LayerscopeError, match=r"allowed is \(b, 6\)"):
        gram.update([X[:5], Y[:5, :3]])
    with pytest.raises(LayerscopeError, match="got 1 views"):
        gram.update([X])


def test_spectra_match_eigh_of_the_covariance():
    layers = _layers(depth=3)
    spectra = store_spectra(ArrayStore(layers), keep=5, chunk_rows=77)
    for sp, A in zip(spectra, layers):
        A32 = A.astype(np.float32).astype(np.float64)
        evals = np.sort(np.linalg.eigvalsh(np.cov(A32, rowvar=False)))[::-1]
        np.testing.assert_allclose(sp.eigenvalues, evals, rtol=1e-8, atol=1e-10)
        summary = sp.summary()
        assert summary["effective_rank"] == pytest.approx(effective_rank(evals), rel=1e-8)
        assert summary["participation_ratio"] == pytest.approx(participation_ratio(evals), rel=1e-8)
        assert summary["var_top1"] == pytest.approx(evals[0] / evals.sum(), rel=1e-8)
        assert sp.components.shape == (5, A.shape[1])
        np.testing.assert_allclose(sp.components @ sp.components.T, np.eye(5), atol=1e-10)


def test_run_spectral_neighbour_curves_and_delta_match_direct_computation():
    layers = _layers(depth=6)
    result = run_spectral(ArrayStore(layers), ks=(1, 3), keep=8, chunk_rows=100, window=5)
    for layer in range(6):
        for k in (1, 3):
            expected = np.mean([pc_subspace_cca(layers[layer], layers[m], k).mean
                                for m in (layer - 2, layer - 1, layer + 1, layer + 2) if 0 <= m < 6])
            assert result.curves.loc[layer, f"cca_k{k}"] == pytest.approx(expected, abs=1e-8)
    np.testing.assert_allclose(result.curves["delta"], representation_shift(cka_matrix(layers), w=5), atol=1e-6)
    tidy = result.to_frame()
    assert set(tidy["metric"]) == {"delta", "pc_cca"}
    assert len(tidy) == 6 * 3
    assert set(result.correlations()) == {"cca_k1", "cca_k3"}


def test_run_spectral_versus_matches_direct_metrics():
    base = _layers(depth=4, seed=0)
    tuned = [A + 0.5 * np.random.default_rng(7 + i).standard_normal(A.shape) for i, A in enumerate(base)]
    result = run_spectral(ArrayStore(base), ArrayStore(tuned), ks=(1, 3), keep=6, chunk_rows=128)
    for layer in range(4):
        x, y = base[layer], tuned[layer].astype(np.float32).astype(np.float64)
        row = result.versus.loc[layer]
        assert row["cca_k3"] == pytest.approx(pc_subspace_cca(x, y, 3).mean, abs=1e-8)
        assert row["svcca"] == pytest.approx(svcca(x, y, keep=0.99, rtol=1e-6), abs=1e-8)
        assert row["pwcca"] == pytest.approx(pwcca(x, y, rtol=1e-6), abs=1e-8)
        assert row["cka"] == pytest.approx(cka(x, y), abs=1e-8)
        assert not row["few_samples"]  # 600 rows for 24 dimensions
    assert {"svcca", "pwcca", "cka"} <= set(result.to_frame()["metric"])


def test_run_spectral_refuses_models_of_different_depth_and_bad_k():
    base = _layers(depth=4)
    with pytest.raises(LayerscopeError, match="same depth"):
        run_spectral(ArrayStore(base), ArrayStore(base[:3]), ks=(1,), keep=4)
    with pytest.raises(LayerscopeError, match="must be integers in 1..4"):
        run_spectral(ArrayStore(base), ks=(1, 5), keep=4)
    with pytest.raises(LayerscopeError, match="different numbers of rows"):
        run_spectral(ArrayStore(base), ArrayStore([A[:100] for A in base]), ks=(1,), keep=4)


def test_store_cka_matrix_streams_the_unbiased_estimator_above_the_sample_limit():
    layers = _layers(n=3000, depth=3)
    exact = store_cka_matrix(ArrayStore(layers), sample_rows=5000)
    np.testing.assert_allclose(exact, cka_matrix(layers), atol=1e-6)
    streamed = store_cka_matrix(ArrayStore(layers), sample_rows=1000, chunk=256)
    unbiased = np.array([[cka(a, b, unbiased=True) for b in layers] for a in layers])
    np.testing.assert_allclose(streamed, unbiased, atol=0.03)


def test_directions_round_trip_through_safetensors(tmp_path):
    spectra = store_spectra(ArrayStore(_layers(depth=2)), keep=4)
    path = save_directions(spectra, tmp_path / "pca.safetensors")
    mean, comps = load_directions(path, "1")
    np.testing.assert_allclose(mean, spectra[1].mean, rtol=1e-6)
    np.testing.assert_allclose(comps, spectra[1].components, atol=1e-6)
    with pytest.raises(LayerscopeError, match="it holds layers 0, 1"):
        load_directions(path, "7")
    with pytest.raises(LayerscopeError, match="does not exist"):
        load_directions(tmp_path / "none.safetensors", "0")


def test_svcca_and_pwcca_are_left_empty_when_rows_are_too_few_for_the_width():
    base = _layers(n=30, depth=2)  # 30 rows for 24 dimensions: CCA would report correlations near 1
    tuned = [A + np.random.default_rng(3).standard_normal(A.shape) for A in base]
    result = run_spectral(ArrayStore(base), ArrayStore(tuned), ks=(1,), keep=4)
    assert result.versus["few_samples"].all()
    assert result.versus["svcca"].isna().all() and result.versus["pwcca"].isna().all()
    assert result.versus["cka"].notna().all() and result.versus["cca_k1"].notna().all()
