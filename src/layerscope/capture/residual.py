"""Recording the residual stream: each block's output, pooled per example.

Forward hooks on the blocks (found through the architecture adapter) record what each block
hands to the next; padding never enters a pooled vector. Pooled vectors are small (one per example
and layer), so they are kept; token-level statistics belong in streaming accumulators.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..data.batching import make_batches
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..models.architecture import architecture

POOLINGS = ("last_prompt", "last", "mean")


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream entering a block, from a forward pre-hook's arguments."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(output) -> torch.Tensor:
    """The residual stream leaving a block (some families return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def pool_positions(target_mask: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per row, the weights over positions that pooling uses, shape (B, T), rows summing to 1.

    ``last_prompt``: the token just before the first scored token (for a templated instruction
    example, the last token of the prompt: the critical-layers paper's choice; a row with no scored
    token falls back to its last token). ``last``: the last real token. ``mean``: every real token.
    """
    if pooling not in POOLINGS:
        raise LayerscopeError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
    real = attention_mask.bool()
    B, T = real.shape
    weights = torch.zeros(B, T, dtype=torch.float32, device=real.device)
    last = real.sum(dim=1) - 1
    if pooling == "mean":
        return real.float() / real.sum(dim=1, keepdim=True).clamp(min=1)
    if pooling == "last":
        index = last
    else:
        has_target = target_mask.any(dim=1)
        first_target = torch.where(has_target, target_mask.float().argmax(dim=1), last + 1)
        index = (first_target - 1).clamp(min=0)
    weights[torch.arange(B, device=real.device), index] = 1.0
    return weights


def _prompt_only(sequence: ScoredSequence) -> ScoredSequence:
    """The tokens before the first scored one (all of them when none is scored), none scored."""
    keep = sequence.target_mask.index(True) if any(sequence.target_mask) else len(sequence)
    return ScoredSequence(sequence.input_ids[:keep], (False,) * keep, sequence.group, sequence.choice)


def iter_block_outputs(
    model: torch.nn.Module,
    sequences: Sequence[ScoredSequence],
    *,
    pooling: str = "last_prompt",
    include_embeddings: bool = False,
    pad_id: int = 0,
    max_tokens: int = 4096,
    skip_first: int = 0,
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Per batch: the indices of its sequences and every block's output (with
    ``include_embeddings`` first the input of block 0), pooled per sequence to ``(b, hidden)``
    float32 tensors on the model's device; with ``pooling="tokens"``, every real (non-padding) token
    as one row, ``(tokens in the batch, hidden)``, the same tokens in the same order for every layer.
    Only one batch's activations are held at a time. ``skip_first=n`` (tokens only) leaves out
    each sequence's first ``n`` positions: many models park a massive activation on the first token
    (an attention sink), which then dominates any token-level covariance."""
    if not sequences:
        raise LayerscopeError("empty data set: nothing to capture")
    if pooling not in POOLINGS + ("tokens",):
        raise LayerscopeError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS + ('tokens',))}")
    if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
        raise LayerscopeError(f"skip_first={skip_first!r}: allowed are integers >= 0")
    if skip_first and pooling != "tokens":
        raise LayerscopeError(f"skip_first={skip_first} applies only to pooling 'tokens', not {pooling!r}")
    if pooling == "last_prompt":
        # The models are causal: the state at the last prompt token does not depend on what
        # follows it, so the response need not be run at all (about 3x less work on Dolly).
        sequences, pooling = [_prompt_only(s) for s in sequences], "last"
    arch = architecture(model)
    device = next(model.parameters()).device
    current: dict = {}

    def record(hidden: torch.Tensor) -> None:
        if pooling == "tokens":
            current["out"].append(hidden[current["real"]].float())
        else:
            current["out"].append(torch.einsum("bt,btd->bd", current["weights"], hidden.float()))

    handles = []
    if include_embeddings:
        handles.append(arch.block(0).register_forward_pre_hook(
            lambda _m, args, kwargs: record(block_input(args, kwargs)), with_kwargs=True))
    for i in range(arch.num_layers):
        handles.append(arch.block(i).register_forward_hook(lambda _m, _a, output: record(block_output(output))))
    try:
        longest = max(len(s) for s in sequences)
        for batch in make_batches(list(sequences), max_tokens=max(max_tokens, longest), pad_id=pad_id):
            batch = batch.to(device)
            current["out"] = []
            current["real"] = batch.attention_mask.bool()
            if skip_first:
                current["real"][:, :skip_first] = False  # right padding: position p is token p of every row
            if pooling != "tokens":
                current["weights"] = pool_positions(batch.target_mask, batch.attention_mask, pooling)
            with torch.inference_mode():
                arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            yield batch.index, current["out"]
    finally:
        for handle in handles:
            handle.remove()


def capture_block_outputs(
    model: torch.nn.Module,
    sequences: Sequence[ScoredSequence],
    *,
    pooling: str = "last_prompt",
    include_embeddings: bool = False,
    pad_id: int = 0,
    max_tokens: int = 4096,
) -> list[np.ndarray]:
    """The pooled output of every block (blocks 0..L-1; with ``include_embeddings`` first the
    input of block 0), as float32 arrays of shape ``(n_sequences, hidden)``, in the sequences' order."""
    if pooling not in POOLINGS:
        raise LayerscopeError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)} "
                              "(token-level activations stream through iter_block_outputs)")
    arch = architecture(model)
    n_layers = arch.num_layers + int(include_embeddings)
    out = [np.zeros((len(sequences), arch.hidden_size), dtype=np.float32) for _ in range(n_layers)]
    for index, layers in iter_block_outputs(model, sequences, pooling=pooling, include_embeddings=include_embeddings,
                                            pad_id=pad_id, max_tokens=max_tokens):
        for slot, pooled in enumerate(layers):
            out[slot][index] = pooled.cpu().numpy()
    return out
