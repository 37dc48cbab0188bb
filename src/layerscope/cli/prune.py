"""`layerscope prune`: magnitude and Wanda pruning, perplexity against sparsity, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .layer_lists import parse_names, parse_numbers

console = Console()


def prune_cmd(
    model: Annotated[str, typer.Argument(help="Registry name, local folder, .gguf file or hub id.")] = "smollm2-135m",
    method: Annotated[str, typer.Option(help="Pruning methods, comma-separated: magnitude, wanda.")] = "magnitude,wanda",
    sparsity: Annotated[Optional[str], typer.Option(help="Target sparsities in [0, 1), comma-separated, e.g. 0.1,0.3,0.5,0.7 (default 0.5; with --pattern n/m).")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="N:M semi-structured pattern instead, e.g. 2:4 (n pruned in every m input columns).")] = None,
    allocation: Annotated[str, typer.Option(help="Per-layer sparsity: uniform, or the folder of a `layerscope sensitivity` run (more sensitive layers pruned less).")] = "uniform",
    spread: Annotated[float, typer.Option(help="With a sensitivity run: layer sparsities span target - spread .. target + spread.")] = 0.08,
    data: Annotated[str, typer.Option(help="Evaluation corpus: wikitext-2 (test split), builtin, a .txt/.jsonl/.parquet file.")] = "wikitext-2",
    samples: Annotated[int, typer.Option(help="Evaluation windows drawn from the corpus.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per window (evaluation and calibration).")] = 256,
    calibration: Annotated[str, typer.Option(help="Wanda's calibration corpus (other text than --data).")] = "wikitext-2-valid",
    calibration_samples: Annotated[int, typer.Option(help="Calibration windows for Wanda.")] = 32,
    export: Annotated[Optional[Path], typer.Option(help="Save the pruned model here as a Hugging Face folder (one method, one sparsity).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/prune-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling windows (and tiny model weights).")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Prune (magnitude, Wanda; unstructured or N:M) and measure perplexity against sparsity."""
    from ..api.prune import prune

    methods = parse_names(method)
    sparsities = parse_numbers(sparsity, "--sparsity", float) if sparsity is not None else None
    result, folder = prune(model, methods=methods, sparsities=sparsities, pattern=pattern, allocation=allocation,
                           spread=spread, data=data, samples=samples, seq_len=seq_len, calibration=calibration,
                           calibration_samples=calibration_samples, export=export, out=out, seed=seed, dtype=dtype,
                           device=device, progress=not quiet)
    table = Table(title=f"pruning {model}")
    for col in ("method", "pattern", "sparsity", "perplexity", "zeros", "mask s"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(row["method"], row["pattern"], f"{row['sparsity']:g}", f"{row['perplexity']:.4f}",
                      f"{row['realised_sparsity']:.4f}", f"{row['mask_seconds']:.2f}")
    console.print(table)
    console.print("zeros: realised fraction of zero weights in the pruned matrices; mask s: seconds to compute the masks")
    if result.config.get("export"):
        console.print(f"pruned model saved in {result.config['export']}")
    console.print(f"report in {folder / 'report.html'}")
