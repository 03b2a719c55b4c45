"""SAM (segment-anything) as a batched promptable slice segmenter.

Differences from ``SamPredictor`` (same model, same preprocessing, but built for volumes):

- the image encoder runs on batches of slices; embeddings are cached per (axis, slice);
- the prompt encoder and mask decoder run on a whole batch of prompts in ONE forward pass, and
  the prompts of that pass may lie on different slices (even of different axes): every slice
  embedding is 256 x 64 x 64 whatever the slice shape, so each prompt simply carries its own;
- coordinates are mapped exactly for non-square slices: a slice of h x w pixels is resized to
  (nh, nw) = round(h * s), round(w * s) with s = 1024 / max(h, w) and padded at the bottom/right
  to 1024 x 1024; the 256 x 256 low-resolution logits cover that padded square, 4 input pixels
  per logit. Pixel centres are mapped (index + 0.5 is the continuous coordinate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cryosam.backends import SAM_KINDS, sam_kind_of
from cryosam.config import SegmenterConfig
from cryosam.device import autocast, compute_dtype, resolve_device
from cryosam.errors import CryosamError
from cryosam.segmenters.base import (
    PromptBatch,
    SegmentResult,
    SliceSegmenterBase,
    caps_of,
    empty_result,
)

MASK_PROMPT_LOGIT = 8.0  # logit magnitude given to a binary mask turned into a mask prompt


@dataclass(frozen=True)
class SamGeometry:
    """Exact maps between a slice (h x w pixels), SAM's padded input (S x S) and its
    low-resolution logits (L x L)."""

    h: int
    w: int
    img_size: int = 1024
    lowres: int = 256

    @property
    def input_hw(self) -> tuple[int, int]:
        """(nh, nw): the slice resized so its long side is ``img_size`` (as ResizeLongestSide)."""
        scale = self.img_size / max(self.h, self.w)
        return int(self.h * scale + 0.5), int(self.w * scale + 0.5)

    def points_to_input(self, rc: np.ndarray) -> np.ndarray:
        """Slice (row, col) pixel indices -> SAM point prompts (x, y) in input pixel indices.

        SAM's prompt encoder adds 0.5 (pixel centre), so the centre (c + 0.5) * nw / w in the
        continuous input frame is passed as that minus 0.5.
        """
        nh, nw = self.input_hw
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        x = (rc[:, 1] + 0.5) * nw / self.w - 0.5
        y = (rc[:, 0] + 0.5) * nh / self.h - 0.5
        return np.stack([x, y], axis=1)

    def slice_to_lowres(self, rc: np.ndarray) -> np.ndarray:
        """Slice (row, col) pixel indices -> continuous low-res logit coordinates (row, col)."""
        nh, nw = self.input_hw
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        k = self.lowres / self.img_size
        return np.stack([(rc[:, 0] + 0.5) * nh / self.h * k - 0.5,
                         (rc[:, 1] + 0.5) * nw / self.w * k - 0.5], axis=1)

    def upsample_grid(self, device: torch.device) -> torch.Tensor:
        """grid_sample grid (1, h, w, 2) reading low-res logits at every slice pixel centre."""
        nh, nw = self.input_hw
        ys = (torch.arange(self.h, device=device, dtype=torch.float32) + 0.5) * nh / self.h
        xs = (torch.arange(self.w, device=device, dtype=torch.float32) + 0.5) * nw / self.w
        gy = 2.0 * ys / self.img_size - 1.0  # align_corners=False: -1/+1 are the outer edges
        gx = 2.0 * xs / self.img_size - 1.0
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        return grid.unsqueeze(0)

    def logits_to_slice(self, lowres: torch.Tensor) -> torch.Tensor:
        """(B, C, L, L) low-res logits -> (B, C, h, w) logits at slice pixel centres."""
        grid = self.upsample_grid(lowres.device).expand(lowres.shape[0], -1, -1, -1)
        return F.grid_sample(lowres.float(), grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def masks_to_lowres(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, h, w) binary slice masks -> (B, 1, L, L) mask-prompt logits (outside: negative)."""
        nh, nw = self.input_hw
        dev = masks.device
        cell = self.img_size / self.lowres
        yin = (torch.arange(self.lowres, device=dev, dtype=torch.float32) + 0.5) * cell
        xin = (torch.arange(self.lowres, device=dev, dtype=torch.float32) + 0.5) * cell
        gy = 2.0 * yin / nh - 1.0  # input pixel -> slice frame, normalised over the slice
        gx = 2.0 * xin / nw - 1.0
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        grid = grid.unsqueeze(0).expand(masks.shape[0], -1, -1, -1)
        prob = F.grid_sample(masks.float().unsqueeze(1), grid, mode="bilinear",
                             padding_mode="border", align_corners=False)
        inside = (yin < nh)[:, None] & (xin < nw)[None, :]  # cells over the padding: background
        prob = prob * inside.to(prob.dtype)
        return (prob * 2.0 - 1.0) * MASK_PROMPT_LOGIT


