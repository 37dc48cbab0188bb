"""Reversible changes to a model, all used through ``intervene(model, ...)``."""

from .base import Intervention, first_changed_block, intervene
from .bitflip import BitFlip, choose_sites, flip_bits
from .blocks import PassthroughBlock, SkipBlock, StartFromCache, block_returns_tuple
from .low_rank import LASER_LNAMES, LowRank, SVDCache, laser_kept_rank, lname_roles
from .mean_ablation import MeanAblateBlock, MeanAblateRole
from .noise import WeightNoise
from .pc_removal import PCRemoval
from .pruning import Prune
from .substitution import SubstituteBlocks, check_substitutable
from .vendi_projection import SelectionCache, VendiProjection
from .vendi_selection import project_onto_rows, vendi_select
from .targets import matrix_roles, weight_targets
from .weights import RoleEdit, ZeroRole

__all__ = [
    "Intervention", "intervene", "first_changed_block", "SkipBlock", "StartFromCache",
    "PassthroughBlock", "block_returns_tuple", "RoleEdit", "ZeroRole", "SubstituteBlocks", "check_substitutable",
    "PCRemoval", "Prune", "WeightNoise", "BitFlip", "flip_bits", "choose_sites", "MeanAblateRole", "MeanAblateBlock", "LowRank", "SVDCache", "laser_kept_rank", "lname_roles", "LASER_LNAMES",
    "matrix_roles", "weight_targets", "VendiProjection", "SelectionCache", "vendi_select", "project_onto_rows",
]
