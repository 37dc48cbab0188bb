"""Supervised fine-tuning with a response-only loss, of chosen blocks, full or with LoRA.

The critical-layers study (Liu et al. 2025, "Spectral Insights into Data-Oblivious Critical
Layers") fine-tunes only chosen blocks (``layers``) or keeps chosen blocks frozen
(``freeze_layers``, its backdoor defence)::

    model, tok = load_model("smollm2-135m")
    seqs = instruction_sequences(tok, load_instructions("dolly", limit=256), "dolly", max_len=256)
    result = finetune(model, tok, seqs, "runs/ft", FinetuneConfig(layers=[3, 4, 5]))
    # model now holds the tuned weights; runs/ft is a Hugging Face folder (load_model("runs/ft"))

Loss: the token-weighted mean cross-entropy over the scored positions (``target_mask``) of all
micro-batches of an optimizer step; the logits at ``t-1`` predict token ``t``. The order of the
sequences is shuffled each epoch with a generator seeded from ``seed + epoch``, then sorted by
length within runs of 16 batches (:func:`length_grouped`, less padding); micro-batches are
consecutive slices of that order, right-padded. The same seed and data give the same weights.

Precision: training runs in the model's own dtype. Logits and the loss are float32. With LoRA the
adapters are float32 (peft's default) whatever the base dtype, so their gradients and AdamW state
are float32. Full fine-tuning of a bfloat16/float16 model keeps bfloat16/float16 weights, gradients
and AdamW state: acceptable for short runs; load the model in float32 (``dtype="float32"``) for
long ones (small updates round away in bfloat16).

Checkpoints (see :mod:`layerscope.training.checkpoints`) are written every ``save_every`` optimizer
steps; a run started again with the same configuration, base model and data resumes from the
latest and ends with the same weights as an uninterrupted run. After the final folder is written the
checkpoints are deleted: the folder supersedes them.

If training fails (an exception, Ctrl-C), the model is put back as it was: LoRA adapters are
removed, fully trained parameters are restored from a CPU copy taken at the start, ``requires_grad``
flags and eval mode are restored. Run the same call again to resume from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from layerscope.data.batching import pad_batch
from layerscope.data.sequences import Batch, ScoredSequence, sequences_fingerprint
from layerscope.errors import LayerscopeError
from layerscope.models.architecture import Architecture, architecture
from layerscope.models.loading import model_fingerprint

from . import checkpoints as ckpt
from .config import FinetuneConfig
from .selection import (
    TrainSetup,
    restore,
    restore_flags,
    setup_full,
    setup_lora,
    snapshot,
    unique_parameters,
)

#: Packages whose versions ``finetune.json`` records.
RECORDED_PACKAGES = ("layerscope", "torch", "transformers", "peft", "safetensors", "tokenizers")

StepCallback = Callable[[int, float], object]


@dataclass
class FinetuneResult:
    """What a fine-tuning run did. ``losses[i]``/``lrs[i]`` belong to optimizer step ``i + 1``."""

    out_dir: Path
    steps: int
    losses: list[float]
    trainable_parameters: int
    total_parameters: int
    trained_layers: list[int]
    method: str = "full"
    lrs: list[float] = field(default_factory=list)
    frozen_layers: list[int] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    resumed_from: int | None = None
    seconds: float = 0.0

    def to_frame(self) -> pd.DataFrame:
        """One row per optimizer step: ``step`` (from 1), ``loss``, ``lr``."""
        n = len(self.losses)
        lrs = list(self.lrs) + [float("nan")] * (n - len(self.lrs))
        return pd.DataFrame({"step": list(range(1, n + 1)), "loss": list(self.losses), "lr": lrs[:n]})


# ----------------------------------------------------------------------------------------------
# Data


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` sequences in ``epoch`` (a generator seeded with ``seed + epoch``)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def length_grouped(order: list[int], lengths: Sequence[int], batch_size: int, group: int = 16) -> list[int]:
    """The shuffled order, sorted by length (longest first) within each run of ``group`` batches,
    so a batch holds sequences of similar length and little padding (as transformers'
    ``group_by_length``); batches stay random at the scale of the group."""
    size = batch_size * group
    out: list[int] = []
    for lo in range(0, len(order), size):
        out += sorted(order[lo : lo + size], key=lambda i: -lengths[i])
    return out


def summed_nll(arch: Architecture, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy (float32) of the scored tokens of a batch; the head runs on those only."""
    hidden = arch.base_model()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    shifted = batch.target_mask[:, 1:]
    logits = arch.logits(hidden[:, :-1][shifted]).float()
    return F.cross_entropy(logits, batch.input_ids[:, 1:][shifted], reduction="sum")


