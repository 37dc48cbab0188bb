"""Parse lists written on the command line: layer lists ``"3,4,5"``, ``"3-7"``, ``"0,2,5-7"``, ``"-1"``,
or a ``prediction.json`` written by ``layerscope critical-layers`` (``RUN/prediction.json`` for its
predicted layers, ``RUN/prediction.json:control_layers`` for the control set); and plain
comma-separated numbers (``--k 1,3,10``, ``--rates 1,5,9.9``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LayerscopeError

_INDEX = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_layer_list(text: str | None) -> list[int] | None:
    """Layer indices from comma-separated items, each an index or an inclusive range ``a-b``.

    None or an empty/blank string gives None (no choice made). Negative single indices (``-1``,
    the last layer) are passed through; ranges take non-negative ends with ``a <= b``. Order is
    kept and repeats are dropped. Range checks against a model are the caller's (its number of
    layers is not known here).
    """
    if text is None or not str(text).strip():
        return None
    if str(text).split(":")[0].endswith(".json"):
        return _from_prediction(str(text))
    out: list[int] = []
    for item in str(text).split(","):
        token = item.strip()
        if _INDEX.match(token):
            values = [int(token)]
        elif (m := _RANGE.match(token)) is not None:
            start, end = int(m.group(1)), int(m.group(2))
            if start > end:
                raise LayerscopeError(f"bad layer range {token!r} in {text!r}: the start must not exceed the end (e.g. 3-7)")
            values = list(range(start, end + 1))
        else:
            raise LayerscopeError(
                f"bad layer list {text!r}: {token!r} is not a layer index or a range; "
                "write comma-separated indices and inclusive ranges, e.g. '3,4,5' or '3-7' or '0,2,5-7'"
            )
        out.extend(v for v in values if v not in out)
    return out


def _from_prediction(text: str) -> list[int]:
    """``path.json`` (its ``predicted_layers``) or ``path.json:key`` (a list of layers under ``key``)."""
    path, _, key = text.partition(":")
    key = key or "predicted_layers"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LayerscopeError(f"layer list file {path!r} does not exist (write `layerscope critical-layers ... --out RUN` "
                              "first, then RUN/prediction.json)") from None
    except json.JSONDecodeError as exc:
        raise LayerscopeError(f"layer list file {path!r} is not valid JSON ({exc})") from None
    lists = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(i, int) for i in v)}
    if key not in lists:
        raise LayerscopeError(f"{path!r} has no layer list {key!r}; allowed: {', '.join(sorted(lists)) or 'none'}")
    return list(dict.fromkeys(lists[key]))


def parse_names(text: str | None) -> tuple[str, ...] | None:
    """Comma-separated names (roles, units, methods, ...), stripped, blanks dropped; None stays None
    (no choice made). Whether a name is allowed is the caller's to check."""
    return None if text is None else tuple(part.strip() for part in str(text).split(",") if part.strip())


def parse_numbers(text: str, what: str, kind: type = int) -> tuple:
    """Comma-separated integers (``kind=int``) or numbers (``kind=float``); a clear error naming ``what``."""
    noun, example = ("integers", "1,3,10") if kind is int else ("numbers", "1,5,9.9")
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LayerscopeError(f"{what} {text!r} must be comma-separated {noun}, e.g. {example}") from None
    if not values:
        raise LayerscopeError(f"{what} {text!r} is empty: give comma-separated {noun}, e.g. {example}")
    return values
