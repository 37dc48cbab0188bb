"""Pruning: Wanda scores, unstructured and N:M masks, the Prune intervention, sequential Wanda, sparsity
allocation, the sweep, export to a Hugging Face folder, and the command."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli, tiny
from layerscope.analyses.pruning import (allocate_sparsity, compute_masks, export_pruned, realised_sparsity,
                                         run_pruning, sensitivity_from_run)
from layerscope.capture.linear_stats import RoleStatistics
from layerscope.data.batching import make_batches
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import block_returns_tuple, intervene, weight_targets
from layerscope.interventions.pruning import (Prune, magnitude_scores, nm_mask, parse_pattern, unstructured_mask,
                                              wanda_scores)
from layerscope.models.architecture import architecture
from layerscope.models.loading import model_fingerprint
from layerscope.runner import ResultsStore


def _sequences(lengths=(12, 9, 12, 5, 7), seed=0, vocab=250):
    rng = random.Random(seed)
    return [ScoredSequence(tuple(rng.randrange(3, vocab) for _ in range(n)), (False,) + (True,) * (n - 1))
            for n in lengths]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16).clone()


def _direct_input_norms(model, seqs, keys, pad_id=0, max_tokens=24, interventions=()):
    """||X_j||_2 over real tokens from a plain forward hook that stores the inputs (no layerscope capture)."""
    arch = architecture(model)
    stored: dict[tuple[int, str], list[torch.Tensor]] = {k: [] for k in keys}
    current = {}
    handles = []
    for key in keys:
        def hook(_m, args, _out, key=key):
            x = args[0]
            stored[key].append(x[current["mask"]].double())  # padding removed
        handles.append(arch.role_module(key[1], key[0]).register_forward_hook(hook))
    try:
        with torch.no_grad(), intervene(model, *interventions):
            for batch in make_batches(seqs, max_tokens=max_tokens, pad_id=pad_id):
                current["mask"] = batch.attention_mask.bool()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, chunks in stored.items():
        X = torch.cat(chunks)  # (real tokens, in_features)
        assert X.shape[0] == sum(len(s) for s in seqs)
        out[key] = torch.tensor([float(np.sqrt(sum(float(v) ** 2 for v in X[:, j]))) for j in range(X.shape[1])],
                                dtype=torch.float64)
    return out


# --------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_wanda_scores_equal_abs_weight_times_directly_computed_input_norm(name):
    model, tok = tiny(name)
    arch = architecture(model)
    seqs = _sequences()
    keys = [(1, "q"), (1, "v"), (2, "down"), (3, "up")]
    direct = _direct_input_norms(model, seqs, keys, pad_id=tok.pad_token_id or 0)
    stats = RoleStatistics(model, keys)
    with torch.no_grad(), stats.recording():
        for batch in make_batches(seqs, max_tokens=24, pad_id=0):
            stats.set_mask(batch.attention_mask)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for key in keys:
        W = arch.read_weight(key[1], key[0])
        torch.testing.assert_close(stats.input_norm(*key), direct[key], rtol=1e-9, atol=1e-9)
        scores = wanda_scores(W, direct[key])
        assert scores.dtype == torch.float64
        for i in range(0, W.shape[0], 7):  # a direct loop over entries
            for j in range(W.shape[1]):
                assert float(scores[i, j]) == pytest.approx(abs(float(W[i, j])) * float(direct[key][j]), rel=1e-12)
    # the one-pass Wanda masks are the row-wise lowest of exactly these scores
    masks = compute_masks(model, "wanda", 0.5, calibration=seqs, pad_id=0, targets=keys, sequential=False)
    for key in keys:
        reference = unstructured_mask(wanda_scores(arch.read_weight(key[1], key[0]), direct[key]), 0.5, "row")
        assert torch.equal(masks[key], reference)


def test_scores_are_float_whatever_the_weight_dtype():
    W = torch.randn(4, 6).to(torch.bfloat16)
    assert magnitude_scores(W).dtype == torch.float32
    assert torch.equal(magnitude_scores(W), W.float().abs())
    assert wanda_scores(W, torch.ones(6)).dtype == torch.float64
    with pytest.raises(LayerscopeError, match="one per input column"):
        wanda_scores(W, torch.ones(5))


# ---------------------------------------------------------------------------------------- masks


def _brute_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values, ties to the lower index, by a plain sort."""
    return {i for _, i in sorted((v, i) for i, v in enumerate(values))[:k]}


