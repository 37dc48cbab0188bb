"""Bit flips: XOR one bit of chosen weights in the model's own floating-point format.

A flip is an exact XOR on the same-width integer view of the values (``int32`` for float32,
``int16`` for float16 and bfloat16), so flipping the same bit twice gives back the very same bits,
also when the first flip made an infinity or a NaN. Bits are numbered from 0 (the lowest mantissa
bit) to ``width - 1`` (the sign):

=========  ====  ===============  ===============
dtype      sign  exponent         mantissa
=========  ====  ===============  ===============
float32    31    30..23 (exp7-0)  22..0 (man22-0)
float16    15    14..10 (exp4-0)  9..0 (man9-0)
bfloat16   15    14..7 (exp7-0)   6..0 (man6-0)
=========  ====  ===============  ===============

    sites = choose_sites(model, count=10, seed=0)             # (layer, role, row, col), uniform over weights
    with intervene(model, BitFlip(sites, bit=30)):            # the top exponent bit of float32
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import LayerscopeError, allowed
from ..models.architecture import architecture
from .base import Intervention, Undo
from .targets import weight_targets

FIELDS: tuple[str, ...] = ("sign", "exponent", "mantissa")
SITE_CHOICES: tuple[str, ...] = ("random", "largest")

Site = tuple[int, str, int, int]  # (layer, role, row, col) of an (out_features, in_features) matrix


@dataclass(frozen=True)
class BitLayout:
    """Where the fields of one floating-point format lie; bit 0 is the lowest mantissa bit."""

    name: str
    width: int
    int_dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int

    @property
    def sign(self) -> int:
        return self.width - 1

    @property
    def exponent(self) -> tuple[int, ...]:
        """Exponent bit positions, highest first."""
        return tuple(range(self.width - 2, self.mantissa_bits - 1, -1))

    @property
    def mantissa(self) -> tuple[int, ...]:
        """Mantissa bit positions, highest first."""
        return tuple(range(self.mantissa_bits - 1, -1, -1))

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every bit position, highest (the sign) first."""
        return tuple(range(self.width - 1, -1, -1))


