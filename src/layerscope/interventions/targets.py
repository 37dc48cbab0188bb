"""Which weight matrices an intervention acts on: (layer, role) pairs, validated against the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import LayerscopeError, allowed
from ..models.architecture import ROLES, architecture
from .base import normalise_layers


def matrix_roles(model: torch.nn.Module) -> tuple[str, ...]:
    """The model's weight roles among ``q k v o gate up down`` (parts of fused matrices included,
    the fused names ``qkv``/``gate_up`` left out so that no weight is counted twice)."""
    return tuple(r for r in architecture(model).roles() if r in ROLES)


def weight_targets(
    model: torch.nn.Module, layers: Iterable[int] | None = None, roles: Iterable[str] | None = None
) -> list[tuple[int, str]]:
    """Every ``(layer, role)`` of the chosen layers (default all) and roles (default all of
    :func:`matrix_roles`), layer-major; a clear error for a bad layer or a role the family lacks."""
    arch = architecture(model)
    available = matrix_roles(model)
    chosen_roles = available if roles is None else tuple(dict.fromkeys(roles))
    if not chosen_roles:
        raise LayerscopeError(f"no roles given; allowed: {allowed(available)}")
    for role in chosen_roles:
        if role not in available:
            raise LayerscopeError(f"role {role!r} does not exist in a {arch.family} model; allowed: {allowed(available)}")
    chosen_layers = range(arch.num_layers) if layers is None else normalise_layers(list(layers), arch.num_layers)
    return [(layer, role) for layer in chosen_layers for role in chosen_roles]
