"""Tiny random models, one per supported family, built in memory for tests (no download).

Every model has 4 blocks, hidden size 64, 4 attention heads (2 key/value heads where the family
has grouped-query attention), MLP width 128 (BLOOM's is fixed at 4 x hidden = 256), at least 512
positions, the byte-level tiny tokenizer's vocabulary (260) and its pad/bos/eos ids 0/1/2.
Where a family has a quirk the adapter must handle, the tiny model has it too: GPT-Neo alternates
global and local attention (window 8), Gemma 2 and Gemma 3 alternate sliding (window 8) and full
attention, Falcon uses the Falcon-7B layout (multi-query, parallel attention, rotary), GPT-J uses
partial rotary embeddings, Qwen 2 has q/k/v biases, Qwen 3 and Gemma 3 have q/k norms, and the
families that tie their input and output embeddings by default keep doing so.

    model, tokenizer = build_tiny_model("tiny-llama", seed=0)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from layerscope.errors import LayerscopeError, allowed
from layerscope.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer

#: Registry name -> model family (``config.model_type``).
TINY_MODELS: dict[str, str] = {
    "tiny-llama": "llama",
    "tiny-mistral": "mistral",
    "tiny-qwen2": "qwen2",
    "tiny-qwen3": "qwen3",
    "tiny-gemma": "gemma",
    "tiny-gemma2": "gemma2",
    "tiny-gemma3": "gemma3_text",
    "tiny-phi3": "phi3",
    "tiny-gpt2": "gpt2",
    "tiny-gpt-neox": "gpt_neox",
    "tiny-gptj": "gptj",
    "tiny-gpt-neo": "gpt_neo",
    "tiny-opt": "opt",
    "tiny-bloom": "bloom",
    "tiny-falcon": "falcon",
}

NUM_LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MLP = 128
MAX_POSITIONS = 512
WINDOW = 8

_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_LLAMA_STYLE = {
    "hidden_size": HIDDEN,
    "intermediate_size": MLP,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": MAX_POSITIONS,
}

_ALTERNATING = ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)

# Keyword arguments of each family's config class (names checked against transformers 5.x).
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_STYLE),
    "mistral": dict(_LLAMA_STYLE),
    "qwen2": dict(_LLAMA_STYLE),  # q/k/v carry biases in this family
    "qwen3": dict(_LLAMA_STYLE),
    "gemma": dict(_LLAMA_STYLE),
    "gemma2": {
        **_LLAMA_STYLE,
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": WINDOW,
        "layer_types": list(_ALTERNATING),
    },
    "gemma3_text": {
        **_LLAMA_STYLE,
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": WINDOW,
        "layer_types": list(_ALTERNATING),
    },
    "phi3": {
        **{k: v for k, v in _LLAMA_STYLE.items() if k != "head_dim"},
        "original_max_position_embeddings": MAX_POSITIONS,
    },
    "gpt2": {"n_embd": HIDDEN, "n_layer": NUM_LAYERS, "n_head": HEADS, "n_inner": MLP, "n_positions": MAX_POSITIONS},
    "gpt_neox": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": MLP,
        "max_position_embeddings": MAX_POSITIONS,
    },
    "gptj": {
        "n_embd": HIDDEN,
        "n_layer": NUM_LAYERS,
        "n_head": HEADS,
        "n_inner": MLP,
        "n_positions": MAX_POSITIONS,
        "rotary_dim": HEAD_DIM // 2,  # partial rotary, as in GPT-J 6B (64 of 256)
    },
    "gpt_neo": {
        "hidden_size": HIDDEN,
        "num_layers": NUM_LAYERS,
        "num_heads": HEADS,
        "intermediate_size": MLP,
        "max_position_embeddings": MAX_POSITIONS,
        "attention_types": [[["global", "local"], NUM_LAYERS // 2]],
        "window_size": WINDOW,
    },
    "opt": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": HEADS,
        "ffn_dim": MLP,
        "word_embed_proj_dim": HIDDEN,
        "max_position_embeddings": MAX_POSITIONS,
    },
    "bloom": {"hidden_size": HIDDEN, "n_layer": NUM_LAYERS, "n_head": HEADS},  # alibi, MLP fixed at 4 x hidden
    "falcon": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": HEADS,
        "num_kv_heads": HEADS,
        "ffn_hidden_size": MLP,
        "max_position_embeddings": MAX_POSITIONS,
        # the Falcon-7B layout; pass new_decoder_architecture=True, num_kv_heads=2 for the 40B/180B one
        "multi_query": True,
        "parallel_attn": True,
        "new_decoder_architecture": False,
        "alibi": False,
    },
}


def _family(name: str) -> str:
    if name not in TINY_MODELS:
        raise LayerscopeError(f"unknown tiny model {name!r}: allowed {allowed(TINY_MODELS)}")
    return TINY_MODELS[name]


def tiny_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of tiny model ``name``; ``overrides`` are passed on to the family's config class."""
    family = _family(name)
    kwargs = {"vocab_size": TINY_VOCAB_SIZE, **_IDS, **_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_model(
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny model in eval mode and the byte-level tokenizer.

    The weights depend only on ``name``, ``seed`` and ``overrides``: they are drawn in float32 and
    then cast to ``dtype``, so the same seed gives the same model (up to rounding) in every dtype.
    ``attn_implementation`` is "sdpa" or "eager"; families without an SDPA path in transformers
    (GPT-Neo, BLOOM) always use "eager".
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise LayerscopeError(f"attn_implementation {attn_implementation!r} is not supported: allowed sdpa, eager")
    config = tiny_config(name, **overrides)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    if attn_implementation == "sdpa" and not getattr(model_class, "_supports_sdpa", False):
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model = model.to(dtype)
    model.eval()
    return model, tiny_tokenizer()
