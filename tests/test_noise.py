"""Weight noise: exact restoration, the requested standard deviation, determinism, targets, the sweep
with prefix reuse, the per-level interval, errors, and the command end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import run_cli, tiny
from layerscope.analyses.noise import NoiseResult, run_noise
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.interventions import intervene, matrix_roles, weight_targets
from layerscope.interventions import noise as noise_module
from layerscope.interventions.noise import WeightNoise
from layerscope.models.architecture import architecture
from layerscope.runner import ResultsStore

SQRT3 = math.sqrt(3.0)
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def _snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Every parameter and buffer (shared ones under each name): a copy, its bits, its storage pointer."""
    out = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        t = t.detach()
        bits = t.clone().view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t.clone()
        out[name] = (t.clone(), bits, t.data_ptr())
    return out


def _assert_same(model, snap) -> None:
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    for name, (value, bits, ptr) in snap.items():
        value_now, bits_now, ptr_now = now[name]
        assert torch.equal(value_now, value), name
        assert torch.equal(bits_now, bits), f"{name}: bit pattern differs"
        assert ptr_now == ptr, f"{name} was replaced by another tensor"


def _changed(model, snap) -> set[str]:
    return {name for name, t in model.named_parameters(remove_duplicate=False) if not torch.equal(t.detach(), snap[name][0])}


# ---------------------------------------------------------------------------------------------
# exact restoration


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi3", "tiny-falcon", "tiny-llama", "tiny-gemma2"])
def test_restores_bit_for_bit_over_random_choices(name):
    model, _ = tiny(name)
    arch = architecture(model)
    roles = list(matrix_roles(model))
    rng = random.Random(name)
    snap = _snapshot(model)
    for trial in range(6):
        all_parameters = trial == 5
        layers = None if all_parameters or rng.random() < 0.3 else rng.sample(range(arch.num_layers), rng.randint(1, 3))
        chosen = None if all_parameters or rng.random() < 0.3 else rng.sample(roles, rng.randint(1, len(roles)))
        iv = WeightNoise(rng.choice([1e-3, 0.1, 1.0, 7.0, 1e3]), distribution=rng.choice(["gaussian", "uniform"]),
                         scale=rng.choice(["relative", "absolute"]), seed=rng.randint(0, 10**6), layers=layers,
                         roles=chosen, all_parameters=all_parameters)
        with intervene(model, iv):
            assert _changed(model, snap), iv.describe()  # it did something
        _assert_same(model, snap)


def test_restores_bfloat16_weights_bit_for_bit():
    model = copy.deepcopy(tiny("tiny-llama")[0]).to(torch.bfloat16)
    snap = _snapshot(model)
    for iv in (WeightNoise(0.3, seed=1), WeightNoise(0.01, scale="absolute", distribution="uniform", all_parameters=True)):
        with intervene(model, iv):
            assert _changed(model, snap)
        _assert_same(model, snap)


def test_restores_when_the_block_raises_and_when_apply_fails_half_way(monkeypatch):
    model, _ = tiny("tiny-phi3")
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(model, WeightNoise(0.5, seed=3)):
            assert _changed(model, snap)
            raise RuntimeError("inside the block")
    _assert_same(model, snap)

    real, calls = noise_module.draw_unit_noise, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("draw failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(noise_module, "draw_unit_noise", failing)
    for iv in (WeightNoise(0.5, seed=4), WeightNoise(0.5, seed=4, all_parameters=True)):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="draw failed"):
            with intervene(model, iv):
                pass  # pragma: no cover - apply raises first
        _assert_same(model, snap)


# ---------------------------------------------------------------------------------------------
# the added noise


