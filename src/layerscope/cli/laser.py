"""`layerscope laser`: LASER rank-reduction sweeps with the validation/test protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .layer_lists import parse_layer_list, parse_names, parse_numbers

console = Console()



def laser_cmd(
    model: Annotated[str, typer.Argument(help="Registry name, local folder, .gguf file or hub id.")] = "smollm2-135m",
    task: Annotated[str, typer.Option(help="fever (LASER's prompt, from ../shared/data); NAME:PATH for counterfact, truthfulqa, bios-gender, bios-profession, bigbench-<subtask> (or the bare name from the hub when online); an MC task name (piqa, boolq, ...) or a *.mc.jsonl file.")] = "fever",
    samples: Annotated[Optional[int], typer.Option(help="Items drawn from the task (default: all).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Blocks to reduce, e.g. '20-29' or '3,7' (default: all).")] = None,
    lname: Annotated[str, typer.Option(help="LASER matrix names, comma-separated: fc_in fc_out fc_up mlp k_proj q_proj v_proj out_proj attn.")] = "fc_in,fc_out",
    rates: Annotated[str, typer.Option(help="LASER rates in [0, 10], comma-separated (rate r removes r tenths of the rank).")] = "1,5,9,9.5,9.9",
    compose: Annotated[int, typer.Option(help="Greedy composition: up to this many more reductions on other layers.")] = 0,
    intervention: Annotated[str, typer.Option(help="lowrank (LASER's SVD truncation) or vendi (projection onto rows chosen by greedy Vendi score, the LASER fork).")] = "lowrank",
    bandwidth: Annotated[str, typer.Option(help="Vendi RBF bandwidth: a number (the fork's 1) or median.")] = "1",
    use_quality: Annotated[bool, typer.Option("--use-quality", help="Vendi: weight the score by the mean quality exp(-|x|^2).")] = False,
    min_diversity: Annotated[bool, typer.Option("--min-diversity", help="Vendi: pick the least diverse rows instead.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/laser-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Rank-reduce one matrix at a time (LASER); choose on validation, report on test."""
    from ..api.laser import laser

    lnames = parse_names(lname)
    result, folder = laser(model, task=task, samples=samples, layers=parse_layer_list(layers), lnames=lnames,
                           rates=parse_numbers(rates, "--rates", float), compose=compose, intervention=intervention,
                           bandwidth=bandwidth if bandwidth == "median" else parse_numbers(bandwidth, "--bandwidth", float)[0],
                           use_quality=use_quality, minimize=min_diversity, out=out, seed=seed, dtype=dtype,
                           device=device, progress=not quiet)
    best, base = result.best, result.baseline
    console.print(f"chosen on validation: layer {best['layer']}, {best['lname']}, rate {best['rate']:g}")
    console.print(f"test accuracy {base['test']['accuracy']:.4f} unmodified -> {best['test']['accuracy']:.4f}; "
                  f"test log-loss {base['test']['logloss']:.4f} -> {best['test']['logloss']:.4f}")
    console.print(f"report in {folder / 'report.html'}")
