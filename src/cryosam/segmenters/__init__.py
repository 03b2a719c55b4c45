"""2-D promptable slice segmenters behind one protocol: SAM and a weight-free baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryosam.config import SegmenterConfig
from cryosam.errors import CryosamError
from cryosam.segmenters.base import AXES, PromptBatch, Segmenter, SegmentResult

if TYPE_CHECKING:
    import torch

SEGMENTER_NAMES = ("sam", "threshold")

__all__ = ["AXES", "SEGMENTER_NAMES", "PromptBatch", "SegmentResult", "Segmenter",
           "build_segmenter"]


def build_segmenter(cfg: SegmenterConfig, device: torch.device | str = "auto",
                    target: str = "particle") -> Segmenter:
    """The segmenter ``cfg.name`` names: ``sam`` (loads ``cfg.model``) or ``threshold``.

    ``target`` ("particle" | "membrane") lets a segmenter tune itself to what is clicked.
    """
    if cfg.name == "sam":
        from cryosam.segmenters.sam import SamSegmenter

        return SamSegmenter.from_checkpoint(cfg.model, device, cfg)
    if cfg.name == "threshold":
        from cryosam.segmenters.threshold import ThresholdSegmenter

        return ThresholdSegmenter(cfg, target=target)
    raise CryosamError(f"--segmenter {cfg.name!r} is not one of {', '.join(SEGMENTER_NAMES)}")
