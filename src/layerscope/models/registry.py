"""Short names users can type instead of a path or hub id."""

from __future__ import annotations

from .embedded import EMBEDDED, is_fetched
from .tiny import TINY_MODELS


def registry_names() -> list[str]:
    return list(EMBEDDED) + list(TINY_MODELS)


def describe_registry() -> list[tuple[str, str, str]]:
    """(name, kind, description) for `layerscope models`."""
    rows = []
    for name, spec in EMBEDDED.items():
        state = "cached" if is_fetched(name) else "fetched on first use"
        rows.append((name, f"embedded ({state})", spec.description))
    for name, family in TINY_MODELS.items():
        rows.append((name, "tiny random", f"4-layer random {family} for tests"))
    return rows
