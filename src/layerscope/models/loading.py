"""`load_model`: one entry point for registry names, local folders, GGUF files and hub ids."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import LayerscopeError
from .embedded import EMBEDDED, fetch_embedded
from .registry import registry_names
from .tiny import TINY_MODELS, build_tiny_model
from .transformers_io import read_pretrained

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LayerscopeError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise LayerscopeError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps, auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerscopeError(f"device {device!r} requested but CUDA is not available on this machine; use cpu")
    return dev


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is a registry name (``smollm2-135m``, ``tiny-llama``, ...; see
    ``layerscope models``), a local Hugging Face folder, a ``.gguf`` file, or a hub id
    (``HF_TOKEN`` is used when set). ``seed`` only matters for the tiny random models.
    """
    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = Path(name).expanduser()
    if name in TINY_MODELS:
        model, tokenizer = build_tiny_model(name, seed=seed, dtype=torch_dtype or torch.float32)
    elif name in EMBEDDED:
        model, tokenizer = read_pretrained(str(fetch_embedded(name)), dtype=torch_dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise LayerscopeError(f"GGUF file {name!r} does not exist")
        model, tokenizer = read_pretrained(str(path.parent), dtype=torch_dtype, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise LayerscopeError(f"folder {name!r} has no config.json: not a Hugging Face model folder")
        model, tokenizer = read_pretrained(str(path), dtype=torch_dtype)
    elif path.exists():
        raise LayerscopeError(f"{name!r} is a file but not a .gguf model; give a folder, a .gguf file or a registry name")
    else:
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise LayerscopeError(
                f"unknown model {name!r}: not a registry name ({', '.join(registry_names())}), "
                "not an existing folder or .gguf file, and not a hub id of the form org/name"
            )
        try:
            model, tokenizer = read_pretrained(name, dtype=torch_dtype, token=os.environ.get("HF_TOKEN"))
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LayerscopeError(f"could not load model {name!r} from the Hugging Face hub: {first}") from exc
    model.to(dev)
    model.eval()
    model._layerscope_source = name
    return model, _prepare_tokenizer(tokenizer)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: equal weights, equal hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        data = tensor.detach().contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]
