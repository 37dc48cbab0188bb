"""Spectral analysis of stored activations: PCA per layer, and canonical correlations between the
top principal components of neighbouring layers (the critical-layers paper's Figure 3) or of the
same layer in two models.

Everything streams over an :class:`~layerscope.capture.activation_store.ActivationStore`, so the
number of rows is limited by disk, not memory:

1. one pass per layer accumulates its covariance (:class:`~layerscope.metrics.StreamingCovariance`)
   and gives the spectrum (effective rank, participation ratio) and the top principal directions;
2. one pass over row blocks of every layer accumulates the cross products of the principal-component
   scores (:class:`~layerscope.metrics.pc_scores.PCScoreGram`), from which the canonical
   correlations of any pair of layers at any ``k`` follow exactly.

SVCCA and PWCCA (two models) and the CKA term delta need the rows themselves; they use at most
``sample_rows`` rows drawn with the seed (all rows when there are fewer).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LayerscopeError
from ..metrics import MinibatchCKA, StreamingCovariance, cka, cka_matrix, effective_rank, participation_ratio, pwcca, svcca
from ..metrics.canonical_correlation import SampleSizeWarning
from ..metrics.pc_scores import PCScoreGram
from ..metrics.kernel_alignment import representation_shift

DEFAULT_KS = (1, 3, 10)
NEIGHBOUR_OFFSETS = (-2, -1, 1, 2)


@dataclass
class LayerSpectrum:
    """One layer's PCA: the full covariance spectrum and the top ``keep`` principal directions."""

    label: str
    mean: np.ndarray
    components: np.ndarray  # (keep, d) orthonormal rows by decreasing variance
    eigenvalues: np.ndarray  # (d,) all covariance eigenvalues, descending
    count: int

    @property
    def total_variance(self) -> float:
        return float(self.eigenvalues.sum())

    def ratio(self, k: int) -> float:
        """Share of the total variance in the top ``k`` directions."""
        total = self.total_variance
        return float(self.eigenvalues[:k].sum() / total) if total > 0 else 0.0

    def summary(self) -> dict:
        positive = self.eigenvalues.sum() > 0
        return {"layer": self.label, "rows": self.count, "total_variance": self.total_variance,
                "effective_rank": effective_rank(self.eigenvalues) if positive else 0.0,
                "participation_ratio": participation_ratio(self.eigenvalues) if positive else 0.0,
                "var_top1": self.ratio(1), "var_top3": self.ratio(3), "var_top10": self.ratio(10)}


def layer_spectrum(store, layer: int, *, keep: int = 32, chunk_rows: int = 4096, device: str = "cpu") -> LayerSpectrum:
    """Streaming PCA of one stored layer (``eigh`` of its float64 covariance, ``ddof=1``)."""
    acc = StreamingCovariance(store.hidden, device=device)
    for block in store.chunks(layer, rows=chunk_rows):
        acc.update(block)
    pca = acc.pca()
    keep = max(1, min(int(keep), store.hidden))
    return LayerSpectrum(store.labels[layer], pca.mean, pca.components[:keep].copy(),
                         pca.explained_variance.copy(), acc.count)


def store_spectra(store, *, keep: int = 32, chunk_rows: int = 4096, device: str = "cpu") -> list[LayerSpectrum]:
    """:func:`layer_spectrum` of every stored layer, one layer in memory at a time."""
    return [layer_spectrum(store, i, keep=keep, chunk_rows=chunk_rows, device=device) for i in range(store.num_layers)]


def score_gram(stores, spectra_per_store, *, k_max: int, chunk_rows: int = 2048, device: str = "cpu") -> PCScoreGram:
    """One pass over row blocks of every layer of every store (same rows in each) into a PCScoreGram.

    Views are numbered store by store: view ``s * L + l`` is layer ``l`` of store ``s``."""
    rows = {s.num_rows for s in stores}
    if len(rows) != 1:
        raise LayerscopeError(f"the activation stores hold different numbers of rows {sorted(rows)}: "
                              "comparing two models needs the same examples, pooled the same way")
    bases = [(sp.mean, sp.components[:k_max]) for spectra in spectra_per_store for sp in spectra]
    gram = PCScoreGram(bases, device=device)
    n = rows.pop()
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        gram.update(np.array(s.layer(i)[lo:hi], dtype=np.float32) for s in stores for i in range(s.num_layers))
    return gram


