"""The batched forward engine every evaluation runs on, with prefix reuse.

A change at block ``i`` leaves blocks ``0..i-1`` untouched, so their outputs on the evaluation
set are the same for every variant of a sweep. :meth:`Evaluator.capture` runs the unchanged
model once and keeps the residual stream entering chosen blocks (a :class:`ResidualCache`);
:meth:`Evaluator.score` with ``reuse=`` then starts each batch at the first block the
interventions change and runs only the blocks from there on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import block_input
from ..data.batching import make_batches
from ..data.sequences import Batch, ScoredSequence
from ..errors import LayerscopeError
from ..interventions import Intervention, StartFromCache, first_changed_block, intervene
from ..models.architecture import architecture

DEFAULT_MAX_TOKENS = 4096
LOSS_AVERAGES = ("token", "example")


@dataclass
class SequenceScores:
    """Summed log-likelihood of the scored tokens of each sequence, in the sequences' order."""

    logprob: np.ndarray  # float64, shape (n_sequences,)
    n_targets: np.ndarray  # int64, shape (n_sequences,)

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean negative log-likelihood (nats per scored token)."""
        total = int(self.n_targets.sum())
        if total == 0:
            raise LayerscopeError("no scored tokens: every sequence is too short or fully masked")
        return float(-self.logprob.sum() / total)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_loss))

    @property
    def example_mean_loss(self) -> float:
        """Mean over sequences of each one's mean token loss (sequences without a scored token are
        left out): what a loop of ``model(labels=...)`` calls averages, e.g. the critical-layers
        paper's "Average loss"."""
        scored = self.n_targets > 0
        if not scored.any():
            raise LayerscopeError("no scored tokens: every sequence is too short or fully masked")
        return float(np.mean(-self.logprob[scored] / self.n_targets[scored]))

    def loss(self, average: str = "token") -> float:
        """``mean_loss`` for ``average="token"``, ``example_mean_loss`` for ``"example"``."""
        if average not in LOSS_AVERAGES:
            raise LayerscopeError(f"unknown loss average {average!r}; allowed: {', '.join(LOSS_AVERAGES)}")
        return self.mean_loss if average == "token" else self.example_mean_loss


