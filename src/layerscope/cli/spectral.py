"""`layerscope activations`, `spectral` and `pc-remove`: the spectral family's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .layer_lists import parse_numbers

console = Console()

MODEL_HELP = "Registry name (see `layerscope models`), local folder, .gguf file or hub id."
DATA_HELP = "Text corpus (used when --instructions is not given): builtin, wikitext-2, tinyshakespeare or a file."
INSTR_HELP = "Instruction set: dolly, alpaca, prune_16 or a file (pooled at the last prompt token by default)."
POOL_HELP = "last_prompt, last, mean or tokens (every real token, up to --token-budget); auto: last_prompt for instructions, else mean."



def activations_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "smollm2-135m",
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "builtin",
    instructions: Annotated[Optional[str], typer.Option(help=INSTR_HELP)] = None,
    template: Annotated[str, typer.Option(help="Instruction template: dolly, dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int, typer.Option(help="Examples (or corpus windows).")] = 256,
    seq_len: Annotated[int, typer.Option(help="Tokens per corpus window.")] = 128,
    pooling: Annotated[str, typer.Option(help=POOL_HELP)] = "auto",
    token_budget: Annotated[Optional[int], typer.Option(help="With --pooling tokens: at most this many token rows.")] = None,
    skip_first: Annotated[int, typer.Option(help="With --pooling tokens: leave out each sequence's first N tokens (e.g. 1: the first token's massive activation).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Store folder (default runs/activations-<timestamp>); a rerun resumes.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Store every block's output on a data set, one memory-mapped shard per layer."""
    from ..api.spectral import activations

    store, folder = activations(model, data=data, instructions=instructions, template=template, samples=samples,
                                seq_len=seq_len, pooling=pooling, token_budget=token_budget, skip_first=skip_first,
                                out=out, seed=seed,
                                dtype=dtype, device=device, progress=not quiet)
    console.print(f"{store.num_layers} layers x {store.num_rows} rows x {store.hidden} ({store.pooling}) in {folder}")


def spectral_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "smollm2-135m",
    vs: Annotated[Optional[str], typer.Option(help="Second model (e.g. the fine-tuned one): same-layer comparison.")] = None,
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "builtin",
    instructions: Annotated[Optional[str], typer.Option(help=INSTR_HELP)] = None,
    template: Annotated[str, typer.Option(help="Instruction template: dolly, dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int, typer.Option(help="Examples (or corpus windows).")] = 256,
    seq_len: Annotated[int, typer.Option(help="Tokens per corpus window.")] = 128,
    pooling: Annotated[str, typer.Option(help=POOL_HELP)] = "auto",
    token_budget: Annotated[Optional[int], typer.Option(help="With --pooling tokens: at most this many token rows.")] = None,
    skip_first: Annotated[int, typer.Option(help="With --pooling tokens: leave out each sequence's first N tokens (e.g. 1: the first token's massive activation).")] = 0,
    k: Annotated[str, typer.Option(help="Numbers of top principal components compared, comma-separated.")] = "1,3,10",
    window: Annotated[int, typer.Option(help="Window w of the representation term delta (the paper's spectral figure: 5).")] = 5,
    keep: Annotated[int, typer.Option(help="Principal directions kept per layer (saved in pca.safetensors).")] = 32,
    sample_rows: Annotated[int, typer.Option(help="Rows used for SVCCA, PWCCA and exact CKA (more: CKA is streamed).")] = 2048,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/spectral-<timestamp>).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """PCA of every layer and canonical correlations between the top PCs of neighbouring layers
    (against the CKA term delta), or of the same layer in two models."""
    from ..api.spectral import spectral

    result, folder = spectral(model, vs=vs, data=data, instructions=instructions, template=template, samples=samples,
                              seq_len=seq_len, pooling=pooling, token_budget=token_budget, skip_first=skip_first,
                              ks=parse_numbers(k, "--k"),
                              window=window, keep=keep, sample_rows=sample_rows, out=out, seed=seed, dtype=dtype,
                              device=device, progress=not quiet)
    for column, stats in result.correlations().items():
        console.print(f"{column} against delta: Spearman {stats['spearman']:.4f} (p={stats['spearman_p']:.3g})")
    console.print(f"report in {folder / 'report.html'}")


def pc_remove_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "smollm2-135m",
    layer: Annotated[str, typer.Option(help="Block whose output is edited, or auto (the largest top-PC variance share).")] = "auto",
    top: Annotated[str, typer.Option(help="Numbers of top components removed, comma-separated.")] = "1,2,4",
    positions: Annotated[str, typer.Option(help="all (every position) or last (the last real token of each input).")] = "all",
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "builtin",
    instructions: Annotated[Optional[str], typer.Option(help="Instruction set scored on its responses (and prompts for generation).")] = None,
    template: Annotated[str, typer.Option(help="Instruction template: dolly, dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int, typer.Option(help="Examples (or corpus windows) scored.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per corpus window.")] = 128,
    pca: Annotated[Optional[Path], typer.Option(help="pca.safetensors of a spectral run (default: fit on the data's tokens).")] = None,
    prompt: Annotated[list[str], typer.Option(help="Prompt to generate from with and without the removal (repeatable).")] = [],
    generate_examples: Annotated[int, typer.Option(help="Without --prompt: this many instruction prompts of --instructions.")] = 3,
    max_new_tokens: Annotated[int, typer.Option()] = 32,
    no_control: Annotated[bool, typer.Option("--no-control", help="Skip the random-direction control.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/pc-remove-<timestamp>).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """Remove a layer's top principal components: loss change and generations side by side."""
    from ..api.spectral import pc_remove

    result, folder = pc_remove(model, layer=layer, tops=parse_numbers(top, "--top"), positions=positions, data=data,
                               instructions=instructions, template=template, samples=samples, seq_len=seq_len, pca=pca,
                               prompts=tuple(prompt), generate_examples=generate_examples,
                               max_new_tokens=max_new_tokens, control=not no_control, out=out, seed=seed, dtype=dtype,
                               device=device)
    console.print(f"layer {result.layer}: baseline loss {result.baseline_loss:.4f}")
    for row in result.rows:
        console.print(f"  {row['directions']:>6} {row['k']:>3} directions removed: loss {row['loss']:.4f} "
                      f"({row['loss_change']:+.4f})")
    for gen in result.generations:
        console.print(f"prompt ...{gen['prompt'][-80:]!r}", markup=False, highlight=False)  # prompts may hold [/INST]
        for key, text in gen.items():
            if key != "prompt":
                console.print(f"  {key}: {text!r}", markup=False, highlight=False)
    console.print(f"report in {folder / 'report.html'}")
