"""Mean ablation: a module's output is replaced by its mean output on the data.

Zeroing a module asks "what if it wrote nothing?", which pushes the network off its usual
operating point; mean ablation asks "what if it wrote the same thing for every token?", which
removes only the information the module carries. Both act through forward hooks, so no weight is
touched and leaving ``intervene`` removes them.

* :class:`MeanAblateRole`: the output of a weight role (``q k v o gate up down``) becomes its mean
  vector (only the role's own entries of a fused module's output change).
* :class:`MeanAblateBlock`: a block's update to the residual stream (output minus input) becomes
  its mean update, ``out = in + mean(out - in)``.

The means come from :class:`~layerscope.capture.RoleStatistics` (roles) and
:class:`~layerscope.capture.BlockStatistics` (blocks), taken over real tokens of the data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..capture import block_input
from ..errors import LayerscopeError
from ..models.architecture import architecture
from .base import Intervention, Undo, normalise_layers


def _check_vector(vector: torch.Tensor, size: int, what: str) -> torch.Tensor:
    vector = torch.as_tensor(vector)
    if tuple(vector.shape) != (size,):
        raise LayerscopeError(f"mean for {what} must have shape ({size},), got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise LayerscopeError(f"mean for {what} has non-finite values")
    return vector


class _HookAblation(Intervention):
    """Registers one forward hook per layer (``_register``); the undo removes them all."""

    layers: list[int]

    def first_block(self, model: nn.Module) -> int:
        return normalise_layers(self.layers, architecture(model).num_layers)[0]

    def apply(self, model: nn.Module) -> Undo:
        arch = architecture(model)
        normalise_layers(self.layers, arch.num_layers)
        handles = []

        def undo() -> None:
            for handle in handles:
                handle.remove()

        try:
            for layer in self.layers:
                handles.append(self._register(arch, layer))
        except BaseException:
            undo()
            raise
        return undo

    def _register(self, arch, layer: int):  # pragma: no cover - abstract
        raise NotImplementedError


class MeanAblateRole(_HookAblation):
    """Replace the output of ``role`` at each layer of ``means`` by ``means[layer]`` for every token."""

    def __init__(self, role: str, means: Mapping[int, torch.Tensor]):
        self.role = role
        self.layers = sorted(means)
        self._means = dict(means)

    def _register(self, arch, layer: int):
        out_features = arch.role_shape(self.role, layer)[0]
        mean = _check_vector(self._means[layer], out_features, f"role {self.role!r} of layer {layer}")
        rows = arch.role_rows(self.role, layer)
        return arch.role_module(self.role, layer).register_forward_hook(self._hook(mean, rows))

    @staticmethod
    def _hook(mean: torch.Tensor, rows: torch.Tensor | None):
        converted: dict = {}

        def hook(_module, _args, output):
            key = (output.device, output.dtype)
            if key not in converted:
                converted[key] = (mean.to(device=output.device, dtype=output.dtype),
                                  None if rows is None else rows.to(output.device))
            value, index = converted[key]
            if index is None:
                return value.expand_as(output).clone()
            output = output.clone()
            output[..., index] = value
            return output

        return hook

    def describe(self) -> dict:
        return {"kind": "MeanAblateRole", "role": self.role, "layers": self.layers}


class MeanAblateBlock(_HookAblation):
    """Replace the residual update of each block in ``updates`` by ``updates[layer]``:
    the block outputs ``input + updates[layer]`` for every token."""

    def __init__(self, updates: Mapping[int, torch.Tensor]):
        self.layers = sorted(updates)
        self._updates = dict(updates)

    def _register(self, arch, layer: int):
        update = _check_vector(self._updates[layer], arch.hidden_size, f"the update of block {layer}")
        return arch.block(layer).register_forward_hook(self._hook(update), with_kwargs=True)

    @staticmethod
    def _hook(update: torch.Tensor):
        def hook(_module, args, kwargs, output):
            hidden_in = block_input(args, kwargs)
            new = hidden_in + update.to(device=hidden_in.device, dtype=hidden_in.dtype)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        return hook

    def describe(self) -> dict:
        return {"kind": "MeanAblateBlock", "layers": self.layers}
