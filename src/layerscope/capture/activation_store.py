"""An on-disk store of per-layer activations, written in shards and read back lazily.

Covariances, PCA and CCA over many examples (or every token of them) need more activations than
fit in memory at once. :func:`write_activations` runs the model batch by batch and writes each
layer's rows straight into its own ``.npy`` shard (a memory map at its final shape), so only one
batch of activations is ever held. :class:`ActivationStore` opens a finished store and hands out
one layer at a time as a read-only memory map, or in row blocks, so later code can stream over it.

Layout of a store folder::

    manifest.json    format version, pooling, labels, shapes, dtype, model and data fingerprints, meta
    layer_000.npy    (num_rows, hidden), one per stored layer ("emb" first when included, then blocks)
    rows.npy         (num_rows, 2) int64: example index and token position of each row
    done.npy         (num_examples,) bool: examples already written (for resuming)

Rows follow the original order of the examples (all rows of example 0 first). A write that stops
part-way (an exception, Ctrl-C) resumes when called again with the same model, data and settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sequences import ScoredSequence, sequences_fingerprint
from ..errors import LayerscopeError
from ..models import architecture, model_fingerprint
from .residual import iter_block_outputs

STORE_POOLINGS = ("last_prompt", "last", "mean", "tokens")
STORE_DTYPES = ("float32", "float16")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROWS = "rows.npy"
DONE = "done.npy"
# Settings that must agree for a folder's partial or finished store to be reused.
IDENTITY_KEYS = ("format_version", "model_fingerprint", "data_fingerprint", "pooling", "include_embeddings",
                 "dtype", "token_budget", "skip_first")
RESERVED_KEYS = IDENTITY_KEYS + ("labels", "hidden", "num_rows", "num_examples", "complete")


def shard_name(i: int) -> str:
    """File name of the shard that holds stored layer ``i``."""
    return f"layer_{i:03d}.npy"


# ----------------------------------------------------------------------------------------- reading


class ActivationStore:
    """A finished activation store, opened lazily: nothing but the manifest is read up front.

    ``labels`` names the stored layers ("emb" when the embedding output is included, then the
    blocks "0".."L-1"); ``layer(i)`` and ``chunks(i)`` take an index into ``labels``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise LayerscopeError(f"activation store {self.path} is incomplete (its capture stopped part-way); "
                                  "run the capture again with the same settings to finish it")
        try:
            self.labels: list[str] = [str(label) for label in self.manifest["labels"]]
            self.hidden: int = int(self.manifest["hidden"])
            self.num_rows: int = int(self.manifest["num_rows"])
            self.num_examples: int = int(self.manifest["num_examples"])
            self.pooling: str = str(self.manifest["pooling"])
            self.dtype: str = str(self.manifest["dtype"])
            self.include_embeddings: bool = bool(self.manifest["include_embeddings"])
            self.token_budget: int | None = self.manifest["token_budget"]
            self.skip_first: int = int(self.manifest.get("skip_first", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerscopeError(f"activation store {self.path} is corrupt: bad manifest field ({exc})") from exc
        self.num_layers: int = len(self.labels)
        for i in range(self.num_layers):
            self._load(shard_name(i), (self.num_rows, self.hidden), self.dtype)
        self.rows: np.ndarray = self._load(ROWS, (self.num_rows, 2), "int64")

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, pooling={self.pooling!r}, layers={self.num_layers}, "
                f"rows={self.num_rows}, hidden={self.hidden}, dtype={self.dtype})")

    def __len__(self) -> int:
        return self.num_layers

    def layer(self, i: int) -> np.ndarray:
        """Stored layer ``i`` (an index into ``labels``) as a read-only memory map ``(num_rows, hidden)``."""
        return self._load(shard_name(self._check_layer(i)), (self.num_rows, self.hidden), self.dtype)

    def chunks(self, i: int, rows: int = 4096) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most ``rows`` rows of stored layer ``i``, as float32 copies."""
        if not isinstance(rows, (int, np.integer)) or isinstance(rows, bool) or rows < 1:
            raise LayerscopeError(f"rows must be a positive integer, got {rows!r}")
        data = self.layer(i)
        for start in range(0, self.num_rows, int(rows)):
            yield np.array(data[start:start + int(rows)], dtype=np.float32)

    def _check_layer(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_layers:
            raise LayerscopeError(f"layer {i!r} is out of range: the store holds {self.num_layers} layers "
                                  f"({', '.join(self.labels)}), allowed 0..{self.num_layers - 1}")
        return int(i)

    def _load(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        array = _open_shard(self.path / name, "r", shape, dtype)
        if array is None:
            raise LayerscopeError(f"activation store {self.path} is corrupt: {name} is missing or is not "
                                  f"a {dtype} array of shape {shape}")
        return array


def open_store(path: str | os.PathLike) -> ActivationStore:
    """Open a finished activation store (same as ``ActivationStore(path)``)."""
    return ActivationStore(path)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise LayerscopeError(f"no activation store at {path}: {MANIFEST} is absent")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"activation store {path} is corrupt: {MANIFEST} is not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise LayerscopeError(f"activation store {path} is corrupt: {MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LayerscopeError(f"activation store {path} has format version {version!r}; "
                              f"this layerscope reads version {FORMAT_VERSION}")
    return manifest


def _open_shard(file: Path, mode: str, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """A memory map of an existing ``.npy`` file, or None when it is absent or not the expected array."""
    try:
        array = np.load(file, mmap_mode=mode)
    except (OSError, ValueError):
        return None
    if not isinstance(array, np.memmap) or array.shape != shape or array.dtype != np.dtype(dtype):
        return None
    return array


# ----------------------------------------------------------------------------------------- writing


def write_activations(
    model: torch.nn.Module,
    sequences: Sequence[ScoredSequence],
    out: str | os.PathLike,
    *,
    pooling: str = "mean",
    include_embeddings: bool = False,
    token_budget: int | None = None,
    pad_id: int | None = 0,
    max_tokens: int = 4096,
    dtype: str = "float32",
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    skip_first: int = 0,
) -> ActivationStore:
    """Capture every block's output (with ``include_embeddings`` first the embedding output) for
    ``sequences`` into the store folder ``out``, and return the store opened for reading.

    ``pooling``: "last_prompt", "last", "mean" store one row per example; "tokens" stores one row
    per token, taking the examples in order until ``token_budget`` tokens (the last one taken may
    be cut short; None: every token). ``dtype``: "float32" or "float16" on disk. ``meta`` (JSON-able)
    is merged into the manifest. A folder holding the same capture is reused: a finished one is
    returned at once, a partial one is completed, running only its missing examples.
    ``skip_first=n`` (tokens only) leaves out each example's first ``n`` positions (the token budget
    then counts the rows kept), e.g. the first token's massive activation.
    """
    _check_arguments(sequences, pooling, token_budget, dtype, include_embeddings)
    if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
        raise LayerscopeError(f"skip_first={skip_first!r}: allowed are integers >= 0")
    if skip_first and pooling != "tokens":
        raise LayerscopeError(f"skip_first={skip_first} applies only to pooling 'tokens', not {pooling!r}")
    sequences = _apply_budget(list(sequences), token_budget, skip_first) if pooling == "tokens" else list(sequences)
    out = Path(out)
    arch = architecture(model)
    labels = (["emb"] if include_embeddings else []) + [str(i) for i in range(arch.num_layers)]
    offsets = _row_offsets(sequences, pooling, skip_first)
    if offsets[-1] == 0:
        raise LayerscopeError(f"no token is left after skipping the first {skip_first} of every sequence")
    manifest = {
        "format_version": FORMAT_VERSION,
        "pooling": pooling,
        "include_embeddings": bool(include_embeddings),
        "token_budget": token_budget,
        "skip_first": skip_first,
        "labels": labels,
        "hidden": arch.hidden_size,
        "num_rows": int(offsets[-1]),
        "num_examples": len(sequences),
        "dtype": dtype,
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": sequences_fingerprint(sequences),
        "complete": False,
    }
    manifest.update(_check_meta(meta))
    existing = _existing_manifest(out, manifest)
    if existing is not None and existing.get("complete"):
        return ActivationStore(out)
    shards, done = _open_for_writing(out, manifest, sequences, offsets, resume=existing is not None)
    pending = [i for i in range(len(sequences)) if not done[i]]
    if pending:
        _run(model, sequences, pending, offsets, shards, done, pooling=pooling, include_embeddings=include_embeddings,
             pad_id=pad_id, max_tokens=max_tokens, progress=progress, skip_first=skip_first)
    del shards, done
    _write_manifest(out, {**manifest, "complete": True})
    return ActivationStore(out)


def _check_arguments(sequences: Sequence[ScoredSequence], pooling: str, token_budget: int | None, dtype: str,
                     include_embeddings: bool) -> None:
    if not sequences:
        raise LayerscopeError("empty data set: there are no sequences to capture activations for")
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise LayerscopeError(f"sequence {i} is empty; every sequence needs at least one token")
    if pooling not in STORE_POOLINGS:
        raise LayerscopeError(f"unknown pooling {pooling!r}; allowed: {', '.join(STORE_POOLINGS)}")
    if token_budget is not None:
        if pooling != "tokens":
            raise LayerscopeError(f"token_budget={token_budget!r} applies only to pooling='tokens', "
                                  f"not {pooling!r}; leave it None")
        if not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1:
            raise LayerscopeError(f"token_budget must be a positive integer (or None for every token), "
                                  f"got {token_budget!r}")
    if dtype not in STORE_DTYPES:
        raise LayerscopeError(f"unknown dtype {dtype!r} for an activation store; allowed: {', '.join(STORE_DTYPES)}")
    if not isinstance(include_embeddings, bool):
        raise LayerscopeError(f"include_embeddings must be True or False, got {include_embeddings!r}")


def _check_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(RESERVED_KEYS))
    if clash:
        raise LayerscopeError(f"meta may not set the store's own fields {', '.join(clash)}; "
                              f"reserved: {', '.join(RESERVED_KEYS)}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"meta must be JSON-serialisable: {exc}") from exc
    return meta


def _apply_budget(sequences: list[ScoredSequence], token_budget: int | None, skip: int = 0) -> list[ScoredSequence]:
    """The sequences taken in order until ``token_budget`` rows (tokens after the first ``skip`` of
    each), the last one cut to fit (the models are causal, so a cut sequence's states are those of
    the full one at the same positions)."""
    if token_budget is None:
        return sequences
    taken: list[ScoredSequence] = []
    left = token_budget
    for seq in sequences:
        if left <= 0:
            break
        if len(seq) - skip > left:
            seq = ScoredSequence(seq.input_ids[: skip + left], seq.target_mask[: skip + left], seq.group, seq.choice)
        taken.append(seq)
        left -= max(0, len(seq) - skip)
    return taken


def _row_offsets(sequences: Sequence[ScoredSequence], pooling: str, skip: int = 0) -> np.ndarray:
    """``offsets[i]``: the first row of example ``i``; ``offsets[-1]``: the number of rows."""
    counts = [max(0, len(s) - skip) for s in sequences] if pooling == "tokens" else [1] * len(sequences)
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _pooled_position(seq: ScoredSequence, pooling: str) -> int:
    """The token position a pooled row stands for (-1 for a mean over all tokens)."""
    if pooling == "mean":
        return -1
    if pooling == "last_prompt" and any(seq.target_mask):
        return max(seq.target_mask.index(True) - 1, 0)
    return len(seq) - 1


def _existing_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the same capture already in ``out``, or None when ``out`` is new or empty;
    refuses a folder holding another capture or unrelated files."""
    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir():
        return None
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise LayerscopeError(f"{out} already holds files but no activation store ({MANIFEST} is absent); "
                                  "choose another --out (an empty or new folder)")
        return None
    try:
        stored = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"{out} holds an unreadable {MANIFEST} ({exc}); choose another --out") from exc
    if not isinstance(stored, dict):
        raise LayerscopeError(f"{out} holds a {MANIFEST} that is not an activation store's; choose another --out")
    differences = [f"{key}: stored {stored.get(key)!r}, asked {manifest[key]!r}"
                   for key in IDENTITY_KEYS if stored.get(key) != manifest[key]]
    if differences:
        raise LayerscopeError(f"{out} holds a different activation capture ({'; '.join(differences)}); "
                              "choose another --out")
    return stored


