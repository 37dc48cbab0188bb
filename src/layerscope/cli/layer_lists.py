"""Parse layer lists written on the command line: ``"3,4,5"``, ``"3-7"``, ``"0,2,5-7"``, ``"-1"``."""

from __future__ import annotations

import re

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