# image-encoder queries per attention pass: a global block's relative-position bias is
# heads x 4096 x 4096 per slice (0.5 GB in bf16 for ViT-H); in chunks the encoder's peak memory
# with 8 slices fell from 26 to 9.4 GiB at the same speed (H200, bf16)
QUERY_CHUNK = 1024


def _count(masks: torch.Tensor) -> torch.Tensor:
    """True pixels along the last dimension of bool ``masks``, as floats: bytes summed in
    int32 (a bool sum widens every pixel to int64, twice as slow on a CPU)."""
    return masks.view(torch.uint8).sum(-1, dtype=torch.int32).float()


def use_sdpa(sam: Any) -> int:
    """Route every attention of a segment-anything ``Sam`` through
    ``F.scaled_dot_product_attention`` (fused kernels on the GPU: less memory, faster), with
    the image encoder's decomposed relative positions as the additive mask, built for a chunk
    of queries at a time. The same maths as segment-anything's own attention (equal to
    rounding). Returns the modules changed."""
    from segment_anything.modeling import image_encoder, transformer

    changed = 0
    for module in sam.modules():
        if isinstance(module, image_encoder.Attention):
            module.forward = _image_attention.__get__(module)
            changed += 1
        elif isinstance(module, transformer.Attention):
            module.forward = _decoder_attention.__get__(module)
            changed += 1
    return changed


