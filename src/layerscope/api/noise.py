"""The weight-noise job: loss against noise level, several seeds per level, mean and 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import LayerscopeError
from ..models import load_model, model_fingerprint
from ..runner import ResultsStore, RunFolder
from .common import build_sequences, check_positive, pad_id_of

#: Default levels per scale: relative (x std of each tensor), absolute (the seed framework's levels).
DEFAULT_LEVELS = {"relative": (0.01, 0.03, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0), "absolute": (0.001, 0.005, 0.01, 0.05, 0.1, 0.5)}


def default_levels(scale: str) -> tuple[float, ...]:
    from ..interventions.noise import SCALES, check_choice

    return DEFAULT_LEVELS[check_choice("scale", scale, SCALES)]


def noise(
    model: str = "smollm2-135m",
    *,
    levels: Sequence[float] | None = None,
    seeds: int = 5,
    distribution: str = "gaussian",
    scale: str = "relative",
    layers: list[int] | None = None,
    roles: list[str] | tuple[str, ...] | None = None,
    all_parameters: bool = False,
    data: str = "wikitext-2",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 16,
    seq_len: int = 256,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """Add noise to the weights at each level with ``seeds`` draws (noise seeds ``seed .. seed+seeds-1``),
    score the data, and report the loss per level as the mean over seeds with its 95% interval.

    Writes a run folder (``run.json``, tidy ``results.csv``, ``summary.csv`` per level, ``noise.png``,
    ``report.html``) and returns ``(result, folder)``."""
    from ..analyses.noise import check_levels, run_noise
    from ..data.sequences import sequences_fingerprint
    from ..interventions.noise import NOISE_VERSION, WeightNoise
    from ..report.html import write_report

    check_positive("seeds", seeds)
    check_positive("samples", samples)
    check_positive("seq-len", seq_len, 2)
    levels = check_levels(default_levels(scale) if levels is None else levels)
    if roles is not None:
        roles = list(dict.fromkeys(roles))
        if not roles:
            raise LayerscopeError("no roles given; give e.g. q,k,v or leave roles out for all of them")
    # refuses a bad distribution / scale / level / all_parameters with layers or roles before loading
    WeightNoise(levels[0], distribution=distribution, scale=scale, seed=seed, layers=layers, roles=roles,
                all_parameters=all_parameters)
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    seqs = build_sequences(tok, data=data, instructions=instructions, template=template, samples=samples,
                           seq_len=seq_len, seed=seed)
    noise_seeds = list(range(seed, seed + seeds))
    folder = RunFolder(Path(out) if out else None, "noise")
    config = {"analysis": "noise", "model": model, "levels": levels, "seeds": seeds, "noise_seeds": noise_seeds,
              "distribution": distribution, "scale": scale, "layers": layers, "roles": roles,
              "all_parameters": all_parameters, "data": instructions or data,
              "template": template if instructions else None, "samples": samples, "seq_len": seq_len,
              "dtype": str(net.dtype), "device": str(net.device), "n_sequences": len(seqs)}
    run_parts = {"model": model_fingerprint(net), "data": config["data"], "template": config["template"],
                 "data_fingerprint": sequences_fingerprint(seqs), "dtype": str(net.dtype),
                 "noise_version": NOISE_VERSION, "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint=run_parts)
    with ResultsStore(folder.store_path) as store:
        result = run_noise(net, seqs, levels=levels, seeds=noise_seeds, distribution=distribution, scale=scale,
                           layers=layers, roles=roles, all_parameters=all_parameters, store=store,
                           run_parts=run_parts, pad_id=pad_id_of(tok), progress=progress)
    result.config.update(config)
    paths = result.save(folder)
    table = result.summary()
    summary = {**config, "targets": result.config["n_targets"], "first changed block": result.config["first_block"],
               "unmodified loss": round(result.baseline["loss"], 6),
               "unmodified perplexity": round(result.baseline["perplexity"], 4)}
    for _, row in table[table["metric"] == "loss"].iterrows():
        summary[f"loss at level {row['level']:g}"] = format_interval(row["mean"], row["lo"], row["hi"], row["n_nonfinite"])
    sigma = "level x std(W) of each tensor" if scale == "relative" else "level"
    targets = ("every floating-point parameter (embeddings, norms, biases, head; a tied embedding once)"
               if all_parameters else "the block weight matrices of the chosen layers and roles (biases untouched)")
    write_report(folder.path("report.html"), title=f"Weight noise on {model}", summary=summary, table=table,
                 figures=[(p, "loss against noise level: mean over seeds, 95% t-interval, each seed; dashed: unmodified")
                          for p in paths if p.suffix == ".png"],
                 notes=[f"Noise of standard deviation {sigma} is added to {targets}.",
                        "Uniform noise is drawn on [-sqrt(3) sigma, sqrt(3) sigma), the same standard deviation as "
                        "the Gaussian at the same level.",
                        f"Seeds {noise_seeds[0]}..{noise_seeds[-1]}: each tensor's draw comes from its own generator "
                        "seeded by (seed, layer, role), so a seed gives the same noise direction at every level.",
                        "Interval: mean over seeds +/- t(0.975, n-1) * sd / sqrt(n); NaN where a loss is not finite "
                        "(a destroyed model) or there is a single seed.",
                        "The weights are restored bit for bit after each point."])
    return result, folder.out


def format_interval(mean: float, lo: float, hi: float, n_nonfinite: int = 0) -> str:
    """``mean [lo, hi]`` with 4 decimals; non-finite parts written as inf / nan, and how many seeds
    were not finite."""
    def f(x: float) -> str:
        return f"{x:.4f}" if math.isfinite(x) else str(float(x))

    text = f"{f(mean)} [{f(lo)}, {f(hi)}]"
    return text + (f" ({int(n_nonfinite)} non-finite)" if n_nonfinite else "")
