"""Relating the two sides of the critical-layers study: per-window substitution loss (after
fine-tuning) against the per-layer representation term delta (before fine-tuning).

The paper's claim is a strong negative rank correlation (Spearman -0.85 for Llama-2-7b-chat on
Dolly): windows around layers whose representation shifts most (small delta) carry most of what
fine-tuning changed (high loss when they are reverted to the base model's blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import LayerscopeError
from ..metrics import rank_correlation

SUBSTITUTION_RUNS = ("substitute",)
REPRESENTATION_RUNS = ("cka", "critical-layers")


@dataclass
class RunSide:
    """One input run folder: its kind, its per-layer values, and what else it offers to the report."""

    folder: Path
    analysis: str
    values: pd.Series  # indexed by layer (centre layer for substitution runs)
    config: dict = field(default_factory=dict)

    @property
    def figures(self) -> list[Path]:
        return sorted(self.folder.glob("*.png"))

    def predicted_layers(self) -> list[int] | None:
        path = self.folder / "prediction.json"
        return json.loads(path.read_text())["predicted_layers"] if path.is_file() else None


def read_run(folder: str | Path) -> RunSide:
    """A substitution run (``center``, ``loss``) or a representation run (``layer``, ``delta``)."""
    folder = Path(folder)
    run_json, results = folder / "run.json", folder / "results.csv"
    if not run_json.is_file() or not results.is_file():
        raise LayerscopeError(f"{str(folder)!r} is not a finished layerscope run folder (no run.json or results.csv)")
    config = json.loads(run_json.read_text()).get("config", {})
    analysis = config.get("analysis")
    frame = pd.read_csv(results)
    if analysis in SUBSTITUTION_RUNS:
        values = frame.set_index("center")["loss"]
    elif analysis in REPRESENTATION_RUNS:
        if "delta" not in frame:
            raise LayerscopeError(f"{str(folder)!r} is a CKA run between two models: it has no per-layer delta; "
                                  "run `layerscope cka MODEL` (one model) or `layerscope critical-layers`")
        values = frame.set_index("layer")["delta"]
    else:
        raise LayerscopeError(f"run {str(folder)!r} is a {analysis!r} run; allowed: "
                              f"{', '.join(SUBSTITUTION_RUNS + REPRESENTATION_RUNS)}")
    return RunSide(folder, analysis, values.astype(float), config)


@dataclass
class CorrelationResult:
    """Paired per-layer values and their rank correlation."""

    pairs: pd.DataFrame  # layer, loss, delta
    stats: dict
    substitution: RunSide
    representation: RunSide

    def to_frame(self) -> pd.DataFrame:
        return self.pairs

    def save(self, folder) -> list[Path]:
        from ..report.figures import scatter_chart

        paths = [*folder.write_table(self.pairs)]
        target = folder.path("correlation.json")
        target.write_text(json.dumps(self.stats, indent=2))
        paths.append(target)
        predicted = self.representation.predicted_layers()
        paths.append(scatter_chart(
            self.pairs["delta"], self.pairs["loss"], folder.path("scatter.png"), labels=self.pairs["layer"].tolist(),
            marked=predicted, xlabel="representation term delta (before fine-tuning)",
            ylabel="loss with the window substituted",
            title=f"Spearman {self.stats['spearman']:.3f}, Kendall {self.stats['kendall']:.3f} (n={self.stats['n']})"))
        return paths


def correlate_runs(run_a: str | Path, run_b: str | Path, *, n_boot: int = 1000, seed: int = 0) -> CorrelationResult:
    """Pair a substitution run with a representation run (either order) on their common layers."""
    sides = [read_run(run_a), read_run(run_b)]
    subs = [s for s in sides if s.analysis in SUBSTITUTION_RUNS]
    reps = [s for s in sides if s.analysis in REPRESENTATION_RUNS]
    if len(subs) != 1 or len(reps) != 1:
        raise LayerscopeError(f"correlate needs one substitution run and one cka/critical-layers run; got "
                              f"{sides[0].analysis!r} and {sides[1].analysis!r}")
    sub, rep = subs[0], reps[0]
    layers = sorted(set(sub.values.index) & set(rep.values.index))
    if len(layers) < 3:
        raise LayerscopeError(f"the runs share {len(layers)} layers ({layers}); at least 3 are needed "
                              "(are they runs of models with the same number of layers?)")
    pairs = pd.DataFrame({"layer": layers, "loss": sub.values.loc[layers].to_numpy(),
                          "delta": rep.values.loc[layers].to_numpy()})
    stats = rank_correlation(pairs["loss"], pairs["delta"], n_boot=n_boot, seed=seed)
    stats = {**stats, "spearman_ci": list(stats["spearman_ci"]), "kendall_ci": list(stats["kendall_ci"]),
             "layers": layers, "substitution_run": str(sub.folder), "representation_run": str(rep.folder)}
    return CorrelationResult(pairs, stats, sub, rep)
