"""Small real models and synthetic data for tests, examples and benchmarks.

The models are the same classes the pipeline loads (segment-anything's ``Sam``, transformers'
DINOv2), built from tiny configurations with random weights: they run the real code path
without any download.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch

from cryosam.errors import InputError
from cryosam.features import FeatureVolume


def tiny_sam(img_size: int = 1024, embed_dim: int = 32, prompt_dim: int = 32, depth: int = 1,
             seed: int = 0) -> Any:
    """A randomly initialised, very small SAM built from segment-anything's own classes.

    For tests and benchmarks: it runs exactly the code path of the real models (ViT image
    encoder, prompt encoder, two-way transformer mask decoder) at a fraction of the cost.
    ``img_size`` must be a multiple of 16 (the embedding grid is img_size / 16).
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=(),
            window_size=min(14, grid), out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=64,
                                          num_heads=2),
            transformer_dim=prompt_dim, iou_head_depth=2, iou_head_hidden_dim=32),
    )
    return sam.eval()


def tiny_dinov2(registers: bool = True, *, hidden: int = 16, layers: int = 1, patch: int = 14,
                seed: int = 0) -> torch.nn.Module:
    """A small DINOv2 (with or without 4 registers) with random weights, from transformers."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  mlp_ratio=2, image_size=4 * patch, patch_size=patch)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                  **kwargs)).eval()
    return Dinov2Model(Dinov2Config(**kwargs)).eval()




def recall_within(reference: np.ndarray, found: np.ndarray, radius: float) -> float:
    """Fraction of ``reference`` points with a ``found`` point within ``radius`` (1.0 if none)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 3)
    found = np.asarray(found, dtype=np.float64).reshape(-1, 3)
    if len(reference) == 0:
        return 1.0
    if len(found) == 0:
        return 0.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(found).query(reference, k=1)
    return float(np.mean(dist <= radius))


def sphere_coords(centre: np.ndarray, radius: float, shape: tuple[int, int, int]) -> np.ndarray:
    """(n, 3) integer voxel coordinates of a ball, clipped to the volume."""
    c = np.asarray(centre, dtype=np.float64)
    lo = np.maximum(np.floor(c - radius), 0).astype(int)
    hi = np.minimum(np.ceil(c + radius), np.asarray(shape) - 1).astype(int)
    axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return grid[((grid - c) ** 2).sum(1) <= radius**2]


def synthetic_feature_volume(
    shape: tuple[int, int, int],
    channels: int,
    *,
    patches: int = 37,
    n_targets: int = 40,
    n_distractors: int = 40,
    radius: float = 10.0,
    seed: int = 0,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """A FeatureVolume with planted particles; returns (fv, target centres, distractor centres).

    Each stack cell holds unit-variance noise plus a shared background vector; a particle adds
    its kind's vector (amplitude varying per particle, plus a small per-particle deviation)
    weighted by the share of a Gaussian (sigma = radius / 2) that falls in each patch, as a
    patch token sees the part of a particle inside its footprint: the similarity map then has
    one blob per particle about a patch wide, as with real patch features.
    """
    rng = np.random.default_rng(seed)
    D, H, W = shape
    centres = _separated_points(rng, shape, n_targets + n_distractors, 3 * radius, radius)
    kinds = [_unit(rng, 3 * channels) * 3 * math.sqrt(channels) for _ in range(2)]
    background = _unit(rng, 3 * channels) * 0.3 * math.sqrt(channels)
    long_side = max(shape)
    sigma = radius / 2

    def cells(extent: int) -> int:
        return max(1, math.ceil(extent * patches / long_side))

    layout = {"z": (0, 1, 2), "y": (1, 0, 2), "x": (2, 0, 1)}  # slice axis, map rows, map cols
    stacks = {}
    for a, (name, (s_ax, r_ax, c_ax)) in enumerate(layout.items()):
        n_s, n_r, n_c = shape[s_ax], cells(shape[r_ax]), cells(shape[c_ax])
        stack = rng.standard_normal((n_s, n_r, n_c, channels), dtype=np.float32)
        stack += background[a * channels : (a + 1) * channels]
        rows = (np.arange(n_r) + 0.5) * shape[r_ax] / n_r - 0.5
        cols = (np.arange(n_c) + 0.5) * shape[c_ax] / n_c - 0.5
        half_r, half_c = shape[r_ax] / n_r / 2, shape[c_ax] / n_c / 2
        for p, centre in enumerate(centres):
            kind = kinds[0] if p < n_targets else kinds[1]
            vec = kind[a * channels : (a + 1) * channels] * rng.uniform(0.8, 1.2)
            vec = vec + rng.standard_normal(channels).astype(np.float32) * 0.5  # ~30 % of it
            lo = max(0, int(centre[s_ax] - 2 * radius))
            hi = min(n_s, int(centre[s_ax] + 2 * radius) + 1)
            ws = np.exp(-((np.arange(lo, hi) - centre[s_ax]) ** 2) / (2 * sigma**2))
            wr = _box_gauss(rows, half_r, centre[r_ax], sigma)
            wc = _box_gauss(cols, half_c, centre[c_ax], sigma)
            weight = (ws[:, None, None] * wr[None, :, None] * wc[None, None, :]).astype(np.float32)
            stack[lo:hi] += weight[..., None] * vec
        stacks[name] = torch.from_numpy(stack).to(torch.float16)
    fv = FeatureVolume(stacks, (D, H, W))
    return fv, centres[:n_targets], centres[n_targets:]


def _box_gauss(centres: np.ndarray, half: float, mu: float, sigma: float) -> np.ndarray:
    """Share of a 1-D Gaussian (mu, sigma) inside each patch [c - half, c + half], max 1."""
    from scipy.special import ndtr

    full = ndtr(half / sigma) - ndtr(-half / sigma)  # a particle centred in the patch: 1
    return (ndtr((centres + half - mu) / sigma) - ndtr((centres - half - mu) / sigma)) / full


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n).astype(np.float32)
    return v / np.linalg.norm(v)


def _separated_points(
    rng: np.random.Generator, shape: tuple[int, int, int], n: int, min_dist: float, margin: float
) -> np.ndarray:
    """``n`` random points at least ``min_dist`` apart, ``margin`` inside the volume."""
    lo = np.full(3, margin)
    hi = np.maximum(np.asarray(shape, dtype=np.float64) - 1 - margin, lo)
    points: list[np.ndarray] = []
    for _ in range(200 * max(n, 1)):
        if len(points) == n:
            break
        p = rng.uniform(lo, hi)
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
    if len(points) < n:
        raise InputError(f"cannot place {n} particles {min_dist:g} voxels apart in {shape}; "
                         "use fewer --targets/--distractors or a bigger --shape")
    return np.asarray(points)