class ResidualCache:
    """Inputs of chosen blocks, per batch; in memory up to a byte budget, then on disk.

    The budget is ``budget_bytes``, else ``$LAYERSCOPE_RESIDUAL_BUDGET_GB``, else 8 GiB (on a GPU at
    most a quarter of its free memory). A cache is valid only for the model as it was captured:
    interventions are undone before the next point, so that holds within a sweep.
    """

    def __init__(self, budget_bytes: int | None = None, store_device: torch.device | str = "cpu"):
        self.store_device = torch.device(store_device)
        env = os.environ.get("LAYERSCOPE_RESIDUAL_BUDGET_GB")
        default = float(env) * 2**30 if env else 8 * 2**30
        if budget_bytes is None and self.store_device.type == "cuda" and not env:
            # On a GPU keep at most a quarter of what is free now; the rest spills to disk.
            default = min(default, torch.cuda.mem_get_info(self.store_device)[0] // 4)
        self.budget_bytes = int(default if budget_bytes is None else budget_bytes)
        self._memory: dict[tuple[int, int], torch.Tensor] = {}
        self._disk: dict[tuple[int, int], Path] = {}
        self._used = 0
        self._spill_dir: tempfile.TemporaryDirectory | None = None
        self.blocks: set[int] = set()

    def put(self, batch: int, block: int, state: torch.Tensor) -> None:
        state = state.detach()
        size = state.numel() * state.element_size()
        if self._used + size <= self.budget_bytes:
            self._memory[(batch, block)] = state.to(self.store_device, copy=True)
            self._used += size
        else:
            if self._spill_dir is None:
                self._spill_dir = tempfile.TemporaryDirectory(prefix="layerscope-residual-")
            path = Path(self._spill_dir.name) / f"b{batch}_l{block}.pt"
            torch.save(state.cpu().clone(), path)
            self._disk[(batch, block)] = path
        self.blocks.add(block)

    def get(self, batch: int, block: int, device: torch.device) -> torch.Tensor:
        if (batch, block) in self._memory:
            return self._memory[(batch, block)].to(device)
        return torch.load(self._disk[(batch, block)], map_location=device)

    @property
    def bytes_in_memory(self) -> int:
        return self._used

    @property
    def spilled(self) -> int:
        return len(self._disk)

    def best_start(self, wanted: int) -> int:
        """The largest cached block ``<= wanted`` (0 when none: start from the embeddings)."""
        usable = [b for b in self.blocks if b <= wanted]
        return max(usable) if usable else 0


class Evaluator:
    """Scores a fixed list of sequences under any interventions, batched by length."""

    def __init__(
        self,
        model: torch.nn.Module,
        sequences: Sequence[ScoredSequence],
        *,
        pad_id: int = 0,
        batch_size: int | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        head_chunk: int = 2048,
    ):
        if not sequences:
            raise LayerscopeError("empty data set: nothing to evaluate")
        self.model = model
        self.arch = architecture(model)
        self.sequences = list(sequences)
        if batch_size is not None:
            max_tokens = None
        elif max_tokens is not None:
            max_tokens = max(max_tokens, max(len(s) for s in self.sequences))  # one long row still fits
        self.batches: list[Batch] = make_batches(self.sequences, batch_size=batch_size, max_tokens=max_tokens, pad_id=pad_id)
        self.device = next(model.parameters()).device
        self.block_forwards = 0  # number of (batch, block) forwards run, for accounting
        self.head_chunk = head_chunk

    def _forward_logprobs(self, batch: Batch) -> torch.Tensor:
        """Summed log-probability of each row's scored tokens.

        The head runs only on scored positions (instruction and multiple-choice sets score few of
        them) and in chunks of ``head_chunk`` rows, which bounds the memory of the
        ``(tokens, vocabulary)`` logits."""
        ids, mask, target = batch.input_ids, batch.attention_mask, batch.target_mask
        hidden = self.arch.base_model()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        shifted = target[:, 1:]
        selected = hidden[:, :-1][shifted]
        labels = ids[:, 1:][shifted]
        token_lp = torch.empty(labels.shape[0], dtype=torch.float64, device=ids.device)
        for lo in range(0, labels.shape[0], self.head_chunk):
            logits = self.arch.logits(selected[lo : lo + self.head_chunk]).float()
            nll = F.cross_entropy(logits, labels[lo : lo + self.head_chunk], reduction="none")
            token_lp[lo : lo + self.head_chunk] = -nll.double()
        rows = shifted.nonzero()[:, 0]
        return torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device).index_add_(0, rows, token_lp)

    def _collect(self, per_batch: list[tuple[Batch, torch.Tensor]]) -> SequenceScores:
        logprob = np.zeros(len(self.sequences), dtype=np.float64)
        n_targets = np.array([s.num_targets for s in self.sequences], dtype=np.int64)
        for batch, values in per_batch:
            logprob[batch.index] = values.cpu().numpy()
        return SequenceScores(logprob, n_targets)

    def _each_batch(self, interventions: Sequence[Intervention], reuse: ResidualCache | None, per_batch) -> list:
        """``per_batch(batch)`` for every batch with the interventions applied, starting each batch at
        the latest cached block not after the first changed block (prefix reuse)."""
        interventions = list(interventions)
        start = 0
        if reuse is not None and interventions:
            start = reuse.best_start(first_changed_block(self.model, interventions))
        results = []
        with intervene(self.model, *interventions):
            for b, batch in enumerate(self.batches):
                batch = batch.to(self.device)
                prefix = [StartFromCache(start, reuse.get(b, start, self.device))] if start else []
                with intervene(self.model, *prefix):
                    results.append((batch, per_batch(batch)))
                self.block_forwards += self.arch.num_layers - start
        return results

    @torch.inference_mode()
    def score(
        self, interventions: Sequence[Intervention] = (), *, reuse: ResidualCache | None = None
    ) -> SequenceScores:
        """Score every sequence with the interventions applied.

        With ``reuse``, each batch starts at the latest cached block not after the first block
        the interventions change; the result equals a full forward pass.
        """
        return self._collect(self._each_batch(interventions, reuse, self._forward_logprobs))

    @torch.inference_mode()
    def next_token(
        self, candidates: Sequence[Sequence[int]], interventions: Sequence[Intervention] = (), *,
        reuse: ResidualCache | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The next-token distribution after each sequence's last token: for sequence ``i`` and its
        candidate token ids ``candidates[i]``, their log-probabilities and ranks (0 = the most likely
        token of the whole vocabulary; the number of tokens strictly more likely). Returns two
        ``(n, C)`` arrays (C = the most candidates of any sequence; missing ones are NaN / -1)."""
        if len(candidates) != len(self.sequences):
            raise LayerscopeError(f"{len(candidates)} candidate lists for {len(self.sequences)} sequences: give one per sequence")
        width = max(len(c) for c in candidates)
        vocab = None

        def per_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal vocab
            hidden = self.arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            use_cache=False).last_hidden_state
            last = batch.attention_mask.sum(dim=1) - 1
            logits = self.arch.logits(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            vocab = logprobs.shape[-1]
            ids = torch.full((len(batch.index), width), -1, dtype=torch.long)
            for row, i in enumerate(batch.index):
                ids[row, : len(candidates[i])] = torch.as_tensor(list(candidates[i]), dtype=torch.long)
            ids = ids.to(logprobs.device)
            bad = ((ids < -1) | (ids >= vocab)).nonzero()
            if len(bad):
                row, col = bad[0].tolist()
                raise LayerscopeError(f"candidate token id {int(ids[row, col])} is outside the vocabulary 0..{vocab - 1}")
            chosen = logprobs.gather(1, ids.clamp(min=0))
            ranks = (logprobs[:, None, :] > chosen[:, :, None]).sum(dim=-1)
            missing = ids < 0
            return chosen.double().masked_fill(missing, float("nan")), ranks.masked_fill(missing, -1)

        logprob = np.full((len(self.sequences), width), np.nan)
        rank = np.full((len(self.sequences), width), -1, dtype=np.int64)
        for batch, (values, ranks) in self._each_batch(interventions, reuse, per_batch):
            logprob[batch.index] = values.cpu().numpy()
            rank[batch.index] = ranks.cpu().numpy()
        return logprob, rank

    @torch.inference_mode()
    def capture(
        self, blocks: Iterable[int], *, cache: ResidualCache | None = None
    ) -> tuple[SequenceScores, ResidualCache]:
        """Run the model as it is, keeping the input of each block in ``blocks``; also score it."""
        cache = cache or ResidualCache(store_device=self.device if self.device.type == "cuda" else "cpu")
        wanted = sorted({b for b in blocks if 0 < b < self.arch.num_layers})
        current = {"batch": 0}
        handles = []
        for b in wanted:
            def hook(_module, args, kwargs, block=b):
                cache.put(current["batch"], block, block_input(args, kwargs))
            handles.append(self.arch.block(b).register_forward_pre_hook(hook, with_kwargs=True))
        results = []
        try:
            for i, batch in enumerate(self.batches):
                current["batch"] = i
                batch = batch.to(self.device)
                results.append((batch, self._forward_logprobs(batch)))
                self.block_forwards += self.arch.num_layers
        finally:
            for handle in handles:
                handle.remove()
        return self._collect(results), cache