@pytest.mark.parametrize("seed", range(12))
def test_unstructured_masks_prune_exactly_the_lowest(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 17, (1,), generator=gen))
    sparsity = float(torch.rand(1, generator=gen)) * 0.99
    scores = torch.randint(0, 5, (rows, cols), generator=gen).float()  # many ties
    row_mask = unstructured_mask(scores, sparsity, "row")
    k = int(sparsity * cols)
    assert row_mask.dtype == torch.bool and row_mask.shape == scores.shape
    for r in range(rows):
        assert int(row_mask[r].sum()) == k
        assert set(row_mask[r].nonzero().flatten().tolist()) == _brute_lowest(scores[r].tolist(), k)
    matrix_mask = unstructured_mask(scores, sparsity, "matrix")
    k = int(sparsity * rows * cols)
    assert int(matrix_mask.sum()) == k
    assert set(matrix_mask.flatten().nonzero().flatten().tolist()) == _brute_lowest(scores.flatten().tolist(), k)


@pytest.mark.parametrize("seed", range(12))
def test_nm_masks_have_exactly_n_zeros_in_every_group_of_m(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    m = int(torch.randint(2, 9, (1,), generator=gen))
    n = int(torch.randint(1, m, (1,), generator=gen))
    rows, groups = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
    scores = torch.randn(rows, groups * m, generator=gen)
    if seed % 2:
        scores = scores.round()  # ties
    mask = nm_mask(scores, n, m)
    weight = torch.randn(rows, groups * m, generator=gen).masked_fill(mask, 0)
    for r in range(rows):
        for g in range(groups):
            cols = range(g * m, (g + 1) * m)
            assert sum(float(weight[r, c]) == 0.0 for c in cols) == n
            pruned = {c - g * m for c in cols if mask[r, c]}
            assert pruned == _brute_lowest([float(scores[r, c]) for c in cols], n)


def test_mask_and_pattern_errors():
    scores = torch.rand(4, 8)
    with pytest.raises(LayerscopeError, match="sparsity 1.5 is out of range"):
        unstructured_mask(scores, 1.5)
    with pytest.raises(LayerscopeError, match="out of range"):
        unstructured_mask(scores, -0.1)
    with pytest.raises(LayerscopeError, match="unknown group"):
        unstructured_mask(scores, 0.5, "column")
    with pytest.raises(LayerscopeError, match="divisible by 3"):
        nm_mask(scores, 1, 3)
    for n, m in ((4, 4), (0, 4), (5, 4)):
        with pytest.raises(LayerscopeError, match="0 < n < m"):
            nm_mask(scores, n, m)
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 1 : 8 ") == (1, 8) and parse_pattern(None) is None
    for bad in ("2-4", "2:", "a:b", "2:4:8"):
        with pytest.raises(LayerscopeError, match="N:M"):
            parse_pattern(bad)
    with pytest.raises(LayerscopeError, match="0 < n < m"):
        parse_pattern("4:2")
    assert unstructured_mask(scores, 0.0).sum() == 0
    ties = torch.zeros(2, 5)  # all equal: the lowest indices go first
    assert unstructured_mask(ties, 0.4).tolist() == [[True, True, False, False, False]] * 2
    assert nm_mask(torch.zeros(1, 8), 1, 4).tolist() == [[True, False, False, False, True, False, False, False]]


# ----------------------------------------------------------------------------------- intervention


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi3", "tiny-falcon"])
def test_prune_zeroes_the_masked_weights_and_restores_bit_for_bit(name):
    model, _ = tiny(name)
    arch = architecture(model)
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    targets = weight_targets(model)
    rng = random.Random(name)
    for trial in range(4):
        chosen = rng.sample(targets, k=rng.randint(1, len(targets)))
        gen = torch.Generator().manual_seed(trial)
        masks = {(layer, role): torch.rand(arch.role_shape(role, layer), generator=gen) < rng.random()
                 for layer, role in chosen}
        originals = {key: arch.read_weight(key[1], key[0]) for key in masks}
        iv = Prune(masks)
        assert iv.first_block(model) == min(layer for layer, _ in chosen)
        with intervene(model, iv):
            for (layer, role), mask in masks.items():
                now = arch.read_weight(role, layer)
                assert (now[mask] == 0).all()
                assert torch.equal(now[~mask], originals[(layer, role)][~mask])
        after = model.state_dict()
        assert all(torch.equal(before[k], _bits(after[k])) for k in before)
    # restored also when the block raises
    with pytest.raises(RuntimeError):
        with intervene(model, Prune(masks)):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], _bits(v)) for k, v in model.state_dict().items())


