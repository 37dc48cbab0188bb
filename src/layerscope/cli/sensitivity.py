"""`layerscope sensitivity`: ablate every block and weight role; proxies and their rank correlation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .layer_lists import parse_names, parse_numbers

console = Console()


def sensitivity_cmd(
    model: Annotated[str, typer.Argument(help="Registry name, local folder, .gguf file or hub id.")] = "smollm2-135m",
    units: Annotated[Optional[str], typer.Option(help="Units to ablate, comma-separated: block and roles q k v o gate up down (default: all).")] = None,
    modes: Annotated[str, typer.Option(help="Ablations: skip (blocks), zero (roles), mean (both).")] = "skip,zero,mean",
    spans: Annotated[Optional[str], typer.Option(help="Numbers of consecutive blocks skipped together (the angular distance's n; default 1,2,4,8 where the model is deep enough).")] = None,
    data: Annotated[str, typer.Option(help="Text corpus for the loss: wikitext-2, tinyshakespeare, builtin, a file.")] = "wikitext-2",
    instructions: Annotated[Optional[str], typer.Option(help="Use response-only loss on this instruction set instead.")] = None,
    template: Annotated[str, typer.Option(help="Instruction template (with --instructions).")] = "dolly",
    samples: Annotated[int, typer.Option(help="Corpus windows (or instruction examples).")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per corpus window.")] = 256,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/sensitivity-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    no_reuse: Annotated[bool, typer.Option("--no-reuse", help="Disable prefix reuse (for comparison).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Loss change when each block is skipped or mean-ablated and each role zeroed or mean-ablated,
    with Block Influence and angular distance and their rank correlation to it."""
    from ..api.sensitivity import sensitivity

    result, folder = sensitivity(model, units=parse_names(units), modes=parse_names(modes) or (), spans=parse_numbers(spans, "--spans", int) if spans else None,
                                 data=data, instructions=instructions, template=template, samples=samples, seq_len=seq_len,
                                 out=out, seed=seed, dtype=dtype, device=device, reuse_prefix=not no_reuse, progress=not quiet)
    table = result.table()
    shown = [c for c in ("block_skip", "block_mean", "o_zero", "down_zero", "block_influence", "angular_distance") if c in table]
    roles = [c for c in table.columns if c not in ("layer", "block_skip", "block_mean", "block_influence", "angular_distance")]
    header = {"block_skip": "skip", "block_mean": "mean", "o_zero": "attn off", "down_zero": "mlp off",
              "block_influence": "BI", "angular_distance": "angle"}
    view = Table(title="loss change per layer (nats/token): block skipped, mean-ablated; attention (o zero) and "
                 "MLP (down zero) removed; the worst role ablation; the proxies")
    for col in ["layer", *[header[c] for c in shown]] + (["worst role"] if roles else []):
        view.add_column(col, justify="right")
    for _, row in table.iterrows():
        cells = [str(int(row["layer"]))] + [f"{row[c]:.4f}" for c in shown]
        if roles:
            worst = max(roles, key=lambda c: row[c] if row[c] == row[c] else float("-inf"))
            cells.append(f"{worst.replace('_', ' ')} {row[worst]:.3f}")
        view.add_row(*cells)
    console.print(view)
    console.print(f"every column, every role: {folder / 'ablation_table.csv'}")
    for c in result.correlations:
        console.print(f"Spearman({c['proxy']}, {c['ablation']}, span {c['span']}) = {c['spearman']:.3f} "
                      f"(p {c['spearman_p']:.2g}), Kendall {c['kendall']:.3f}")
    console.print(f"results in {folder}")
