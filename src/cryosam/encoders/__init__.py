"""Slice feature encoders behind one small protocol: DINOv2 and a weight-free filter bank.

:func:`build_encoder` builds the one a configuration names, through :mod:`cryosam.backends`.
"""

from __future__ import annotations

import torch

from cryosam import backends
from cryosam.config import EncoderConfig
from cryosam.device import resolve_device
from cryosam.encoders.base import (
    SliceEncoder,
    aspect_change,
    grid_for_long_side,
    voxels_per_patch,
)

__all__ = ["SliceEncoder", "aspect_change", "build_encoder", "grid_for_long_side",
           "voxels_per_patch"]


def build_encoder(cfg: EncoderConfig, device: torch.device | str = "cpu") -> SliceEncoder:
    """Build the encoder ``cfg.name`` on ``device`` (DINOv2 loads its weights)."""
    cls = backends.get(cfg.name, "encoder").load()
    return cls.from_config(cfg, resolve_device(device))
