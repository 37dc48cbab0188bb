"""Pruning: scores, masks (unstructured and N:M) and the reversible :class:`Prune` intervention.

A mask is a bool tensor of a role's ``(out_features, in_features)`` shape, True where the weight is
pruned (set to zero). The masks are pure functions of scores, so they are computed here without
any data; the calibration that Wanda's scores need lives in :mod:`layerscope.analyses.pruning`.

- magnitude: score ``|W|``;
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  score ``|W_ij| * ||X_j||_2``, with ``X_j`` input feature ``j`` over all calibration tokens.

Comparison groups follow Wanda's reference code (``locuslab/wanda``, ``lib/prune.py``):
``prune_wanda`` sorts the scores within each output row (``torch.sort(W_metric, dim=-1)``) and
prunes ``int(in_features * sparsity)`` of every row; its magnitude baseline ``prune_magnitude``
thresholds over the whole matrix. :data:`DEFAULT_GROUP` records that choice per method. Here every
group prunes exactly ``int(sparsity * group_size)`` entries, ties broken towards the lower index
(Wanda's magnitude baseline prunes ``|W| <= threshold``, which is one entry more, and more on ties).
N:M (both methods, as Wanda's code): in every run of ``m`` consecutive input columns of each row
the ``n`` lowest-scored entries are pruned (2:4 = two zeros in every four).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LayerscopeError
from ..models.architecture import architecture
from .base import Intervention, Undo

#: Pruning methods, and the group each compares its scores in by default (Wanda's lib/prune.py).
DEFAULT_GROUP: dict[str, str] = {"magnitude": "matrix", "wanda": "row"}
METHODS: tuple[str, ...] = tuple(DEFAULT_GROUP)
GROUPS: tuple[str, ...] = ("row", "matrix")

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _score_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32 (float64 for a float64 weight), whatever the weight's dtype."""
    if weight.dim() != 2:
        raise LayerscopeError(f"a weight matrix must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    return weight.detach().to(_score_dtype(weight)).abs()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` (float64): ``input_norm`` holds one norm per input column."""
    if weight.dim() != 2:
        raise LayerscopeError(f"a weight matrix must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    norm = torch.as_tensor(input_norm)
    if norm.shape != (weight.shape[1],):
        raise LayerscopeError(f"input norms have shape {tuple(norm.shape)}, but the weight {tuple(weight.shape)} "
                              f"needs one per input column: ({weight.shape[1]},)")
    return weight.detach().double().abs() * norm.to(device=weight.device, dtype=torch.float64)[None, :]


def check_method(method: str) -> str:
    """Refuse a pruning method other than :data:`METHODS`."""
    if method not in METHODS:
        raise LayerscopeError(f"unknown pruning method {method!r}: allowed are {', '.join(METHODS)}")
    return method


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Refuse a sparsity outside ``0 <= s < 1`` (or not a number)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= float(sparsity) < 1:
        raise LayerscopeError(f"{what} {sparsity!r} is out of range: allowed 0 <= s < 1")
    return float(sparsity)


def check_pattern(n: int, m: int) -> tuple[int, int]:
    """Refuse an N:M pattern that is not ``0 < n < m``."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayerscopeError(f"N:M pattern {n}:{m}: {name} must be an integer")
    if not 0 < n < m:
        raise LayerscopeError(f"N:M pattern {n}:{m} is not allowed: need 0 < n < m (n pruned in every m, e.g. 2:4)")
    return n, m


def parse_pattern(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None or ``""`` -> None (unstructured); a clear error otherwise."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise LayerscopeError(f"N:M pattern {text!r} must be two integers (n, m), e.g. (2, 4)")
        return check_pattern(*text)
    match = _PATTERN.match(str(text))
    if match is None:
        raise LayerscopeError(f"N:M pattern {text!r} is not of the form N:M with integers, e.g. 2:4")
    return check_pattern(int(match.group(1)), int(match.group(2)))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries along the last dim; ties go to the lower index."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    # The k-th smallest value per group (a selection, cheaper than a sort); everything below it is
    # pruned, and of the entries equal to it the first ones in index order, as many as still needed:
    # exactly what a stable sort would choose.
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    need = k - below.sum(dim=-1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=-1) <= need))


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """True for the ``int(sparsity * group_size)`` lowest scores of each group (pruned).

    ``group="row"``: each output row (Wanda); ``"matrix"``: the whole matrix (Wanda's magnitude
    baseline). Ties are broken towards the lower (row-major) index, so the mask is deterministic."""
    sparsity = check_sparsity(sparsity)
    if group not in GROUPS:
        raise LayerscopeError(f"unknown group {group!r}: allowed are {', '.join(GROUPS)}")
    if scores.dim() != 2:
        raise LayerscopeError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    if group == "row":
        return _lowest(scores, int(sparsity * scores.shape[1]))
    return _lowest(scores.reshape(-1), int(sparsity * scores.numel())).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the ``n`` lowest scores in every group of ``m`` consecutive input columns of each row."""
    n, m = check_pattern(n, m)
    if scores.dim() != 2:
        raise LayerscopeError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if cols % m:
        raise LayerscopeError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, but the matrix has {cols} "
                              "input columns")
    return _lowest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


class Prune(Intervention):
    """Zero the masked entries of each ``(layer, role)`` weight; undo writes the exact values back.

    ``masks`` maps ``(layer, role)`` to a bool tensor of the role's ``(out_features, in_features)``
    shape, True = pruned. Only the pruned values are saved (bit-exact copies), so undo restores the
    weights bit for bit while holding ``sparsity`` of their memory. Biases are left alone.
    """

    def __init__(self, masks: Mapping[tuple[int, str], torch.Tensor]):
        self.masks = {(int(layer), role): mask for (layer, role), mask in masks.items()}

    def validate(self, model: nn.Module) -> None:
        """Refuse a bad layer, a role the family lacks, a mask of the wrong shape or not bool."""
        arch = architecture(model)
        for (layer, role), mask in self.masks.items():
            shape = arch.role_shape(role, layer)  # refuses a bad layer or role
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise LayerscopeError(f"mask for role {role!r} of layer {layer} must be a bool tensor, "
                                      f"got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != shape:
                raise LayerscopeError(f"mask for role {role!r} of layer {layer} has shape {tuple(mask.shape)}, "
                                      f"the weight has {shape}")

    def apply(self, model: nn.Module) -> Undo:
        self.validate(model)
        arch = architecture(model)
        saved: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []

        def undo() -> None:
            for layer, role, mask, values in reversed(saved):
                weight = arch.read_weight(role, layer)
                weight[mask] = values
                arch.write_weight(role, layer, weight)

        try:
            for (layer, role), mask in self.masks.items():
                weight = arch.read_weight(role, layer)
                mask = mask.to(weight.device)
                saved.append((layer, role, mask, weight[mask].clone()))
                arch.write_weight(role, layer, weight.masked_fill(mask, 0))
        except BaseException:
            undo()
            raise
        return undo

    def first_block(self, model: nn.Module) -> int:
        if not self.masks:
            return architecture(model).num_layers
        return min(layer for layer, _ in self.masks)

    def describe(self) -> dict:
        total = sum(int(m.numel()) for m in self.masks.values())
        pruned = sum(int(m.sum()) for m in self.masks.values())
        return {"kind": "Prune", "matrices": len(self.masks), "layers": sorted({layer for layer, _ in self.masks}),
                "pruned": pruned, "fraction": pruned / total if total else 0.0}


__all__ = ["DEFAULT_GROUP", "METHODS", "GROUPS", "magnitude_scores", "wanda_scores", "check_method", "check_sparsity",
           "check_pattern", "parse_pattern", "unstructured_mask", "nm_mask", "Prune"]
