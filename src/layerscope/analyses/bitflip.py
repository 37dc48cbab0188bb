"""Bit-flip sensitivity: flip one bit position of a few weights and measure the loss.

Two sweeps, each point stored at once (resumable):

- per bit position (``sweep="bit"``): for every bit of the model's dtype (or the chosen ones) and
  every seed, flip that bit in ``flips`` weights drawn with that seed over all targeted matrices.
  The sites depend on the seed only, so every bit is measured on the same weights of a seed (a
  paired design across bits). ``layer`` is -1 (all targeted layers) in these rows.
- per layer (``sweep="layer"``): for every targeted layer and seed, flip ``layer_bit`` (default:
  the highest exponent bit) in ``flips`` weights of that layer's targeted matrices (drawn with the
  seed ``(seed, layer)``), scored from that layer on with prefix reuse.

Metrics per point: ``loss``, ``delta`` (loss minus the unmodified model's), ``perplexity``,
``nonfinite_sites`` (flipped weights that became inf or NaN) and ``diverged`` (1 when the loss is
not finite). A destroyed model's inf/NaN loss is kept as it is, in the store and in the tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError, allowed
from ..evaluate.engine import Evaluator, ResidualCache, SequenceScores
from ..interventions.bitflip import (
    SITE_CHOICES,
    BitFlip,
    bit_field,
    bit_label,
    bit_layout,
    choose_sites,
    model_weight_dtype,
    parse_bit,
    resolve_bits,
)
from ..interventions.targets import weight_targets
from ..metrics.intervals import mean_interval
from ..models.architecture import architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .tidy import tidy_frame

PARAMS = ["sweep", "bit", "label", "field", "layer", "seed"]
METRICS = ["loss", "delta", "perplexity", "nonfinite_sites", "diverged"]
SWEEPS = ("baseline", "bit", "layer")
FIELD_COLOURS = {"sign": "#7b3294", "exponent": "#d62728", "mantissa": "#1f77b4"}


def _perplexity(loss: float) -> float:
    if not math.isfinite(loss):
        return loss if loss > 0 or math.isnan(loss) else 0.0
    return math.exp(loss) if loss < 700 else math.inf


@dataclass
class BitFlipResult:
    """All points of both sweeps (wide rows) and the unmodified model's loss."""

    rows: list[dict]
    baseline_loss: float
    dtype: str
    config: dict = field(default_factory=dict)

    # -- tables --------------------------------------------------------------------------------

    def wide(self) -> pd.DataFrame:
        """One row per point (baseline included), one column per metric."""
        return pd.DataFrame(self.rows, columns=[*PARAMS, *METRICS])

    def to_frame(self) -> pd.DataFrame:
        """The tidy table: ``sweep, bit, label, field, layer, seed, metric, value`` (one row per point
        and metric; ``layer`` is -1 for the per-bit sweep, ``bit``/``seed`` -1 for the baseline)."""
        return tidy_frame(self.rows, PARAMS, METRICS)

    def summary(self) -> pd.DataFrame:
        """Per (sweep, bit, layer): mean and 95% Student-t interval of ``delta`` over the seeds, the
        fraction of seeds whose loss diverged (inf/NaN), the median, and the mean over the seeds that
        did not diverge. The interval is NaN when a seed diverged or there is one seed."""
        frame = self.wide()
        frame = frame[frame["sweep"] != "baseline"]
        out = []
        for (sweep, bit, layer), part in frame.groupby(["sweep", "bit", "layer"], sort=False):
            delta = part["delta"].to_numpy(dtype=float)
            finite = np.isfinite(delta)
            interval = mean_interval(delta)
            out.append({
                "sweep": sweep, "bit": int(bit), "label": part["label"].iloc[0], "field": part["field"].iloc[0],
                "layer": int(layer), "n_seeds": int(len(delta)),
                "diverged_fraction": float(np.mean(~np.isfinite(part["loss"].to_numpy(dtype=float)))),
                "delta_mean": interval["mean"], "delta_lo": interval["lo"], "delta_hi": interval["hi"],
                "delta_std": interval["std"],
                "delta_median": float(np.median(np.where(np.isnan(delta), np.inf, delta))),
                "delta_finite_mean": float(delta[finite].mean()) if finite.any() else math.nan,
                "loss_mean": float(np.mean(part["loss"].to_numpy(dtype=float))),
                "nonfinite_sites_mean": float(part["nonfinite_sites"].mean()),
            })
        columns = ["sweep", "bit", "label", "field", "layer", "n_seeds", "diverged_fraction", "delta_mean", "delta_lo",
                   "delta_hi", "delta_std", "delta_median", "delta_finite_mean", "loss_mean", "nonfinite_sites_mean"]
        return pd.DataFrame(out, columns=columns)

    def per_bit(self) -> pd.DataFrame:
        """The summary rows of the per-bit sweep, highest bit first."""
        s = self.summary()
        return s[s["sweep"] == "bit"].sort_values("bit", ascending=False).reset_index(drop=True)

    def per_layer(self) -> pd.DataFrame:
        s = self.summary()
        return s[s["sweep"] == "layer"].sort_values("layer").reset_index(drop=True)

    # -- output --------------------------------------------------------------------------------

    def save(self, folder) -> list[Path]:
        """``results.csv/.parquet`` (tidy), ``summary.csv/.parquet``, ``bitflip_bits.png``, ``bitflip_layers.png``."""
        paths = [*folder.write_table(self.to_frame()), *folder.write_table(self.summary(), "summary")]
        if not self.per_bit().empty:
            paths.append(self.plot_bits(folder.path("bitflip_bits.png")))
        if not self.per_layer().empty:
            paths.append(self.plot_layers(folder.path("bitflip_layers.png")))
        return paths

    def _seed_values(self, sweep: str, key: str) -> dict[int, np.ndarray]:
        frame = self.wide()
        part = frame[frame["sweep"] == sweep]
        return {int(k): g["delta"].to_numpy(dtype=float) for k, g in part.groupby(key, sort=False)}

    def plot_bits(self, path: str | Path) -> Path:
        """Loss increase per bit position: x = bit (sign left, lowest mantissa bit right), coloured by
        field, log y; diverged seeds drawn at the top of the axis."""
        summary = self.per_bit()
        values = self._seed_values("bit", "bit")
        bits = summary["bit"].tolist()
        labels = [f"{b} {lab}" for b, lab in zip(bits, summary["label"])]
        colours = [FIELD_COLOURS[f] for f in summary["field"]]
        flips = self.config.get("flips", "?")
        title = (f"Loss increase when one bit is flipped in {flips} {self.config.get('how', 'random')} weights "
                 f"({self.dtype})")
        legend = [(FIELD_COLOURS[f], f) for f in ("sign", "exponent", "mantissa") if f in set(summary["field"])]
        return _delta_figure(labels, [values[b] for b in bits], colours, path, title=title,
                             xlabel="bit position (field)", legend=legend, baseline=self.baseline_loss)

    def plot_layers(self, path: str | Path) -> Path:
        """Loss increase per layer for the layer bit."""
        summary = self.per_layer()
        values = self._seed_values("layer", "layer")
        layers = summary["layer"].tolist()
        bit = int(summary["bit"].iloc[0])
        label = summary["label"].iloc[0]
        colour = FIELD_COLOURS[summary["field"].iloc[0]]
        title = (f"Loss increase per layer: bit {bit} ({label}) flipped in {self.config.get('flips', '?')} "
                 f"{self.config.get('how', 'random')} weights of the layer ({self.dtype})")
        return _delta_figure([str(layer) for layer in layers], [values[layer] for layer in layers], [colour] * len(layers),
                             path, title=title, xlabel="layer", legend=[], baseline=self.baseline_loss)