def _check_sequences(sequences: Sequence[ScoredSequence], what: str) -> None:
    if not sequences:
        raise LayerscopeError(f"empty data set: no {what} sequences")
    for i, seq in enumerate(sequences):
        if not isinstance(seq, ScoredSequence):
            raise LayerscopeError(f"{what} sequence {i} is a {type(seq).__name__}, not a ScoredSequence")
        if seq.num_targets == 0:
            raise LayerscopeError(f"{what} sequence {i} has no scored token (its target_mask is all False)")


def _plan(n: int, config: FinetuneConfig) -> tuple[int, int]:
    """``(steps per epoch, total optimizer steps)``."""
    micro = math.ceil(n / config.batch_size)
    per_epoch = math.ceil(micro / config.grad_accum)
    if config.max_steps is not None:
        return per_epoch, config.max_steps
    return per_epoch, max(1, math.ceil(config.epochs * per_epoch - 1e-9))


def _lr_factor(config: FinetuneConfig, total: int) -> Callable[[int], float]:
    warmup = config.warmup_steps
    linear = config.lr_schedule == "linear"

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not linear:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _optimizer(params: dict[str, nn.Parameter], config: FinetuneConfig) -> torch.optim.AdamW:
    decay = [p for p in params.values() if p.dim() >= 2]
    other = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def eval_loss(model: nn.Module, sequences: Sequence[ScoredSequence], pad_id: int) -> float:
    """Token-weighted mean loss of the scored tokens (the evaluation engine's ``mean_loss``)."""
    from layerscope.evaluate.engine import Evaluator

    was_training = model.training
    model.eval()
    try:
        return Evaluator(model, sequences, pad_id=pad_id).score().mean_loss
    finally:
        model.train(was_training)


