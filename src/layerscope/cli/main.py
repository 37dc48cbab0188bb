"""The `layerscope` command: thin wrappers that parse, call the API, and say where results went."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import LayerscopeError
from .finetune import finetune_cmd
from .bitflip import bitflip_cmd
from .laser import laser_cmd
from .noise import noise_cmd
from .prune import prune_cmd
from .sensitivity import sensitivity_cmd
from .spectral import activations_cmd, pc_remove_cmd, spectral_cmd

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find out which layers of a transformer language model matter, why, and what to do with that.",
)
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "Registry name (see `layerscope models`), local folder, .gguf file or hub id."
TEMPLATE_HELP = "Instruction template: dolly (the critical-layers paper's Llama-2 prompt), dolly-plain, alpaca, chat."


def _table(title: str, frame, columns: list[str], limit: int = 40) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for _, row in frame.head(limit).iterrows():
        table.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    return table


@app.command("models")
def models_cmd() -> None:
    """List the registry's model names."""
    from ..models.registry import describe_registry

    table = Table(title="layerscope models")
    for col in ("name", "kind", "description"):
        table.add_column(col)
    for row in describe_registry():
        table.add_row(*row)
    console.print(table)


@app.command("fetch")
def fetch_cmd(name: str = typer.Argument("smollm2-135m", help="Embedded model to download and convert.")) -> None:
    """Download and convert an embedded model into the cache (done once)."""
    from ..models.embedded import fetch_embedded

    path = fetch_embedded(name)
    console.print(f"{name} is ready in {path}")