def _image_attention(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything.modeling.image_encoder.Attention.forward`` through SDPA, the
    relative-position bias built for ``QUERY_CHUNK`` queries at a time."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    else:
        from segment_anything.modeling.image_encoder import get_rel_pos

        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        rows = max(1, QUERY_CHUNK // w)
        parts = []
        for r0 in range(0, h, rows):  # whole rows of queries
            r1 = min(h, r0 + rows)
            qc = q[:, r0 * w : r1 * w]
            r_q = qc.reshape(q.shape[0], r1 - r0, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh[r0:r1])
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], -1, h * w)
            parts.append(F.scaled_dot_product_attention(qc, k, v, attn_mask=bias.to(q.dtype),
                                                        scale=self.scale))
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def _decoder_attention(self: Any, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
    """``segment_anything.modeling.transformer.Attention.forward`` through SDPA."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(self._recombine_heads(out))


class SamSegmenter(SliceSegmenterBase):
    """Batched SAM slice segmenter over a built ``segment_anything`` ``Sam`` model."""

    def __init__(self, sam: Any, device: torch.device | str = "cpu",
                 config: SegmenterConfig | None = None, model_id: str = "sam", *,
                 sdpa: bool = True) -> None:
        cfg = config or SegmenterConfig()
        self.device = resolve_device(device)
        self.model = sam.to(self.device).eval()
        super().__init__(cfg.embedding_cache_mb, self.device)  # embeddings stay on the device
        if sdpa:
            use_sdpa(self.model)
        self.img_size = int(sam.image_encoder.img_size)
        self.lowres = int(sam.prompt_encoder.mask_input_size[0])
        self.multimask = bool(cfg.backends["sam"].multimask)
        self.max_batch = max(1, int(cfg.decoder_batch_size))
        self.encode_batch = max(1, int(cfg.encoder_batch_size))
        self.id = f"sam:{model_id}"
        self._geoms: dict[tuple[int, int], SamGeometry] = {}

    @classmethod
    def from_config(cls, cfg: SegmenterConfig, device: torch.device,
                    target: str = "particle") -> SamSegmenter:
        """The registry's builder: the checkpoint named by ``cfg.options.model``."""
        return cls.from_checkpoint(cfg.options.model, device, cfg)

    @classmethod
    def from_checkpoint(cls, model: str = "vit_h", device: torch.device | str = "auto",
                        config: SegmenterConfig | None = None) -> SamSegmenter:
        """Load ``vit_h``/``vit_l``/``vit_b`` from ``checkpoints/`` or a ``.pth`` path.

        Raises :class:`cryosam.errors.MissingWeightsError` (one line, how to get the file) when
        the checkpoint is not on this machine.
        """
        from segment_anything import sam_model_registry

        from cryosam.weights import locate_sam

        is_path = model not in SAM_KINDS
        kind = sam_kind_of(model) if is_path else model
        path = locate_sam(kind, Path(model) if is_path else None)
        sam = sam_model_registry[kind](checkpoint=None)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            sam.load_state_dict(state)
        except Exception as exc:  # not a checkpoint, a truncated one, another model's...
            raise CryosamError(
                f"SAM checkpoint {path} could not be loaded as {kind} ({exc.__class__.__name__}); "
                "pass the matching --sam-model (vit_h, vit_l, vit_b) or re-download the file"
            ) from None
        return cls(sam, device, config, model_id=f"{kind}:{Path(path).name}")

    def geometry(self, h: int, w: int) -> SamGeometry:
        """The :class:`SamGeometry` of an h x w slice, made once per slice size."""
        key = (int(h), int(w))
        if key not in self._geoms:
            self._geoms[key] = SamGeometry(key[0], key[1], self.img_size, self.lowres)
        return self._geoms[key]

    # -- image encoder --------------------------------------------------------------------
    @torch.inference_mode()
    def _encode(self, axis: str, indices: list[int]) -> list[torch.Tensor]:
        images = np.stack([np.clip(self.image(axis, i), 0.0, 1.0) for i in indices])
        geom = self.geometry(*images.shape[1:])
        nh, nw = geom.input_hw
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        x = x.unsqueeze(1) * 255.0
        x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = x.expand(-1, 3, -1, -1)
        x = (x - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, self.img_size - nw, 0, self.img_size - nh))
        with autocast(self.device):
            emb = self.model.image_encoder(x)
        # one tensor per slice in the models' working precision (bf16 on the GPU, half of
        # fp32): a view into the batch would keep all of it alive in the cache while only one
        # slice is counted
        return [e.to(compute_dtype(self.device), copy=True) for e in emb.unbind(0)]

    def _nbytes(self, encoding: torch.Tensor) -> int:
        return encoding.numel() * encoding.element_size()

    # -- prompt encoder + mask decoder, many slices in one pass ---------------------------
    @torch.inference_mode()
    def decode(self, embeddings: torch.Tensor, coords: torch.Tensor,
               mask_inputs: torch.Tensor | None, has_mask: torch.Tensor | None,
               all_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask-decoder pass for B prompts, each with its own slice embedding.

        ``embeddings`` (B, C, g, g); ``coords`` (B, 2) one positive point each, in input pixels
        (x, y); ``mask_inputs`` (B, 1, L, L) logits used where ``has_mask``. Returns low-res
        logits (B, M, L, L) and predicted IoUs (B, M): M = 3 with multimask (SAM's tokens 1-3),
        else 1 (token 0), or all 4 tokens with ``all_tokens``. This is
        ``MaskDecoder.predict_masks`` with the image embedding given per prompt instead of one
        embedding repeated for every prompt.
        """
        pe, md = self.model.prompt_encoder, self.model.mask_decoder
        b = coords.shape[0]
        labels = torch.ones((b, 1), dtype=torch.int, device=coords.device)
        # positional encodings in fp32: bf16 would blur the point position (sin of ~2*pi*k)
        sparse, _ = pe(points=(coords[:, None, :], labels), boxes=None, masks=None)
        pos = pe.get_dense_pe().expand(b, -1, -1, -1)
        with autocast(self.device):
            g = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, g[0], g[1])
            if mask_inputs is not None and has_mask is not None and bool(has_mask.any()):
                dense = dense.clone()
                embedded = pe.mask_downscaling(mask_inputs[has_mask])
                dense[has_mask] = embedded.to(dense.dtype)
            tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
            src = embeddings + dense
            c, h, w = src.shape[1:]
            hs, src = md.transformer(src, pos, tokens)
            iou_out = hs[:, 0, :]
            mask_out = hs[:, 1 : 1 + md.num_mask_tokens, :]
            up = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            hyper = torch.stack([mlp(mask_out[:, i, :])
                                 for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
            bb, cc, hh, ww = up.shape
            masks = (hyper @ up.reshape(bb, cc, hh * ww)).reshape(bb, -1, hh, ww)
            iou = md.iou_prediction_head(iou_out)
        sel = slice(0, None) if all_tokens else slice(1, None) if self.multimask else slice(0, 1)
        return masks[:, sel].float(), iou[:, sel].float()

    def segment_batch(self, batches: Sequence[PromptBatch]) -> list[SegmentResult]:
        """All prompts of all ``batches`` through the decoder, ``max_batch`` per pass."""
        self.prepare([(b.axis, b.index) for b in batches])
        results = [empty_result(len(b), self.image_shape(b.axis, b.index)) for b in batches]
        results_logits = [np.zeros((len(b), self.lowres, self.lowres), np.float32)
                          for b in batches]
        flat = [(bi, k) for bi, b in enumerate(batches) for k in range(len(b))]
        for start in range(0, len(flat), self.max_batch):
            chunk = flat[start : start + self.max_batch]
            self._decode_chunk(batches, chunk, results, results_logits)
        for res, lg in zip(results, results_logits, strict=True):
            res.logits = lg
        return results

    @torch.inference_mode()
    def _decode_chunk(self, batches: Sequence[PromptBatch], chunk: list[tuple[int, int]],
                      results: list[SegmentResult], results_logits: list[np.ndarray]) -> None:
        dev = self.device
        embs, coords, has = [], [], []
        # previous logits go to the device in one copy for the chunk (a copy per prompt
        # cost more than the decoder on an H200); previous masks alone are rare (no logits)
        prompts_in = np.zeros((len(chunk), 1, self.lowres, self.lowres), np.float32)
        from_masks: list[tuple[int, SamGeometry, np.ndarray]] = []
        for j, (bi, k) in enumerate(chunk):
            b = batches[bi]
            geom = self.geometry(*self.image_shape(b.axis, b.index))
            embs.append(self.encoding(b.axis, b.index))
            pts = np.asarray(b.points, dtype=np.float64).reshape(-1, 2)
            coords.append(geom.points_to_input(pts[k : k + 1])[0])
            if b.prev_logits is not None:
                prompts_in[j, 0] = b.prev_logits[k]
            elif b.prev_masks is not None:
                from_masks.append((j, geom, np.asarray(b.prev_masks[k], bool)))
            has.append(b.prev_logits is not None or b.prev_masks is not None)
        emb = torch.stack([e.to(dev) for e in embs]).float()
        coord_t = torch.as_tensor(np.stack(coords), dtype=torch.float32, device=dev)
        mask_t = torch.from_numpy(prompts_in).to(dev)
        for j, geom, m in from_masks:
            mask_t[j] = geom.masks_to_lowres(torch.as_tensor(m, device=dev)[None])[0]
        has_t = torch.as_tensor(has, device=dev)
        low, iou = self.decode(emb, coord_t, mask_t if bool(has_t.any()) else None, has_t,
                               all_tokens=True)
        self.decoder_calls += 1
        # candidates: SAM's three ambiguity-aware masks for a lone point (its predictor's advice
        # for one point), plus token 0, trained for several prompts, when a mask comes along
        allowed = torch.ones_like(iou, dtype=torch.bool)
        if self.multimask:
            allowed[:, 0] = has_t
        else:
            allowed[:, 1:] = False
        # postprocess per slice shape (prompts of one axis share it)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (bi, _) in enumerate(chunk):
            b = batches[bi]
            groups.setdefault(self.image_shape(b.axis, b.index), []).append(j)
        for shape, js in groups.items():
            self._select(shape, [chunk[j] for j in js], batches, low[js], iou[js],
                         allowed[js], results, results_logits)

    def _select(self, shape: tuple[int, int], items: list[tuple[int, int]],
                batches: Sequence[PromptBatch], low: torch.Tensor, iou: torch.Tensor,
                allowed: torch.Tensor, results: list[SegmentResult],
                results_logits: list[np.ndarray]) -> None:
        """Pick, per prompt, one of its ``allowed`` candidates.

        With a previous mask and ``min_iou`` (propagation): only candidates whose IoU with the
        previous mask reaches ``min_iou`` and that fit the area cap; the highest predicted IoU
        among them; an empty mask when none is left (the chain stops there). Otherwise the
        best acceptable candidate: non-empty, containing (or touching) the point, within the
        area cap; highest predicted IoU among those."""
        geom = self.geometry(*shape)
        h, w = shape
        dev = low.device
        full = geom.logits_to_slice(low)  # (n, M, h, w)
        binary = full > self.model.mask_threshold
        n, m = binary.shape[:2]
        area = _count(binary.flatten(2))  # (n, M)
        pts = np.stack([np.asarray(batches[bi].points, np.float64).reshape(-1, 2)[k]
                        for bi, k in items])
        caps = np.array([caps_of(batches[bi])[k] for bi, k in items])
        r = np.clip(np.rint(pts[:, 0]).astype(int), 0, h - 1)
        c = np.clip(np.rint(pts[:, 1]).astype(int), 0, w - 1)
        dr = np.repeat([-1, 0, 1], 3)
        dc = np.tile([-1, 0, 1], 3)
        rr_t = torch.as_tensor(np.clip(r[:, None] + dr, 0, h - 1), device=dev)
        cc_t = torch.as_tensor(np.clip(c[:, None] + dc, 0, w - 1), device=dev)
        idx_n = torch.arange(n, device=dev)[:, None, None]
        idx_m = torch.arange(m, device=dev)[None, :, None]
        touch = binary[idx_n, idx_m, rr_t[:, None, :], cc_t[:, None, :]].any(-1)  # (n, M)
        caps_t = torch.as_tensor(caps, dtype=torch.float32, device=dev)[:, None]
        nonempty = area > 0
        ok = nonempty & touch & (area <= caps_t)
        score = iou + 4.0 * ok.float() + 2.0 * (nonempty & touch).float() + nonempty.float()
        # the reference rule: overlap with the previous slice first, then predicted IoU
        strict = torch.zeros(n, dtype=torch.bool, device=dev)
        js = [j for j, (bi, _) in enumerate(items)
              if batches[bi].min_iou is not None and batches[bi].prev_masks is not None]
        if js:  # all prompts with a previous mask at once (one copy to the device)
            prev = torch.as_tensor(np.stack([np.asarray(batches[items[j][0]].prev_masks[
                items[j][1]], bool) for j in js]), device=dev)
            min_iou = torch.as_tensor([float(batches[items[j][0]].min_iou) for j in js],
                                      dtype=torch.float32, device=dev)[:, None]
            jt = torch.as_tensor(js, device=dev)
            strict[jt] = True
            inter = _count((binary[jt] & prev[:, None]).flatten(2))  # (S, M)
            union = area[jt] + _count(prev.flatten(1))[:, None] - inter
            overlap = torch.where(union > 0, inter / union.clamp(min=1.0), 0.0)
            keep = nonempty[jt] & (overlap >= min_iou) & (area[jt] <= caps_t[jt])
            score[jt] = torch.where(keep, iou[jt] + 8.0, torch.full_like(iou[jt], -1.0))
        score = torch.where(allowed, score, torch.full_like(score, -torch.inf))
        best = score.argmax(1)
        ar = torch.arange(n, device=dev)
        none_left = strict & (score[ar, best] < 0)
        chosen = binary[ar, best] & ~none_left[:, None, None]  # (n, h, w)
        chosen_logits = full[ar, best]
        conf = torch.where(chosen.flatten(1).any(1), iou[ar, best].clamp(0.0, 1.0),
                           torch.zeros_like(iou[ar, best]))
        # most confident point: highest logit inside the mask (the prompt point if empty)
        flat = torch.where(chosen, chosen_logits, torch.full_like(chosen_logits, -torch.inf))
        arg = flat.flatten(1).argmax(1)
        best_rc = torch.stack([arg // w, arg % w], dim=1).float()
        masks_np = chosen.cpu().numpy()
        conf_np = conf.float().cpu().numpy()
        rc_np = best_rc.cpu().numpy()
        low_np = low[ar, best].float().cpu().numpy()
        rejected_np = none_left.cpu().numpy()
        for j, (bi, k) in enumerate(items):
            res = results[bi]
            if res.rejected is None:
                res.rejected = np.zeros(len(res.confidence), dtype=bool)
            res.rejected[k] = rejected_np[j]
            res.masks[k] = masks_np[j]
            res.confidence[k] = conf_np[j]
            res.points[k] = rc_np[j] if masks_np[j].any() else pts[j]
            results_logits[bi][k] = low_np[j]
