"""LASER: replace one weight matrix (a role at a layer) by its rank-k approximation.

    cache = SVDCache()                                         # one SVD per matrix, for the whole sweep
    for rate in (1, 5, 9, 9.9):
        with intervene(model, LowRank("fc_out", 20, rate=rate, cache=cache)):
            ...                                                # W_down(20) is its LASER rank-k version

``LowRank(lname_or_role, layer, rate=... | rank=... | keep_fraction=...)`` takes the parameters of
the LASER code (Sharma, Ash and Misra, "The Truth is in There", pratyushasharma/laser) as they are
written there, or a layerscope role (``q k v o gate up down``, and ``qkv``/``gate_up`` in fused
families) with an explicit rank or kept fraction. The matrix is read and written through the
architecture adapter, so GPT-2's transposed ``Conv1D``, fused q/k/v (the role's own rows only) and
the narrow k/v of grouped-query attention are handled for every family.

**Rate to rank, exactly as LASER computes it.** Every per-model wrapper calls

    src/laser/gptj_laser.py (also llama2_laser.py, phi1_5_laser.py):
        mat_analysis = do_low_rank(mat_analysis_tensor.type(torch.float32), (10 - rate) * 0.1)
    src/laser/matrix_utils.py, do_low_rank(weight, k, ...):
        max_rank = min(weight.shape[0], weight.shape[1])
        desired_rank = int(max_rank * k)

so the kept rank is ``int(min(m, n) * ((10 - rate) * 0.1))``, evaluated in Python floats in that
order (``rate`` is the fraction *removed*, in tenths; ``int`` truncates toward zero). The float
expression matters at a few points: (1000, 1000) at rate 9.9 keeps 9, not 10, because
``10 - 9.9 == 0.0999...96``. Rate 10 keeps 0 singular values (the matrix becomes zero).
``laser_kept_rank`` is that formula. ``keep_fraction=f`` keeps ``floor(f * min(m, n))`` (at least 1;
a 1e-9 guard so that 0.29 of 100 is 29, not 28).

**lname, per family** (LASER's ``convert_name``):

    gptj_laser.py:   transformer.h.26.mlp.fc_in.weight -> fc_in; mlp.fc_out.weight -> fc_out;
                     attn.{k,q,v}_proj.weight -> k_proj/q_proj/v_proj; attn.out_proj.weight -> out_proj
                     "mlp" -> [mlp.fc_in, mlp.fc_out]; "attn" -> [attn.k_proj, q_proj, v_proj, out_proj]
    llama2_laser.py: model.layers.20.mlp.gate_proj.weight -> fc_in; mlp.up_proj.weight -> fc_up;
                     mlp.down_proj.weight -> fc_out; "mlp" -> [gate_proj, up_proj, down_proj]
    all wrappers:    if lname == "dont": print(f"Not intervening at all"); return model_edit

So ``fc_in`` is the first MLP matrix (``gate`` where the MLP is gated, else ``up``), ``fc_up`` is
``up`` of a gated MLP only (refused elsewhere, e.g. GPT-2), ``fc_out`` is ``down``, ``q_proj``
``k_proj`` ``v_proj`` ``out_proj`` are ``q k v o``, ``mlp``/``attn`` are every matrix of the group,
each with its own kept rank from its own shape, and ``dont`` changes nothing. ``lnum`` is a block
index (``_modify_layer``: ``name.startswith(f"model.layers.{lnum_to_modify}.")``); LASER's ``-1``
means every layer, which this class refuses rather than reading it as "the last layer": use one
``LowRank`` per layer. Where this differs from LASER, on purpose: LASER's Phi-1.5 wrapper reduces
the whole fused ``Wqkv`` for ``q_proj``/``k_proj``/``v_proj`` (here: the role's own rows; pass the
role ``qkv`` for the whole fused matrix), and LASER uses ``torch.svd_lowrank(q=desired_rank,
niter=2)``, a randomised SVD without oversampling, where this module uses the exact SVD by default.

**One SVD per matrix serves every rank.** ``SVDCache`` decomposes each (model, role, layer) matrix
once, exactly (``torch.linalg.svd``, float32 or float64, on the weight's device; bfloat16/float16
weights are decomposed in float32 and the result is cast back), and every rank after that is a
truncation ``U[:, :r] diag(S[:r]) Vh[:r]``. A fingerprint of the weight (a float64 product with a
fixed random vector) detects a weight that changed since, and the SVD is then redone. The
randomised SVD (a seeded range finder with ``oversample`` extra columns and ``n_iter`` power
iterations, Halko et al. 2011) is used only with ``randomized=True``; it keeps ``rank +
oversample`` triplets of the first rank asked for, and refuses a larger rank later.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from ..errors import LayerscopeError, allowed
from ..models.architecture import FUSED_ROLES, ROLES, architecture
from .base import Intervention, Undo
from .weights import RoleEdit

#: The ``--lname`` values of the LASER code that this intervention accepts.
LASER_LNAMES: tuple[str, ...] = (
    "fc_in", "fc_out", "fc_up", "mlp", "k_proj", "q_proj", "v_proj", "out_proj", "attn", "dont",
)

_LASER_SINGLE = {"fc_out": "down", "k_proj": "k", "q_proj": "q", "v_proj": "v", "out_proj": "o"}
_FRACTION_GUARD = 1e-9


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_rate(rate) -> float:
    if not _is_real(rate) or not math.isfinite(float(rate)) or not 0 <= float(rate) <= 10:
        raise LayerscopeError(
            f"rate {rate!r} is not valid: allowed is a number in [0, 10] (LASER's rate, tenths removed)"
        )
    return float(rate)


def _check_shape(shape) -> tuple[int, int]:
    try:
        m, n = (operator.index(s) for s in shape)
    except (TypeError, ValueError):
        raise LayerscopeError(
            f"shape {shape!r} is not valid: allowed is a pair of positive integers (rows, columns)"
        ) from None
    if m < 1 or n < 1:
        raise LayerscopeError(f"shape {tuple(shape)!r} is not valid: allowed is a pair of positive integers")
    return int(m), int(n)


def laser_kept_rank(shape: tuple[int, int], rate: float) -> int:
    """The number of singular values LASER keeps for a matrix of ``shape`` at ``rate``.

    ``int(min(m, n) * ((10 - rate) * 0.1))``, the expression of LASER's ``do_low_rank(W, (10 - rate)
    * 0.1)`` (``desired_rank = int(max_rank * k)``, ``max_rank = min(W.shape)``), in the same float
    arithmetic: rate 0 keeps everything, rate 9 keeps a tenth (rounded down), rate 10 keeps nothing.
    """
    m, n = _check_shape(shape)
    rate = _check_rate(rate)
    return int(min(m, n) * ((10 - rate) * 0.1))


def _fraction_rank(full: int, keep_fraction: float) -> int:
    return max(1, min(full, math.floor(full * keep_fraction + _FRACTION_GUARD)))


def lname_roles(lname: str, model: nn.Module) -> tuple[str, ...]:
    """The layerscope roles a LASER ``lname`` denotes in ``model`` (``"dont"`` gives ``()``)."""
    if lname not in LASER_LNAMES:
        raise LayerscopeError(f"lname {lname!r} is not a LASER layer name: allowed {allowed(LASER_LNAMES)}")
    arch = architecture(model)
    roles = arch.roles()
    gated = "gate" in roles
    if lname == "dont":
        return ()
    if lname == "fc_in":
        return ("gate",) if gated else ("up",)
    if lname == "fc_up":
        if not gated:
            raise LayerscopeError(
                f"lname 'fc_up' names the up projection of a gated MLP, which a {arch.family} model lacks "
                "(its MLP is up then down: use 'fc_in' for the first MLP matrix, 'fc_out' for the second)"
            )
        return ("up",)
    if lname == "mlp":
        return tuple(r for r in ("gate", "up", "down") if r in roles)
    if lname == "attn":
        return ("q", "k", "v", "o")
    return (_LASER_SINGLE[lname],)


# ----------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    model: weakref.ref
    shape: tuple[int, int]
    fingerprint: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    exact: bool

    @property
    def q(self) -> int:
        return int(self.S.shape[0])


class SVDCache:
    """One SVD per (model, role, layer) matrix, reused for every rank of a sweep.

    ``dtype`` is the dtype the SVD is computed in (float32 or float64; weights in bfloat16 or
    float16 are decomposed in float32 at least). ``randomized=True`` uses a seeded randomised SVD
    that keeps ``rank + oversample`` triplets of the first rank asked for; otherwise the SVD is exact.
    ``computed`` counts the SVDs actually computed.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        randomized: bool = False,
        oversample: int = 10,
        n_iter: int = 4,
        seed: int = 0,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise LayerscopeError(f"SVD dtype {dtype} is not supported: allowed torch.float32, torch.float64")
        for name, value, low in (("oversample", oversample, 0), ("n_iter", n_iter, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LayerscopeError(f"{name} {value!r} is not valid: allowed an integer >= {low}")
        self.dtype = dtype
        self.randomized = bool(randomized)
        self.oversample = oversample
        self.n_iter = n_iter
        self.seed = seed
        self.computed = 0
        self._entries: dict[tuple[int, str, int], _Entry] = {}
        self._probes: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        kind = "exact"
        if self.randomized:
            kind = f"randomized, oversample={self.oversample}, n_iter={self.n_iter}, seed={self.seed}"
        return f"SVDCache({kind}, dtype={self.dtype}, matrices={len(self._entries)}, computed={self.computed})"

    def clear(self) -> None:
        """Forget every stored decomposition (frees their memory)."""
        self._entries.clear()

    # -- public ------------------------------------------------------------------------------

    def factors(self, model: nn.Module, role: str, layer: int, *, rank: int | None = None):
        """``(U, S, Vh)`` of the role's ``(out, in)`` matrix at ``layer``, computed once.

        Exact: all ``min(out, in)`` triplets, ``rank`` is ignored. Randomised: ``rank`` (the largest
        rank you will ask for) is required the first time; ``rank + oversample`` triplets are kept.
        """
        weight = architecture(model).read_weight(role, layer)
        return self._factors(model, role, layer, weight, rank)

    def truncated(self, model: nn.Module, role: str, layer: int, rank: int) -> torch.Tensor:
        """``U[:, :rank] diag(S[:rank]) Vh[:rank]`` as an ``(out, in)`` matrix in the weight's dtype and device."""
        weight = architecture(model).read_weight(role, layer)
        return self._truncate(model, role, layer, weight, rank)

    # -- internals ---------------------------------------------------------------------------

    def _fingerprint(self, weight: torch.Tensor) -> torch.Tensor:
        n = weight.shape[1]
        probe = self._probes.get(n)
        if probe is None:
            gen = torch.Generator(device="cpu").manual_seed(0x5EED)
            probe = self._probes[n] = torch.randn(n, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            return torch.mv(weight.to(torch.float64), probe.to(weight.device))

    def _factors(self, model, role, layer, weight, rank):
        key = (id(model), role, int(layer))
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        fingerprint = self._fingerprint(weight)
        entry = self._entries.get(key)
        fresh = (
            entry is not None
            and entry.model() is model
            and entry.shape == shape
            and entry.fingerprint.device == fingerprint.device
            and torch.equal(entry.fingerprint, fingerprint)
        )
        if fresh:
            if rank is not None and rank > entry.q:
                raise LayerscopeError(
                    f"the randomised SVD of role {role!r} at layer {layer} kept {entry.q} singular values "
                    f"(the first rank asked for + oversample {self.oversample}); rank {rank} needs more: ask for the "
                    "largest rank first, or use the exact SVD (SVDCache(randomized=False))"
                )
            return entry.U, entry.S, entry.Vh
        if self.randomized and rank is None:
            raise LayerscopeError(
                "a randomised SVD needs the largest rank you will ask for: call factors(..., rank=r) or truncated()"
            )
        with torch.no_grad():
            matrix = weight.to(self.dtype)
            if self.randomized:
                U, S, Vh = self._randomized_svd(matrix, min(rank + self.oversample, min(shape)))
            else:
                U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        self.computed += 1
        self._entries[key] = _Entry(weakref.ref(model), shape, fingerprint, U, S, Vh, not self.randomized)
        return U, S, Vh

    def _randomized_svd(self, A: torch.Tensor, q: int):
        """Seeded range finder with ``n_iter`` re-orthonormalised power iterations, then an exact SVD of ``Q^T A``."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        omega = torch.randn(A.shape[1], q, generator=gen, dtype=A.dtype).to(A.device)
        Q = torch.linalg.qr(A @ omega).Q
        for _ in range(self.n_iter):
            Z = torch.linalg.qr(A.mT @ Q).Q
            Q = torch.linalg.qr(A @ Z).Q
        Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
        return Q @ Ub, S, Vh

    def _truncate(self, model, role, layer, weight, rank) -> torch.Tensor:
        full = min(weight.shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= full:
            raise LayerscopeError(
                f"rank {rank!r} is not valid for role {role!r} of shape {tuple(weight.shape)}: allowed 0..{full}"
            )
        U, S, Vh = self._factors(model, role, layer, weight, rank if self.randomized else None)
        if rank > S.shape[0]:  # a fresh randomised entry computed for a smaller rank
            raise LayerscopeError(f"rank {rank} exceeds the {S.shape[0]} singular values the randomised SVD kept")
        with torch.no_grad():
            approx = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            return approx.to(dtype=weight.dtype, device=weight.device)


# ----------------------------------------------------------------------------------------------


class _Truncation(RoleEdit):
    """One role at one layer replaced by its rank-``rank`` truncation (RoleEdit saves and restores it)."""

    def __init__(self, role: str, layer: int, rank: int, cache: SVDCache, model: nn.Module):
        super().__init__(role, layer)
        self._rank = rank
        self._cache = cache
        self._model = model

    def new_weight(self, weight: torch.Tensor, layer: int) -> torch.Tensor:
        return self._cache._truncate(self._model, self.role, layer, weight, self._rank)


class LowRank(Intervention):
    """Replace the matrix (or matrices) named by ``lname_or_role`` at ``layer`` by a rank-k approximation.

    ``lname_or_role``: a LASER lname (``LASER_LNAMES``) or a layerscope role. Exactly one of
    ``rate`` (LASER's, in [0, 10]: kept rank ``laser_kept_rank(shape, rate)``), ``rank`` (kept
    singular values, 1..min(out, in)) or ``keep_fraction`` (in (0, 1]: ``floor(f * min(out, in))``,
    at least 1). Groups (``mlp``, ``attn``) give each matrix its own kept rank from its own shape.
    A matrix whose kept rank is its full rank (rate 0, ``dont``) is not written at all, so the
    model stays bit-identical. ``cache`` shares SVDs across interventions (a sweep); by default each
    ``LowRank`` has its own exact one.
    """

    def __init__(
        self,
        lname_or_role: str,
        layer: int,
        *,
        rate: float | None = None,
        rank: int | None = None,
        keep_fraction: float | None = None,
        cache: SVDCache | None = None,
    ):
        names = LASER_LNAMES + ROLES + FUSED_ROLES
        if not isinstance(lname_or_role, str) or lname_or_role not in names:
            raise LayerscopeError(
                f"{lname_or_role!r} is neither a LASER lname nor a role: allowed lnames {allowed(LASER_LNAMES)}; "
                f"roles {allowed(ROLES + FUSED_ROLES)}"
            )
        if isinstance(layer, bool):
            raise LayerscopeError(f"layer {layer!r} is not a layer index")
        try:
            layer = operator.index(layer)
        except TypeError:
            raise LayerscopeError(f"layer {layer!r} is not an integer layer index") from None
        if layer < 0:
            raise LayerscopeError(
                f"layer {layer} is not valid: allowed a block index >= 0 (LASER's lnum -1, every layer, is not "
                "supported: use one LowRank per layer)"
            )
        given = [k for k, v in (("rate", rate), ("rank", rank), ("keep_fraction", keep_fraction)) if v is not None]
        if len(given) != 1:
            raise LayerscopeError(
                f"LowRank needs exactly one of rate, rank, keep_fraction; got {', '.join(given) or 'none'}"
            )
        if rate is not None:
            rate = _check_rate(rate)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise LayerscopeError(f"rank {rank!r} is not valid: allowed an integer >= 1 (at most min(out, in))")
        if keep_fraction is not None:
            if not _is_real(keep_fraction) or not math.isfinite(float(keep_fraction)) or not 0 < keep_fraction <= 1:
                raise LayerscopeError(f"keep_fraction {keep_fraction!r} is not valid: allowed a number in (0, 1]")
            keep_fraction = float(keep_fraction)
        if cache is not None and not isinstance(cache, SVDCache):
            raise LayerscopeError(f"cache of type {type(cache).__name__} is not valid: allowed an SVDCache or None")
        self.lname_or_role = lname_or_role
        self.layer = int(layer)
        self.rate = rate
        self.rank = rank
        self.keep_fraction = keep_fraction
        self._cache = cache if cache is not None else SVDCache()

    @property
    def cache(self) -> SVDCache:
        return self._cache

    def _checked_layer(self, model: nn.Module) -> int:
        num_layers = architecture(model).num_layers
        if not self.layer < num_layers:
            raise LayerscopeError(
                f"layer {self.layer} is out of range: the model has {num_layers} layers, allowed 0..{num_layers - 1}"
            )
        return self.layer

    def roles(self, model: nn.Module) -> tuple[str, ...]:
        """The roles this intervention edits in ``model`` (before skipping those kept at full rank)."""
        name = self.lname_or_role
        if name in LASER_LNAMES:
            return lname_roles(name, model)
        arch = architecture(model)
        if name not in arch.roles():
            raise LayerscopeError(
                f"role {name!r} does not exist in a {arch.family} model; allowed: {allowed(arch.roles())}"
            )
        return (name,)

    def kept_ranks(self, model: nn.Module) -> dict[str, int]:
        """Role -> number of singular values kept, from each matrix's own shape."""
        arch = architecture(model)
        layer = self._checked_layer(model)
        out: dict[str, int] = {}
        for role in self.roles(model):
            shape = arch.role_shape(role, layer)
            full = min(shape)
            if self.rate is not None:
                out[role] = laser_kept_rank(shape, self.rate)
            elif self.rank is not None:
                if self.rank > full:
                    raise LayerscopeError(
                        f"rank {self.rank} is too large for role {role!r} at layer {layer} of shape {shape}: "
                        f"allowed 1..{full}"
                    )
                out[role] = self.rank
            else:
                out[role] = _fraction_rank(full, self.keep_fraction)
        return out

    def apply(self, model: nn.Module) -> Undo:
        arch = architecture(model)
        layer = self._checked_layer(model)
        plan = [(role, r) for role, r in self.kept_ranks(model).items() if r < min(arch.role_shape(role, layer))]
        undos: list[Undo] = []

        def undo() -> None:
            for one in reversed(undos):
                one()

        try:
            for role, r in plan:
                undos.append(_Truncation(role, layer, r, self._cache, model).apply(model))
        except BaseException:
            undo()
            raise
        return undo

    def first_block(self, model: nn.Module) -> int:
        return self._checked_layer(model)


__all__ = ["LASER_LNAMES", "laser_kept_rank", "lname_roles", "SVDCache", "LowRank"]
