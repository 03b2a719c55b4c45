"""2-D promptable slice segmenters behind one protocol: SAM and a weight-free baseline.

:func:`build_segmenter` builds the one a configuration names, through :mod:`cryosam.backends`.
"""

from __future__ import annotations

import torch

from cryosam import backends
from cryosam.backends import Target
from cryosam.config import SegmenterConfig
from cryosam.device import resolve_device
from cryosam.segmenters.base import PromptBatch, Segmenter, SegmentResult
from cryosam.utils import AXES

__all__ = ["AXES", "PromptBatch", "SegmentResult", "Segmenter", "build_segmenter"]


def build_segmenter(cfg: SegmenterConfig, device: torch.device | str = "auto",
                    target: Target = "particle") -> Segmenter:
    """The segmenter ``cfg.name`` names (SAM loads its checkpoint).

    ``target`` ("particle" | "membrane") lets a segmenter tune itself to what is clicked.
    """
    cls = backends.get(cfg.name, "segmenter").load()
    return cls.from_config(cfg, resolve_device(device), target)