def _deltas(model, iv) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, role) -> (noised - original in float64, original)."""
    arch = architecture(model)
    targets = iv.targets(model)
    before = {t: arch.read_weight(t[1], t[0]).double() for t in targets}
    with intervene(model, iv):
        after = {t: arch.read_weight(t[1], t[0]).double() for t in targets}
    return {t: (after[t] - before[t], before[t]) for t in targets}


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("scale", ["relative", "absolute"])
def test_added_noise_has_the_requested_standard_deviation(distribution, scale):
    model, _ = tiny("tiny-llama")
    level = 0.2 if scale == "relative" else 0.01
    deltas = _deltas(model, WeightNoise(level, distribution=distribution, scale=scale, seed=11))
    standardised = []
    for (layer, role), (delta, original) in deltas.items():
        sigma = level * float(original.std(correction=0)) if scale == "relative" else level
        z = (delta / sigma).flatten()
        assert abs(float(z.std()) - 1) < 0.06, (layer, role)  # >= 4096 entries per matrix
        if distribution == "uniform":
            assert float(z.abs().max()) <= SQRT3 * (1 + 1e-4)
            assert float(z.abs().max()) > 0.99 * SQRT3  # the whole range is used, not +-sigma
        standardised.append(z)
    z = torch.cat(standardised)
    assert z.numel() > 100_000
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    beyond = float((z.abs() > SQRT3).double().mean())  # Gaussian: 2 * (1 - Phi(sqrt 3)) = 0.0833
    expected = 2 * stats.norm.sf(SQRT3) if distribution == "gaussian" else 0.0
    assert beyond == pytest.approx(expected, abs=0.005)


def test_noise_is_the_documented_draw():
    """An independent spelling of the module's recipe: SHA-256 of 'layerscope-noise/seed/layer/role',
    its first 8 bytes little-endian (63 bits) seed a CPU generator; W + sigma * randn, in float32."""
    model, _ = tiny("tiny-gpt2")  # Conv1D, fused c_attn: the k rows, transposed
    arch = architecture(model)
    weight = arch.read_weight("k", 2)
    digest = hashlib.sha256(b"layerscope-noise/5/2/k").digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    sigma = 0.3 * float(weight.double().std(correction=0))
    expected = weight + torch.randn(weight.shape, generator=generator, dtype=torch.float32) * sigma
    with intervene(model, WeightNoise(0.3, seed=5, layers=[2], roles=["k"])):
        assert torch.equal(arch.read_weight("k", 2), expected)
    digest = hashlib.sha256(b"layerscope-noise/5/1/down").digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    weight = arch.read_weight("down", 1)
    expected = weight + (torch.rand(weight.shape, generator=generator) * 2 - 1) * SQRT3 * 0.02
    with intervene(model, WeightNoise(0.02, seed=5, layers=[1], roles=["down"], scale="absolute", distribution="uniform")):
        assert torch.equal(arch.read_weight("down", 1), expected)


def test_same_seed_same_noise_other_seed_other_noise_and_order_independent():
    model, _ = tiny("tiny-falcon")
    arch = architecture(model)

    def noised(**kw):
        with intervene(model, WeightNoise(0.1, **kw)):
            return {(layer, role): arch.read_weight(role, layer) for layer, role in weight_targets(model)}

    a, b, c = noised(seed=1), noised(seed=1), noised(seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    wide, narrow = noised(seed=1, layers=[1, 2]), noised(seed=1, layers=[2])
    for role in matrix_roles(model):
        assert torch.equal(wide[(2, role)], narrow[(2, role)])
        assert torch.equal(wide[(2, role)], a[(2, role)])
    some = noised(seed=1, roles=["k", "up"])
    assert torch.equal(some[(3, "k")], a[(3, "k")]) and torch.equal(some[(0, "up")], a[(0, "up")])


def test_levels_scale_one_draw():
    """The level only scales the draw: noise at 0.2 is exactly twice the noise at 0.1 (absolute scale)."""
    model, _ = tiny("tiny-llama")
    d1 = _deltas(model, WeightNoise(0.1, scale="absolute", seed=3, layers=[0], roles=["o"]))[(0, "o")][0]
    d2 = _deltas(model, WeightNoise(0.2, scale="absolute", seed=3, layers=[0], roles=["o"]))[(0, "o")][0]
    torch.testing.assert_close(d2, 2 * d1, atol=1e-7, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draw_does_not_depend_on_the_device():
    model = copy.deepcopy(tiny("tiny-llama")[0])
    arch = architecture(model)
    iv = WeightNoise(0.05, scale="absolute", seed=9, layers=[1], roles=["q"])
    with intervene(model, iv):
        on_cpu = arch.read_weight("q", 1)
    model.to("cuda")
    with intervene(model, iv):
        on_gpu = arch.read_weight("q", 1).cpu()
    assert torch.equal(on_cpu, on_gpu)


# ---------------------------------------------------------------------------------------------
# targets


def test_untargeted_weights_are_unchanged():
    model, _ = tiny("tiny-phi3")  # fused qkv_proj and gate_up_proj: only the chosen rows change
    arch = architecture(model)
    snap = _snapshot(model)
    gate, other_up = arch.read_weight("gate", 1), arch.read_weight("up", 2)
    q, k = arch.read_weight("q", 3), arch.read_weight("k", 3)
    with intervene(model, WeightNoise(0.5, seed=0, layers=[1, 3], roles=["up", "v"])):
        assert _changed(model, snap) == {"model.layers.1.mlp.gate_up_proj.weight", "model.layers.3.mlp.gate_up_proj.weight",
                                         "model.layers.1.self_attn.qkv_proj.weight", "model.layers.3.self_attn.qkv_proj.weight"}
        assert torch.equal(arch.read_weight("gate", 1), gate) and torch.equal(arch.read_weight("up", 2), other_up)
        assert torch.equal(arch.read_weight("q", 3), q) and torch.equal(arch.read_weight("k", 3), k)
        assert not torch.equal(arch.read_weight("v", 3), snap_v(arch, snap))
    _assert_same(model, snap)

    model, _ = tiny("tiny-gpt2")  # biases are left alone
    snap = _snapshot(model)
    with intervene(model, WeightNoise(1.0, seed=0, roles=["q", "up"])):
        changed = _changed(model, snap)
    assert changed == {f"transformer.h.{i}.{m}.weight" for i in range(4) for m in ("attn.c_attn", "mlp.c_fc")}


def snap_v(arch, snap):
    """v of layer 3 as it was before (rebuilt from the snapshot of the fused matrix)."""
    fused = snap["model.layers.3.self_attn.qkv_proj.weight"][0]
    return fused[arch.role_rows("v", 3)]


def test_all_parameters_noises_a_tied_embedding_once():
    model, _ = tiny("tiny-gpt2")
    arch = architecture(model)
    embedding = arch.embeddings()[0].weight
    assert arch.lm_head().weight is embedding
    snap = _snapshot(model)
    level = 0.05
    original = embedding.detach().double().clone()
    iv = WeightNoise(level, scale="absolute", seed=2, all_parameters=True)
    names = iv.targets(model)
    assert len(names) == len(set(map(id, model.parameters()))) and "lm_head.weight" not in names
    with intervene(model, iv):
        assert arch.lm_head().weight is embedding  # still tied
        z = (embedding.detach().double() - original) / level
        # noised twice would have std sqrt(2); once: 1 (16640 entries: standard error 0.6%)
        assert abs(float(z.std()) - 1) < 0.03
        assert _changed(model, snap) == set(dict(model.named_parameters(remove_duplicate=False)))  # every one
    _assert_same(model, snap)


def test_first_block():
    model, _ = tiny("tiny-llama")
    assert WeightNoise(0.1, layers=[3, 2]).first_block(model) == 2
    assert WeightNoise(0.1, layers=[-1]).first_block(model) == 3
    assert WeightNoise(0.1).first_block(model) == 0
    assert WeightNoise(0.1, all_parameters=True).first_block(model) == 0


# ---------------------------------------------------------------------------------------------
# the sweep


def _sequences(n=6):
    return [ScoredSequence(tuple(5 + (11 * i + 7 * t) % 200 for t in range(12 + 3 * i)), (False,) + (True,) * (11 + 3 * i))
            for i in range(n)]


def _direct_loss(model, seqs) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].double()
            mask = torch.tensor(s.target_mask[1:])
            total += float(F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum"))
            count += int(mask.sum())
    return total / count


def test_sweep_with_prefix_reuse_equals_scoring_without_it_and_a_direct_forward():
    model, tok = tiny("tiny-llama")
    seqs = _sequences()
    kw = dict(levels=[0.05, 0.5], seeds=[0, 1], layers=[2, 3], roles=["q", "down"], run_parts={"t": 1}, pad_id=0,
              progress=False)
    with ResultsStore(":memory:") as s1, ResultsStore(":memory:") as s2:
        reused = run_noise(model, seqs, store=s1, reuse_prefix=True, **kw)
        full = run_noise(model, seqs, store=s2, reuse_prefix=False, **kw)
    assert reused.config["first_block"] == 2
    assert reused.config["block_forwards"] < full.config["block_forwards"]
    a, b = reused.to_frame(), full.to_frame()
    assert list(a.columns) == ["level", "seed", "metric", "value"] and len(a) == 4 * 4
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-6, atol=1e-6)
    base = _direct_loss(model, seqs)
    assert reused.baseline["loss"] == pytest.approx(base, abs=1e-5)
    for row in reused.rows:
        with intervene(model, WeightNoise(row["level"], seed=row["seed"], layers=[2, 3], roles=["q", "down"])):
            direct = _direct_loss(model, seqs)
        assert row["loss"] == pytest.approx(direct, abs=1e-5)
        assert row["delta"] == pytest.approx(direct - base, abs=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert len({row["loss"] for row in reused.rows}) == 4  # the seeds differ


def test_sweep_resumes_from_the_store():
    model, _ = tiny("tiny-gpt2")
    seqs = _sequences(3)
    kw = dict(levels=[0.1], seeds=[0, 1], run_parts={"t": 2}, progress=False)
    with ResultsStore(":memory:") as store:
        first = run_noise(model, seqs, store=store, **kw)
        again = run_noise(model, seqs, store=store, **kw)
        more = run_noise(model, seqs, store=store, **{**kw, "seeds": [0, 1, 2]})
    assert first.config["block_forwards"] > 0 and again.config["block_forwards"] == 0
    assert again.rows == first.rows
    assert more.rows[:2] == first.rows and more.config["block_forwards"] > 0


def test_destroyed_model_gives_nonfinite_losses_without_crashing(tmp_path):
    model, _ = tiny("tiny-llama")
    with ResultsStore(":memory:") as store:
        result = run_noise(model, _sequences(2), levels=[0.1, 1e38], seeds=[0, 1], scale="absolute",
                           all_parameters=True, store=store, run_parts={"t": 3}, progress=False)
    huge = [r for r in result.rows if r["level"] == 1e38]
    assert all(not math.isfinite(r["loss"]) for r in huge)
    summary = result.summary()
    row = summary[(summary["level"] == 1e38) & (summary["metric"] == "loss")].iloc[0]
    assert row["n_nonfinite"] == 2 and math.isnan(row["lo"]) and math.isnan(row["hi"])
    ok = summary[(summary["level"] == 0.1) & (summary["metric"] == "loss")].iloc[0]
    assert ok["n_nonfinite"] == 0 and math.isfinite(ok["lo"])
    assert result.plot(tmp_path / "n.png").stat().st_size > 1000


def test_summary_interval_equals_a_scipy_t_interval(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for level in (0.01, 0.1, 1.0):
        for seed in range(5):
            loss = 3 + level + rng.normal(0, 0.1)
            rows.append({"level": level, "seed": seed, "loss": loss, "delta": loss - 3.0, "perplexity": math.exp(loss),
                         "baseline_loss": 3.0, "baseline_perplexity": math.exp(3.0)})
    result = NoiseResult(rows=rows, baseline={"loss": 3.0, "perplexity": math.exp(3.0)})
    summary = result.summary()
    assert list(summary.columns) == ["level", "metric", "mean", "lo", "hi", "std", "n", "n_nonfinite"]
    assert len(summary) == 3 * 3
    for _, row in summary.iterrows():
        values = np.array([r[row["metric"]] for r in rows if r["level"] == row["level"]])
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["lo"] == pytest.approx(lo, rel=1e-10) and row["hi"] == pytest.approx(hi, rel=1e-10)
        assert row["n"] == 5
    frame = result.to_frame()
    assert list(frame.columns) == ["level", "seed", "metric", "value"] and len(frame) == 15 * 4
    assert result.plot(tmp_path / "s.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs, message", [
    ({"level": -0.1}, "noise level -0.1 is out of range"),
    ({"level": float("nan")}, "out of range"),
    ({"level": True}, "not a number"),
    ({"level": "0.1"}, "not a number"),
    ({"level": 0.1, "distribution": "laplace"}, "unknown distribution 'laplace': allowed gaussian, uniform"),
    ({"level": 0.1, "scale": "log"}, "unknown scale 'log': allowed relative, absolute"),
    ({"level": 0.1, "seed": 1.5}, "noise seed 1.5 is not an integer"),
    ({"level": 0.1, "all_parameters": True, "layers": [1]}, "cannot be combined with layers or roles"),
])
def test_bad_values_are_refused(kwargs, message):
    level = kwargs.pop("level")
    with pytest.raises(LayerscopeError, match=message.replace("(", r"\(")):
        WeightNoise(level, **kwargs)


def test_bad_layers_and_roles_are_refused_against_the_model():
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(LayerscopeError, match="layer 4 is out of range"):
        WeightNoise(0.1, layers=[4]).first_block(model)
    with pytest.raises(LayerscopeError, match="role 'gate' does not exist in a gpt2 model"):
        with intervene(model, WeightNoise(0.1, roles=["gate"])):
            pass  # pragma: no cover
    with ResultsStore(":memory:") as store:
        with pytest.raises(LayerscopeError, match="no noise levels"):
            run_noise(model, _sequences(1), levels=[], seeds=[0], store=store, run_parts={}, progress=False)
        with pytest.raises(LayerscopeError, match="noise seed 'a' is not an integer"):
            run_noise(model, _sequences(1), levels=[0.1], seeds=["a"], store=store, run_parts={}, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"levels": [0.1, -1.0]}, "noise level -1.0 is out of range"),
    ({"seeds": 0}, "seeds 0 is out of range"),
    ({"scale": "log"}, "unknown scale 'log'"),
    ({"distribution": "cauchy"}, "unknown distribution 'cauchy'"),
    ({"all_parameters": True, "roles": ["q"]}, "cannot be combined"),
])
def test_api_refuses_bad_values_before_loading_the_model(monkeypatch, kwargs, message):
    import layerscope.api.noise as api

    def no_load(*args, **kw):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load_model", no_load)
    with pytest.raises(LayerscopeError, match=message):
        api.noise("tiny-llama", **kwargs)


# ---------------------------------------------------------------------------------------------
# the job and the command


def test_api_writes_the_run_folder_and_resumes(tmp_path):
    from layerscope.api.noise import noise

    out = tmp_path / "run"
    kw = dict(levels=[0.01, 1.0], seeds=2, data="builtin", samples=3, seq_len=32, out=out, seed=4, progress=False)
    result, folder = noise("tiny-llama", **kw)
    assert folder == out
    for name in ("run.json", "results.csv", "summary.csv", "noise.png", "report.html", "results.sqlite"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["noise_seeds"] == [4, 5] and run["config"]["levels"] == [0.01, 1.0]
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["level", "seed", "metric", "value"] and len(results) == 2 * 2 * 4
    assert set(results["seed"]) == {4, 5}
    summary = pd.read_csv(out / "summary.csv")
    loss = summary[summary["metric"] == "loss"].set_index("level")
    assert (loss["lo"] <= loss["mean"]).all() and (loss["mean"] <= loss["hi"]).all()
    for level in (0.01, 1.0):  # the summary is the mean over the seeds' rows of results.csv
        values = results[(results["level"] == level) & (results["metric"] == "loss")]["value"]
        assert loss.loc[level, "mean"] == pytest.approx(values.mean(), rel=1e-12) and loss.loc[level, "n"] == 2
    again, _ = noise("tiny-llama", **kw)
    assert again.config["block_forwards"] == 0 and again.rows == result.rows


def test_cli_prints_the_per_level_table(tmp_path):
    import typer
    from typer.testing import CliRunner

    from layerscope.cli.noise import noise_cmd

    app = typer.Typer()
    app.command("noise")(noise_cmd)
    app.command("other")(lambda: None)  # two commands: "noise" is a subcommand as in layerscope
    args = ["noise", "tiny-gpt2", "--levels", "0.01,0.1", "--seeds", "2", "--layers", "2-3", "--roles", "q,up",
            "--data", "builtin", "--samples", "2", "--seq-len", "24", "--out", str(tmp_path / "o"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unmodified loss" in result.output and "report in" in result.output
    lines = [line.split() for line in result.output.splitlines() if line.strip().startswith(("0.01 ", "0.1 "))]
    assert [line[0] for line in lines] == ["0.01", "0.1"]
    summary = pd.read_csv(tmp_path / "o" / "summary.csv")
    row = summary[(summary["metric"] == "loss") & (summary["level"] == 0.1)].iloc[0]
    assert lines[1][1:4] == [f"{row['mean']:.4f}", f"[{row['lo']:.4f},", f"{row['hi']:.4f}]"]
    bad = CliRunner().invoke(app, ["noise", "tiny-gpt2", "--levels", "0.1,x", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and isinstance(bad.exception, LayerscopeError)


def test_layerscope_noise_command(tmp_path, capsys):
    code, out, err = run_cli(["noise", "tiny-llama", "--levels", "0.1", "--seeds", "2", "--data", "builtin",
                              "--samples", "2", "--seq-len", "24", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    assert "unmodified loss" in out and (tmp_path / "o" / "report.html").is_file()
    code, _, err = run_cli(["noise", "tiny-llama", "--levels", "-1", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "noise level -1.0 is out of range" in err
