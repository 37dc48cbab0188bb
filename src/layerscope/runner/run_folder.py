"""One folder per run: ``run.json`` (configuration, seed, fingerprint, versions), results, figures, report."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.runner.store import _to_jsonable

#: Packages whose versions are recorded in run.json when installed.
RECORDED_PACKAGES = (
    "layerscope",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "gguf",
    "sentencepiece",
    "tokenizers",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "datasets",
    "ray",
    "typer",
    "rich",
)


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names``; packages that are not installed are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict[str, Any]:
    """Python, platform, host, and (when torch is already imported) its accelerator."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
    }
    torch = sys.modules.get("torch")  # not imported here just to describe it
    if torch is not None:
        try:
            env["torch_cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                env["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # pragma: no cover - descriptive only
            pass
    return env


def _now() -> datetime:
    return datetime.now(timezone.utc).astimezone()


class RunFolder:
    """The folder of one run.

    ``out=None`` makes ``runs/<analysis>-<YYYYmmdd-HHMMSS>`` under the current directory (with a
    ``-2``, ``-3``, ... suffix if that exists already). An explicit ``out`` may exist already (a
    resumed run): its results store is then reused.
    """

    def __init__(self, out: str | Path | None, analysis: str) -> None:
        if not analysis or any(c in analysis for c in "/\\"):
            raise LayerscopeError(f"analysis name {analysis!r} must be a non-empty name without slashes")
        self.analysis = analysis
        self.created = _now()
        if out is None:
            base = Path("runs") / f"{analysis}-{self.created.strftime('%Y%m%d-%H%M%S')}"
            out, n = base, 1
            while True:
                try:
                    out.mkdir(parents=True, exist_ok=False)
                    break
                except FileExistsError:
                    n += 1
                    out = base.with_name(f"{base.name}-{n}")
        else:
            out = Path(out)
            if out.exists() and not out.is_dir():
                raise LayerscopeError(f"output folder {str(out)!r} exists and is not a folder")
            out.mkdir(parents=True, exist_ok=True)
        self.out: Path = out

    @property
    def store_path(self) -> Path:
        """The run's default results store, ``<out>/results.sqlite``."""
        return self.out / "results.sqlite"

    def path(self, name: str | Path) -> Path:
        """``<out>/<name>``, with its parent folders created."""
        p = self.out / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_run_json(self, config: dict[str, Any], *, seed: int, fingerprint: dict[str, Any] | str) -> Path:
        """Write ``run.json``: the configuration, seed, fingerprint, timestamps and environment."""
        if not isinstance(config, dict):
            raise LayerscopeError(f"run configuration must be a dict, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LayerscopeError(f"seed must be an integer, got {seed!r}")
        env = environment()
        record = {
            "analysis": self.analysis,
            "config": config,
            "seed": seed,
            "fingerprint": fingerprint,
            "created": self.created.isoformat(timespec="seconds"),
            "written": _now().isoformat(timespec="seconds"),
            "versions": env.pop("packages"),
            "environment": env,
            "argv": list(sys.argv),
        }
        try:
            text = json.dumps(record, indent=2, sort_keys=False, default=_to_jsonable, ensure_ascii=False)
        except TypeError as exc:
            raise LayerscopeError(f"run configuration cannot be written as JSON: {exc}") from exc
        return _atomic_write_text(self.out / "run.json", text + "\n")

    def write_table(self, df: pd.DataFrame, name: str = "results") -> tuple[Path, Path]:
        """Write ``<name>.csv`` and ``<name>.parquet``; returns both paths.

        A named index (e.g. ``layer``) is kept as columns, an unnamed one is dropped; column names become strings.
        """
        if not isinstance(df, pd.DataFrame):
            raise LayerscopeError(f"write_table expects a pandas DataFrame, got {type(df).__name__}")
        table = df
        if any(n is not None for n in table.index.names):
            table = table.reset_index()
        table = table.rename(columns=str)
        csv_path, parquet_path = self.path(f"{name}.csv"), self.path(f"{name}.parquet")
        table.to_csv(csv_path, index=False)
        table.to_parquet(parquet_path, index=False)
        return csv_path, parquet_path

    def __repr__(self) -> str:
        return f"RunFolder({str(self.out)!r}, analysis={self.analysis!r})"


def _atomic_write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["RECORDED_PACKAGES", "RunFolder", "environment", "package_versions"]
