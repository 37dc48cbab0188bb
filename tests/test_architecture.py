"""The architecture adapter and the tiny models, checked family by family against the models themselves.

Expected shapes come from each config, not from the adapter; q/k/v and gate/up row sets are checked
against what the model itself computes (its own split of a fused matrix, the input of ``o`` and
``down``, its attention probabilities).
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN, get_activation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bloom.modeling_bloom import BloomAttention
from transformers.models.falcon.modeling_falcon import FalconAttention
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention
from transformers.pytorch_utils import Conv1D

from layerscope.errors import LayerscopeError
from layerscope.models.architecture import ROLES, SUPPORTED_FAMILIES, Architecture, architecture
from layerscope.models.tiny import TINY_MODELS, build_tiny_model, tiny_config
from layerscope.models.tiny_tokenizer import TINY_VOCAB_SIZE

FALCON_VARIANTS = {
    "tiny-falcon-new": {"new_decoder_architecture": True, "num_kv_heads": 2},  # 40B/180B layout, grouped kv
    "tiny-falcon-new-1ln": {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
    "tiny-falcon-classic": {"multi_query": False, "parallel_attn": False},  # per-head interleaved, sequential
    "tiny-falcon-alibi": {"alibi": True},
}
CASES = {name: (name, {}) for name in TINY_MODELS} | {k: ("tiny-falcon", v) for k, v in FALCON_VARIANTS.items()}

GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
FUSED_QKV = {"phi3", "gpt2", "gpt_neox", "bloom", "falcon"}
ALIBI = {"tiny-bloom", "tiny-falcon-alibi"}
FUSED_CASES = [c for c, (name, _) in CASES.items() if TINY_MODELS[name] in FUSED_QKV]


def build(case: str, **kwargs):
    name, overrides = CASES[case]
    model, _ = build_tiny_model(name, **overrides, **kwargs)
    return model


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB_SIZE, (batch, length), generator=g)


def expected_shapes(family: str, c) -> dict[str, tuple[int, int]]:
    """(out, in) of every role, from the config alone."""
    hid, heads = c.hidden_size, c.num_attention_heads
    if family in GATED:
        kv, d = c.num_key_value_heads, (getattr(c, "head_dim", None) or hid // heads)
        mlp = c.intermediate_size
    else:
        d = hid // heads
        if family == "falcon":
            kv = c.num_kv_heads if c.new_decoder_architecture else (1 if c.multi_query else heads)
        else:
            kv = heads
        mlp_attr = {"gpt2": "n_inner", "gptj": "n_inner", "opt": "ffn_dim", "falcon": "ffn_hidden_size"}
        mlp = 4 * hid if family == "bloom" else getattr(c, mlp_attr.get(family, "intermediate_size"))
    shapes = {
        "q": (heads * d, hid),
        "k": (kv * d, hid),
        "v": (kv * d, hid),
        "o": (hid, heads * d),
        "gate": (mlp, hid),
        "up": (mlp, hid),
        "down": (hid, mlp),
        "qkv": ((heads + 2 * kv) * d, hid),
        "gate_up": (2 * mlp, hid),
    }
    roles = [r for r in ROLES if r != "gate" or family in GATED]
    roles += ["qkv"] * (family in FUSED_QKV) + ["gate_up"] * (family == "phi3")
    return {r: shapes[r] for r in roles}


def mlp_activation(family: str, c):
    if family in ("gemma2", "gemma3_text"):
        return ACT2FN[c.hidden_activation]
    if family in GATED or family == "gpt_neox":
        return ACT2FN[c.hidden_act]
    if family == "bloom":
        return ACT2FN["gelu_pytorch_tanh"]  # BloomGelu is the tanh approximation
    if family == "falcon":
        return get_activation(c.activation)
    return ACT2FN[c.activation_function]


def linear(arch: Architecture, role: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b with the adapter's (out, in) view of the role."""
    y = x @ arch.read_weight(role, layer).T
    b = arch.read_bias(role, layer)
    return y if b is None else y + b


