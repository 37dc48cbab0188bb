"""`layerscope bitflip`: flip bit positions of a few weights; loss per bit position and per layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .layer_lists import parse_layer_list, parse_names

console = Console()


def _number(x: float) -> str:
    return f"{x:.2g}" if math.isfinite(x) else str(float(x))


def bitflip_cmd(
    model: Annotated[str, typer.Argument(help="Registry name, local folder, .gguf file or hub id.")] = "smollm2-135m",
    bits: Annotated[str, typer.Option(help="Bit positions of the per-bit sweep: all, sign, exponent, mantissa, labels "
                                           "(exp7, man0) or positions (30,29), comma-separated.")] = "all",
    flips: Annotated[int, typer.Option(help="Weights flipped at once in each point.")] = 10,
    seeds: Annotated[int, typer.Option(help="Draws of the flipped weights per point (seeds seed..seed+seeds-1).")] = 5,
    layers: Annotated[Optional[str], typer.Option(help="Targeted blocks, e.g. '20-29' or '3,7' (default: all).")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Targeted roles, comma-separated: q k v o gate up down (default: all).")] = None,
    target: Annotated[str, typer.Option(help="random (uniform over the weights) or largest (largest |w|).")] = "random",
    layer_bit: Annotated[Optional[str], typer.Option(help="Bit of the per-layer sweep: a position or label (default: "
                                                          "the highest exponent bit).")] = None,
    data: Annotated[str, typer.Option(help="Text corpus: wikitext-2, wikitext-2-valid, builtin, a .txt/.jsonl/.parquet file.")] = "wikitext-2",
    instructions: Annotated[Optional[str], typer.Option(help="Score an instruction set's responses instead of a corpus.")] = None,
    template: Annotated[str, typer.Option(help="Instruction template: dolly, dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int, typer.Option(help="Token windows (or instruction examples) scored.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/bitflip-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option(help="First seed (data windows and weight choice).")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16, float16: the format whose bits are flipped.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Flip bit positions (sign, exponent, mantissa) of a few weights; loss per bit and per layer."""
    from ..api.bitflip import bitflip

    result, folder = bitflip(model, bits=bits, flips=flips, seeds=seeds, layers=parse_layer_list(layers),
                             roles=parse_names(roles), how=target, layer_bit=layer_bit, data=data, instructions=instructions,
                             template=template, samples=samples, seq_len=seq_len, out=out, seed=seed, dtype=dtype,
                             device=device, progress=not quiet)
    table = Table(title=f"loss increase per flipped bit ({result.dtype}, {result.config['flips']} weights, "
                        f"unmodified loss {result.baseline_loss:.4f})")
    for col in ("bit", "field", "loss increase", "95% interval", "diverged"):
        table.add_column(col, justify="right")
    for _, row in result.per_bit().iterrows():
        table.add_row(f"{int(row['bit'])} {row['label']}", row["field"], _number(row["delta_mean"]),
                      f"[{_number(row['delta_lo'])}, {_number(row['delta_hi'])}]", f"{row['diverged_fraction']:.0%}")
    console.print(table)
    per_layer = result.per_layer()
    if not per_layer.empty:
        worst = per_layer.iloc[int(per_layer["delta_median"].to_numpy().argmax())]
        console.print(f"per layer (bit {int(worst['bit'])}, {worst['label']}): most sensitive layer {int(worst['layer'])}, "
                      f"median delta {_number(worst['delta_median'])}")
    console.print(f"report in {folder / 'report.html'}")
