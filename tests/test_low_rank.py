"""LowRank (LASER): rank-k truncation through the adapter, LASER's rate-to-rank mapping, one SVD per matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY_NAMES, tiny
from layerscope.errors import LayerscopeError
from layerscope.interventions import (
    LASER_LNAMES,
    LowRank,
    RoleEdit,
    SVDCache,
    ZeroRole,
    intervene,
    laser_kept_rank,
    lname_roles,
)
from layerscope.models import architecture
from layerscope.models.architecture import ROLES
from layerscope.models.tiny import build_tiny_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _assert_bit_identical(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    for name, before in snap.items():
        assert torch.equal(now[name].view(torch.uint8), before.view(torch.uint8)), f"{name} changed"


def _reference(weight: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy SVD truncation and the singular values."""
    w = weight.detach().to(torch.float64).numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s


class _Write(RoleEdit):
    """Test helper: put a given matrix into a role (restored by RoleEdit)."""

    def __init__(self, role, layer, matrix):
        super().__init__(role, layer)
        self.matrix = matrix

    def new_weight(self, weight, layer):
        return self.matrix


# -- LASER's rate -> rank --------------------------------------------------------------------

# Computed by hand from LASER's int(min(m, n) * ((10 - rate) * 0.1)).
@pytest.mark.parametrize(
    "shape, rate, kept",
    [
        ((4096, 11008), 0, 4096),
        ((4096, 11008), 1, 3686),     # 4096 * 0.9 = 3686.4
        ((4096, 11008), 5, 2048),
        ((4096, 11008), 9, 409),      # 409.6
        ((4096, 11008), 9.9, 40),     # 40.96
        ((4096, 11008), 10, 0),
        ((11008, 4096), 9, 409),      # min of the shape, either orientation
        ((4096, 4096), 9.5, 204),     # 204.8
        ((768, 3072), 7, 230),        # 230.4
        ((11008, 11008), 3, 7705),    # 7705.6
        ((4096, 4096), 2.5, 3072),
        ((64, 128), 9.9, 0),          # 0.64
        ((1000, 1000), 9.9, 9),       # float: 10 - 9.9 = 0.0999...96, so 9.99999... -> 9 (not 10)
        ((500, 2000), 9.8, 9),        # likewise 9.99999... -> 9
        ((32, 64), 5, 16),
        ((1000, 1000), 0.8, 919),     # (10 - 0.8) * 0.1 = 0.9199999999999999: 919, not 920
        ((1000, 1000), 3.2, 680),     # 6.8 * 0.1 = 0.68: 680 (1 - 0.1 * 3.2 would give 679)
        ((1000, 1000), 6.4, 360),     # 10 - 6.4 = 3.59..96, * 0.1 = 0.36: 360 (1000 * 3.59.. / 10 gives 359)
    ],
)
def test_laser_kept_rank_table(shape, rate, kept):
    assert laser_kept_rank(shape, rate) == kept


@pytest.mark.parametrize("rate", [-0.1, 10.01, math.nan, math.inf, True, "5", None])
def test_laser_kept_rank_refuses_bad_rates(rate):
    with pytest.raises(LayerscopeError, match=r"rate .* allowed is a number in \[0, 10\]"):
        laser_kept_rank((64, 64), rate)


@pytest.mark.parametrize("shape", [(0, 5), (3,), (3, 4, 5), "ab"])
def test_laser_kept_rank_refuses_bad_shapes(shape):
    with pytest.raises(LayerscopeError, match="shape"):
        laser_kept_rank(shape, 5)


# -- LASER's lnames -> roles -----------------------------------------------------------------