def test_prune_refuses_bad_masks():
    model, _ = tiny("tiny-llama")
    shape = architecture(model).role_shape("q", 0)
    with pytest.raises(LayerscopeError, match="has shape"):
        with intervene(model, Prune({(0, "q"): torch.zeros(shape[0], shape[1] + 1, dtype=torch.bool)})):
            pass
    with pytest.raises(LayerscopeError, match="bool tensor"):
        with intervene(model, Prune({(0, "q"): torch.zeros(shape)})):
            pass
    with pytest.raises(LayerscopeError, match="out of range"):
        with intervene(model, Prune({(9, "q"): torch.zeros(shape, dtype=torch.bool)})):
            pass


# ------------------------------------------------------------------------------- sequential Wanda


def _naive_sequential_wanda(model, seqs, sparsity, pattern=None):
    """Wanda's order by brute force: for block i re-run the whole model with blocks < i pruned."""
    arch = architecture(model)
    masks = {}
    for i in range(arch.num_layers):
        keys = [k for k in weight_targets(model) if k[0] == i]
        norms = _direct_input_norms(model, seqs, keys, interventions=[Prune(dict(masks))])
        for layer, role in keys:
            scores = wanda_scores(arch.read_weight(role, layer), norms[(layer, role)])
            masks[(layer, role)] = (nm_mask(scores, *pattern) if pattern else
                                    unstructured_mask(scores, sparsity, "row"))
    return masks


@pytest.mark.parametrize("name,pattern", [("tiny-llama", None), ("tiny-phi3", None), ("tiny-gpt2", (2, 4))])
def test_sequential_wanda_equals_a_naive_full_model_reference(name, pattern):
    model, _ = tiny(name)
    arch = architecture(model)
    seqs = _sequences()
    before = model_fingerprint(model)
    n_batches = len(make_batches(seqs, max_tokens=24, pad_id=0))
    block_returns_tuple(model)  # its one-off probe forward is not calibration
    calls = [0] * arch.num_layers
    handles = [arch.block(i).register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(arch.num_layers)]
    try:
        masks = compute_masks(model, "wanda", 0.5, pattern=pattern, calibration=seqs, pad_id=0, max_tokens=24)
    finally:
        for h in handles:
            h.remove()
    assert model_fingerprint(model) == before
    # prefix reuse: every block runs at most twice per calibration batch (O(L), not O(L^2))
    assert max(calls) <= 2 * n_batches and sum(calls) <= 2 * n_batches * arch.num_layers
    reference = _naive_sequential_wanda(model, seqs, 0.5, pattern)
    assert sorted(masks) == sorted(reference)
    assert all(torch.equal(masks[k], reference[k]) for k in reference)
    # and the order matters: one pass through the dense model gives other masks after block 0
    one_pass = compute_masks(model, "wanda", 0.5, pattern=pattern, calibration=seqs, pad_id=0, max_tokens=24,
                             sequential=False)
    assert any(not torch.equal(one_pass[k], reference[k]) for k in reference if k[0] > 0)


def test_magnitude_masks_and_layer_sparsity():
    model, _ = tiny("tiny-llama")
    arch = architecture(model)
    targets = weight_targets(model)
    per_layer = {0: 0.1, 1: 0.3, 2: 0.5, 3: 0.7}
    masks = compute_masks(model, "magnitude", 0.5, layer_sparsity=per_layer)
    for layer, role in targets:
        W = arch.read_weight(role, layer)
        mask = masks[(layer, role)]
        assert int(mask.sum()) == int(per_layer[layer] * W.numel())  # whole-matrix group
        assert W.abs()[mask].max() <= W.abs()[~mask].min()
    assert compute_masks(model, "magnitude", 0.0) == {}
    with pytest.raises(LayerscopeError, match="cover every pruned layer"):
        compute_masks(model, "magnitude", 0.5, layer_sparsity={0: 0.5})
    with pytest.raises(LayerscopeError, match="unknown pruning method"):
        compute_masks(model, "sparsegpt", 0.5)
    with pytest.raises(LayerscopeError, match="calibration"):
        compute_masks(model, "wanda", 0.5)
    with pytest.raises(LayerscopeError, match="unstructured pruning only"):
        compute_masks(model, "magnitude", 0.5, pattern="2:4", layer_sparsity=per_layer)
    with pytest.raises(LayerscopeError, match="divisible by 3"):
        compute_masks(model, "magnitude", 0.5, pattern="1:3")


