"""Streaming statistics of the weight matrices' inputs and outputs, over real (non-padding) tokens.

Wanda needs, for every input column ``j`` of a linear layer, the norm ``||X_j||_2`` of that
feature over all calibration tokens; mean ablation needs each module's mean output. Both are sums
over tokens, so hooks accumulate them batch by batch in float64 and nothing grows with the data.

    stats = RoleStatistics(model, [(3, "q"), (3, "down")], inputs=True, outputs=True)
    with stats.recording():
        for batch in batches:
            stats.set_mask(batch.attention_mask)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    stats.input_norm(3, "q")    # (in_features,) float64
    stats.output_mean(3, "down")  # (out_features,) float64
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import LayerscopeError
from ..models.architecture import architecture


class RoleStatistics:
    """Accumulates per ``(layer, role)``: the sum of squares of each input column and the sum of each
    output over the tokens where the current mask is 1 (all tokens when no mask is set)."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[tuple[int, str]], *, inputs: bool = True,
                 outputs: bool = False):
        if not targets:
            raise LayerscopeError("no (layer, role) targets to record")
        self.model = model
        self.arch = architecture(model)
        self.targets = list(dict.fromkeys((int(layer), role) for layer, role in targets))
        for layer, role in self.targets:
            self.arch.role_shape(role, layer)  # refuses a bad layer or role now
        self.inputs, self.outputs = inputs, outputs
        self._mask: torch.Tensor | None = None
        self._input_sq: dict[tuple[int, str], torch.Tensor] = {}
        self._output_sum: dict[tuple[int, str], torch.Tensor] = {}
        self._tokens: dict[tuple[int, str], int] = {}

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The ``(batch, seq)`` mask of the next forward pass: 1 for tokens to count."""
        self._mask = None if attention_mask is None else attention_mask.bool()

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``(tokens, features)`` of the counted tokens, float64."""
        if self._mask is not None and x.dim() == 3 and x.shape[:2] == self._mask.shape:
            x = x[self._mask.to(x.device)]
        return x.reshape(-1, x.shape[-1]).double()

    @contextmanager
    def recording(self) -> Iterator[RoleStatistics]:
        """Hooks on the targets' modules for the duration of the block (one hook per module; parts of
        a fused matrix share it)."""
        by_module: dict[int, tuple[torch.nn.Module, list[tuple[int, str]]]] = {}
        for layer, role in self.targets:
            module = self.arch.role_module(role, layer)
            by_module.setdefault(id(module), (module, []))[1].append((layer, role))
        rows = {key: self.arch.role_rows(key[1], key[0]) for key in self.targets}
        handles = []

        def make_hook(keys: list[tuple[int, str]]):
            def hook(_module, args, output):
                x = self._flat(args[0])
                n = x.shape[0]
                square = (x * x).sum(0) if self.inputs else None
                y = self._flat(output) if self.outputs else None
                for key in keys:
                    self._tokens[key] = self._tokens.get(key, 0) + n
                    if self.inputs:
                        self._input_sq[key] = self._input_sq.get(key, 0) + square
                    if self.outputs:
                        part = y if rows[key] is None else y[:, rows[key].to(y.device)]
                        self._output_sum[key] = self._output_sum.get(key, 0) + part.sum(0)
            return hook

        try:
            for module, keys in by_module.values():
                handles.append(module.register_forward_hook(make_hook(keys)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None

    def tokens(self, layer: int, role: str) -> int:
        """How many tokens were counted for this target."""
        return self._tokens.get((layer, role), 0)

    def _get(self, table: dict, layer: int, role: str, what: str) -> torch.Tensor:
        if (layer, role) not in table:
            raise LayerscopeError(f"no {what} recorded for role {role!r} of layer {layer}: it was not a target, "
                                  "or no forward pass ran while recording")
        return table[(layer, role)]

    def input_norm(self, layer: int, role: str) -> torch.Tensor:
        """``||X_j||_2`` per input column ``j`` over the counted tokens (float64, on the model's device)."""
        return self._get(self._input_sq, layer, role, "input statistics").sqrt()

    def output_mean(self, layer: int, role: str) -> torch.Tensor:
        """The mean output of the role over the counted tokens (float64)."""
        total = self._get(self._output_sum, layer, role, "output statistics")
        return total / max(self.tokens(layer, role), 1)
