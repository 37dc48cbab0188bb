"""Loading models and describing their architecture (the only layer that knows module paths)."""

from .architecture import Architecture, architecture
from .loading import load_model, model_fingerprint, resolve_device, resolve_dtype
from .registry import registry_names

__all__ = ["Architecture", "architecture", "load_model", "model_fingerprint", "registry_names",
           "resolve_device", "resolve_dtype"]
