"""PCRemoval: principal directions projected out of a block's output, reversibly; and generate_with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.evaluate.generation import generate, generate_with
from layerscope.interventions import Intervention, PCRemoval, intervene
from layerscope.metrics import pca
from layerscope.models import architecture
from layerscope.models.tiny import build_tiny_model

# llama and gpt2 blocks return a tensor, bloom and falcon blocks a tuple.
FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-bloom", "tiny-falcon"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [20, 30, 40, 50, 60, 70, 80]])


def _block_outputs(model, layer, ids, attention_mask=None):
    """The output hidden state of block ``layer`` for ``ids`` (a plain forward hook), and the logits."""
    seen = []

    def hook(_m, _a, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = architecture(model).block(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    return seen[-1], logits


def _basis(model, layer, k=None):
    """A PCA of block ``layer``'s outputs over 192 tokens of random text (orthonormal directions)."""
    ids = torch.randint(4, 260, (6, 32), generator=torch.Generator().manual_seed(layer))
    hidden, _ = _block_outputs(model, layer, ids)
    return pca(hidden.reshape(-1, hidden.shape[-1]).double(), k)


def _removed(h: torch.Tensor, basis, components) -> torch.Tensor:
    """``h - V V^T (h - mu)`` in float64, by hand."""
    mu = torch.as_tensor(basis.mean, dtype=torch.float64)
    V = torch.as_tensor(basis.components[components], dtype=torch.float64)
    x = h.double()
    return x - ((x - mu) @ V.T) @ V


def _hook_counts(model):
    base = architecture(model).base_model()
    return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in architecture(model).blocks()] + [
        len(base._forward_hooks), len(base._forward_pre_hooks)]


@pytest.mark.parametrize("name", FAMILIES + ["tiny-gpt-neox", "tiny-opt", "tiny-qwen3"])
def test_zero_components_leave_logits_bit_identical(name):
    model, _ = tiny(name)
    basis = _basis(model, 1)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    hooks = _hook_counts(model)
    for components in (0, []):
        for positions in ("all", "last"):
            with torch.no_grad(), intervene(model, PCRemoval(1, basis, components, positions=positions)):
                assert _hook_counts(model) == hooks  # nothing registered at all
                assert torch.equal(model(input_ids=IDS).logits, reference)
    # ... while removing one component does change them (the comparison above can fail).
    with torch.no_grad(), intervene(model, PCRemoval(1, basis, 1)):
        assert not torch.equal(model(input_ids=IDS).logits, reference)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("components", [3, [0, 2, 5]])
def test_removal_equals_the_formula(name, components):
    model, _ = tiny(name)
    layer = 1
    basis = _basis(model, layer)
    idx = list(range(components)) if isinstance(components, int) else components
    original, _ = _block_outputs(model, layer, IDS)
    with intervene(model, PCRemoval(layer, basis, components)):
        edited, logits = _block_outputs(model, layer, IDS)  # this hook runs after the edit
    expected = _removed(original, basis, idx)
    assert edited.dtype == original.dtype
    assert torch.allclose(edited.double(), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(edited, original, atol=1e-3)
    # The next blocks receive the edited state: inject the hand-edited one and compare logits.
    block_tuple = None

    def inject(_m, _a, out):
        nonlocal block_tuple
        block_tuple = isinstance(out, tuple)
        new = expected.to(original.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = architecture(model).block(layer).register_forward_hook(inject)
    try:
        with torch.no_grad():
            reference = model(input_ids=IDS).logits
    finally:
        handle.remove()
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)


def test_float64_model_projects_in_float64():
    model, _ = build_tiny_model("tiny-llama", seed=0)
    model = model.double()
    basis = _basis(model, 2)
    original, _ = _block_outputs(model, 2, IDS)
    with intervene(model, PCRemoval(2, basis, 5)):
        edited, _ = _block_outputs(model, 2, IDS)
    assert edited.dtype == torch.float64
    assert torch.allclose(edited, _removed(original, basis, list(range(5))), atol=1e-12, rtol=0)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bloom"])
def test_model_restored_after_the_block_also_when_it_raises(name, positions):
    model, _ = tiny(name)
    basis = _basis(model, 2)
    hooks = _hook_counts(model)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    with torch.no_grad(), intervene(model, PCRemoval(-2, basis, 4, positions=positions)):
        assert _hook_counts(model) != hooks
        assert not torch.equal(model(input_ids=IDS).logits, reference)
    assert _hook_counts(model) == hooks
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), intervene(model, PCRemoval(2, basis, 4, positions=positions)):
            model(input_ids=IDS)
            raise RuntimeError("boom")
    assert _hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bloom", "tiny-falcon"])
