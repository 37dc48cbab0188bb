"""Reading a causal language model and its tokenizer through transformers, GGUF files included."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


@contextmanager
def quiet_gguf_progress():
    """Silence the tqdm bar transformers' GGUF reader draws (tqdm reads its env only at import)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def strip_gguf_quantizer(model) -> None:
    """Forget that the weights came from GGUF: they are plain dequantised tensors now."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


def read_pretrained(folder: str, *, dtype=None, token: str | None = None, gguf_file: str | None = None):
    """``(model, tokenizer)`` from a folder or hub id; with ``gguf_file``, dequantised from that file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {"token": token} if token else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    with quiet_gguf_progress():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **kwargs)
    if gguf_file:
        strip_gguf_quantizer(model)
    return model, tokenizer
