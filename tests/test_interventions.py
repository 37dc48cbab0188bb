"""Interventions restore the model bit for bit, whatever happens inside the block."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny
from layerscope.errors import LayerscopeError
from layerscope.interventions import SkipBlock, ZeroRole, intervene
from layerscope.models import architecture

FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox", "tiny-phi3", "tiny-bloom", "tiny-falcon"]


def _snapshot(model):
    params = {name: p.detach().clone().view(torch.uint8) if p.dtype != torch.bool else p.detach().clone()
              for name, p in model.state_dict().items()}
    blocks = list(architecture(model).blocks())
    return params, blocks


def _assert_same(model, snap):
    params, blocks = snap
    now = model.state_dict()
    assert set(now) == set(params)
    for name, before in params.items():
        after = now[name].detach().view(torch.uint8)
        assert torch.equal(after, before), f"{name} changed"
    assert all(a is b for a, b in zip(architecture(model).blocks(), blocks)), "a block module was not put back"


class Boom(RuntimeError):
    pass


@st.composite
def intervention_plans(draw, roles, num_layers):
    plan = []
    for _ in range(draw(st.integers(1, 4))):
        layers = draw(st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True))
        if draw(st.booleans()):
            plan.append(SkipBlock(layers))
        else:
            plan.append(ZeroRole(draw(st.sampled_from(roles)), layers))
    return plan, draw(st.booleans())


@pytest.mark.parametrize("name", FAMILIES)
def test_random_interventions_restore_bit_exact(name):
    model, _ = tiny(name)
    arch = architecture(model)
    snap = _snapshot(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits.clone()

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(intervention_plans(list(arch.roles()), arch.num_layers))
    def check(plan_and_raise):
        plan, should_raise = plan_and_raise
        try:
            with torch.no_grad(), intervene(model, *plan):
                changed = model(input_ids=ids).logits
                assert not torch.equal(changed, reference) or all(
                    isinstance(p, ZeroRole) for p in plan
                )
                if should_raise:
                    raise Boom()
        except Boom:
            pass
        _assert_same(model, snap)

    check()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_failing_apply_undoes_what_it_did():
    model, _ = tiny("tiny-llama")
    snap = _snapshot(model)
    with pytest.raises(LayerscopeError, match="layer 99 is out of range"):
        with intervene(model, ZeroRole("q", [0, 1]), SkipBlock([2]), ZeroRole("up", [99])):
            pass
    _assert_same(model, snap)


def test_zero_role_really_zeroes_that_role_only():
    model, _ = tiny("tiny-gpt2")
    arch = architecture(model)
    k_before, v_before = arch.read_weight("k", 1), arch.read_weight("v", 1)
    with intervene(model, ZeroRole("q", [1])):
        assert torch.count_nonzero(arch.read_weight("q", 1)) == 0
        assert torch.equal(arch.read_weight("k", 1), k_before)
        assert torch.equal(arch.read_weight("v", 1), v_before)
    assert torch.count_nonzero(arch.read_weight("q", 1)) > 0


@pytest.mark.parametrize("bad, message", [
    (lambda: SkipBlock([4]), "layer 4 is out of range"),
    (lambda: SkipBlock([]), "no layers given"),
    (lambda: ZeroRole("gate", [0]), "role 'gate' does not exist"),
    (lambda: ZeroRole("q", ["a"]), "is not an integer"),
])
def test_bad_interventions_are_refused_with_a_clear_message(bad, message):
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(LayerscopeError, match=message):
        with intervene(model, bad()):
            pass