def test_lnames_map_like_laser():
    llama, _ = tiny("tiny-llama")
    expected = {
        "fc_in": ("gate",), "fc_up": ("up",), "fc_out": ("down",), "mlp": ("gate", "up", "down"),
        "k_proj": ("k",), "q_proj": ("q",), "v_proj": ("v",), "out_proj": ("o",), "attn": ("q", "k", "v", "o"),
        "dont": (),
    }
    assert set(expected) == set(LASER_LNAMES)
    for lname, roles in expected.items():
        assert lname_roles(lname, llama) == roles
    arch = architecture(llama)
    assert arch.role_module("gate", 0) is llama.model.layers[0].mlp.gate_proj  # LASER: gate_proj -> fc_in

    gptj, _ = tiny("tiny-gptj")
    arch = architecture(gptj)
    block = gptj.transformer.h[0]
    for lname, module in [("fc_in", block.mlp.fc_in), ("fc_out", block.mlp.fc_out), ("k_proj", block.attn.k_proj),
                          ("q_proj", block.attn.q_proj), ("v_proj", block.attn.v_proj),
                          ("out_proj", block.attn.out_proj)]:
        (role,) = lname_roles(lname, gptj)
        assert arch.role_module(role, 0) is module, lname
    assert lname_roles("mlp", gptj) == ("up", "down")

    gpt2, _ = tiny("tiny-gpt2")
    with pytest.raises(LayerscopeError, match="'fc_up'.*gpt2.*fc_in"):
        lname_roles("fc_up", gpt2)
    with pytest.raises(LayerscopeError, match="allowed fc_in, fc_out, fc_up"):
        lname_roles("all", gpt2)


# -- truncation equals a float64 reference on every family ----------------------------------


@pytest.mark.parametrize("name", TINY_NAMES)
def test_rank_k_matches_float64_reference_and_restores(name):
    model, _ = tiny(name)
    arch = architecture(model)
    layer, rank = 1, 5
    roles = [r for r in ROLES if r in arch.roles()]
    snap = _snapshot(model)
    originals = {r: arch.read_weight(r, layer) for r in arch.roles()}
    for role in roles:
        ref, s = _reference(originals[role], rank)
        with torch.no_grad(), intervene(model, LowRank(role, layer, rank=rank)):
            edited = arch.read_weight(role, layer)
            assert edited.dtype == originals[role].dtype and edited.shape == originals[role].shape
            got = edited.to(torch.float64).numpy()
            assert np.abs(got - ref).max() <= 1e-5 * s[0], (role, np.abs(got - ref).max())
            # Eckart-Young: the error is the norm of the discarded singular values
            err = float(np.sum((originals[role].to(torch.float64).numpy() - got) ** 2))
            assert err == pytest.approx(float(np.sum(s[rank:] ** 2)), rel=1e-5)
            assert np.linalg.matrix_rank(got, tol=1e-4 * s[0]) == rank
            for other in arch.roles():  # fused q/k/v: only the role's own rows change
                if other != role and other not in ("qkv", "gate_up") and arch.owner_role(other) != role:
                    same = torch.equal(arch.read_weight(other, layer), originals[other])
                    assert same, f"{other} changed when editing {role}"
            assert not torch.equal(edited, originals[role])
        _assert_bit_identical(model, snap)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-falcon", "tiny-phi3"])
def test_rate_zero_dont_and_full_rank_write_nothing(name):
    model, _ = tiny(name)
    arch = architecture(model)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits.clone()
    versions = {n: p._version for n, p in model.named_parameters()}
    full_q = min(arch.role_shape("q", 2))
    for iv in [LowRank("mlp", 2, rate=0), LowRank("attn", 2, rate=0), LowRank("dont", 2, rate=7),
               LowRank("q", 2, rank=full_q), LowRank("fc_out", 2, keep_fraction=1.0)]:
        with torch.no_grad(), intervene(model, iv):
            assert torch.equal(model(input_ids=IDS).logits, reference), iv.describe()
        assert {n: p._version for n, p in model.named_parameters()} == versions, f"{iv.describe()} wrote a weight"
    # and a real rate does change the logits (the check above can fail)
    with torch.no_grad(), intervene(model, LowRank("fc_out", 2, rate=9)):
        assert not torch.equal(model(input_ids=IDS).logits, reference)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference)


# -- one SVD per matrix -------------------------------------------------------------------------


def test_sweep_computes_one_svd_per_matrix():
    model, _ = tiny("tiny-llama")
    arch = architecture(model)
    cache = SVDCache()
    for r in (1, 3, 8, 16, 32):
        got = cache.truncated(model, "down", 2, r)
        fresh = SVDCache().truncated(model, "down", 2, r)
        assert torch.equal(got, fresh)
    assert cache.computed == 1
    # LowRank over a sweep of rates with a shared cache: still one SVD, each edit the cached truncation
    snap = _snapshot(model)
    for rate in (1, 3, 5, 7, 9):
        iv = LowRank("fc_out", 2, rate=rate, cache=cache)
        with torch.no_grad(), intervene(model, iv):
            kept = iv.kept_ranks(model)["down"]
            assert kept == laser_kept_rank(arch.role_shape("down", 2), rate)
            edited = arch.read_weight("down", 2)
        assert torch.equal(edited, cache.truncated(model, "down", 2, kept))
    assert cache.computed == 1
    _assert_bit_identical(model, snap)
    # a weight that changed since is decomposed afresh, not served from the cache
    with torch.no_grad(), intervene(model, ZeroRole("down", 2)):
        assert torch.count_nonzero(cache.truncated(model, "down", 2, 4)) == 0
    assert cache.computed == 2