# ------------------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("seed", range(5))
def test_allocation_mean_is_target_and_order_inverse_to_sensitivity(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    sens = {layer: float(v) for layer, v in enumerate(rng.normal(size=n))}
    target, spread = float(rng.uniform(0.1, 0.8)), float(rng.uniform(0, 0.09))
    alloc = allocate_sparsity(sens, target, spread)
    assert sorted(alloc) == sorted(sens)
    assert np.mean(list(alloc.values())) == pytest.approx(target, abs=1e-12)
    most, least = max(sens, key=sens.get), min(sens, key=sens.get)
    assert alloc[most] == pytest.approx(target - spread) and alloc[least] == pytest.approx(target + spread)
    for a in sens:
        for b in sens:
            if sens[a] > sens[b]:
                assert alloc[a] < alloc[b] or spread == 0
    # linear in the rank
    order = sorted(sens, key=lambda k: -sens[k])
    steps = np.diff([alloc[k] for k in order])
    np.testing.assert_allclose(steps, 2 * spread / (n - 1), atol=1e-12)


def test_allocation_ties_and_errors():
    alloc = allocate_sparsity([3.0, 1.0, 1.0, 0.0], 0.5, 0.06)
    assert alloc[1] == alloc[2] and alloc[0] == pytest.approx(0.44) and alloc[3] == pytest.approx(0.56)
    assert np.mean(list(alloc.values())) == pytest.approx(0.5, abs=1e-12)
    assert allocate_sparsity({4: 1.0}, 0.3, 0.1) == {4: 0.3}
    with pytest.raises(LayerscopeError, match="target \\+ spread < 1"):
        allocate_sparsity([1, 2], 0.95, 0.08)
    with pytest.raises(LayerscopeError, match="0 <= target - spread"):
        allocate_sparsity([1, 2], 0.05, 0.08)
    with pytest.raises(LayerscopeError, match="finite"):
        allocate_sparsity([1, float("nan")], 0.5, 0.08)


def test_sensitivity_from_run_reads_block_skip_deltas(tmp_path):
    rows = []
    for layer, delta in enumerate([0.5, 2.0, 0.1]):
        rows += [{"layer": layer, "unit": "block", "mode": "skip", "metric": "delta", "value": delta},
                 {"layer": layer, "unit": "block", "mode": "skip", "metric": "delta", "value": delta + 1.0},  # a 2nd seed
                 {"layer": layer, "unit": "block", "mode": "skip", "metric": "loss", "value": 9.0},
                 {"layer": layer, "unit": "block", "mode": "mean", "metric": "delta", "value": -5.0},
                 {"layer": layer, "unit": "q", "mode": "skip", "metric": "delta", "value": -7.0}]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    assert sensitivity_from_run(tmp_path) == pytest.approx({0: 1.0, 1: 2.5, 2: 0.6})
    with pytest.raises(LayerscopeError, match="do not exist"):
        sensitivity_from_run(tmp_path / "nope")
    pd.DataFrame(rows[2:4]).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(LayerscopeError, match="no rows with unit 'block'"):
        sensitivity_from_run(tmp_path / "other.csv")


# ------------------------------------------------------------------------------ sweep and export


def test_run_pruning_scores_each_point_and_resumes(tmp_path):
    model, tok = tiny("tiny-llama")
    eval_seqs, calib = _sequences(seed=1), _sequences(seed=2)
    before = model_fingerprint(model)
    evaluator = Evaluator(model, eval_seqs, pad_id=0)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        result = run_pruning(model, eval_seqs, calib, methods=["magnitude", "wanda"], sparsities=[0.3, 0.6],
                             store=store, run_parts={"t": 1}, progress=False)
        assert model_fingerprint(model) == before
        rows = {(r["method"], r["sparsity"]): r for r in result.rows}
        assert sorted(rows) == [("dense", 0.0), ("magnitude", 0.3), ("magnitude", 0.6), ("wanda", 0.3), ("wanda", 0.6)]
        assert rows[("dense", 0.0)]["perplexity"] == pytest.approx(evaluator.score().perplexity, rel=1e-9)
        assert rows[("dense", 0.0)]["realised_sparsity"] == 0.0
        for method in ("magnitude", "wanda"):
            masks = compute_masks(model, method, 0.6, calibration=calib, pad_id=0)
            with intervene(model, Prune(masks)):
                expected = evaluator.score()
            assert rows[(method, 0.6)]["loss"] == pytest.approx(expected.mean_loss, rel=1e-9)
            assert 0.59 <= rows[(method, 0.6)]["realised_sparsity"] <= 0.61
            assert rows[(method, 0.6)]["loss"] != rows[(method, 0.3)]["loss"]
        frame = result.to_frame()
        assert list(frame.columns) == ["method", "sparsity", "pattern", "metric", "value"]
        assert set(frame["metric"]) == {"loss", "perplexity", "realised_sparsity", "mask_seconds"}
        assert len(frame) == 5 * 4
        plot = result.plot(tmp_path / "p.png")
        assert plot.stat().st_size > 0
        # a rerun on the same store computes nothing: the stored rows come back
        again = run_pruning(model, eval_seqs, calib, methods=["magnitude", "wanda"], sparsities=[0.3, 0.6],
                            store=store, run_parts={"t": 1}, progress=False)
        assert [r["mask_seconds"] for r in again.rows] == [r["mask_seconds"] for r in result.rows]
        nm = run_pruning(model, eval_seqs, calib, methods=["magnitude"], pattern="2:4", store=store,
                         run_parts={"t": 1}, progress=False)
        assert [(r["method"], r["sparsity"], r["pattern"]) for r in nm.rows] == [("dense", 0.0, "none"),
                                                                              ("magnitude", 0.5, "2:4")]
        assert nm.rows[1]["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)
        alloc = run_pruning(model, eval_seqs, calib, methods=["magnitude"], sparsities=[0.5],
                            layer_allocation={0: 3.0, 1: 2.0, 2: 1.0, 3: 0.0}, spread=0.2, store=store,
                            run_parts={"t": 1}, progress=False)
        masks = compute_masks(model, "magnitude", 0.5, layer_sparsity={0: 0.3, 1: 0.3 + 0.4 / 3, 2: 0.7 - 0.4 / 3, 3: 0.7})
        with intervene(model, Prune(masks)):
            assert alloc.rows[1]["loss"] == pytest.approx(evaluator.score().mean_loss, rel=1e-9)
            assert alloc.rows[1]["realised_sparsity"] == pytest.approx(realised_sparsity(model, weight_targets(model)))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_export_reloads_with_plain_transformers_and_gives_the_same_perplexity(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny(name)
    before = model_fingerprint(model)
    seqs = _sequences(seed=3)
    masks = compute_masks(model, "wanda", 0.5, calibration=_sequences(seed=4), pad_id=0)
    evaluator = Evaluator(model, seqs, pad_id=0)
    with intervene(model, Prune(masks)):
        expected = evaluator.score().perplexity
    out = export_pruned(model, tok, masks, tmp_path / "pruned")
    assert model_fingerprint(model) == before  # the in-memory model is unchanged
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id == tok.pad_token_id
    arch = architecture(loaded)
    for (layer, role), mask in masks.items():
        W = arch.read_weight(role, layer)
        assert (W[mask] == 0).all() and (W[~mask] != 0).all()
    got = Evaluator(loaded, seqs, pad_id=0).score().perplexity
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(evaluator.score().perplexity, rel=1e-6)  # it is not the dense model


# -------------------------------------------------------------------------------------- API, CLI


def _calibration_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"Calibration line {i} about rivers, music and {i * 7} small birds." for i in range(60)))
    return str(path)


def test_prune_api_writes_a_run_folder_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerscope.api.prune import prune

    result, folder = prune("tiny-llama", methods=("wanda",), sparsities=(0.5,), data="builtin", samples=4,
                           seq_len=32, calibration=_calibration_file(tmp_path), calibration_samples=4,
                           export=tmp_path / "hf", out=tmp_path / "run", progress=False)
    for name in ("run.json", "results.csv", "perplexity.png", "report.html"):
        assert (folder / name).is_file()
    frame = pd.read_csv(folder / "results.csv")
    assert list(frame.columns) == ["method", "sparsity", "pattern", "metric", "value"]
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["export"] == str(tmp_path / "hf")
    wanda_ppl = frame[(frame.method == "wanda") & (frame.metric == "perplexity")]["value"].item()
    assert wanda_ppl == pytest.approx(result.rows[1]["perplexity"])
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "layerscope_pruning.json").read_text())["method"] == "wanda"
    zeros = realised_sparsity(exported, weight_targets(exported))
    assert zeros == pytest.approx(result.rows[1]["realised_sparsity"])
    assert result.masks  # the export used the sweep's own masks
    # a rerun resumes every point from the store and computes the masks again for the export: same model
    again, _ = prune("tiny-llama", methods=("wanda",), sparsities=(0.5,), data="builtin", samples=4, seq_len=32,
                     calibration=_calibration_file(tmp_path), calibration_samples=4, export=tmp_path / "hf2",
                     out=tmp_path / "run", progress=False)
    assert not again.masks and again.rows == result.rows
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2"))) == model_fingerprint(exported)


