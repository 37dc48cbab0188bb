"""Principal-component removal: project chosen PCA directions out of a block's output.

    basis = pca(activations_of_layer_5)                    # computed once
    with intervene(model, PCRemoval(5, basis, 3)):         # remove the top 3 directions
        ...

During the forward pass the residual stream leaving block ``layer`` becomes
``h - V V^T (h - mu)``, with ``mu`` the PCA mean and ``V`` the chosen (orthonormal) directions as
rows: the components of ``h - mu`` along those directions are removed, everything else is kept.
``positions="last"`` edits only the last real token of each row (the critical-layers paper's case
study edits the last prompt position). Undo removes the hooks; no weight is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..capture.residual import block_output
from ..errors import LayerscopeError
from ..models.architecture import architecture
from .base import Intervention, Undo, normalise_layers

POSITIONS = ("all", "last")
_ORTHONORMAL_TOL = 1e-4


def _as_float64(values, name: str, ndim: int) -> np.ndarray:
    """``values`` (array, tensor or nested list) as a finite float64 numpy array with ``ndim`` dimensions."""
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise LayerscopeError(f"{name} has complex dtype {values.dtype}: allowed are real arrays or tensors")
        arr = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            raise LayerscopeError(f"{name} has dtype {arr.dtype}: allowed are arrays or tensors of real numbers")
        arr = arr.astype(np.float64)
    if arr.ndim != ndim:
        shape = "(d,)" if ndim == 1 else "(k, d)"
        raise LayerscopeError(f"{name} has shape {tuple(arr.shape)}: allowed is a {ndim}-D array of shape {shape}")
    if not np.isfinite(arr).all():
        raise LayerscopeError(f"{name} contains NaN or infinite values: allowed are finite numbers")
    return arr


def _basis_arrays(basis) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (d,), directions (k, d))`` from a PCAResult-like object or a ``(mean, directions)`` pair."""
    if hasattr(basis, "mean") and hasattr(basis, "components") and not isinstance(basis, (np.ndarray, torch.Tensor)):
        mean, directions = basis.mean, basis.components
    elif isinstance(basis, (tuple, list)) and len(basis) == 2:
        mean, directions = basis
    else:
        raise LayerscopeError(
            f"basis of type {type(basis).__name__} is not understood: allowed are a layerscope.metrics.PCAResult "
            "or a (mean, directions) pair of arrays or tensors"
        )
    mean = _as_float64(mean, "basis mean", 1)
    directions = _as_float64(directions, "basis directions", 2)
    if directions.shape[1] != mean.shape[0]:
        raise LayerscopeError(
            f"basis directions have width {directions.shape[1]} but the basis mean has width {mean.shape[0]}: "
            "they must be equal"
        )
    return mean, directions


def _component_indices(components, k: int) -> list[int]:
    """The 0-based indices of the directions to remove, validated against ``k`` available ones."""
    if isinstance(components, (bool, np.bool_)):
        raise LayerscopeError(f"components {components!r} is not valid: allowed are a count 0..{k} "
                              f"or a sequence of indices in 0..{k - 1}")
    if isinstance(components, (int, np.integer)):
        n = int(components)
        if not 0 <= n <= k:
            raise LayerscopeError(
                f"components={n} is out of range: the basis has {k} directions, allowed counts are 0..{k}"
            )
        return list(range(n))
    if isinstance(components, (str, bytes)) or not isinstance(components, (Sequence, np.ndarray, torch.Tensor)):
        raise LayerscopeError(f"components {components!r} is not valid: allowed are a count 0..{k} "
                              f"or a sequence of indices in 0..{k - 1}")
    items = components.tolist() if isinstance(components, (np.ndarray, torch.Tensor)) else list(components)
    out: list[int] = []
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise LayerscopeError(f"component index {item!r} is not an integer; allowed: 0..{k - 1}")
        if not 0 <= int(item) < k:
            raise LayerscopeError(
                f"component index {int(item)} is out of range: the basis has {k} directions, allowed 0..{k - 1}"
            )
        out.append(int(item))
    return sorted(set(out))


def _last_positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device):
    """Per row, the position among the current ``length`` tokens of the last real token, and whether
    that position lies among them. ``mask`` is the 2-D attention mask handed to the base model: during
    cached generation it covers the past and the current tokens, the hidden state only the current ones."""
    if mask is None:
        return torch.full((batch,), length - 1, device=device), torch.ones(batch, dtype=torch.bool, device=device)
    if mask.dim() != 2:
        raise LayerscopeError(
            f"positions='last' needs the 2-D (batch, tokens) attention mask; the model received one of shape "
            f"{tuple(mask.shape)}: use positions='all' or pass a 2-D mask"
        )
    width = mask.shape[1]
    if mask.shape[0] != batch or width < length:
        raise LayerscopeError(
            f"attention mask of shape {tuple(mask.shape)} does not fit hidden states of {batch} rows and "
            f"{length} tokens"
        )
    real = (mask != 0).to(device)
    has_real = real.any(dim=1)
    last = width - 1 - real.flip(1).to(torch.int64).argmax(dim=1)
    pos = last - (width - length)
    valid = has_real & (pos >= 0) & (pos < length)
    return pos, valid


