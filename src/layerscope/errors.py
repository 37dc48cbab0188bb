"""User-facing errors: one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

from collections.abc import Iterable


class LayerscopeError(ValueError):
    """Bad input or an impossible request, described in words a user can act on."""


def allowed(values: Iterable[object], limit: int = 20) -> str:
    """Format a list of allowed values for an error message."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def check_layer(layer: int, num_layers: int, what: str = "layer") -> int:
    """Refuse a layer index outside [0, num_layers)."""
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise LayerscopeError(f"{what} {layer!r} is out of range: the model has {num_layers} layers, allowed 0..{num_layers - 1}")
    return layer
