"""Sweeps: points run with progress, each stored at once in the results store, resumed where they stopped."""

from layerscope.runner.run_folder import RunFolder, environment, package_versions
from layerscope.runner.store import ResultsStore, canonical_json, fingerprint, point_key
from layerscope.runner.sweep import run_sweep

__all__ = [
    "ResultsStore",
    "RunFolder",
    "canonical_json",
    "environment",
    "fingerprint",
    "package_versions",
    "point_key",
    "run_sweep",
]
