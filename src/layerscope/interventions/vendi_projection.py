"""The LASER fork's Vendi intervention: keep a diverse set of a matrix's rows and project onto them.

``VendiProjection(lname_or_role, layer, rate=...)`` selects ``k`` rows (output neurons) of each
matrix greedily by Vendi score (:func:`~layerscope.interventions.vendi_selection.vendi_select`) and
replaces the matrix by its least-squares projection onto their row space
(:func:`~layerscope.interventions.vendi_selection.project_onto_rows`). ``k`` comes from LASER's
rate exactly as the fork does (``laser_kept_rank``: the fork's 40 rows of GPT-J's 16384 x 4096
``fc_in`` at rate 9.9), or is given as ``k``.

Selections are cached in a :class:`SelectionCache`, keyed by a hash of the matrix's own values and
the options, never under one fixed file name (the fork's ``processedIndexGPTJ.pickle`` is reused for
whatever model, layer and rate come next). Greedy selection is prefix-consistent: the first ``k``
picks of a selection of ``K > k`` rows are the selection of ``k`` rows, so one selection at the
largest ``k`` of a rate sweep serves every smaller one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerscopeError
from ..models.architecture import architecture
from .base import Intervention, Undo
from .low_rank import LowRank, laser_kept_rank
from .vendi_selection import project_onto_rows, vendi_select
from .weights import RoleEdit


class SelectionCache:
    """Vendi selections by (matrix values, options), in memory and optionally in a folder on disk."""

    def __init__(self, folder: str | Path | None = None, *, device: str | torch.device | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.device = device
        self._memory: dict[str, list[int]] = {}
        self.computed = 0  # selections actually run (for tests and benchmarks)

    @staticmethod
    def key(weight: torch.Tensor, options: dict) -> str:
        digest = hashlib.sha256()
        digest.update(str((tuple(weight.shape), str(weight.dtype))).encode())
        digest.update(weight.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps(options, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def select(self, weight: torch.Tensor, k: int, options: dict) -> list[int]:
        """The first ``k`` rows of the greedy selection on ``weight``'s rows (computed once per key)."""
        key = self.key(weight, options)
        known = self._memory.get(key)
        if known is None and self.folder is not None and (self.folder / f"{key}.json").is_file():
            known = json.loads((self.folder / f"{key}.json").read_text())["rows"]
            self._memory[key] = known
        if known is None or len(known) < k:
            known = vendi_select(weight.float(), k, device=self.device, **options)
            self.computed += 1
            self._memory[key] = known
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / f"{key}.json").write_text(json.dumps({"options": options, "rows": known}))
        return known[:k]


class _Projection(RoleEdit):
    def __init__(self, role: str, layer: int, k: int, options: dict, cache: SelectionCache):
        super().__init__(role, layer)
        self._k, self._options, self._cache = k, options, cache

    def new_weight(self, weight: torch.Tensor, layer: int) -> torch.Tensor:
        rows = self._cache.select(weight, self._k, self._options)
        return project_onto_rows(weight, rows)


class VendiProjection(Intervention):
    """Replace each matrix ``lname_or_role`` names at ``layer`` by its projection onto ``k`` rows
    chosen by greedy Vendi selection; ``k`` from LASER's ``rate`` or given. Reversible bit for bit;
    with ``k >= min(out, in)`` (rate 0, or ``dont``) nothing is written."""

    def __init__(self, lname_or_role: str, layer: int, *, rate: float | None = None, k: int | None = None,
                 bandwidth: float | str = 1.0, use_quality: bool = False, minimize: bool = False,
                 cache: SelectionCache | None = None):
        if (rate is None) == (k is None):
            raise LayerscopeError("VendiProjection needs exactly one of rate and k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise LayerscopeError(f"k {k!r} is not valid: allowed an integer >= 1 (at most the matrix's rows)")
        # LowRank validates the name, the layer and the rate, and resolves LASER names to roles.
        self._names = LowRank(lname_or_role, layer, rate=rate if rate is not None else 0.0)
        self.lname_or_role, self.layer, self.rate, self.k = lname_or_role, int(layer), rate, k
        self.options = {"bandwidth": bandwidth, "use_quality": bool(use_quality), "minimize": bool(minimize)}
        self._cache = cache if cache is not None else SelectionCache()

    def kept_rows(self, model: nn.Module) -> dict[str, int]:
        """Role -> number of rows kept."""
        arch = architecture(model)
        out = {}
        for role in self._names.roles(model):
            shape = arch.role_shape(role, self._names.first_block(model))
            k = laser_kept_rank(shape, self.rate) if self.rate is not None else self.k
            if k > shape[0]:
                raise LayerscopeError(f"k {k} is too large for role {role!r} of shape {shape}: allowed 1..{shape[0]}")
            out[role] = k
        return out

    def apply(self, model: nn.Module) -> Undo:
        layer = self._names.first_block(model)
        arch = architecture(model)
        # k >= min(out, in) rows span the whole row space (generically): the projection is the identity,
        # so nothing is written and the model stays bit-identical (rate 0).
        plan = [(role, k) for role, k in self.kept_rows(model).items() if 0 < k < min(arch.role_shape(role, layer))]
        undos: list[Undo] = []
        try:
            for role, k in plan:
                undos.append(_Projection(role, layer, k, self.options, self._cache).apply(model))
        except BaseException:
            for one in reversed(undos):
                one()
            raise

        def undo() -> None:
            for one in reversed(undos):
                one()

        return undo

    def first_block(self, model: nn.Module) -> int:
        return self._names.first_block(model)

    def describe(self) -> dict:
        return {"kind": "VendiProjection", "lname_or_role": self.lname_or_role, "layer": self.layer,
                "rate": self.rate, "k": self.k, **self.options}


__all__ = ["SelectionCache", "VendiProjection"]