def _open_for_writing(out: Path, manifest: dict[str, Any], sequences: Sequence[ScoredSequence],
                      offsets: np.ndarray, *, resume: bool) -> tuple[list[np.memmap], np.memmap]:
    """The layer shards and done flags, reopened (r+) from a partial store, else created afresh."""
    shape = (manifest["num_rows"], manifest["hidden"])
    count = len(manifest["labels"])
    if resume:
        shards = [_open_shard(out / shard_name(i), "r+", shape, manifest["dtype"]) for i in range(count)]
        done = _open_shard(out / DONE, "r+", (len(sequences),), "bool")
        rows = _open_shard(out / ROWS, "r", (shape[0], 2), "int64")
        if done is not None and rows is not None and all(s is not None for s in shards):
            return shards, done
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)  # first, so a folder with our shards always has our manifest
    shards = [np.lib.format.open_memmap(out / shard_name(i), mode="w+", dtype=manifest["dtype"], shape=shape)
              for i in range(count)]
    _write_rows(out / ROWS, sequences, offsets, manifest["pooling"], manifest["skip_first"])
    done = np.lib.format.open_memmap(out / DONE, mode="w+", dtype=np.bool_, shape=(len(sequences),))
    done.flush()
    return shards, done


def _write_rows(file: Path, sequences: Sequence[ScoredSequence], offsets: np.ndarray, pooling: str,
                skip: int = 0) -> None:
    """``rows.npy``: per row, the example index and the token position, written example by example."""
    rows = np.lib.format.open_memmap(file, mode="w+", dtype=np.int64, shape=(int(offsets[-1]), 2))
    for i, seq in enumerate(sequences):
        start, stop = offsets[i], offsets[i + 1]
        rows[start:stop, 0] = i
        rows[start:stop, 1] = np.arange(skip, len(seq)) if pooling == "tokens" else _pooled_position(seq, pooling)
    rows.flush()
    del rows


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Replace ``manifest.json`` atomically (a crash leaves the old or the new one, never half)."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def _run(model: torch.nn.Module, sequences: Sequence[ScoredSequence], pending: list[int], offsets: np.ndarray,
         shards: list[np.memmap], done: np.memmap, *, pooling: str, include_embeddings: bool,
         pad_id: int | None, max_tokens: int, progress: bool, skip_first: int = 0) -> None:
    """Run the model over the ``pending`` examples, writing each batch into the shards as it comes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    subset = [sequences[i] for i in pending]
    columns = (TextColumn("capturing activations"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("capture", total=len(pending))
        batches = iter_block_outputs(model, subset, pooling=pooling, include_embeddings=include_embeddings,
                                     pad_id=0 if pad_id is None else pad_id, max_tokens=max_tokens,
                                     skip_first=skip_first)
        for index, layers in batches:
            examples = [pending[j] for j in index]
            _write_batch(shards, _destination(examples, offsets, pooling), layers)
            done[examples] = True
            done.flush()
            bar.advance(task, len(examples))


def _destination(examples: list[int], offsets: np.ndarray, pooling: str) -> np.ndarray:
    """The store rows that a batch's rows go to, in the batch's row order."""
    if pooling != "tokens":
        return np.asarray(examples, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in examples])


def _write_batch(shards: list[np.memmap], destination: np.ndarray, layers: list[torch.Tensor]) -> None:
    if len(layers) != len(shards):
        raise LayerscopeError(f"the model produced {len(layers)} layers, the store expects {len(shards)}")
    for shard, values in zip(shards, layers):
        shard[destination] = values.detach().cpu().numpy().astype(shard.dtype, copy=False)
        shard.flush()
