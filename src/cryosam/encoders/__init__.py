"""Slice feature encoders behind one small protocol: DINOv2 and a weight-free filter bank."""

from cryosam.encoders.base import (
    ENCODER_NAMES,
    SliceEncoder,
    aspect_change,
    build_encoder,
    voxels_per_patch,
)

__all__ = ["ENCODER_NAMES", "SliceEncoder", "aspect_change", "build_encoder", "voxels_per_patch"]
