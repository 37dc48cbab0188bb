"""One adapter over the decoder families layerscope supports.

This is the only module that spells the module paths of a particular family. Everything above the
``models`` layer reaches blocks, embeddings, norms and weight matrices through ``architecture(model)``:

    arch = architecture(model)
    W = arch.read_weight("q", 3)          # (out_features, in_features), whatever the storage
    arch.write_weight("q", 3, W * 0.5)    # in place, same dtype and device as the parameter

Weight matrices are addressed by *role* (``ROLES``: q k v o gate up down). A role is always read
and written as an ``(out_features, in_features)`` matrix: GPT-2's ``Conv1D`` (stored ``(in, out)``)
is transposed for you, and a role that lives inside a fused matrix (GPT-2 ``c_attn``, GPT-NeoX and
BLOOM ``query_key_value`` which interleave q/k/v per head, Falcon's ``query_key_value`` in all three
of its layouts, Phi-3 ``qkv_proj`` and ``gate_up_proj``) is exactly its own rows, in the model's
order. Fused families also expose the whole fused matrix as role ``"qkv"`` (and ``"gate_up"``).
Non-gated MLPs have ``up`` (the first MLP matrix) and ``down`` (the second) but no ``gate``.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from layerscope.errors import LayerscopeError, allowed, check_layer

#: The roles a weight matrix can play, in canonical order.
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
#: Roles that name a whole fused matrix (present only in families that fuse).
FUSED_ROLES: tuple[str, ...] = ("qkv", "gate_up")

# A row layout: given the architecture and the number of rows of a fused matrix, the rows of each
# part, in the order the model itself reads them.
Layout = Callable[["Architecture", int], dict[str, list[int]]]


# ----------------------------------------------------------------------------------------------
# Row layouts of fused matrices (checked against transformers' modeling code, 5.x)


def _contiguous(parts: list[tuple[str, int]]) -> dict[str, list[int]]:
    out, start = {}, 0
    for role, n in parts:
        out[role] = list(range(start, start + n))
        start += n
    return out


def _qkv_concatenated(arch: Architecture, rows: int) -> dict[str, list[int]]:
    """``[q | k | v]`` (GPT-2 ``c_attn`` split along its output; Phi-3 ``qkv_proj``)."""
    d = arch.head_dim
    return _contiguous([("q", arch.num_heads * d), ("k", arch.num_kv_heads * d), ("v", arch.num_kv_heads * d)])


def _qkv_per_head(arch: Architecture, rows: int) -> dict[str, list[int]]:
    """``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``: per head, ``view(..., heads, 3, head_dim)`` (GPT-NeoX, BLOOM)."""
    d, out = arch.head_dim, {"q": [], "k": [], "v": []}
    for h in range(arch.num_heads):
        for j, role in enumerate(("q", "k", "v")):
            start = (3 * h + j) * d
            out[role].extend(range(start, start + d))
    return out


def _qkv_falcon(arch: Architecture, rows: int) -> dict[str, list[int]]:
    """Falcon's three layouts, as its ``FalconAttention._split_heads`` reads them."""
    config, d = arch.config, arch.head_dim
    if config.new_decoder_architecture:
        # view(..., kv_heads, heads // kv_heads + 2, head_dim): per kv group its q heads, one k, one v
        group = arch.num_heads // arch.num_kv_heads
        out = {"q": [], "k": [], "v": []}
        for g in range(arch.num_kv_heads):
            base = g * (group + 2) * d
            out["q"].extend(range(base, base + group * d))
            out["k"].extend(range(base + group * d, base + (group + 1) * d))
            out["v"].extend(range(base + (group + 1) * d, base + (group + 2) * d))
        return out
    if config.multi_query:
        # view(..., heads + 2, head_dim): all q heads, then the one k and the one v
        return _contiguous([("q", arch.num_heads * d), ("k", d), ("v", d)])
    return _qkv_per_head(arch, rows)


