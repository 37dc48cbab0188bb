"""Layer substitution (Liu et al. 2025): which windows of blocks carry what fine-tuning changed.

For each centre layer ``l`` the window ``[l - w//2, l + w//2]`` of the fine-tuned model is
replaced by the base (pre-fine-tuned) model's blocks and the test loss is measured. Per centre:

* ``loss``: the fine-tuned model with that window taken from the base model;
* ``finetuned_loss`` and ``base_loss``: the two models unchanged;
* ``loss_reduction = loss - finetuned_loss``: the part of fine-tuning's loss reduction that the
  window carries (reverting it gives that much back). The paper ranks windows by ``loss`` itself,
  which orders them the same way;
* ``share = loss_reduction / (base_loss - finetuned_loss)``: the same as a fraction of the whole
  reduction fine-tuning achieved (windows overlap, so shares need not sum to 1).

The loss is averaged per example by default (the mean over examples of each example's mean token
loss, as the paper's "Average loss" over 300 Dolly test examples); ``average="token"`` weights
every scored token equally. Blocks before the window are the fine-tuned model's own, so their
output is computed once for the whole sweep (prefix reuse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..data.sequences import ScoredSequence
from ..evaluate.engine import LOSS_AVERAGES, Evaluator
from ..evaluate.generation import generate
from ..errors import LayerscopeError
from ..interventions import SubstituteBlocks, check_substitutable, intervene
from ..models.architecture import architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .windows import window_bounds, window_centres

RESULT_COLUMNS = ["center", "window_start", "window_end", "layers", "loss", "finetuned_loss", "base_loss",
                  "loss_reduction", "share"]


@dataclass
class SubstitutionResult:
    """Per-centre losses of a substitution sweep, one row per centre layer."""

    rows: list[dict]
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        return frame[[c for c in RESULT_COLUMNS if c in frame] + [c for c in frame if c not in RESULT_COLUMNS]]

    def critical_centres(self, top: int = 3) -> list[int]:
        """The centres whose window carries the largest part of fine-tuning's change."""
        frame = self.to_frame().sort_values("loss", ascending=False, kind="stable")
        return [int(c) for c in frame["center"].head(top)]

    def save(self, folder, marked: list[int] | None = None) -> list[Path]:
        """``results.csv``/``results.parquet`` and ``substitution.png`` in a run folder."""
        csv_path, parquet_path = folder.write_table(self.to_frame())
        return [csv_path, parquet_path, self.plot(folder.path("substitution.png"), marked=marked)]

    def plot(self, path: str | Path, marked: list[int] | None = None) -> Path:
        """Loss with each window substituted, the fine-tuned loss as the dashed line; the highest
        bars (or the ``marked`` centres, e.g. predicted critical layers) in colour."""
        from ..report.figures import bar_chart

        frame = self.to_frame()
        window = self.config.get("window", 5)
        return bar_chart(
            frame["center"].tolist(), frame["loss"].tolist(), path,
            title=f"Loss with base-model blocks substituted (window {window})"
                  + (" - marked: predicted layers" if marked else ""),
            xlabel="centre layer", ylabel=f"loss ({self.config.get('average', 'example')} mean, nats/token)",
            baseline=float(frame["finetuned_loss"].iloc[0]), highlight_top=None if marked else 3,
            marked=marked,
        )


def run_substitution(
    finetuned: torch.nn.Module,
    base: torch.nn.Module,
    sequences: list[ScoredSequence],
    *,
    window: int = 5,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    average: str = "example",
    reuse_prefix: bool = True,
    progress: bool = True,
    generate_prompts: list[str] | None = None,
    tokenizer=None,
    max_new_tokens: int = 32,
) -> SubstitutionResult:
    """Substitute each window of ``base``'s blocks into ``finetuned`` and score ``sequences``.

    With ``generate_prompts`` (and the ``tokenizer``), each centre also records the greedy
    continuations of those prompts with the window substituted (column ``generations``, a JSON
    list); off by default, as the paper's analysis never used its 32 generated tokens.
    Each finished centre is stored at once in ``store`` under a run id derived from ``run_parts``
    (both models' fingerprints, the data, the configuration), so a rerun resumes.
    """
    if average not in LOSS_AVERAGES:
        raise LayerscopeError(f"unknown loss average {average!r}; allowed: {', '.join(LOSS_AVERAGES)}")
    check_substitutable(finetuned, base, "base and fine-tuned models")
    if generate_prompts and tokenizer is None:
        raise LayerscopeError("generation needs the tokenizer: pass tokenizer= with generate_prompts=")
    arch = architecture(finetuned)
    centres = window_centres(arch.num_layers, window)
    evaluator = Evaluator(finetuned, sequences, pad_id=pad_id)
    run_id = fingerprint(run_parts, {"analysis": "substitute", "window": window, "average": average,
                                     **({"generate": list(generate_prompts), "max_new_tokens": max_new_tokens}
                                        if generate_prompts else {})})
    points = [{"center": c, "window": window} for c in centres]
    state: dict = {}

    def references():
        if "finetuned" not in state:
            starts = {window_bounds(c, window)[0] for c in centres} if reuse_prefix else set()
            scores, cache = evaluator.capture(starts)
            state["finetuned"], state["cache"] = scores.loss(average), (cache if reuse_prefix else None)
            state["base"] = Evaluator(base, sequences, pad_id=pad_id).score().loss(average)
        return state["finetuned"], state["base"], state["cache"]

    def compute(point: dict) -> dict:
        tuned_loss, base_loss, cache = references()
        start, end = window_bounds(point["center"], window)
        layers = list(range(start, end))
        loss = evaluator.score([SubstituteBlocks(base, layers)], reuse=cache).loss(average)
        gain = base_loss - tuned_loss
        extra = {}
        if generate_prompts:
            with intervene(finetuned, SubstituteBlocks(base, layers)):
                texts = generate(finetuned, tokenizer, generate_prompts, max_new_tokens=max_new_tokens)
            extra["generations"] = json.dumps(texts)
        return {**extra,
            "window_start": start, "window_end": end, "layers": ",".join(map(str, layers)),
            "loss": loss, "finetuned_loss": tuned_loss, "base_loss": base_loss,
            "loss_reduction": loss - tuned_loss,
            "share": (loss - tuned_loss) / gain if gain != 0 else float("nan"),
        }

    rows = run_sweep(points, compute, store, run_id, description=f"substitute {arch.family} x{len(points)}",
                     progress=progress)
    config = {"window": window, "average": average, "num_layers": arch.num_layers, "run_id": run_id,
              "block_forwards": evaluator.block_forwards}
    return SubstitutionResult(rows=rows, config=config)
