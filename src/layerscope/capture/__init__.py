"""Hooks that record what flows through a model (the residual stream per block)."""

from .residual import POOLINGS, capture_block_outputs, pool_positions

__all__ = ["POOLINGS", "capture_block_outputs", "pool_positions"]
