"""DINOv2 patch features of tomogram slices, through ``transformers``.

A slice (already normalised to [0, 1] per tomogram) becomes a 3-channel image normalised with
the model's own mean/std, resized so that its long side spans ``patches_long_side`` patches
(37 x 14 = 518 px, as in the paper) and its short side a whole number of patches (a slight
aspect change, at most half a patch, see :func:`cryosam.encoders.base.aspect_change`). The
transformer's CLS and register tokens are dropped; the patch tokens form the map.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cryosam.device import autocast
from cryosam.encoders.base import as_batch, grid_for_long_side
from cryosam.errors import CryosamError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from cryosam.backends import Dinov2Options
    from cryosam.config import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def read_image_stats(
    model_dir: str | os.PathLike[str],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std from ``preprocessor_config.json`` beside the weights (ImageNet if absent)."""
    path = Path(model_dir) / "preprocessor_config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return tuple(data["image_mean"]), tuple(data["image_std"])
        except (KeyError, ValueError, TypeError):
            pass
    return IMAGENET_MEAN, IMAGENET_STD


class Dinov2Encoder:
    """A ``Dinov2Model`` / ``Dinov2WithRegistersModel`` behind the :class:`SliceEncoder` contract.

    ``model`` is a built transformers model (real weights, or random for tests/benchmarks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        patches_long_side: int = 37,
        device: torch.device | str | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        name: str | None = None,
        weights_hash: str | None = None,
    ) -> None:
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise CryosamError(
                f"DINOv2 encoder: model type {getattr(config, 'model_type', '?')!r} is not one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}; use a facebook/dinov2* model"
            )
        if patches_long_side < 1:
            raise CryosamError(f"--patches {patches_long_side}: must be at least 1")
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.channels = int(config.hidden_size)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.patches_long_side = int(patches_long_side)
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._mean = torch.tensor(image_mean, dtype=torch.float32,
                                  device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32,
                                 device=self.device).view(1, 3, 1, 1)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.name = name or str(getattr(config, "_name_or_path", "") or config.model_type)
        self._weights_hash = weights_hash

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_dir: str,
        device: torch.device | str = "cpu",
        *,
        patches_long_side: int = 37,
        path: str | os.PathLike[str] | None = None,
    ) -> Dinov2Encoder:
        """Load a hub id or local directory (resolved by :func:`cryosam.weights.locate_dinov2`,
        which raises :class:`~cryosam.errors.MissingWeightsError` saying how to get it)."""
        from transformers import AutoModel

        from cryosam.weights import locate_dinov2

        local = Path(locate_dinov2(model_id_or_dir, path))
        try:
            model = _with_sdpa(AutoModel.from_pretrained, str(local))
        except Exception as exc:  # a corrupt or foreign weights file: one line, not a trace
            raise CryosamError(
                f"DINOv2 weights in {local} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                "re-download them with `cryosam weights`"
            ) from exc
        mean, std = read_image_stats(local)
        weights_hash = state_dict_hash(model)
        return cls(model, patches_long_side=patches_long_side, device=device, image_mean=mean,
                   image_std=std, name=str(model_id_or_dir), weights_hash=weights_hash)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, device: torch.device) -> Dinov2Encoder:
        """The registry's builder: the model named by ``cfg.options`` on ``device``."""
        options: Dinov2Options = cfg.options
        return cls.from_pretrained(options.model, device,
                                   patches_long_side=options.patches_long_side)

    @staticmethod
    def geometry_from_options(
        options: Dinov2Options,
    ) -> tuple[Callable[[int, int], tuple[int, int]], int]:
        """(grid_shape, channels) without loading weights: for memory estimates."""
        n = options.patches_long_side
        return (lambda h, w: grid_for_long_side(h, w, n)), channels_for_model(options.model)

    @property
    def weights_hash(self) -> str:
        """SHA-256 of the weights (computed once, on first use)."""
        if self._weights_hash is None:
            self._weights_hash = state_dict_hash(self.model)
        return self._weights_hash

    @property
    def id(self) -> str:  # noqa: A003 - the protocol's name
        """Model, weights hash and every option that changes the maps."""
        return (f"dinov2:{self.name}:w{self.weights_hash[:16]}:p{self.patches_long_side}"
                f":m{','.join(f'{v:g}' for v in self.image_mean)}"
                f":s{','.join(f'{v:g}' for v in self.image_std)}")

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Long side = ``patches_long_side`` patches; short side rounded to whole patches."""
        return grid_for_long_side(height, width, self.patches_long_side)

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, h*p, w*p) model input (resized, mean/std normalised)."""
        gh, gw = self.grid_shape(batch.shape[1], batch.shape[2])
        size = (gh * self.patch_size, gw * self.patch_size)
        image = batch[:, None]
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                                  antialias=True)
        return (image.expand(-1, 3, -1, -1) - self._mean) / self._std

    def encode(self, slices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) normalised slices -> (B, h, w, C) fp16 patch-token maps."""
        batch = as_batch(slices, self.device)
        gh, gw = self.grid_shape(batch.shape[1], batch.shape[2])
        with torch.inference_mode():
            pixels = self.preprocess(batch)
            with autocast(self.device):
                hidden = self.model(pixel_values=pixels).last_hidden_state
            tokens = hidden[:, 1 + self.num_register_tokens:]
            if tokens.shape[1] != gh * gw:
                raise RuntimeError(f"DINOv2 returned {tokens.shape[1]} patch tokens, "
                                   f"expected {gh}x{gw}")
            return tokens.reshape(batch.shape[0], gh, gw, self.channels).to(torch.float16)


# The published DINOv2 ViT/14 architectures: (hidden size, layers, heads, SwiGLU MLP).
ARCHITECTURES: dict[str, tuple[int, int, int, bool]] = {
    "vits14": (384, 12, 6, False),
    "vitb14": (768, 12, 12, False),
    "vitl14": (1024, 24, 16, False),
    "vitg14": (1536, 40, 24, True),
}
_SIZE_WORDS = {"small": "vits14", "base": "vitb14", "large": "vitl14", "giant": "vitg14"}


def architecture_config(arch: str, *, registers: bool = True) -> PretrainedConfig:
    """The transformers config of a published ViT/14 (518 px) without downloading anything."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    if arch not in ARCHITECTURES:
        raise CryosamError(f"--arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    hidden, layers, heads, swiglu = ARCHITECTURES[arch]
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  mlp_ratio=4, image_size=518, patch_size=14, use_swiglu_ffn=swiglu,
                  layerscale_value=1e-5)
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
    return Dinov2Config(**kwargs)


def random_init_model(arch: str, *, registers: bool = True, seed: int = 0) -> torch.nn.Module:
    """A published architecture with random weights: same cost as the real one (benchmarks)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    return _with_sdpa(AutoModel.from_config, architecture_config(arch, registers=registers)).eval()


def _with_sdpa(build: Callable, *args):  # -> a transformers model
    """``build(*args)`` with PyTorch's fused attention (``attn_implementation="sdpa"``: faster
    and lighter on the GPU, the same maths); the default attention where a transformers
    version cannot do that."""
    try:
        return build(*args, attn_implementation="sdpa")
    except (ValueError, ImportError, TypeError):
        return build(*args)


def channels_for_model(model: str) -> int:
    """Feature channels of a DINOv2 hub id or local directory, without loading the weights."""
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])
        except (KeyError, ValueError, TypeError):
            pass
    lowered = str(model).lower()
    for word, arch in _SIZE_WORDS.items():
        if word in lowered:
            return ARCHITECTURES[arch][0]
    return ARCHITECTURES["vitl14"][0]
