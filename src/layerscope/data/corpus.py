"""Plain-text corpora and their cutting into fixed-length, scored windows (perplexity data).

Sources (:func:`load_texts`):

* ``"builtin"``: the standard-library docstring corpus (:mod:`layerscope.data.builtin`);
* a short name of a file under the shared data folder (:data:`CORPORA`, e.g. ``"wikitext-2"``);
* a local file: ``.txt`` (one document; a WikiText file is split into its articles),
  ``.jsonl`` / ``.json`` (the ``field`` of each record, default ``"text"``, or plain strings),
  ``.parquet`` (column ``field``);
* ``"hf:name[:config][:split]"``: a Hugging Face dataset, only when :mod:`datasets` is installed
  (``pip install 'layerscope[datasets]'``) and the machine can reach the hub; split defaults to
  ``test``.

The shared data folder is ``$LAYERSCOPE_SHARED_DATA`` when set, else ``<repo>/../shared/data``
(see :func:`shared_data_dir`).
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from layerscope.data.builtin import builtin_corpus
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError, allowed

SHARED_DATA_ENV = "LAYERSCOPE_SHARED_DATA"

#: Short corpus names -> path relative to the shared data folder.
CORPORA: dict[str, str] = {
    "wikitext-2": "wikitext-2/test.txt",
    "wikitext-2-test": "wikitext-2/test.txt",
    "wikitext-2-valid": "wikitext-2/valid.txt",
    "wikitext-2-raw": "wikitext-2/wiki.test.raw",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}

TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".json", ".parquet")

# A WikiText article starts with a top-level heading line " = Title = " (sections are " = = x = = ").
_WIKI_TITLE = re.compile(r"^ = (?!= )[^\n]*[^=\n ] = $")


def shared_data_dir() -> Path:
    """The folder of shared data files: ``$LAYERSCOPE_SHARED_DATA`` or ``<repo>/../shared/data``.

    The path is returned whether or not it exists; callers check.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # src/layerscope/data/corpus.py -> repo root
    return repo.parent / "shared" / "data"


def resolve_shared(name: str, table: dict[str, str], what: str) -> Path:
    """Path of a short-named shared file; a LayerscopeError when the shared folder lacks it."""
    path = shared_data_dir() / table[name]
    if not path.is_file():
        raise LayerscopeError(
            f"{what} {name!r} refers to {path}, which does not exist; put the shared data folder "
            f"there or point ${SHARED_DATA_ENV} at it"
        )
    return path


def resolve_source(path_or_name: str | Path, table: dict[str, str], name_what: str, file_what: str) -> Path:
    """A short name of ``table`` (a shared file) or an existing file; a clear error otherwise."""
    if isinstance(path_or_name, str) and path_or_name in table:
        return resolve_shared(path_or_name, table, name_what)
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        if looks_like_path(path_or_name):
            raise LayerscopeError(f"{file_what} {path} does not exist")
        raise LayerscopeError(f"unknown {name_what} {path_or_name!r}; known: {allowed(table)}")
    return path