@app.command("ablate")
def ablate_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    window: int = typer.Option(1, help="Blocks skipped together, centred on each layer."),
    role: Optional[str] = typer.Option(None, help="Zero this role (q k v o gate up down) instead of skipping whole blocks."),
    data: str = typer.Option("builtin", help="Text corpus: builtin, wikitext-2, tinyshakespeare, a .txt/.jsonl/.parquet file."),
    samples: int = typer.Option(16, help="Number of token windows drawn from the corpus."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/ablate-<timestamp>)."),
    seed: int = typer.Option(0, help="Seed for sampling windows (and tiny model weights)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda when available)."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Disable prefix reuse (for comparison)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Skip each block (or window) in turn and report the loss change per layer."""
    from ..api import ablate

    result, folder = ablate(
        model, window=window, role=role, data=data, samples=samples, seq_len=seq_len, out=out,
        seed=seed, dtype=dtype, device=device, reuse_prefix=not no_reuse, progress=not quiet,
    )
    frame = result.to_frame().sort_values("delta", ascending=False)
    console.print(_table("layers by loss change (largest first)", frame, ["layer", "layers", "loss", "delta"], limit=10))
    console.print(f"baseline loss {frame['baseline_loss'].iloc[0]:.4f}; results in {folder}")


@app.command("cka")
def cka_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    vs: Optional[str] = typer.Option(None, help="Second model: CKA between the layers of the two."),
    data: str = typer.Option("builtin", help="Text corpus (used when --instructions is not given)."),
    instructions: Optional[str] = typer.Option(None, help="Instruction set: dolly, alpaca, prune_16 or a file."),
    template: str = typer.Option("dolly", help=TEMPLATE_HELP),
    samples: int = typer.Option(64, help="Examples (or corpus windows)."),
    seq_len: int = typer.Option(128, help="Tokens per corpus window."),
    pooling: str = typer.Option("auto", help="last_prompt, last, mean, tokens (every real token, streamed; auto: last_prompt for instructions, else mean)."),
    kernel: str = typer.Option("linear", help="linear or rbf."),
    unbiased: bool = typer.Option(False, help="Unbiased HSIC estimator."),
    embeddings: bool = typer.Option(False, help="Include the embedding output as a layer."),
    window: int = typer.Option(3, help="Window w of the representation term delta."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/cka-<timestamp>)."),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Layer-by-layer CKA of a model (or between two) and its representation shifts."""
    from ..api import cka_study

    result, folder = cka_study(model, vs=vs, data=data, instructions=instructions, template=template, samples=samples,
                               seq_len=seq_len, pooling=pooling, kernel=kernel, unbiased=unbiased,
                               include_embeddings=embeddings, window=window, out=out, seed=seed, dtype=dtype, device=device)
    if result.shift is not None:
        console.print(f"largest representation shifts at layers {result.shift_layers()}; "
                      f"blocks of similar layers (change points) start at layers {result.change_points()}")
    console.print(f"CKA matrix {result.matrix.shape[0]}x{result.matrix.shape[1]} in {folder / 'cka.csv'}")


@app.command("substitute")
def substitute_cmd(
    base: str = typer.Option(..., help="The pre-fine-tuned model (" + MODEL_HELP + ")"),
    finetuned: str = typer.Option(..., help="The fine-tuned model: same family and shapes as --base."),
    window: int = typer.Option(5, help="Blocks substituted together, centred on each layer (the paper: 5)."),
    instructions: Optional[str] = typer.Option("prune_16", help="Test set: prune_16 (the paper's 300 Dolly test examples), dolly, alpaca, or a file."),
    template: str = typer.Option("dolly", help=TEMPLATE_HELP),
    data: Optional[str] = typer.Option(None, help="Measure perplexity on this corpus instead of instruction loss."),
    samples: Optional[int] = typer.Option(None, help="Examples (default: all) or corpus windows (default 16)."),
    seq_len: int = typer.Option(128, help="Tokens per corpus window (with --data)."),
    max_len: int = typer.Option(4096, help="Longest test sequence in tokens (longer ones are cut; the paper cut none)."),
    average: str = typer.Option("example", help="example (mean of per-example losses, the paper's) or token."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/substitute-<timestamp>)."),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Disable prefix reuse (for comparison)."),
    generate_examples: int = typer.Option(0, help="Also generate greedily for the first N test prompts per centre (generations.jsonl)."),
    max_new_tokens: int = typer.Option(32, help="Tokens per generation."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Put each window of the base model's blocks into the fine-tuned model; loss per centre layer."""
    from ..api import substitute

    result, folder = substitute(
        base, finetuned, window=window, instructions=None if data else instructions, template=template,
        data=data or "builtin", samples=samples, seq_len=seq_len, max_len=max_len, average=average, out=out, seed=seed,
        dtype=dtype, device=device, reuse_prefix=not no_reuse, progress=not quiet,
        generate_examples=generate_examples, max_new_tokens=max_new_tokens,
    )
    frame = result.to_frame().sort_values("loss", ascending=False)
    console.print(_table("windows by loss with base blocks (largest first)", frame,
                         ["center", "layers", "loss", "loss_reduction", "share"], limit=10))
    console.print(f"fine-tuned loss {frame['finetuned_loss'].iloc[0]:.4f}, base loss {frame['base_loss'].iloc[0]:.4f}; "
                  f"results in {folder}")


@app.command("critical-layers")
def critical_layers_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    data: list[str] = typer.Option(["dolly", "alpaca"], help="Data sets (repeatable, at least two): instruction sets "
                                   "(dolly, alpaca, prune_16, an instruction file) or corpora (wikitext-2, tinyshakespeare, builtin, a text file)."),
    template: str = typer.Option("dolly", help=TEMPLATE_HELP),
    samples: int = typer.Option(128, help="Examples (or corpus windows) per data set."),
    seq_len: int = typer.Option(128, help="Tokens per corpus window."),
    kernel: str = typer.Option("linear", help="linear or rbf."),
    unbiased: bool = typer.Option(False, help="Unbiased HSIC estimator."),
    window: int = typer.Option(3, help="Window w of the representation term delta (the paper: 3)."),
    top: int = typer.Option(3, help="Number of largest-shift layers taken as centres."),
    radius: int = typer.Option(1, help="Neighbours on each side of a centre also predicted critical."),
    edge: int = typer.Option(2, help="Leave the first and last EDGE blocks out of the candidates."),
    select: str = typer.Option("dips", help="dips (local minima of delta, by prominence) or lowest (smallest delta)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/critical-layers-<timestamp>)."),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Predict, from the pre-fine-tuned model alone, the layers fine-tuning will change most."""
    from ..api import critical_layers

    result, folder = critical_layers(model, sources=data, template=template, samples=samples, seq_len=seq_len,
                                     kernel=kernel, unbiased=unbiased, window=window, top=top, radius=radius,
                                     edge=edge, select=select, out=out, seed=seed, dtype=dtype, device=device)
    for row in result.agreement():
        console.print(f"{row['data_a']} vs {row['data_b']}: CKA matrices correlate {row['cka_matrix_pearson']:.3f}, "
                      f"delta rank correlation {row['delta_spearman']:.3f}, change points "
                      f"{row['change_points_a'] or '-'} | {row['change_points_b'] or '-'}")
    console.print(f"predicted critical layers: {','.join(map(str, result.predicted_layers()))} "
                  f"(centres {result.centres()}); control layers: {','.join(map(str, result.control_layers()))}")
    console.print(f"fine-tune them with: layerscope finetune {model} --layers {','.join(map(str, result.predicted_layers()))}")
    console.print(f"results in {folder}")


@app.command("correlate")
def correlate_cmd(
    run_a: Path = typer.Argument(..., help="A run folder of `substitute`, or of `cka`/`critical-layers`."),
    run_b: Path = typer.Argument(..., help="The other run folder."),
    column: str = typer.Option("delta", help="The representation term: delta, or one data set's delta_<name> of a critical-layers run."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/correlate-<timestamp>)."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the confidence intervals (0: none)."),
    seed: int = typer.Option(0),
) -> None:
    """Rank correlation of per-window substitution loss with the per-layer representation term."""
    from ..api import correlate

    result, folder = correlate(run_a, run_b, column=column, out=out, n_boot=n_boot, seed=seed)
    s = result.stats
    console.print(f"Spearman {s['spearman']:.4f} (p={s['spearman_p']:.3g}, 95% CI {s['spearman_ci'][0]:.3f}..{s['spearman_ci'][1]:.3f}), "
                  f"Kendall {s['kendall']:.4f} (p={s['kendall_p']:.3g}) over {s['n']} layers, with {column}")
    for name, other in s["other_columns"].items():
        console.print(f"  with {name}: Spearman {other['spearman']:.4f} (p={other['spearman_p']:.3g})")
    console.print(f"report in {folder / 'report.html'}")


app.command("finetune")(finetune_cmd)
app.command("activations")(activations_cmd)
app.command("spectral")(spectral_cmd)
app.command("pc-remove")(pc_remove_cmd)
app.command("laser")(laser_cmd)
app.command("sensitivity")(sensitivity_cmd)
app.command("bitflip")(bitflip_cmd)
app.command("noise")(noise_cmd)
app.command("prune")(prune_cmd)


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help="Text corpus for perplexity."),
    instructions: Optional[str] = typer.Option(None, help="Instruction file for response-only loss."),
    template: str = typer.Option("dolly", help=TEMPLATE_HELP),
    task: list[str] = typer.Option([], help="Multiple-choice task name or .mc.jsonl path (repeatable)."),
    samples: int = typer.Option(32, help="Windows, examples or items drawn from each source."),
    seq_len: int = typer.Option(256, help="Tokens per perplexity window."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride (default: seq_len)."),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Perplexity, instruction loss and multiple-choice accuracy, in one table."""
    from ..api import evaluate_model

    if not (data or instructions or task):
        data = "builtin"
    rows = evaluate_model(model, data=data, instructions=instructions, template=template, tasks=task,
                    samples=samples, seq_len=seq_len, stride=stride, seed=seed, dtype=dtype, device=device)
    table = Table(title=f"evaluation of {model}")
    for col in ("source", "metric", "value", "n"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["source"], row["metric"], f"{row['value']:.4f}", str(row["n"]))
    console.print(table)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    prompt: list[str] = typer.Option(..., help="Prompt (repeatable)."),
    max_new_tokens: int = typer.Option(32),
    chat: bool = typer.Option(False, help="Wrap each prompt in the tokenizer's chat template."),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Greedy generation for the given prompts."""
    from ..evaluate.generation import generate
    from ..models import load_model

    loaded, tokenizer = load_model(model, dtype=dtype, device=device, seed=seed)
    for text, completion in zip(prompt, generate(loaded, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat)):
        console.print(f"[bold]{text}[/bold]", end="")
        console.print(completion, markup=False, highlight=False)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    import click

    try:
        code = app(standalone_mode=False)
    except LayerscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err_console.print("interrupted: finished points are stored; run the same command again to resume")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