@pytest.mark.parametrize("kwargs,match", [
    ({"methods": ("sparsegpt",)}, "unknown pruning method"),
    ({"sparsities": (1.5,)}, "sparsity 1.5 is out of range"),
    ({"pattern": "2-4"}, "N:M pattern"),
    ({"pattern": "2:4", "sparsities": (0.3,)}, "conflicts with pattern 2:4"),
    ({"methods": ("magnitude", "wanda"), "export": "x"}, "one method and one sparsity"),
    ({"calibration": "builtin"}, "same text"),
    ({"allocation": "/nonexistent/run"}, "do not exist"),
    ({"samples": 0}, "samples 0 is out of range"),
])
def test_prune_api_refuses_bad_input_before_loading(kwargs, match):
    from layerscope.api.prune import prune

    args = {"data": "builtin", "calibration": "builtin-other", "progress": False, **kwargs}
    with pytest.raises(LayerscopeError, match=match):
        prune("no-such-model", **args)  # refused before the (unknown) model would be loaded


def test_prune_command_parses_and_runs(tmp_path):
    import typer
    from typer.testing import CliRunner

    from layerscope.cli.prune import prune_cmd

    app = typer.Typer()
    app.command("prune")(prune_cmd)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--data", "builtin",
                              "--samples", "3", "--seq-len", "32", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2:4" in res.output and (out / "report.html").is_file()
    res = runner.invoke(app, ["prune", "tiny-llama", "--pattern", "2/4", "--data", "builtin"])
    assert res.exit_code != 0 and "N:M pattern '2/4'" in str(res.exception)