def _delta_figure(labels: list[str], values: list[np.ndarray], colours: list[str], path, *, title: str, xlabel: str,
                  legend: list[tuple[str, str]], baseline: float) -> Path:
    """Bars of the mean loss increase over the seeds that stayed finite (log y), each seed a dot,
    95% interval whiskers where every seed is finite; increases at or below a floor drawn on the
    floor (hollow), diverged seeds as red crosses at the top of the axis with their count."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ..report.figures import _figure, _save

    finite_positive = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values] + [np.zeros(0)])
    if finite_positive.size:
        floor = max(10.0 ** math.floor(math.log10(finite_positive.min())), 1e-9)
        top = 10.0 ** (math.ceil(math.log10(max(finite_positive.max(), floor * 10))) + 1)
    else:
        floor, top = 1e-6, 1e1
    n = len(labels)
    fig = _figure((min(max(7.0, 0.32 * n + 2.5), 22.0), 4.8))
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top)
    positions = np.arange(n)
    rng = np.random.default_rng(0)
    any_floor = any_diverged = False
    for x, v, colour in zip(positions, values, colours):
        finite = v[np.isfinite(v)]
        if finite.size:
            height = max(float(finite.mean()), floor)
            ax.bar(x, height - floor / 2, bottom=floor / 2, color=colour, alpha=0.75, width=0.75)
            if finite.size == v.size and v.size > 1:
                interval = mean_interval(v)
                lo, hi = max(interval["lo"], floor), max(interval["hi"], floor)
                ax.plot([x, x], [lo, hi], color="0.25", linewidth=0.8)
            jitter = rng.uniform(-0.2, 0.2, size=finite.size)
            shown = np.maximum(finite, floor)
            low = finite <= floor
            any_floor |= bool(low.any())
            ax.scatter(x + jitter[~low], shown[~low], s=9, color="black", zorder=3)
            ax.scatter(x + jitter[low], shown[low], s=14, facecolors="none", edgecolors="black", zorder=3)
        diverged = int((~np.isfinite(v)).sum())
        if diverged:
            any_diverged = True
            ax.scatter([x], [0.965], marker="x", s=40, color="#d62728", transform=ax.get_xaxis_transform(), zorder=4,
                       clip_on=False)
            ax.text(x, 0.91, f"{diverged}/{v.size}", transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=6, color="#d62728")
    ax.set_xticks(positions, labels, rotation=90 if n > 8 else 0, fontsize=7 if n > 16 else 9)
    ax.set_xlim(-0.7, n - 0.3)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss increase (nats/token, log)")
    handles = [Patch(color=c, alpha=0.75, label=name) for c, name in legend]
    handles.append(Line2D([], [], marker="o", linestyle="", color="black", markersize=3, label="one seed"))
    if any_floor:
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black", markersize=4,
                              label=f"one seed, increase <= {floor:.0e} (or a decrease)"))
    if any_diverged:
        handles.append(Line2D([], [], marker="x", linestyle="", color="#d62728", markersize=6,
                              label="diverged (loss inf/NaN): seeds/all"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
              title=f"unmodified loss {baseline:.4g}", title_fontsize=7)
    return _save(fig, path)


def _seeds(seeds) -> list[int]:
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise LayerscopeError("no seeds given: give at least one")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise LayerscopeError(f"seed {s!r} must be a non-negative integer")
    return list(dict.fromkeys(int(s) for s in seeds))


def run_bitflip(
    model: torch.nn.Module,
    sequences: Sequence[ScoredSequence],
    *,
    bits: str | Iterable[int | str] | None = None,
    flips: int = 10,
    seeds: Iterable[int] | int = (0, 1, 2, 3, 4),
    layers: Iterable[int] | None = None,
    roles: Iterable[str] | None = None,
    how: str = "random",
    layer_bit: int | str | None = None,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    sweeps: Sequence[str] = ("bit", "layer"),
    progress: bool = True,
) -> BitFlipResult:
    """Run the per-bit and the per-layer sweep (``sweeps`` picks them) and return every point.

    ``bits``: see :func:`~layerscope.interventions.bitflip.resolve_bits` (default every bit of the
    weights' dtype); ``layers``/``roles``: the targeted matrices (default all); ``how``: ``random``
    or ``largest`` sites (``largest`` does not depend on the seed, so only the first seed is run);
    ``layer_bit``: the bit of the per-layer sweep (default the highest exponent bit).
    """
    if how not in SITE_CHOICES:
        raise LayerscopeError(f"site choice {how!r} is unknown: allowed {allowed(SITE_CHOICES)}")
    if isinstance(flips, bool) or not isinstance(flips, (int, np.integer)) or flips < 1:
        raise LayerscopeError(f"flips {flips!r} is out of range: must be a whole number >= 1")
    unknown = [s for s in sweeps if s not in ("bit", "layer")]
    if unknown or not sweeps:
        raise LayerscopeError(f"sweep {unknown[0] if unknown else sweeps!r} is unknown: allowed bit, layer")
    seeds = _seeds(seeds)
    if how == "largest":
        seeds = seeds[:1]  # the largest weights are the same for every seed
    arch = architecture(model)
    targets = weight_targets(model, layers, roles)
    target_layers = sorted({layer for layer, _ in targets})
    target_roles = list(dict.fromkeys(role for _, role in targets))
    dtype = model_weight_dtype(model, target_layers, target_roles)
    layout = bit_layout(dtype)
    bit_list = resolve_bits(dtype, bits)
    layer_bit = layout.exponent[0] if layer_bit is None else parse_bit(dtype, layer_bit)
    for layer in target_layers:  # refuse a layer too small for the flips before any work
        size = sum(int(np.prod(arch.role_shape(role, layer))) for role in target_roles)
        if flips > size:
            raise LayerscopeError(f"flips {flips} is more than the {size} targeted weights of layer {layer}")

    evaluator = Evaluator(model, sequences, pad_id=pad_id)
    run_id = fingerprint(run_parts, {"analysis": "bitflip", "flips": int(flips), "how": how, "layers": target_layers,
                                     "roles": target_roles, "dtype": layout.name})
    state: dict = {}
    site_cache: dict = {}

    def baseline() -> tuple[SequenceScores, ResidualCache]:
        if "scores" not in state:
            state["scores"], state["cache"] = evaluator.capture(range(arch.num_layers))
        return state["scores"], state["cache"]

    def measure(flip: BitFlip, base_loss: float, cache: ResidualCache) -> dict:
        nonfinite = flip.nonfinite_after(model)
        loss = float(evaluator.score([flip], reuse=cache).mean_loss)
        return {"loss": loss, "delta": loss - base_loss, "perplexity": _perplexity(loss),
                "nonfinite_sites": nonfinite, "diverged": int(not math.isfinite(loss))}

    def compute(point: dict) -> dict:
        base, cache = baseline()
        if point["sweep"] == "baseline":
            return {"loss": base.mean_loss, "delta": 0.0, "perplexity": _perplexity(base.mean_loss),
                    "nonfinite_sites": 0, "diverged": int(not math.isfinite(base.mean_loss))}
        return measure(BitFlip(sites_for(point["sweep"], point["layer"], point["seed"]), point["bit"]),
                       base.mean_loss, cache)

    def sites_for(sweep: str, layer: int, seed: int) -> list:
        """The sites of a point (the same for every bit of a seed), chosen once and kept."""
        key = (sweep, layer, seed)
        if key not in site_cache:
            if sweep == "bit":
                site_cache[key] = choose_sites(model, count=flips, seed=seed, layers=target_layers,
                                               roles=target_roles, how=how)
            else:
                site_cache[key] = choose_sites(model, count=flips, seed=seed if how == "largest" else (seed, layer),
                                               layers=[layer], roles=target_roles, how=how)
        return site_cache[key]

    def point(sweep: str, bit: int, layer: int, seed: int) -> dict:
        described = {"label": bit_label(dtype, bit), "field": bit_field(dtype, bit)} if bit >= 0 else \
            {"label": "none", "field": "none"}
        return {"sweep": sweep, "bit": bit, **described, "layer": layer, "seed": seed}

    points = [point("baseline", -1, -1, -1)]
    if "bit" in sweeps:
        points += [point("bit", b, -1, s) for b in bit_list for s in seeds]
    if "layer" in sweeps:
        points += [point("layer", layer_bit, layer, s) for layer in target_layers for s in seeds]
    rows = run_sweep(points, compute, store, run_id, description=f"bit flips {arch.family} x{len(points)}",
                     progress=progress)
    config = {"flips": int(flips), "how": how, "seeds": seeds, "bits": list(bit_list), "layer_bit": layer_bit,
              "layer_bit_label": bit_label(dtype, layer_bit), "layers": target_layers, "roles": target_roles,
              "dtype": layout.name, "num_layers": arch.num_layers, "run_id": run_id, "sweeps": list(sweeps),
              "block_forwards": evaluator.block_forwards}
    return BitFlipResult(rows=rows, baseline_loss=float(rows[0]["loss"]), dtype=layout.name, config=config)


__all__ = ["BitFlipResult", "METRICS", "PARAMS", "run_bitflip"]