def _sample_index(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def store_cka_matrix(store, *, sample_rows: int = 2048, chunk: int = 256, seed: int = 0) -> np.ndarray:
    """Linear CKA between every pair of stored layers: exact (biased) on up to ``sample_rows`` rows;
    above that, the unbiased mini-batch estimator over seeded chunks of ``chunk`` rows of all rows."""
    n = store.num_rows
    if n <= sample_rows:
        return cka_matrix([np.asarray(store.layer(i), dtype=np.float32) for i in range(store.num_layers)])
    acc = MinibatchCKA(store.num_layers)
    order = np.random.default_rng(seed).permutation(n)
    for lo in range(0, n - 3, chunk):
        pick = np.sort(order[lo : lo + chunk])
        if len(pick) < 4:
            break
        acc.update([np.asarray(store.layer(i)[pick], dtype=np.float32) for i in range(store.num_layers)])
    return acc.compute()


@dataclass
class SpectralResult:
    """Spectra per layer, neighbour-layer PC-subspace CCA, the CKA term delta, and (with a second
    model) the same-layer comparison of the two models."""

    labels: list[str]
    spectra: pd.DataFrame
    neighbours: pd.DataFrame  # one row per (layer, neighbour, k): mean canonical correlation
    curves: pd.DataFrame  # one row per layer: delta and the per-k neighbour averages
    versus: pd.DataFrame | None = None  # one row per layer: two-model CCA_k, SVCCA, PWCCA, CKA
    ks: tuple[int, ...] = DEFAULT_KS
    window: int = 5
    config: dict = field(default_factory=dict)
    directions: list[LayerSpectrum] = field(default_factory=list, repr=False)

    def correlations(self) -> dict[str, dict]:
        """Spearman of each neighbour-CCA curve with delta (the paper: they track each other)."""
        from ..metrics import rank_correlation

        out = {}
        for k in self.ks:
            column = f"cca_k{k}"
            frame = self.curves[["delta", column]].dropna()
            if len(frame) >= 3 and frame[column].nunique() > 1:
                out[column] = rank_correlation(frame[column].to_numpy(), frame["delta"].to_numpy())
        return out

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, comparison, metric, k) with its value."""
        rows = []
        for _, r in self.curves.iterrows():
            rows.append({"layer": r["layer"], "comparison": "neighbours", "metric": "delta", "k": None, "value": r["delta"]})
            for k in self.ks:
                rows.append({"layer": r["layer"], "comparison": "neighbours", "metric": "pc_cca", "k": k,
                             "value": r[f"cca_k{k}"]})
        if self.versus is not None:
            for _, r in self.versus.iterrows():
                for k in self.ks:
                    rows.append({"layer": r["layer"], "comparison": "vs", "metric": "pc_cca", "k": k, "value": r[f"cca_k{k}"]})
                for metric in ("svcca", "pwcca", "cka"):
                    rows.append({"layer": r["layer"], "comparison": "vs", "metric": metric, "k": None, "value": r[metric]})
        return pd.DataFrame(rows)

    def save(self, folder) -> list[Path]:
        """Tables (results, spectra, curves, neighbours, versus) and figures into a run folder."""
        from ..report.figures import heatmap, line_chart

        paths = [*folder.write_table(self.to_frame())]
        if self.directions:
            paths.append(save_directions(self.directions, folder.path("pca.safetensors")))
        paths += [*folder.write_table(self.spectra, "spectra"), *folder.write_table(self.curves, "curves"),
                  *folder.write_table(self.neighbours, "neighbours")]
        x = list(range(len(self.labels)))
        series = {f"neighbour CCA, top {k} PCs": self.curves[f"cca_k{k}"].tolist() for k in self.ks}
        series[f"delta (CKA, w={self.window})"] = self.curves["delta"].tolist()
        paths.append(line_chart(x, series, folder.path("neighbour_cca.png"),
                                title="Mean canonical correlation of top-k PCs with layers l-2..l+2, and delta",
                                xlabel="layer", ylabel="correlation / CKA"))
        paths.append(line_chart(x, {"effective rank": self.spectra["effective_rank"].tolist(),
                                    "participation ratio": self.spectra["participation_ratio"].tolist()},
                                folder.path("spectrum.png"), title="Dimensionality of each layer's representation",
                                xlabel="layer", ylabel="dimensions", logy=True))
        if self.directions:
            top = min(32, len(self.directions[0].eigenvalues))
            shares = np.array([sp.eigenvalues[:top] / max(sp.total_variance, 1e-300) for sp in self.directions])
            paths.append(heatmap(np.log10(np.clip(shares, 1e-12, None)), folder.path("explained_variance.png"),
                                 title="Share of each layer's variance per principal component (log10)",
                                 xlabel="principal component", ylabel="layer", yticklabels=self.labels,
                                 colorbar_label="log10 variance share", annotate=False))
        if self.versus is not None:
            paths += [*folder.write_table(self.versus, "versus")]
            vs_series = {f"CCA, top {k} PCs": self.versus[f"cca_k{k}"].tolist() for k in self.ks}
            vs_series.update({"SVCCA (99%)": self.versus["svcca"].tolist(), "PWCCA": self.versus["pwcca"].tolist(),
                              "linear CKA": self.versus["cka"].tolist()})
            paths.append(line_chart(x, vs_series, folder.path("versus.png"),
                                    title="Same layer, two models", xlabel="layer", ylabel="similarity"))
        return paths


def save_directions(spectra: list[LayerSpectrum], path) -> Path:
    """Each layer's mean, top principal directions and full spectrum as float32 safetensors
    (``mean.<label>``, ``components.<label>``, ``eigenvalues.<label>``), e.g. for ``pc-remove --pca``."""
    from safetensors.numpy import save_file

    tensors = {}
    for sp in spectra:
        tensors[f"mean.{sp.label}"] = sp.mean.astype(np.float32)
        tensors[f"components.{sp.label}"] = sp.components.astype(np.float32)
        tensors[f"eigenvalues.{sp.label}"] = sp.eigenvalues.astype(np.float32)
    save_file(tensors, str(path), metadata={"rows": str(spectra[0].count) if spectra else "0"})
    return Path(path)


def load_directions(path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, components)`` of one layer from a ``pca.safetensors`` written by :func:`save_directions`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LayerscopeError(f"PCA file {str(path)!r} does not exist: give the pca.safetensors of a spectral run")
    with safe_open(str(path), framework="numpy") as handle:
        keys = set(handle.keys())
        if f"mean.{label}" not in keys:
            layers = sorted({k.split(".", 1)[1] for k in keys}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
            raise LayerscopeError(f"layer {label!r} is not in {str(path)!r}: it holds layers {', '.join(layers)}")
        return (handle.get_tensor(f"mean.{label}").astype(np.float64),
                handle.get_tensor(f"components.{label}").astype(np.float64))


def _check_ks(ks, keep: int) -> tuple[int, ...]:
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1 or ks[-1] > keep:
        raise LayerscopeError(f"k values {list(ks)} must be integers in 1..{keep} (the principal directions kept)")
    return ks


def _versus(store, other, spectra, other_spectra, gram: PCScoreGram, ks, *, sample_rows: int, seed: int) -> pd.DataFrame:
    L = store.num_layers
    if other.num_layers != L or other.labels != store.labels:
        raise LayerscopeError(f"the two models have layers {store.labels[0]}..{store.labels[-1]} ({L}) and "
                              f"{other.labels[0]}..{other.labels[-1]} ({other.num_layers}): the same-layer "
                              "comparison needs the same depth")
    index = _sample_index(store.num_rows, sample_rows, seed)
    rows = []
    for layer in range(L):
        row = {"layer": layer, "label": store.labels[layer]}
        for k in ks:
            row[f"cca_k{k}"] = gram.mean_correlation(layer, L + layer, k)
        x = np.asarray(store.layer(layer)[index], dtype=np.float64)
        y = np.asarray(other.layer(layer)[index], dtype=np.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SampleSizeWarning)
            row["svcca"] = svcca(x, y, keep=0.99, rtol=1e-6)
            row["pwcca"] = pwcca(x, y, rtol=1e-6)
        row["few_samples"] = any(issubclass(w.category, SampleSizeWarning) for w in caught)
        if row["few_samples"]:  # CCA on about as many dimensions as rows finds correlations near 1 in noise
            row["svcca"] = row["pwcca"] = float("nan")
        row["cka"] = cka(x, y)
        rows.append(row)
    return pd.DataFrame(rows)


def run_spectral(
    store,
    other=None,
    *,
    ks=DEFAULT_KS,
    offsets=NEIGHBOUR_OFFSETS,
    window: int = 5,
    keep: int = 32,
    sample_rows: int = 2048,
    chunk_rows: int = 2048,
    seed: int = 0,
    device: str = "cpu",
) -> SpectralResult:
    """The spectral study on one activation store (and optionally a second model's, same rows)."""
    if store.num_layers < 2:
        raise LayerscopeError(f"the store holds {store.num_layers} layer: comparing layers needs at least 2")
    keep = min(int(keep), store.hidden) if other is None else min(int(keep), store.hidden, other.hidden)
    ks = _check_ks(ks, keep)
    spectra = store_spectra(store, keep=keep, chunk_rows=chunk_rows, device=device)
    other_spectra = store_spectra(other, keep=keep, chunk_rows=chunk_rows, device=device) if other is not None else []
    stores = [store] + ([other] if other is not None else [])
    gram = score_gram(stores, [spectra] + ([other_spectra] if other is not None else []), k_max=max(ks),
                      chunk_rows=chunk_rows, device=device)
    L = store.num_layers
    pairs = []
    for layer in range(L):
        for offset in offsets:
            m = layer + offset
            if 0 <= m < L:
                for k in ks:
                    pairs.append({"layer": layer, "neighbour": m, "k": k, "mean_cca": gram.mean_correlation(layer, m, k)})
    neighbours = pd.DataFrame(pairs)
    delta = representation_shift(store_cka_matrix(store, sample_rows=sample_rows, seed=seed), w=window)
    curves = pd.DataFrame({"layer": list(range(L)), "label": store.labels, "delta": delta})
    for k in ks:
        curves[f"cca_k{k}"] = neighbours[neighbours["k"] == k].groupby("layer")["mean_cca"].mean().reindex(range(L)).to_numpy()
    spectra_frame = pd.DataFrame([sp.summary() for sp in spectra])
    versus = _versus(store, other, spectra, other_spectra, gram, ks, sample_rows=sample_rows, seed=seed) if other is not None else None
    return SpectralResult(list(store.labels), spectra_frame, neighbours, curves, versus, ks=ks, window=window,
                          directions=spectra)