#: The bit layout of each floating-point dtype a flip supports.
BIT_LAYOUTS: dict[torch.dtype, BitLayout] = {
    torch.float32: BitLayout("float32", 32, torch.int32, 8, 23),
    torch.float16: BitLayout("float16", 16, torch.int16, 5, 10),
    torch.bfloat16: BitLayout("bfloat16", 16, torch.int16, 8, 7),
}
_DTYPE_NAMES = {layout.name: dtype for dtype, layout in BIT_LAYOUTS.items()}
_DTYPE_NAMES.update({"fp32": torch.float32, "fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                     "float": torch.float32})


def bit_layout(dtype: torch.dtype | str) -> BitLayout:
    """The layout of ``dtype`` (a torch dtype or its name: float32, float16, bfloat16)."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise LayerscopeError(f"dtype {dtype!r} has no bit layout for flips: allowed {allowed(l.name for l in BIT_LAYOUTS.values())}")
        dtype = _DTYPE_NAMES[key]
    layout = BIT_LAYOUTS.get(dtype)
    if layout is None:
        raise LayerscopeError(f"dtype {dtype} has no bit layout for flips: allowed {allowed(l.name for l in BIT_LAYOUTS.values())}")
    return layout


def dtype_bits(dtype: torch.dtype | str) -> int:
    """The number of bits of one value of ``dtype`` (32 or 16)."""
    return bit_layout(dtype).width


def _check_bit(layout: BitLayout, bit) -> int:
    if isinstance(bit, bool) or not isinstance(bit, (int, np.integer)):
        raise LayerscopeError(f"bit {bit!r} is not a bit position: allowed integers 0..{layout.width - 1} for {layout.name}")
    if not 0 <= int(bit) < layout.width:
        raise LayerscopeError(f"bit {bit} is out of range for {layout.name}: allowed 0..{layout.width - 1} "
                              f"(sign {layout.sign}, exponent {layout.exponent[0]}..{layout.exponent[-1]}, "
                              f"mantissa {layout.mantissa[0]}..0)")
    return int(bit)


def bit_field(dtype: torch.dtype | str, bit: int) -> str:
    """``"sign"``, ``"exponent"`` or ``"mantissa"``: the field bit ``bit`` of ``dtype`` belongs to."""
    layout = bit_layout(dtype)
    bit = _check_bit(layout, bit)
    if bit == layout.sign:
        return "sign"
    return "exponent" if bit >= layout.mantissa_bits else "mantissa"


def bit_label(dtype: torch.dtype | str, bit: int) -> str:
    """A short name: ``"sign"``, ``"exp<k>"`` (k = 0 the lowest exponent bit) or ``"man<k>"`` (k = the bit)."""
    field = bit_field(dtype, bit)
    if field == "sign":
        return "sign"
    if field == "exponent":
        return f"exp{bit - bit_layout(dtype).mantissa_bits}"
    return f"man{bit}"


def parse_bit(dtype: torch.dtype | str, bit: int | str) -> int:
    """A bit position from an integer, a digit string (``"30"``) or a label (``"exp7"``, ``"sign"``, ``"man0"``)."""
    layout = bit_layout(dtype)
    if isinstance(bit, str):
        text = bit.strip().lower()
        if text.lstrip("-").isdigit():
            return _check_bit(layout, int(text))
        labels = {bit_label(dtype, b): b for b in layout.all_bits}
        if text not in labels:
            raise LayerscopeError(f"bit {bit!r} is not a bit of {layout.name}: allowed 0..{layout.width - 1} or "
                                  f"a label ({allowed(labels, limit=40)})")
        return labels[text]
    return _check_bit(layout, bit)


def resolve_bits(dtype: torch.dtype | str, spec: str | int | Iterable[int | str] | None = None) -> tuple[int, ...]:
    """Bit positions from a specification: None or ``"all"`` (every bit), a field name (``"sign"``,
    ``"exponent"``, ``"mantissa"``), labels (``"exp7"``), integers, or a comma-separated mix of these.
    Returned in the order given, highest first within a field, without repeats."""
    layout = bit_layout(dtype)
    if spec is None:
        return layout.all_bits
    if isinstance(spec, str):
        tokens: list = [t.strip() for t in spec.split(",") if t.strip()]
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        tokens = [int(spec)]
    else:
        tokens = list(spec)
    if not tokens:
        raise LayerscopeError(f"no bits given ({spec!r}): allowed all, sign, exponent, mantissa, labels such as exp7 "
                              f"or positions 0..{layout.width - 1}")
    out: list[int] = []
    for token in tokens:
        name = token.strip().lower() if isinstance(token, str) else None
        if name == "all":
            values = layout.all_bits
        elif name == "sign":
            values = (layout.sign,)
        elif name in ("exponent", "exp"):
            values = layout.exponent
        elif name in ("mantissa", "man"):
            values = layout.mantissa
        else:
            values = (parse_bit(dtype, token),)
        out.extend(v for v in values if v not in out)
    return tuple(out)


def _xor_mask(layout: BitLayout, bit: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``1 << bit`` as the signed integer of the layout's width (two's complement for the sign bit)."""
    if isinstance(bit, torch.Tensor):
        if bit.dtype.is_floating_point or bit.dtype.is_complex or bit.dtype == torch.bool:
            raise LayerscopeError(f"bit positions must be integers, got a {bit.dtype} tensor")
        if bit.numel():
            lo, hi = int(bit.min()), int(bit.max())
            if lo < 0 or hi >= layout.width:
                bad = lo if lo < 0 else hi
                raise LayerscopeError(f"bit {bad} is out of range for {layout.name}: allowed 0..{layout.width - 1}")
        mask = torch.ones((), dtype=torch.int64, device=device) << bit.to(device=device, dtype=torch.int64)
    else:
        mask = torch.tensor(1 << _check_bit(layout, bit), dtype=torch.int64, device=device)
    mask = torch.where(mask >= 2 ** (layout.width - 1), mask - 2**layout.width, mask)
    return mask.to(layout.int_dtype)


def flip_bits(values: torch.Tensor, bit: int | torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` with bit ``bit`` flipped in every element (``bit`` may be a tensor of
    positions broadcastable to ``values``), by XOR on the same-width integer view."""
    if not isinstance(values, torch.Tensor):
        raise LayerscopeError(f"flip_bits needs a tensor, got {type(values).__name__}")
    layout = bit_layout(values.dtype)
    mask = _xor_mask(layout, bit, values.device)
    ints = values.detach().clone(memory_format=torch.contiguous_format).view(layout.int_dtype)
    try:
        flipped = torch.bitwise_xor(ints, mask)
    except RuntimeError as exc:
        raise LayerscopeError(f"bit positions of shape {tuple(mask.shape)} do not broadcast to values of shape "
                              f"{tuple(values.shape)}") from exc
    if flipped.shape != values.shape:
        raise LayerscopeError(f"bit positions of shape {tuple(mask.shape)} would change the values' shape "
                              f"{tuple(values.shape)}")
    return flipped.view(values.dtype)


# ----------------------------------------------------------------------------------------------
# Choosing the weights to flip


def _check_seed(seed) -> int | tuple[int, ...]:
    parts = seed if isinstance(seed, (tuple, list)) else (seed,)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or part < 0:
            raise LayerscopeError(f"seed {seed!r} must be a non-negative integer (or a tuple of them)")
    return tuple(int(p) for p in parts) if isinstance(seed, (tuple, list)) else int(seed)


def choose_sites(
    model: nn.Module,
    *,
    count: int,
    seed: int | Sequence[int] = 0,
    layers: Iterable[int] | None = None,
    roles: Iterable[str] | None = None,
    how: str = "random",
) -> list[Site]:
    """``count`` distinct weights ``(layer, role, row, col)`` of the targeted matrices (all weight
    roles of all layers by default), as ``(out_features, in_features)`` coordinates.

    ``how="random"``: uniform over every weight of the targeted matrices without replacement (each
    matrix drawn in proportion to its size), deterministic for a ``seed`` (an integer or a tuple of
    them). ``how="largest"``: the ``count`` weights of largest magnitude (ties: the earlier site),
    which does not depend on the seed. Sites come sorted layer-major, in the order of the targets.
    """
    if how not in SITE_CHOICES:
        raise LayerscopeError(f"site choice {how!r} is unknown: allowed {allowed(SITE_CHOICES)}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise LayerscopeError(f"count {count!r} of weights to flip is out of range: must be a whole number >= 1")
    seed = _check_seed(seed)
    arch = architecture(model)
    targets = weight_targets(model, layers, roles)
    shapes = [arch.role_shape(role, layer) for layer, role in targets]
    sizes = np.array([r * c for r, c in shapes], dtype=np.int64)
    total = int(sizes.sum())
    if count > total:
        raise LayerscopeError(f"count {count} is more than the {total} weights of the targeted matrices")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if how == "random":
        flat = np.sort(np.random.default_rng(seed).choice(total, size=int(count), replace=False))
    else:
        flat = _largest(arch, targets, offsets, int(count))
    sites = []
    for index in flat.tolist():
        t = int(np.searchsorted(offsets, index, side="right")) - 1
        layer, role = targets[t]
        row, col = divmod(index - int(offsets[t]), shapes[t][1])
        sites.append((int(layer), role, int(row), int(col)))
    return sites


def _largest(arch, targets, offsets: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` largest |w| over the targets, sorted by index."""
    values, indices = [], []
    for t, (layer, role) in enumerate(targets):
        magnitude = arch.read_weight(role, layer).float().abs().flatten()
        k = min(count, magnitude.numel())
        # the k-th largest value is the threshold; take every entry >= it so that ties are all seen
        threshold = torch.topk(magnitude, k).values[-1]
        chosen = torch.nonzero(magnitude >= threshold).flatten()
        values.append(magnitude[chosen].double().cpu().numpy())
        indices.append(chosen.cpu().numpy().astype(np.int64) + int(offsets[t]))
    values_all, indices_all = np.concatenate(values), np.concatenate(indices)
    order = np.lexsort((indices_all, -values_all))[:count]  # largest first, ties: smaller index first
    return np.sort(indices_all[order])


# ----------------------------------------------------------------------------------------------
# The intervention


class BitFlip(Intervention):
    """Flip one bit (``bits`` an int) or one bit per site (``bits`` a sequence) of the weights at
    ``sites`` (``(layer, role, row, col)``), in the parameters' own dtype. Undo flips the same bits
    again, which restores every bit exactly (also for flips that made NaN or infinity).

    Sites go through the architecture adapter, so they work for GPT-2's transposed ``Conv1D`` and for
    parts of fused matrices. A site given twice is refused: the second flip would cancel the first.
    """

    def __init__(self, sites: Iterable[Sequence], bits: int | Sequence[int]):
        self.sites: list[Site] = []
        for site in sites:
            if not isinstance(site, (tuple, list)) or len(site) != 4:
                raise LayerscopeError(f"site {site!r} must be (layer, role, row, col)")
            layer, role, row, col = site
            for name, value in (("layer", layer), ("row", row), ("col", col)):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise LayerscopeError(f"site {tuple(site)!r}: {name} {value!r} is not an integer")
            if not isinstance(role, str):
                raise LayerscopeError(f"site {tuple(site)!r}: role {role!r} is not a role name")
            self.sites.append((int(layer), role, int(row), int(col)))
        if not self.sites:
            raise LayerscopeError("no sites to flip: give at least one (layer, role, row, col)")
        seen: set[Site] = set()
        for site in self.sites:
            if site in seen:
                raise LayerscopeError(f"site {site} is given twice: flipping it twice would cancel the flip")
            seen.add(site)
        if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
            self.bits: list[int] = [int(bits)] * len(self.sites)
        else:
            bits = list(bits)
            if len(bits) != len(self.sites):
                raise LayerscopeError(f"{len(bits)} bits for {len(self.sites)} sites: give one bit, or one per site")
            for bit in bits:
                if isinstance(bit, bool) or not isinstance(bit, (int, np.integer)):
                    raise LayerscopeError(f"bit {bit!r} is not a bit position (an integer)")
            self.bits = [int(b) for b in bits]

    def _groups(self, model: nn.Module) -> dict[tuple[int, str], tuple[list[int], list[int], list[int]]]:
        """Sites grouped per matrix, validated against the model (before anything changes)."""
        arch = architecture(model)
        layers = sorted({layer for layer, *_ in self.sites})
        roles = list(dict.fromkeys(role for _, role, *_ in self.sites))
        weight_targets(model, layers, roles)  # refuses bad layers and roles with a clear message
        groups: dict[tuple[int, str], tuple[list[int], list[int], list[int]]] = {}
        for (layer, role, row, col), bit in zip(self.sites, self.bits):
            layer = layer + arch.num_layers if layer < 0 else layer
            rows, cols = arch.role_shape(role, layer)
            if not (0 <= row < rows and 0 <= col < cols):
                raise LayerscopeError(f"site {(layer, role, row, col)} is outside the {role} matrix of layer {layer}: "
                                      f"allowed rows 0..{rows - 1}, cols 0..{cols - 1}")
            layout = bit_layout(arch.role_module(role, layer).weight.dtype)
            _check_bit(layout, bit)
            group = groups.setdefault((layer, role), ([], [], []))
            group[0].append(row)
            group[1].append(col)
            group[2].append(bit)
        # the same weight reached twice (e.g. layer -1 and its positive index) would cancel too
        for (layer, role), (rows, cols, _) in groups.items():
            if len(set(zip(rows, cols))) != len(rows):
                raise LayerscopeError(f"a weight of the {role} matrix of layer {layer} is given twice: the flips would cancel")
        return groups

    @staticmethod
    def _flip(arch, groups) -> None:
        for (layer, role), (rows, cols, bits) in groups.items():
            weight = arch.read_weight(role, layer)
            r = torch.tensor(rows, dtype=torch.long, device=weight.device)
            c = torch.tensor(cols, dtype=torch.long, device=weight.device)
            weight[r, c] = flip_bits(weight[r, c], torch.tensor(bits, dtype=torch.int64, device=weight.device))
            arch.write_weight(role, layer, weight)

    def apply(self, model: nn.Module) -> Undo:
        arch = architecture(model)
        groups = self._groups(model)
        done: list = []

        def undo() -> None:  # XOR again: the exact original bits
            self._flip(arch, dict(reversed(done)))

        try:
            for key, group in groups.items():
                self._flip(arch, {key: group})
                done.append((key, group))
        except BaseException:
            undo()
            raise
        return undo

    def first_block(self, model: nn.Module) -> int:
        num_layers = architecture(model).num_layers
        return min(layer + num_layers if layer < 0 else layer for layer, *_ in self.sites)

    def describe(self) -> dict:
        return {"kind": "BitFlip", "sites": [list(s) for s in self.sites], "bits": list(self.bits)}

    def nonfinite_after(self, model: nn.Module) -> int:
        """How many of the sites would hold a non-finite value (inf or NaN) after the flip, computed
        from the model as it is now (unflipped), without changing it."""
        arch = architecture(model)
        count = 0
        for (layer, role), (rows, cols, bits) in self._groups(model).items():
            weight = arch.read_weight(role, layer)
            r = torch.tensor(rows, dtype=torch.long, device=weight.device)
            c = torch.tensor(cols, dtype=torch.long, device=weight.device)
            flipped = flip_bits(weight[r, c], torch.tensor(bits, dtype=torch.int64, device=weight.device))
            count += int((~torch.isfinite(flipped)).sum())
        return count


def model_weight_dtype(model: nn.Module, layers: Iterable[int] | None = None, roles: Iterable[str] | None = None) -> torch.dtype:
    """The one dtype of the targeted weight matrices (refused when they mix dtypes or have no bit layout)."""
    arch = architecture(model)
    dtypes = {arch.role_module(role, layer).weight.dtype for layer, role in weight_targets(model, layers, roles)}
    if len(dtypes) != 1:
        raise LayerscopeError(f"the targeted weights mix dtypes {sorted(map(str, dtypes))}: bit flips need one format")
    dtype = dtypes.pop()
    bit_layout(dtype)
    return dtype


__all__ = ["BIT_LAYOUTS", "BitLayout", "BitFlip", "FIELDS", "SITE_CHOICES", "bit_field", "bit_label", "bit_layout",
           "choose_sites", "dtype_bits", "flip_bits", "model_weight_dtype", "parse_bit", "resolve_bits"]
