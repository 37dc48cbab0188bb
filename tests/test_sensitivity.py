"""Sensitivity: mean ablation, the block proxies, role statistics, the sweep and its command."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, tiny
from scipy import stats

from layerscope.analyses.sensitivity import collect_statistics, proxy_analysis, run_sensitivity
from layerscope.analyses.tidy import tidy_frame, wide_frame
from layerscope.capture import RoleStatistics
from layerscope.data import lm_sequences
from layerscope.data.builtin import builtin_corpus
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import MeanAblateBlock, MeanAblateRole, intervene, weight_targets
from layerscope.metrics.intervals import mean_interval
from layerscope.models.architecture import architecture
from layerscope.runner import ResultsStore


def _sequences(tokenizer, samples=5, seq_len=24, seed=0):
    return lm_sequences(tokenizer, builtin_corpus(), seq_len=seq_len, samples=samples, seed=seed)


def _ragged(tokenizer):
    """Sequences of different lengths, so batches carry padding that must not count."""
    seqs = _sequences(tokenizer, samples=4, seq_len=20)
    return seqs + _sequences(tokenizer, samples=3, seq_len=9, seed=1)


def _states(model, tokenizer, seqs):
    """Brute force: every block's input and output for every sequence, one at a time, unpadded."""
    arch = architecture(model)
    records = []
    for seq in seqs:
        ins, outs = {}, {}
        handles = []
        for layer in range(arch.num_layers):
            block = arch.block(layer)
            handles.append(block.register_forward_pre_hook(
                lambda _m, a, k, layer=layer: ins.__setitem__(layer, (a[0] if a else k["hidden_states"])[0].double()), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda _m, _a, o, layer=layer: outs.__setitem__(layer, (o[0] if isinstance(o, tuple) else o)[0].double())))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([seq.input_ids]))
        finally:
            for h in handles:
                h.remove()
        records.append((ins, outs))
    return records


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi3"])
def test_block_statistics_match_a_per_token_loop(name):
    model, tokenizer = tiny(name)
    seqs = _ragged(tokenizer)
    evaluator = Evaluator(model, seqs, batch_size=3)
    blocks, _ = collect_statistics(model, evaluator, [])
    records = _states(model, tokenizer, seqs)
    L = architecture(model).num_layers
    for layer in range(L):
        cosines, updates = [], []
        for ins, outs in records:
            for t in range(ins[layer].shape[0]):
                x, y = ins[layer][t], outs[layer][t]
                cosines.append(float(x @ y / (x.norm() * y.norm())))
                updates.append(y - x)
        assert blocks.block_influence()[layer] == pytest.approx(1 - np.mean(cosines), abs=1e-6)
        torch.testing.assert_close(blocks.mean_update(layer), torch.stack(updates).mean(0), atol=1e-5, rtol=1e-5)
    for span in (1, 2, L):
        expected = []
        for start in range(L - span + 1):
            angles = []
            for ins, outs in records:
                a = ins[start][-1]
                b = ins[start + span][-1] if start + span < L else outs[L - 1][-1]
                angles.append(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))) / math.pi)
            expected.append(np.mean(angles))
        np.testing.assert_allclose(blocks.angular_distance(span), expected, atol=1e-6)
    with pytest.raises(LayerscopeError, match="span 0 is out of range"):
        blocks.angular_distance(0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-falcon"])
def test_role_statistics_match_stacked_inputs_and_outputs(name):
    model, tokenizer = tiny(name)
    seqs = _ragged(tokenizer)
    arch = architecture(model)
    targets = weight_targets(model, [0, arch.num_layers - 1])
    stats_ = RoleStatistics(model, targets, inputs=True, outputs=True)
    with stats_.recording():
        for batch in Evaluator(model, seqs, batch_size=3).batches:
            stats_.set_mask(batch.attention_mask)
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    # reference: each role's input from a hook, one unpadded sequence at a time, and its output as W x + b
    for layer, role in targets:
        module = arch.role_module(role, layer)
        seen = []
        handle = module.register_forward_hook(lambda _m, a, _o: seen.append(a[0][0].double()))
        try:
            with torch.no_grad():
                for seq in seqs:
                    model(input_ids=torch.tensor([seq.input_ids]))
        finally:
            handle.remove()
        X = torch.cat(seen)
        W = arch.read_weight(role, layer).double()
        b = arch.read_bias(role, layer)
        Y = X @ W.T + (0 if b is None else b.double())
        assert stats_.tokens(layer, role) == X.shape[0] == sum(len(s) for s in seqs)
        torch.testing.assert_close(stats_.input_norm(layer, role), X.norm(dim=0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats_.output_mean(layer, role), Y.mean(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi3"])
def test_mean_ablation_writes_the_mean_and_leaves_no_trace(name):
    model, tokenizer = tiny(name)
    arch = architecture(model)
    seqs = _sequences(tokenizer, samples=3)
    ids = torch.tensor([s.input_ids for s in seqs])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    layer = 1
    for role in ("q", "v", "up"):
        mean = torch.randn(arch.role_shape(role, layer)[0])
        seen = []
        with intervene(model, MeanAblateRole(role, {layer: mean})), torch.no_grad():
            # registered after the ablation's hook, so it sees what the module hands on
            handle = arch.role_module(role, layer).register_forward_hook(lambda _m, _a, o: seen.append(o.clone()))
            try:
                model(input_ids=ids)
            finally:
                handle.remove()
        out = seen[0]
        rows = arch.role_rows(role, layer)
        part = out if rows is None else out[..., rows]
        torch.testing.assert_close(part, mean.expand_as(part))  # every token of the role's rows is the mean
        if rows is not None:  # the other parts of a fused matrix keep their real output
            others = torch.ones(out.shape[-1], dtype=torch.bool)
            others[rows] = False
            assert out[..., others].std() > 0
    update = torch.randn(arch.hidden_size)
    ins, outs = [], []
    with intervene(model, MeanAblateBlock({layer: update})), torch.no_grad():
        h1 = arch.block(layer).register_forward_pre_hook(lambda _m, a, k: ins.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        h2 = arch.block(layer).register_forward_hook(lambda _m, _a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
        try:
            model(input_ids=ids)
        finally:
            h1.remove()
            h2.remove()
    torch.testing.assert_close(outs[0], ins[0] + update)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    with pytest.raises(LayerscopeError, match="must have shape"):
        with intervene(model, MeanAblateRole("q", {0: torch.zeros(3)})):
            pass
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before


def test_sweep_with_prefix_reuse_equals_the_full_passes_and_resumes(tmp_path):
    model, tokenizer = tiny("tiny-llama")
    seqs = _ragged(tokenizer)
    kwargs = dict(units=("block", "v", "down"), spans=(1, 2), run_parts={"t": 1}, progress=False)
    with ResultsStore(tmp_path / "a.sqlite") as store:
        reused = run_sensitivity(model, seqs, store=store, **kwargs)
    with ResultsStore(tmp_path / "b.sqlite") as store:
        full = run_sensitivity(model, seqs, store=store, reuse_prefix=False, **kwargs)
    assert reused.config["block_forwards"] < full.config["block_forwards"]
    a, b = reused.to_frame(), full.to_frame()
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["value"].to_numpy(float), b["value"].to_numpy(float), rtol=1e-5, atol=1e-6)
    L = architecture(model).num_layers
    # points: block skip spans 1 and 2, block mean, v zero/mean, down zero/mean
    assert len(reused.rows) == L + (L - 1) + L + 4 * L
    # the role's mean ablation uses W E[x] + b over real tokens: recompute it and score directly
    evaluator = Evaluator(model, seqs)
    _, roles = collect_statistics(model, evaluator, [(2, "v")])
    direct = evaluator.score([MeanAblateRole("v", {2: roles.output_mean(2, "v")})]).mean_loss
    row = next(r for r in reused.rows if (r["layer"], r["unit"], r["mode"]) == (2, "v", "mean"))
    assert row["loss"] == pytest.approx(direct, rel=1e-6)
    with ResultsStore(tmp_path / "a.sqlite") as store:  # a rerun computes nothing: every point is stored
        again = run_sensitivity(model, seqs, store=store, **kwargs)
    assert again.config["block_forwards"] == L * len(evaluator.batches)  # the statistics pass only
    assert again.rows == reused.rows


def test_proxy_correlations_equal_scipy_on_the_table(tmp_path):
    model, tokenizer = tiny("tiny-gpt2")
    seqs = _sequences(tokenizer, samples=4)
    with ResultsStore(tmp_path / "s.sqlite") as store:
        result = run_sensitivity(model, seqs, units=("block",), modes=("skip",), spans=(1,), store=store,
                                 run_parts={"t": 2}, progress=False)
    table = result.table()
    corr = {(c["proxy"], c["span"]): c for c in result.correlations}
    for proxy in ("block_influence", "angular_distance"):
        rho, p = stats.spearmanr(table[proxy], table["block_skip"])
        assert corr[(proxy, 1)]["spearman"] == pytest.approx(rho)
        assert corr[(proxy, 1)]["spearman_p"] == pytest.approx(p)
        assert corr[(proxy, 1)]["kendall"] == pytest.approx(stats.kendalltau(table[proxy], table["block_skip"])[0])


def test_proxy_choice_reports_the_rank_of_the_window_the_proxy_would_remove():
    rows = [{"layer": i, "unit": "block", "mode": "skip", "span": 2, "delta": d, "angular_distance": a}
            for i, (d, a) in enumerate([(0.5, 0.3), (0.1, 0.2), (0.3, 0.1), (0.9, 0.4)])]
    correlations, choices = proxy_analysis(rows)
    (choice,) = choices
    assert (choice["proxy_start"], choice["proxy_rank"], choice["best_start"]) == (2, 2, 1)
    assert correlations[0]["spearman"] == pytest.approx(stats.spearmanr([0.3, 0.2, 0.1, 0.4], [0.5, 0.1, 0.3, 0.9])[0])


def test_bad_units_modes_and_spans_are_refused(tmp_path):
    model, tokenizer = tiny("tiny-gpt2")
    seqs = _sequences(tokenizer, samples=2)
    with ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(LayerscopeError, match="unit 'gate' does not exist in a gpt2 model"):
            run_sensitivity(model, seqs, units=("gate",), store=store, run_parts={}, progress=False)
        with pytest.raises(LayerscopeError, match="mode 'prune' is unknown"):
            run_sensitivity(model, seqs, modes=("prune",), store=store, run_parts={}, progress=False)
        with pytest.raises(LayerscopeError, match="span 9 is out of range"):
            run_sensitivity(model, seqs, spans=(9,), store=store, run_parts={}, progress=False)
        with pytest.raises(LayerscopeError, match="no ablation applies"):
            run_sensitivity(model, seqs, units=("q",), modes=("skip",), store=store, run_parts={}, progress=False)


def test_mean_interval_is_the_student_t_interval():
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, 0.5, size=7)
    got = mean_interval(values, 0.95)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert (got["mean"], got["lo"], got["hi"], got["n"]) == (pytest.approx(values.mean()), pytest.approx(lo), pytest.approx(hi), 7)
    assert math.isnan(mean_interval([1.0])["lo"])
    diverged = mean_interval([1.0, float("inf")])
    assert diverged["mean"] == float("inf") and math.isnan(diverged["hi"])
    with pytest.raises(LayerscopeError, match="confidence 1.5"):
        mean_interval(values, 1.5)


def test_tidy_frame_round_trips():
    rows = [{"layer": 0, "mode": "a", "loss": 1.0, "delta": 0.1}, {"layer": 1, "mode": "a", "loss": 2.0}]
    tidy = tidy_frame(rows, ["layer", "mode"], ["loss", "delta"])
    assert list(tidy.columns) == ["layer", "mode", "metric", "value"] and len(tidy) == 3
    wide = wide_frame(tidy, ["layer", "mode"])
    assert wide.loc[wide["layer"] == 1, "loss"].item() == 2.0 and math.isnan(wide.loc[wide["layer"] == 1, "delta"].item())
    with pytest.raises(LayerscopeError, match="lacks the parameter columns"):
        tidy_frame([{"loss": 1.0}], ["layer"], ["loss"])


def test_sensitivity_command_writes_a_tidy_table_and_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["sensitivity", "tiny-llama", "--data", "builtin", "--samples", "3", "--seq-len", "16",
                                    "--units", "block,o", "--out", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == ["layer", "unit", "mode", "span", "metric", "value"]
    assert not frame.duplicated(["layer", "unit", "mode", "span", "metric"]).any()
    assert {"block_skip", "block_mean", "o_zero", "o_mean", "block_influence"} <= set(pd.read_csv(out / "ablation_table.csv").columns)
    for name in ("report.html", "sensitivity.png", "proxies.png", "proxy_correlations.csv", "run.json"):
        assert (out / name).is_file()
    assert "Spearman(block_influence, block skip" in stdout
    # the pruning allocation reads exactly the single-block skip losses of this table
    from layerscope.analyses.pruning import sensitivity_from_run

    table = pd.read_csv(out / "ablation_table.csv")
    assert sensitivity_from_run(out) == pytest.approx(dict(zip(table["layer"], table["block_skip"])))
    code, _, stderr = run_cli(["sensitivity", "tiny-llama", "--data", "builtin", "--units", "gate,zz", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "unit 'zz'" in stderr


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-falcon", "tiny-gpt-neox"])
def test_mean_ablations_restore_the_model_exactly_over_random_choices(name):
    model, tokenizer = tiny(name)
    arch = architecture(model)
    roles = [r for r in arch.roles() if r in ("q", "k", "v", "o", "gate", "up", "down")]
    ids = torch.tensor([s.input_ids for s in _sequences(tokenizer, samples=2, seq_len=12)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    rng = np.random.default_rng(7)
    for trial in range(6):
        layers = sorted(rng.choice(arch.num_layers, size=int(rng.integers(1, arch.num_layers + 1)), replace=False).tolist())
        role = roles[int(rng.integers(len(roles)))]
        ablations = [MeanAblateRole(role, {layer: torch.randn(arch.role_shape(role, layer)[0]) for layer in layers}),
                     MeanAblateBlock({layer: torch.randn(arch.hidden_size) for layer in layers})]
        with pytest.raises(RuntimeError, match="inside"):  # restored also when the block raises
            with intervene(model, *ablations[: 1 + trial % 2]), torch.no_grad():
                changed = model(input_ids=ids).logits
                assert not torch.equal(changed, before)
                raise RuntimeError("inside")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
