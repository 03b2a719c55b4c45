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
    reduce_to: int | None = None  # PCA: keep this many channels per axis (None = all)
    filterbank_patch: int = 2  # voxels per patch of the weight-free filter bank
    filterbank_sigmas: tuple[float, ...] = (1.0, 1.41, 2.0, 2.83, 4.0, 5.66, 8.0, 11.3)  # voxels


@dataclass(frozen=True)
class SegmenterConfig:
    """2-D promptable segmenter (SAM or the weight-free one)."""

    name: str = "sam"  # "sam" | "threshold"
    model: str = "vit_h"  # "vit_h" | "vit_l" | "vit_b" or a path to a .pth checkpoint
    embedding_cache_mb: int = 4096  # budget for cached per-slice image embeddings
    encoder_batch_size: int = 8  # slices per image-encoder forward pass
    decoder_batch_size: int = 64  # prompts per mask-decoder forward pass (all slices mixed)
    multimask: bool = True  # SAM: 3 candidate masks per prompt, keep the best acceptable one
    polarity: str = "dark"  # threshold: particles darker ("dark") or brighter than background
    smooth_sigma: float = 1.5  # threshold: Gaussian denoising of each slice, in pixels
    slab: int = 1  # threshold: average this many neighbouring slices each side before smoothing
    level: float = 0.5  # threshold: cut between local background (0) and particle core (1)
    membrane_level: float = 0.7  # threshold, --target membrane: cut higher on thin sheets
    min_contrast: float = 2.0  # threshold: no mask when core-background contrast < this * noise


@dataclass(frozen=True)
class PropagationConfig:
    """Cross-plane self-prompting along +-z, +-y, +-x."""

    iou_threshold: float = 0.5  # stop a direction when IoU(previous, new) < this (paper: 0.5)
    max_area: int | None = None  # area cap per slice in voxels; None = from the prompt's masks
    area_factor: float = 2.0  # default cap = area_factor * largest area of the first masks
    directions: tuple[str, ...] = ("+z", "-z", "+y", "-y", "+x", "-x")
    target: str = "particle"  # "particle" | "membrane" (no area cap, sheet-like propagation)
    max_steps: int | None = None  # at most this many slices per direction; None = until a stop
    membrane_tolerance: int = 2  # membrane: IoU of masks dilated by this many pixels (thin)
    batched: bool = True  # advance all particles together (False: one at a time, baseline)
    normalise: bool = True  # rescale the raw volume by robust percentiles to [0, 1] first
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # percentiles mapped to 0 and 1


@dataclass(frozen=True)
class MatchingConfig:
    """Hierarchical coarse-to-fine cosine matching."""

    ratios: tuple[int, ...] = (16, 8, 4)  # coarse-to-fine grid ratios (paper)
    sim_threshold: float = 0.5  # keep cells with cosine similarity >= this (paper: 0.5)
    top_k: int = 512  # keep at most this many proposals (paper: K = 512)
    nms_radius: float | None = None  # voxels; None = from the prompted particles' size
    chunk_size: int = 16384  # feature vectors scored per chunk (bounded memory)
    naive: bool = False  # score every finest-grid cell in one pass (baseline)
    dilation: int = 0  # also score this many rings of fine cells around survivors' children
    grow: bool = True  # last level: follow surviving regions past their parents to their rim
    coarse_margin: float = 0.1  # levels before the last keep cells >= sim_threshold - this
    coarse_pooling: bool = True  # score coarse levels on cell-averaged features (not a point)
    adapt_ratios: bool = True  # skip ratios coarser than the prompted particle's diameter
    backend: str = "auto"  # "auto" (= torch matmul) | "torch" | "faiss" (GPU index on CUDA)


@dataclass(frozen=True)
class CryosamConfig:
    """The whole pipeline's configuration."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0
    min_size_ratio: float = 0.33  # drop matched particles smaller than this x the clicked ones
    max_size_ratio: float = 3.0  # ... or larger than this x the clicked ones
    max_elongation_ratio: float = 1.5  # ... or more elongated than this x the clicked ones
    merge_iou: float = 0.5  # merge an instance into one that already holds this share of it

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the run record."""
        return dataclasses.asdict(self)