def read_jsonl(path: Path, skip: re.Pattern[str] | None = None) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-empty line; lines matching ``skip`` are ignored."""
    rows: list[tuple[int, object]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                if skip is not None and skip.match(line):
                    continue
                raise LayerscopeError(f"{path}:{lineno}: not a JSON line ({exc.msg}): {line[:80]!r}") from None
    return rows


def looks_like_path(source: str | Path) -> bool:
    """Whether a source string is meant as a file path (has a folder part or a file suffix)."""
    text = str(source)
    return not isinstance(source, str) or "/" in text or os.sep in text or bool(Path(text).suffix)


def pick(n: int, limit: int | None, seed: int, what: str = "limit") -> list[int]:
    """Indices of a deterministic random subset of size ``limit`` of ``range(n)``, in order."""
    if limit is None:
        return list(range(n))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise LayerscopeError(f"{what} must be a positive integer or None, got {limit!r}")
    if limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


# ----------------------------------------------------------------------------------------------
# Loading texts


def split_wikitext(text: str) -> list[str]:
    """Split a WikiText file into articles at its top-level ``" = Title = "`` heading lines.

    Each article keeps its heading line and its text verbatim. Text before the first heading
    (normally only blank lines) is attached to the first article.
    """
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _WIKI_TITLE.match(line.rstrip("\r\n"))]
    if not starts:
        return [text]
    starts[0] = 0
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _is_wikitext(text: str) -> bool:
    """True when the first non-blank line is a WikiText article heading."""
    for line in text.lstrip("\ufeff").splitlines():
        if line.strip():
            return bool(_WIKI_TITLE.match(line))
    return False


def _field_of(record: object, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field not in record:
            raise LayerscopeError(f"{where}: no field {field!r}; the record has {allowed(sorted(record))}")
        value = record[field]
        if not isinstance(value, str):
            raise LayerscopeError(f"{where}: field {field!r} is {type(value).__name__}, not text")
        return value
    raise LayerscopeError(f"{where}: expected a text or an object with field {field!r}, got {type(record).__name__}")


def _load_file(path: Path, field: str, split_articles: bool) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".tokens"):
        text = path.read_text(encoding="utf-8")  # universal newlines: CRLF becomes LF
        if split_articles and _is_wikitext(text):
            return split_wikitext(text)
        return [text]
    if suffix == ".jsonl":
        return [_field_of(rec, field, f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LayerscopeError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get(field), list):
            data = data[field]
        if not isinstance(data, list):
            raise LayerscopeError(f"{path}: expected a JSON array of texts or of objects with field {field!r}")
        return [_field_of(rec, field, f"{path}[{i}]") for i, rec in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise LayerscopeError(f"{path}: no column {field!r}; columns are {allowed(table.column_names)}")
        return [v for v in table.column(field).to_pylist() if isinstance(v, str)]
    raise LayerscopeError(f"{path}: unsupported file type {suffix or '(none)'!r}; allowed: {allowed(TEXT_SUFFIXES)}")


def _load_hf(spec: str, field: str, split_articles: bool) -> list[str]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise LayerscopeError(f"bad Hugging Face dataset source {spec!r}; write hf:name[:config][:split]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise LayerscopeError(
            f"{spec!r} needs the 'datasets' package, which is not installed; "
            "install it with pip install 'layerscope[datasets]' or give a local file"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, unknown name, unknown split: all user-facing
        raise LayerscopeError(f"could not load Hugging Face dataset {spec!r}: {exc}") from None
    if field not in ds.column_names:
        raise LayerscopeError(f"{spec}: no column {field!r}; columns are {allowed(ds.column_names)}")
    rows = [v for v in ds[field] if isinstance(v, str)]
    if "wikitext" in name.lower():
        # Hugging Face WikiText has one row per line (with its newline): rebuild the file.
        text = "".join(rows)
        return split_wikitext(text) if split_articles else [text]
    return rows


def load_texts(source: str | Path, field: str = "text", split_articles: bool = True) -> list[str]:
    """Documents (non-empty texts) of a corpus source; see the module docstring for the sources.

    ``field`` names the record field / column of json, jsonl, parquet and Hugging Face sources.
    ``split_articles`` splits WikiText files into articles (others are one document per file).
    Raises :class:`LayerscopeError` for a missing file, an unknown name or empty data.
    """
    if isinstance(source, str):
        if source == "builtin":
            return builtin_corpus()
        if source.startswith("hf:"):
            texts = _load_hf(source, field, split_articles)
            path_desc = source
        elif source in CORPORA:
            path = resolve_shared(source, CORPORA, "corpus")
            texts = _load_file(path, field, split_articles)
            path_desc = str(path)
        else:
            path = Path(source).expanduser()
            if not path.exists() and looks_like_path(source):
                raise LayerscopeError(f"corpus file {path} does not exist")
            if not path.exists():
                raise LayerscopeError(
                    f"corpus {source!r} is neither a file nor a known name; known names: "
                    f"{allowed(['builtin', *CORPORA])}, or hf:name[:config][:split]"
                )
            texts, path_desc = None, str(path)
    else:
        path = Path(source).expanduser()
        texts, path_desc = None, str(path)
    if texts is None:
        if not path.exists():
            raise LayerscopeError(f"corpus file {path} does not exist")
        if path.is_dir():
            raise LayerscopeError(f"corpus {path} is a folder; give a file ({allowed(TEXT_SUFFIXES)})")
        texts = _load_file(path, field, split_articles)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LayerscopeError(f"empty data set: no text in {path_desc}")
    return texts


# ----------------------------------------------------------------------------------------------
# Windows for perplexity


def _check_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LayerscopeError(f"{name} must be an integer, got {value!r}")
    return value


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama, Gemma: yes; GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a text without any special token added (special tokens written in it count)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]


def concat_token_ids(tokenizer, texts: Iterable[str]) -> list[int]:
    """Token ids of the documents, in order, separated by EOS when the tokenizer has one.

    No BOS and no other special token is added (``add_special_tokens=False``).
    """
    texts = list(texts)
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(int(t) for t in doc)
    return ids


def window_targets(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The sliding windows over ``num_tokens`` tokens as ``(begin, end, first_scored)``.

    This is the Hugging Face "perplexity of fixed-length models" loop: windows start every
    ``stride`` tokens and hold up to ``seq_len`` tokens; a window scores the tokens from
    ``first_scored`` (global position) to ``end``, i.e. only those the previous window did not
    score, and never its own first token. With ``stride < seq_len`` every token except token 0 is
    scored exactly once. With ``stride == seq_len`` (disjoint windows, the GPTQ-style evaluation)
    the first token of every window has no context inside it and is not scored. The last window
    may be shorter than ``seq_len``; windows that would score nothing are left out.
    """
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def lm_sequences(
    tokenizer,
    texts: Sequence[str] | str,
    seq_len: int = 256,
    stride: int | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> list[ScoredSequence]:
    """Cut the concatenated documents into scored windows of at most ``seq_len`` tokens.

    Documents are joined with EOS between them (when the tokenizer has an EOS), no BOS is added.
    ``stride`` defaults to ``seq_len`` (disjoint windows); a smaller stride gives the overlapping
    sliding window of :func:`window_targets`. ``samples`` keeps that many windows, chosen with
    ``random.Random(seed).sample`` and returned in corpus order (all windows when there are no
    more than ``samples``). ``group`` of each sequence is its window number before sampling.
    """
    seq_len = _check_int(seq_len, "seq_len")
    if seq_len < 2:
        raise LayerscopeError(f"seq_len must be at least 2 (one token to predict from, one to score), got {seq_len}")
    if stride is None:
        stride = seq_len
    stride = _check_int(stride, "stride")
    if not 0 < stride <= seq_len:
        raise LayerscopeError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    if samples is not None:
        samples = _check_int(samples, "samples")
        if samples < 1:
            raise LayerscopeError(f"samples must be at least 1 (or None for all windows), got {samples}")
    if isinstance(texts, str):
        texts = [texts]
    ids = concat_token_ids(tokenizer, [t for t in texts if t])
    if len(ids) < 2:
        raise LayerscopeError(f"empty data set: the texts give {len(ids)} token(s), at least 2 are needed")
    windows = window_targets(len(ids), seq_len, stride)
    chosen = range(len(windows))
    if samples is not None:
        if samples > len(windows):
            warnings.warn(
                f"samples={samples} but the corpus gives only {len(windows)} windows of {seq_len} tokens; using all",
                stacklevel=2,
            )
        chosen = pick(len(windows), samples, seed, "samples")
    out = []
    for w in chosen:
        begin, end, first = windows[w]
        mask = tuple(begin + t >= first for t in range(end - begin))
        out.append(ScoredSequence(tuple(ids[begin:end]), mask, group=w))
    return out
