"""Slice features along z, y and x: the compact :class:`FeatureVolume` and its extraction."""

from cryosam.features.extract import (
    PCA_MAX_TOKENS,
    cache_key,
    cache_path,
    estimate_nbytes,
    extract_features,
    fit_projection,
    stack_shapes,
    volume_hash,
)
from cryosam.features.sparse import SparseStack
from cryosam.features.volume import (
    FORMAT,
    FORMAT_VERSION,
    PLANE_DIMS,
    SLICE_DIM,
    FeatureVolume,
    slice_positions,
    turned,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "PCA_MAX_TOKENS", "PLANE_DIMS", "SLICE_DIM", "FeatureVolume",
    "SparseStack",
    "cache_key", "cache_path", "estimate_nbytes", "extract_features", "fit_projection",
    "slice_positions", "stack_shapes", "turned", "volume_hash",
]
