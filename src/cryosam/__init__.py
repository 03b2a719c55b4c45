"""cryosam: training-free particle picking and segmentation of cryo-ET tomograms.

CryoSAM (Zhao et al., MICCAI 2024): DINOv2 slice features along three axes, hierarchical
cosine matching, and SAM cross-plane self-prompting. The public surface:

- :class:`CryoSAM` — holds loaded models; ``CryoSAM(config).segment(tomo, points)``;
- :func:`segment` — the one-call form;
- :class:`CryosamConfig` and its blocks — every parameter, with the paper's defaults;
- :class:`SavedQuery` — ``CryoSAM.make_query`` saves one, ``segment(..., query=)`` uses it;
- :func:`read_tomogram`, :func:`read_points`, :func:`write_outputs` — file I/O.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0.dev0"

__all__ = [
    "CryoSAM",
    "CryosamConfig",
    "EncoderConfig",
    "MatchingConfig",
    "PropagationConfig",
    "SavedQuery",
    "ScoreConfig",
    "SegmentationResult",
    "SegmenterConfig",
    "read_points",
    "read_tomogram",
    "segment",
    "write_outputs",
]

_LAZY = {
    "CryoSAM": "cryosam.pipeline",
    "SegmentationResult": "cryosam.result",
    "segment": "cryosam.pipeline",
    "CryosamConfig": "cryosam.config",
    "EncoderConfig": "cryosam.config",
    "MatchingConfig": "cryosam.config",
    "PropagationConfig": "cryosam.config",
    "SegmenterConfig": "cryosam.config",
    "ScoreConfig": "cryosam.config",
    "SavedQuery": "cryosam.query",
    "read_tomogram": "cryosam.io",
    "read_points": "cryosam.io",
    "write_outputs": "cryosam.export",
}

def __getattr__(name: str) -> Any:
    """Import the heavy modules (torch, transformers) only when they are used.

    Names are resolved by module path at run time (no static import), so importing any
    cryosam module never imports the pipeline through this package.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cryosam' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
