"""Bit flips: exact XORs on the bit pattern, exact restoration, site choice, the sweeps and the job."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli, tiny
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import intervene
from layerscope.interventions.bitflip import (
    BIT_LAYOUTS,
    BitFlip,
    bit_field,
    bit_label,
    choose_sites,
    dtype_bits,
    flip_bits,
    resolve_bits,
)
from layerscope.models import architecture
from layerscope.models.tiny import build_tiny_model
from layerscope.runner import ResultsStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT = {torch.float32: (torch.int32, 32), torch.float16: (torch.int16, 16), torch.bfloat16: (torch.int16, 16)}


def _pattern(x: torch.Tensor) -> list[int]:
    """The unsigned bit pattern of each element, as Python ints."""
    int_dtype, width = INT[x.dtype]
    return [v & ((1 << width) - 1) for v in x.view(int_dtype).tolist()]


def _from_pattern(patterns: list[int], dtype: torch.dtype) -> torch.Tensor:
    int_dtype, width = INT[dtype]
    signed = [p - (1 << width) if p >= 1 << (width - 1) else p for p in patterns]
    return torch.tensor(signed, dtype=int_dtype).view(dtype)


# ----------------------------------------------------------------------------------------------
# Layouts and hand-computed bit patterns


def test_layouts_and_labels():
    assert [dtype_bits(d) for d in DTYPES] == [32, 16, 16]
    f32, f16, bf16 = (BIT_LAYOUTS[d] for d in DTYPES)
    assert (f32.sign, f32.exponent, f32.mantissa) == (31, tuple(range(30, 22, -1)), tuple(range(22, -1, -1)))
    assert (f16.sign, f16.exponent, f16.mantissa) == (15, tuple(range(14, 9, -1)), tuple(range(9, -1, -1)))
    assert (bf16.sign, bf16.exponent, bf16.mantissa) == (15, tuple(range(14, 6, -1)), tuple(range(6, -1, -1)))
    assert [bit_field(torch.float32, b) for b in (31, 30, 23, 22, 0)] == ["sign", "exponent", "exponent", "mantissa", "mantissa"]
    assert [bit_label(torch.float32, b) for b in (31, 30, 23, 22, 0)] == ["sign", "exp7", "exp0", "man22", "man0"]
    assert [bit_label(torch.float16, b) for b in (15, 14, 10, 9, 0)] == ["sign", "exp4", "exp0", "man9", "man0"]
    assert [bit_label("bfloat16", b) for b in (15, 14, 7, 6, 0)] == ["sign", "exp7", "exp0", "man6", "man0"]
    assert resolve_bits(torch.bfloat16, "sign,exponent,man0") == (15, 14, 13, 12, 11, 10, 9, 8, 7, 0)
    assert resolve_bits(torch.float32, None) == tuple(range(31, -1, -1))
    assert resolve_bits(torch.float16, "mantissa") == tuple(range(9, -1, -1))
    assert resolve_bits(torch.float32, [30, "exp0", "30"]) == (30, 23)


# (value, bit, expected pattern after the flip, expected value or None), patterns written by hand
HAND = {
    torch.float32: (0x3F800000, [
        (30, 0x7F800000, math.inf),      # exponent 0x7F -> 0xFF with a zero mantissa: infinity
        (31, 0xBF800000, -1.0),
        (23, 0x3F000000, 0.5),           # exponent 127 -> 126
        (22, 0x3FC00000, 1.5),
        (0, 0x3F800001, None),           # the next float after 1.0
    ]),
    torch.float16: (0x3C00, [
        (14, 0x7C00, math.inf),
        (15, 0xBC00, -1.0),
        (10, 0x3800, 0.5),
        (9, 0x3E00, 1.5),
        (0, 0x3C01, None),
    ]),
    torch.bfloat16: (0x3F80, [
        (14, 0x7F80, math.inf),
        (15, 0xBF80, -1.0),
        (7, 0x3F00, 0.5),
        (6, 0x3FC0, 1.5),
        (0, 0x3F81, None),
    ]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hand_computed_bit_patterns(dtype):
    one_pattern, cases = HAND[dtype]
    one = torch.tensor([1.0], dtype=dtype)
    assert _pattern(one) == [one_pattern]
    for bit, expected, value in cases:
        flipped = flip_bits(one, bit)
        assert flipped.dtype == dtype and flipped.shape == one.shape
        assert _pattern(flipped) == [expected], (dtype, bit, hex(_pattern(flipped)[0]))
        if value is None:
            assert torch.equal(flipped, torch.nextafter(one, torch.tensor([2.0], dtype=dtype)))
        else:
            assert flipped.item() == value
    assert _pattern(one) == [one_pattern], "flip_bits must not change its input"


def test_hand_computed_float32_negative_and_subnormal():
    x = _from_pattern([0xC0200000, 0x00000001], torch.float32)   # -2.5 and the smallest subnormal
    assert x[0].item() == -2.5
    assert _pattern(flip_bits(x, 30)) == [0x80200000, 0x40000001]
    assert _pattern(flip_bits(x, 31)) == [0x40200000, 0x80000001]
    assert flip_bits(x, 31)[0].item() == 2.5
    # per-element bits: bit 22 of the first, bit 0 of the second (subnormal 1 ulp -> +0.0)
    y = flip_bits(x, torch.tensor([22, 0]))
    assert _pattern(y) == [0xC0600000, 0x00000000]
    assert y[0].item() == -3.5


def test_flip_makes_nan_and_back():
    x = torch.tensor([1.5], dtype=torch.float32)                    # 0x3FC00000
    nan = flip_bits(x, 30)
    assert _pattern(nan) == [0x7FC00000] and torch.isnan(nan).all()
    assert _pattern(flip_bits(nan, 30)) == [0x3FC00000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flip_twice_is_identity_for_every_bit(dtype):
    int_dtype, width = INT[dtype]
    patterns = st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=64)
    specials = [0, 1, (1 << (width - 1)), (1 << width) - 1]  # +0, smallest subnormal, -0, a NaN
    specials += [_pattern(torch.tensor([v], dtype=dtype))[0] for v in (math.inf, -math.inf, math.nan)]

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(patterns)
    def check(values):
        x = _from_pattern(values + specials, dtype)
        before = _pattern(x)
        for bit in range(width):
            once = flip_bits(x, bit)
            # exactly that one bit differs
            assert [a ^ b for a, b in zip(_pattern(once), before)] == [1 << bit] * len(before)
            assert _pattern(flip_bits(once, bit)) == before
        bits = torch.tensor([(i * 7) % width for i in range(len(before))])
        once = flip_bits(x, bits)
        assert [a ^ b for a, b in zip(_pattern(once), before)] == [1 << int(b) for b in bits]
        assert _pattern(flip_bits(once, bits)) == before

    check()


def test_flip_bits_errors():
    with pytest.raises(LayerscopeError, match=r"0\.\.31"):
        flip_bits(torch.ones(2), 32)
    with pytest.raises(LayerscopeError, match=r"0\.\.15"):
        flip_bits(torch.ones(2, dtype=torch.bfloat16), 16)
    with pytest.raises(LayerscopeError, match="out of range"):
        flip_bits(torch.ones(2), -1)
    with pytest.raises(LayerscopeError, match="out of range"):
        flip_bits(torch.ones(2, dtype=torch.float16), torch.tensor([3, 16]))
    with pytest.raises(LayerscopeError, match="float32, float16, bfloat16"):
        flip_bits(torch.ones(2, dtype=torch.float64), 3)
    with pytest.raises(LayerscopeError, match="float32, float16, bfloat16"):
        flip_bits(torch.ones(2, dtype=torch.int32), 3)
    with pytest.raises(LayerscopeError, match="integers"):
        flip_bits(torch.ones(2), torch.tensor([1.0, 2.0]))
    with pytest.raises(LayerscopeError, match="not a bit position"):
        flip_bits(torch.ones(2), 3.0)
    with pytest.raises(LayerscopeError, match="exp7"):
        resolve_bits(torch.float32, "exp9")
    with pytest.raises(LayerscopeError, match="no bits"):
        resolve_bits(torch.float32, "")
    with pytest.raises(LayerscopeError, match=r"0\.\.15"):
        resolve_bits(torch.bfloat16, [20])


# ----------------------------------------------------------------------------------------------
# The intervention restores bit for bit


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().view(torch.uint8) for name, p in model.state_dict().items()}


def _assert_same(model, snap) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for name, before in snap.items():
        assert torch.equal(now[name].detach().view(torch.uint8), before), f"{name} changed"


class Boom(RuntimeError):
    pass


def _check_restores(model):
    arch = architecture(model)
    snap = _snapshot(model)
    width = dtype_bits(next(model.parameters()).dtype)

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(st.integers(0, 10_000), st.integers(1, 12), st.data(), st.booleans())
    def check(seed, count, data, should_raise):
        sites = choose_sites(model, count=count, seed=seed)
        bits = data.draw(st.lists(st.integers(0, width - 1), min_size=count, max_size=count))
        originals = {s: arch.read_weight(s[1], s[0])[s[2], s[3]].clone() for s in sites}
        try:
            with torch.no_grad(), intervene(model, BitFlip(sites, bits)):
                for (layer, role, row, col), bit in zip(sites, bits):
                    now = arch.read_weight(role, layer)[row, col]
                    expected = flip_bits(originals[(layer, role, row, col)].reshape(1), bit)
                    assert _pattern(now.reshape(1)) == _pattern(expected)
                if should_raise:
                    raise Boom()
        except Boom:
            pass
        _assert_same(model, snap)

    check()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi3", "tiny-falcon"])
def test_bitflip_restores_float32(name):
    model, _ = tiny(name)
    _check_restores(model)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi3", "tiny-falcon"])
def test_bitflip_restores_bfloat16(name):
    model, _ = build_tiny_model(name, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    _check_restores(model)


def test_bitflip_restores_nan_and_inf_and_output_changes():
    model, _ = build_tiny_model("tiny-llama")
    arch = architecture(model)
    weight = arch.read_weight("up", 1)
    weight[3, 5], weight[4, 6] = 1.5, 1.0      # flipping exp7 makes NaN and inf
    arch.write_weight("up", 1, weight)
    snap = _snapshot(model)
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    flip = BitFlip([(1, "up", 3, 5), (1, "up", 4, 6)], 30)
    assert flip.nonfinite_after(model) == 2
    with pytest.raises(Boom), torch.no_grad(), intervene(model, flip):
        changed = arch.read_weight("up", 1)
        assert torch.isnan(changed[3, 5]) and torch.isinf(changed[4, 6])
        assert not torch.isfinite(model(input_ids=ids).logits).all()
        raise Boom()
    _assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_bitflip_reaches_the_stored_element_conv1d_and_fused():
    """Independent reference: the stored parameter element a site maps to, spelled by hand."""
    model, _ = build_tiny_model("tiny-gpt2")
    c_attn = model.transformer.h[2].attn.c_attn.weight           # Conv1D (in, out) = (64, 192): [q | k | v]
    before = c_attn.detach().clone()
    with torch.no_grad(), intervene(model, BitFlip([(2, "k", 7, 11)], 31)):
        diff = (c_attn.detach() != before).nonzero().tolist()
        assert diff == [[11, 64 + 7]]
        assert c_attn[11, 64 + 7].item() == -before[11, 64 + 7].item()
    assert torch.equal(c_attn.detach(), before)

    model, _ = build_tiny_model("tiny-phi3")
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight      # Linear (out, in) = (256, 64): [gate | up]
    before = gate_up.detach().clone()
    with torch.no_grad(), intervene(model, BitFlip([(1, "up", 5, 9)], 22)):
        assert (gate_up.detach() != before).nonzero().tolist() == [[128 + 5, 9]]
    assert torch.equal(gate_up.detach(), before)


def test_bitflip_errors():
    model, _ = tiny("tiny-llama")
    snap = _snapshot(model)
    with pytest.raises(LayerscopeError, match="twice"):
        BitFlip([(0, "q", 1, 2), (0, "q", 1, 2)], 3)
    with pytest.raises(LayerscopeError, match="twice"):
        BitFlip([(3, "q", 1, 2), (-1, "q", 1, 2)], 3).apply(model)
    with pytest.raises(LayerscopeError, match="one per site"):
        BitFlip([(0, "q", 1, 2), (0, "k", 1, 2)], [3])
    with pytest.raises(LayerscopeError, match=r"allowed rows 0\.\.63"):
        BitFlip([(0, "q", 0, 0), (0, "q", 64, 0)], 3).apply(model)
    with pytest.raises(LayerscopeError, match="qkv|allowed"):
        BitFlip([(0, "qkv", 0, 0)], 3).apply(model)
    with pytest.raises(LayerscopeError, match=r"0\.\.3"):
        BitFlip([(4, "q", 0, 0)], 3).apply(model)
    with pytest.raises(LayerscopeError, match=r"0\.\.31"):
        BitFlip([(0, "q", 0, 0), (0, "k", 0, 0)], [3, 40]).apply(model)
    with pytest.raises(LayerscopeError, match="no sites"):
        BitFlip([], 3)
    _assert_same(model, snap)  # nothing was half-applied
    assert BitFlip([(2, "q", 0, 0), (1, "v", 0, 0)], 3).first_block(model) == 1


# ----------------------------------------------------------------------------------------------
# Choosing sites


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_choose_sites_random(name):
    model, _ = tiny(name)
    arch = architecture(model)
    a = choose_sites(model, count=50, seed=3)
    assert a == choose_sites(model, count=50, seed=3)
    assert a != choose_sites(model, count=50, seed=4)
    assert len(a) == 50 and len(set(a)) == 50
    for layer, role, row, col in a:
        rows, cols = arch.role_shape(role, layer)
        assert 0 <= row < rows and 0 <= col < cols
    some = choose_sites(model, count=20, seed=1, layers=[2], roles=["q", "down"])
    assert {(s[0], s[1]) for s in some} <= {(2, "q"), (2, "down")}


def test_choose_sites_all_weights_covers_every_weight_once():
    model, _ = tiny("tiny-gpt2")
    arch = architecture(model)
    everything = {(1, role, r, c) for role in ("q", "k", "v", "o", "up", "down")
                  for r in range(arch.role_shape(role, 1)[0]) for c in range(arch.role_shape(role, 1)[1])}
    sites = choose_sites(model, count=len(everything), seed=0, layers=[1])
    assert len(sites) == len(everything) and set(sites) == everything
    with pytest.raises(LayerscopeError, match="more than"):
        choose_sites(model, count=len(everything) + 1, seed=0, layers=[1])


def test_choose_sites_random_is_proportional_to_matrix_size():
    model, _ = tiny("tiny-llama")   # q,o: 64x64; k,v: 32x64; gate,up: 128x64; down: 64x128
    sites = choose_sites(model, count=6000, seed=0)
    arch = architecture(model)
    total = sum(np.prod(arch.role_shape(r, 0)) for r in ("q", "k", "v", "o", "gate", "up", "down")) * 4
    counts = pd.Series([s[1] for s in sites]).value_counts()
    for role in ("k", "up", "down"):
        share = np.prod(arch.role_shape(role, 0)) * 4 / total
        assert abs(counts[role] / 6000 - share) < 0.02, (role, counts[role] / 6000, share)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi3"])
def test_choose_sites_largest_brute_force(name):
    model, _ = tiny(name)
    arch = architecture(model)
    entries = []
    roles = [r for r in arch.roles() if r in ("q", "k", "v", "o", "gate", "up", "down")]
    for layer in range(arch.num_layers):
        for role in roles:
            w = arch.read_weight(role, layer)
            for r in range(w.shape[0]):
                for c, v in enumerate(w[r].tolist()):
                    entries.append((abs(v), (layer, role, r, c)))
    entries.sort(key=lambda e: -e[0])
    top = {site for _, site in entries[:25]}
    assert entries[24][0] > entries[25][0]  # no tie at the boundary in this model
    assert set(choose_sites(model, count=25, how="largest")) == top
    assert choose_sites(model, count=25, how="largest", seed=1) == choose_sites(model, count=25, how="largest", seed=9)


def test_choose_sites_errors():
    model, _ = tiny("tiny-llama")
    with pytest.raises(LayerscopeError, match="random, largest"):
        choose_sites(model, count=3, how="smallest")
    with pytest.raises(LayerscopeError, match=">= 1"):
        choose_sites(model, count=0)
    with pytest.raises(LayerscopeError, match="non-negative"):
        choose_sites(model, count=3, seed=-1)
    with pytest.raises(LayerscopeError, match="allowed"):
        choose_sites(model, count=3, roles=["qkv"])
    with pytest.raises(LayerscopeError, match=r"0\.\.3"):
        choose_sites(model, count=3, layers=[7])


# ----------------------------------------------------------------------------------------------
# The sweeps


def _sequences(tok, n=4, length=24):
    from layerscope.data.sequences import ScoredSequence

    rng = np.random.default_rng(0)
    return [ScoredSequence(tuple(int(t) for t in rng.integers(3, 250, size=length - i)), (False,) + (True,) * (length - i - 1))
            for i in range(n)]


def test_layer_sweep_with_prefix_reuse_equals_full_scoring():
    from layerscope.analyses.bitflip import run_bitflip

    model, tok = tiny("tiny-llama")
    seqs = _sequences(tok)
    with ResultsStore(":memory:") as store:
        result = run_bitflip(model, seqs, bits=[23, 0], flips=4, seeds=[0, 1], layer_bit="exp0", store=store,
                             run_parts={"test": 1}, progress=False)
    evaluator = Evaluator(model, seqs)
    base = evaluator.score().mean_loss
    assert result.baseline_loss == pytest.approx(base, rel=1e-6)
    frame = result.wide()
    layer_rows = frame[frame["sweep"] == "layer"]
    assert sorted(layer_rows["layer"].unique()) == [0, 1, 2, 3] and set(layer_rows["bit"]) == {23}
    for _, row in layer_rows.iterrows():
        sites = choose_sites(model, count=4, seed=(int(row["seed"]), int(row["layer"])), layers=[int(row["layer"])])
        full = evaluator.score([BitFlip(sites, 23)]).mean_loss
        assert row["loss"] == pytest.approx(full, rel=1e-5, abs=1e-6)
        assert row["delta"] == pytest.approx(full - base, abs=1e-5)
        assert abs(full - base) > 1e-7  # the flips really change the model
    for _, row in frame[frame["sweep"] == "bit"].iterrows():
        sites = choose_sites(model, count=4, seed=int(row["seed"]))
        full = evaluator.score([BitFlip(sites, int(row["bit"]))]).mean_loss
        assert row["loss"] == pytest.approx(full, rel=1e-5, abs=1e-6)
    # same seed, same weights for every bit: the exponent flip moves the loss more than the last mantissa bit
    summary = result.per_bit().set_index("bit")
    assert abs(summary.loc[23, "delta_mean"]) > abs(summary.loc[0, "delta_mean"])
    tidy = result.to_frame()
    assert list(tidy.columns) == ["sweep", "bit", "label", "field", "layer", "seed", "metric", "value"]
    assert len(tidy) == len(frame) * 5


def test_nonfinite_losses_are_kept_stored_and_summarised(tmp_path):
    from layerscope.analyses.bitflip import run_bitflip
    from layerscope.runner import RunFolder

    model, tok = build_tiny_model("tiny-llama")
    arch = architecture(model)
    weight = arch.read_weight("down", 2)
    weight[0, 0] = 1.5   # the largest weight; flipping exp7 makes it NaN
    arch.write_weight("down", 2, weight)
    seqs = _sequences(tok)
    kwargs = dict(bits=[30, 0], flips=1, seeds=[0, 1], how="largest", run_parts={"t": 2}, progress=False)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        result = run_bitflip(model, seqs, store=store, **kwargs)
        stored = store.count()
        again = run_bitflip(model, seqs, store=store, **kwargs)   # resumes: nothing recomputed
        assert store.count() == stored
    frame = result.wide()
    assert set(frame["seed"]) == {-1, 0}          # largest does not depend on the seed: one seed run
    exp7 = frame[(frame["sweep"] == "bit") & (frame["bit"] == 30)].iloc[0]
    assert math.isnan(exp7["loss"]) and exp7["diverged"] == 1 and exp7["nonfinite_sites"] == 1
    man0 = frame[(frame["sweep"] == "bit") & (frame["bit"] == 0)].iloc[0]
    assert math.isfinite(man0["loss"]) and man0["diverged"] == 0 and man0["nonfinite_sites"] == 0
    again_frame = again.wide()
    assert again_frame["loss"].isna().equals(frame["loss"].isna())
    np.testing.assert_array_equal(again_frame["loss"].to_numpy(), frame["loss"].to_numpy())
    summary = result.per_bit().set_index("bit")
    assert summary.loc[30, "diverged_fraction"] == 1.0 and math.isnan(summary.loc[30, "delta_lo"])
    assert summary.loc[0, "diverged_fraction"] == 0.0
    layers = result.per_layer().set_index("layer")
    assert layers.loc[2, "diverged_fraction"] == 1.0 and layers.loc[0, "diverged_fraction"] == 0.0
    paths = result.save(RunFolder(tmp_path / "run", "bitflip"))
    names = {p.name for p in paths}
    assert {"results.csv", "summary.csv", "bitflip_bits.png", "bitflip_layers.png"} <= names
    csv = pd.read_csv(tmp_path / "run" / "results.csv")
    assert csv[(csv["bit"] == 30) & (csv["metric"] == "loss") & (csv["sweep"] == "bit")]["value"].isna().all()


def test_run_bitflip_refuses_bad_input():
    from layerscope.analyses.bitflip import run_bitflip

    model, tok = tiny("tiny-llama")
    seqs = _sequences(tok)
    common = dict(store=ResultsStore(":memory:"), run_parts={}, progress=False)
    with pytest.raises(LayerscopeError, match=r"0\.\.31"):
        run_bitflip(model, seqs, bits=[32], **common)
    with pytest.raises(LayerscopeError, match="exp7"):
        run_bitflip(model, seqs, layer_bit="exp8", **common)
    with pytest.raises(LayerscopeError, match="random, largest"):
        run_bitflip(model, seqs, how="top", **common)
    with pytest.raises(LayerscopeError, match=">= 1"):
        run_bitflip(model, seqs, flips=0, **common)
    with pytest.raises(LayerscopeError, match="more than"):
        run_bitflip(model, seqs, flips=10**9, **common)


# ----------------------------------------------------------------------------------------------
# The job and the command


def test_api_job_bfloat16(tmp_path):
    import json

    from layerscope.api.bitflip import bitflip

    result, folder = bitflip("tiny-gpt2", bits="sign,exp7,man0", flips=2, seeds=2, layers=[0, 3], data="builtin",
                             samples=2, seq_len=16, out=tmp_path / "run", dtype="bfloat16", progress=False)
    assert result.dtype == "bfloat16" and result.config["bits"] == [15, 14, 0]
    assert result.config["layer_bit"] == 14            # bfloat16's highest exponent bit
    for name in ("run.json", "results.csv", "summary.csv", "bitflip_bits.png", "bitflip_layers.png", "report.html"):
        assert (folder / name).is_file(), name
    tidy = pd.read_csv(folder / "results.csv")
    assert list(tidy.columns) == ["sweep", "bit", "label", "field", "layer", "seed", "metric", "value"]
    assert set(tidy["label"]) == {"none", "sign", "exp7", "man0"}
    assert sorted(tidy[tidy["sweep"] == "layer"]["layer"].unique()) == [0, 3]
    assert set(tidy[tidy["sweep"] == "bit"]["seed"]) == {0, 1}
    summary = pd.read_csv(folder / "summary.csv")
    assert len(summary) == 3 + 2
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["weight_dtype"] == "torch.bfloat16"


def test_api_refuses_before_loading():
    from layerscope.api.bitflip import bitflip

    with pytest.raises(LayerscopeError, match="bit 'exp99x'"):
        bitflip("no-such-model", bits="exp99x")
    with pytest.raises(LayerscopeError, match="out of range"):
        bitflip("no-such-model", bits="40")
    with pytest.raises(LayerscopeError, match=r"0\.\.15"):
        bitflip("no-such-model", bits="20", dtype="bfloat16")
    with pytest.raises(LayerscopeError, match="random, largest"):
        bitflip("no-such-model", how="everything")
    with pytest.raises(LayerscopeError, match="flips 0"):
        bitflip("no-such-model", flips=0)


def test_cli_command_through_typer(tmp_path):
    import typer
    from typer.testing import CliRunner

    from layerscope.cli.bitflip import bitflip_cmd

    app = typer.Typer()
    app.command("bitflip")(bitflip_cmd)
    app.command("other")(lambda: None)  # two commands: the command name is given on the line
    res = CliRunner().invoke(app, ["bitflip", "tiny-llama", "--bits", "exp7,man0", "--flips", "2", "--seeds", "2",
                                   "--layers", "1-2", "--roles", "q,down", "--data", "builtin", "--samples", "2",
                                   "--seq-len", "16", "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "exp7" in res.output and "man0" in res.output and "report in" in res.output
    tidy = pd.read_csv(tmp_path / "run" / "results.csv")
    assert sorted(tidy[tidy["sweep"] == "layer"]["layer"].unique()) == [1, 2]


def test_cli_registered(tmp_path, capsys):
    code, out, _ = run_cli(["bitflip", "tiny-llama", "--bits", "sign", "--flips", "1", "--seeds", "1", "--layers", "0",
                            "--data", "builtin", "--samples", "2", "--seq-len", "16", "--out", str(tmp_path / "r"),
                            "--quiet"], capsys)
    assert code == 0 and "sign" in out
    code, _, err = run_cli(["bitflip", "tiny-llama", "--bits", "64", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "64" in err
