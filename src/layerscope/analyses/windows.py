"""Windows of consecutive blocks, centred on a layer: shared by ablation and substitution sweeps.

A window of ``k`` blocks centred on layer ``i`` is ``[i - k//2, i - k//2 + k)`` (for odd ``k``
exactly ``[i-k//2, i+k//2]``); only centres whose whole window lies inside the model are swept
(window 5 on a 32-layer model: centres 2..29, the critical-layers paper's loop).
"""

from __future__ import annotations

from ..errors import LayerscopeError


def window_bounds(centre: int, window: int) -> tuple[int, int]:
    """``[start, end)`` of the window of ``window`` blocks centred on ``centre``."""
    start = centre - window // 2
    return start, start + window


def window_centres(num_layers: int, window: int) -> list[int]:
    """Centres whose whole window lies inside ``0..num_layers-1``."""
    if window < 1 or window > num_layers:
        raise LayerscopeError(f"window {window} is out of range: allowed 1..{num_layers} for this {num_layers}-layer model")
    return [c for c in range(num_layers) if window_bounds(c, window)[0] >= 0 and window_bounds(c, window)[1] <= num_layers]
