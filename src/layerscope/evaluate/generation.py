"""Greedy generation, one prompt at a time (exact; no padding effects)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from ..errors import LayerscopeError
from ..interventions.base import Intervention, intervene

SCOPES = ("prompt", "all")


def _encode_prompt(tokenizer, prompt: str, *, chat: bool, device: torch.device):
    """The tokenizer's encoding (``input_ids``, ``attention_mask``) of one prompt on ``device``:
    wrapped in the chat template as a user message with ``chat``; an empty prompt becomes BOS (else EOS)."""
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
    return enc


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
        enc = _encode_prompt(tokenizer, prompt, chat=chat, device=device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        outputs.append(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return outputs


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids that end generation: the model's generation config's EOS, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def _cache_names(model) -> tuple[str, str]:
    """The keyword that passes the KV cache into ``model.forward`` and the output field that returns
    it (``cache`` in recent transformers, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


@torch.inference_mode()
def generate_with(
    model,
    tokenizer,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 32,
    scope: str = "prompt",
    chat: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only) with ``interventions`` applied.

    An explicit decoding loop with the KV cache, one prompt at a time, stopping at EOS or after
    ``max_new_tokens`` tokens: the argmax of the logits is taken as is (no logits processors).
    ``scope="prompt"``: the interventions act only while the prompt is processed (the prefill
    forward) and are removed for the decoding steps; the cached keys and values keep their effect.
    With ``PCRemoval(..., positions="last")`` this edits only the last prompt position, as in the
    critical-layers paper's case study. ``scope="all"``: they act during every step.
    ``chat`` wraps each prompt in the tokenizer's chat template as a user message.
    """
    if scope not in SCOPES:
        raise LayerscopeError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LayerscopeError(f"max_new_tokens {max_new_tokens!r} must be an integer of at least 1")
    if isinstance(prompts, str):
        raise LayerscopeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise LayerscopeError("no prompt given")
    interventions = list(interventions)
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise LayerscopeError(f"{iv!r} is not an intervention: allowed are layerscope.interventions objects")
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    cache_in, cache_out = _cache_names(model)
    outputs = []
    with intervene(model, *interventions) if scope == "all" else nullcontext():
        for prompt in prompts:
            enc = _encode_prompt(tokenizer, prompt, chat=chat, device=device)
            mask = enc["attention_mask"]
            with intervene(model, *interventions) if scope == "prompt" else nullcontext():
                out = model(input_ids=enc["input_ids"], attention_mask=mask, use_cache=True)
            new: list[int] = []
            while True:
                token = int(out.logits[0, -1].argmax())
                new.append(token)
                if token in eos or len(new) >= max_new_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
                step = torch.tensor([[token]], dtype=enc["input_ids"].dtype, device=device)
                out = model(input_ids=step, attention_mask=mask, use_cache=True, **{cache_in: getattr(out, cache_out)})
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs
