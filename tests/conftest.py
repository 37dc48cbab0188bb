"""Shared fixtures: tiny random models of every family, the shared data folder, the embedded model."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from layerscope.models.tiny import TINY_MODELS, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LAYERSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY_NAMES = sorted(TINY_MODELS)


@lru_cache(maxsize=None)
def _tiny(name: str):
    return build_tiny_model(name, seed=0)


def tiny(name: str):
    """A cached tiny model and tokenizer (tests must leave it unchanged: interventions restore it)."""
    return _tiny(name)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set LAYERSCOPE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model():
    """The real SmolLM2-135M-Instruct, when `make setup` has fetched it; skipped otherwise."""
    from layerscope.models import load_model
    from layerscope.models.embedded import is_fetched

    if not is_fetched("smollm2-135m"):
        pytest.skip("embedded model not fetched: run `make setup` (or `layerscope fetch smollm2-135m`)")
    return load_model("smollm2-135m")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``layerscope ARGS`` in-process through its real entry point: (exit code, stdout, stderr)."""
    from layerscope.cli.main import main

    argv = sys.argv
    sys.argv = ["layerscope", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
