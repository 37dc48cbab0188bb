"""Exact change points against brute force over every segmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layerscope.errors import LayerscopeError
from layerscope.metrics.change_points import change_points, segmentation_cost


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dynamic_programme_finds_the_brute_force_optimum(seed, k):
    y = np.random.default_rng(seed).normal(size=11)
    best = min(itertools.combinations(range(1, 11), k), key=lambda pts: segmentation_cost(y, list(pts)))
    found = change_points(y, n_points=k)
    assert len(found) == k
    assert segmentation_cost(y, found) == pytest.approx(segmentation_cost(y, list(best)), abs=1e-12)


def test_clear_steps_are_found_with_the_penalty():
    rng = np.random.default_rng(0)
    y = np.concatenate([np.full(8, 0.95), np.full(7, 0.7), np.full(9, 0.9)]) + rng.normal(0, 0.005, 24)
    assert change_points(y) == [8, 15]
    assert change_points(y + 0.0 * y, n_points=1) in ([8], [15])


def test_pure_noise_rarely_gives_a_change_point():
    hits = sum(bool(change_points(0.9 + np.random.default_rng(s).normal(0, 0.01, 30))) for s in range(200))
    assert hits / 200 < 0.1


def test_min_size_is_respected():
    y = np.array([0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    pts = change_points(y, n_points=2, min_size=2)
    bounds = [0, *pts, len(y)]
    assert min(b - a for a, b in zip(bounds[:-1], bounds[1:])) >= 2


def test_bad_input():
    with pytest.raises(LayerscopeError, match="n_points 9 is out of range"):
        change_points(np.arange(5.0), n_points=9)
    with pytest.raises(LayerscopeError, match="at least 2 values"):
        change_points([1.0])


def test_blocks_of_a_similarity_matrix_are_found_from_its_rows():
    blocks = [0] * 6 + [1] * 5 + [2] * 7
    matrix = np.array([[0.95 if a == b else 0.4 for b in blocks] for a in blocks])
    matrix += np.random.default_rng(3).normal(0, 0.01, matrix.shape)
    assert change_points(matrix) == [6, 11]
    y2 = np.random.default_rng(4).normal(size=(9, 3))
    best = min(itertools.combinations(range(1, 9), 2), key=lambda p: segmentation_cost(y2, list(p)))
    assert segmentation_cost(y2, change_points(y2, n_points=2)) == pytest.approx(segmentation_cost(y2, list(best)))


@pytest.mark.parametrize("seed", range(4))
def test_missing_entries_are_left_out_exactly(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(9, 4))
    y[rng.random(y.shape) < 0.2] = np.nan
    y[:, 0] = rng.normal(size=9)  # no row entirely missing
    best = min(itertools.combinations(range(1, 9), 2), key=lambda p: segmentation_cost(y, list(p)))
    found = change_points(y, n_points=2)
    assert segmentation_cost(y, found) == pytest.approx(segmentation_cost(y, list(best)), abs=1e-12)
    # the cost of one segment with missing entries, written out by hand
    manual = sum(((col[~np.isnan(col)] - col[~np.isnan(col)].mean()) ** 2).sum() for col in y.T)
    assert segmentation_cost(y, []) == pytest.approx(manual)


def test_a_noise_free_block_matrix_with_its_unit_diagonal_left_out():
    """The diagonal (self-similarity 1) is not evidence of a block; left out, exact blocks are found
    even without noise, where the robust noise estimate is zero."""
    from layerscope.analyses.representation import CKAResult
    from layerscope.metrics import representation_shift

    blocks = np.repeat([0, 1, 2], [3, 5, 4])
    matrix = np.where(blocks[:, None] == blocks[None, :], 0.8, 0.3)
    np.fill_diagonal(matrix, 1.0)
    labels = [str(i) for i in range(12)]
    result = CKAResult(matrix, labels, labels, shift=representation_shift(matrix, w=3))
    assert result.change_points() == [3, 8]
    with pytest.raises(LayerscopeError, match="never a whole row"):
        change_points(np.array([[1.0, np.nan], [np.nan, np.nan], [0.0, 1.0]]))
