"""The intervention protocol: every change to a model is reversible and used as a context manager.

    with intervene(model, SkipBlock([3, 4]), ZeroRole("down", [7])):
        ...  # the model is changed here
    # and restored bit for bit here, also when the block raised

An intervention's ``apply`` changes the model and returns an ``undo`` callable. ``first_block``
tells the evaluation engine where the change starts, so blocks before it can be skipped by
reusing their cached outputs (prefix reuse).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import LayerscopeError, check_layer

Undo = Callable[[], None]


class Intervention(ABC):
    """A reversible change to a model."""

    @abstractmethod
    def apply(self, model: torch.nn.Module) -> Undo:
        """Change ``model`` in place and return a function that restores it exactly."""

    @abstractmethod
    def first_block(self, model: torch.nn.Module) -> int:
        """Index of the first block whose output this intervention can change."""

    def describe(self) -> dict:
        """Parameters as plain data, for run records."""
        return {"kind": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@contextmanager
def intervene(model: torch.nn.Module, *interventions: Intervention) -> Iterator[torch.nn.Module]:
    """Apply interventions in order; undo them in reverse order when the block ends, however it ends."""
    undos: list[Undo] = []
    try:
        for intervention in interventions:
            undos.append(intervention.apply(model))
        yield model
    finally:
        for undo in reversed(undos):
            undo()


def first_changed_block(model: torch.nn.Module, interventions: Sequence[Intervention]) -> int:
    """The earliest block any of the interventions touches (the end of the reusable prefix)."""
    from ..models.architecture import architecture

    if not interventions:
        return architecture(model).num_layers
    return min(iv.first_block(model) for iv in interventions)


def normalise_layers(layers: int | Iterable[int], num_layers: int, what: str = "layer") -> tuple[int, ...]:
    """Validate layer indices (negative ones count from the end) and return them sorted, unique."""
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise LayerscopeError(f"no {what}s given; allowed: 0..{num_layers - 1}")
    out = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise LayerscopeError(f"{what} {layer!r} is not an integer; allowed: 0..{num_layers - 1}")
        out.append(check_layer(layer + num_layers if -num_layers <= layer < 0 else layer, num_layers, what))
    return tuple(sorted(set(out)))
