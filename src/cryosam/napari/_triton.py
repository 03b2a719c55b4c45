"""Keep triton out of a napari process whose OpenGL is Mesa's.

Mesa's OpenGL drivers (llvmpipe, the software renderer of remote desktops and virtual
displays, and the LLVM-based hardware drivers) load one LLVM into the process; triton, which
``torch._dynamo`` imports as soon as transformers or torchvision touch it, loads its own. Once
napari has made its OpenGL canvas, importing triton then crashes the whole process
(segmentation fault). cryosam never needs triton (no ``torch.compile``), so in such a process
it is marked as absent before any model is built: torch then treats it as not installed.
``CRYOSAM_ALLOW_TRITON=1`` turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def mesa_opengl() -> bool:
    """True when napari's OpenGL comes from Mesa (from napari's own system report)."""
    try:
        from napari.utils.info import sys_info

        return "Mesa" in sys_info()
    except Exception:  # noqa: BLE001 - no report, no guess
        return False


def guard_triton(mesa: bool | None = None) -> bool:
    """Mark triton absent (``sys.modules["triton"] = None``) when the OpenGL is Mesa's and
    triton is installed but not yet imported. True when it was hidden. ``mesa``: the answer
    of :func:`mesa_opengl`, when the caller knows it."""
    if os.environ.get("CRYOSAM_ALLOW_TRITON", "") not in ("", "0"):
        return False
    if "triton" in sys.modules:  # already loaded (or already hidden): nothing to prevent
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    if not (mesa_opengl() if mesa is None else mesa):
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True
