"""Random weight noise: add Gaussian or uniform noise to weights, reversibly and reproducibly.

    with intervene(model, WeightNoise(0.1, seed=3, layers=[20, 21], roles=["q", "k"])):
        ...  # every targeted matrix W is now W + e, e ~ N(0, (0.1 * std(W))^2) entrywise
    # the original weights are back, bit for bit

**Targets.** By default the block matrices of :func:`~layerscope.interventions.weight_targets`
(``layers`` x ``roles``; all layers and all of ``q k v o gate up down`` the family has), read and
written through the architecture adapter: GPT-2's transposed ``Conv1D`` and the rows of a fused
q/k/v or gate/up matrix are handled for every family, and a part of a fused matrix (``q`` of
Phi-3's ``qkv_proj``) is a tensor of its own (its own standard deviation, its own draw). Biases are
left alone. ``all_parameters=True`` instead noises every floating-point parameter of the model
(embeddings, norms, biases, head): a tied input embedding / output head is one tensor and is noised
once, under the name ``named_parameters()`` gives it first.

**Scale.** ``scale="relative"`` (default): the noise standard deviation of a tensor is
``level * std(W)``, with the population standard deviation of that tensor's entries (a tensor whose
entries are all equal, such as a freshly initialised norm, gets no noise). ``scale="absolute"``:
the standard deviation is ``level`` itself (the seed framework's levels 0.001 .. 0.5).

**Distribution.** ``"gaussian"``: ``sigma * N(0, 1)``. ``"uniform"``: uniform on
``[-sqrt(3) sigma, sqrt(3) sigma)``, which has the *same standard deviation* ``sigma`` as the
Gaussian at the same level, so the two curves are comparable level by level.

**Determinism.** Each tensor's noise comes from its own ``torch.Generator``, seeded by a stable hash
(SHA-256, not Python's ``hash``) of ``(seed, layer, role)`` (``(seed, parameter name)`` with
``all_parameters``), drawn in float32 on the CPU and only then moved to the weight's device. So the
draw does not depend on the order tensors are visited in, on which other tensors are targeted, or
on the device; and the level only scales the draw: the same seed at two levels gives noise in the
same direction (common random numbers, which makes a level curve smoother than independent draws).
The sum ``W + sigma * e`` is formed in float32 (or the weight's own dtype when wider) and rounded
once to the weight's dtype.

**Exactness.** Exact copies of every targeted tensor are kept and written back on undo (also when an
error interrupts ``apply`` half way). The copies stay on the weights' device when they fit easily
in its free memory, else they go to CPU memory (always with ``all_parameters`` on an accelerator).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import LayerscopeError, allowed
from ..models.architecture import architecture
from .base import Intervention, Undo
from .targets import weight_targets

DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "uniform")
SCALES: tuple[str, ...] = ("relative", "absolute")
#: Changes whenever the way noise is drawn changes, so stored sweeps of an older draw are not resumed.
NOISE_VERSION = 1
_SQRT3 = math.sqrt(3.0)


def noise_seed(seed: int, *key: object) -> int:
    """A stable 63-bit generator seed for one tensor: SHA-256 of ``seed`` and the tensor's key."""
    text = "/".join(["layerscope-noise", str(int(seed)), *map(str, key)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


def draw_unit_noise(shape: Iterable[int], distribution: str, generator_seed: int) -> torch.Tensor:
    """Noise of standard deviation 1, float32 on the CPU, from a generator seeded with ``generator_seed``:
    standard normal, or uniform on ``[-sqrt(3), sqrt(3))``."""
    check_choice("distribution", distribution, DISTRIBUTIONS)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(generator_seed))
    shape = tuple(int(s) for s in shape)
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * _SQRT3


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LayerscopeError(f"unknown {what} {value!r}: allowed {allowed(choices)}")
    return value  # type: ignore[return-value]


def check_level(level: object) -> float:
    """A noise level: a finite real number >= 0."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise LayerscopeError(f"noise level {level!r} is not a number: allowed a finite number >= 0")
    value = float(level)
    if not math.isfinite(value) or value < 0:
        raise LayerscopeError(f"noise level {level!r} is out of range: allowed a finite number >= 0")
    return value


def noise_std(weight: torch.Tensor, level: float, scale: str) -> float:
    """The noise standard deviation for ``weight``: ``level * std(weight)`` (population std, in
    float64) for ``scale="relative"``, ``level`` for ``"absolute"``."""
    if scale == "absolute":
        return float(level)
    if weight.numel() == 0 or level == 0:
        return 0.0
    with torch.no_grad():
        std = float(weight.detach().to(torch.float64).std(correction=0))
    return float(level) * std


def noised(weight: torch.Tensor, sigma: float, unit: torch.Tensor) -> torch.Tensor:
    """``weight + sigma * unit`` formed in float32 (or wider) and rounded once to ``weight``'s dtype."""
    work = torch.promote_types(weight.dtype, torch.float32)
    out = unit.to(device=weight.device, dtype=work, copy=True)  # never scale the caller's draw in place
    return out.mul_(sigma).add_(weight.to(work)).to(weight.dtype)


class WeightNoise(Intervention):
    """Add random noise of standard deviation ``level`` (absolute) or ``level * std(W)`` (relative) to
    weights; see the module documentation for targets, seeding and exactness.

    Parameters: ``level`` (finite, >= 0), ``distribution`` (``gaussian`` | ``uniform``, same standard
    deviation), ``scale`` (``relative`` | ``absolute``), ``seed`` (an integer), ``layers``/``roles``
    (block matrices to noise, default all), ``all_parameters`` (every floating parameter instead;
    cannot be combined with ``layers``/``roles``).
    """

    def __init__(
        self,
        level: float,
        *,
        distribution: str = "gaussian",
        scale: str = "relative",
        seed: int = 0,
        layers: int | Iterable[int] | None = None,
        roles: str | Iterable[str] | None = None,
        all_parameters: bool = False,
    ):
        self.level = check_level(level)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.scale = check_choice("scale", scale, SCALES)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise LayerscopeError(f"noise seed {seed!r} is not an integer: allowed any whole number")
        self.seed = int(seed)
        self.layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        self.roles = None if roles is None else ([roles] if isinstance(roles, str) else list(roles))
        self.all_parameters = bool(all_parameters)
        if self.all_parameters and (self.layers is not None or self.roles is not None):
            raise LayerscopeError(
                "all_parameters noises every parameter of the model; it cannot be combined with layers or roles "
                f"(got layers={self.layers!r}, roles={self.roles!r})"
            )

    # -- what is noised --------------------------------------------------------------------------

    def targets(self, model: nn.Module) -> list[tuple[int, str]] | list[str]:
        """The ``(layer, role)`` pairs noised, or with ``all_parameters`` the parameter names
        (floating-point parameters, each shared tensor once); validated against the model."""
        if self.all_parameters:
            return [name for name, p in model.named_parameters() if p.is_floating_point()]
        return weight_targets(model, self.layers, self.roles)

    def first_block(self, model: nn.Module) -> int:
        if self.all_parameters:
            return 0  # the embeddings change
        return min(layer for layer, _ in weight_targets(model, self.layers, self.roles))

    # -- applying --------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> Undo:
        if self.all_parameters:
            return self._apply_parameters(model)
        return self._apply_roles(model)

    def _apply_roles(self, model: nn.Module) -> Undo:
        arch = architecture(model)
        targets = weight_targets(model, self.layers, self.roles)
        first_layer, first_role = targets[0]
        device = arch.role_module(first_role, first_layer).weight.device
        nbytes = sum(_role_bytes(arch, role, layer) for layer, role in targets)
        keep_on = _copy_device(device, nbytes, force_cpu=False)
        saved: list[tuple[int, str, torch.Tensor]] = []

        def undo() -> None:
            for layer, role, weight in reversed(saved):
                arch.write_weight(role, layer, weight)

        try:
            for layer, role in targets:
                weight = arch.read_weight(role, layer)
                sigma = noise_std(weight, self.level, self.scale)
                if sigma == 0.0:
                    continue  # nothing to add: leave the tensor untouched (also its signed zeros)
                saved.append((layer, role, weight.to(keep_on, copy=True) if weight.device != keep_on else weight))
                unit = draw_unit_noise(weight.shape, self.distribution, noise_seed(self.seed, layer, role))
                arch.write_weight(role, layer, noised(weight, sigma, unit))
        except BaseException:
            undo()
            raise
        return undo

    def _apply_parameters(self, model: nn.Module) -> Undo:
        params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        if not params:
            raise LayerscopeError(f"{type(model).__name__} has no floating-point parameters to add noise to")
        device = params[0][1].device
        keep_on = _copy_device(device, sum(p.numel() * p.element_size() for _, p in params), force_cpu=True)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []

        def undo() -> None:
            with torch.no_grad():
                for param, original in reversed(saved):
                    param.copy_(original)

        try:
            with torch.no_grad():
                for name, param in params:
                    sigma = noise_std(param, self.level, self.scale)
                    if sigma == 0.0:
                        continue
                    saved.append((param, param.detach().to(keep_on, copy=True)))
                    unit = draw_unit_noise(param.shape, self.distribution, noise_seed(self.seed, name))
                    param.copy_(noised(param.detach(), sigma, unit))
        except BaseException:
            undo()
            raise
        return undo


def _role_bytes(arch, role: str, layer: int) -> int:
    out_features, in_features = arch.role_shape(role, layer)
    return out_features * in_features * arch.role_module(role, layer).weight.element_size()


def _copy_device(device: torch.device, nbytes: int, *, force_cpu: bool) -> torch.device:
    """Where to keep the exact copies: the weights' own device when it is the CPU, or when they take
    at most half of the accelerator's free memory (and ``force_cpu`` is off); else the CPU."""
    if device.type == "cpu":
        return device
    if force_cpu:
        return torch.device("cpu")
    if device.type == "cuda":
        try:
            free = torch.cuda.mem_get_info(device)[0]
        except Exception:  # pragma: no cover - descriptive only
            return torch.device("cpu")
        return device if nbytes <= free // 2 else torch.device("cpu")
    return torch.device("cpu")


__all__ = ["WeightNoise", "DISTRIBUTIONS", "SCALES", "NOISE_VERSION", "noise_seed", "draw_unit_noise", "noise_std",
           "check_level"]
