"""Which parameters a fine-tuning run trains: chosen blocks (full), or LoRA adapters on their roles.

Blocks, embeddings, norms and role matrices are reached only through the architecture adapter;
module names are found by identity in ``model.named_modules()``, never spelled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from layerscope.errors import LayerscopeError, allowed
from layerscope.models.architecture import Architecture

from .config import FinetuneConfig


@dataclass
class TrainSetup:
    """The parameters to optimise, by name in ``module`` (the model, or its peft wrapper)."""

    module: nn.Module
    params: dict[str, nn.Parameter]
    peft_model: nn.Module | None = None
    lora_targets: list[str] = field(default_factory=list)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())


def unique_parameters(model: nn.Module) -> int:
    """Number of parameter elements, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def setup_full(model: nn.Module, arch: Architecture, config: FinetuneConfig, trained: list[int]) -> TrainSetup:
    """Freeze everything, then let the chosen blocks (and, with ``train_embeddings``, the embeddings,
    the final norm and the head) learn. A head tied to the token embedding is one parameter: it is
    trained only with ``train_embeddings``, and then both uses see the same update."""
    model.requires_grad_(False)
    for layer in trained:
        arch.block(layer).requires_grad_(True)
    if config.train_embeddings:
        extras = [*arch.embeddings(), arch.embedding_norm(), *arch.unembed()]
        for module in extras:
            if module is not None:
                module.requires_grad_(True)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise LayerscopeError(f"nothing to train: blocks {trained} have no parameters")
    return TrainSetup(model, params)


def lora_targets(model: nn.Module, arch: Architecture, roles: tuple[str, ...] | list[str], layers: list[int]) -> list[str]:
    """Exact module names (in ``model.named_modules()``) of the role matrices of ``layers``.

    Roles the family lacks are skipped (``gate`` in GPT-2); a role that is a slice of a fused matrix
    (GPT-2 ``c_attn`` holds q, k and v) names the whole fused module, once."""
    names = {id(module): name for name, module in model.named_modules()}
    have = set(arch.roles())
    usable = [r for r in roles if r in have]
    if not usable:
        raise LayerscopeError(
            f"none of the LoRA roles {list(roles)} exist in this {arch.family} model: allowed {allowed(arch.roles())}"
        )
    out: list[str] = []
    for layer in layers:
        for role in usable:
            module = arch.role_module(role, layer)
            name = names.get(id(module))
            if name is None:
                raise LayerscopeError(f"role {role!r} of layer {layer} is not a submodule of the model")
            if name not in out:
                out.append(name)
    return out


def setup_lora(model: nn.Module, arch: Architecture, config: FinetuneConfig, trained: list[int]) -> TrainSetup:
    """Wrap ``model`` with peft LoRA adapters on the role modules of the trained blocks.

    peft changes ``model`` in place (its target modules become LoRA layers); ``merge_and_unload``
    turns it back into a plain model. GPT-2's ``Conv1D`` stores its weight transposed: the adapter
    is told so (``fan_in_fan_out``). Adapter weights are float32 even on a half-precision model."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, arch, config.lora_roles, trained)
    modules = dict(model.named_modules())
    kinds = {type(modules[t]) for t in targets}
    unsupported = [t for t in targets if not isinstance(modules[t], (nn.Linear, Conv1D))]
    if unsupported:
        raise LayerscopeError(
            f"LoRA supports Linear and Conv1D modules; {unsupported[0]} is a {type(modules[unsupported[0]]).__name__}"
        )
    conv = any(issubclass(k, Conv1D) for k in kinds)
    if conv and not all(issubclass(k, Conv1D) for k in kinds):
        raise LayerscopeError("LoRA targets mix Linear and Conv1D modules; choose lora_roles of one kind")
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers through peft
        peft_model = get_peft_model(model, lora_config)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    return TrainSetup(peft_model, params, peft_model=peft_model, lora_targets=targets)


def restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Put back the ``requires_grad`` flags recorded before training."""
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


@torch.no_grad()
def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters, to restore the model if training fails."""
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


@torch.no_grad()
def restore(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(saved[name].to(p.device))
