"""Build a randomly initialised Llama with the shapes of a 1B model, for benchmarks on a model
whose head is a smaller share of the compute than SmolLM2-135M's.

Usage: python benchmarks/make_random_llama.py OUT_DIR   (needs the embedded model's tokenizer: make setup)
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from layerscope.models.embedded import fetch_embedded


def main(out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(fetch_embedded("smollm2-135m")))
    config = LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama-1b-shape-random")
