"""Layer substitution: run some blocks of another model (same family and shapes) in place of this one's.

The critical-layers study puts the pre-fine-tuned model's blocks back into the fine-tuned model,
one window at a time, and measures how much of fine-tuning's gain that window carried. The
blocks are swapped as module objects (nothing is copied, nothing duplicated) and swapped back on
exit, so the fine-tuned model is restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import LayerscopeError
from ..models.architecture import architecture
from .base import Intervention, Undo, normalise_layers
from .blocks import swap_blocks


def _block_shapes(model: nn.Module, layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(p.shape), str(p.dtype)) for name, p in architecture(model).block(layer).named_parameters()}


def check_substitutable(model: nn.Module, donor: nn.Module, what: str = "models") -> None:
    """Refuse two models whose blocks cannot stand in for each other, naming the first difference.

    Same family, same number of blocks, the same parameter names, shapes and dtypes in every
    block, the same vocabulary size, and the same device.
    """
    a, b = architecture(model), architecture(donor)
    if a.family != b.family:
        raise LayerscopeError(f"the {what} are of different families: {a.family!r} and {b.family!r}")
    if a.num_layers != b.num_layers:
        raise LayerscopeError(f"the {what} have {a.num_layers} and {b.num_layers} blocks; substitution needs the same number")
    if a.hidden_size != b.hidden_size:
        raise LayerscopeError(f"the {what} have hidden sizes {a.hidden_size} and {b.hidden_size}")
    for layer in range(a.num_layers):
        sa, sb = _block_shapes(model, layer), _block_shapes(donor, layer)
        if sa != sb:
            name = next((n for n in sorted(set(sa) | set(sb)) if sa.get(n) != sb.get(n)))
            raise LayerscopeError(
                f"block {layer} differs between the {what}: parameter {name!r} is {sa.get(name, 'absent')} "
                f"in one and {sb.get(name, 'absent')} in the other"
            )
    va = a.embeddings()[0].weight.shape[0]
    vb = b.embeddings()[0].weight.shape[0]
    if va != vb:
        raise LayerscopeError(f"the {what} have vocabularies of {va} and {vb} tokens; they must share a tokenizer")
    da, db = next(model.parameters()).device, next(donor.parameters()).device
    if da != db:
        raise LayerscopeError(f"the {what} are on different devices ({da} and {db}); load both with the same --device")


class SubstituteBlocks(Intervention):
    """Run ``donor``'s blocks ``layers`` in place of the model's own (e.g. base blocks in a fine-tuned model)."""

    def __init__(self, donor: nn.Module, layers: int | Iterable[int]):
        self.donor = donor
        self.layers = [layers] if isinstance(layers, int) else list(layers)

    def resolve_layers(self, model: nn.Module) -> Sequence[int]:
        return normalise_layers(self.layers, architecture(model).num_layers)

    def apply(self, model: nn.Module) -> Undo:
        layers = self.resolve_layers(model)
        check_substitutable(model, self.donor)
        donor = architecture(self.donor)
        return swap_blocks(model, {i: donor.block(i) for i in layers})

    def first_block(self, model: nn.Module) -> int:
        return self.resolve_layers(model)[0]

    def describe(self) -> dict:
        return {"kind": "SubstituteBlocks", "layers": list(self.layers),
                "donor": getattr(self.donor, "_layerscope_source", type(self.donor).__name__)}
