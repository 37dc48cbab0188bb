"""`layerscope finetune`: supervised fine-tuning of chosen blocks (full or LoRA) on instruction data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .layer_lists import parse_layer_list

console = Console()

MODEL_HELP = "Base model: registry name (see `layerscope models`), local folder, .gguf file or hub id."


def finetune_cmd(
    base: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Output folder: the tuned model as a Hugging Face folder (resumes from its checkpoints).")],
    data: Annotated[str, typer.Option(help="Instruction set: dolly, alpaca, prune_16, or a .jsonl/.json file.")] = "dolly",
    template: Annotated[str, typer.Option(help="Prompt template: dolly (the critical-layers paper's Llama-2 prompt), dolly-plain, alpaca, chat.")] = "dolly",
    samples: Annotated[int | None, typer.Option(help="Training examples drawn from the data (0: all).")] = 256,
    eval_samples: Annotated[int, typer.Option(help="Other examples of the same data held out to report eval loss before/after.")] = 0,
    method: Annotated[str, typer.Option(help="full or lora.")] = "full",
    layers: Annotated[str | None, typer.Option(help="Blocks to train, e.g. '3,4,5' or '3-7', or RUN/prediction.json[:control_layers] from critical-layers (default: all).")] = None,
    freeze_layers: Annotated[str | None, typer.Option(help="Blocks never trained, e.g. '0-3'.")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training examples.")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-5 full, 2e-4 LoRA).")] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scale alpha/r).")] = 16,
    max_len: Annotated[int, typer.Option(help="Tokens per sequence (longer ones are cut on the right).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for sampling, shuffling and initialisation.")] = 0,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    save_every: Annotated[int, typer.Option(help="Optimizer steps between checkpoints (0: none).")] = 50,
    exclude: Annotated[list[str], typer.Option(help="Instruction set whose examples are never trained on, e.g. prune_16 (the paper's Dolly test set; repeatable).")] = [],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Fine-tune chosen blocks on instruction data (response-only loss); full or LoRA."""
    from ..training.job import run_finetune

    result = run_finetune(
        base, data=data, template=template, out=out, samples=samples or None, eval_samples=eval_samples,
        method=method, layers=parse_layer_list(layers), freeze_layers=parse_layer_list(freeze_layers),
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        lora_r=lora_r, lora_alpha=lora_alpha, max_len=max_len, seed=seed, dtype=dtype, device=device,
        save_every=save_every, progress=not quiet, exclude=tuple(exclude),
    )
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    console.print(
        f"{result.method} fine-tuning of layers {result.trained_layers}: {result.steps} steps{resumed}, "
        f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters trained, {result.seconds:.1f} s"
    )
    if result.losses:
        console.print(f"training loss {result.losses[0]:.4f} (first step) -> {result.losses[-1]:.4f} (last step)")
    if result.eval_loss_before is not None:
        console.print(f"eval loss {result.eval_loss_before:.4f} before -> {result.eval_loss_after:.4f} after")
    console.print(f"tuned model in {result.out_dir} (load it with `layerscope.load_model({str(result.out_dir)!r})`)")


if __name__ == "__main__":  # python -m layerscope.cli.finetune BASE --out DIR ...
    import sys

    from ..errors import LayerscopeError

    try:
        typer.run(finetune_cmd)
    except LayerscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
