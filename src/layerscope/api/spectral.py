"""Jobs of the spectral family: the activation store, the spectral study, principal-component removal."""

from __future__ import annotations

from pathlib import Path

from ..data.sequences import sequences_fingerprint
from ..errors import LayerscopeError
from ..models import load_model, model_fingerprint
from ..runner import RunFolder
from .common import build_sequences, check_positive, pad_id_of


def _pooling(pooling: str, instructions: str | None) -> str:
    """``auto``: the last prompt token for instruction sets (the paper's choice), the mean over tokens for corpora."""
    return ("last_prompt" if instructions else "mean") if pooling == "auto" else pooling


def _capture(net, tok, seqs, out: Path, *, pooling, token_budget, progress, meta, skip_first=0):
    from ..capture.activation_store import write_activations

    return write_activations(net, seqs, out, pooling=pooling, token_budget=token_budget, pad_id=pad_id_of(tok),
                             progress=progress, meta=meta, skip_first=skip_first)


def activations(
    model: str = "smollm2-135m",
    *,
    data: str = "builtin",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 256,
    seq_len: int = 128,
    pooling: str = "auto",
    token_budget: int | None = None,
    skip_first: int = 0,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """Capture every block's output on a data set into an on-disk activation store (resumable)."""
    check_positive("samples", samples)
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    seqs = build_sequences(tok, data=data, instructions=instructions, template=template, samples=samples,
                           seq_len=seq_len, seed=seed, max_len=512)
    pooling = _pooling(pooling, instructions)
    folder = RunFolder(Path(out) if out else None, "activations")
    meta = {"model": model, "data": instructions or data, "template": template if instructions else None,
            "samples": samples, "seq_len": seq_len, "seed": seed}
    store = _capture(net, tok, seqs, folder.out, pooling=pooling, token_budget=token_budget, progress=progress, meta=meta,
                     skip_first=skip_first)
    folder.write_run_json({"analysis": "activations", **meta, "pooling": pooling, "token_budget": token_budget,
                           "skip_first": skip_first,
                           "rows": store.num_rows, "layers": store.num_layers},
                          seed=seed, fingerprint={"model": model_fingerprint(net), "data": sequences_fingerprint(seqs)})
    return store, folder.out


def spectral(
    model: str = "smollm2-135m",
    *,
    vs: str | None = None,
    data: str = "builtin",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 256,
    seq_len: int = 128,
    pooling: str = "auto",
    token_budget: int | None = None,
    skip_first: int = 0,
    ks: tuple[int, ...] = (1, 3, 10),
    window: int = 5,
    keep: int = 32,
    sample_rows: int = 2048,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """PCA of every layer, neighbour-layer PC-subspace CCA against delta, and with ``vs`` the
    same-layer comparison of two models (PC-subspace CCA, SVCCA, PWCCA, CKA). The activations are
    stored under the run folder (``activations/``, ``activations-vs/``) and reused on a rerun."""
    from ..analyses.spectral import run_spectral
    from ..report.html import write_report

    check_positive("samples", samples)
    pooling = _pooling(pooling, instructions)
    folder = RunFolder(Path(out) if out else None, "spectral")
    kwargs = dict(data=data, instructions=instructions, template=template, samples=samples, seq_len=seq_len, seed=seed)
    meta = {"data": instructions or data, "template": template if instructions else None, "samples": samples,
            "seq_len": seq_len, "seed": seed}
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    seqs = build_sequences(tok, **kwargs, max_len=512)
    store = _capture(net, tok, seqs, folder.path("activations"), pooling=pooling, token_budget=token_budget,
                     progress=progress, meta={"model": model, **meta}, skip_first=skip_first)
    fingerprint = {"model": model_fingerprint(net), "data": sequences_fingerprint(seqs)}
    other = None
    if vs:
        del net  # one model in memory at a time: its activations are on disk
        other_net, other_tok = load_model(vs, dtype=dtype, device=device, seed=seed)
        other_seqs = build_sequences(other_tok, **kwargs, max_len=512)
        if pooling == "tokens" and [s.input_ids for s in other_seqs] != [s.input_ids for s in seqs]:
            raise LayerscopeError("token-level comparison of two models needs the same token sequences: the two "
                                  "tokenizers differ; use --pooling last_prompt or mean")
        if len(other_seqs) != len(seqs):
            raise LayerscopeError(f"the two models saw {len(seqs)} and {len(other_seqs)} examples: they must see the same")
        other = _capture(other_net, other_tok, other_seqs, folder.path("activations-vs"), pooling=pooling,
                         token_budget=token_budget, progress=progress, meta={"model": vs, **meta},
                         skip_first=skip_first)
        fingerprint["vs"] = model_fingerprint(other_net)
    config = {"analysis": "spectral", "model": model, "vs": vs, **meta, "pooling": pooling, "token_budget": token_budget,
              "skip_first": skip_first,
              "ks": list(ks), "window": window, "keep": keep, "sample_rows": sample_rows, "rows": store.num_rows}
    folder.write_run_json(config, seed=seed, fingerprint=fingerprint)
    result = run_spectral(store, other, ks=ks, window=window, keep=keep, sample_rows=sample_rows, seed=seed)
    result.config.update(config)
    paths = result.save(folder)
    summary = dict(config)
    for column, stats in result.correlations().items():
        summary[f"Spearman({column}, delta)"] = f"{stats['spearman']:.4f} (p={stats['spearman_p']:.3g})"
    k_top = max(result.ks)
    lowest = result.curves.nsmallest(3, f"cca_k{k_top}")["layer"].tolist()
    summary[f"layers least aligned with their neighbours (top {k_top} PCs)"] = ", ".join(map(str, lowest))
    summary["largest shift layers (smallest delta)"] = ", ".join(map(str, result.curves.nsmallest(3, "delta")["layer"]))
    summary["layer with the most dominant top PC"] = (
        f"{int(result.spectra['var_top1'].idxmax())} ({result.spectra['var_top1'].max():.1%} of its variance)")
    table = result.curves if result.versus is None else result.curves.merge(
        result.versus.drop(columns=["label"]).add_prefix("vs_").rename(columns={"vs_layer": "layer"}), on="layer")
    table = table.merge(result.spectra.drop(columns=["layer"]).assign(layer=range(len(result.spectra))), on="layer")
    notes = ["cca_k<k>: the mean canonical correlation between the top-k principal-component scores of layer l and "
             "of each of layers l-2, l-1, l+1, l+2 (those that exist), averaged (the paper's Figure 3), computed "
             "exactly from the streamed cross products of the scores.",
             f"delta: mean linear CKA of layer l with layers l-{window // 2}..l+{window // 2}; small = large shift.",
             "effective rank: exp of the entropy of the normalised covariance spectrum; participation ratio: "
             "(sum of eigenvalues)^2 / sum of squares."]
    if result.versus is not None:
        notes.append("vs_*: the same layer of the two models. SVCCA keeps 99% of each side's variance; PWCCA weights "
                     f"by the first model's neurons; both on up to {sample_rows} rows. They are left empty (few_samples) "
                     "when there are fewer rows than twice the dimensions correlated: CCA then finds correlations "
                     "near 1 in noise (with n <= width, PWCCA is exactly 1). Use --pooling tokens with a "
                     "--token-budget well above the width.")
    write_report(folder.path("report.html"), title=f"Spectral analysis of {model}" + (f" vs {vs}" if vs else ""),
                 summary=summary, table=table, figures=[p for p in paths if p.suffix == ".png"], notes=notes)
    return result, folder.out


def pc_remove(
    model: str = "smollm2-135m",
    *,
    layer: int | str = "auto",
    tops: tuple[int, ...] = (1, 2, 4),
    positions: str = "all",
    data: str = "builtin",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 32,
    seq_len: int = 128,
    pca: str | Path | None = None,
    prompts: tuple[str, ...] = (),
    generate_examples: int = 3,
    max_new_tokens: int = 32,
    control: bool = True,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
):
    """Remove a layer's top principal components and report the loss change (against as many
    random directions) and greedy generations with and without the removal, side by side.

    ``layer="auto"`` takes the layer whose top component carries the largest share of variance."""
    from ..analyses.pc_removal import fit_layer_pca, run_pc_removal
    from ..analyses.spectral import load_directions
    from ..models.architecture import architecture
    from ..report.html import write_report

    check_positive("samples", samples)
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    n_layers = architecture(net).num_layers
    seqs = build_sequences(tok, data=data, instructions=instructions, template=template, samples=samples,
                           seq_len=seq_len, seed=seed, max_len=512)
    chosen_by, basis = "given", None
    if layer == "auto":
        layer, basis = _auto_layer(net, tok, seqs, keep=max(max(tops), 8))
        chosen_by = "largest top-PC variance share"
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        raise LayerscopeError(f"layer {layer!r} is not valid: allowed are auto or 0..{n_layers - 1}") from None
    if not -n_layers <= layer < n_layers:
        raise LayerscopeError(f"layer {layer} is out of range: allowed are auto or 0..{n_layers - 1}")
    layer %= n_layers
    if pca:
        basis = load_directions(pca, str(layer))
    elif basis is None:
        basis = fit_layer_pca(net, seqs, layer, pad_id=pad_id_of(tok), keep=max(max(tops), 8))
    texts = list(prompts)
    if not texts and generate_examples and instructions:
        from ..data import load_instructions
        from ..data.instructions import render

        texts = [render(ex, template, tok)[0] for ex in load_instructions(instructions, limit=samples, seed=seed)[:generate_examples]]
    result = run_pc_removal(net, seqs, layer, basis, tops=tops, positions=positions, control=control, seed=seed,
                            pad_id=pad_id_of(tok), prompts=texts, tokenizer=tok, max_new_tokens=max_new_tokens)
    folder = RunFolder(Path(out) if out else None, "pc-remove")
    config = {"analysis": "pc-remove", "model": model, "layer": layer, "layer_chosen_by": chosen_by, "tops": list(tops),
              "positions": positions, "data": instructions or data, "template": template if instructions else None,
              "samples": samples, "seq_len": seq_len, "pca": str(pca) if pca else "fitted on the data's tokens",
              "control": control, "prompts": texts}
    folder.write_run_json(config, seed=seed, fingerprint={"model": model_fingerprint(net), "data": sequences_fingerprint(seqs)})
    result.config.update(config)
    paths = result.save(folder)
    frame = result.to_frame()
    summary = {k: v for k, v in config.items() if k != "prompts"}
    summary["baseline_loss"] = result.baseline_loss
    if result.explained_variance_ratio:
        summary["variance share of the top components"] = ", ".join(f"{r:.1%}" for r in result.explained_variance_ratio)
    for _, row in frame.iterrows():
        summary[f"loss change, {row['directions']} {row['k']}"] = round(float(row["loss_change"]), 5)
    import pandas as pd

    table = pd.DataFrame(result.generations) if result.generations else frame
    write_report(folder.path("report.html"), title=f"Principal-component removal at layer {layer} of {model}",
                 summary=summary, table=table, figures=[p for p in paths if p.suffix == ".png"],
                 notes=["h <- h - V V^T (h - mu) on block l's output, mu and V from a PCA of that output over the "
                        "data's tokens, computed once. 'random': as many random orthonormal directions (seeded).",
                        "Generations (greedy): original; the top component(s) removed at the last prompt token only "
                        "(the paper's case study; the edit persists through the key/value cache); removed at every "
                        "position including generated ones."])
    return result, folder.out


def _auto_layer(net, tok, seqs, *, keep: int):
    """The block whose output's top principal direction carries the largest share of variance over
    the data's tokens, and that block's PCA: one capture pass into a temporary activation store."""
    import tempfile

    import pandas as pd

    from ..analyses.pc_removal import outlier_layer
    from ..analyses.spectral import layer_spectrum
    from ..capture.activation_store import write_activations
    from ..metrics import PCAResult

    with tempfile.TemporaryDirectory() as tmp:
        store = write_activations(net, seqs, Path(tmp) / "store", pooling="tokens", pad_id=pad_id_of(tok))
        spectra = [layer_spectrum(store, i, keep=keep) for i in range(store.num_layers)]
    layer = outlier_layer(pd.DataFrame([sp.summary() for sp in spectra]))
    sp = spectra[layer]
    ev = sp.eigenvalues[: len(sp.components)]
    ratio = ev / sp.total_variance if sp.total_variance > 0 else ev * 0
    return layer, PCAResult(mean=sp.mean, components=sp.components, explained_variance=ev, explained_variance_ratio=ratio)
