"""Layer ablation: skip each block (or window of blocks) in turn and measure the loss change.

A window of ``k`` blocks centred on layer ``i`` is ``[i - k//2, i - k//2 + k)`` (for odd ``k``
exactly ``[i-k//2, i+k//2]``); only centres whose whole window lies inside the model are swept.
The sweep runs the unchanged model once, keeps the residual stream entering every window start,
and evaluates each window from its first skipped block (prefix reuse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..data.sequences import ScoredSequence
from ..evaluate.engine import Evaluator, ResidualCache, SequenceScores
from ..interventions import SkipBlock, ZeroRole
from ..models.architecture import architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .windows import window_bounds, window_centres

RESULT_COLUMNS = ["layer", "window_start", "window_end", "layers", "loss", "baseline_loss", "delta",
                  "perplexity", "baseline_perplexity"]


@dataclass
class AblationResult:
    """Per-centre losses of an ablation sweep, one row per centre layer."""

    rows: list[dict]
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        return frame[[c for c in RESULT_COLUMNS if c in frame] + [c for c in frame if c not in RESULT_COLUMNS]]

    def save(self, folder) -> list[Path]:
        """Write ``results.csv``/``results.parquet`` and ``ablation.png`` into a run folder."""
        csv_path, parquet_path = folder.write_table(self.to_frame())
        return [csv_path, parquet_path, self.plot(folder.path("ablation.png"))]

    def plot(self, path: str | Path) -> Path:
        from ..report.figures import bar_chart

        frame = self.to_frame()
        what = "skipped" if self.config.get("role") is None else f"{self.config['role']} zeroed"
        return bar_chart(
            frame["layer"].tolist(), frame["delta"].tolist(), path,
            title=f"Loss change when block windows are {what} (window {self.config.get('window', 1)})",
            xlabel="centre layer", ylabel="loss change (nats/token)", highlight_top=3,
        )


def run_ablation(
    model: torch.nn.Module,
    sequences: list[ScoredSequence],
    *,
    window: int = 1,
    role: str | None = None,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    max_tokens: int | None = None,
    reuse_prefix: bool = True,
    progress: bool = True,
    on_baseline: Callable[[SequenceScores], None] | None = None,
) -> AblationResult:
    """Skip (or, with ``role``, zero that role in) each window of blocks and score the data.

    Each finished centre is stored at once in ``store`` under a run id derived from
    ``run_parts`` (model fingerprint, data, configuration), so a rerun resumes.
    """
    arch = architecture(model)
    centres = window_centres(arch.num_layers, window)
    if role is not None:
        ZeroRole(role, centres).resolve_layers(model)  # refuse an unknown role before the baseline pass
    evaluator = Evaluator(model, sequences, pad_id=pad_id, **({"max_tokens": max_tokens} if max_tokens else {}))
    run_id = fingerprint(run_parts, {"analysis": "ablate", "window": window, "role": role})
    points = [{"layer": c, "window": window, "role": role} for c in centres]
    state: dict = {}

    def baseline() -> tuple[SequenceScores, ResidualCache | None]:
        if "baseline" not in state:
            starts = {window_bounds(c, window)[0] for c in centres} if reuse_prefix else set()
            scores, cache = evaluator.capture(starts)
            state["baseline"], state["cache"] = scores, (cache if reuse_prefix else None)
            if on_baseline:
                on_baseline(scores)
        return state["baseline"], state["cache"]

    def compute(point: dict) -> dict:
        base, cache = baseline()
        start, end = window_bounds(point["layer"], window)
        layers = list(range(start, end))
        intervention = SkipBlock(layers) if role is None else ZeroRole(role, layers)
        scores = evaluator.score([intervention], reuse=cache)
        return {
            "window_start": start, "window_end": end, "layers": ",".join(map(str, layers)),
            "loss": scores.mean_loss, "baseline_loss": base.mean_loss,
            "delta": scores.mean_loss - base.mean_loss,
            "perplexity": scores.perplexity, "baseline_perplexity": base.perplexity,
        }

    rows = run_sweep(points, compute, store, run_id, description=f"ablate {arch.family} x{len(points)}", progress=progress)
    config = {"window": window, "role": role, "num_layers": arch.num_layers, "run_id": run_id,
              "block_forwards": evaluator.block_forwards}
    return AblationResult(rows=rows, config=config)
