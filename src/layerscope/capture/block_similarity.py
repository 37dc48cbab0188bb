"""How much each block changes the residual stream: the cheap proxies of layer importance.

* Block Influence (ShortGPT, Men et al. 2024): ``BI_l = 1 - E_t[cos(x_l,t, x_{l+1},t)]``, the mean
  over every real token of one minus the cosine between block ``l``'s input and output.
* Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  ``d(l, n) = E_i[arccos(cos(x_l, x_{l+n})) / pi]`` at each sequence's last real token, between
  the input of block ``l`` and the input of block ``l+n`` (the output of the last block for
  ``l+n = L``); the block of ``n`` layers with the smallest ``d`` is the one they prune.

:class:`BlockStatistics` records both in one forward pass with hooks (nothing grows with the
number of tokens but the last-token states, one vector per sequence and block boundary), and the
mean update ``E_t[x_{l+1},t - x_l,t]`` of each block that mean ablation needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import LayerscopeError
from ..models.architecture import architecture
from .residual import block_input, block_output


class BlockStatistics:
    """Per block: summed input/output cosine and update over real tokens; last-token states."""

    def __init__(self, model: torch.nn.Module, num_sequences: int):
        self.arch = architecture(model)
        self.num_layers = self.arch.num_layers
        self.num_sequences = num_sequences
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._cos_sum = np.zeros(self.num_layers)
        self._tokens = np.zeros(self.num_layers, dtype=np.int64)
        self._update_sum: dict[int, torch.Tensor] = {}
        # last real token's state at each boundary 0..L (input of block l; L = output of the last block)
        self._last = np.full((num_sequences, self.num_layers + 1, self.arch.hidden_size), np.nan)

    def set_batch(self, attention_mask: torch.Tensor, index) -> None:
        """The next forward pass's ``(batch, seq)`` mask and the sequence number of each row."""
        self._mask = attention_mask.bool()
        self._index = torch.as_tensor(np.asarray(index), dtype=torch.long)

    @contextmanager
    def recording(self) -> Iterator[BlockStatistics]:
        inputs: dict[int, torch.Tensor] = {}
        handles = []

        def pre_hook(layer):
            def hook(_module, args, kwargs):
                inputs[layer] = block_input(args, kwargs)
            return hook

        def post_hook(layer):
            def hook(_module, _args, _kwargs, output):
                self._record(layer, inputs.pop(layer), block_output(output))
            return hook

        try:
            for layer in range(self.num_layers):
                block = self.arch.block(layer)
                handles.append(block.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
                handles.append(block.register_forward_hook(post_hook(layer), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if self._mask is None:
            raise LayerscopeError("BlockStatistics.set_batch(mask, index) must be called before each forward pass")
        mask = self._mask.to(hidden_in.device)
        x, y = hidden_in[mask].double(), hidden_out[mask].double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
        self._cos_sum[layer] += float(cos.sum())
        self._tokens[layer] += int(x.shape[0])
        update = (y - x).sum(0)
        self._update_sum[layer] = self._update_sum.get(layer, 0) + update
        last = mask.sum(dim=1) - 1
        rows = torch.arange(mask.shape[0], device=mask.device)
        index = self._index.numpy()
        self._last[index, layer] = hidden_in[rows, last].double().cpu().numpy()
        if layer == self.num_layers - 1:
            self._last[index, layer + 1] = hidden_out[rows, last].double().cpu().numpy()

    def _check(self) -> None:
        if not self._tokens.all():
            missing = int(np.flatnonzero(self._tokens == 0)[0])
            raise LayerscopeError(f"no tokens were recorded for block {missing}: run the data through the model while recording")

    def block_influence(self) -> np.ndarray:
        """``BI_l`` for every block ``l`` (float64, shape ``(L,)``)."""
        self._check()
        return 1.0 - self._cos_sum / self._tokens

    def mean_update(self, layer: int) -> torch.Tensor:
        """The mean of ``output - input`` of block ``layer`` over the real tokens (float64)."""
        self._check()
        return self._update_sum[layer] / int(self._tokens[layer])

    def angular_distance(self, span: int) -> np.ndarray:
        """``d(l, span)`` for ``l = 0 .. L - span`` (float64, shape ``(L - span + 1,)``)."""
        if not 1 <= span <= self.num_layers:
            raise LayerscopeError(f"span {span} is out of range: allowed 1..{self.num_layers}")
        self._check()
        if np.isnan(self._last).any():
            raise LayerscopeError("some sequences were not recorded: run every sequence through the model while recording")
        a = self._last[:, : self.num_layers + 1 - span]
        b = self._last[:, span:]
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
        return (np.arccos(np.clip(cos, -1.0, 1.0)) / math.pi).mean(axis=0)