def capture_input(module: nn.Module, store: list):
    def hook(module, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def zero_role(arch: Architecture, role: str, layer: int, rows: slice = slice(None)) -> None:
    W = arch.read_weight(role, layer)
    W[rows] = 0
    arch.write_weight(role, layer, W)
    b = arch.read_bias(role, layer)
    if b is not None:
        b[rows] = 0
        arch.write_bias(role, layer, b)


# ---------------------------------------------------------------------------------------------
# tiny models


def test_tiny_registry_covers_every_family_once():
    assert sorted(TINY_MODELS.values()) == sorted(set(TINY_MODELS.values()))
    assert set(TINY_MODELS.values()) <= set(SUPPORTED_FAMILIES)
    assert set(SUPPORTED_FAMILIES) - set(TINY_MODELS.values()) == {"gemma3"}  # the multimodal wrapper


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_config(name):
    c = tiny_config(name)
    assert c.model_type == TINY_MODELS[name]
    assert (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (TINY_VOCAB_SIZE, 0, 1, 2)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (4, 64, 4)
    if c.model_type in GATED:
        assert c.num_key_value_heads == 2
    if c.model_type != "bloom":  # alibi: no position limit
        assert c.max_position_embeddings >= 512
    mlp = expected_shapes(c.model_type, c)["up"][0]
    assert mlp == (256 if c.model_type == "bloom" else 128)


def test_tiny_quirks():
    neo = tiny_config("tiny-gpt-neo")
    assert neo.attention_layers == ["global", "local", "global", "local"] and neo.window_size == 8
    for name in ("tiny-gemma2", "tiny-gemma3"):
        c = tiny_config(name)
        assert c.layer_types == ["sliding_attention", "full_attention"] * 2 and c.sliding_window == 8
    f = tiny_config("tiny-falcon")
    assert f.multi_query and f.parallel_attn and not f.alibi and not f.new_decoder_architecture
    g3, _ = build_tiny_model("tiny-gemma3")
    assert type(g3).__name__ == "Gemma3ForCausalLM" and g3.config.model_type == "gemma3_text"
    assert tiny_config("tiny-falcon", alibi=True).alibi  # overrides reach the config


def test_tiny_model_is_deterministic_and_seeded():
    a, tok = build_tiny_model("tiny-llama", seed=3)
    b, _ = build_tiny_model("tiny-llama", seed=3)
    c, _ = build_tiny_model("tiny-llama", seed=4)
    assert not a.training and tok.pad_token_id == 0 and len(tok) == TINY_VOCAB_SIZE
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    half, _ = build_tiny_model("tiny-llama", seed=3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.lm_head.weight, a.lm_head.weight.to(torch.bfloat16))


def test_tiny_attn_implementation():
    assert build_tiny_model("tiny-llama")[0].config._attn_implementation == "sdpa"
    assert build_tiny_model("tiny-llama", attn_implementation="eager")[0].config._attn_implementation == "eager"
    assert build_tiny_model("tiny-bloom")[0].config._attn_implementation == "eager"  # no sdpa path
    with pytest.raises(LayerscopeError, match="flash"):
        build_tiny_model("tiny-llama", attn_implementation="flash")


def test_tiny_unknown_name():
    with pytest.raises(LayerscopeError) as err:
        build_tiny_model("tiny-mamba")
    assert "tiny-mamba" in str(err.value) and "tiny-llama" in str(err.value) and "tiny-falcon" in str(err.value)


# ---------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("case", list(CASES))
def test_structure(case):
    model = build(case)
    arch = architecture(model)
    c = model.config
    assert arch.family == c.model_type and arch.num_layers == c.num_hidden_layers == 4
    assert arch.hidden_size == c.hidden_size
    blocks = arch.blocks()
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 4
    assert all(arch.block(i) is blocks[i] for i in range(4))
    parent, attr = arch.block_container()
    assert getattr(parent, attr) is blocks
    # swapping the list is seen at once (no stale references in the adapter)
    setattr(parent, attr, nn.ModuleList(list(blocks)[:2]))
    try:
        assert len(arch.blocks()) == 2 and arch.block(1) is blocks[1]
    finally:
        setattr(parent, attr, blocks)

    embs = arch.embeddings()
    assert embs[0] is model.get_input_embeddings()
    if c.model_type in ("gpt2", "gpt_neo", "opt"):
        assert len(embs) == 2 and isinstance(embs[1], nn.Embedding) and embs[1].num_embeddings >= 512
    else:
        assert len(embs) == 1
    assert (arch.embedding_norm() is not None) == (c.model_type == "bloom")
    assert arch.lm_head() is model.get_output_embeddings()

    # the final norm and lm_head turn the last block's output into the logits
    last = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(ids(), use_cache=False).logits
        handle.remove()
        x = last[0]
        for module in arch.unembed():
            x = module(x)
        cap = getattr(c, "final_logit_softcapping", None)
        if cap:
            x = torch.tanh(x / cap) * cap
    assert arch.unembed()[-1] is arch.lm_head() and arch.unembed()[0] is arch.final_norm()
    torch.testing.assert_close(x, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_norms(case):
    model = build(case)
    arch = architecture(model)
    family = arch.family
    norms = arch.norms(2)
    expected = {"attn_norm", "mlp_norm"}
    if family in ("gptj",) or case in ("tiny-falcon", "tiny-falcon-alibi", "tiny-falcon-new-1ln"):
        expected = {"attn_norm"}  # parallel block, one shared norm
    if family in ("gemma2", "gemma3_text"):
        expected |= {"post_attn_norm", "post_mlp_norm"}
    if family in ("qwen3", "gemma3_text"):
        expected |= {"q_norm", "k_norm"}
    assert set(norms) == expected
    block_modules = set(arch.block(2).modules())
    assert all(m in block_modules for m in norms.values())
    assert len({id(m) for m in norms.values()}) == len(norms)
    # each norm sits where its name says: give every norm distinct weights, then follow the data
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in norms.values():
            m.weight.copy_(m.weight + 0.5 * torch.randn(m.weight.shape, generator=g))
    inputs, outputs, handles = {}, {}, []

    def record(name, module):
        def hook(m, args, out):
            inputs.setdefault(name, args[0])
            outputs.setdefault(name, out)

        handles.append(module.register_forward_hook(hook))

    for name, module in norms.items():
        record(name, module)
    for role in ("q", "up", "o", "down"):
        record(role, arch.role_module(role, 2))
    with torch.no_grad():
        model(ids(), use_cache=False)
    for h in handles:
        h.remove()
    q_out = outputs["q"]
    if arch.is_fused("q"):
        q_out = linear(arch, "q", 2, inputs["q"])
    torch.testing.assert_close(inputs["q"], outputs["attn_norm"])
    torch.testing.assert_close(inputs["up"], outputs["mlp_norm" if "mlp_norm" in norms else "attn_norm"])
    if "post_attn_norm" in norms:
        torch.testing.assert_close(inputs["post_attn_norm"], outputs["o"])
        torch.testing.assert_close(inputs["post_mlp_norm"], outputs["down"])
    if "q_norm" in norms:
        per_head = q_out.view(*q_out.shape[:2], -1, arch.head_dim)  # (batch, seq, heads, head_dim)
        seen = inputs["q_norm"]
        if seen.shape != per_head.shape:  # applied after the transpose to (batch, heads, seq, head_dim)
            seen = seen.transpose(1, 2)
        torch.testing.assert_close(seen, per_head)


# ---------------------------------------------------------------------------------------------
# roles


@pytest.mark.parametrize("case", list(CASES))
def test_roles_resolve_with_expected_shapes(case):
    model = build(case)
    arch = architecture(model)
    shapes = expected_shapes(arch.family, model.config)
    assert arch.roles() == tuple(shapes)
    all_modules = set(model.modules())
    owners = {}
    for role, shape in shapes.items():
        for layer in range(arch.num_layers):
            module = arch.role_module(role, layer)
            assert module in all_modules and module in set(arch.block(layer).modules())
            assert isinstance(module, (nn.Linear, Conv1D))
            assert arch.role_shape(role, layer) == shape
            W = arch.read_weight(role, layer)
            assert W.shape == shape and W.dtype == torch.float32 and W.is_contiguous()
            b = arch.read_bias(role, layer)
            assert b is None or b.shape == (shape[0],)
        owners.setdefault(arch.owner_role(role), set()).add(role)
        assert arch.is_fused(role) == (arch.owner_role(role) != role)
    # distinct roles that own a module own distinct modules
    assert len({id(arch.role_module(r, 0)) for r in owners}) == len(owners)
    # a read is a copy
    W = arch.read_weight("q", 0)
    W += 1
    assert not torch.equal(arch.read_weight("q", 0), W)


@pytest.mark.parametrize("case", list(CASES))
def test_read_then_write_is_bit_exact(case):
    model = build(case)
    arch = architecture(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for role in arch.roles():
        for layer in range(arch.num_layers):
            arch.write_weight(role, layer, arch.read_weight(role, layer))
            b = arch.read_bias(role, layer)
            if b is not None:
                arch.write_bias(role, layer, b)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and what is written is what is read back
    g = torch.Generator().manual_seed(0)
    for role in arch.roles():
        W = torch.randn(arch.role_shape(role, 1), generator=g)
        arch.write_weight(role, 1, W)
        assert torch.equal(arch.read_weight(role, 1), W)


def test_write_casts_to_the_parameter_dtype():
    model, _ = build_tiny_model("tiny-gpt2", dtype=torch.bfloat16)
    arch = architecture(model)
    W = torch.randn(arch.role_shape("k", 0), dtype=torch.float64)
    arch.write_weight("k", 0, W)
    assert arch.role_module("k", 0).weight.dtype == torch.bfloat16
    assert torch.equal(arch.read_weight("k", 0), W.to(torch.bfloat16))


@pytest.mark.parametrize("case", list(CASES))
def test_written_matrix_acts_as_x_wT_plus_b(case):
    """For Linear and Conv1D alike, an (out, in) matrix W written to a role makes its module compute x W^T + b."""
    model = build(case)
    arch = architecture(model)
    g = torch.Generator().manual_seed(0)
    for role in arch.roles():
        if arch.is_fused(role):
            continue
        module = arch.role_module(role, 1)
        out_f, in_f = arch.role_shape(role, 1)
        W = torch.randn(out_f, in_f, generator=g)
        arch.write_weight(role, 1, W)
        expected_bias = torch.zeros(out_f)
        if arch.read_bias(role, 1) is not None:
            expected_bias = torch.randn(out_f, generator=g)
            arch.write_bias(role, 1, expected_bias)
        x = torch.randn(3, 5, in_f, generator=g)
        with torch.no_grad():
            y = module(x)
        torch.testing.assert_close(y, x @ W.T + expected_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_writing_a_fused_role_changes_only_its_rows(case):
    model = build(case)
    arch = architecture(model)
    g = torch.Generator().manual_seed(0)
    fused_roles = [r for r in arch.roles() if arch.is_fused(r)]
    assert set(fused_roles) >= {"q", "k", "v"}
    for role in fused_roles:
        owner = arch.owner_role(role)
        siblings = [r for r in fused_roles if arch.owner_role(r) == owner and r != role]
        before = {r: arch.read_weight(r, 2) for r in siblings}
        full = arch.read_weight(owner, 2)
        W = torch.randn(arch.role_shape(role, 2), generator=g)
        arch.write_weight(role, 2, W)
        assert torch.equal(arch.read_weight(role, 2), W)
        assert all(torch.equal(arch.read_weight(r, 2), before[r]) for r in siblings)
        changed_rows = (arch.read_weight(owner, 2) != full).any(dim=1)
        assert int(changed_rows.sum()) == W.shape[0]
        # the parts tile the fused matrix
        assert sum(arch.role_shape(r, 2)[0] for r in [role, *siblings]) == arch.role_shape(owner, 2)[0]
        bias = arch.read_bias(owner, 2)
        if bias is not None:
            b = torch.randn(W.shape[0], generator=g)
            arch.write_bias(role, 2, b)
            assert torch.equal(arch.read_bias(role, 2), b)
            assert int((arch.read_bias(owner, 2) != bias).sum()) == W.shape[0]


# ---------------------------------------------------------------------------------------------
# functional checks of the row sets, against the model's own computation


def _captured_qkv(model, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """q, k, v of every attention call as the model itself produces them, each (batch, seq, heads, head_dim)."""
    calls: list[dict[str, torch.Tensor]] = []
    family = model.config.model_type

    def keep(q, k, v, heads_first: bool):
        if heads_first:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        calls.append({"q": q, "k": k, "v": v})

    if family == "bloom":
        original_reshape = BloomAttention._reshape

        def reshape(self, fused):
            q, k, v = original_reshape(self, fused)
            keep(q, k, v, heads_first=True)
            return q, k, v

        monkeypatch.setattr(BloomAttention, "_reshape", reshape)
    elif family == "falcon":
        original_split = FalconAttention._split_heads

        def split(self, fused):
            q, k, v = original_split(self, fused)
            if self.new_decoder_architecture:  # k/v were broadcast to every q head of their group
                group = self.num_heads // self.num_kv_heads
                keep(q, k[:, :, ::group], v[:, :, ::group], heads_first=False)
            else:
                keep(q, k, v, heads_first=False)
            return q, k, v

        monkeypatch.setattr(FalconAttention, "_split_heads", split)
    elif family == "gpt_neo":
        original_attn = GPTNeoSelfAttention._attn

        def attn(self, query, key, value, attention_mask=None):
            keep(query, key, value, heads_first=True)
            return original_attn(self, query, key, value, attention_mask)

        monkeypatch.setattr(GPTNeoSelfAttention, "_attn", attn)
    else:  # everything that goes through transformers' attention interface
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def attend(module, query, key, value, *args, **kwargs):
            keep(query, key, value, heads_first=True)
            kwargs.pop("softcap", None)  # Gemma 2: later layers only need *some* attention output
            return sdpa(module, query, key, value, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", attend)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "eager", attend)  # (Gemma 2 runs eager)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_qkv_rows_match_what_the_model_computes(case, monkeypatch):
    """x W^T + b with the adapter's q/k/v equals the model's own q/k/v (its split of a fused matrix, its
    q/k norms; at position 0, where rotary embeddings are the identity)."""
    model = build(case)
    arch = architecture(model)
    calls = _captured_qkv(model, monkeypatch)
    layer = 1
    inputs: list = []
    handle = capture_input(arch.role_module("q", layer), inputs)
    with torch.no_grad():
        model(ids(), use_cache=False)
    handle.remove()
    assert len(calls) == arch.num_layers
    x, norms = inputs[0], arch.norms(layer)
    with torch.no_grad():
        for role in ("q", "k", "v"):
            mine = linear(arch, role, layer, x).view(*x.shape[:2], -1, arch.head_dim)
            if role != "v" and f"{role}_norm" in norms:
                mine = norms[f"{role}_norm"](mine)
            if role == "q" and arch.family == "opt":
                mine = mine * arch.head_dim**-0.5  # OPT scales q before attention
            theirs = calls[layer][role]
            assert mine.shape == theirs.shape, role
            positions = slice(None) if role == "v" else slice(0, 1)
            torch.testing.assert_close(mine[:, positions], theirs[:, positions], rtol=1e-4, atol=1e-5)
            if role != "v" and arch.family in ("gpt2", "opt", "gpt_neo", "bloom") or case == "tiny-falcon-alibi":
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)  # no rotation at all


@pytest.mark.parametrize("case", list(CASES))
def test_mlp_roles_compose_into_the_input_of_down(case):
    """down's input is act(gate) * up (gated) or act(up) (plain), with the adapter's gate/up rows."""
    model = build(case)
    arch = architecture(model)
    act = mlp_activation(arch.family, arch.config)
    layer = 2
    x_up, x_down = [], []
    h1 = capture_input(arch.role_module("up", layer), x_up)
    h2 = capture_input(arch.role_module("down", layer), x_down)
    with torch.no_grad():
        model(ids(), use_cache=False)
        h1.remove(), h2.remove()
        up = linear(arch, "up", layer, x_up[0])
        expected = act(linear(arch, "gate", layer, x_up[0])) * up if "gate" in arch.roles() else act(up)
    torch.testing.assert_close(x_down[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_v_zeroes_the_input_of_o(case):
    model = build(case)
    arch = architecture(model)
    layer = 1
    seen: list = []
    handle = capture_input(arch.role_module("o", layer), seen)
    with torch.no_grad():
        model(ids(), use_cache=False)
        assert seen[-1].abs().max() > 0
        zero_role(arch, "v", layer)
        model(ids(), use_cache=False)
    handle.remove()
    assert torch.all(seen[-1] == 0)
    # zeroing k instead does not (so the test tells v from k)
    model = build(case)
    arch = architecture(model)
    seen.clear()
    handle = capture_input(arch.role_module("o", layer), seen)
    zero_role(arch, "k", layer)
    with torch.no_grad():
        model(ids(), use_cache=False)
    handle.remove()
    assert seen[-1].abs().max() > 0


def _uniform_over_allowed(probs: torch.Tensor) -> torch.Tensor:
    allowed = (probs > 0).to(probs.dtype)
    return allowed / allowed.sum(-1, keepdim=True)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ALIBI])
@pytest.mark.parametrize("layer", [0, 1])  # local/sliding and global layers where the family alternates
def test_zero_q_gives_uniform_attention(case, layer):
    model = build(case, attn_implementation="eager")
    arch = architecture(model)
    x = ids()
    with torch.no_grad():
        base = model(x, output_attentions=True, use_cache=False).attentions
        zero_role(arch, "q", layer)
        after = model(x, output_attentions=True, use_cache=False).attentions
    uniform = _uniform_over_allowed(base[layer])
    assert (base[layer] - uniform).abs().max() > 1e-5  # not uniform to start with
    torch.testing.assert_close(after[layer], uniform, rtol=0, atol=1e-6)
    for earlier in range(layer):
        assert torch.equal(after[earlier], base[earlier])


@pytest.mark.parametrize("case", [c for c in CASES if c not in ALIBI])
def test_zero_one_q_head_makes_only_that_head_uniform(case):
    """The q rows are in the model's head order (and, with grouped kv, q is not confused with k)."""
    model = build(case, attn_implementation="eager")
    arch = architecture(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) if arch.family in GATED else None
    head_dim = head_dim or c.hidden_size // c.num_attention_heads
    layer, head = 1, 1
    x = ids()
    with torch.no_grad():
        zero_role(arch, "q", layer, rows=slice(head * head_dim, (head + 1) * head_dim))
        probs = model(x, output_attentions=True, use_cache=False).attentions[layer]
    deviation = (probs - _uniform_over_allowed(probs)).abs().amax(dim=(0, 2, 3))
    assert deviation[head] < 1e-6
    assert all(deviation[h] > 1e-5 for h in range(c.num_attention_heads) if h != head)


@pytest.mark.parametrize("case", sorted(ALIBI))
def test_zero_q_makes_alibi_attention_content_free(case):
    model = build(case, attn_implementation="eager")
    arch = architecture(model)
    a, b = ids(seed=1), ids(seed=2)
    with torch.no_grad():
        pa, pb = (model(t, output_attentions=True, use_cache=False).attentions[1] for t in (a, b))
        assert (pa - pb).abs().max() > 1e-5
        zero_role(arch, "q", 1)
        pa, pb = (model(t, output_attentions=True, use_cache=False).attentions[1] for t in (a, b))
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gemma 3 as the multimodal wrapper (model_type "gemma3")


def test_gemma3_multimodal_wrapper():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = tiny_config("tiny-gemma3").to_dict()
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    arch = architecture(model)
    assert arch.family == "gemma3" and arch.num_layers == 4 and arch.hidden_size == 64
    assert arch.embeddings()[0] is model.get_input_embeddings() and arch.lm_head() is model.get_output_embeddings()
    assert tuple(expected_shapes("gemma3_text", config.text_config)) == arch.roles()
    assert {r: arch.role_shape(r, 0) for r in arch.roles()} == expected_shapes("gemma3_text", config.text_config)
    seen: list = []
    handle = capture_input(arch.role_module("o", 3), seen)
    zero_role(arch, "v", 3)
    with torch.no_grad():
        model(input_ids=ids())
    handle.remove()
    assert torch.all(seen[-1] == 0)


# ---------------------------------------------------------------------------------------------
# errors and caching


def test_unsupported_family():
    fake = nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(LayerscopeError) as err:
        architecture(fake)
    message = str(err.value)
    assert "mamba" in message and all(f in message for f in ("llama", "gpt2", "falcon", "gemma3_text"))
    with pytest.raises(LayerscopeError, match="None"):
        architecture(nn.Linear(2, 2))


def test_bad_role_layer_and_shape():
    arch = architecture(build_tiny_model("tiny-gpt2")[0])
    with pytest.raises(LayerscopeError) as err:
        arch.read_weight("gate", 0)
    assert "'gate'" in str(err.value) and "q, k, v, o, up, down, qkv" in str(err.value)
    with pytest.raises(LayerscopeError, match="'nope'"):
        arch.role_module("nope", 0)
    for bad in (4, -1):
        with pytest.raises(LayerscopeError, match=r"0\.\.3"):
            arch.read_weight("q", bad)
    with pytest.raises(LayerscopeError, match=r"0\.\.3"):
        arch.norms(7)
    with pytest.raises(LayerscopeError, match=r"\(64, 64\).*\(64, 32\)"):
        arch.write_weight("q", 0, torch.zeros(64, 32))
    with pytest.raises(LayerscopeError, match=r"\(64,\).*\(3,\)"):
        arch.write_bias("q", 0, torch.zeros(3))
    assert arch.read_weight("q", torch.tensor(2)).shape == (64, 64)  # integer-like layers are fine
    with pytest.raises(LayerscopeError, match="True"):
        arch.read_weight("q", True)

    llama = architecture(build_tiny_model("tiny-llama")[0])
    with pytest.raises(LayerscopeError, match="qkv"):
        llama.read_weight("qkv", 0)
    assert llama.read_bias("q", 0) is None
    with pytest.raises(LayerscopeError, match="no bias"):
        llama.write_bias("q", 0, torch.zeros(64))


def test_architecture_is_cached_without_a_reference_cycle():
    model, _ = build_tiny_model("tiny-opt")
    arch = architecture(model)
    assert architecture(model) is arch and arch.model is model
    other, _ = build_tiny_model("tiny-opt")
    assert architecture(other) is not arch and architecture(other).model is other
    ref = weakref.ref(model)
    del arch
    gc.disable()
    try:
        del model  # freed by reference counting alone: the model does not point back at its adapter
        assert ref() is None
    finally:
        gc.enable()
