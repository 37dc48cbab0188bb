"""Hooks that record what flows through a model (the residual stream per block)."""

from .residual import POOLINGS, block_input, block_output, capture_block_outputs, iter_block_outputs, pool_positions

__all__ = ["POOLINGS", "block_input", "block_output", "capture_block_outputs", "iter_block_outputs", "pool_positions"]