def test_last_position_edits_only_each_rows_last_real_token(name):
    model, _ = tiny(name)
    layer = 1
    basis = _basis(model, layer)
    lengths = [7, 4, 5]
    ids = torch.zeros((3, 7), dtype=torch.long)
    mask = torch.zeros((3, 7), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.arange(10 + r, 10 + r + n)
        mask[r, :n] = 1
    original, _ = _block_outputs(model, layer, ids, mask)
    with intervene(model, PCRemoval(layer, basis, 6, positions="last")):
        edited, _ = _block_outputs(model, layer, ids, mask)
        # Without a mask the last position counts as the last real token.
        plain, _ = _block_outputs(model, layer, IDS)
    for r, n in enumerate(lengths):
        others = [t for t in range(7) if t != n - 1]
        assert torch.equal(edited[r, others], original[r, others])  # padding included: untouched
        expected = _removed(original[r, n - 1], basis, list(range(6)))
        assert torch.allclose(edited[r, n - 1].double(), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(edited[r, n - 1], original[r, n - 1], atol=1e-3)
    unmasked, _ = _block_outputs(model, layer, IDS)
    assert torch.equal(plain[:, :-1], unmasked[:, :-1])
    assert torch.allclose(plain[:, -1].double(), _removed(unmasked[:, -1], basis, list(range(6))), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-falcon"])
def test_removing_every_direction_leaves_the_mean(name):
    model, _ = tiny(name)
    basis = _basis(model, 2)  # 192 tokens, width 64: all 64 directions
    d = architecture(model).hidden_size
    assert basis.k == d
    original, _ = _block_outputs(model, 2, IDS)
    with intervene(model, PCRemoval(2, basis, d)):
        edited, _ = _block_outputs(model, 2, IDS)
    mu = torch.as_tensor(basis.mean, dtype=torch.float32).expand_as(edited)
    assert torch.allclose(edited, mu, atol=1e-4, rtol=0)
    assert not torch.allclose(original, mu, atol=1e-1)


def _sequences(n=7):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(4, 260, (length,), generator=g).tolist()
        out.append(ScoredSequence(tuple(ids), (False,) + (True,) * (length - 1)))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bloom"])
def test_evaluator_prefix_reuse_equals_full_forward(name):
    model, _ = tiny(name)
    L = architecture(model).num_layers
    ev = Evaluator(model, _sequences(), pad_id=0, max_tokens=64)
    assert len(ev.batches) > 1
    baseline, cache = ev.capture(range(L))
    for layer in (1, L - 1):
        basis = _basis(model, layer)
        for positions in ("all", "last"):
            iv = PCRemoval(layer, basis, 3, positions=positions)
            assert iv.first_block(model) == layer
            full = ev.score([iv])
            before = ev.block_forwards
            reused = ev.score([iv], reuse=cache)
            assert ev.block_forwards - before == (L - layer) * len(ev.batches)  # it did start at `layer`
            assert np.allclose(reused.logprob, full.logprob, atol=1e-6, rtol=0)
            if positions == "all":
                assert not np.allclose(full.logprob, baseline.logprob, atol=1e-4)
    assert PCRemoval(-1, _basis(model, L - 1), 2).first_block(model) == L - 1


class _Spy(Intervention):
    """Records the output of a block while applied (registered after PCRemoval: sees the edit)."""

    def __init__(self, layer, seen):
        self.layer, self.seen = layer, seen

    def apply(self, model):
        handle = architecture(model).block(self.layer).register_forward_hook(
            lambda _m, _a, out: self.seen.append(out[0] if isinstance(out, tuple) else out.clone()))
        return handle.remove

    def first_block(self, model):
        return self.layer


def test_generate_with_nothing_equals_generate():
    for name in ("tiny-llama", "tiny-gpt2", "tiny-falcon"):
        model, tok = tiny(name)
        prompts = ["Once upon a time", "The answer is", ""]
        assert generate_with(model, tok, prompts, max_new_tokens=10) == generate(model, tok, prompts, max_new_tokens=10)
        assert generate_with(model, tok, ["Hi"], max_new_tokens=6, chat=True) == generate(
            model, tok, ["Hi"], max_new_tokens=6, chat=True)


def test_generate_with_scope_prompt_edits_only_the_prefill():
    model, tok = tiny("tiny-llama")
    layer, n_new = 2, 6
    basis = _basis(model, layer)
    prompt = "Once upon a time"
    n_prompt = len(tok(prompt).input_ids)
    raw = []  # every call of the block, before the edit
    handle = architecture(model).block(layer).register_forward_hook(
        lambda _m, _a, out: raw.append(out[0] if isinstance(out, tuple) else out.clone()))
    try:
        results = {}
        for scope in ("prompt", "all"):
            raw.clear()
            seen: list[torch.Tensor] = []
            iv = PCRemoval(layer, basis, 8, positions="last")
            results[scope] = generate_with(model, tok, [prompt], [iv, _Spy(layer, seen)], max_new_tokens=n_new, scope=scope)
            # One prefill call, then one call per decoding step (fewer than n_new - 1 only after EOS).
            assert raw[0].shape[1] == n_prompt and 3 <= len(raw) <= n_new
            assert all(h.shape[1] == 1 for h in raw[1:])
            edited_calls = sum(not torch.equal(s, r) for s, r in zip(seen, raw))
            if scope == "prompt":
                assert len(seen) == 1 and edited_calls == 1  # the prefill only ...
                assert torch.equal(seen[0][:, :-1], raw[0][:, :-1])  # ... at its last position only
            else:
                assert len(seen) == len(raw) and edited_calls == len(raw)  # every decoding step too
    finally:
        handle.remove()

    # Independent reference for scope="prompt": full recomputation each step (no cache) with the
    # last prompt position edited by hand; the generated text must match.
    def edit_last_prompt_position(_m, _a, out):
        h = out.clone()
        h[:, n_prompt - 1] = _removed(out[:, n_prompt - 1], basis, list(range(8))).to(out.dtype)
        return h

    ids = tok(prompt, return_tensors="pt").input_ids
    handle = architecture(model).block(layer).register_forward_hook(edit_last_prompt_position)
    try:
        with torch.no_grad():
            for _ in range(n_new):
                ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    finally:
        handle.remove()
    assert results["prompt"] == [tok.decode(ids[0, n_prompt:], skip_special_tokens=True)]
    assert results["prompt"] != generate_with(model, tok, [prompt], max_new_tokens=n_new)  # the edit mattered


def test_generate_with_scope_all_equals_an_edited_argmax_loop():
    model, tok = tiny("tiny-gpt-neox")
    basis = _basis(model, 2)
    iv = PCRemoval(2, basis, 10)
    prompt = "Once upon"
    text = generate_with(model, tok, [prompt], [iv], max_new_tokens=6, scope="all")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), intervene(model, iv):
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    assert text == [tok.decode(ids[0, len(tok(prompt).input_ids):], skip_special_tokens=True)]


def test_describe_is_plain_data():
    model, _ = tiny("tiny-llama")
    basis = _basis(model, 1, k=8)
    d = PCRemoval(1, basis, np.array([4, 1]), positions="last").describe()
    assert d == {"kind": "PCRemoval", "layer": 1, "components": [1, 4], "positions": "last", "basis_width": 64}
    json.dumps(d)
    assert PCRemoval(1, (basis.mean, torch.as_tensor(basis.components)), 2).describe()["components"] == [0, 1]


def test_bad_inputs_are_refused():
    model, tok = tiny("tiny-llama")
    basis = _basis(model, 1, k=8)
    # transformers may keep hooks of its own (output_hidden_states recorders) on a shared model
    hooks = _hook_counts(model)
    with pytest.raises(LayerscopeError, match=r"width 32 .*hidden size is 64"):
        with intervene(model, PCRemoval(1, (np.zeros(32), np.eye(32)[:2]), 1)):
            pass
    with pytest.raises(LayerscopeError, match=r"width 32 .*hidden size is 64"):
        PCRemoval(1, (np.zeros(32), np.eye(32)[:2]), 1).first_block(model)
    with pytest.raises(LayerscopeError, match=r"component index 8 is out of range.*allowed 0\.\.7"):
        PCRemoval(1, basis, [0, 8])
    with pytest.raises(LayerscopeError, match=r"components=9 is out of range.*0\.\.8"):
        PCRemoval(1, basis, 9)
    with pytest.raises(LayerscopeError, match=r"components=-1 is out of range"):
        PCRemoval(1, basis, -1)
    with pytest.raises(LayerscopeError, match=r"component index -1 is out of range"):
        PCRemoval(1, basis, [-1])
    with pytest.raises(LayerscopeError, match=r"component index 'a' is not an integer"):
        PCRemoval(1, basis, ["a"])
    with pytest.raises(LayerscopeError, match=r"unknown positions 'first'; allowed: all, last"):
        PCRemoval(1, basis, 1, positions="first")
    with pytest.raises(LayerscopeError, match=r"layer 4 is out of range.*allowed 0\.\.3"):
        PCRemoval(4, basis, 1).first_block(model)
    with pytest.raises(LayerscopeError, match=r"layer -5 is out of range"):
        with intervene(model, PCRemoval(-5, basis, 1)):
            pass
    with pytest.raises(LayerscopeError, match=r"layer '1' is not an integer"):
        PCRemoval("1", basis, 1)
    with pytest.raises(LayerscopeError, match=r"not orthonormal"):
        PCRemoval(1, (np.zeros(64), 2 * np.eye(64)[:2]), 1)
    with pytest.raises(LayerscopeError, match=r"basis of type str"):
        PCRemoval(1, "pca.npz", 1)
    with pytest.raises(LayerscopeError, match=r"basis directions have width 63"):
        PCRemoval(1, (np.zeros(64), np.eye(63)[:2]), 1)
    with pytest.raises(LayerscopeError, match=r"unknown scope 'decode'; allowed: prompt, all"):
        generate_with(model, tok, ["Hi"], scope="decode")
    with pytest.raises(LayerscopeError, match=r"max_new_tokens 0 must be"):
        generate_with(model, tok, ["Hi"], max_new_tokens=0)
    with pytest.raises(LayerscopeError, match=r"no prompt given"):
        generate_with(model, tok, [])
    with pytest.raises(LayerscopeError, match=r"is not an intervention"):
        generate_with(model, tok, ["Hi"], [basis])
    assert _hook_counts(model) == hooks  # a refused intervention leaves no hook behind
