"""Mean and confidence interval of a metric over repeated random draws (seeds)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from layerscope.errors import LayerscopeError

__all__ = ["mean_interval"]


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """``{"mean", "lo", "hi", "std", "n"}``: the sample mean and its Student-t interval.

    ``lo, hi = mean -/+ t_{(1+c)/2, n-1} * std / sqrt(n)`` with the sample standard deviation
    (``ddof=1``). With one value the interval is ``(nan, nan)``; non-finite values (a diverged
    model gives ``inf``/``nan`` loss) make the mean non-finite and the interval ``(nan, nan)``,
    rather than a number that looks meaningful.
    """
    if not 0 < confidence < 1:
        raise LayerscopeError(f"confidence {confidence!r} is out of range: allowed strictly between 0 and 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        raise LayerscopeError("no values to summarise")
    if not np.isfinite(x).all():
        mean = float(np.mean(x)) if not np.isnan(x).any() else math.nan
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "std": math.nan, "n": n}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "std": math.nan, "n": 1}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "std": std, "n": n}
