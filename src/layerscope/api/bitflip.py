"""The bit-flip job: loss per flipped bit position and per layer, several seeds, mean and 95% interval."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from .. import __version__
from ..errors import LayerscopeError, allowed
from ..models import load_model, model_fingerprint
from ..runner import ResultsStore, RunFolder
from .common import build_sequences, check_positive, pad_id_of

_FIELD_WORDS = ("all", "sign", "exponent", "exp", "mantissa", "man")


def _precheck_bits(bits) -> None:
    """Refuse a bit specification that no dtype accepts (exact ranges are checked once the model's
    dtype is known)."""
    if bits is None:
        return
    tokens = [t.strip() for t in bits.split(",")] if isinstance(bits, str) else list(bits)
    if isinstance(bits, str) and not [t for t in tokens if t]:
        raise LayerscopeError(f"--bits {bits!r} is empty: allowed all, sign, exponent, mantissa, labels such as "
                              "exp7 or man0, or bit positions such as 30,29")
    for token in tokens:
        if isinstance(token, str):
            text = token.strip().lower()
            if not text or text in _FIELD_WORDS:
                continue
            if text.isdigit():
                token = int(text)
            elif (text.startswith("exp") and text[3:].isdigit()) or (text.startswith("man") and text[3:].isdigit()):
                continue
            else:
                raise LayerscopeError(f"bit {token!r} is not understood: allowed all, sign, exponent, mantissa, labels "
                                      "such as exp7 or man0, or bit positions such as 30")
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < 32:
            raise LayerscopeError(f"bit {token!r} is out of range: allowed 0..31 (float32) or 0..15 (float16, bfloat16)")


def bitflip(
    model: str = "smollm2-135m",
    *,
    bits: str | Iterable[int | str] | None = None,
    flips: int = 10,
    seeds: int = 5,
    layers: list[int] | None = None,
    roles: Sequence[str] | None = None,
    how: str = "random",
    layer_bit: int | str | None = None,
    data: str = "wikitext-2",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 16,
    seq_len: int = 128,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """Flip each bit position (default every bit of the model's dtype) in ``flips`` weights of the
    targeted matrices, and the layer bit (default the highest exponent bit) in ``flips`` weights of
    each layer, with ``seeds`` draws of the weights (seeds ``seed .. seed+seeds-1``); score the data.

    The flips happen in the dtype the model is loaded in (``dtype="bfloat16"`` flips bfloat16 bits).
    Writes a run folder (``run.json``, tidy ``results.csv``, ``summary.csv``, ``bitflip_bits.png``,
    ``bitflip_layers.png``, ``report.html``) and returns ``(result, folder)``."""
    from ..analyses.bitflip import run_bitflip
    from ..data.sequences import sequences_fingerprint
    from ..interventions.bitflip import SITE_CHOICES, bit_label, model_weight_dtype, parse_bit, resolve_bits
    from ..models.loading import resolve_dtype
    from ..report.html import write_report

    check_positive("flips", flips)
    check_positive("seeds", seeds)
    check_positive("samples", samples)
    check_positive("seq-len", seq_len, 2)
    if seed < 0:
        raise LayerscopeError(f"seed {seed} is out of range: must be at least 0")
    if how not in SITE_CHOICES:
        raise LayerscopeError(f"target {how!r} is unknown: allowed {allowed(SITE_CHOICES)}")
    _precheck_bits(bits)
    if layer_bit is not None:
        _precheck_bits([layer_bit] if not isinstance(layer_bit, str) else layer_bit)
    if roles is not None:
        roles = list(dict.fromkeys(roles))
        if not roles:
            raise LayerscopeError("no roles given; give e.g. q,k,v or leave roles out for all of them")
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:  # the flips' format is known already: check the bits exactly
        resolve_bits(torch_dtype, bits)
        if layer_bit is not None:
            parse_bit(torch_dtype, layer_bit)
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    weight_dtype = model_weight_dtype(net, layers, roles)  # also refuses bad layers / roles
    bit_list = resolve_bits(weight_dtype, bits)
    seqs = build_sequences(tok, data=data, instructions=instructions, template=template, samples=samples,
                           seq_len=seq_len, seed=seed)
    flip_seeds = list(range(seed, seed + seeds))
    folder = RunFolder(Path(out) if out else None, "bitflip")
    config = {"analysis": "bitflip", "model": model, "bits": list(bit_list), "flips": flips, "seeds": seeds,
              "flip_seeds": flip_seeds, "layers": layers, "roles": roles, "target": how,
              "layer_bit": None if layer_bit is None else parse_bit(weight_dtype, layer_bit),
              "data": instructions or data, "template": template if instructions else None, "samples": samples,
              "seq_len": seq_len, "dtype": str(net.dtype), "weight_dtype": str(weight_dtype), "device": str(net.device),
              "n_sequences": len(seqs)}
    run_parts = {"model": model_fingerprint(net), "data": config["data"], "template": config["template"],
                 "data_fingerprint": sequences_fingerprint(seqs), "dtype": str(weight_dtype), "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint=run_parts)
    with ResultsStore(folder.store_path) as store:
        result = run_bitflip(net, seqs, bits=bit_list, flips=flips, seeds=flip_seeds, layers=layers, roles=roles,
                             how=how, layer_bit=layer_bit, store=store, run_parts=run_parts, pad_id=pad_id_of(tok),
                             progress=progress)
    for key, value in config.items():  # the analysis' own entries (resolved layers, seeds run, ...) win
        result.config.setdefault(key, value)
    paths = result.save(folder)
    per_bit, per_layer = result.per_bit(), result.per_layer()
    lb = result.config["layer_bit"]
    summary = {**config, "layer_bit": f"{lb} ({bit_label(weight_dtype, lb)})",
               "unmodified loss": round(result.baseline_loss, 6),
               "unmodified perplexity": round(math.exp(result.baseline_loss), 4)}
    for field in ("sign", "exponent", "mantissa"):
        part = per_bit[per_bit["field"] == field]
        if not part.empty:
            worst = part.iloc[int(part["delta_median"].to_numpy().argmax())]
            summary[f"{field} bits: worst"] = (f"bit {int(worst['bit'])} ({worst['label']}): "
                                               f"{format_delta(worst)}")
    if not per_layer.empty:
        worst = per_layer.iloc[int(per_layer["delta_median"].to_numpy().argmax())]
        summary["most sensitive layer"] = f"{int(worst['layer'])}: {format_delta(worst)}"
    seeds_note = (f"Seeds {flip_seeds[0]}..{flip_seeds[-1]} choose the weights: for the per-bit sweep "
                  "the same weights for every bit of a seed; for the per-layer sweep each layer draws with (seed, layer)."
                  if how == "random" else
                  "Target 'largest': the weights of largest magnitude (the same for every seed, so one seed is run).")
    write_report(folder.path("report.html"), title=f"Bit flips in {model} ({result.dtype})", summary=summary,
                 table=result.summary(),
                 figures=[(p, caption) for p, caption in zip(
                     [p for p in paths if p.suffix == ".png"],
                     ["loss increase per flipped bit position (log scale): bars = mean over seeds that stayed finite, "
                      "dots = seeds, whiskers = 95% t-interval; red crosses at the top = seeds whose loss diverged",
                      "loss increase per layer when the layer bit is flipped in that layer's weights"])],
                 notes=[f"Each point flips one bit (by XOR on the {result.dtype} bit pattern) in {flips} weights of "
                        "the targeted weight matrices (q k v o gate up down; biases, norms and embeddings untouched).",
                        seeds_note,
                        "delta = loss with the flips minus the unmodified model's loss, in nats per scored token. "
                        "Interval: mean over seeds +/- t(0.975, n-1) * sd / sqrt(n); NaN where a seed diverged "
                        "(inf/NaN loss, kept as such in results.csv) or there is one seed.",
                        "Flipping again restores every weight bit for bit after each point."])
    return result, folder.out


def format_delta(row) -> str:
    """``mean [lo, hi]`` of a summary row, with the share of diverged seeds."""
    def f(x: float) -> str:
        return f"{x:.4g}" if math.isfinite(x) else str(float(x))

    text = f"delta {f(row['delta_mean'])} [{f(row['delta_lo'])}, {f(row['delta_hi'])}]"
    if row["diverged_fraction"] > 0:
        text += f", diverged in {row['diverged_fraction']:.0%} of seeds"
    return text
