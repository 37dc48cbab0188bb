"""The public Python API behind the CLI: each function runs one job and returns typed results."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .analyses.ablation import AblationResult, run_ablation
from .data import (instruction_sequences, lm_sequences, load_instructions, load_mc, load_texts,
                   mc_sequences)
from .data.sequences import sequences_fingerprint
from .errors import LayerscopeError
from .evaluate.engine import Evaluator
from .evaluate.tasks import mc_from_scores
from .models import load_model, model_fingerprint
from .runner import ResultsStore, RunFolder


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise LayerscopeError(f"{name} {value} is out of range: must be at least {minimum}")


def ablate(
    model: str = "smollm2-135m",
    *,
    window: int = 1,
    role: str | None = None,
    data: str = "builtin",
    samples: int = 16,
    seq_len: int = 128,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> tuple[AblationResult, Path]:
    """Skip each block (or window, or zero a role) in turn; write the run folder; return the result."""
    _check_positive("samples", samples)
    _check_positive("seq-len", seq_len, 2)
    texts = load_texts(data)
    loaded, tokenizer = load_model(model, dtype=dtype, device=device, seed=seed)
    sequences = lm_sequences(tokenizer, texts, seq_len=seq_len, samples=samples, seed=seed)
    folder = RunFolder(Path(out) if out else None, "ablate")
    fp = model_fingerprint(loaded)
    config = {"analysis": "ablate", "model": model, "window": window, "role": role, "data": data,
              "samples": samples, "seq_len": seq_len, "dtype": str(loaded.dtype), "device": str(loaded.device),
              "reuse_prefix": reuse_prefix, "n_sequences": len(sequences)}
    run_parts = {"model_fingerprint": fp, "data": data, "data_fingerprint": sequences_fingerprint(sequences), "samples": samples, "seq_len": seq_len, "seed": seed,
                 "dtype": str(loaded.dtype), "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint={"model": fp, **run_parts})
    with ResultsStore(folder.store_path) as store:
        result = run_ablation(loaded, sequences, window=window, role=role, store=store, run_parts=run_parts,
                              pad_id=_pad_id(tokenizer), reuse_prefix=reuse_prefix, progress=progress)
    result.config.update(config)
    frame = result.to_frame()
    figure = result.save(folder)[-1]
    from .report.html import write_report

    write_report(
        folder.path("report.html"),
        title=f"Layer ablation of {model}",
        summary={**config, "baseline_loss": float(frame["baseline_loss"].iloc[0]),
                 "most_important_layer": int(frame.loc[frame["delta"].idxmax(), "layer"])},
        table=frame, figures=[figure],
        notes=["delta = loss with the window skipped (or the role zeroed) minus the unchanged model's loss, "
               "in nats per scored token; layers are numbered from 0."],
    )
    return result, folder.out


def evaluate_model(
    model: str = "smollm2-135m",
    *,
    data: str | None = "builtin",
    instructions: str | None = None,
    template: str = "dolly",
    tasks: list[str] | tuple[str, ...] = (),
    samples: int = 32,
    seq_len: int = 256,
    stride: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    loaded=None,
) -> list[dict]:
    """Perplexity, instruction loss and multiple-choice accuracy as rows {source, metric, value, n}."""
    _check_positive("samples", samples)
    if loaded is None:
        loaded = load_model(model, dtype=dtype, device=device, seed=seed)
    net, tokenizer = loaded
    pad = _pad_id(tokenizer)
    rows: list[dict] = []
    if data:
        seqs = lm_sequences(tokenizer, load_texts(data), seq_len=seq_len, stride=stride, samples=samples, seed=seed)
        scores = Evaluator(net, seqs, pad_id=pad).score()
        rows += [{"source": data, "metric": "loss", "value": scores.mean_loss, "n": int(scores.n_targets.sum())},
                 {"source": data, "metric": "perplexity", "value": scores.perplexity, "n": int(scores.n_targets.sum())}]
    if instructions:
        examples = load_instructions(instructions, limit=samples, seed=seed)
        seqs = instruction_sequences(tokenizer, examples, template)
        scores = Evaluator(net, seqs, pad_id=pad).score()
        rows.append({"source": f"{instructions} ({template})", "metric": "instruction_loss",
                     "value": scores.mean_loss, "n": int(scores.n_targets.sum())})
    for task in tasks:
        items = load_mc(task, limit=samples, seed=seed)
        seqs = mc_sequences(tokenizer, items)
        result = mc_from_scores(items, seqs, Evaluator(net, seqs, pad_id=pad).score())
        rows += [{"source": task, "metric": "acc", "value": result.acc, "n": result.n_items},
                 {"source": task, "metric": "acc_norm", "value": result.acc_norm, "n": result.n_items}]
    return rows


def _study_sequences(tokenizer, *, data, instructions, template, samples, seq_len, seed):
    if instructions:
        return instruction_sequences(tokenizer, load_instructions(instructions, limit=samples, seed=seed), template)
    return lm_sequences(tokenizer, load_texts(data), seq_len=seq_len, samples=samples, seed=seed)


def cka_study(
    model: str = "smollm2-135m",
    *,
    vs: str | None = None,
    data: str = "builtin",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 64,
    seq_len: int = 128,
    pooling: str = "auto",
    kernel: str = "linear",
    unbiased: bool = False,
    include_embeddings: bool = False,
    window: int = 3,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
):
    """Layer-by-layer CKA of one model (with the representation term) or between two models."""
    from .analyses.representation import run_cka
    from .report.html import write_report

    _check_positive("samples", samples)
    if pooling == "auto":
        pooling = "last_prompt" if instructions else "mean"
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    kwargs = dict(data=data, instructions=instructions, template=template, samples=samples, seq_len=seq_len, seed=seed)
    seqs = _study_sequences(tok, **kwargs)
    other = other_tok = other_seqs = None
    if vs:
        other, other_tok = load_model(vs, dtype=dtype, device=device, seed=seed)
        other_seqs = _study_sequences(other_tok, **kwargs)
    folder = RunFolder(Path(out) if out else None, "cka")
    config = {"analysis": "cka", "model": model, "vs": vs, "data": instructions or data,
              "template": template if instructions else None, "samples": samples, "seq_len": seq_len,
              "pooling": pooling, "kernel": kernel, "unbiased": unbiased, "include_embeddings": include_embeddings,
              "window": window, "n_examples": len(seqs)}
    folder.write_run_json(config, seed=seed, fingerprint={"model": model_fingerprint(net), "data": sequences_fingerprint(seqs),
                                                          **({"vs": model_fingerprint(other)} if other is not None else {})})
    result = run_cka(net, seqs, other=other, other_sequences=other_seqs, pooling=pooling, kernel=kernel,
                     unbiased=unbiased, include_embeddings=include_embeddings, window=window,
                     pad_id=_pad_id(tok), other_pad_id=_pad_id(other_tok) if other_tok is not None else 0)
    result.config.update(config)
    paths = result.save(folder)
    summary = dict(config)
    if result.shift is not None:
        summary["largest_shift_layers"] = ", ".join(map(str, result.shift_layers()))
        summary["change_points"] = ", ".join(map(str, result.change_points())) or "none"
    write_report(folder.path("report.html"), title=f"CKA of {model}" + (f" vs {vs}" if vs else ""), summary=summary,
                 table=result.to_frame(), figures=[p for p in paths if p.suffix == ".png"],
                 notes=["CKA between the pooled outputs of blocks (the residual stream after each block).",
                        f"delta(l): mean CKA of layer l with layers l-{window // 2}..l+{window // 2}; small = large shift."])
    return result, folder.out
