"""Greedy generation, one prompt at a time (exact; no padding effects)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LayerscopeError


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, chat: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only). ``chat`` wraps each prompt in the
    tokenizer's chat template as a user message."""
    if max_new_tokens < 1:
        raise LayerscopeError(f"max_new_tokens {max_new_tokens} must be at least 1")
    if not prompts:
        raise LayerscopeError("no prompt given")
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise LayerscopeError("this tokenizer has no chat template; drop --chat")
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
        if enc.input_ids.shape[1] == 0:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            enc["input_ids"] = torch.tensor([[bos]], device=device)
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        outputs.append(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return outputs
