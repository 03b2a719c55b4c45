"""SAM image encoder (random weights, trained-like relative positions): seconds and peak GPU
memory for one batch of slices, with the relative-position bias built for all queries at once
(segment-anything's way, through SDPA) and in chunks of ``QUERY_CHUNK`` queries (cryosam's).

    python docs/benchmarks/sam_attention.py --device cuda --model vit_h --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling.image_encoder import Attention

from cryosam.device import autocast, peak_memory_bytes, reset_peak_memory, resolve_device
from cryosam.segmenters import sam as cryosam_sam


def main() -> None:
    """Parse the options, time both attention paths and print their figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="vit_h", choices=("vit_b", "vit_l", "vit_h"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    sam = sam_model_registry[args.model](checkpoint=None)
    for m in sam.image_encoder.modules():  # trained checkpoints have non-zero ones
        if isinstance(m, Attention) and m.use_rel_pos:
            torch.nn.init.normal_(m.rel_pos_h, std=0.5)
            torch.nn.init.normal_(m.rel_pos_w, std=0.5)
    cryosam_sam.use_sdpa(sam)
    encoder = sam.image_encoder.to(dev).eval()
    x = torch.randn(args.batch, 3, encoder.img_size, encoder.img_size, device=dev)
    chunk = cryosam_sam.QUERY_CHUNK
    ref = None
    for _ in range(args.repeats):  # the first pass of each also warms the kernels up
        for name, size in (("all queries", 1 << 30), (f"chunks of {chunk}", chunk)):
            cryosam_sam.QUERY_CHUNK = size
            reset_peak_memory(dev)
            start = time.perf_counter()
            with torch.inference_mode(), autocast(dev):
                out = encoder(x).float()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - start
            ref = out if ref is None else ref
            diff = float((out - ref).abs().max() / ref.abs().max())
            print(f"{args.model} x{args.batch} on {dev.type}, bias for {name:16s} "
                  f"{seconds:6.2f} s  {args.batch / seconds:6.1f} slices/s  "
                  f"peak {peak_memory_bytes(dev) / 2**30:6.2f} GiB  rel. difference {diff:.1e}")
    cryosam_sam.QUERY_CHUNK = chunk


if __name__ == "__main__":
    main()