class PCRemoval(Intervention):
    """Remove principal directions from the output of block ``layer``: ``h <- h - V V^T (h - mu)``.

    ``basis``: a :class:`layerscope.metrics.PCAResult` (``mean`` ``(d,)``, ``components`` ``(k, d)``
    orthonormal rows by decreasing variance) or a ``(mean, directions)`` pair of arrays or tensors,
    computed once (e.g. from that layer's activations) and reused for every call.
    ``components``: an int ``n`` removes the top ``n`` directions (0: no change at all, nothing is
    hooked); a sequence gives 0-based indices into the basis' directions.
    ``positions``: ``"all"`` edits every position; ``"last"`` edits, in each forward call, only the
    last real (non-padding) token of each row, found from the attention mask given to the base
    model (without a mask: the last position). In cached generation a step whose tokens do not
    include a row's last real token leaves that row alone.

    The projection runs in float32 (float64 for a float64 model) and is cast back to the hidden
    state's dtype.
    """

    def __init__(self, layer: int, basis, components: int | Sequence[int] = 1, *, positions: str = "all"):
        if positions not in POSITIONS:
            raise LayerscopeError(f"unknown positions {positions!r}; allowed: {', '.join(POSITIONS)}")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise LayerscopeError(f"layer {layer!r} is not an integer block index")
        self.layer = int(layer)
        self.positions = positions
        mean, directions = _basis_arrays(basis)
        self.components = _component_indices(components, directions.shape[0])
        chosen = directions[self.components]
        if chosen.shape[0]:
            gram = chosen @ chosen.T
            err = float(np.abs(gram - np.eye(chosen.shape[0])).max())
            if err > _ORTHONORMAL_TOL:
                raise LayerscopeError(
                    f"the chosen basis directions are not orthonormal (max |V V^T - I| = {err:.3g}): allowed are "
                    "orthonormal rows, e.g. the components of a PCA"
                )
        self._mean = torch.from_numpy(mean)  # float64, CPU
        self._directions = torch.from_numpy(np.ascontiguousarray(chosen))  # (n, d) float64, CPU

    @property
    def width(self) -> int:
        return int(self._mean.shape[0])

    def resolve_layer(self, model: nn.Module) -> int:
        """The validated, non-negative block index; refuses a basis whose width is not the hidden size."""
        arch = architecture(model)
        layer = normalise_layers(self.layer, arch.num_layers)[0]
        if self.width != arch.hidden_size:
            raise LayerscopeError(
                f"the basis has width {self.width} but this {arch.family} model's hidden size is "
                f"{arch.hidden_size}: allowed is a basis computed from this model's residual stream"
            )
        return layer

    def first_block(self, model: nn.Module) -> int:
        return self.resolve_layer(model)

    def apply(self, model: nn.Module) -> Undo:
        layer = self.resolve_layer(model)
        if not self.components:
            return lambda: None
        arch = architecture(model)
        block = arch.block(layer)
        reference = next(block.parameters(), None)
        if reference is None:
            reference = next(model.parameters())
        # mu and V on the block's device, converted once here (more only if a call differs).
        tensors: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

        def basis_for(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            key = (device, dtype)
            if key not in tensors:
                tensors[key] = (self._mean.to(device=device, dtype=dtype), self._directions.to(device=device, dtype=dtype))
            return tensors[key]

        basis_for(reference.device, torch.float64 if reference.dtype == torch.float64 else torch.float32)

        def project(x: torch.Tensor) -> torch.Tensor:
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            mu, V = basis_for(x.device, dtype)
            centred = x.to(dtype) - mu
            return (x.to(dtype) - (centred @ V.T) @ V).to(x.dtype)

        state: dict = {"mask": None}
        handles = []

        def edit(_module, _args, output):
            hidden = block_output(output)
            if self.positions == "all":
                edited = project(hidden)
            else:
                B, T = hidden.shape[0], hidden.shape[1]
                pos, valid = _last_positions(state["mask"], B, T, hidden.device)
                rows = torch.arange(B, device=hidden.device)[valid]
                cols = pos[valid]
                edited = hidden.clone()
                edited[rows, cols] = project(hidden[rows, cols])
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        def undo() -> None:
            for handle in reversed(handles):
                handle.remove()
            handles.clear()

        try:
            if self.positions == "last":
                base = arch.base_model()
                signature = inspect.signature(base.forward)

                def remember_mask(_module, args, kwargs):
                    if "attention_mask" in kwargs or not args[1:]:
                        state["mask"] = kwargs.get("attention_mask")
                    else:  # passed positionally
                        state["mask"] = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")

                def forget_mask(_module, _args, _kwargs, _output):
                    state["mask"] = None

                handles.append(base.register_forward_pre_hook(remember_mask, with_kwargs=True))
                handles.append(base.register_forward_hook(forget_mask, with_kwargs=True, always_call=True))
            handles.append(block.register_forward_hook(edit))
        except BaseException:
            undo()
            raise
        return undo

    def describe(self) -> dict:
        return {"kind": "PCRemoval", "layer": self.layer, "components": list(self.components),
                "positions": self.positions, "basis_width": self.width}
