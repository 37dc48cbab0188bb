"""`layerscope noise`: loss against Gaussian or uniform weight noise, several seeds per level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .layer_lists import parse_layer_list, parse_names, parse_numbers


def noise_cmd(
    model: Annotated[str, typer.Argument(help="Registry name, local folder, .gguf file or hub id.")] = "smollm2-135m",
    levels: Annotated[Optional[str], typer.Option(help="Noise levels, comma-separated (default: relative 0.01,0.03,0.1,0.3,1; absolute 0.001,0.005,0.01,0.05,0.1,0.5).")] = None,
    seeds: Annotated[int, typer.Option(help="Noise draws per level (seeds SEED .. SEED+SEEDS-1).")] = 5,
    distribution: Annotated[str, typer.Option(help="gaussian or uniform (uniform on +-sqrt(3) sigma: the same standard deviation).")] = "gaussian",
    scale: Annotated[str, typer.Option(help="relative (sigma = level x std of each tensor) or absolute (sigma = level).")] = "relative",
    layers: Annotated[Optional[str], typer.Option(help="Blocks to noise, e.g. '20-29' or '3,7' (default: all).")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Matrices to noise, comma-separated: q k v o gate up down (default: all).")] = None,
    all_parameters: Annotated[bool, typer.Option("--all-parameters", help="Noise every floating parameter instead (embeddings, norms, biases, head).")] = False,
    data: Annotated[str, typer.Option(help="Text corpus: wikitext-2, wikitext-2-valid, builtin, a .txt/.jsonl/.parquet file.")] = "wikitext-2",
    instructions: Annotated[Optional[str], typer.Option(help="Score an instruction set's responses instead (dolly, alpaca, a .jsonl file).")] = None,
    template: Annotated[str, typer.Option(help="Instruction template: dolly, dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int, typer.Option(help="Token windows (or instruction examples) scored.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/noise-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling windows and the first noise seed.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Add random noise to the weights at several levels and seeds; loss per level with a 95% interval."""
    from ..api.noise import format_interval, noise

    result, folder = noise(model, levels=None if levels is None else parse_numbers(levels, "--levels", float),
                           seeds=seeds, distribution=distribution, scale=scale, layers=parse_layer_list(layers),
                           roles=parse_names(roles), all_parameters=all_parameters, data=data, instructions=instructions,
                           template=template, samples=samples, seq_len=seq_len, out=out, seed=seed, dtype=dtype,
                           device=device, progress=not quiet)
    table = result.summary()
    typer.echo(f"unmodified loss {result.baseline['loss']:.4f} (perplexity {result.baseline['perplexity']:.3f})")
    typer.echo(f"{'level':>10}  {'loss mean [95% interval]':<36}  delta mean [95% interval]")
    loss = table[table["metric"] == "loss"].set_index("level")
    delta = table[table["metric"] == "delta"].set_index("level")
    for level, row in loss.iterrows():
        d = delta.loc[level]
        typer.echo(f"{level:>10g}  {format_interval(row['mean'], row['lo'], row['hi'], row['n_nonfinite']):<36}  "
                   f"{format_interval(d['mean'], d['lo'], d['hi'])}")
    typer.echo(f"report in {folder / 'report.html'}")