def test_factors_dtypes_and_bfloat16_model():
    model, _ = build_tiny_model("tiny-llama", seed=1, dtype=torch.bfloat16)
    arch = architecture(model)
    cache = SVDCache()
    U, S, Vh = cache.factors(model, "up", 0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.shape == (128, 64) and S.shape == (64,) and Vh.shape == (64, 64)
    before = arch.read_weight("up", 0)
    with torch.no_grad(), intervene(model, LowRank("up", 0, rank=4, cache=cache)):
        edited = arch.read_weight("up", 0)
        assert edited.dtype == torch.bfloat16 and arch.role_module("up", 0).weight.dtype == torch.bfloat16
        assert torch.equal(edited, ((U[:, :4] * S[:4]) @ Vh[:4]).to(torch.bfloat16))
    assert torch.equal(arch.read_weight("up", 0), before)
    assert cache.computed == 1
    U64, S64, _ = SVDCache(dtype=torch.float64).factors(model, "up", 0)
    assert U64.dtype == S64.dtype == torch.float64
    assert torch.allclose(S64.float(), S, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, lname, rate, expected", [
    ("tiny-llama", "mlp", 7, {"gate": 19, "up": 19, "down": 19}),           # 64 * 0.3 = 19.2
    ("tiny-llama", "attn", 7, {"q": 19, "k": 9, "v": 9, "o": 19}),          # GQA: k, v are (32, 64)
    ("tiny-gpt2", "mlp", 5, {"up": 32, "down": 32}),
    ("tiny-gpt2", "attn", 9, {"q": 6, "k": 6, "v": 6, "o": 6}),             # slices of the fused c_attn
    ("tiny-falcon", "attn", 5, {"q": 32, "k": 8, "v": 8, "o": 32}),         # multi-query: k, v are (16, 64)
])
def test_groups_edit_every_matrix_with_its_own_rank(name, lname, rate, expected):
    model, _ = tiny(name)
    arch = architecture(model)
    snap = _snapshot(model)
    iv = LowRank(lname, 1, rate=rate)
    assert iv.kept_ranks(model) == expected
    with torch.no_grad(), intervene(model, iv):
        for role, kept in expected.items():
            w = arch.read_weight(role, 1).to(torch.float64)
            s0 = torch.linalg.matrix_norm(w, ord=2)
            assert int(torch.linalg.matrix_rank(w, atol=1e-4 * s0)) == kept, role
    _assert_bit_identical(model, snap)


# -- randomised SVD --------------------------------------------------------------------------