def _gate_up_halves(arch: Architecture, rows: int) -> dict[str, list[int]]:
    """``[gate | up]``: Phi-3 ``gate_up_proj(x).chunk(2, dim=-1)`` gives gate first."""
    return _contiguous([("gate", rows // 2), ("up", rows // 2)])


# ----------------------------------------------------------------------------------------------
# Attention shape per family: (heads, kv_heads, head_dim) from the (text) config


def _heads_standard(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _heads_no_gqa(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    return heads, heads, config.hidden_size // heads


def _heads_falcon(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        kv = config.num_kv_heads
    elif config.multi_query:
        kv = 1
    else:
        kv = heads
    return heads, kv, config.hidden_size // heads


# ----------------------------------------------------------------------------------------------
# Family specs


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps things. Paths are dotted attribute paths; block paths start at a block."""

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str
    modules: Mapping[str, str]  # role -> path inside a block, for roles that own a module
    norms: Mapping[str, tuple[str, ...]]  # neutral name -> candidate paths inside a block (first present wins)
    parts: Mapping[str, str] = field(default_factory=dict)  # role -> fused role whose rows it is
    layouts: Mapping[str, Layout] = field(default_factory=dict)  # fused role -> row layout
    heads: Callable[[object], tuple[int, int, int]] = _heads_standard
    embedding_norm: str | None = None
    head_extras: tuple[str, ...] = ()  # modules between the final norm and lm_head, when present


def _llama_like(prefix: str = "model", extra_norms: Mapping[str, tuple[str, ...]] | None = None) -> FamilySpec:
    return FamilySpec(
        blocks=f"{prefix}.layers",
        embeddings=(f"{prefix}.embed_tokens",),
        final_norm=f"{prefix}.norm",
        lm_head="lm_head",
        modules={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        },
        norms={"attn_norm": ("input_layernorm",), "mlp_norm": ("post_attention_layernorm",), **(extra_norms or {})},
    )


_QK_NORMS = {"q_norm": ("self_attn.q_norm",), "k_norm": ("self_attn.k_norm",)}
# Gemma 2/3 sandwich norms: post_attention_layernorm is applied to the attention *output*.
_GEMMA2_NORMS = {
    "attn_norm": ("input_layernorm",),
    "post_attn_norm": ("post_attention_layernorm",),
    "mlp_norm": ("pre_feedforward_layernorm",),
    "post_mlp_norm": ("post_feedforward_layernorm",),
}
_QKV_PARTS = {"q": "qkv", "k": "qkv", "v": "qkv"}

_SPECS: dict[str, FamilySpec] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(extra_norms=_QK_NORMS),
    "gemma": _llama_like(),
    "gemma2": _llama_like(extra_norms=_GEMMA2_NORMS),
    "gemma3_text": _llama_like(extra_norms={**_GEMMA2_NORMS, **_QK_NORMS}),
    # Gemma3ForConditionalGeneration: the text decoder sits under model.language_model
    "gemma3": _llama_like(prefix="model.language_model", extra_norms={**_GEMMA2_NORMS, **_QK_NORMS}),
    "phi3": FamilySpec(
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        modules={
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        parts={**_QKV_PARTS, "gate": "gate_up", "up": "gate_up"},
        layouts={"qkv": _qkv_concatenated, "gate_up": _gate_up_halves},
        norms={"attn_norm": ("input_layernorm",), "mlp_norm": ("post_attention_layernorm",)},
    ),
    "gpt2": FamilySpec(
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        modules={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        parts=_QKV_PARTS,
        layouts={"qkv": _qkv_concatenated},
        heads=_heads_no_gqa,
        norms={"attn_norm": ("ln_1",), "mlp_norm": ("ln_2",)},
    ),
    "gpt_neox": FamilySpec(
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        modules={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        parts=_QKV_PARTS,
        layouts={"qkv": _qkv_per_head},
        heads=_heads_no_gqa,
        norms={"attn_norm": ("input_layernorm",), "mlp_norm": ("post_attention_layernorm",)},
    ),
    "gptj": FamilySpec(
        blocks="transformer.h",
        embeddings=("transformer.wte",),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        modules={
            "q": "attn.q_proj",
            "k": "attn.k_proj",
            "v": "attn.v_proj",
            "o": "attn.out_proj",
            "up": "mlp.fc_in",
            "down": "mlp.fc_out",
        },
        heads=_heads_no_gqa,
        norms={"attn_norm": ("ln_1",)},  # parallel block: one norm feeds attention and MLP
    ),
    "gpt_neo": FamilySpec(
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        modules={
            "q": "attn.attention.q_proj",
            "k": "attn.attention.k_proj",
            "v": "attn.attention.v_proj",
            "o": "attn.attention.out_proj",
            "up": "mlp.c_fc",
            "down": "mlp.c_proj",
        },
        heads=_heads_no_gqa,
        norms={"attn_norm": ("ln_1",), "mlp_norm": ("ln_2",)},
    ),
    "opt": FamilySpec(
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",  # None in post-norm OPT (350m)
        lm_head="lm_head",
        modules={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
        heads=_heads_no_gqa,
        # pre-norm OPT: before attention / before the MLP (post-norm OPT-350m: after them)
        norms={"attn_norm": ("self_attn_layer_norm",), "mlp_norm": ("final_layer_norm",)},
        head_extras=("model.decoder.project_out",),
    ),
    "bloom": FamilySpec(
        blocks="transformer.h",
        embeddings=("transformer.word_embeddings",),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        modules={
            "qkv": "self_attention.query_key_value",
            "o": "self_attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        parts=_QKV_PARTS,
        layouts={"qkv": _qkv_per_head},
        heads=_heads_no_gqa,
        norms={"attn_norm": ("input_layernorm",), "mlp_norm": ("post_attention_layernorm",)},
        embedding_norm="transformer.word_embeddings_layernorm",
    ),
    "falcon": FamilySpec(
        blocks="transformer.h",
        embeddings=("transformer.word_embeddings",),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        modules={
            "qkv": "self_attention.query_key_value",
            "o": "self_attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        parts=_QKV_PARTS,
        layouts={"qkv": _qkv_falcon},
        heads=_heads_falcon,
        # sequential: input_layernorm + post_attention_layernorm; parallel with one norm:
        # input_layernorm only; new decoder architecture with two: ln_attn + ln_mlp
        norms={"attn_norm": ("ln_attn", "input_layernorm"), "mlp_norm": ("ln_mlp", "post_attention_layernorm")},
    ),
}

#: The ``config.model_type`` values ``architecture`` accepts.
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_SPECS)

_MISSING = object()


def _get(root: nn.Module, path: str, default=_MISSING, where: str | None = None):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            if default is not _MISSING:
                return default
            if where is not None:
                raise LayerscopeError(f"{where} ({type(root).__name__}) has no module {path!r}; was the block replaced?")
            raise LayerscopeError(
                f"{type(root).__name__} has no module {path!r}; layerscope expects a causal language model "
                "(a ...ForCausalLM) of a supported family"
            )
    return obj


# ----------------------------------------------------------------------------------------------


class Architecture:
    """The adapter for one model: blocks, embeddings, norms and weight roles by neutral names.

    Attributes: ``family`` (``config.model_type``), ``config`` (the text config), ``num_layers``,
    ``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim``, and ``model`` itself. Module
    lookups are done afresh on every call, so swapped blocks are seen at once.
    """

    def __init__(self, model: nn.Module, family: str, spec: FamilySpec):
        self.model = model
        self.family = family
        self.spec = spec
        self.config = model.config.get_text_config()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.heads(self.config)
        self.num_layers: int = len(self.blocks())
        self.hidden_size: int = int(self.config.hidden_size)
        self._layouts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        roles = [r for r in ROLES if r in spec.modules or r in spec.parts]
        roles += [r for r in FUSED_ROLES if r in spec.modules]
        self._roles = tuple(roles)

    def __repr__(self) -> str:
        return f"Architecture(family={self.family!r}, num_layers={self.num_layers}, roles={self._roles})"

    # -- structure ---------------------------------------------------------------------------

    def blocks(self) -> nn.ModuleList:
        """The list of decoder blocks, in order."""
        return _get(self.model, self.spec.blocks)

    def block(self, i: int) -> nn.Module:
        """Decoder block ``i`` (the real one, also while an intervention has swapped in a stand-in)."""
        block = self.blocks()[self._layer(i)]
        original = getattr(block, "_layerscope_original", None)
        return block if original is None else original

    def block_container(self) -> tuple[nn.Module, str]:
        """``(parent, attribute)`` holding the block list: ``setattr(parent, attribute, other)`` swaps it."""
        parent, _, name = self.spec.blocks.rpartition(".")
        return _get(self.model, parent), name

    def embeddings(self) -> list[nn.Module]:
        """Token embedding first, then the learned position embedding where the family has one."""
        return [_get(self.model, p) for p in self.spec.embeddings]

    def embedding_norm(self) -> nn.Module | None:
        """A norm applied right after the embeddings (BLOOM's ``word_embeddings_layernorm``), else None."""
        return None if self.spec.embedding_norm is None else _get(self.model, self.spec.embedding_norm, None)

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (None where the model has none, e.g. post-norm OPT)."""
        return None if self.spec.final_norm is None else _get(self.model, self.spec.final_norm, None)

    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary (may share its weight with the token embedding)."""
        return _get(self.model, self.spec.lm_head)

    def unembed(self) -> list[nn.Module]:
        """The modules that turn the last block's output into logits, in order: the final norm (if
        any), any projection in between (OPT's ``project_out``), then ``lm_head``."""
        mods = [self.final_norm()] + [_get(self.model, p, None) for p in self.spec.head_extras]
        return [m for m in mods if m is not None] + [self.lm_head()]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the base model's last hidden state (already through the final norm):
        ``lm_head``, then the final logit soft-cap where the family has one (Gemma 2/3)."""
        out = self.lm_head()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def base_model(self) -> nn.Module:
        """The model without its head: its output's ``last_hidden_state`` feeds :meth:`logits`."""
        return self.model.base_model

    def norms(self, layer: int) -> dict[str, nn.Module]:
        """The block's norms by neutral name: ``attn_norm`` (before attention), ``mlp_norm`` (before the
        MLP), and where present ``post_attn_norm``/``post_mlp_norm`` (Gemma 2/3, on the sublayer
        outputs) and ``q_norm``/``k_norm`` (Qwen 3, Gemma 3). Parallel blocks with one shared norm
        (GPT-J, Falcon-7B) have only ``attn_norm``."""
        block = self.block(layer)
        out = {}
        for name, candidates in self.spec.norms.items():
            for path in candidates:
                module = _get(block, path, None)
                if module is not None:
                    out[name] = module
                    break
        return out

    # -- roles -------------------------------------------------------------------------------

    def roles(self) -> tuple[str, ...]:
        """The roles this family has: those of ``ROLES`` it has, then any fused roles (``qkv``, ``gate_up``)."""
        return self._roles

    def is_fused(self, role: str) -> bool:
        """Whether ``role`` is a slice of rows of a bigger (fused) matrix."""
        return self._role(role) in self.spec.parts

    def owner_role(self, role: str) -> str:
        """The role whose module holds ``role``: the fused role for a part, else ``role`` itself."""
        role = self._role(role)
        return self.spec.parts.get(role, role)

    def role_module(self, role: str, layer: int) -> nn.Module:
        """The ``nn.Linear`` (or ``Conv1D``) holding ``role`` in block ``layer`` (the fused one for a part)."""
        owner = self.owner_role(role)
        return _get(self.block(layer), self.spec.modules[owner], where=f"block {layer}")

    def role_rows(self, role: str, layer: int) -> torch.Tensor | None:
        """For a part of a fused matrix, the indices of its rows (its entries in the fused module's
        output); None for a role that owns its whole module."""
        return self._resolve(role, layer)[1]

    def role_shape(self, role: str, layer: int) -> tuple[int, int]:
        """``(out_features, in_features)`` of the role's matrix."""
        module, rows = self._resolve(role, layer)
        out_features, in_features = self._module_shape(module)
        return (out_features if rows is None else len(rows), in_features)

    def read_weight(self, role: str, layer: int) -> torch.Tensor:
        """A copy of the role's weight as an ``(out_features, in_features)`` matrix."""
        module, rows = self._resolve(role, layer)
        weight = self._weight(module)
        with torch.no_grad():
            if isinstance(module, Conv1D):
                part = weight if rows is None else weight.index_select(1, rows.to(weight.device))
                part = part.t()
            else:
                part = weight if rows is None else weight.index_select(0, rows.to(weight.device))
            return part.clone(memory_format=torch.contiguous_format)

    def write_weight(self, role: str, layer: int, weight: torch.Tensor) -> None:
        """Write an ``(out_features, in_features)`` matrix into the role, in place (the inverse of
        ``read_weight``; writing back what was read is bit-exact). Values are cast to the
        parameter's dtype and device; only the role's own rows of a fused matrix change."""
        module, rows = self._resolve(role, layer)
        expected = self.role_shape(role, layer)
        weight = torch.as_tensor(weight)
        if tuple(weight.shape) != expected:
            raise LayerscopeError(
                f"weight for role {role!r} of layer {layer} must have shape {expected}, got {tuple(weight.shape)}"
            )
        param = self._weight(module)
        with torch.no_grad():
            src = weight.to(device=param.device, dtype=param.dtype)
            if isinstance(module, Conv1D):
                src = src.t()
                dim = 1
            else:
                dim = 0
            if rows is None:
                param.copy_(src)
            else:
                param.index_copy_(dim, rows.to(param.device), src)

    def read_bias(self, role: str, layer: int) -> torch.Tensor | None:
        """A copy of the role's bias (``(out_features,)``), or None if the module has no bias."""
        module, rows = self._resolve(role, layer)
        bias = getattr(module, "bias", None)
        if bias is None:
            return None
        with torch.no_grad():
            part = bias if rows is None else bias.index_select(0, rows.to(bias.device))
            return part.clone()

    def write_bias(self, role: str, layer: int, bias: torch.Tensor) -> None:
        """Write the role's bias in place (inverse of ``read_bias``); refused if the module has none."""
        module, rows = self._resolve(role, layer)
        param = getattr(module, "bias", None)
        if param is None:
            raise LayerscopeError(f"role {role!r} of layer {layer} has no bias in this {self.family} model")
        expected = (self.role_shape(role, layer)[0],)
        bias = torch.as_tensor(bias)
        if tuple(bias.shape) != expected:
            raise LayerscopeError(
                f"bias for role {role!r} of layer {layer} must have shape {expected}, got {tuple(bias.shape)}"
            )
        with torch.no_grad():
            src = bias.to(device=param.device, dtype=param.dtype)
            if rows is None:
                param.copy_(src)
            else:
                param.index_copy_(0, rows.to(param.device), src)

    # -- internals ---------------------------------------------------------------------------

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool):
            raise LayerscopeError(f"layer {layer!r} is not a layer index: allowed 0..{self.num_layers - 1}")
        try:
            layer = operator.index(layer)  # numpy integers and 0-d integer tensors too
        except TypeError:
            pass
        return check_layer(layer, self.num_layers)

    def _role(self, role: str) -> str:
        if role not in self._roles:
            raise LayerscopeError(
                f"role {role!r} is not available in a {self.family} model: allowed {allowed(self._roles)}"
            )
        return role

    def _resolve(self, role: str, layer: int) -> tuple[nn.Module, torch.Tensor | None]:
        """The module holding ``role`` and, for a part of a fused matrix, its row indices."""
        module = self.role_module(role, layer)
        if not self.is_fused(role):
            return module, None
        owner = self.spec.parts[role]
        rows = self._module_shape(module)[0]
        key = (owner, rows)
        if key not in self._layouts:
            layout = self.spec.layouts[owner](self, rows)
            flat = sorted(i for part in layout.values() for i in part)
            if flat != list(range(rows)):
                raise LayerscopeError(
                    f"the {owner} matrix of this {self.family} model has {rows} rows, which does not match "
                    f"{self.num_heads} heads, {self.num_kv_heads} key/value heads of size {self.head_dim} in its config"
                )
            self._layouts[key] = {r: torch.tensor(idx, dtype=torch.long) for r, idx in layout.items()}
        return module, self._layouts[key][role]

    @staticmethod
    def _weight(module: nn.Module) -> torch.Tensor:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise LayerscopeError(f"module {type(module).__name__} has no 2-D weight layerscope can read")
        return weight

    def _module_shape(self, module: nn.Module) -> tuple[int, int]:
        weight = self._weight(module)
        if isinstance(module, Conv1D):
            return (weight.shape[1], weight.shape[0])
        return (weight.shape[0], weight.shape[1])


# id(model) -> its adapter, for as long as someone holds the adapter. The adapter holds the model,
# so a live entry's id cannot be reused; nothing is stored on the model itself, so there is no
# reference cycle (``del model`` frees GPU memory at once) and nothing unpicklable travels with it.
_CACHE: "weakref.WeakValueDictionary[int, Architecture]" = weakref.WeakValueDictionary()


def architecture(model: nn.Module) -> Architecture:
    """The adapter for ``model`` (a ``...ForCausalLM`` of a supported family).

    Calls for the same model return the same object while it is alive (held by a caller); building
    one is cheap, so it is not pinned to the model.
    """
    arch = _CACHE.get(id(model))
    if arch is not None and arch.model is model:
        return arch
    family = getattr(getattr(model, "config", None), "model_type", None)
    spec = _SPECS.get(family)
    if spec is None:
        raise LayerscopeError(f"model family {family!r} is not supported: allowed {allowed(SUPPORTED_FAMILIES)}")
    arch = Architecture(model, family, spec)
    _CACHE[id(model)] = arch
    return arch
