"""Hooks that record what flows through a model (the residual stream per block)."""

from .activation_store import ActivationStore, open_store, write_activations
from .block_similarity import BlockStatistics
from .linear_stats import RoleStatistics
from .residual import POOLINGS, block_input, block_output, capture_block_outputs, iter_block_outputs, pool_positions

__all__ = ["ActivationStore", "BlockStatistics", "RoleStatistics", "open_store", "write_activations", "POOLINGS", "block_input", "block_output", "capture_block_outputs", "iter_block_outputs", "pool_positions"]