def test_randomized_svd_is_seeded_and_close_on_a_low_rank_matrix():
    model, _ = tiny("tiny-llama")
    arch = architecture(model)
    gen = torch.Generator().manual_seed(3)
    low = (torch.randn(64, 8, generator=gen) @ torch.randn(8, 128, generator=gen)) * 0.05
    matrix = low + 1e-4 * torch.randn(64, 128, generator=gen)
    snap = _snapshot(model)
    with torch.no_grad(), intervene(model, _Write("down", 1, matrix)):
        a, b, c = (SVDCache(randomized=True, seed=seed) for seed in (7, 7, 8))
        ta, tb, tc = (cache.truncated(model, "down", 1, 8) for cache in (a, b, c))
        assert torch.equal(ta, tb)
        assert not torch.equal(a.factors(model, "down", 1)[0], c.factors(model, "down", 1)[0])
        exact = SVDCache().truncated(model, "down", 1, 8)
        for t in (ta, tc):
            assert torch.linalg.norm(t - exact) / torch.linalg.norm(exact) < 1e-4
        assert a.factors(model, "down", 1)[1].shape == (18,)  # rank 8 + oversample 10
        a.truncated(model, "down", 1, 18)
        with pytest.raises(LayerscopeError, match="kept 18 singular values.*rank 19"):
            a.truncated(model, "down", 1, 19)
        with pytest.raises(LayerscopeError, match="largest rank"):
            SVDCache(randomized=True).factors(model, "down", 1)
        assert a.computed == 1
        # through LowRank
        with intervene(model, LowRank("down", 1, rank=8, cache=SVDCache(randomized=True, seed=7))):
            assert torch.equal(arch.read_weight("down", 1), ta)
    _assert_bit_identical(model, snap)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs, message", [
    (("fc_mid", 0), {"rate": 1}, r"neither a LASER lname nor a role: allowed lnames fc_in, .*dont; roles q, k, v"),
    (("q", 0), {}, "exactly one of rate, rank, keep_fraction; got none"),
    (("q", 0), {"rate": 1, "rank": 2}, "exactly one of rate, rank, keep_fraction; got rate, rank"),
    (("q", 0), {"rate": -1}, r"rate -1 is not valid: allowed is a number in \[0, 10\]"),
    (("q", 0), {"rate": 10.5}, r"rate 10.5 is not valid"),
    (("q", 0), {"rank": 0}, "rank 0 is not valid: allowed an integer >= 1"),
    (("q", 0), {"rank": 2.5}, "rank 2.5 is not valid"),
    (("q", 0), {"keep_fraction": 0}, r"keep_fraction 0 is not valid: allowed a number in \(0, 1\]"),
    (("q", 0), {"keep_fraction": 1.5}, "keep_fraction 1.5 is not valid"),
    (("q", -1), {"rate": 1}, "lnum -1, every layer, is not supported"),
    (("q", 1.0), {"rate": 1}, "not an integer layer index"),
    (("q", 0), {"rate": 1, "cache": {}}, "allowed an SVDCache"),
])
def test_bad_arguments_refused(args, kwargs, message):
    with pytest.raises(LayerscopeError, match=message):
        LowRank(*args, **kwargs)


def test_refusals_that_need_the_model_leave_it_unchanged():
    llama, _ = tiny("tiny-llama")
    gpt2, _ = tiny("tiny-gpt2")
    snap = _snapshot(llama)
    cases = [
        (llama, LowRank("q", 4, rate=5), "layer 4 is out of range.*allowed 0..3"),
        (llama, LowRank("q", 0, rank=65), r"rank 65 is too large for role 'q'.*allowed 1..64"),
        (llama, LowRank("attn", 0, rank=40), r"rank 40 is too large for role 'k'.*\(32, 64\).*allowed 1..32"),
        (gpt2, LowRank("gate", 0, rate=5), "role 'gate' does not exist in a gpt2 model; allowed: q, k, v, o, up"),
        (gpt2, LowRank("fc_up", 0, rate=5), "'fc_up'.*gpt2"),
    ]
    for model, iv, message in cases:
        with pytest.raises(LayerscopeError, match=message):
            with intervene(model, iv):
                pass
    _assert_bit_identical(llama, snap)
    with pytest.raises(LayerscopeError, match="layer 4 is out of range"):
        LowRank("q", 4, rate=5).first_block(llama)
    assert LowRank("q", 3, rate=5).first_block(llama) == 3
    with pytest.raises(LayerscopeError, match=r"rank 65 is not valid for role 'q' of shape \(64, 64\): allowed 0..64"):
        SVDCache().truncated(llama, "q", 0, 65)
    with pytest.raises(LayerscopeError, match="SVD dtype torch.float16 is not supported"):
        SVDCache(dtype=torch.float16)


def test_describe_is_plain_data():
    d = LowRank("mlp", 3, rate=9, cache=SVDCache()).describe()
    assert d == {"kind": "LowRank", "lname_or_role": "mlp", "layer": 3, "rate": 9.0, "rank": None,
                 "keep_fraction": None}


def test_keep_fraction_rank():
    model, _ = tiny("tiny-llama")
    assert LowRank("q", 0, keep_fraction=0.29).kept_ranks(model) == {"q": 18}   # floor(0.29 * 64 = 18.56)
    assert LowRank("down", 0, keep_fraction=0.25).kept_ranks(model) == {"down": 16}
    assert LowRank("k", 0, keep_fraction=0.001).kept_ranks(model) == {"k": 1}   # at least one
