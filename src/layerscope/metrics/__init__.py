"""Pure functions on tensors: CKA, CCA family, PCA and spectra, rank correlation (no model in here).

Inputs are ``(n, d)`` numpy arrays or torch tensors with the same ``n`` samples as rows; results are
float64 numpy arrays or Python floats.
"""

from layerscope.metrics.canonical_correlation import (
    PWCCAResult,
    SampleSizeWarning,
    SubspaceCCA,
    cca,
    pc_subspace_cca,
    pwcca,
    pwcca_details,
    svcca,
)
from layerscope.metrics.kernel_alignment import MinibatchCKA, cka, cka_matrix, hsic, linear_cka, rbf_cka, representation_shift
from layerscope.metrics.correlation import rank_correlation
from layerscope.metrics.pc_scores import PCScoreGram
from layerscope.metrics.vendi import VENDI_KERNELS, rbf_bandwidth, vendi_kernel, vendi_score, vendi_score_from_kernel
from layerscope.metrics.pca import PCAResult, StreamingCovariance, effective_rank, participation_ratio, pca

__all__ = [
    "MinibatchCKA",
    "PCAResult",
    "PCScoreGram",
    "PWCCAResult",
    "SampleSizeWarning",
    "StreamingCovariance",
    "SubspaceCCA",
    "cca",
    "cka",
    "cka_matrix",
    "hsic",
    "effective_rank",
    "linear_cka",
    "participation_ratio",
    "pc_subspace_cca",
    "pca",
    "pwcca",
    "pwcca_details",
    "rank_correlation",
    "rbf_cka",
    "representation_shift",
    "svcca",
    "VENDI_KERNELS",
    "rbf_bandwidth",
    "vendi_kernel",
    "vendi_score",
    "vendi_score_from_kernel",
]
