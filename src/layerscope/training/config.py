"""The configuration of a fine-tuning run, validated up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from layerscope.errors import LayerscopeError, allowed
from layerscope.interventions.base import normalise_layers
from layerscope.models.architecture import FUSED_ROLES, ROLES

#: Fine-tuning methods.
METHODS: tuple[str, ...] = ("full", "lora")
#: Learning-rate schedules: linear warmup then linear decay to 0, or linear warmup then constant.
SCHEDULES: tuple[str, ...] = ("linear", "constant")
#: The learning rate used when ``FinetuneConfig.lr`` is None.
DEFAULT_LR: dict[str, float] = {"full": 2e-5, "lora": 2e-4}

#: Fields that may change between a run and its resumption (they do not change the result).
RESUME_FREE_FIELDS: frozenset[str] = frozenset({"save_every"})


@dataclass
class FinetuneConfig:
    """What to train and how.

    ``method`` is ``"full"`` (the selected blocks' own weights) or ``"lora"`` (low-rank adapters on
    the role matrices ``lora_roles`` of the selected blocks, merged into the weights at the end).
    ``layers`` are the blocks to train (None: all); ``freeze_layers`` are blocks never trained (the
    critical-layers backdoor defence); the two may not overlap. Negative indices count from the end.

    The learning rate follows ``lr_schedule``: ``"linear"`` (default) warms up linearly over
    ``warmup_steps`` optimizer steps and then decays linearly to 0 at the last step (the usual
    Hugging Face schedule); ``"constant"`` warms up and then stays at ``lr``. ``lr=None`` means
    :data:`DEFAULT_LR` of the method (2e-5 full, 2e-4 LoRA). ``max_steps`` (optimizer steps)
    overrides ``epochs``. One optimizer step consumes ``grad_accum`` micro-batches of
    ``batch_size`` sequences. ``max_grad_norm`` 0 turns clipping off. Weight decay applies to
    matrices only, never to biases and norm weights (1-D parameters).
    """

    method: str = "full"
    layers: list[int] | None = None
    freeze_layers: list[int] | None = None
    train_embeddings: bool = False
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "linear"
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_roles: tuple[str, ...] = field(default_factory=lambda: ROLES)
    seed: int = 0
    save_every: int = 50

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default when it is None."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR.get(self.method, DEFAULT_LR["full"])

    def validate(self) -> None:
        """Refuse bad values with a message naming the value and what is allowed."""
        if self.method not in METHODS:
            raise LayerscopeError(f"unknown fine-tuning method {self.method!r}; allowed: {allowed(METHODS)}")
        if self.lr_schedule not in SCHEDULES:
            raise LayerscopeError(f"unknown lr_schedule {self.lr_schedule!r}; allowed: {allowed(SCHEDULES)}")
        _integer(self.batch_size, "batch_size", 1)
        _integer(self.grad_accum, "grad_accum", 1)
        _integer(self.warmup_steps, "warmup_steps", 0)
        _integer(self.save_every, "save_every", 0)
        _integer(self.seed, "seed", None)
        if self.max_steps is not None:
            _integer(self.max_steps, "max_steps", 1)
        _number(self.epochs, "epochs", 0.0, strict=True)
        if self.lr is not None:
            _number(self.lr, "lr", 0.0, strict=True)
        _number(self.weight_decay, "weight_decay", 0.0)
        _number(self.max_grad_norm, "max_grad_norm", 0.0)
        if self.method == "lora":
            if self.train_embeddings:
                raise LayerscopeError("train_embeddings applies to method 'full' only; LoRA trains adapters on blocks")
            _integer(self.lora_r, "lora_r", 1)
            _number(self.lora_alpha, "lora_alpha", 0.0, strict=True)
            _number(self.lora_dropout, "lora_dropout", 0.0)
            if self.lora_dropout >= 1:
                raise LayerscopeError(f"lora_dropout {self.lora_dropout!r} is out of range: allowed 0 <= lora_dropout < 1")
            roles = (self.lora_roles,) if isinstance(self.lora_roles, str) else tuple(self.lora_roles)
            if not roles:
                raise LayerscopeError(f"lora_roles is empty; allowed: {allowed(ROLES + FUSED_ROLES)}")
            for role in roles:
                if role not in ROLES + FUSED_ROLES:
                    raise LayerscopeError(f"unknown LoRA role {role!r}; allowed: {allowed(ROLES + FUSED_ROLES)}")

    def select_layers(self, num_layers: int) -> tuple[list[int], list[int]]:
        """``(trained, frozen)`` block indices, validated against the model's ``num_layers``."""
        chosen = list(range(num_layers)) if self.layers is None else list(normalise_layers(self.layers, num_layers))
        frozen = [] if not self.freeze_layers else list(normalise_layers(self.freeze_layers, num_layers, "frozen layer"))
        if self.layers is not None and frozen:
            both = sorted(set(chosen) & set(frozen))
            if both:
                raise LayerscopeError(
                    f"layers {chosen} and freeze_layers {frozen} overlap in {both}: a block cannot be both "
                    "trained and frozen"
                )
        trained = [i for i in chosen if i not in set(frozen)]
        if not trained and not (self.method == "full" and self.train_embeddings):
            raise LayerscopeError(
                f"nothing to train: layers={self.layers!r} and freeze_layers={self.freeze_layers!r} leave no block "
                f"of the model's {num_layers} (allowed 0..{num_layers - 1})"
            )
        return trained, frozen

    def resolved(self, num_layers: int) -> dict:
        """The configuration as plain data, with defaults filled in and layer lists normalised:
        what a checkpoint records and what a resumed run must match."""
        self.validate()
        _, frozen = self.select_layers(num_layers)
        data = dataclasses.asdict(self)
        data["lr"] = self.learning_rate
        data["layers"] = None if self.layers is None else list(normalise_layers(self.layers, num_layers))
        data["freeze_layers"] = frozen or None
        data["lora_roles"] = [self.lora_roles] if isinstance(self.lora_roles, str) else list(self.lora_roles)
        data["epochs"] = float(self.epochs)
        return data


def _integer(value: object, name: str, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayerscopeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise LayerscopeError(f"{name} {value!r} is out of range: allowed {name} >= {minimum}")


def _number(value: object, name: str, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LayerscopeError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise LayerscopeError(f"{name} {value!r} is out of range: allowed {name} {'>' if strict else '>='} {minimum:g}")