def test_prune_command_registered(tmp_path, capsys):
    code, out, err = run_cli(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--data", "builtin",
                              "--samples", "3", "--seq-len", "32", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    assert "magnitude" in out and (tmp_path / "run" / "results.csv").is_file()
    code, _, err = run_cli(["prune", "tiny-llama", "--sparsity", "1.5", "--data", "builtin"], capsys)
    assert code == 2 and "sparsity 1.5 is out of range" in err


def test_prune_api_allocates_sparsity_from_a_sensitivity_run(tmp_path):
    from layerscope.api.prune import prune

    run = tmp_path / "sens"
    run.mkdir()
    pd.DataFrame([{"layer": layer, "unit": "block", "mode": "skip", "metric": "delta", "value": v}
                  for layer, v in enumerate([0.1, 3.0, 0.2, 1.0])]).to_csv(run / "results.csv", index=False)
    with pytest.raises(LayerscopeError, match="needs unstructured pruning"):
        prune("tiny-llama", methods=("magnitude",), pattern="2:4", allocation=run, data="builtin")
    with pytest.raises(LayerscopeError, match="target \\+ spread < 1"):
        prune("tiny-llama", methods=("magnitude",), sparsities=(0.95,), allocation=run, data="builtin")
    result, folder = prune("tiny-llama", methods=("magnitude",), sparsities=(0.5,), allocation=run, spread=0.1,
                           data="builtin", samples=3, seq_len=32, out=tmp_path / "run", progress=False)
    from layerscope.data import lm_sequences, load_texts

    model, tok = tiny("tiny-llama")
    evaluator = Evaluator(model, lm_sequences(tok, load_texts("builtin"), seq_len=32, samples=3, seed=0), pad_id=0)
    # layer 1 most sensitive (0.4), then 3 (0.4667), 2 (0.5333), 0 least (0.6)
    allocated = compute_masks(model, "magnitude", 0.5, layer_sparsity={1: 0.4, 3: 0.4 + 0.2 / 3, 2: 0.6 - 0.2 / 3, 0: 0.6})
    with intervene(model, Prune(allocated)):
        assert result.rows[1]["loss"] == pytest.approx(evaluator.score().mean_loss, rel=1e-9)
    with intervene(model, Prune(compute_masks(model, "magnitude", 0.5))):
        assert result.rows[1]["loss"] != pytest.approx(evaluator.score().mean_loss, rel=1e-9)  # not uniform
    assert json.loads((folder / "run.json").read_text())["config"]["allocation"] == str(run)
    assert "sensitivity" in result.config["allocation"]
