"""`run_finetune`: load a model and an instruction set, fine-tune, save (the job behind the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

from layerscope.data.corpus import pick
from layerscope.data.instructions import instruction_sequences, load_instructions
from layerscope.errors import LayerscopeError
from layerscope.models.loading import load_model

from .config import FinetuneConfig
from .sft import FinetuneResult, finetune


def _example_key(example) -> tuple[str, str]:
    return example.instruction.strip(), example.input.strip()


def without_test_examples(examples: list, exclude: list[str] | tuple[str, ...]) -> list:
    """``examples`` less those whose instruction and input (stripped) appear in any ``exclude`` set:
    e.g. the critical-layers paper's 300 Dolly test examples (7 of them are in the Dolly subset)."""
    if not exclude:
        return examples
    held_out = {_example_key(e) for source in exclude for e in load_instructions(source)}
    kept = [e for e in examples if _example_key(e) not in held_out]
    if not kept:
        raise LayerscopeError(f"every training example is also in {', '.join(map(str, exclude))}: nothing left to train on")
    return kept


def split_examples(data: str | os.PathLike, samples: int | None, eval_samples: int, seed: int,
                   exclude: list[str] | tuple[str, ...] = ()):
    """``(train, eval)`` instruction examples from one file, disjoint, none of them in ``exclude``.

    Without ``exclude``, the training examples are exactly those of
    ``load_instructions(data, limit=samples, seed=seed)`` (so adding an evaluation set does not
    change them); the evaluation examples are ``eval_samples`` drawn with the same seed from the
    examples left over, in file order. With ``exclude``, the same draws are made from the examples
    that are not in those sets."""
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 0:
        raise LayerscopeError(f"eval_samples must be a non-negative integer, got {eval_samples!r}")
    if eval_samples == 0 and not exclude:
        return load_instructions(data, limit=samples, seed=seed), []
    examples = without_test_examples(load_instructions(data), exclude)
    if eval_samples == 0:
        return [examples[i] for i in pick(len(examples), samples, seed, "samples")], []
    train_idx = pick(len(examples), samples, seed, "samples")
    taken = set(train_idx)
    rest = [i for i in range(len(examples)) if i not in taken]
    if not rest:
        raise LayerscopeError(
            f"no examples left for evaluation: {data} has {len(examples)} examples and samples={samples!r} "
            "takes them all; lower --samples or set --eval-samples 0"
        )
    eval_idx = [rest[j] for j in pick(len(rest), eval_samples, seed, "eval_samples")]
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


def run_finetune(
    base: str,
    *,
    data: str = "dolly",
    template: str = "dolly",
    out: str | os.PathLike,
    samples: int | None = 256,
    eval_samples: int = 0,
    method: str = "full",
    layers: list[int] | None = None,
    freeze_layers: list[int] | None = None,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    max_len: int = 512,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    save_every: int = 50,
    progress: bool = True,
    exclude: list[str] | tuple[str, ...] = (),
) -> FinetuneResult:
    """Fine-tune ``base`` (registry name, folder, .gguf or hub id) on an instruction set into ``out``.

    ``samples`` training examples (None: all) are drawn from ``data`` with ``seed``; with
    ``eval_samples`` > 0 that many other examples of the same file are held out and the response-only
    loss on them is reported before and after. ``lr=None`` takes the method's default (2e-5 full,
    2e-4 LoRA). ``exclude`` names instruction sets (e.g. ``prune_16``) whose examples are never
    trained on. See :class:`FinetuneConfig` for the rest."""
    config = FinetuneConfig(
        method=method, layers=layers, freeze_layers=freeze_layers, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
        seed=seed, save_every=save_every,
    )
    config.validate()  # refuse bad values before loading anything
    train_examples, eval_examples = split_examples(data, samples, eval_samples, seed, exclude)
    model, tokenizer = load_model(base, dtype=dtype, device=device, seed=seed)
    sequences = instruction_sequences(tokenizer, train_examples, template, max_len=max_len)
    eval_sequences = instruction_sequences(tokenizer, eval_examples, template, max_len=max_len) if eval_examples else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return finetune(
        model, tokenizer, sequences, Path(out), config,
        pad_id=pad_id, progress=progress, eval_sequences=eval_sequences,
    )
