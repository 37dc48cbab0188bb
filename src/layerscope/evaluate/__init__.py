"""Evaluation on one batched forward engine that can start from a cached residual stream."""

from .engine import DEFAULT_MAX_TOKENS, Evaluator, ResidualCache, SequenceScores
from .generation import generate
from .tasks import MCResult, mc_from_scores

__all__ = ["Evaluator", "ResidualCache", "SequenceScores", "DEFAULT_MAX_TOKENS", "generate", "MCResult", "mc_from_scores"]
