"""Interventions that edit weight matrices of roles (q k v o gate up down) through the adapter."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import LayerscopeError, allowed
from ..models.architecture import architecture
from .base import Intervention, Undo, normalise_layers


class RoleEdit(Intervention):
    """Base for edits of one role's weight (and bias) at some layers; saves exact copies to undo."""

    def __init__(self, role: str, layers: int | Iterable[int]):
        self.role = role
        self.layers = [layers] if isinstance(layers, int) else list(layers)

    def resolve_layers(self, model: nn.Module) -> tuple[int, ...]:
        """The validated, sorted layer indices; refuses a role this family lacks."""
        arch = architecture(model)
        if self.role not in arch.roles():
            raise LayerscopeError(
                f"role {self.role!r} does not exist in a {arch.family} model; allowed: {allowed(arch.roles())}"
            )
        return normalise_layers(self.layers, arch.num_layers)

    def new_weight(self, weight: torch.Tensor, layer: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def new_bias(self, bias: torch.Tensor, layer: int) -> torch.Tensor:
        return bias

    def apply(self, model: nn.Module) -> Undo:
        arch = architecture(model)
        layers = self.resolve_layers(model)
        saved: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

        def undo() -> None:
            for layer, weight, bias in reversed(saved):
                arch.write_weight(self.role, layer, weight)
                if bias is not None:
                    arch.write_bias(self.role, layer, bias)

        try:
            for layer in layers:
                weight = arch.read_weight(self.role, layer)
                bias = arch.read_bias(self.role, layer)
                saved.append((layer, weight, bias))
                arch.write_weight(self.role, layer, self.new_weight(weight, layer))
                if bias is not None:
                    arch.write_bias(self.role, layer, self.new_bias(bias, layer))
        except BaseException:
            undo()
            raise
        return undo

    def first_block(self, model: nn.Module) -> int:
        return self.resolve_layers(model)[0]


class ZeroRole(RoleEdit):
    """Zero a role's weight and bias at the given layers: that projection outputs zeros."""

    def new_weight(self, weight: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.zeros_like(weight)

    def new_bias(self, bias: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.zeros_like(bias)
