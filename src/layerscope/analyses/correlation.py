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
    alternatives: dict[str, pd.Series] = field(default_factory=dict)  # other per-layer delta columns

    @property
    def figures(self) -> list[Path]:
        return sorted(self.folder.glob("*.png"))

    def predicted_layers(self) -> list[int] | None:
        path = self.folder / "prediction.json"
        return json.loads(path.read_text())["predicted_layers"] if path.is_file() else None


def read_run(folder: str | Path, column: str = "delta") -> RunSide:
    """A substitution run (``center``, ``loss``) or a representation run (``layer`` and the
    ``column`` of its per-layer table: ``delta``, or for a critical-layers run one data set's
    ``delta_<name>``)."""
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
        deltas = [c for c in frame if c.startswith("delta")]
        if column not in deltas:
            raise LayerscopeError(f"{str(folder)!r} has no column {column!r}; allowed: {', '.join(deltas)}")
        table = frame.set_index("layer")
        return RunSide(folder, analysis, table[column].astype(float), config,
                       {c: table[c].astype(float) for c in deltas if c != column})
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


def correlate_runs(run_a: str | Path, run_b: str | Path, *, column: str = "delta", n_boot: int = 1000,
                   seed: int = 0) -> CorrelationResult:
    """Pair a substitution run with a representation run (either order) on their common layers;
    ``column`` picks the representation run's per-layer term (the others are reported beside it)."""
    sides = [read_run(run_a, column), read_run(run_b, column)]
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
    others = {name: rank_correlation(pairs["loss"], series.loc[layers].to_numpy(), n_boot=n_boot, seed=seed)
              for name, series in rep.alternatives.items()}
    stats = {**stats, "spearman_ci": list(stats["spearman_ci"]), "kendall_ci": list(stats["kendall_ci"]),
             "column": column, "layers": layers, "substitution_run": str(sub.folder), "representation_run": str(rep.folder),
             "other_columns": {name: {"spearman": r["spearman"], "spearman_p": r["spearman_p"],
                                      "spearman_ci": list(r["spearman_ci"]), "kendall": r["kendall"]}
                               for name, r in others.items()}}
    return CorrelationResult(pairs, stats, sub, rep)
