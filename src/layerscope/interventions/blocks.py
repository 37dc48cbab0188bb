"""Temporarily replacing whole blocks: identity blocks (SkipBlock) and cached-prefix injection."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..models.architecture import architecture
from .base import Intervention, Undo, normalise_layers


def block_returns_tuple(model: nn.Module) -> bool:
    """Whether this model's blocks return a tuple ``(hidden, ...)`` rather than a tensor.

    Families differ (and change between transformers versions), so it is observed once on a
    two-token forward pass and remembered on the model.
    """
    known = getattr(model, "_layerscope_block_tuple", None)
    if known is not None:
        return known
    arch = architecture(model)
    seen: list[bool] = []
    handle = arch.block(0).register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
    try:
        device = next(model.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
    model._layerscope_block_tuple = bool(seen and seen[0])
    return model._layerscope_block_tuple


class PassthroughBlock(nn.Module):
    """Stands in for a block: returns its input (identity) or, with ``inject``, a given tensor."""

    def __init__(self, as_tuple: bool, inject: torch.Tensor | None = None):
        super().__init__()
        self.as_tuple = as_tuple
        self.inject = inject
        # The real block it stands in for (set by swap_blocks), so the adapter still finds its
        # roles. Not a registered submodule: the model's parameters and state_dict stay as they were.
        object.__setattr__(self, "_layerscope_original", None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.inject is None else self.inject
        return (out, None) if self.as_tuple else out


def swap_blocks(model: nn.Module, replacements: dict[int, nn.Module]) -> Undo:
    """Put modules in place of blocks; the returned undo puts the original module objects back."""
    arch = architecture(model)
    blocks = arch.blocks()
    originals = {i: blocks[i] for i in replacements}
    for i, module in replacements.items():
        if isinstance(module, PassthroughBlock):
            object.__setattr__(module, "_layerscope_original", arch.block(i))  # the real block, unwrapped
        blocks[i] = module

    def undo() -> None:
        for i, module in originals.items():
            blocks[i] = module

    return undo


class SkipBlock(Intervention):
    """Make blocks the identity on the residual stream (their output equals their input)."""

    def __init__(self, layers: int | Iterable[int]):
        self.layers = [layers] if isinstance(layers, int) else list(layers)

    def resolve_layers(self, model: nn.Module) -> Sequence[int]:
        """The validated, sorted layer indices (a clear error for a bad one)."""
        return normalise_layers(self.layers, architecture(model).num_layers)

    def apply(self, model: nn.Module) -> Undo:
        layers = self.resolve_layers(model)
        as_tuple = block_returns_tuple(model)
        return swap_blocks(model, {i: PassthroughBlock(as_tuple) for i in layers})

    def first_block(self, model: nn.Module) -> int:
        return self.resolve_layers(model)[0]


class StartFromCache(Intervention):
    """Prefix reuse: blocks ``0..start-1`` are skipped and block ``start`` receives ``state``.

    ``state`` is the cached input of block ``start`` for exactly the batch being run. Block 0 is
    replaced by a module that returns ``state``; blocks ``1..start-1`` by identities. Embedding,
    masks and position encodings are still computed by the model's own forward (cheap), so every
    family works without re-implementing its forward pass.
    """

    def __init__(self, start: int, state: torch.Tensor):
        self.start = start
        self.state = state

    def apply(self, model: nn.Module) -> Undo:
        if self.start == 0:
            return lambda: None
        as_tuple = block_returns_tuple(model)
        replacements = {0: PassthroughBlock(as_tuple, inject=self.state)}
        replacements.update({i: PassthroughBlock(as_tuple) for i in range(1, self.start)})
        return swap_blocks(model, replacements)

    def first_block(self, model: nn.Module) -> int:
        return 0

    def describe(self) -> dict:
        return {"kind": "StartFromCache", "start": self.start}