def _versions() -> dict[str, str]:
    out = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _save_folder(model: nn.Module, tokenizer, out_dir: Path, quiet: bool) -> None:
    """``save_pretrained`` of model and tokenizer; transformers' own progress bar only when not quiet."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


# ----------------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    tokenizer,
    sequences: list[ScoredSequence],
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    pad_id: int = 0,
    progress: bool = True,
    eval_sequences: list[ScoredSequence] | None = None,
    callback: StepCallback | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``sequences`` and save it as a Hugging Face folder ``out_dir``.

    ``out_dir`` gets ``config.json`` + ``model.safetensors`` (the tuned, merged model), the
    tokenizer, ``finetune.json`` (configuration, base source and fingerprint, trained layers, losses,
    versions) and, for LoRA, the adapter alone under ``adapter/``. ``out_dir`` must be absent or
    empty, or hold checkpoints of this very run (same configuration, base model and data), which is
    then resumed. On return ``model`` is a plain model with the tuned weights, in eval mode, and its
    recorded source is ``out_dir``. ``callback(step, loss)`` is called after every optimizer step
    (and its checkpoint); an exception it raises stops the run like any other failure.
    With ``eval_sequences`` the token-weighted eval loss is measured before and after.
    """
    config = config or FinetuneConfig()
    start_time = time.perf_counter()
    arch = architecture(model)
    resolved = config.resolved(arch.num_layers)
    trained, frozen = config.select_layers(arch.num_layers)
    _check_sequences(sequences, "training")
    if eval_sequences is not None:
        _check_sequences(eval_sequences, "evaluation")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise LayerscopeError(f"pad_id must be an integer token id, got {pad_id!r}")
    out_dir = Path(out_dir)
    sequences = list(sequences)
    device = next(model.parameters()).device
    identity = {
        "config": resolved,
        "base_fingerprint": model_fingerprint(model),
        "data_fingerprint": sequences_fingerprint(sequences),
        "pad_id": pad_id,
    }
    resume_from = ckpt.resumable(out_dir, identity)
    base_source = getattr(model, "_layerscope_source", None)
    total_parameters = unique_parameters(model)

    eval_before = eval_loss(model, eval_sequences, pad_id) if eval_sequences else None

    per_epoch, total = _plan(len(sequences), config)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    setup: TrainSetup | None = None
    saved: dict[str, torch.Tensor] | None = None
    finished = False
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(config.seed)
            if config.method == "lora":
                setup = setup_lora(model, arch, config, trained)
            else:
                setup = setup_full(model, arch, config, trained)
                saved = snapshot(setup.params)
            optimizer = _optimizer(setup.params, config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total))
            step, epoch, position = 0, 0, 0
            losses: list[float] = []
            lrs: list[float] = []
            resumed_from = None
            if resume_from is not None:
                state = ckpt.load_checkpoint(
                    resume_from, params=setup.params, optimizer=optimizer, scheduler=scheduler, device=device
                )
                step, epoch, position = state["step"], state["epoch"], state["position"]
                losses, lrs = list(state["losses"]), list(state["lrs"])
                resumed_from = step
            model.train()
            lengths = [len(s) for s in sequences]
            params = list(setup.params.values())
            with _progress(progress) as bar:
                task = bar.add_task("train", total=total, completed=step, loss=f"{losses[-1]:.4f}" if losses else "-")
                while step < total:
                    order = length_grouped(epoch_order(len(sequences), config.seed, epoch), lengths, config.batch_size)
                    micro = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
                    this_epoch = epoch
                    while epoch == this_epoch and step < total:
                        chunk = micro[position : position + config.grad_accum]
                        batches = [pad_batch(sequences, idx, pad_id) for idx in chunk]
                        n_targets = sum(int(b.target_mask[:, 1:].sum()) for b in batches)
                        optimizer.zero_grad(set_to_none=True)
                        total_nll = 0.0
                        for batch in batches:
                            nll = summed_nll(arch, batch.to(device))
                            (nll / n_targets).backward()
                            total_nll += float(nll.detach())
                        if config.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                        lr = float(optimizer.param_groups[0]["lr"])
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        position += len(chunk)
                        if position >= len(micro):
                            epoch, position = epoch + 1, 0
                        loss = total_nll / n_targets
                        losses.append(loss)
                        lrs.append(lr)
                        if config.save_every and step % config.save_every == 0 and step < total:
                            ckpt.save_checkpoint(
                                out_dir, step=step, epoch=epoch, position=position, identity=identity,
                                params=setup.params, optimizer=optimizer, scheduler=scheduler,
                                losses=losses, lrs=lrs, device=device,
                            )
                        bar.update(task, completed=step, loss=f"{loss:.4f}")
                        if callback is not None:
                            callback(step, loss)
            del optimizer, scheduler
        model.eval()
        trainable = setup.num_trainable
        targets = list(setup.lora_targets)
        out_dir.mkdir(parents=True, exist_ok=True)
        if setup.peft_model is not None:
            setup.peft_model.save_pretrained(str(out_dir / "adapter"), save_embedding_layers=False)
            merged = setup.peft_model.merge_and_unload()
            if merged is not model:  # pragma: no cover - peft changes the model in place
                raise LayerscopeError("peft returned a new model object on merge; cannot hand back the tuned model")
            setup = None
        restore_flags(model, flags)
        finished = True
    finally:
        if not finished:
            if setup is not None and setup.peft_model is not None:
                setup.peft_model.unload()
            elif setup is not None and saved is not None:
                restore(setup.params, saved)
            restore_flags(model, flags)
            model.eval()

    _save_folder(model, tokenizer, out_dir, quiet=not progress)
    eval_after = eval_loss(model, eval_sequences, pad_id) if eval_sequences else None
    model._layerscope_source = str(out_dir)
    result = FinetuneResult(
        out_dir=out_dir,
        steps=len(losses),
        losses=losses,
        lrs=lrs,
        trainable_parameters=trainable,
        total_parameters=total_parameters,
        trained_layers=list(trained),
        frozen_layers=list(frozen),
        lora_targets=targets,
        method=config.method,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - start_time,
    )
    record = {
        "config": resolved,
        "base_source": base_source,
        "base_fingerprint": identity["base_fingerprint"],
        "data_fingerprint": identity["data_fingerprint"],
        "tuned_fingerprint": model_fingerprint(model),
        "pad_id": pad_id,
        "num_sequences": len(sequences),
        "steps_per_epoch": per_epoch,
        "steps": result.steps,
        "trained_layers": result.trained_layers,
        "frozen_layers": result.frozen_layers,
        "lora_targets": result.lora_targets,
        "trainable_parameters": trainable,
        "total_parameters": total_parameters,
        "losses": losses,
        "lrs": lrs,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "resumed_from": resumed_from,
        "seconds": result.seconds,
        "versions": _versions(),
    }
    (out_dir / "finetune.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    ckpt.remove_checkpoints(out_dir)
    return result

