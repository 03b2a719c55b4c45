"""Every knob of the pipeline, as frozen dataclasses with the paper's defaults.

Each pipeline stage reads its own block; the run record stores all of them. Stage owners may
add fields to their own block (with a default and a one-line comment).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EncoderConfig:
    """Slice feature encoder (DINOv2 or the weight-free filter bank)."""

    name: str = "dinov2"  # "dinov2" | "filterbank"
    model: str = "facebook/dinov2-with-registers-large"  # hub id or local directory
    patches_long_side: int = 37  # long side of a slice spans this many patches (37*14 = 518 px)
    batch_size: int = 16  # slices per forward pass
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # robust intensity normalisation
    slice_stride: int = 1  # encode every k-th slice along each axis, interpolate between


@dataclass(frozen=True)
class SegmenterConfig:
    """2-D promptable segmenter (SAM or the weight-free one)."""

    name: str = "sam"  # "sam" | "threshold"
    model: str = "vit_h"  # "vit_h" | "vit_l" | "vit_b" or a path to a .pth checkpoint
    embedding_cache_mb: int = 4096  # budget for cached per-slice image embeddings


@dataclass(frozen=True)
class PropagationConfig:
    """Cross-plane self-prompting along +-z, +-y, +-x."""

    iou_threshold: float = 0.5  # stop a direction when IoU(previous, new) < this (paper: 0.5)
    max_area: int | None = None  # area cap per slice in voxels; None = from the prompt's masks
    area_factor: float = 2.0  # default cap = area_factor * largest area of the first masks
    directions: tuple[str, ...] = ("+z", "-z", "+y", "-y", "+x", "-x")
    target: str = "particle"  # "particle" | "membrane" (no area cap, sheet-like propagation)


@dataclass(frozen=True)
class MatchingConfig:
    """Hierarchical coarse-to-fine cosine matching."""

    ratios: tuple[int, ...] = (16, 8, 4)  # coarse-to-fine grid ratios (paper)
    sim_threshold: float = 0.5  # keep cells with cosine similarity >= this (paper: 0.5)
    top_k: int = 512  # keep at most this many proposals (paper: K = 512)
    nms_radius: float | None = None  # voxels; None = from the prompted particles' size
    chunk_size: int = 65536  # feature vectors scored per chunk
    naive: bool = False  # score every finest-grid cell in one pass (baseline)


@dataclass(frozen=True)
class CryosamConfig:
    """The whole pipeline's configuration."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the run record."""
        return dataclasses.asdict(self)
