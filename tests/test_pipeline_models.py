"""The whole pipeline with the real model classes (tiny, random weights): it runs end to end
through DINOv2 (transformers) and SAM (segment-anything) code and writes every output.
No accuracy is claimed: random weights segment nothing meaningful."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosam.benchmarks.pipeline import paper_config
from cryosam.encoders.dinov2 import Dinov2Encoder
from cryosam.export import OUTPUT_FILES, write_outputs
from cryosam.pipeline import CryoSAM
from cryosam.segmenters.sam import SamSegmenter
from cryosam.simulate import SimulationConfig, simulate
from cryosam.testing import tiny_sam


@pytest.mark.parametrize("target", ["particle", "membrane"])
def test_tiny_dinov2_and_sam_run_end_to_end(target: str, tiny_dinov2_model,
                                            tmp_path: Path) -> None:
    torch.set_num_threads(2)
    sim = simulate(SimulationConfig(shape=(32, 64, 72), seed=2, n_targets=3, n_blobs=2,
                                    n_filaments=1))
    encoder = Dinov2Encoder(tiny_dinov2_model, patches_long_side=8, device="cpu")
    segmenter = SamSegmenter(tiny_sam(img_size=128, seed=0), "cpu")
    # the paper benchmark's settings for random weights: any similarity reaches SAM, every
    # pick is kept, no size cap or binning; short chains
    cfg = paper_config("cpu", 4, 3, sim.volume.shape, sim.voxel_size, target)
    points = sim.membrane_clicks[:2] if target == "membrane" else sim.prompt_points[:1]
    result = CryoSAM(cfg, encoder=encoder, segmenter=segmenter).segment(
        sim.volume, points, voxel_size=sim.voxel_size, match=True)
    rec = result.record
    assert rec["counts"]["proposals"] >= 1  # matching ran on DINOv2 features
    assert rec["counts"]["encoder_calls"] > 0 and rec["counts"]["decoder_calls"] > 0
    assert rec["models"]["encoder"].startswith("dinov2") or "dinov2" in rec["models"]["encoder"]
    assert result.semantic.shape == sim.volume.shape
    # SAM sees the 72-voxel long side at 128 px: 16-px patches span 9 voxels
    assert rec["scale"]["sam_voxels_per_patch"] == 9.0
    out = tmp_path / "out"
    written = write_outputs(result, out)
    picks = {"picks.csv", "picks.star", "picks_napari.csv", "picks_relion5.star",
             "picks_warp.star"}
    expected = set(OUTPUT_FILES) - {"picks_relion4.star", "membranes.csv"}  # needs a pixel size
    if target != "particle":
        expected = expected - picks - {"picks_below_cut.csv"} | {"membranes.csv"}
    else:  # --min-score 0: nothing is below the cut, and the file says so (a header only)
        below = (out / "picks_below_cut.csv")
    assert set(written) == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    if target == "particle":
        assert below.read_text().count("\n") == 1 and below.read_text().startswith("x,y,z")
    assert json.loads((out / "run.json").read_text())["parameters"]["propagation"]["target"] \
        == target
    assert np.isfinite(result.instance_scores).all()
