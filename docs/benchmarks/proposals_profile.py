"""Where a second query's segment_proposals time goes (every SAM embedding cached): the first
N recorded proposal calls of a workload replayed once to encode their slices, then timed three
times, then under torch's profiler (CPU and CUDA) and cProfile (skipped with TIME_ONLY=1).

    python docs/benchmarks/proposals_profile.py paper \
        docs/benchmarks/workload-200x512x512.json 60 cuda
"""

import cProfile
import os
import pstats
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from cryosam.benchmarks.replay import build_models, replay_segmenter
from cryosam.benchmarks.workload import Workload
from cryosam.device import resolve_device

models, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dev = resolve_device(sys.argv[4] if len(sys.argv) > 4 else "auto")
wl = Workload.load(path)
_, seg = build_models(models, dev)
calls = wl.calls["segment_proposals"][:n]
vol = np.random.default_rng(0).random(wl.shape, dtype=np.float32)
t = time.perf_counter()
replay_segmenter(seg, vol, calls, wl.particle_radius)
print(f"first pass (encoding {seg.slices_encoded} slices): {time.perf_counter() - t:.1f} s")
prompts = sum(len(b[2]) for c in calls for b in c)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
times = []
for _ in range(3):
    t = time.perf_counter()
    replay_segmenter(seg, vol, calls, wl.particle_radius)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print("second passes:", " ".join(f"{x:.2f}" for x in times))
plain = min(times)
print(f"second pass, no profiler: {plain:.2f} s for {len(calls)} calls, {prompts} prompts "
      f"({1000 * plain / len(calls):.1f} ms a call)")
if os.environ.get("TIME_ONLY"):
    sys.exit(0)
with profile(activities=acts) as prof:
    replay_segmenter(seg, vol, calls, wl.particle_radius)
key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
if dev.type == "cuda":
    print(prof.key_averages().table(sort_by=key, row_limit=12))
pr = cProfile.Profile()
pr.enable()
replay_segmenter(seg, vol, calls, wl.particle_radius)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
